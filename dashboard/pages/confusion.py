"""Confusion matrices, one per variant side by side; tapping a cell opens the filtered error browser."""

from __future__ import annotations

import holoviews as hv
import pandas as pd
import panel as pn
from holoviews import streams

from core.config import CLASS_ABBR, CLASSES

from dashboard.data import confusion_counts, load_table, run_variants
from dashboard.pages.common import gated, no_run, warnings_alert
from dashboard.safe import esc

ABBR_TO_CLASS = {v: k for k, v in CLASS_ABBR.items()}


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
    hm = hv.HeatMap(df, ["predicted", "true"], ["value", "count"]).opts(
        cmap="Blues", colorbar=False, tools=["tap", "hover"], invert_yaxis=True, xlabel="predicted",
        ylabel="true", title=variant, frame_width=260, frame_height=260, toolbar=None,
        clim=(0, top), nonselection_alpha=1.0,
        xaxis="top", fontsize={"title": 12, "labels": 11, "xticks": 11, "yticks": 11})
    labels = hv.Labels(df, ["predicted", "true"], ["text", "text_color"]).opts(
        text_color="text_color", text_font_size="10pt" if normalise else "11pt")
    return hm, labels


def css_name(variant) -> str:
    """A variant name as a CSS class token (a stored name may hold spaces or markup)."""
    import re

    return re.sub(r"[^A-Za-z0-9_-]", "_", str(variant))


def view(state) -> pn.viewable.Viewable:
    normalise = pn.widgets.RadioButtonGroup(options=["counts", "row-normalised"], value="counts",
                                            css_classes=["wbc-conf-norm"], button_type="primary",
                                            button_style="outline")
    hint = pn.pane.Markdown("Rows are the true class, columns the prediction (summed over seeds). "
                            "**Click a cell** to browse those images.")

    def render_run(run_id, norm, main: bool):
        rd = state.run_dir(run_id)
        conf, w1 = load_table(rd, "confusion")
        w2 = None
        pred = pd.DataFrame()
        if conf.empty:
            pred, w2 = load_table(rd, "predictions")
        variants = [v for v in run_variants(rd) if (not conf.empty and v in set(conf["variant"])) or
                    (not pred.empty and v in set(pred["variant"]))]
        if not variants:
            return pn.Column(warnings_alert([w1, w2]),
                             pn.pane.Markdown(f"No confusion data in run <code>{esc(run_id)}</code>."))
        plots = []
        for v in variants:
            m = confusion_counts(conf, pred, v)
            hm, labels = heatmap(m, v, norm == "row-normalised")
            tap = streams.Tap(source=hm, x=None, y=None)

            def on_tap(x=None, y=None, variant=v, rid=run_id):
                if x is None or y is None:
                    return
                pred_c = ABBR_TO_CLASS.get(str(x), str(x))
                true_c = ABBR_TO_CLASS.get(str(y), str(y))
                if pred_c in CLASSES and true_c in CLASSES:
                    if rid != state.run_id:  # a cell of the compared run: browse that run (swap the two)
                        state.param.update(run_id=rid, compare_run_id=state.run_id)
                    state.show_errors(variant, true_c, pred_c)

            tap.add_subscriber(on_tap)
            css = ["wbc-confusion", f"wbc-confusion-{css_name(v)}"] if main else ["wbc-confusion-compare"]
            plots.append(pn.pane.HoloViews(hm * labels, css_classes=css, width=360, height=360, linked_axes=False))
        title = pn.pane.Markdown(f"#### {'Run' if main else 'Compared with'} <code>{esc(run_id)}</code>")
        return pn.Column(warnings_alert([w1, w2]), title, pn.FlexBox(*plots), sizing_mode="stretch_width")

    def render(run_id, compare_run_id, norm, _refresh):
        if not run_id:
            return no_run()
        parts = [render_run(run_id, norm, True)]
        if compare_run_id and compare_run_id != run_id:
            parts.append(render_run(compare_run_id, norm, False))
        return pn.Column(*parts, sizing_mode="stretch_width")

    return pn.Column(pn.Row(normalise, hint), gated(state, "Confusion", render, state.param.run_id, state.param.compare_run_id, normalise,
                           state.param.refresh),
                     sizing_mode="stretch_width", css_classes=["wbc-page-confusion"])
