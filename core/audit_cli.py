"""``wbc audit DATA``: how many source cells each split holds, and whether splits share cells.

Per split and class: images, estimated source cells (groups, see core.groups), group sizes, and for
every other split how many groups have a near-copy there. TEST_SIMPLE alone is checked against its
known structure: one image per source cell, except two byte-identical eosinophil pairs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from core.paths import path_arg
from core.terminal import CONTROL_CHARS

AUDIT_COLUMNS = ["split", "label", "images", "distinct_files", "groups", "expected_groups", "group_min",
                 "group_median", "group_max", "other_split", "other_groups_with_copy", "other_images_with_copy",
                 "threshold", "near_copy_threshold"]
# Source cells per split and class implied by the file names' K prefix (see SOURCE.md). For TEST_SIMPLE
# each image is one cell, so the expectation is its number of distinct files.
EXPECTED_CELLS = {
    "TRAIN": {"eosinophil": 75, "lymphocyte": 27, "monocyte": 16, "neutrophil": 159},
    "TEST": {"eosinophil": 13, "lymphocyte": 6, "monocyte": 4, "neutrophil": 48},
}


def add_audit_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("audit", help="estimate source cells per split/class and cross-split near-copies",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=path_arg, metavar="DATA",
                   help="data root with TRAIN/, TEST/ or TEST_SIMPLE/ class folders (any of them), or one ImageFolder "
                        "(class folders), named by its folder")
    p.add_argument("--test-dir", type=path_arg, default=None,
                   help="a Kaggle TEST folder to audit as the TEST split")
    p.add_argument("--out", type=path_arg, default="audit.parquet",
                   help="Parquet file for the table (default: audit.parquet)")
    p.add_argument("--device", default="cpu", help="torch device for the embeddings (cpu, cuda)")
    p.add_argument("--per-class", type=int, default=None,
                   help="audit at most N images per class of TRAIN and TEST (random, seed 0); default all")
    p.add_argument("--threshold", type=float, default=None,
                   help="group cut (default: the embedding space's, core.groups.Space.group_cut)")
    p.add_argument("--cache-dir", type=path_arg, default=None,
                   help="embedding cache (default: the wbc cache dir)")
    p.add_argument("--json", action="store_true", help="print the table as JSON (one object per row) instead")
    p.set_defaults(func=cmd_audit)
    return p


def name_splits(df: pd.DataFrame, split_dirs: dict, root: Path) -> pd.DataFrame:
    """Each split named by its folder: the Kaggle names, or, for a DATA that is itself an ImageFolder (class
    folders directly in it), that folder's name (a TEST folder audited alone is TEST, not TRAIN)."""
    from core.data import is_class_root

    if not is_class_root(root):
        return df
    renames = {k: root.resolve().name for k, v in split_dirs.items() if Path(v).resolve() == root.resolve()}
    return df.assign(split=df["split"].replace(renames))


def audit_table(df: pd.DataFrame, groups: np.ndarray, emb: np.ndarray, threshold: float,
                near_copy: float, per_class_subset: bool = False) -> pd.DataFrame:
    from core.groups import cross_split_overlap

    df = df.reset_index(drop=True).assign(group=np.asarray(groups))
    overlap = cross_split_overlap(df, groups, emb, near_copy)
    rows = []
    for (split, label), g in df.groupby(["split", "label"], sort=False):
        sizes = g.groupby("group").size()
        if split == "TEST_SIMPLE":
            expected = g["sha1"].nunique()
        else:
            expected = None if per_class_subset else EXPECTED_CELLS.get(split, {}).get(label)
        base = {"split": split, "label": label, "images": len(g), "distinct_files": g["sha1"].nunique(),
                "groups": len(sizes), "expected_groups": expected, "group_min": int(sizes.min()),
                "group_median": float(sizes.median()), "group_max": int(sizes.max()), "threshold": threshold,
                "near_copy_threshold": near_copy}
        ov = overlap[(overlap["split"] == split) & (overlap["label"] == label)]
        if ov.empty:
            rows.append({**base, "other_split": None, "other_groups_with_copy": None, "other_images_with_copy": None})
        for r in ov.itertuples():
            rows.append({**base, "other_split": r.other_split, "other_groups_with_copy": r.groups_with_copy,
                         "other_images_with_copy": r.images_with_copy})
    out = pd.DataFrame(rows, columns=AUDIT_COLUMNS)
    return out.astype({"expected_groups": "Int64", "other_groups_with_copy": "Int64", "other_images_with_copy": "Int64"})


