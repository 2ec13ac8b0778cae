"""Ablation prototype: a 2-member ensemble at the cost of one model (docs/BENCHMARKS.md, "Recipe ablation").

Each member trains on a class-stratified random half of the same grouped split's training images (its own seed
for the new head and the batch order), picks its best epoch by grouped-validation macro-F1 as the product does,
and the ensemble predicts with the mean of the members' softmax. Same split and the same total training steps as
one model. With ``--members-on all`` each member trains on all of them instead (a seed ensemble; halve
``epochs`` to keep the cost of one model). This script patches ``core.pipeline``'s ``fit`` and ``predict`` for its own process only, so that no
product code changes before a change passes its rule; it then runs ``ablate_classifier.py``'s command line:

    python benchmarks/ablate_half_ensemble.py --rows base --set per_class=600 --set weight_decay=0.05 \
        --set augment='"dihedral-batch"' --set 'seeds=[0]' --runs-dir /tmp/abl/runs --cache-dir /tmp/abl/cache
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import ablate_classifier  # noqa: E402
import core.pipeline as pipeline  # noqa: E402
from core.engine import fit, macro_f1, predict, seed_everything  # noqa: E402
from core.models import spec_of  # noqa: E402

MEMBERS = 2
MEMBERS_ON = "half"  # or "all" (--members-on): what each member trains on
_current: dict = {}


class Ensemble(nn.Module):
    """Mean of the members' softmax, returned as log-probabilities (so that a softmax of it gives the mean)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        spec = spec_of(members[0])
        object.__setattr__(self, "wbc_spec", spec)
        object.__setattr__(self, spec.head, getattr(members[0], spec.head))  # features: member 0's

    def forward(self, x):
        return torch.log(torch.stack([torch.softmax(m(x).float(), 1) for m in self.members]).mean(0))


def parts(y: np.ndarray, seed: int) -> list[np.ndarray]:
    """Class-stratified random parts of the training images, one per member (all of them each with "all")."""
    if MEMBERS_ON == "all":
        return [np.arange(len(y))] * MEMBERS
    rng = np.random.default_rng(seed + 12345)
    out: list[list[int]] = [[] for _ in range(MEMBERS)]
    for c in np.unique(y):
        for k, chunk in enumerate(np.array_split(rng.permutation(np.flatnonzero(y == c)), MEMBERS)):
            out[k].extend(chunk.tolist())
    return [np.sort(np.array(p)) for p in out]


def fit_members(model, train, val, s, device, on_progress=None):
    x, y = train[0], np.asarray(train[1])
    fresh, members, results = copy.deepcopy(model), [], []  # every member starts from the pretrained weights
    for k, idx in enumerate(parts(y, s.seed)):
        m = model if k == 0 else copy.deepcopy(fresh)
        if k:
            seed_everything(s.seed * 100 + k)
            getattr(m, spec_of(m).head).reset_parameters()
        sk = dataclasses.replace(s, seed=s.seed * 100 + k) if k else s  # member 0: the base model's own seed
        r = fit(m, (x[torch.as_tensor(idx)], y[idx]), val, sk, device, on_progress)
        print(f"member {k}: {len(idx)} images, best epoch {r['best_epoch']}, val acc {r['best_val_acc']:.4f}",
              flush=True)
        members.append(m)
        results.append(r)
    ens = _current["model"] = Ensemble(members)
    pv = predict(ens, val[0], device, batch_size=64, view=s.view, tta=1)  # centre view, as fit validates
    y_val = np.asarray(val[1])
    print(f"ensemble val acc {(pv.argmax(1) == y_val).mean():.4f}", flush=True)
    return {"history": [{**h, "epoch": h["epoch"] + 100 * k} for k, r in enumerate(results) for h in r["history"]],
            "best_epoch": results[0]["best_epoch"], "best_val_loss": results[0]["best_val_loss"],
            "best_val_acc": float((pv.argmax(1) == y_val).mean()),
            "best_val_macro_f1": macro_f1(y_val, pv.argmax(1), pv.shape[1]), "best_state": ens.state_dict(),
            "seconds": sum(r["seconds"] for r in results)}


def predict_ensemble(model, *args, **kwargs):
    return predict(_current.get("model", model), *args, **kwargs)


if __name__ == "__main__":
    MEMBERS_ON = ablate_classifier.pop_option("--members-on", MEMBERS_ON)
    if MEMBERS_ON not in ("half", "all"):
        sys.exit(f"--members-on: {MEMBERS_ON!r} is not half or all")
    pipeline.fit, pipeline.predict = fit_members, predict_ensemble
    ablate_classifier.main()
