"""Evaluation tables from predictions, computed with scikit-learn (the paper's Tables 3-6 layout).

``metrics`` has one row per class plus ``accuracy``, ``macro avg`` and ``weighted avg`` (the rows of
``classification_report``; the accuracy row carries the accuracy in ``f1`` and the image count in
``support``, as the text report prints it). ``confusion`` is long-form: one row per (true, pred) cell.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report, confusion_matrix

from core.config import CLASS_ABBR, CLASSES, PROB_COLUMNS
from core.regions import BOX_COLUMNS


def predictions_frame(keys: dict, test_df: pd.DataFrame, probs: np.ndarray,
                      enhanced_paths: list[str | None]) -> pd.DataFrame:
    """One row per test image: true and predicted label, correctness and every class probability."""
    pred = [CLASSES[i] for i in probs.argmax(1)]
    df = pd.DataFrame({
        **{k: [v] * len(test_df) for k, v in keys.items()},
        "image_id": test_df["image_id"].to_numpy(),
        "path": test_df["path"].to_numpy(),
        "enhanced_path": enhanced_paths,
        "true_label": test_df["label"].to_numpy(),
        "pred_label": pred,
    })
    df["correct"] = df["true_label"] == df["pred_label"]
    for j, c in enumerate(PROB_COLUMNS):
        df[c] = probs[:, j]
    df["group_id"] = test_df["group_id"].to_numpy() if "group_id" in test_df else None
    for c in (*BOX_COLUMNS, "region_note"):
        df[c] = test_df[c].to_numpy() if c in test_df else None
    return df


def metrics_rows(keys: dict, y_true, y_pred) -> pd.DataFrame:
    rep = classification_report(y_true, y_pred, labels=list(CLASSES), output_dict=True, zero_division=0)
    rows = []
    for label in [*CLASSES, "macro avg", "weighted avg"]:
        r = rep[label]
        rows.append({**keys, "label": label, "precision": r["precision"], "recall": r["recall"],
                     "f1": r["f1-score"], "support": int(r["support"])})
    rows.insert(len(CLASSES), {**keys, "label": "accuracy", "precision": np.nan, "recall": np.nan,
                               "f1": rep["accuracy"] if "accuracy" in rep else float(np.mean(np.asarray(y_true) == np.asarray(y_pred))),
                               "support": len(y_true)})
    return pd.DataFrame(rows)


def confusion_rows(keys: dict, y_true, y_pred) -> pd.DataFrame:
    cm = confusion_matrix(y_true, y_pred, labels=list(CLASSES))
    return pd.DataFrame([{**keys, "true_label": t, "pred_label": p, "count": int(cm[i, j])}
                         for i, t in enumerate(CLASSES) for j, p in enumerate(CLASSES)])


def format_report(metrics: pd.DataFrame, confusion: pd.DataFrame) -> str:
    """Per-class report and confusion matrix for each model, variants side by side (Tables 3-6)."""
    out = []
    for (seed, size), mg in metrics.groupby(["seed", "image_size"], sort=False):
        variants = list(dict.fromkeys(mg["variant"]))
        out.append(f"== seed {seed}, image size {size} ==")
        head = f"{'':14}" + "".join(f"| {v[:31]:^31} " for v in variants)
        sub = f"{'':14}" + "".join(f"| {'prec':>7}{'recall':>8}{'f1':>8}{'n':>7} " for _ in variants)
        out += [head, sub]
        for label in mg["label"].drop_duplicates():
            line = f"{label:14}"
            for v in variants:
                r = mg[(mg["variant"] == v) & (mg["label"] == label)].iloc[0]
                p = "" if pd.isna(r["precision"]) else f"{r['precision']:.3f}"
                rc = "" if pd.isna(r["recall"]) else f"{r['recall']:.3f}"
                line += f"| {p:>7}{rc:>8}{r['f1']:>8.3f}{int(r['support']):>7} "
            out.append(line)
        out.append("")
        cg = confusion[(confusion["seed"] == seed) & (confusion["image_size"] == size)]
        for v in variants:
            cm = cg[cg["variant"] == v].pivot(index="true_label", columns="pred_label", values="count")
            cm = cm.reindex(index=list(CLASSES), columns=list(CLASSES)).fillna(0).astype(int)
            out.append(f"confusion matrix [{v}] (rows: true, columns: predicted)")
            out.append(f"{'':8}" + "".join(f"{CLASS_ABBR[c]:>6}" for c in CLASSES))
            for t in CLASSES:
                out.append(f"{CLASS_ABBR[t]:8}" + "".join(f"{cm.loc[t, p]:>6}" for p in CLASSES))
            out.append("")
    return "\n".join(out)


# How one test image's verdict moves from a baseline variant's model to another's (same seed and image size).
PAIR_KEY = ["image_id", "seed", "image_size"]
RIGHT_TO_WRONG, WRONG_TO_RIGHT, UNCHANGED = "right -> wrong", "wrong -> right", "unchanged"


def verdict_pairs(pred: pd.DataFrame, base: str, other: str, base_cols=(), other_cols=()) -> pd.DataFrame:
    """Each test image (and seed, size) predicted by both ``base`` and ``other``, with the asked columns of each
    (suffixed ``_base`` / ``_other`` where both have them; ``correct`` always is) and ``moved``: how the verdict
    moved from ``base`` to ``other`` (:data:`RIGHT_TO_WRONG`, :data:`WRONG_TO_RIGHT` or :data:`UNCHANGED`)."""
    a = pred.loc[pred["variant"] == base, [*PAIR_KEY, "correct", *base_cols]]
    b = pred.loc[pred["variant"] == other, [*PAIR_KEY, "correct", *other_cols]]
    j = a.merge(b, on=PAIR_KEY, suffixes=("_base", "_other"))
    right_a, right_b = j["correct_base"].astype(bool), j["correct_other"].astype(bool)
    j["moved"] = np.where(right_a & ~right_b, RIGHT_TO_WRONG, np.where(~right_a & right_b, WRONG_TO_RIGHT, UNCHANGED))
    return j


METRICS = ["precision", "recall", "f1"]


def per_class(metrics: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """Mean over seeds of precision/recall/F1 (and support) for each class and variant (+ macro avg and accuracy
    rows), variants in the run's order."""
    if metrics.empty:
        return metrics
    m = metrics.groupby(["variant", "label"], sort=False, observed=True)[METRICS + ["support"]].mean().reset_index()
    if order:
        rank = {v: i for i, v in enumerate(order)}
        m = m.sort_values("variant", key=lambda s: s.map(lambda v: rank.get(v, len(rank))), kind="stable")
    return m


