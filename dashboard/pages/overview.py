"""Overview: accuracy per variant with bootstrap CIs, the paired difference (McNemar) and the seed spread."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn

from core.store import (DETAIL_B, DETAIL_C, DETAIL_P_GROUP_SIGNFLIP, SEED_MEAN, Metric, StatKind, Table, first_line,
                        parse_detail)
from dashboard.data import accuracy_from_predictions, load_table, read_meta, report_html
from dashboard.pages.base import Page
from dashboard.pages.common import fitted_table, fmt_p, interval, no_run, variant_colors, warnings_alert
from dashboard.safe import as_float, esc


def accuracy_table(state, run_id) -> tuple[pd.DataFrame, pd.DataFrame, list]:
    """(per-variant accuracy with CI / seed spread, paired differences, warnings) for one run."""
    rd = state.run_dir(run_id)
    stats, w1 = load_table(rd, Table.STATS)
    warnings = [w1]
    acc = _accuracy_rows(stats) if not stats.empty else pd.DataFrame()
    if acc.empty:  # no stats.parquet: fall back to the predictions (no CI)
        pred, w2 = load_table(rd, Table.PREDICTIONS)
        warnings.append(w2)
        acc = accuracy_from_predictions(pred)
        if acc.empty:
            meta, _ = read_meta(rd)
            a = (meta.get("summary") or {}).get("accuracy") or {}
            acc = pd.DataFrame({"variant": list(a), "accuracy": list(a.values())})
        if not acc.empty:
            warnings.append(f"{run_id}: no stats.parquet — accuracy shown without confidence intervals")
    for c in ["image_size", "accuracy", "ci_low", "ci_high", "seed_mean", "seed_sd", "macro_f1", "balanced_acc", "n",
              "n_seeds"]:
        if c not in acc.columns:
            acc[c] = np.nan
    paired = pd.DataFrame()
    if not stats.empty:
        p = stats[(stats["kind"] == StatKind.PAIRED) & (stats["metric"] == Metric.ACCURACY_DIFF)].copy()
        multi = stats[(stats["kind"] == StatKind.SEEDS) & (stats["metric"] == Metric.ACCURACY_DIFF)]
        if len(multi):  # several seeds: the seed-averaged difference with its own CI, not per-seed rows
            p = multi.assign(detail=None, p_value=np.nan)
        if len(p):
            bc = p["detail"].apply(parse_detail)
            p["b: only baseline right"] = bc.apply(lambda d: d.get(DETAIL_B))
            p["c: only variant right"] = bc.apply(lambda d: d.get(DETAIL_C))
            p["McNemar p"] = p["p_value"].apply(fmt_p)
            # McNemar counts images as independent; copies of one source cell are not: the group sign-flip test's p
            p["group sign-flip p"] = bc.apply(lambda d: fmt_p(d.get(DETAIL_P_GROUP_SIGNFLIP)))
            paired = p[["variant", "baseline", "seed", "image_size", "estimate", "ci_low", "ci_high", "McNemar p",
                        "group sign-flip p", "b: only baseline right", "c: only variant right", "n"]].rename(
                columns={"estimate": "accuracy diff"})
    return acc, paired, warnings


def _accuracy_rows(stats: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, image size) from core.stats.model_summary: one seed -> its bootstrap CI; several
    -> the seed mean with the CI of the seed-averaged accuracy, and the seed sd. Never averaged CI bounds."""
    from core.stats import model_summary

    f1 = model_summary(stats, Metric.MACRO_F1).set_index(["variant", "image_size"])["estimate"]
    bal = model_summary(stats, Metric.BALANCED_ACCURACY).set_index(["variant", "image_size"])["estimate"]
    n = stats[(stats["kind"] == StatKind.CI) & (stats["metric"] == Metric.ACCURACY)].groupby(["variant", "image_size"])["n"].max()
    rows = []
    for r in model_summary(stats).itertuples():
        key = (r.variant, r.image_size)
        row = {"variant": r.variant, "image_size": r.image_size, "n_seeds": r.n_seeds, "n": n.get(key),
               "accuracy": r.estimate, "ci_low": r.ci_low, "ci_high": r.ci_high, "macro_f1": f1.get(key),
               "balanced_acc": bal.get(key)}
        if r.n_seeds > 1 and r.sd == r.sd:  # a seeds row: its mean and spread
            row.update(seed_mean=r.estimate, seed_sd=float(r.sd))
        rows.append(row)
    return pd.DataFrame(rows)


