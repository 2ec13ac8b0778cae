"""core.stats against independent computations (sklearn, scipy, statsmodels)."""

import json
import time

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score
from statsmodels.stats.contingency_tables import mcnemar

from core.config import CLASSES, PROB_COLUMNS
from core.stats import compute_stats, group_signflip_p, summary_text
from core.store import SCHEMAS


def make_predictions(n=400, variants=("original", "enhanced"), seeds=(0,), acc=(0.8, 0.85), group_size=1,
                     rng_seed=0, size=224):
    """Synthetic predictions; with group_size > 1 every group holds copies with identical outcomes."""
    rng = np.random.default_rng(rng_seed)
    n_groups = n // group_size
    true_g = rng.choice(CLASSES, n_groups)
    rows = []
    for s in seeds:
        for v, a in zip(variants, acc):
            ok_g = rng.random(n_groups) < a
            wrong_g = np.array([CLASSES[(CLASSES.index(t) + 1 + rng.integers(3)) % 4] for t in true_g])
            pred_g = np.where(ok_g, true_g, wrong_g)
            for i in range(n):
                g = i // group_size
                rows.append({"variant": v, "seed": s, "image_size": size, "image_id": f"img{i}",
                             "true_label": true_g[g], "pred_label": pred_g[g], "correct": bool(ok_g[g]),
                             "group_id": f"g{g}" if group_size > 1 else None})
    df = pd.DataFrame(rows)
    for c in PROB_COLUMNS:
        df[c] = 0.25
    return df


def test_schema_and_point_estimates_match_sklearn():
    p = make_predictions()
    st = compute_stats(p, n_boot=500)
    assert list(st.columns) == SCHEMAS["stats"]
    for v in ("original", "enhanced"):
        g = p[p["variant"] == v]
        r = st[(st["kind"] == "ci") & (st["variant"] == v)].set_index("metric")
        assert r.loc["accuracy", "estimate"] == pytest.approx(accuracy_score(g["true_label"], g["pred_label"]))
        assert r.loc["macro_f1", "estimate"] == pytest.approx(f1_score(g["true_label"], g["pred_label"], average="macro"))
        assert r.loc["balanced_accuracy", "estimate"] == pytest.approx(
            balanced_accuracy_score(g["true_label"], g["pred_label"]))
        for m in ("accuracy", "macro_f1", "balanced_accuracy"):
            assert r.loc[m, "ci_low"] <= r.loc[m, "estimate"] <= r.loc[m, "ci_high"]
        assert json.loads(r.loc["accuracy", "detail"])["resample"] == "images"


def test_paired_mcnemar_matches_statsmodels_and_scipy():
    p = make_predictions(n=300, acc=(0.7, 0.8))
    st = compute_stats(p, n_boot=500)
    r = st[(st["kind"] == "paired") & (st["metric"] == "accuracy_diff")].iloc[0]
    a = p[p["variant"] == "original"].set_index("image_id")["correct"]
    b = p[p["variant"] == "enhanced"].set_index("image_id")["correct"].loc[a.index]
    table = pd.crosstab(a, b).reindex(index=[True, False], columns=[True, False], fill_value=0).to_numpy()
    d = json.loads(r["detail"])
    assert (d["b"], d["c"]) == (table[0, 1], table[1, 0])
    assert r["p_value"] == pytest.approx(mcnemar(table, exact=True).pvalue)
    assert r["p_value"] == pytest.approx(binomtest(d["b"], d["b"] + d["c"], 0.5).pvalue)
    assert r["estimate"] == pytest.approx(b.mean() - a.mean())
    assert r["ci_low"] <= r["estimate"] <= r["ci_high"]


