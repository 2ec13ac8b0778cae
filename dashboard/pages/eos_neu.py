"""Eosinophil / neutrophil: the EOS->NEU and NEU->EOS errors of each variant, and the images whose verdict
flips between the baseline and an enhanced variant (joined on image_id, seed and image_size)."""

from __future__ import annotations

import asyncio

import holoviews as hv
import pandas as pd
import panel as pn
import param

from core.metrics import RIGHT_TO_WRONG, UNCHANGED, WRONG_TO_RIGHT, verdict_pairs
from core.regions import BOX_COLUMNS
from core.store import Table

from dashboard.data import (load_table, measure_sr_change, run_variants, sr_change_frame, sr_change_progress,
                            sr_change_seconds)
from dashboard.gallery import Gallery, gallery_items
from dashboard.pages.base import Page
from dashboard.pages.common import ENHANCED_GONE, ab, fitted_table, no_run, variant_colors, warnings_alert, why_view
from dashboard.safe import canvas_text, esc, hv_title

EOS, NEU = "eosinophil", "neutrophil"
FLIP_CARDS = 24  # cards per direction of verdict flips
# The box plot's categories, in this order whatever the rows' (with the filter on, "right -> wrong" came first)
FLIP_BOXES = {UNCHANGED: "unchanged", WRONG_TO_RIGHT: "wrong \u2192 right", RIGHT_TO_WRONG: "right \u2192 wrong"}


def flip_box_rows(groups: pd.DataFrame) -> pd.DataFrame:
    """core.srchange.flip_groups' rows for the box plot: categories in FLIP_BOXES' order, labelled with arrows."""
    order = {k: i for i, k in enumerate(FLIP_BOXES)}
    g = groups[groups["flip"].isin(order)]
    g = g.iloc[g["flip"].map(order).argsort(kind="stable")]
    return g.assign(flip=g["flip"].map(FLIP_BOXES))