# The scorecard's "test model" column, shown only where a run refit (StudyConfig.refit): which model was tested.
TEST_MODEL, REFIT_MODEL, VALIDATED_MODEL = "test model", "refit on train + val", "the validated one"


def scorecard_frame(state, run_id) -> pd.DataFrame:
    """The replication scorecard (core.scorecard) for display: paper vs this run's validation vs test."""
    from core.scorecard import SPLIT_WORDS, AccuracySource, scorecard, test_seeds_words

    rd = state.run_dir(run_id)
    (val, _), (stats, _) = load_table(rd, Table.VALIDATION), load_table(rd, Table.STATS)
    # a run stopped before its statistics: the test accuracy straight from its predictions, without a CI
    pred = load_table(rd, Table.PREDICTIONS)[0] if stats.empty else None
    meta, _ = read_meta(rd)
    card = scorecard(val, stats, (meta.get("data") or {}).get("test_source"), pred)
    if card.empty:
        return card
    out = pd.DataFrame({  # the three numbers to compare first, so they show without scrolling sideways
        "variant": card["variant"], "size px": card["image_size"],
        "paper validation acc": [f"{x:.2f}" if x is not None and x == x else
                                 "n/a (paper: x4plus only)" if v != "original" else "n/a"
                                 for v, x in zip(card["variant"], card["paper_val_accuracy"])],
        # three decimals as text: a number column would show 0.930 as 0.93 beside the CI's 0.930
        "this run validation acc": [f"{x:.3f}" if x == x else "" for x in card["val_accuracy"].astype(float)],
        "test acc (unseen cells)": [f"{x:.3f}" if x == x else "" for x in card["test_accuracy"].astype(float)],
        "test 95% CI": [(interval(f"{a:.3f}", f"{b:.3f}") if a == a else "none: no statistics" if f == AccuracySource.PREDICTIONS
                         else "") + test_seeds_words(t, n) for a, b, f, t, n in
                        zip(card["test_ci_low"], card["test_ci_high"], card["test_from"], card["test_seeds"], card["seeds"])],
        "validation split": [SPLIT_WORDS.get(s, s) for s in card["val_split"]],
        "test set": card["test_source"], "seeds": card["seeds"]})
    if card["refit"].any():  # only then: older runs keep their columns
        out[TEST_MODEL] = [REFIT_MODEL if r else VALIDATED_MODEL for r in card["refit"]]
    return out


def _scorecard_parts(state, run_id, compare: str | None = None) -> list:
    """The scorecard's words and table: the main run's rows, then (in compare mode) the compared run's, labelled."""
    from core.scorecard import NO_VALIDATION_WORDS, PAPER_CITATION, REFIT_WORDS

    cards = [(rid, scorecard_frame(state, rid)) for rid in (run_id, compare) if rid]
    card = pd.concat([c.assign(run=rid) for rid, c in cards if not c.empty] or [pd.DataFrame()], ignore_index=True)
    if compare and not card.empty:
        card = card[["run"] + [c for c in card.columns if c != "run"]]
    else:
        card = card.drop(columns=["run"], errors="ignore")
    if card.empty:
        return [pn.pane.Markdown(f"### Replication scorecard\n{NO_VALIDATION_WORDS}", css_classes=["wbc-scorecard"])]
    leaky = card["validation split"].str.startswith("random").any()
    text = (f"### Replication scorecard\nThe paper reports validation accuracy ({esc(PAPER_CITATION)}). "
            f"Beside it: {'each' if compare else 'this'} run's validation accuracy at the restored epoch, and its "
            "accuracy on test images of "
            "source cells it never saw, with the 95% CI (of the seed mean when there are several seeds).")
    if TEST_MODEL in card:  # some run here refit: a compared run without the column tested its validated model
        card[TEST_MODEL] = card[TEST_MODEL].fillna(VALIDATED_MODEL)
        text += f"\n\n{esc(REFIT_WORDS)}"
    if leaky:
        text += ("\n\n**The validation split is random, so it is leaky** (near-copies of training cells are in it), "
                 "like the paper's: read the test column.")
    text += "".join(f"\n\nLeakage check{f' of <code>{esc(rid)}</code>' if compare else ''}: {esc(words)}"
                    for rid, words in leakage_lines(state, [rid for rid, _ in cards]))
    return [pn.pane.Markdown(text, css_classes=["wbc-scorecard"]),
            fitted_table(card, "wbc-scorecard-table")]