def format_table(t: pd.DataFrame) -> str:
    lines = [f"{'split':<12}{'class':<12}{'images':>7}{'cells':>7}{'expected':>9}{'size min/med/max':>18}  near-copies elsewhere"]
    for (split, label), g in t.groupby(["split", "label"], sort=False):
        r = g.iloc[0]
        exp = "-" if pd.isna(r["expected_groups"]) else str(r["expected_groups"])
        other = ", ".join(f"{o.other_split}: {o.other_groups_with_copy}/{o.groups} groups"
                          for o in g.itertuples() if o.other_split is not None) or "-"
        size = f"{r['group_min']}/{r['group_median']:g}/{r['group_max']}"
        lines.append(f"{split:<12}{label:<12}{r['images']:>7}{r['groups']:>7}{exp:>9}{size:>18}  {other}")
    return "\n".join(lines)


def check_args(args) -> Path:
    """The flags, checked before minutes of embedding: each bad one is a one-line ValueError naming it. Returns
    the ``--out`` file to write."""
    import math

    from core.devices import resolve_device
    from core.store import check_output_file

    resolve_device(getattr(args, "device", "cpu"))
    per_class = getattr(args, "per_class", None)
    if per_class is not None and per_class < 2:
        raise ValueError(f"--per-class: must be >= 2 (leave it out for all images), got {per_class}")
    t = getattr(args, "threshold", None)
    if t is not None and not (math.isfinite(t) and 0 < t < 2):
        raise ValueError(f"--threshold: a cosine-distance cut in (0, 2), got {t}")
    out = Path(getattr(args, "out", None) or "audit.parquet").expanduser()
    return check_output_file(out, "--out", (".parquet",), "a .parquet", "audit.parquet")


def cmd_audit(args) -> int:
    from core.data import DataNotFoundError, build_manifest, subset_per_class
    from core.groups import grouping_space, groups_from_embeddings
    from core.fsio import atomic_write_parquet

    if not Path(args.data).is_dir():
        print(f"wbc audit: error: {args.data}: not a folder", file=sys.stderr)
        return 2
    out = check_args(args)
    try:
        m = build_manifest(args.data, test_dir=getattr(args, "test_dir", None), require_train=False)
    except DataNotFoundError as e:
        print(f"wbc audit: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if m.skipped:  # unreadable or over-budget files are left out of the audit: said, with the first one
        first = m.skipped[0]
        print(f"{len(m.skipped)} files skipped (unreadable, not images, or above the pixel budget), e.g. "
              f"{first['path']}: {first['error']}".translate(CONTROL_CHARS), file=sys.stderr)
    df = name_splits(m.df, m.split_dirs, Path(args.data))
    per_class = getattr(args, "per_class", None)
    if per_class:
        df = pd.concat([g if split == "TEST_SIMPLE" else subset_per_class(g, per_class, 0)
                        for split, g in df.groupby("split", sort=False)], ignore_index=True)
    t0 = time.time()

    def progress(done, total, message=""):
        if total and (done == total or done % (512 if total > 1000 else 10) == 0):
            print(f"\r{message or 'embedding images'}: {done}/{total} ({time.time() - t0:.0f} s)".ljust(72), end="",
                  file=sys.stderr, flush=True)

    space = grouping_space(df, getattr(args, "cache_dir", None), getattr(args, "device", "cpu"), progress)
    print(file=sys.stderr)
    threshold = space.group_cut if getattr(args, "threshold", None) is None else args.threshold
    groups = groups_from_embeddings(df, space.emb, threshold)
    table = audit_table(df, groups, space.emb, threshold, space.near_copy_cut, per_class_subset=bool(per_class))
    atomic_write_parquet(out, table)
    if getattr(args, "json", False):
        print(table.to_json(orient="records"))
        return 0
    print(format_table(table))
    ts = table[table["split"] == "TEST_SIMPLE"].drop_duplicates(["split", "label"])
    if not ts.empty:
        print(f"TEST_SIMPLE check (one group per distinct file): expected {int(ts['expected_groups'].sum())}, "
              f"found {int(ts['groups'].sum())} groups")
    print(f"embedding: {space.network}; group cut (average linkage): {threshold}; near-copy: nearest neighbour "
          f"closer than {space.near_copy_cut} (cosine distance of the grouping embeddings); wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wbc")
    add_audit_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