def eos_neu_counts(pred: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for v, g in pred.groupby("variant", sort=False, observed=True):
        rows.append({"variant": v,
                     "EOS→NEU": int(((g.true_label == EOS) & (g.pred_label == NEU)).sum()),
                     "NEU→EOS": int(((g.true_label == NEU) & (g.pred_label == EOS)).sum()),
                     "EOS images": int((g.true_label == EOS).sum()),
                     "NEU images": int((g.true_label == NEU).sum()),
                     "seeds": int(g.seed.nunique())})
    return pd.DataFrame(rows)


def flips(pred: pd.DataFrame, base: str, other: str) -> pd.DataFrame:
    """One row per image (and seed, size) whose verdict changes (core.metrics.verdict_pairs), with both
    predictions; ``flip`` says which way, naming the variants."""
    cols = ["path", "true_label", "pred_label", "confidence"]
    boxes = [c for c in BOX_COLUMNS if c in pred.columns]  # the region the models saw (same for both variants)
    j = verdict_pairs(pred, base, other, cols + boxes, cols + ["enhanced_path"])
    j["flip"] = j["moved"].map({RIGHT_TO_WRONG: f"right in {base}, wrong in {other}",
                                WRONG_TO_RIGHT: f"wrong in {base}, right in {other}"})
    return j[j["flip"].notna()]


class EosNeuPage(Page):
    title = "EOS/NEU"
    css = "wbc-page-eosneu"
    only_eos_neu = param.Boolean(default=True, doc="Verdict flips of eosinophils and neutrophils only.")

    def layout(self) -> list:
        # the chart and table are of EOS/NEU confusions anyway: the box filters the verdict flips and what
        # super-resolution changed in them, so it sits above those (render), and only where there are flips
        self.only = pn.widgets.Checkbox.from_param(self.param.only_eos_neu,
                                                   name="verdict flips: only eosinophils and neutrophils",
                                                   css_classes=["wbc-eos-only"])
        main_only = pn.bind(self.main_only_note, self.state.param.compare_run_id)
        body = self.live(self.render, (self.state, ["run_id", "refresh"]), (self, ["only_eos_neu"]), banner=True)
        return [main_only, body]

    @staticmethod
    def main_only_note(compare_run_id):
        return pn.pane.Markdown(f"Showing the main run only (not <code>{esc(compare_run_id)}</code>): verdict flips "
                                "are between the variants of one run." if compare_run_id else "",
                                css_classes=["wbc-eos-main-only"])

    def render(self):
        run_id = self.state.run_id
        if not run_id:
            return no_run()
        rd = self.state.run_dir(run_id)
        pred, w = load_table(rd, Table.PREDICTIONS)
        if pred.empty:
            return pn.Column(warnings_alert([w]), pn.pane.Markdown("No predictions in this run."))
        counts = eos_neu_counts(pred)
        long = counts.melt("variant", ["EOS→NEU", "NEU→EOS"], "error", "count")
        bars = hv.Bars(long, ["error", "variant"], "count").opts(
            responsive=True, height=260, tools=["hover"], title="EOS/NEU confusions per variant (all seeds)",
            color=hv.dim("variant").categorize(variant_colors(long["variant"].unique())))
        parts = [warnings_alert([w]), pn.pane.HoloViews(bars, sizing_mode="stretch_width"),
                 fitted_table(counts, "wbc-eos-table")]  # columns share the width, as on the other pages
        variants = [v for v in run_variants(rd) if v in set(pred["variant"])] or list(pred["variant"].unique())
        if len(variants) < 2:  # said, where the flips would be
            parts.append(pn.pane.Markdown("Verdict flips compare two variants of a run: this run has one.",
                                          css_classes=["wbc-eos-one-variant"]))
            return pn.Column(*parts, sizing_mode="stretch_width")
        parts.append(self.only)
        for other in variants[1:]:
            parts += self.flip_parts(pred, variants[0], other)
        parts += self.sr_parts(rd, pred, variants[0], variants[1:])
        return pn.Column(*parts, sizing_mode="stretch_width")

    def sr_parts(self, run_dir, pred: pd.DataFrame, base: str, others: list[str]) -> list:
        """What super-resolution changed (core.srchange) for images whose verdict flips, vs the rest, tested; in a
        section of its own, which a measurement made on this page redraws alone (the page keeps its place)."""
        section = pn.Column(sizing_mode="stretch_width", css_classes=["wbc-sr-section"])
        section.objects = self.sr_section(section, run_dir, pred, base, others)
        return [section]

    def sr_section(self, section: pn.Column, run_dir, pred: pd.DataFrame, base: str, others: list[str]) -> list:
        from core.srchange import flip_groups, flip_test

        change, why, n = sr_change_frame(run_dir)
        head = pn.pane.Markdown("### What super-resolution changed\nHigh-frequency energy of the enhanced region over "
                                "bicubic x4 of the same region (log2: 0 = no more fine detail than interpolation, "
                                "+1 = twice the energy), for images whose verdict flips and the rest.",
                                css_classes=["wbc-sr-change"])
        if change.empty:
            words = pn.pane.Markdown(esc(why or "No enhanced variant in this run."), css_classes=["wbc-sr-missing"])

            def redraw():
                section.objects = self.sr_section(section, run_dir, pred, base, others)

            return [head, words] + ([self.measure_button(run_dir, n, redraw)] if n else [])
        parts = [head]
        for other in others:
            g = flip_groups(pred, change, base, other)
            if self.only_eos_neu:
                g = g[g["true_label"].isin([EOS, NEU])]
            left_out = sr_left_out_words(pred, change, other)
            if g.empty:  # said, not skipped: a heading with nothing under it reads as a broken page
                parts.append(pn.pane.Markdown(f"**{esc(other)}**: {sr_missing_words(change, other)}",
                                              css_classes=["wbc-sr-test"]))
                continue
            _, words = flip_test(g)
            box = hv.BoxWhisker(flip_box_rows(g), "flip", "hf_gain").opts(
                responsive=True, height=240, title=hv_title(f"{other}: log2 high-frequency gain over bicubic"),
                xlabel=canvas_text(f"verdict, {base} \u2192 {other}"), ylabel="log2 gain", box_fill_color="#f58518")
            parts += [pn.pane.HoloViews(box, sizing_mode="stretch_width"),
                      pn.pane.Markdown(f"**{esc(other)}**: {esc(words)}" + (f" {esc(left_out)}" if left_out else ""),
                                       css_classes=["wbc-sr-test"])]
        return parts

    def measure_button(self, run_dir, n: int, redraw) -> pn.Row:
        """Measure a large test set's sr_change here, off the UI thread, with progress; ``redraw()`` then draws the
        section with it. A measurement already under way (a second click, another session, this run shown again)
        is followed, not repeated (dashboard.data.measure_sr_change)."""
        running = sr_change_progress(run_dir) is not None
        button = pn.widgets.Button(name=("Being measured: follow it" if running else
                                         f"Measure {n} enhanced test images here (about {sr_change_seconds(n)} s)"),
                                   button_type="primary", css_classes=["wbc-sr-measure"])
        bar = pn.indicators.Progress(value=0, max=max(n, 1), visible=False, width=240, align="center",
                                     css_classes=["wbc-sr-progress"])
        status = pn.pane.Markdown("", align="center", css_classes=["wbc-sr-status"])

        async def measure(_):
            if button.disabled:  # a double click: the first one measures
                return
            button.disabled, bar.visible = True, True
            task = asyncio.ensure_future(asyncio.to_thread(measure_sr_change, run_dir))
            while not task.done():
                done, total = sr_change_progress(run_dir) or (0, n)
                bar.max, bar.value = max(total, 1), min(done, max(total, 1))
                status.object = f"{done} of {total} images measured"
                await asyncio.sleep(0.5)
            try:
                task.result()
            except Exception as e:  # an unreadable run: said in one line, the button offered again
                status.object = esc(f"Could not measure: {e}")
                button.disabled, bar.visible = False, False
                return
            redraw()

        button.on_click(measure)
        self.measure_now = measure  # the click's handler (a test awaits it)
        return pn.Row(button, bar, status)

    def flip_parts(self, pred: pd.DataFrame, base: str, other: str) -> list:
        """The images whose verdict flips between ``base`` and ``other``, both directions, as galleries."""
        f = flips(pred, base, other)
        if self.only_eos_neu:
            f = f[f.true_label_base.isin([EOS, NEU])]
        counts = f.groupby("flip").size()
        both = (f"right in {base}, wrong in {other}", f"wrong in {base}, right in {other}")  # both directions
        parts = [pn.pane.Markdown(f"### Verdict flips: {esc(base)} vs {esc(other)}\n" +
                                  "\n".join(f"* {esc(k)}: **{int(counts.get(k, 0))}**" for k in both))]
        for kind, g in f.groupby("flip", sort=True):
            cards = g.head(FLIP_CARDS)
            gallery = Gallery(items=self.flip_items(cards, base, other), sizing_mode="stretch_width",
                              css_classes=["wbc-flip-gallery"])
            shown = f"first {FLIP_CARDS} shown; " if len(g) > len(cards) else ""
            parts += [pn.pane.Markdown(f"**{esc(kind)}** ({len(g)}, {shown}captions: the true class, then what "
                                       f"{esc(base)} / {esc(other)} said; click a card for its Grad-CAM)"),
                      gallery, self.why_on_click(gallery, cards)]
        return parts

    def why_on_click(self, gallery: Gallery, g: pd.DataFrame) -> pn.Column:
        """A column that shows the clicked card's Grad-CAM for every variant (as the Errors page's "Why?")."""
        why = pn.Column(sizing_mode="stretch_width")
        rows = [{"image_id": i, "seed": s, "image_size": z} for i, s, z in zip(g.image_id, g.seed, g.image_size)]
        run_dir = self.state.run_dir(self.state.run_id)

        def show(e):
            if e.new is not None and 0 <= e.new < len(rows):
                why.objects = [why_view(run_dir, rows[e.new])]

        gallery.param.watch(show, "selected")
        return why

    def flip_items(self, g: pd.DataFrame, base: str, other: str) -> list[dict]:
        rows = pd.DataFrame({
            "image_id": g.image_id, "variant": f"{base}\u2192{other}", "seed": g.seed,
            "true_label": g.true_label_base,
            "pred_label": [f"{pb}/{po}" for pb, po in zip(g.pred_label_base, g.pred_label_other)],
            "path": g.path_base, "enhanced_path": g.enhanced_path, "correct": g.correct_other,
            **{c: g[c] for c in BOX_COLUMNS if c in g},
            # what `base` / `other` said (the variants are named in the header above). Not an arrow: on the Errors
            # page "NEU \u2192 EOS" reads true \u2192 predicted, and the same words must not mean two things.
            "title": [f"true {ab(t)} \u00b7 said {ab(pb)} / {ab(po)} \u00b7 seed\u00a0{sd}" for t, pb, po, sd in
                      zip(g.true_label_base, g.pred_label_base, g.pred_label_other, g.seed)]})
        items = gallery_items(rows, runs_dir=self.state.runs_dir, label_variant=False)
        for it, cb, co in zip(items, g.confidence_base, g.confidence_other):
            it["probs"] = f"confidence {cb:.2f} / {co:.2f}"
        return items


def sr_left_out_words(pred: pd.DataFrame, change: pd.DataFrame, variant: str) -> str:
    """How many of a variant's enhanced test images have no measure (outside the dashboard's data roots, or gone
    from disk): the plot and the test use the others, and say so."""
    mine = pred[(pred["variant"] == variant) & pred["enhanced_path"].notna()]
    n = int(mine["image_id"].nunique())
    got = change[(change["variant"] == variant) & change["hf_gain"].notna()]["image_id"].nunique()
    if not n or got >= n:
        return ""
    return (f"Measured on {got} of its {n} enhanced test images: the other {n - got} could not be read (outside the "
            "dashboard's data roots, or no longer on disk).")


def sr_missing_words(change: pd.DataFrame, variant: str) -> str:
    """Why a variant has no super-resolution change to plot."""
    mine = change[change["variant"] == variant]
    if len(mine) and mine["hf_gain"].isna().all():
        return f"nothing to measure: {ENHANCED_GONE}"
    return "no test images of the chosen classes to compare."
