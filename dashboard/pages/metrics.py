"""Per-class precision / recall / F1 per variant (bars and a paper-style table) and training curves."""

from __future__ import annotations

import holoviews as hv
import pandas as pd
import panel as pn
import param
from bokeh.models.widgets.tables import NumberFormatter

from core.config import CLASSES
from core.metrics import METRICS, paper_table, per_class
from core.store import Table

from dashboard.data import load_table, run_variants
from dashboard.pages.base import Page
from dashboard.pages.common import (color_key, fitted_table, no_run, swatch, variant_color, variant_colors,
                                    warnings_alert)
from dashboard.safe import esc

# the table's numbers: 3 decimals, right-aligned under their titles; "-" where a row has none (accuracy's P / R)
THREE_DECIMALS = NumberFormatter(format="0.000", text_align="right", nan_format="-")


class MetricsPage(Page):
    title = "Metrics"
    css = "wbc-page-metrics"
    metric = param.Selector(default="f1", objects=METRICS)

    def layout(self) -> list:
        which = pn.widgets.RadioButtonGroup.from_param(self.param.metric, name="", css_classes=["wbc-metric-choice"],
                                                       button_type="primary", button_style="outline")
        return [which, self.live(self.render, (self.state, ["run_id", "compare_run_id", "refresh"]),
                                 (self, ["metric"]), banner=True)]

    def render(self):
        run_id, compare = self.state.run_id, self.state.compare_run_id
        if not run_id:
            return no_run()
        parts = [self.render_run(run_id)]
        if compare and compare != run_id:  # each run under its own heading
            parts = [pn.pane.Markdown(f"### Run <code>{esc(run_id)}</code>", css_classes=["wbc-metrics-run"]), *parts,
                     pn.pane.HTML("<hr>", sizing_mode="stretch_width"),  # Divider fetches its CSS from a CDN
                     pn.pane.Markdown(f"### Compared with <code>{esc(compare)}</code>",
                                                           css_classes=["wbc-metrics-run"]),
                     self.render_run(compare)]
        return pn.Column(*parts, sizing_mode="stretch_width")

    def render_run(self, run_id: str):
        rd = self.state.run_dir(run_id)
        metrics, w1 = load_table(rd, Table.METRICS)
        hist, w2 = load_table(rd, Table.HISTORY)
        m = per_class(metrics, run_variants(rd))
        parts = [warnings_alert([w1, w2])]
        parts += [pn.pane.Markdown("No metrics.parquet in this run.")] if m.empty else self.class_parts(m)
        parts += [pn.pane.Markdown("No training history in this run.")] if hist.empty else curves(hist)
        return pn.Column(*parts, sizing_mode="stretch_width")

    def class_parts(self, m: pd.DataFrame) -> list:
        """Bars of the chosen metric per class and variant, and the paper-style table."""
        metric = self.metric
        cls = m[m["label"].isin(CLASSES)]
        table = paper_table(m)
        bars = hv.Bars(cls, ["label", "variant"], metric).opts(
            multi_level=False, responsive=True, height=320, tools=["hover"], ylim=(0, 1.05),
            title=f"{metric} per class and variant", xlabel="class", ylabel=metric, legend_position="bottom_right",
            color=hv.dim("variant").categorize(variant_colors(cls["variant"].unique())))
        return [color_key(list(dict.fromkeys(cls["variant"]))),
                # not linked: the compared run's bars get their own variants (linked, one variant sat in a slot
                # laid out for the main run's two)
                pn.pane.HoloViews(bars, sizing_mode="stretch_width", height=340, linked_axes=False),
                pn.pane.Markdown("#### Per-class metrics (mean over seeds)"),
                pn.FlexBox(*[variant_table(table, v) for v in dict.fromkeys(m["variant"])], gap="24px",
                           sizing_mode="stretch_width")]


CLASS_PX = 100  # the class column: 'weighted avg' (12 letters at 6.6 px, 12 px padding) on one line
TABLE_PX = 360  # one variant's table: class and three metrics, side by side with the next variant's at 1100 px


def variant_table(table: pd.DataFrame, variant) -> pn.Column:
    """One variant's rows of the paper table, under its name, as the paper's Tables 3-4 are one per variant (one
    wide table titled each column '<variant> precision', which wrapped over three lines)."""
    cols = {f"{variant} {k}": k for k in METRICS if f"{variant} {k}" in table.columns}
    sub = table[["class", *cols]].rename(columns=cols)
    return pn.Column(
        pn.pane.HTML(f"{swatch(variant)}<b>{esc(variant)}</b>", css_classes=["wbc-metrics-variant"]),
        fitted_table(sub, "wbc-metrics-table", widths={"class": CLASS_PX},  # 'weighted avg' on one line
                     formatters={c: THREE_DECIMALS for c in cols.values()}),  # 1.000, not 1.0
        width=TABLE_PX)


def curves(hist: pd.DataFrame) -> list:
    """Loss and accuracy per epoch, mean over seeds; dashed = validation."""
    h = hist.groupby(["variant", "epoch"], observed=True)[["train_loss", "val_loss", "train_acc", "val_acc"]] \
        .mean().reset_index()
    loss, accp = [], []
    for v, g in h.groupby("variant", sort=False, observed=True):
        c = variant_color(v)
        loss += [hv.Curve(g, "epoch", ("train_loss", "loss"), label=f"{v} train").opts(color=c),
                 hv.Curve(g, "epoch", ("val_loss", "loss"), label=f"{v} val").opts(line_dash="dashed", color=c)]
        accp += [hv.Curve(g, "epoch", ("train_acc", "accuracy"), label=f"{v} train").opts(color=c),
                 hv.Curve(g, "epoch", ("val_acc", "accuracy"), label=f"{v} val").opts(line_dash="dashed", color=c)]
    opts = dict(responsive=True, height=340, legend_position="bottom", legend_cols=2, tools=["hover"])
    return [pn.pane.Markdown("#### Training curves (mean over seeds; dashed = validation)"),
            pn.Row(pn.pane.HoloViews(hv.Overlay(loss).opts(title="loss", **opts), sizing_mode="stretch_width"),
                   pn.pane.HoloViews(hv.Overlay(accp).opts(title="accuracy", **opts), sizing_mode="stretch_width"),
                   sizing_mode="stretch_width")]
