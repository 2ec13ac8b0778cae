"""A Kaggle-layout TEST folder of augmented copies of a source test folder, at Kaggle TEST's size.

The Kaggle TEST split (2,487 images) is augmentations of a few source cells, like TRAIN; it is not provided
here. This makes a stand-in of the same size and layout from TEST_SIMPLE's 71 source-disjoint cells: each
output image is one of them turned by a half turn or none plus up to 20 degrees (reflected at the border), maybe
mirrored, shifted by up to 5% and re-encoded as JPEG, so every file has its own content hash (nothing comes from a cache made for another
folder). It times the test-set stages of a study (grouping embeddings, enhancement, 8-view TTA) at the size the
issue asks about. Its accuracy is that of TEST_SIMPLE's cells seen again under new augmentations: a reading,
not a new test set, and never used to choose anything.

    python benchmarks/make_test_folder.py ../shared/data/blood-cells/TEST_SIMPLE /tmp/bigtest/TEST --per-class 623,620,620,624
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.config import CLASSES  # noqa: E402

KAGGLE_TEST = (623, 620, 620, 624)  # Kaggle TEST per class (EOS, LYM, MON, NEU): 2,487 images


def augment(im: Image.Image, rng: random.Random) -> Image.Image:
    """A half turn or none, a tilt of up to 20 degrees (reflected border), maybe a mirror, a shift of up to 5%: the
    kind of copy Kaggle's splits hold, small enough that the stained cell stays in the 320 x 240 frame."""
    w, h = im.size
    pad = Image.fromarray(_reflect(im, w // 2, h // 2))  # room to turn without black corners
    angle = rng.choice((0, 180)) + rng.uniform(-20, 20)
    out = pad.rotate(angle, resample=Image.BILINEAR, center=(pad.width / 2, pad.height / 2))
    dx, dy = rng.uniform(-0.05, 0.05) * w, rng.uniform(-0.05, 0.05) * h
    left, top = int(round(w / 2 + dx)), int(round(h / 2 + dy))
    out = out.crop((left, top, left + w, top + h))
    return ImageOps.mirror(out) if rng.random() < 0.5 else out


def _reflect(im: Image.Image, px: int, py: int):
    import numpy as np

    return np.pad(np.asarray(im.convert("RGB")), ((py, py), (px, px), (0, 0)), mode="reflect")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="a test folder in the Kaggle layout (EOSINOPHIL/, ...)")
    ap.add_argument("out", type=Path, help="the new TEST folder (must not exist)")
    ap.add_argument("--per-class", default=",".join(map(str, KAGGLE_TEST)), help="images per class, in CLASSES order")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    counts = [int(x) for x in a.per_class.split(",")]
    if len(counts) != len(CLASSES):
        ap.error(f"--per-class: give {len(CLASSES)} numbers, one per class")
    if a.out.exists():
        ap.error(f"{a.out} exists; give a new folder")
    rng = random.Random(a.seed)
    for cls, n in zip(CLASSES, counts):
        src = sorted(p for p in (a.source / cls.upper()).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not src:
            ap.error(f"{a.source / cls.upper()} has no images")
        dst = a.out / cls.upper()
        dst.mkdir(parents=True)
        for i in range(n):
            p = src[i % len(src)]  # every source cell about equally often
            with Image.open(p) as im:
                augment(im.convert("RGB"), rng).save(dst / f"{p.stem}_aug{i:04d}.jpeg", quality=92)
        print(f"{cls}: {n} images from {len(src)} source images -> {dst}")


if __name__ == "__main__":
    main()
