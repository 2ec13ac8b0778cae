"""Confusion matrices, one per variant side by side; tapping a cell opens the filtered error browser."""

from __future__ import annotations

import holoviews as hv
import pandas as pd
import panel as pn
import param
from holoviews import streams

from core.config import CLASS_ABBR, CLASSES

from core.metrics import confusion_counts
from core.store import Table
from dashboard.data import load_table, run_variants
from dashboard.pages.base import Page
from dashboard.pages.common import no_run, warnings_alert
from dashboard.safe import esc, hv_title

ABBR_TO_CLASS = {v: k for k, v in CLASS_ABBR.items()}


def _unfaded(plot, element) -> None:
    """A tap on a cell selects its count too (the tap tool hits every renderer): the other counts keep their
    look instead of fading to Bokeh's non-selected alpha."""
    renderer = plot.handles.get("glyph_renderer")
    if renderer is not None:
        renderer.nonselection_glyph = renderer.glyph.clone()


# a matrix's pane: the 260 px frame, its class ticks and axis titles; two (and the FlexBox's gaps) fit the page at
# 1100 px (at 360 they wrapped there)
MATRIX_PX = 336


def hover_tooltips(normalise: bool) -> list[tuple[str, str]]:
    """A cell's tooltip: its classes and images once each (HoloViews' default lists every value dimension, so
    the count came twice, as "value" and "count"); row-normalised cells add their share of the true class."""
    tips = [("true", "@true"), ("predicted", "@predicted"), ("images", "@count of @row_total")]
    return tips + [("share of the true class", "@value{0.00}")] if normalise else tips


def heatmap(m: pd.DataFrame, variant: str, normalise: bool) -> hv.Overlay:
    rows = []
    for t in CLASSES:
        total = max(int(m.loc[t].sum()), 1)
        for p in CLASSES:
            c = int(m.loc[t, p])
            rows.append((CLASS_ABBR[p], CLASS_ABBR[t], c / total if normalise else c, c, total))
    df = pd.DataFrame(rows, columns=["predicted", "true", "value", "count", "row_total"])
    # row-normalised cells also say how many images they are (0.75 of 4 images is not 0.75 of 400)
    df["text"] = [f"{v:.2f}\n{c}/{n}" if normalise else f"{int(v)}" for v, c, n in
                  zip(df["value"], df["count"], df["row_total"])]
    top = 1.0 if normalise else max(1, int(df["value"].max()))
    df["text_color"] = ["white" if v > 0.55 * top else "black" for v in df["value"]]  # readable on dark cells
    hm = hv.HeatMap(df, ["predicted", "true"], ["value", "count", "row_total"]).opts(
        cmap="Blues", colorbar=False, tools=["tap", "hover"], hover_tooltips=hover_tooltips(normalise),
        invert_yaxis=True, xlabel="predicted",
        ylabel="true", title=hv_title(variant), frame_width=260, frame_height=260, toolbar=None,
        clim=(0, top), nonselection_alpha=1.0,
        xaxis="top", fontsize={"title": 12, "labels": 11, "xticks": 11, "yticks": 11})
    labels = hv.Labels(df, ["predicted", "true"], ["text", "text_color"]).opts(
        text_color="text_color", text_font_size="10pt" if normalise else "11pt", hooks=[_unfaded])
    return hm, labels


def css_name(variant) -> str:
    """A variant name as a CSS class token (a stored name may hold spaces or markup)."""
    import re

    return re.sub(r"[^A-Za-z0-9_-]", "_", str(variant))


