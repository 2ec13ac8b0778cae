"""Statistics stored with every run (the ``stats`` table, see ``core.store.SCHEMAS['stats']``).

Rows by ``kind``:

- ``ci``: per (variant, seed, image_size), ``accuracy`` and ``macro_f1`` with a 95% percentile bootstrap
  CI. The bootstrap resamples whole source groups (cluster bootstrap) when ``group_id`` is known, since
  near-copies of one cell are not independent evidence; otherwise images. ``detail`` says which.
- ``paired``: each non-baseline variant vs the baseline on the same test images (same seed and
  image_size, joined on image_id): ``accuracy_diff`` (variant minus baseline) with a paired bootstrap CI
  (same resample for both), exact McNemar ``p_value`` (two-sided binomial test on the discordant pairs;
  ``b`` = baseline right/variant wrong, ``c`` = baseline wrong/variant right), ``detail`` JSON
  ``{"b", "c", "resample", "n_groups", "p_group_signflip"}``. Also ``macro_f1_diff`` (CI only).
  McNemar treats images as independent; with duplicated source cells it is too optimistic, so
  ``p_group_signflip`` (:func:`group_signflip_p`: the exact paired test over whole source groups, McNemar's
  own test when every group is one image) is given next to it, and the summary's verdict rests on it.
- ``class_diff``: variant minus baseline for ``recall:<class>`` and ``f1:<class>`` of eosinophil and
  neutrophil (the classes the enhancement is hoped to help), with paired bootstrap CIs.
- ``seeds`` (``seed`` = -1), when a variant has more than one seed: for every metric above, ``estimate``
  = mean over seeds, ``sd`` = sample sd, ``n`` = number of seeds, ``detail`` = JSON list of per-seed
  values in ascending seed order. ``baseline`` is set for differences, null for plain metrics.
  ``ci_low``/``ci_high`` are the 95% CI *of the seed-averaged estimate*: in each bootstrap resample of
  test groups (the same resample for every seed and both variants) the metric is averaged over seeds,
  and the percentiles are taken of that average. CI bounds are never averaged.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pandas as pd

from core.config import CLASSES
from core.store import (DETAIL_B, DETAIL_C, DETAIL_N_BOOT, DETAIL_N_GROUPS, DETAIL_P_GROUP_SIGNFLIP, DETAIL_RESAMPLE,
                        SCHEMAS, SEED_MEAN, Metric, StatKind, as_number, class_metric, parse_detail)

CLASS_DIFF_CLASSES = ("eosinophil", "neutrophil")
CI_METRICS = (Metric.ACCURACY, Metric.MACRO_F1, Metric.BALANCED_ACCURACY)  # "ci" rows per model


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: binomial test of b successes in b + c trials at p = 0.5."""
    from scipy.stats import binomtest

    return 1.0 if b + c == 0 else float(binomtest(int(b), int(b + c), 0.5).pvalue)


def group_signflip_p(d) -> float:
    """Exact two-sided p of the paired sign-flip test over source groups. ``d``: per group, the number of its
    images only the variant got right minus the number only the baseline got right. With no difference between
    the two, swapping their verdicts on a whole group is as likely as not, so all 2^G sign patterns of the groups'
    ``d`` are equally likely; p = P(|sum| >= |observed sum|), computed exactly by convolving the groups one by
    one. Copies of one cell move together (a cell copied eight times is one step of eight, not eight independent
    steps); with one image per group it is the exact McNemar test (``mcnemar_exact``). Unlike a p read off the
    bootstrap distribution, it holds its level with few discordant images. Exact under its null (the two
    variants' verdicts on a group are exchangeable, which is stronger than equal accuracy) and given the
    estimated groups: copies of one cell split across groups make it too confident. A group with one image
    right only with each variant has d = 0 and drops out, so it can be below McNemar's p."""
    d = np.rint(np.asarray(d, dtype=float)).astype(np.int64)
    observed, sizes = abs(int(d.sum())), np.abs(d[d != 0])
    if not len(sizes):
        return 1.0
    span = int(sizes.sum())
    dist = np.zeros(2 * span + 1)  # dist[k]: P(sum = k - span) over the groups folded in so far
    dist[span] = 1.0
    for m in sizes:
        dist = 0.5 * (np.roll(dist, m) + np.roll(dist, -m))  # never wraps: |sum| <= span
    totals = np.abs(np.arange(-span, span + 1))
    return float(min(1.0, dist[totals >= observed].sum()))


