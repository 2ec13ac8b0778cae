"""Map: where each model puts the test images (t-SNE of the penultimate features, core.embedmap), one panel per
variant, coloured by true class, a cross where the model is wrong. The panels share one data source, so a lasso
(or box) on one selects the same images on all; the selection fills the gallery, and a click on a card shows
its Grad-CAM for every variant."""

from __future__ import annotations

import asyncio

import pandas as pd
import panel as pn
import param

from core.config import CLASS_ABBR, CLASSES

from dashboard.data import embedding_map_frame
from dashboard.gallery import Gallery, gallery_items
from dashboard.pages.base import Page
from dashboard.pages.common import no_run, why_view
from dashboard.safe import esc

CLASS_COLORS = dict(zip(CLASSES, ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")))
MAX_CARDS = 48


def ab(label) -> str:
    return CLASS_ABBR.get(str(label), str(label))


def map_source(wide: pd.DataFrame, variants: list[str]) -> dict:
    """The plots' shared columns: coordinates, colour and marker per variant, and the hover text."""
    data = {"image_id": wide["image_id"].astype(str).tolist(), "true_label": wide["true_label"].astype(str).tolist(),
            "color": [CLASS_COLORS.get(str(c), "#7f7f7f") for c in wide["true_label"]]}
    for i, _ in enumerate(variants):
        ok = wide[f"correct_{i}"].fillna(False).astype(bool)
        data |= {f"x_{i}": wide[f"x_{i}"].tolist(), f"y_{i}": wide[f"y_{i}"].tolist(),
                 f"pred_{i}": wide[f"pred_{i}"].astype(str).tolist(),
                 f"marker_{i}": ["circle" if c else "x" for c in ok], f"size_{i}": [6 if c else 9 for c in ok]}
    return data


def selection_summary(rows: pd.DataFrame, variants: list[str]) -> str:
    """'N images: 12 EOS, 3 NEU; right: original 80%, x4 87%' for the selected rows."""
    if rows.empty:
        return "Lasso or box-select points on a map: the images appear below (click a card for its Grad-CAM)."
    counts = rows["true_label"].value_counts()
    by_class = ", ".join(f"{int(counts[c])} {ab(c)}" for c in CLASSES if c in counts)
    right = ", ".join(f"{esc(v)} {100 * rows[f'correct_{i}'].fillna(False).astype(bool).mean():.0f}%"
                      for i, v in enumerate(variants))
    shown = f" (first {MAX_CARDS} shown)" if len(rows) > MAX_CARDS else ""
    return f"**{len(rows)} selected**{shown}: {by_class}. Right: {right}."


def card_rows(rows: pd.DataFrame, variants: list[str]) -> pd.DataFrame:
    """Gallery rows: the original region and the enhanced image, captioned with every variant's verdict."""
    def title(r):
        verdicts = " · ".join(f"{v}: {ab(r[f'pred_{i}'])}{'' if r[f'correct_{i}'] else ' ✗'}"
                              for i, v in enumerate(variants))
        return f"{ab(r['true_label'])} | {verdicts}"

    out = rows.head(MAX_CARDS).copy()
    out["title"] = [title(r) for _, r in out.iterrows()]
    out["correct"] = out[[f"correct_{i}" for i in range(len(variants))]].fillna(False).astype(bool).all(axis=1)
    return out


class MapPage(Page):
    title = "Map"
    css = "wbc-page-map"
    method = param.Selector(default="tsne", objects={"t-SNE": "tsne", "PCA (first two components)": "pca"},
                            doc="How the features are laid out in 2-D.")

    def layout(self) -> list:
        pick = pn.widgets.RadioButtonGroup.from_param(self.param.method, css_classes=["wbc-map-method"])
        body = self.live(self.render, (self.state, ["run_id", "refresh"]), (self, ["method"]), banner=True)
        intro = pn.pane.Markdown(
            "### Where each model puts the test images\nEach point is a test image, placed by the model's "
            "penultimate features (t-SNE, one panel per variant; cached in the run after the first time). "
            "Colour: true class. A cross: the model is wrong. Select with the lasso or box on any panel.")
        return [intro, pick, body]

    def render(self):
        run_id = self.state.run_id
        if not run_id:
            return no_run()
        return pn.panel(self._stream, sizing_mode="stretch_width")

    async def _stream(self):
        """A spinner while the map is laid out off the UI thread (t-SNE: seconds per variant), then the map."""
        rd, method = self.state.run_dir(self.state.run_id), self.method
        yield pn.Row(pn.indicators.LoadingSpinner(value=True, size=24),
                     pn.pane.Markdown("Laying out the map (t-SNE of every test image, once per run)..."),
                     css_classes=["wbc-map-wait"])
        try:
            wide, variants = await asyncio.to_thread(embedding_map_frame, rd, method)
        except LookupError as e:  # no stored features: said, the rest of the app unaffected
            yield pn.pane.Alert(f"No map: {esc(e)}", alert_type="info", css_classes=["wbc-map-none"])
            return
        except Exception as e:
            yield pn.pane.Alert(f"The map failed: {esc(type(e).__name__)}: {esc(e)}", alert_type="danger",
                                css_classes=["wbc-map-none"])
            return
        yield self.map_view(rd, wide, variants)

    def map_view(self, run_dir, wide: pd.DataFrame, variants: list[str]) -> pn.Column:
        from bokeh.models import ColumnDataSource

        source = ColumnDataSource(map_source(wide, variants))
        plots = pn.Row(*[pn.pane.Bokeh(self.panel_figure(source, i, v)) for i, v in enumerate(variants)],
                       css_classes=["wbc-map-plots"])
        summary = pn.pane.Markdown(selection_summary(wide.iloc[[]], variants), css_classes=["wbc-map-summary"])
        gallery = Gallery(sizing_mode="stretch_width", css_classes=["wbc-map-gallery"],
                          empty_message="No images selected.")
        why = pn.Column(sizing_mode="stretch_width")
        shown: list[dict] = []

        def on_select(attr, old, new):
            rows = wide.iloc[sorted(new)] if new else wide.iloc[[]]
            summary.object = selection_summary(rows, variants)
            cards = card_rows(rows, variants)
            shown[:] = [{"image_id": r.image_id, "seed": r.seed, "image_size": r.image_size}
                        for r in cards.itertuples()]
            gallery.items = gallery_items(cards, runs_dir=self.state.runs_dir, label_variant=False)
            why.objects = []

        def on_card(e):
            if e.new is not None and 0 <= e.new < len(shown):
                why.objects = [why_view(run_dir, shown[e.new])]

        source.selected.on_change("indices", on_select)
        gallery.param.watch(on_card, "selected")
        legend = " ".join(f"<span style='color:{CLASS_COLORS[c]}'>\u25cf</span> {esc(c)}" for c in CLASSES)
        return pn.Column(pn.pane.HTML(f"<div style='font-size:13px'>{legend} &nbsp; \u2715 wrong</div>"), plots,
                         summary, gallery, why, sizing_mode="stretch_width")

    @staticmethod
    def panel_figure(source, i: int, variant: str):
        from bokeh.models import HoverTool
        from bokeh.plotting import figure

        f = figure(title=str(variant), width=440, height=400, tools="lasso_select,box_select,wheel_zoom,pan,reset",
                   active_drag="lasso_select", toolbar_location="above")
        f.scatter(x=f"x_{i}", y=f"y_{i}", source=source, color="color", marker=f"marker_{i}", size=f"size_{i}",
                  line_width=2, alpha=0.85, nonselection_alpha=0.12)
        f.add_tools(HoverTool(tooltips=[("image", "@image_id"), ("true", "@true_label"), ("said", f"@pred_{i}")]))
        f.axis.visible = False
        f.grid.visible = False
        return f