def test_class_diff_matches_sklearn_recall():
    p = make_predictions(n=300)
    st = compute_stats(p, n_boot=200)
    r = st[(st["kind"] == "class_diff") & (st["metric"] == "recall:eosinophil")].iloc[0]
    rec = {v: recall_score(g["true_label"], g["pred_label"], labels=["eosinophil"], average=None)[0]
           for v, g in p.groupby("variant")}
    assert r["estimate"] == pytest.approx(rec["enhanced"] - rec["original"])
    assert set(st[st["kind"] == "class_diff"]["metric"]) == {"recall:eosinophil", "f1:eosinophil",
                                                              "recall:neutrophil", "f1:neutrophil"}


def test_ci_narrows_with_n():
    widths = []
    for n in (100, 1600):
        st = compute_stats(make_predictions(n=n, variants=("original",), acc=(0.8,)), n_boot=1000)
        r = st[(st["kind"] == "ci") & (st["metric"] == "accuracy")].iloc[0]
        widths.append(r["ci_high"] - r["ci_low"])
    assert widths[1] < widths[0] / 2.5  # ~1/sqrt(16) = 1/4


def test_grouped_bootstrap_wider_than_iid_when_groups_duplicated():
    p = make_predictions(n=800, group_size=8, variants=("original", "enhanced"), acc=(0.75, 0.8))
    grouped = compute_stats(p, n_boot=1000)
    iid = compute_stats(p.assign(group_id=None), n_boot=1000)
    for kind, metric in (("ci", "accuracy"), ("paired", "accuracy_diff")):
        g = grouped[(grouped["kind"] == kind) & (grouped["metric"] == metric)].iloc[0]
        i = iid[(iid["kind"] == kind) & (iid["metric"] == metric)].iloc[0]
        assert g["estimate"] == pytest.approx(i["estimate"])
        assert (g["ci_high"] - g["ci_low"]) > 2 * (i["ci_high"] - i["ci_low"])  # ~sqrt(8) wider
    assert json.loads(grouped[grouped["kind"] == "ci"]["detail"].iloc[0])["resample"] == "groups"


def test_group_signflip_p_is_exact_mcnemar_with_one_image_per_group_and_brute_force_otherwise():
    """The paired group test against scipy's binomial test (singleton groups) and against all 2^G sign patterns."""
    import itertools

    for b, c in ((7, 2), (0, 6), (1, 4), (3, 3), (0, 1), (12, 30)):
        d = [-1] * b + [1] * c + [0] * 9  # 9 groups whose image both variants got right (or wrong)
        assert group_signflip_p(d) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, abs=1e-12)
    rng = np.random.default_rng(3)
    for _ in range(20):
        d = rng.integers(-3, 4, rng.integers(1, 11))
        flips = np.array(list(itertools.product((-1, 1), repeat=len(d))))
        brute = float((np.abs(flips @ np.abs(d)) >= abs(d.sum())).mean())
        assert group_signflip_p(d) == pytest.approx(brute, abs=1e-12)
    assert group_signflip_p([]) == group_signflip_p([0, 0]) == 1.0


