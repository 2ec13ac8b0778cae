"""The enhancer registry: one table from variant name to a factory, as in timm's model registry.

An enhancer maps a batch of RGB uint8 images (H, W, 3) to a batch of RGB uint8 images. Register a
new one with ``@register_enhancer(name, ...)``; the study then accepts it as ``--variants name``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from core.registry import Registry


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
    # Rough CPU seconds per 320x240 image, used for estimates before a run starts.
    cpu_seconds_per_image: float = 0.01
    tags: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: Registry[EnhancerSpec] = Registry("enhancer")


def register_enhancer(name: str, description: str, scale: int, **kw) -> Callable:
    return _REGISTRY.register(name, lambda factory: EnhancerSpec(name=name, factory=factory, description=description,
                                                                 scale=scale, **kw))


list_enhancers = _REGISTRY.names  # (pattern="*") -> names
get_enhancer_spec = _REGISTRY.get  # (name) -> EnhancerSpec; unknown names: ValueError listing the choices


def create_enhancer(name: str, **kwargs) -> Enhancer:
    """Build an enhancer by name; ``None`` kwargs are dropped so defaults apply."""
    spec = get_enhancer_spec(name)
    return spec.factory(**{k: v for k, v in kwargs.items() if v is not None})
