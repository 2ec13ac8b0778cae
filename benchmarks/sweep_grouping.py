"""Source grouping on real TRAIN: a cut sweep for one embedding recipe (issue 12's measurements).

    python benchmarks/sweep_grouping.py --loader cell --size 112 --views 4

Embeds all of TRAIN, TEST_SIMPLE and a known-truth set (each distinct TEST_SIMPLE cell plus 3 augmentations of
our own: rotation by a multiple of 90 degrees +-8, shift, zoom, flip) with ``core.groups``' model and prints,
per average-linkage cut: group counts per TRAIN class against the source-cell counts 75/27/16/159, the
known-truth groups (mixed / split) and TEST_SIMPLE alone. ``--loader centre`` is the product's recipe (a 200 px
centre crop); ``cell`` crops a square around the stained cell (core.regions.find_cell) instead. Embeddings go to
a cache of their own (``--cache``), never the product's.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
EXPECTED = {"eosinophil": 75, "lymphocyte": 27, "monocyte": 16, "neutrophil": 159}
CUTS = (0.45, 0.50, 0.55, 0.60, 0.65, 0.70)


def cell_loader(crop: int):
    """_load_image replacement: a ``crop`` square around the stained cell (centre crop when none is found)."""
    from core.regions import find_cell

    def load(path: str, _crop: int, size: int) -> np.ndarray:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            c = min(crop, w, h)
            found = find_cell(np.asarray(im))
            cx, cy = found if found else (w / 2, h / 2)
            left = int(min(max(cx - c / 2, 0), w - c))
            top = int(min(max(cy - c / 2, 0), h - c))
            im = im.crop((left, top, left + c, top + c)).resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)

    return load


def known_truth(test_simple: pd.DataFrame, out: Path, per: int = 3) -> pd.DataFrame:
    """Each distinct TEST_SIMPLE cell and ``per`` augmentations of it (the tests' ``augment``)."""
    from test_groups import augment

    rng = np.random.default_rng(0)
    rows = []
    for r in test_simple.drop_duplicates("sha1").itertuples():
        src = Image.open(r.path).convert("RGB")
        rows.append({"path": r.path, "sha1": r.sha1, "label": r.label, "cell": r.sha1})
        for k in range(per):
            p = out / f"{r.sha1[:12]}-{k}.png"
            augment(src, rng).save(p)
            rows.append({"path": str(p), "sha1": hashlib.sha1(p.read_bytes()).hexdigest(), "label": r.label,
                         "cell": r.sha1})
    return pd.DataFrame(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/blood-cells"))
    ap.add_argument("--loader", choices=("centre", "cell"), default="cell")
    ap.add_argument("--crop", type=int, default=144, help="square side in original pixels (around the cell, or the centre crop)")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--whiten", type=int, default=0, metavar="N",
                    help="learn the copy whitening from N TRAIN images and --augs copies of each (0: centring only)")
    ap.add_argument("--augs", type=int, default=2)
    ap.add_argument("--copy-views", type=int, default=2, help="dihedral views averaged per copy")
    ap.add_argument("--dims", type=int, default=256)
    ap.add_argument("--keep", type=int, default=128)
    ap.add_argument("--shrink", type=float, default=0.3)
    ap.add_argument("--cuts", default=",".join(map(str, CUTS)))
    ap.add_argument("--linkage", default="average", help="scipy linkage method(s), comma-separated")
    ap.add_argument("--tune", action="store_true",
                    help="embed with the product's copy-tuned network (core.groups.copy_tune, learned from TRAIN)")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "wbc-sweep-cache"))
    args = ap.parse_args()

    from core import groups as G
    from core.data import build_manifest

    if args.loader == "cell":
        G._load_image = cell_loader(args.crop)
    else:  # the product's loader reads core.groups.CROP (the whitening's copies too)
        G.CROP = args.crop
    G.SIZE = args.size
    cache = Path(args.cache) / f"{args.loader}-c{args.crop}-s{args.size}-v{args.views}"
    man = build_manifest(Path(args.data), None)
    train, ts = man.split("TRAIN"), man.split("TEST_SIMPLE")
    aug_dir = Path(tempfile.mkdtemp(prefix="wbc-known-"))
    truth = known_truth(ts, aug_dir)
    from core.devices import cpu_model

    cpu = cpu_model()
    print(f"# {date.today()} cpu={cpu} cores={os.cpu_count()} loader={args.loader} crop={args.crop} "
          f"size={args.size} views={args.views}")
    tuned = None
    if args.tune:
        t0 = time.perf_counter()
        tuned = G.copy_tune(train, cache)
        print(f"copy-tuned network {tuned} in {(time.perf_counter() - t0) / 60:.1f} min (sample grouping included)")
    G._get_model("cpu", tuned)
    t0 = time.perf_counter()
    emb_train = G.embed_images(train["path"].tolist(), train["sha1"].tolist(), cache, views=args.views, tuned=tuned)
    t_train = time.perf_counter() - t0
    print(f"embedded {len(train)} TRAIN images in {t_train / 60:.1f} min ({len(train) / t_train:.1f} img/s)")
    emb_ts = G.embed_images(ts["path"].tolist(), ts["sha1"].tolist(), cache, views=args.views, tuned=tuned)
    emb_truth = G.embed_images(truth["path"].tolist(), truth["sha1"].tolist(), cache, views=args.views, tuned=tuned)
    train_c = G.centre(emb_train)
    truth_c, ts_c = G.centre(emb_truth), G.centre(emb_ts)
    if args.whiten:  # the product's learned whitening (core.groups.whitening) with these settings
        G.WHITEN_IMAGES, G.WHITEN_COPIES, G.WHITEN_DIMS = args.whiten, args.augs, args.dims
        G.WHITEN_KEEP, G.WHITEN_SHRINK, G.WHITEN_VIEWS = args.keep, args.shrink, args.copy_views
        t1 = time.perf_counter()
        w = G.whitening(train, emb_train, cache, tuned=tuned)
        train_c, truth_c, ts_c = G.project(train_c, w), G.project(truth_c, w), G.project(ts_c, w)
        print(f"whitening from {min(args.whiten, len(train))} TRAIN images x {args.augs} copies "
              f"at {args.copy_views} views ({time.perf_counter() - t1:.0f} s), dims={args.dims} keep={args.keep} shrink={args.shrink}")
    for method in args.linkage.split(","):
        print(f"linkage={method}")
        print("| cut | EOS | LYM | MON | NEU | mean abs(log(found/expected)) | known truth: groups for "
              f"{truth['cell'].nunique()} cells (mixed / split) | TEST_SIMPLE alone ({ts['sha1'].nunique()} distinct) |")
        print("|---|---|---|---|---|---|---|---|")
        for cut in [float(c) for c in args.cuts.split(",")]:
            counts = {}
            for label, idx in train.groupby("label").groups.items():
                counts[label] = len(set(G.cluster(train_c[idx], cut, train.loc[idx, "sha1"].tolist(), method)))
            err = np.mean([abs(np.log(counts[c] / EXPECTED[c])) for c in EXPECTED])
            mixed = split = groups = 0
            for label, idx in truth.groupby("label").groups.items():
                lab = G.cluster(truth_c[idx], cut, truth.loc[idx, "sha1"].tolist(), method)
                cells = truth.loc[idx, "cell"].to_numpy()
                g = pd.DataFrame({"g": lab, "cell": cells})
                groups += g["g"].nunique()
                mixed += int((g.groupby("g")["cell"].nunique() > 1).sum())
                split += int((g.groupby("cell")["g"].nunique() > 1).sum())
            ts_groups = sum(len(set(G.cluster(ts_c[idx], cut, ts.loc[idx, "sha1"].tolist(), method)))
                            for _, idx in ts.groupby("label").groups.items())
            print(f"| {cut:.2f} | " + " | ".join(str(counts[c]) for c in EXPECTED)
                  + f" | {err:.2f} | {groups} ({mixed} / {split}) | {ts_groups} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