def _group_index(group_ids: pd.Series, image_ids: pd.Series) -> tuple[np.ndarray, int, bool]:
    """Integer group per row (images with no group are their own group), number of groups, any known."""
    known = group_ids.notna()
    key = np.where(known, "g:" + group_ids.astype(str), "i:" + image_ids.astype(str))
    _, idx = np.unique(key, return_inverse=True)
    return idx, int(idx.max()) + 1 if len(idx) else 0, bool(known.any())


@functools.lru_cache(maxsize=4)
def _boot_weights(n_groups: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_groups) counts: how often each group is drawn in each bootstrap resample.

    Cached: runs over the same test set reuse one resample (read-only), which also keeps them paired.
    """
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    flat = draws + (np.arange(n_boot) * n_groups)[:, None]
    w = np.bincount(flat.ravel(), minlength=n_boot * n_groups).reshape(n_boot, n_groups).astype(np.float32)
    w.flags.writeable = False
    return w


class _Counts:
    """Per-group sufficient statistics: images, correct, and per-class TP/FP/FN."""

    def __init__(self, y_true: np.ndarray, y_pred: np.ndarray, gidx: np.ndarray, n_groups: int,
                 class_names: list[str]):
        self.class_names, n_cls = class_names, len(class_names)
        def per_group(mask2d):  # (N, C) bool -> (G, C)
            out = np.zeros((n_groups, mask2d.shape[1]))
            np.add.at(out, gidx, mask2d)
            return out

        onehot_t = np.eye(n_cls, dtype=bool)[y_true]
        onehot_p = np.eye(n_cls, dtype=bool)[y_pred]
        correct = (y_true == y_pred)
        self.n = np.bincount(gidx, minlength=n_groups).astype(float)
        self.correct = np.bincount(gidx, weights=correct, minlength=n_groups)
        self.tp = per_group(onehot_t & onehot_p)
        self.fp = per_group(~onehot_t & onehot_p)
        self.fn = per_group(onehot_t & ~onehot_p)
        self.present = (onehot_t | onehot_p).any(0)  # sklearn's macro average: labels in y_true or y_pred
        self.true_present = onehot_t.any(0)  # sklearn's balanced accuracy: the classes in y_true

    def metrics(self, w: np.ndarray | None) -> dict[str, np.ndarray]:
        """Metrics for weights ``w`` (n_boot, G), or the point estimate (shape (1,)) when None."""
        w = np.ones((1, len(self.n)), np.float32) if w is None else w
        k = self.tp.shape[1]
        # one float32 matmul for all sufficient statistics (counts are exact in float32)
        agg = (w @ np.column_stack([self.n, self.correct, self.tp, self.fp, self.fn]).astype(np.float32)).astype(float)
        n, correct, tp, fp, fn = agg[:, 0], agg[:, 1], agg[:, 2:2 + k], agg[:, 2 + k:2 + 2 * k], agg[:, 2 + 2 * k:]
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = 2 * tp / (2 * tp + fp + fn)
            recall = tp / (tp + fn)
            # a class absent from a resample (0/0) drops out, as sklearn does with the labels it sees
            macro = np.nanmean(f1[:, self.present], 1)
            balanced = np.nanmean(recall[:, self.true_present], 1)
            acc = correct / n
        out = {Metric.ACCURACY: acc, Metric.MACRO_F1: macro, Metric.BALANCED_ACCURACY: balanced}
        for c, name in enumerate(self.class_names):
            out[class_metric("recall", name)] = recall[:, c]
            out[class_metric("f1", name)] = f1[:, c]
        return out


def _ci(boot: np.ndarray) -> tuple[float, float, float]:
    boot = boot[~np.isnan(boot)]
    if not len(boot):
        return (math.nan, math.nan, math.nan)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(np.std(boot, ddof=1)) if len(boot) > 1 else math.nan, float(lo), float(hi)


def _row(kind, variant, baseline, seed, size, metric, est, sd=None, lo=None, hi=None, p=None, n=None, detail=None):
    return {"kind": str(kind), "variant": variant, "baseline": baseline, "seed": int(seed), "image_size": int(size),
            "metric": str(metric), "estimate": float(est), "sd": sd, "ci_low": lo, "ci_high": hi, "p_value": p,
            "n": None if n is None else int(n), "detail": None if detail is None else json.dumps(detail)}


def compute_stats(predictions: pd.DataFrame, baseline: str = "original", n_boot: int = 2000,
                  seed: int = 0) -> pd.DataFrame:
    """The ``stats`` table for a run's predictions (see the module docstring for the rows)."""
    p = predictions.copy()
    if "group_id" not in p.columns:
        p["group_id"] = None
    p["group_id"] = p["group_id"].where(p["group_id"].notna() & (p["group_id"].astype(str) != ""), None)
    names = list(CLASSES) + sorted(set(p["true_label"]).union(p["pred_label"]) - set(CLASSES))
    code = {c: i for i, c in enumerate(names)}
    rows: list[dict] = []
    keys = ["variant", "seed", "image_size"]

    for (variant, s, size), g in p.groupby(keys, sort=True):
        gidx, n_groups, grouped = _group_index(g["group_id"], g["image_id"])
        cnt = _Counts(g["true_label"].map(code).to_numpy(), g["pred_label"].map(code).to_numpy(),
                      gidx, n_groups, names)
        point, boot = cnt.metrics(None), cnt.metrics(_boot_weights(n_groups, n_boot, seed))
        detail = {DETAIL_RESAMPLE: "groups" if grouped else "images", DETAIL_N_GROUPS: n_groups, DETAIL_N_BOOT: n_boot}
        for m in CI_METRICS:
            rows.append(_row(StatKind.CI, variant, None, s, size, m, point[m][0], *_ci(boot[m]), n=len(g), detail=detail))

    base = p[p["variant"] == baseline]
    for (variant, s, size), g in p[p["variant"] != baseline].groupby(keys, sort=True):
        b = base[(base["seed"] == s) & (base["image_size"] == size)]
        if b.empty:
            continue
        j = g.merge(b, on="image_id", suffixes=("", "_b"))
        if j.empty:
            continue
        gid = j["group_id"].where(j["group_id"].notna(), j["group_id_b"])
        gidx, n_groups, grouped = _group_index(gid, j["image_id"])
        yt = j["true_label"].map(code).to_numpy()
        cv = _Counts(yt, j["pred_label"].map(code).to_numpy(), gidx, n_groups, names)
        cb = _Counts(yt, j["pred_label_b"].map(code).to_numpy(), gidx, n_groups, names)
        w = _boot_weights(n_groups, n_boot, seed)
        pv, pb, bv, bb = cv.metrics(None), cb.metrics(None), cv.metrics(w), cb.metrics(w)
        ok_v, ok_b = (j["true_label"] == j["pred_label"]).to_numpy(), (j["true_label"] == j["pred_label_b"]).to_numpy()
        nb, nc = int((ok_b & ~ok_v).sum()), int((~ok_b & ok_v).sum())
        d_acc = bv[Metric.ACCURACY] - bb[Metric.ACCURACY]
        per_group = np.bincount(gidx, weights=ok_v.astype(float) - ok_b.astype(float), minlength=n_groups)
        detail = {DETAIL_B: nb, DETAIL_C: nc, DETAIL_RESAMPLE: "groups" if grouped else "images",
                  DETAIL_N_GROUPS: n_groups, DETAIL_P_GROUP_SIGNFLIP: group_signflip_p(per_group)}
        est = pv[Metric.ACCURACY][0] - pb[Metric.ACCURACY][0]
        rows.append(_row(StatKind.PAIRED, variant, baseline, s, size, Metric.ACCURACY_DIFF, est, *_ci(d_acc),
                         p=mcnemar_exact(nb, nc), n=len(j), detail=detail))
        rows.append(_row(StatKind.PAIRED, variant, baseline, s, size, Metric.MACRO_F1_DIFF,
                         pv[Metric.MACRO_F1][0] - pb[Metric.MACRO_F1][0], *_ci(bv[Metric.MACRO_F1] - bb[Metric.MACRO_F1]),
                         n=len(j), detail={DETAIL_RESAMPLE: detail[DETAIL_RESAMPLE]}))
        for cls in CLASS_DIFF_CLASSES:
            support = int((j["true_label"] == cls).sum())
            for m in (class_metric("recall", cls), class_metric("f1", cls)):
                est = pv[m][0] - pb[m][0]
                if math.isnan(est):
                    continue
                rows.append(_row(StatKind.CLASS_DIFF, variant, baseline, s, size, m, est, *_ci(bv[m] - bb[m]), n=support,
                                 detail={"variant": float(pv[m][0]), "baseline": float(pb[m][0]),
                                         DETAIL_RESAMPLE: detail[DETAIL_RESAMPLE]}))

    out = pd.DataFrame(rows, columns=SCHEMAS["stats"])
    seed_ci = _seed_mean_cis(p, baseline, code, names, n_boot, seed)
    seeds_rows = []
    per_seed = out[out["kind"].isin([StatKind.CI, StatKind.PAIRED, StatKind.CLASS_DIFF])]
    for (variant, bl, size, metric), g in per_seed.groupby(
            ["variant", per_seed["baseline"].fillna(""), "image_size", "metric"], sort=True):
        if g["seed"].nunique() < 2:
            continue
        g = g.sort_values("seed")
        vals = g["estimate"].astype(float).tolist()
        lo, hi = seed_ci.get((variant, bl or None, int(size), metric), (None, None))
        seeds_rows.append(_row(StatKind.SEEDS, variant, bl or None, SEED_MEAN, size, metric, float(np.mean(vals)),
                               sd=float(np.std(vals, ddof=1)), lo=lo, hi=hi, n=len(vals), detail=vals))
    if seeds_rows:
        out = pd.concat([out, pd.DataFrame(seeds_rows, columns=SCHEMAS["stats"])], ignore_index=True)
    for c in ("estimate", "sd", "ci_low", "ci_high", "p_value"):
        out[c] = pd.to_numeric(out[c], errors="coerce").astype(float)
    out["seed"] = out["seed"].astype("int64")
    out["image_size"] = out["image_size"].astype("int64")
    out["n"] = out["n"].astype("Int64")
    return out