def leakage_lines(state, run_ids: list[str]) -> list[tuple[str, str]]:
    """(run id, core's sentence on its validation split's near-copies in training) for each run that recorded one."""
    from core.groups import leakage_words

    out = []
    for rid in run_ids:
        data = read_meta(state.run_dir(rid))[0].get("data")
        words = leakage_words(data.get("leakage") if isinstance(data, dict) else None)
        if words:
            out.append((rid, words))
    return out


def provenance_table(meta: dict) -> pd.DataFrame:
    """How each variant's images were made, from run.json: weights source and sha256, precision, device."""
    rows = []
    for v, p in ((meta.get("weights") or {}).get("enhancers") or {}).items():
        sha = p.get("sha256") or ""
        rows.append({"variant": v, "method": p.get("method") or (p.get("arch") and f"{p['arch']} x{p.get('scale', 4)}")
                     or ("as is" if v == "original" else ""),
                     "weights": p.get("source", ""), "sha256": sha[:16], "precision": p.get("precision", ""),
                     "device": p.get("device", ""), "made": p.get("made"), "from cache": p.get("from_cache")})
    df = pd.DataFrame(rows, columns=["variant", "method", "weights", "sha256", "precision", "device", "made",
                                     "from cache"])
    return df.astype({"made": "Int64", "from cache": "Int64"})  # counts, blank for 'original'



def _acc_plot(acc: pd.DataFrame, title: str):
    """Bars of accuracy with 95% CI error bars; with two runs, one bar per (variant, run)."""
    if acc.empty:
        return hv.Text(0, 0, "no accuracy").opts(xaxis=None, yaxis=None)
    d = acc.copy()
    d["colour_key"] = d["variant"]  # one colour per variant, as on Metrics and EOS/NEU (before a size suffix)
    if d["image_size"].nunique() > 1:  # every size shown, labelled
        d["variant"] = [f"{v} @{int(z)}px" for v, z in zip(d["variant"], d["image_size"])]
    two = "run" in d.columns and d["run"].nunique() > 1
    if two:  # short aliases on the axis, full run ids in the legend
        alias = {r: "AB"[i] if i < 2 else str(i) for i, r in enumerate(dict.fromkeys(d["run"]))}
        d["bar"] = [f"{v} ({alias[r]})" for v, r in zip(d["variant"], d["run"])]
        d["run"] = [f"{alias[r]}: {r}" for r in d["run"]]
    else:
        d["bar"] = d["variant"]
        d["run"] = ""
    lo = (d["accuracy"] - d["ci_low"]).fillna(0)
    hi = (d["ci_high"] - d["accuracy"]).fillna(0)
    # the axis starts at 0: a few points of difference must not look like a landslide
    colour = "run" if two else hv.dim("colour_key").categorize(variant_colors(d["colour_key"].unique()))
    bars = hv.Bars(d, "bar", ["accuracy", "run", "colour_key"]).opts(
        ylim=(0.0, 1.0), tools=["hover"], responsive=True, height=320, title=title, alpha=0.6,
        color=colour, cmap=["#4c78a8", "#f58518"], show_legend=two, legend_position="bottom",
        xlabel="variant (run)" if two else "variant", ylabel="accuracy (95% CI)")
    err = hv.ErrorBars((d["bar"], d["accuracy"], lo, hi), kdims=["bar"], vdims=["accuracy", "yerrneg", "yerrpos"]).opts(
        line_width=2, color="black")
    return bars * err


_OPTIONAL = ("image_size", "macro_f1", "balanced_acc", "n", "n_seeds")  # columns left out when a run has none
_COUNTS = ("image_size", "n", "n_seeds")
# accuracies and differences with 3 decimals, as in the intervals beside them, the scorecard, Runs and Metrics
DECIMALS = {"type": "money", "precision": 3}


