"""Ablation of the classifier recipe: one change per row, grouped validation and TEST_SIMPLE.

Each row is a real study (``core.pipeline.run``) on the real images, variant ``original`` only, with the
row's overrides on top of the base recipe. Prints one line per row and a Markdown table at the end
(docs/BENCHMARKS.md). Select on the grouped validation columns; TEST_SIMPLE is reported, not tuned on.

    python benchmarks/ablate_classifier.py --rows all --runs-dir /tmp/ablate
    python benchmarks/ablate_classifier.py --rows base,full --per-class 300
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import pandas as pd

from core.config import CLASSES, PRESETS, make_config
from core.pipeline import run

# One change per row, relative to BASE (the quick preset's recipe on the original images).
ROWS: dict[str, dict] = {
    "base": {},
    "policy=full (the paper's squashed frame)": dict(input_policy="full"),
    "policy=center (200 px centred square)": dict(input_policy="center"),
    "augment=dihedral (no zoom/shift/stain jitter)": dict(augment="dihedral"),
    "augment=dihedral-batch (old: one transform per batch)": dict(augment="dihedral-batch"),
    "label_smoothing=0": dict(label_smoothing=0.0),
    "tta=1 (no test-time augmentation)": dict(tta=1),
    "select_by=val_loss (old checkpoint rule)": dict(select_by="val_loss"),
    "frozen backbone (old quick: linear probe)": dict(freeze_backbone=True, epochs=20, lr=3e-3, patience=6),
    "image_size=160 (region upsampled 1.1x)": dict(image_sizes=(160,)),
    "classifier=efficientnet_lite1": dict(classifier="efficientnet_lite1"),
    "per_class=600 (twice the images)": dict(per_class=600),
    "ema=1 (validate a weight average over ~1 epoch)": dict(ema=1.0),
    "mixup=0.4 (mix training pairs and labels)": dict(mixup=0.4),
    "backbone_lr=0.1 (pretrained layers at a tenth of the head's rate)": dict(backbone_lr=0.1),
    "crop=160 (a wider region around the cell, same 128 px input)": dict(crop=160),
    "crop=176 (a wider region around the cell, same 128 px input)": dict(crop=176),
    "weight_decay=0.05 (AdamW decay at the usual fine-tuning strength, not 1e-4)": dict(weight_decay=0.05),
    "augment=dihedral+jitter+hed (also jitter each stain's amount)": dict(augment="dihedral+jitter+hed"),
    "augment=dihedral+zoom (zoom/shift jitter, no stain jitter)": dict(augment="dihedral+zoom"),
    "augment=dihedral+jitter+rotate (also a turn by any angle)": dict(augment="dihedral+jitter+rotate"),
    "augment=dihedral+jitter+erase (also random erasing)": dict(augment="dihedral+jitter+erase"),
}
KEYS = {"base": "base", "full": "policy=full (the paper's squashed frame)",
        "center": "policy=center (200 px centred square)", "nojitter": "augment=dihedral (no zoom/shift/stain jitter)",
        "batchaug": "augment=dihedral-batch (old: one transform per batch)", "nols": "label_smoothing=0",
        "notta": "tta=1 (no test-time augmentation)", "valloss": "select_by=val_loss (old checkpoint rule)",
        "frozen": "frozen backbone (old quick: linear probe)", "size160": "image_size=160 (region upsampled 1.1x)",
        "lite1": "classifier=efficientnet_lite1", "pc600": "per_class=600 (twice the images)",
        "ema": "ema=1 (validate a weight average over ~1 epoch)", "mixup": "mixup=0.4 (mix training pairs and labels)",
        "bblr": "backbone_lr=0.1 (pretrained layers at a tenth of the head's rate)",
        "crop160": "crop=160 (a wider region around the cell, same 128 px input)",
        "crop176": "crop=176 (a wider region around the cell, same 128 px input)",
        "wd05": "weight_decay=0.05 (AdamW decay at the usual fine-tuning strength, not 1e-4)",
        "hed": "augment=dihedral+jitter+hed (also jitter each stain's amount)",
        "nocolour": "augment=dihedral+zoom (zoom/shift jitter, no stain jitter)",
        "rotate": "augment=dihedral+jitter+rotate (also a turn by any angle)",
        "erase": "augment=dihedral+jitter+erase (also random erasing)"}


def row_metrics(r) -> dict:
    pred, val = r.table("predictions"), r.table("validation")
    rec = pred.groupby("true_label")["correct"].mean().reindex(list(CLASSES))
    meta = r.read_meta()
    return {"val_acc": float(val["val_accuracy"].mean()), "val_f1": float(val["val_macro_f1"].mean()),
            "test_acc": float(pred["correct"].mean()), "test_bal_acc": float(rec.mean()),
            "eos_recall": float(rec["eosinophil"]), "train_s": sum(v for k, v in meta["stages"].items()
                                                                  if k.startswith("train")),
            "run_id": r.run_id}


def pop_option(name: str, default: str) -> str:
    """The value of a prototype script's own ``name VALUE`` option, taken out of ``sys.argv`` before :func:`main`
    parses the rest; ``default`` when absent."""
    if name not in sys.argv:
        return default
    i = sys.argv.index(name)
    value = sys.argv[i + 1]
    del sys.argv[i:i + 2]
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="all", help=f"all or a comma list of {', '.join(KEYS)}")
    ap.add_argument("--runs-dir", default="/tmp/ablate")
    ap.add_argument("--cache-dir", help="shared cache (embeddings, weights) for all rows")
    ap.add_argument("--set", action="append", default=[], help="base override KEY=JSON, e.g. per_class=300")
    args = ap.parse_args()
    base = {k: v for k, v in PRESETS["quick"].items() if k not in ("notes", "variants")}
    base.update(variants=("original",))
    for kv in args.set:
        k, v = kv.split("=", 1)
        base[k] = json.loads(v)
    names = list(ROWS) if args.rows == "all" else [KEYS[k] for k in args.rows.split(",")]
    out = []
    for name in names:
        cfg = make_config(None, **{**base, **ROWS[name], "runs_dir": args.runs_dir, "cache_dir": args.cache_dir})
        t0 = time.time()
        m = row_metrics(run(cfg))
        m.update(row=name, wall_s=round(time.time() - t0))
        out.append(m)
        print(json.dumps(m), flush=True)
    df = pd.DataFrame(out)
    print("\n| change | grouped val acc | val macro-F1 | TEST_SIMPLE acc | balanced acc | EOS recall | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for _, m in df.iterrows():
        print(f"| {m['row']} | {m['val_acc']:.3f} | {m['val_f1']:.3f} | {m['test_acc']:.3f} | {m['test_bal_acc']:.3f} "
              f"| {m['eos_recall']:.2f} | {m['train_s']:.0f} |")


if __name__ == "__main__":
    main()
