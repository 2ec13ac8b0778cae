"""Ablation prototype: refit on the validation cells too (docs/BENCHMARKS.md, "Recipe ablation").

A refit trains a second model on training + validation images, so grouped validation cannot judge it directly.
It is measured one level down instead: the grouped split's training images are split again by source cell (the
same 20% rule, seed + 5000), and the split's own validation images (cells that no arm trains on) judge:

  A. the recipe as given (``epochs``, best epoch by inner-validation macro-F1, as the product selects);
  B. a short fit (``--short`` epochs) on the inner training part, then a fresh model refitted on the whole training
     part (inner training + inner validation: about a quarter more source cells) for the short fit's best epoch
     count, one-cycle over them, the last epoch kept.

With ``--ensemble``, A is skipped and C is added: the mean softmax of B's short fit (its best epoch) and B, on
8-view TTA as the product tests (B alone and the short fit alone are printed on 8 views too).

At the cpu preset's scale (8 epochs) B with ``--short 4`` costs about what A does on the whole training part. All
arms are printed; the stored run holds B's model and test predictions. This script patches ``core.pipeline`` and
``core.engine`` for its own process only, then runs ``ablate_classifier.py``'s command line:

    python benchmarks/ablate_refit.py --short 4 --rows base --set per_class=1500 --set epochs=8 --set patience=8 \
        --set weight_decay=0.05 --set augment='"dihedral-batch"' --set 'seeds=[0]' --runs-dir /tmp/abl/runs \
        --cache-dir /tmp/abl/cache
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import ablate_classifier  # noqa: E402
import core.data as D  # noqa: E402
import core.engine as engine  # noqa: E402
import core.pipeline as pipeline  # noqa: E402

SHORT = 4
ENSEMBLE = False
_outer: dict = {}
_split = pipeline._split


def split_and_keep(df, fraction, seed, cfg, prog):
    train, val = _split(df, fraction, seed, cfg, prog)
    _outer.update(train=train, fraction=fraction, seed=seed)
    return train, val


def val_probs(model, val, s, device, tta: int = 1) -> np.ndarray:
    return engine.predict(model, val[0], device, batch_size=64, view=s.view, tta=tta)  # tta=1: as fit validates


def accuracy(p: np.ndarray, val) -> float:
    return float((p.argmax(1) == np.asarray(val[1])).mean())


def val_acc(model, val, s, device) -> float:
    return accuracy(val_probs(model, val, s, device), val)


def fit_last(model, train, val, s, device, on_progress):
    """fit, keeping the last epoch (every epoch counts as better)."""
    better, engine._better = engine._better, (lambda ep, best, select_by: True)
    try:
        return engine.fit(model, train, val, s, device, on_progress)
    finally:
        engine._better = better


def fit_arms(model, train, val, s, device, on_progress=None):
    x, y, df = train[0], np.asarray(train[1]), _outer["train"]
    assert len(df) == len(y), "the variant left out training images: run it on original"
    inner_tr, inner_va = D.grouped_split(df.assign(_pos=np.arange(len(df))), df["group_id"].to_numpy(),
                                         _outer["fraction"], _outer["seed"] + 5000)
    it, iv = (np.sort(d["_pos"].to_numpy()) for d in (inner_tr, inner_va))
    inner = ((x[torch.as_tensor(it)], y[it]), (x[torch.as_tensor(iv)], y[iv]))
    fresh, row = copy.deepcopy(model), {"inner_train": len(it), "inner_val": len(iv),
                                        "inner_train_groups": int(df["group_id"].iloc[it].nunique()),
                                        "whole_groups": int(df["group_id"].nunique())}
    if not ENSEMBLE:  # arm A was measured before the ensemble arms were added
        a = copy.deepcopy(fresh)
        ra = engine.fit(a, *inner, s, device, on_progress)
        row.update(A_val_acc=val_acc(a, val, s, device), A_best_epoch=ra["best_epoch"], A_s=ra["seconds"])
    short = copy.deepcopy(fresh)
    rs = engine.fit(short, *inner, dataclasses.replace(s, epochs=SHORT, patience=SHORT), device, on_progress)
    b = rs["best_epoch"]
    row.update(short_val_acc=val_acc(short, val, s, device), short_best_epoch=b, short_s=rs["seconds"])
    rb = fit_last(model, (x, y), val, dataclasses.replace(s, epochs=b, patience=b), device, on_progress)
    row.update(B_val_acc=val_acc(model, val, s, device), B_epochs=b, B_s=rb["seconds"])
    if ENSEMBLE:  # C: the short (selection) fit and the refit, softmax averaged; every arm with 8-view TTA
        ps, pb = val_probs(short, val, s, device, tta=8), val_probs(model, val, s, device, tta=8)
        row.update(S8_val_acc=accuracy(ps, val), B8_val_acc=accuracy(pb, val), C8_val_acc=accuracy((ps + pb) / 2, val))
    print("ARMS " + json.dumps(row), flush=True)
    return rb


if __name__ == "__main__":
    SHORT = int(ablate_classifier.pop_option("--short", str(SHORT)))
    ENSEMBLE = "--ensemble" in sys.argv
    if ENSEMBLE:
        sys.argv.remove("--ensemble")
    pipeline._split, pipeline.fit = split_and_keep, fit_arms
    ablate_classifier.main()