def _fmt(acc: pd.DataFrame) -> pd.DataFrame:
    out = acc.copy()
    out["95% CI"] = [interval(f"{a:.3f}", f"{b:.3f}") if a == a and b == b else "" for a, b in zip(out["ci_low"], out["ci_high"])]
    out["seeds mean ± sd"] = [f"{m:.3f} ± {s:.3f}" if m == m and s == s else "" for m, s in
                              zip(out["seed_mean"], out["seed_sd"])]
    for c in _COUNTS:  # whole numbers stay whole (two runs concatenated made them floats: "128.0", "71.0")
        if c in out:
            vals = pd.to_numeric(out[c], errors="coerce")
            if len(vals) and vals.notna().all() and (vals % 1 == 0).all():
                out[c] = vals.astype("int64")
    cols = [c for c in ["run", "variant", "image_size", "accuracy", "95% CI", "seeds mean ± sd", "macro_f1",
                        "balanced_acc", "n", "n_seeds"]
            if c in out.columns and not (c in _OPTIONAL and out[c].isna().all())  # no stats: no "NaN" columns
            and not (c == "seeds mean ± sd" and (out[c] == "").all())]  # one seed each: no spread to show
    return out[cols]


class OverviewPage(Page):
    title = "Overview"
    css = "wbc-page-overview"

    def layout(self) -> list:
        download = pn.widgets.FileDownload(callback=self.report_file, filename="report.html", button_type="primary",
                                           label="Download report (HTML)", width=240, css_classes=["wbc-download-report"])
        self.state.param.watch(lambda e: setattr(download, "filename", f"{e.new or 'report'}.html"), "run_id")
        download.filename = f"{self.state.run_id or 'report'}.html"
        return [download, self.live(self.render, (self.state, ["run_id", "compare_run_id", "refresh"]), banner=True)]

    def report_file(self):
        """The main run's report as one HTML file that opens offline (wbc report RUN --html FILE)."""
        import io

        if not self.state.run_id:
            return io.BytesIO(b"")
        try:
            return io.BytesIO(report_html(self.state.run_dir(self.state.run_id)))
        except Exception as e:  # noqa: BLE001 - a damaged run: the file says why in one line, the server goes on
            why = esc(f"{type(e).__name__}: {first_line(e)}"[:300])
            return io.BytesIO(f"<!doctype html><meta charset='utf-8'><title>No report</title>"
                              f"<p>The report of run {esc(self.state.run_id)} could not be made: {why}</p>".encode())

    def render(self):
        run_id, compare = self.state.run_id, self.state.compare_run_id
        if not run_id:
            return no_run()
        acc, paired, warnings = accuracy_table(self.state, run_id)
        both = acc.assign(run=run_id)
        if compare:
            acc2, paired2, w2 = accuracy_table(self.state, compare)
            warnings += w2
            both = pd.concat([both, acc2.assign(run=compare)], ignore_index=True)
            parts_p = [p.assign(run=r) for p, r in ((paired, run_id), (paired2, compare)) if len(p)]
            if parts_p:
                paired = pd.concat(parts_p, ignore_index=True)
                paired = paired[["run"] + [c for c in paired.columns if c != "run"]]
        meta, _ = read_meta(self.state.run_dir(run_id))
        made = provenance_parts(meta, run_id)  # how each run's images were made, both in compare mode
        if compare:
            made += provenance_parts(read_meta(self.state.run_dir(compare))[0], compare)
        parts = [warnings_alert(warnings), notes_alert(meta), *copies_alerts(meta),
                 *self.accuracy_parts(acc, both, run_id, compare),
                 *_scorecard_parts(self.state, run_id, compare), *difference_parts(acc, paired), *made]
        return pn.Column(*parts, sizing_mode="stretch_width")

    @staticmethod
    def accuracy_parts(acc: pd.DataFrame, both: pd.DataFrame, run_id: str, compare: str | None) -> list:
        plot = _acc_plot(both, "Accuracy per variant" + (" (two runs)" if compare else ""))
        shown = _fmt(both if compare else acc)
        table = fitted_table(shown, "wbc-acc-table", formatters={c: dict(DECIMALS)
                                                                 for c in ("accuracy", "macro_f1", "balanced_acc") if c in shown})
        title = f"### Accuracy — <code>{esc(run_id)}</code>" + (f" vs <code>{esc(compare)}</code>" if compare else "")
        return [pn.pane.Markdown(title),
                pn.Row(pn.pane.HoloViews(plot, sizing_mode="stretch_width", height=340), sizing_mode="stretch_width"),
                table]


def copies_alerts(meta: dict) -> list:
    """Byte-identical files in the test set (core.data.exact_copies), worded by core; names escaped."""
    from core.data import run_copies_words

    return [pn.pane.Alert(esc(text), alert_type=level, css_classes=[f"wbc-copies-{level}"],
                          sizing_mode="stretch_width")
            for level, text in run_copies_words(meta.get("data"))]