def _seed_mean_cis(p: pd.DataFrame, baseline: str, code: dict, names: list[str], n_boot: int,
                   seed: int) -> dict[tuple, tuple[float, float]]:
    """95% CI of each seed-averaged metric: {(variant, baseline or None, size, metric): (low, high)}.

    One group index per image size over all variants and seeds, so every seed and both sides of a
    difference see the same resample of test groups; the metric is averaged over seeds inside each resample.
    """
    out: dict[tuple, tuple[float, float]] = {}
    for size, ps in p.groupby("image_size", sort=True):
        gidx, n_groups, _ = _group_index(ps["group_id"], ps["image_id"])
        ps = ps.assign(_g=gidx)
        w = _boot_weights(n_groups, n_boot, seed)

        def boot(rows: pd.DataFrame, pred_col: str = "pred_label") -> dict[str, np.ndarray]:
            return _Counts(rows["true_label"].map(code).to_numpy(), rows[pred_col].map(code).to_numpy(),
                           rows["_g"].to_numpy(), n_groups, names).metrics(w)

        for variant, g in ps.groupby("variant", sort=True):
            seeds = sorted(g["seed"].unique())
            if len(seeds) < 2:
                continue
            per_seed = [boot(g[g["seed"] == s]) for s in seeds]
            for m in CI_METRICS:
                out[(variant, None, int(size), m)] = _ci(np.mean([b[m] for b in per_seed], 0))[1:]
            base = ps[ps["variant"] == baseline]
            if variant == baseline or base.empty:
                continue
            diffs: dict[str, list[np.ndarray]] = {}
            for s in seeds:
                j = g[g["seed"] == s].merge(base[base["seed"] == s][["image_id", "pred_label"]], on="image_id",
                                             suffixes=("", "_b"))
                if j.empty:
                    break
                bv, bb = boot(j), boot(j, "pred_label_b")
                for m, name in ((Metric.ACCURACY, Metric.ACCURACY_DIFF), (Metric.MACRO_F1, Metric.MACRO_F1_DIFF),
                                *((m, m) for c in CLASS_DIFF_CLASSES
                                  for m in (class_metric("recall", c), class_metric("f1", c)))):
                    diffs.setdefault(name, []).append(bv[m] - bb[m])
            else:
                for name, ds in diffs.items():
                    out[(variant, baseline, int(size), name)] = _ci(np.mean(ds, 0))[1:]
    return out