class ConfusionPage(Page):
    title = "Confusion"
    css = "wbc-page-confusion"
    normalise = param.Selector(default="counts", objects=["counts", "row-normalised"])

    def layout(self) -> list:
        norm = pn.widgets.RadioButtonGroup.from_param(self.param.normalise, name="", css_classes=["wbc-conf-norm"],
                                                      button_type="primary", button_style="outline")
        self.hint = pn.pane.Markdown("Rows are the true class, columns the prediction (summed over seeds). "
                                     "**Click a cell off the diagonal** to browse those misclassified images.")
        # a click on the diagonal (correct predictions, which the Errors page does not hold) says so in the
        # hint's place, so that the matrices below do not move
        self.note = pn.pane.Markdown("", visible=False, css_classes=["wbc-conf-note"],
                                     stylesheets=[":host { color: #0b5394; font-weight: 600; }"])
        body = self.live(self.render, (self.state, ["run_id", "compare_run_id", "refresh"]),
                         (self, ["normalise"]), banner=True)
        self.state.param.watch(lambda *_: self.show_hint(), ["run_id", "compare_run_id"])  # a note of another run
        return [pn.Row(norm, self.hint, self.note), body]

    def render(self):
        run_id, compare = self.state.run_id, self.state.compare_run_id
        if not run_id:
            return no_run()
        parts = [self.render_run(run_id, True)]
        if compare and compare != run_id:
            parts.append(self.render_run(compare, False))
        return pn.Column(*parts, sizing_mode="stretch_width")

    def render_run(self, run_id: str, main: bool):
        rd = self.state.run_dir(run_id)
        conf, w1 = load_table(rd, Table.CONFUSION)
        w2 = None
        pred = pd.DataFrame()
        if conf.empty:
            pred, w2 = load_table(rd, Table.PREDICTIONS)
        variants = [v for v in run_variants(rd) if (not conf.empty and v in set(conf["variant"])) or
                    (not pred.empty and v in set(pred["variant"]))]
        if not variants:
            return pn.Column(warnings_alert([w1, w2]),
                             pn.pane.Markdown(f"No confusion data in run <code>{esc(run_id)}</code>."))
        plots = [self.matrix(run_id, v, confusion_counts(conf, pred, v), main) for v in variants]
        title = pn.pane.Markdown(f"#### {'Run' if main else 'Compared with'} <code>{esc(run_id)}</code>")
        # the box as wide as the page: left to size itself it wrapped two matrices at 1100 px that fit side by side
        return pn.Column(warnings_alert([w1, w2]), title, pn.FlexBox(*plots, sizing_mode="stretch_width"),
                         sizing_mode="stretch_width")

    def matrix(self, run_id: str, variant: str, counts: pd.DataFrame, main: bool) -> pn.pane.HoloViews:
        """One variant's matrix; tapping a cell opens the error browser filtered to it."""
        hm, labels = heatmap(counts, variant, self.normalise == "row-normalised")
        streams.Tap(source=hm, x=None, y=None).add_subscriber(
            lambda x=None, y=None: self.open_cell(run_id, variant, x, y))
        css = ["wbc-confusion", f"wbc-confusion-{css_name(variant)}"] if main else ["wbc-confusion-compare"]
        return pn.pane.HoloViews(hm * labels, css_classes=css, width=MATRIX_PX, height=360, linked_axes=False)

    def show_hint(self) -> None:
        self.note.visible, self.hint.visible = False, True

    def open_cell(self, run_id: str, variant: str, x, y) -> None:
        if x is None or y is None:
            return
        pred_c = ABBR_TO_CLASS.get(str(x), str(x))
        true_c = ABBR_TO_CLASS.get(str(y), str(y))
        if pred_c in CLASSES and true_c in CLASSES and pred_c == true_c:
            # shorter than the hint whose place it takes, so that it never needs more lines (the matrices stay put)
            self.note.object = (f"{esc(true_c.title())} called {esc(pred_c)}: correct, so not on the Errors page. "
                                "Click a cell off the diagonal.")
            self.note.visible, self.hint.visible = True, False
            return
        self.show_hint()
        if pred_c in CLASSES and true_c in CLASSES:
            if run_id != self.state.run_id:  # a cell of the compared run: browse that run (swap the two)
                self.state.param.update(run_id=run_id, compare_run_id=self.state.run_id)
            self.state.show_errors(variant, true_c, pred_c)
