"""Compatibility shims needed before importing basicsr / realesrgan."""

from __future__ import annotations

import sys
import types


def ensure_basicsr_importable() -> None:
    """basicsr 1.4.2 imports ``torchvision.transforms.functional_tensor``, removed in torchvision 0.17.

    Register a stand-in module exposing ``rgb_to_grayscale`` (the only name basicsr uses) from
    ``torchvision.transforms.functional``. Idempotent; call it before any basicsr/realesrgan import.
    """
    name = "torchvision.transforms.functional_tensor"
    if name in sys.modules:
        return
    try:
        import torchvision.transforms.functional_tensor  # noqa: F401  (old torchvision: nothing to do)
        return
    except ImportError:
        pass
    from torchvision.transforms.functional import rgb_to_grayscale

    mod = types.ModuleType(name)
    mod.rgb_to_grayscale = rgb_to_grayscale
    sys.modules[name] = mod