def model_summary(stats: pd.DataFrame, metric: str = Metric.ACCURACY, kind: str = StatKind.CI) -> pd.DataFrame:
    """One row per (variant, [baseline,] image_size): the estimate and its 95% CI, read the honest way.

    One seed: that model's bootstrap CI. Several seeds: the seed mean with the CI of the seed-averaged
    metric (``seeds`` rows). Never an average of CI bounds; runs stored before seed-mean CIs show none.
    ``kind`` is "ci" for plain metrics ("accuracy", "macro_f1") and "paired" for differences
    ("accuracy_diff"). Columns: variant, baseline, image_size, estimate, ci_low, ci_high, sd, n_seeds, p_value.
    """
    cols = ["variant", "baseline", "image_size", "estimate", "ci_low", "ci_high", "sd", "n_seeds", "p_value"]
    if stats is None or stats.empty:
        return pd.DataFrame(columns=cols)
    one = stats[(stats["kind"] == kind) & (stats["metric"] == metric)]
    multi = stats[(stats["kind"] == StatKind.SEEDS) & (stats["metric"] == metric)]
    rows = []
    for (v, size), g in one.groupby(["variant", "image_size"], sort=False):
        m = multi[(multi["variant"] == v) & (multi["image_size"] == size)]
        src = m.iloc[0] if len(m) else g.iloc[0]
        rows.append({"variant": v, "baseline": g["baseline"].iloc[0], "image_size": int(size),
                     "estimate": float(src["estimate"]), "ci_low": src["ci_low"], "ci_high": src["ci_high"],
                     "sd": src["sd"] if len(m) else np.nan, "n_seeds": int(g["seed"].nunique()),
                     "p_value": g["p_value"].iloc[0] if len(g) == 1 else np.nan})
    return pd.DataFrame(rows, columns=cols)


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _paired_lines(r) -> list[str]:
    """The summary of one paired accuracy row. The verdict rests on the group sign-flip test when the row has one
    (runs stored since 2026-11-28), else on the bootstrap CI alone."""
    d = parse_detail(r.detail)
    p = as_number(d.get(DETAIL_P_GROUP_SIGNFLIP))  # None when missing or hand-edited into a non-number
    ci_out, way = not (r.ci_low <= 0 <= r.ci_high), "better" if r.estimate > 0 else "worse"
    if p is None:
        verdict = (f"the CI excludes 0: {r.variant} is {way} on these test images" if ci_out
                   else "no evidence of a difference (the CI includes 0)")
    elif p < 0.05:
        verdict = (f"evidence that {r.variant} is {way} (group sign-flip p = {p:.3g}"
                   + ("; the bootstrap CI, an approximation, includes 0)" if not ci_out else ")"))
    else:
        verdict = (f"no evidence of a difference at the 5% level (group sign-flip p = {p:.3g}"
                   + ("; the bootstrap CI excludes 0, but it is an approximation and the two disagree near the "
                      "5% edge)" if ci_out else ")"))
    counts = (f" ({d[DETAIL_B]} images right only with {r.baseline}, {d[DETAIL_C]} right only with {r.variant})"
              if DETAIL_B in d and DETAIL_C in d else "")  # a hand-edited detail: the counts are not known
    lines = [f"- {r.variant} vs {r.baseline} (seed {r.seed}, {r.image_size} px): accuracy {_pts(r.estimate)} points "
             f"(95% CI {_pts(r.ci_low)} to {_pts(r.ci_high)}); exact McNemar p = {r.p_value:.3g}{counts}; {verdict}."]
    n_groups = d.get(DETAIL_N_GROUPS, r.n)
    if d.get(DETAIL_RESAMPLE) == "groups" and isinstance(n_groups, int) and n_groups < r.n and p is not None:
        lines.append(f"  McNemar counts {r.n} images as independent but they come from {n_groups} source groups; "
                     "the group sign-flip test moves each group's images together.")
    return lines


