"""The enhancer registry: one table from variant name to a factory, as in timm's model registry.

An enhancer maps a batch of RGB uint8 images (H, W, 3) to a batch of RGB uint8 images. Register a
new one with ``@register_enhancer(name, ...)``; the study then accepts it as ``--variants name``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from core.registry import Registry

# An enhancer's ``half``: None (its default), True / False, or FAST_PRECISION: reduced precision only where it is
# measured to be faster (core.enhance.realesrgan).
FAST_PRECISION = "fast"


def is_half_setting(half) -> bool:
    """Whether ``half`` is one of the values above (a config may come from a hand-edited run.json)."""
    return half is None or isinstance(half, bool) or half == FAST_PRECISION


class Enhancer(Protocol):
    name: str
    scale: int

    def weights_id(self) -> str:
        """A hash of the weights/parameters: part of the cache key ('none' for the identity)."""

    # Optional: ``output_id() -> str``, the cache key of the outputs when they depend on more than the weights
    # (Real-ESRGAN: the precision); ``batch_size``, images per call when the caller gives none.

    def provenance(self) -> dict:
        """What produced the output (weights source, sha256, parameters), recorded in run.json."""

    def enhance_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Enhance RGB uint8 (H, W, 3) images; all images in one call may have different sizes."""


@dataclass(frozen=True)
class EnhancerSpec:
    name: str
    factory: Callable[..., Enhancer]
    description: str
    scale: int
    identity: bool = False  # True only for 'original': no files are written


_REGISTRY: Registry[EnhancerSpec] = Registry("enhancer", EnhancerSpec)
# @register_enhancer(name, description, scale=4[, identity=True]) over a factory(**kwargs) -> Enhancer
register_enhancer = _REGISTRY.register
list_enhancers = _REGISTRY.names  # (pattern="*") -> names
get_enhancer_spec = _REGISTRY.get  # (name) -> EnhancerSpec; unknown names: ValueError listing the choices
create_enhancer = _REGISTRY.create  # (name, **kwargs) -> Enhancer; None kwargs are dropped so defaults apply
