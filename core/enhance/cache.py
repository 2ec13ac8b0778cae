"""Enhanced-image cache: one file per (enhancer, weights hash, source sha1).

A second run with the same enhancer and weights reuses every image already made; a file is written to
a temporary name and renamed, so an interrupted run never leaves a half-written image behind.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from core.enhance.registry import Enhancer

FORMATS = {"png": {"format": "PNG", "compress_level": 1}, "jpeg": {"format": "JPEG", "quality": 95},
           "webp": {"format": "WEBP", "lossless": True}}

ProgressFn = Callable[[int, int], None]  # (done, total)


def cache_path(cache_dir: Path, enhancer: Enhancer, sha1: str, fmt: str = "png") -> Path:
    return Path(cache_dir) / "enhanced" / enhancer.name / enhancer.weights_id()[:16] / sha1[:2] / f"{sha1}.{fmt}"


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image to RGB uint8; raises on unreadable or truncated files."""
    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("RGB"))


def save_image_atomic(arr: np.ndarray, dest: Path, fmt: str = "png") -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; choose from {', '.join(FORMATS)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    opts = dict(FORMATS[fmt])
    Image.fromarray(arr).save(tmp, **opts)
    os.replace(tmp, dest)


def is_valid_image(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:
        return False


@dataclass
class EnhanceResult:
    paths: dict[str, str] = field(default_factory=dict)  # source key -> enhanced file
    errors: list[dict] = field(default_factory=list)  # {"path", "error"}
    done_before: int = 0  # found valid in the cache
    made: int = 0
    seconds: float = 0.0


def enhance_to_cache(
    sources: Sequence[tuple[str, str]],
    enhancer: Enhancer,
    cache_dir: Path,
    batch_size: int = 4,
    fmt: str = "png",
    on_progress: ProgressFn | None = None,
) -> EnhanceResult:
    """Enhance ``(path, sha1)`` sources into the cache; returns sha1 -> cached path and per-image errors."""
    res = EnhanceResult()
    todo: list[tuple[str, str, Path]] = []
    for path, sha1 in sources:
        dest = cache_path(cache_dir, enhancer, sha1, fmt)
        if dest.is_file():
            res.paths[sha1] = str(dest)
            res.done_before += 1
        else:
            todo.append((path, sha1, dest))
    total = len(sources)
    t0 = time.perf_counter()
    if on_progress:
        on_progress(res.done_before, total)
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        images, ok = [], []
        for path, sha1, dest in chunk:
            try:
                images.append(load_rgb(path))
                ok.append((path, sha1, dest))
            except Exception as e:  # unreadable source: listed, never fatal
                res.errors.append({"path": path, "error": f"{type(e).__name__}: {e}"})
        if images:
            outs = enhancer.enhance_batch(images)
            for (path, sha1, dest), out in zip(ok, outs):
                save_image_atomic(out, dest, fmt)
                res.paths[sha1] = str(dest)
                res.made += 1
        if on_progress:
            on_progress(res.done_before + min(i + batch_size, len(todo)), total)
    res.seconds = time.perf_counter() - t0
    return res