def test_paired_row_moves_copies_of_a_cell_together_and_the_verdict_rests_on_it():
    """10 images right only with the variant, as 5 cells copied twice: McNemar (10 vs 0, p = 0.002) and the
    percentile bootstrap (its CI excludes 0) call it a difference; 5 cells are 2^5 = 32 equally likely sign
    patterns, so the group test gives 2/32 = 0.0625, and the summary does not call the variant better."""
    rows = []
    for i in range(60):
        g, lab = f"g{i // 2}" if i < 10 else f"g{i}", CLASSES[i % 4]
        for v, ok in (("original", i >= 10), ("enhanced", True)):
            rows.append({"variant": v, "seed": 0, "image_size": 128, "image_id": f"img{i}", "true_label": lab,
                         "pred_label": lab if ok else CLASSES[(i + 1) % 4], "correct": ok, "group_id": g})
    p = pd.DataFrame(rows).assign(**{c: 0.25 for c in PROB_COLUMNS})
    st = compute_stats(p, n_boot=1000)
    r = st[(st["kind"] == "paired") & (st["metric"] == "accuracy_diff")].iloc[0]
    d = json.loads(r["detail"])
    assert (d["b"], d["c"], d["n_groups"]) == (0, 10, 55)
    assert r["p_value"] == pytest.approx(2 / 1024) and r["ci_low"] > 0  # both would say "better"
    assert d["p_group_signflip"] == pytest.approx(2 / 32)
    text = summary_text(st)
    assert "no evidence of a difference at the 5% level (group sign-flip p = 0.0625" in text
    assert "enhanced is better" not in text and "the two disagree near the 5% edge" in text
    singles = compute_stats(p.assign(group_id=p["image_id"]), n_boot=200)  # the same images as 60 cells
    d1 = json.loads(singles[(singles["kind"] == "paired") & (singles["metric"] == "accuracy_diff")]["detail"].iloc[0])
    assert d1["p_group_signflip"] == pytest.approx(2 / 1024)
    assert "evidence that enhanced is better (group sign-flip p = 0.00195)" in summary_text(singles)


def test_seeds_rows_and_speed():
    p = make_predictions(n=2500, variants=("original", "bicubic", "esrgan"), acc=(0.8, 0.8, 0.82), seeds=(0, 1, 2))
    t = time.perf_counter()
    st = compute_stats(p, n_boot=2000)
    elapsed = time.perf_counter() - t
    assert elapsed < 15, elapsed  # a couple of seconds on 2 idle cores; slack for a busy machine
    s = st[st["kind"] == "seeds"]
    assert (s["seed"] == -1).all()
    r = s[(s["variant"] == "esrgan") & (s["metric"] == "accuracy")].iloc[0]
    per_seed = [accuracy_score(g["true_label"], g["pred_label"])
                for _, g in p[p["variant"] == "esrgan"].groupby("seed")]
    assert json.loads(r["detail"]) == pytest.approx(per_seed)
    assert r["estimate"] == pytest.approx(np.mean(per_seed)) and r["sd"] == pytest.approx(np.std(per_seed, ddof=1))
    assert not s[(s["metric"] == "accuracy_diff") & (s["baseline"] == "original")].empty
    text = summary_text(st)
    assert "esrgan vs original" in text and "McNemar" in text and "seeds" in text


def test_summary_wording_no_difference():
    p = make_predictions(n=200, acc=(0.8, 0.8))
    p.loc[p["variant"] == "enhanced", ["pred_label", "correct"]] = \
        p.loc[p["variant"] == "original", ["pred_label", "correct"]].to_numpy()
    st = compute_stats(p, n_boot=200)
    text = summary_text(st)
    assert "no evidence of a difference" in text
    assert summary_text(st.iloc[0:0]) == "No statistics available."


def test_summary_of_a_hand_edited_detail_leaves_out_what_it_cannot_know():
    """A paired row whose detail lost its counts (hand-edited, foreign): the summary still reads, without them;
    it said `error: b` (a KeyError) before."""
    import json

    st = compute_stats(make_predictions(n=200, group_size=2), n_boot=100)
    assert "right only with" in summary_text(st) and "group sign-flip p = " in summary_text(st)
    paired = (st["kind"] == "paired") & (st["metric"] == "accuracy_diff")
    st.loc[paired, "detail"] = json.dumps({"resample": "groups", "n_groups": 1})
    text = summary_text(st)
    assert "enhanced vs original" in text and "exact McNemar p = " in text and "right only with" not in text
    assert "group sign-flip" not in text  # its p was in the lost detail too: the verdict reads the CI alone
    st.loc[paired, "detail"] = json.dumps({"resample": "groups", "n_groups": "many", "p_group_signflip": "low"})
    assert "enhanced vs original" in summary_text(st)
    st.loc[paired, "detail"] = "not json"
    assert "enhanced vs original" in summary_text(st)
