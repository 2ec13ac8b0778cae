"""Generated blood-cell-like images in the Kaggle layout, for fast tests.

Each class gets its own stain colour and nucleus shape, so a small CNN can learn them in seconds;
each "source cell" is augmented (flip, rotation, shift) several times, like the real data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from core.config import CLASSES

_COLOURS = {"eosinophil": (200, 80, 60), "lymphocyte": (80, 60, 170), "monocyte": (120, 110, 160),
            "neutrophil": (150, 70, 140)}
_LOBES = {"eosinophil": 2, "lymphocyte": 1, "monocyte": 1, "neutrophil": 4}


def cell_image(label: str, rng: np.random.Generator, size=(64, 48)) -> Image.Image:
    w, h = size
    bg = np.clip(rng.normal(215, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(bg)
    d = ImageDraw.Draw(im)
    cx, cy = w // 2 + rng.integers(-4, 5), h // 2 + rng.integers(-4, 5)
    r = (w // 5) + (4 if label == "monocyte" else 0)
    n = _LOBES[label]
    for k in range(n):
        a = 2 * np.pi * k / n + rng.uniform(0, 0.5)
        ox, oy = (0, 0) if n == 1 else (int(r * 0.45 * np.cos(a)), int(r * 0.45 * np.sin(a)))
        rr = r if n == 1 else r // 2 + 1
        d.ellipse([cx + ox - rr, cy + oy - rr, cx + ox + rr, cy + oy + rr], fill=_COLOURS[label])
    return im


def make_dataset(root: Path, train_per_class: int = 12, test_per_class: int = 4, sources: int = 3,
                 size=(64, 48), seed: int = 0, splits=("TRAIN", "TEST_SIMPLE")) -> Path:
    """Write ``root/<split>/<CLASS>/_K_N.jpeg``; images of a split come from ``sources`` source cells."""
    rng = np.random.default_rng(seed)
    for split in splits:
        n = train_per_class if split == "TRAIN" else test_per_class
        for label in CLASSES:
            folder = Path(root) / split / label.upper()
            folder.mkdir(parents=True, exist_ok=True)
            cells = [cell_image(label, rng, size) for _ in range(sources)]
            for i in range(n):
                k = i % sources
                im = cells[k].rotate(int(rng.integers(0, 4)) * 90, expand=False)
                if rng.random() < 0.5:
                    im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                im.save(folder / f"_{k}_{i}.jpeg", quality=92)
    return Path(root)
