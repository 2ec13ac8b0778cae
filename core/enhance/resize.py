"""Identity and classical-interpolation enhancers: the 'original' variant and the x4 controls.

The controls answer whether "more pixels" alone (bicubic, Lanczos) changes accuracy, as opposed to
the detail a GAN adds (Real-ESRGAN).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from core.enhance.registry import register_enhancer


class IdentityEnhancer:
    name = "original"
    scale = 1

    def weights_id(self) -> str:
        return "none"

    def provenance(self) -> dict:
        return {"enhancer": self.name}

    def enhance_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(im) for im in images]


class ResizeEnhancer:
    def __init__(self, name: str, resample: Image.Resampling, scale: int = 4):
        self.name, self.resample, self.scale = name, resample, scale

    def weights_id(self) -> str:
        return f"pil-{self.resample.name.lower()}-x{self.scale}"

    def provenance(self) -> dict:
        return {"enhancer": self.name, "method": f"PIL {self.resample.name}", "scale": self.scale}

    def enhance_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        out = []
        for im in images:
            h, w = im.shape[:2]
            out.append(np.asarray(Image.fromarray(im).resize((w * self.scale, h * self.scale), self.resample)))
        return out


@register_enhancer("original", "The images as they are (no enhancement).", scale=1, identity=True)
def _original(**_) -> IdentityEnhancer:
    return IdentityEnhancer()


@register_enhancer("bicubic-x4", "Control: bicubic x4 upscaling (more pixels, no new detail).", scale=4)
def _bicubic(**_) -> ResizeEnhancer:
    return ResizeEnhancer("bicubic-x4", Image.Resampling.BICUBIC)


@register_enhancer("lanczos-x4", "Control: Lanczos x4 upscaling (more pixels, no new detail).", scale=4)
def _lanczos(**_) -> ResizeEnhancer:
    return ResizeEnhancer("lanczos-x4", Image.Resampling.LANCZOS)
