"""Near-copy distance and split leakage on real TRAIN, in the grouping space (issue 12's RIGOR tables).

    python benchmarks/leakage_grouping.py --cache /tmp/wbc-sweep-cache/centre-c200-s128-v4

Prints (1) the quantiles of each TEST_SIMPLE image's distance to its nearest same-class TRAIN image (different
cells by construction: the false near-copy rate of a cut), and (2) for an 80/20 split of all of TRAIN, random (the
paper's) and grouped (the space's group cut): the share of validation images with a near-copy in training
below each cut, and the median nearest-neighbour distance. Everything in ``core.groups.grouping_space``.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/blood-cells"))
    ap.add_argument("--cache", help="embedding cache (default: the product's)")
    ap.add_argument("--cuts", default="0.15,0.20,0.25,0.30")
    args = ap.parse_args()

    from core import data as D
    from core import groups as G
    from core.devices import cpu_model

    man = D.build_manifest(Path(args.data), None)
    train, ts = man.split("TRAIN"), man.split("TEST_SIMPLE")
    both = pd.concat([train, ts], ignore_index=True)
    space = G.grouping_space(both, args.cache)
    emb = space.emb
    print(f"# {date.today()} cpu={cpu_model()} cores={os.cpu_count()} network={space.network} "
          f"group cut={space.group_cut} near-copy cut={space.near_copy_cut}")
    n = len(train)
    d = G.nearest_distance(emb[n:], ts["label"], emb[:n], train["label"])
    q = np.quantile(d, [0.01, 0.05, 0.10, 0.50])
    print("TEST_SIMPLE -> nearest same-class TRAIN image (different cells): quantiles 1% {:.3f}, 5% {:.3f}, "
          "10% {:.3f}, 50% {:.3f}".format(*q))
    cuts = [float(c) for c in args.cuts.split(",")]
    space_tr = G.grouping_space(train, args.cache)
    emb_tr = space_tr.emb
    groups = G.groups_from_embeddings(train, emb_tr, space_tr.group_cut)
    rows = {}
    for name, (tr, va) in {"random": D.random_split(train, 0.2, 0),
                           "grouped": D.grouped_split(train, groups, 0.2, 0)}.items():
        at = {p: i for i, p in enumerate(train["path"])}  # the splits renumber their rows
        i_tr, i_va = np.array([at[p] for p in tr["path"]]), np.array([at[p] for p in va["path"]])
        dv = G.nearest_distance(emb_tr[i_va], va["label"], emb_tr[i_tr], tr["label"])
        shared = len(set(groups[i_tr]) & set(groups[i_va]))
        rows[name] = [float((dv < c).mean()) for c in cuts] + [float(np.median(dv)), shared]
    rows["no-copy baseline (TEST_SIMPLE -> TRAIN)"] = [float((d < c).mean()) for c in cuts] + [float(np.median(d)), 0]
    print("| near-copy below | " + " | ".join(rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    for i, c in enumerate(cuts):
        print(f"| {c:.2f} | " + " | ".join(f"{v[i]:.3f}" for v in rows.values()) + " |")
    print("| median nearest-neighbour distance | " + " | ".join(f"{v[-2]:.3f}" for v in rows.values()) + " |")
    print("| groups on both sides | " + " | ".join(str(v[-1]) for v in rows.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