def notes_alert(meta: dict) -> pn.pane.Alert:
    notes = list(meta.get("notes") or (meta.get("config") or {}).get("notes") or [])
    return pn.pane.Alert("\n".join(f"* {esc(n)}" for n in notes), alert_type="info", visible=bool(notes),
                         css_classes=["wbc-run-notes"], sizing_mode="stretch_width",
                         stylesheets=[":host { overflow-wrap: anywhere; }"])  # a long path in a note wraps, in the box


def difference_parts(acc: pd.DataFrame, paired: pd.DataFrame) -> list:
    """The paired differences in words and as a table (or plain differences when no paired test is stored)."""
    if not len(paired):
        if len(acc) <= 1:
            return []
        base = acc.iloc[0]
        lines = [f"* **{esc(r.variant)}** − {esc(base['variant'])}: {r.accuracy - base['accuracy']:+.3f} (no paired "
                 f"test stored)" for r in acc.iloc[1:].itertuples()]
        return [pn.pane.Markdown("### Difference between variants\n" + "\n".join(lines))]
    lines = [_difference_line(d) for d in paired.to_dict("records")]
    shown = _seed_words(paired)
    if "discordant b / c" in shown and not shown["discordant b / c"].astype(bool).any():
        shown = shown.drop(columns="discordant b / c")  # seed means: no counts to show
    counts = ("\n\n*discordant b / c*: the test images that only the baseline / only the variant classified right "
              "(what McNemar's test counts)." if "discordant b / c" in shown else "")
    return [pn.pane.Markdown("### Difference between variants (paired, same test images)\n" + "\n".join(lines) + counts),
            fitted_table(shown, "wbc-paired-table", formatters={"accuracy diff": dict(DECIMALS)})]


def _is_seed_mean(seed) -> bool:
    return pd.notna(seed) and seed == SEED_MEAN


def _seed_words(paired: pd.DataFrame) -> pd.DataFrame:
    """The paired table for display: the seed mean's row (stored as SEED_MEAN, -1) says 'mean', not -1; the CI
    in one column as on the accuracy table, and the discordant counts in one ('b / c'), so that it fits the page."""
    out = paired.assign(seed=["mean" if _is_seed_mean(s) else "" if pd.isna(s) else str(s) for s in paired["seed"]])
    for lo, hi, name, fmt in (("ci_low", "ci_high", "95% CI", lambda x, y: interval(f"{x:+.3f}", f"{y:+.3f}")),
                              ("b: only baseline right", "c: only variant right", "discordant b / c",
                               "{:.0f} / {:.0f}".format)):
        if lo in out and hi in out:  # values read from disk: a number each, or the cell stays blank (never raises)
            pairs = [(as_float(x), as_float(y)) for x, y in zip(out[lo], out[hi])]
            out.insert(out.columns.get_loc(lo), name, [fmt(x, y) if x is not None and y is not None else ""
                                                       for x, y in pairs])
            out = out.drop(columns=[lo, hi])
    return out


def _difference_line(d: dict) -> str:
    where = f"<code>{esc(d['run'])}</code>: " if "run" in d else ""
    seed = "mean of seeds" if _is_seed_mean(d["seed"]) else f"seed {esc(d['seed'])}"
    pts = f"{100 * d['accuracy diff']:+.1f} points (95% CI {100 * d['ci_low']:+.1f} to {100 * d['ci_high']:+.1f})"
    ps = "" if not d["McNemar p"] else (f", McNemar p = {d['McNemar p']}" + (
        f", group sign-flip p = {d['group sign-flip p']} (copies of one cell move together)"
        if d["group sign-flip p"] else ""))
    return (f"* {where}**{esc(d['variant'])}** vs {esc(d['baseline'])} ({seed}, {esc(d['image_size'])} px): "
            f"accuracy {pts}{ps}")


def provenance_parts(meta: dict, run_id: str) -> list:
    prov = provenance_table(meta)
    if not len(prov):
        return []
    clf = (meta.get("weights") or {}).get("classifier") or {}
    cfg = meta.get("config") or {}
    head = (f"### How each variant was made — <code>{esc(run_id)}</code>\nClassifier "
            f"<code>{esc(cfg.get('classifier', '?'))}</code>, weights: {esc(clf.get('source', cfg.get('pretrained', '?')))}"
            + (f" (sha256 <code>{esc(str(clf['sha256'])[:16])}</code>)" if clf.get("sha256") else ""))
    return [pn.pane.Markdown(head),
            fitted_table(prov, "wbc-provenance-table")]