def summary_text(stats: pd.DataFrame) -> str:
    """A short, plainly worded summary of the stats table for ``wbc report``."""
    if stats is None or stats.empty:
        return "No statistics available."
    lines: list[str] = []
    ci = stats[stats["kind"] == StatKind.CI]
    if not ci.empty:
        d = parse_detail(ci["detail"].iloc[0])
        how = ("whole source-cell groups (cluster bootstrap)" if d.get(DETAIL_RESAMPLE) == "groups"
               else "individual images (no source groups known)")
        lines.append(f"95% confidence intervals are percentile bootstrap intervals resampling {how}; "
                     "differences are in percentage points, variant minus baseline.")
    for r in ci[ci["metric"] == Metric.ACCURACY].itertuples():
        lines.append(f"- {r.variant} (seed {r.seed}, {r.image_size} px): accuracy {r.estimate:.3f} "
                     f"(95% CI {r.ci_low:.3f}-{r.ci_high:.3f}, n = {r.n}).")
    paired = stats[(stats["kind"] == StatKind.PAIRED) & (stats["metric"] == Metric.ACCURACY_DIFF)]
    for r in paired.itertuples():
        lines += _paired_lines(r)
    seeds = stats[stats["kind"] == StatKind.SEEDS]
    if not seeds.empty:
        lines.append("Spread over training seeds (mean, sample sd). Each CI above covers test-set sampling for "
                     "one trained model only; the seed spread shows how much retraining alone moves the result.")
        for r in seeds[seeds["metric"].isin([Metric.ACCURACY, Metric.ACCURACY_DIFF])].itertuples():
            what = f"{r.variant} accuracy" if r.metric == Metric.ACCURACY else f"{r.variant} minus {r.baseline} accuracy"
            scale = 100 if r.metric == Metric.ACCURACY_DIFF else 1
            fmt = (lambda x: f"{x:+.1f} points") if scale == 100 else (lambda x: f"{x:.3f}")
            lines.append(f"- {what} ({r.image_size} px, {r.n} seeds): {fmt(scale * r.estimate)} "
                         f"(sd {scale * r.sd:.{1 if scale == 100 else 3}f}).")
    cd = stats[stats["kind"] == StatKind.CLASS_DIFF]
    if not cd.empty:
        lines.append("Per-class changes (variant minus baseline):")
        multi = seeds[seeds["metric"].isin(cd["metric"].unique()) & seeds["baseline"].notna()]
        if not multi.empty:
            for r in multi.itertuples():
                lines.append(f"- {r.metric} {r.variant} vs {r.baseline} ({r.image_size} px): mean {_pts(r.estimate)} "
                             f"points over {r.n} seeds (sd {100 * r.sd:.1f}).")
        else:
            for r in cd.itertuples():
                inc = "CI includes 0" if r.ci_low <= 0 <= r.ci_high else "CI excludes 0"
                lines.append(f"- {r.metric} {r.variant} vs {r.baseline} (seed {r.seed}, {r.image_size} px): "
                             f"{_pts(r.estimate)} points (95% CI {_pts(r.ci_low)} to {_pts(r.ci_high)}; "
                             f"{inc}; {r.n} test images of the class).")
    return "\n".join(lines)