def paper_table(m: pd.DataFrame, values=tuple(METRICS)) -> pd.DataFrame:
    """:func:`per_class` wide: rows class, columns '<variant> <metric>' (like the paper's Tables 3-4)."""
    values = list(values)
    labels = [lab for lab in [*CLASSES, "macro avg", "weighted avg", "accuracy"] if lab in set(m["label"])]
    wide = m.pivot_table(index="label", columns="variant", values=values, sort=False)
    wide = wide.reindex(labels)
    wide.columns = [f"{v} {k}" for k, v in wide.columns]
    order = [f"{v} {k}" for v in m["variant"].unique() for k in values]
    wide = wide[[c for c in order if c in wide.columns]].round(3).reset_index().rename(columns={"label": "class"})
    for c in [c for c in wide.columns if c.endswith(" support")]:  # counts (the seeds' mean of one test set): 13, not 13.0
        if (wide[c].dropna() % 1 == 0).all():
            wide[c] = wide[c].astype("Int64")
    return wide


def confusion_counts(conf: pd.DataFrame, pred: pd.DataFrame, variant: str) -> pd.DataFrame:
    """4x4 counts (rows true, columns predicted) summed over seeds/sizes; from confusion, else predictions."""
    if not conf.empty and variant in set(conf["variant"]):
        c = conf[conf["variant"] == variant].groupby(["true_label", "pred_label"], observed=True)["count"].sum()
        m = c.unstack(fill_value=0)
    elif not pred.empty:
        p = pred[pred["variant"] == variant]
        m = pd.crosstab(p["true_label"].astype(str), p["pred_label"].astype(str))
    else:
        m = pd.DataFrame()
    return m.reindex(index=list(CLASSES), columns=list(CLASSES), fill_value=0).fillna(0).astype(int)
