"""Map: where each model puts the test images (t-SNE of the penultimate features, core.embedmap), one panel per
variant, coloured by true class, a cross where the model is wrong. The panels share one data source, so a lasso
(or box) on one selects the same images on all; the selection fills the gallery, and a click on a card shows
its Grad-CAM for every variant."""

from __future__ import annotations

import asyncio

import numpy as np
import pandas as pd
import panel as pn
import param

from core.config import CLASSES

from dashboard.data import embedding_map_frame, map_models
from dashboard.gallery import Gallery, gallery_items
from dashboard.pages.base import Page
from dashboard.pages.common import ab, no_run, why_view
from dashboard.safe import canvas_text, esc

CLASS_COLORS = dict(zip(CLASSES, ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")))
MAX_CARDS = 48


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
        return "Lasso or box-select points on a map: the images appear below (click a card for its Grad-CAM, shown here)."
    counts = rows["true_label"].value_counts()
    by_class = ", ".join(f"{int(counts[c])} {ab(c)}" for c in CLASSES if c in counts)
    right = ", ".join(f"{esc(v)} {100 * rows[f'correct_{i}'].fillna(False).astype(bool).mean():.0f}%"
                      for i, v in enumerate(variants))
    shown = f" ({MAX_CARDS} shown, taken in turn from each class)" if len(rows) > MAX_CARDS else ""
    return f"**{len(rows)} selected**{shown}: {by_class}. Right: {right}."


def in_turn(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows taken in turn from each true class (in CLASSES order), each class's in their own order: the first
    cards of a big selection show every class in it, not only the first class's (654 selected: 48 EOS of 59)."""
    rank = rows.groupby("true_label", sort=False).cumcount().to_numpy()
    cls = rows["true_label"].map({c: i for i, c in enumerate(CLASSES)}).fillna(len(CLASSES)).to_numpy()
    return rows.iloc[np.lexsort((cls, rank))]


def card_rows(rows: pd.DataFrame, variants: list[str]) -> pd.DataFrame:
    """Gallery rows: the original region and the (first) enhanced image, titled with the true class; a card's
    border is green only when every variant is right."""
    out = in_turn(rows).head(MAX_CARDS).copy()
    out["title"] = [f"true {ab(t)}" for t in out["true_label"]]
    out["correct"] = out[[f"correct_{i}" for i in range(len(variants))]].fillna(False).astype(bool).all(axis=1)
    return out


def verdict_lines(row, variants: list[str]) -> str:
    """'original: LYM ✗<br>x4: EOS' (HTML: names escaped): what every variant said, one line each."""
    return "<br>".join(f"{esc(v)}: {esc(ab(row[f'pred_{i}']))}{'' if row[f'correct_{i}'] else ' ✗'}"
                       for i, v in enumerate(variants))


METHOD_WORDS = {"tsne": "t-SNE", "pca": "PCA (the first two principal components)"}


class MapPage(Page):
    title = "Map"
    css = "wbc-page-map"
    method = param.Selector(default="tsne", objects={"t-SNE": "tsne", "PCA": "pca"},
                            doc="How the features are laid out in 2-D: t-SNE, or the first two principal components.")
    model = param.String(default="", doc="The seed and image size mapped, 'seed/size' ('' = the run's first).")

    def layout(self) -> list:
        pick = pn.widgets.RadioButtonGroup.from_param(self.param.method, css_classes=["wbc-map-method"],
                                                      button_type="primary", button_style="outline", width=220)
        body = self.live(self.render, (self.state, ["run_id", "refresh"]), (self, ["method", "model"]), banner=True)
        intro = pn.bind(self.intro, self.param.method)
        main_only = pn.bind(self.main_only_note, self.state.param.run_id, self.state.param.compare_run_id)
        return [intro, pn.Row(pick, main_only), body]

    @staticmethod
    def main_only_note(run_id, compare_run_id):
        """In compare mode: the map is the main run's (the panels are one run's variants)."""
        return pn.pane.Markdown(f"Showing the main run <code>{esc(run_id)}</code> only (not "
                                f"<code>{esc(compare_run_id)}</code>): the panels are one run's variants."
                                if compare_run_id and run_id else "", css_classes=["wbc-map-main-only"])

    @staticmethod
    def intro(method):
        return pn.pane.Markdown(
            "### Where each model puts the test images\nEach point is a test image, placed by the model's "
            f"penultimate features ({METHOD_WORDS[method]}; one panel per variant, laid out once and cached in the "
            "run). Colour: true class. A cross: the model is wrong. Select with the lasso or box on any panel.",
            css_classes=["wbc-map-intro"])

    def render(self):
        run_id = self.state.run_id
        if not run_id:
            return no_run()
        models = map_models(self.state.run_dir(run_id))
        if self.model not in models.values():
            with param.discard_events(self):  # another run: its first model, without drawing twice
                self.model = next(iter(models.values()), "")
        picker = pn.widgets.Select.from_param(self.param.model, name="Seed and image size", options=models,
                                              width=220, css_classes=["wbc-map-model"]) if len(models) > 1 else None
        return pn.Column(*([picker] if picker else []), pn.panel(self._stream, sizing_mode="stretch_width"),
                         sizing_mode="stretch_width")

    async def _stream(self):
        """A spinner while the map is laid out off the UI thread (t-SNE: seconds per variant), then the map."""
        rd, method = self.state.run_dir(self.state.run_id), self.method
        seed, size = (int(v) for v in self.model.split("/")) if self.model else (None, None)
        yield pn.Row(pn.indicators.LoadingSpinner(value=True, size=24, align="center"),
                     pn.pane.Markdown(f"Laying out the map ({METHOD_WORDS[method]} of every test image, once per "
                                      "run)...", align="center"), css_classes=["wbc-map-wait"])
        try:
            wide, variants = await asyncio.to_thread(embedding_map_frame, rd, method, seed, size)
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
        width = max(300, min(440, 1100 // max(len(variants), 1)))  # every panel on a 1,280 px screen
        # side by side where they fit, one under the other in a narrower window (not past its right edge)
        plots = pn.FlexBox(*[pn.pane.Bokeh(self.panel_figure(source, i, v, width)) for i, v in enumerate(variants)],
                           flex_wrap="wrap", css_classes=["wbc-map-plots"], sizing_mode="stretch_width")
        which = pn.pane.Markdown(f"Seed {int(wide['seed'].iloc[0])}, {int(wide['image_size'].iloc[0])} px: "
                                 f"{len(wide)} test images.", css_classes=["wbc-map-which"]) if len(wide) else None
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
            items = gallery_items(cards, runs_dir=self.state.runs_dir, label_variant=False)
            for it, (_, r) in zip(items, cards.iterrows()):
                it["probs"] = verdict_lines(r, variants)
            gallery.items = items
            why.objects = []

        def on_card(e):
            if e.new is not None and 0 <= e.new < len(shown):
                why.objects = [pn.pane.Markdown(f"**{esc(shown[e.new]['image_id'])}**", css_classes=["wbc-map-why-id"]),
                               why_view(run_dir, shown[e.new])]

        source.selected.on_change("indices", on_select)
        gallery.param.watch(on_card, "selected")
        legend = " ".join(f"<span style='color:{CLASS_COLORS[c]}'>\u25cf</span> {esc(c)}" for c in CLASSES)
        return pn.Column(*([which] if which else []),
                         pn.pane.HTML(f"<div style='font-size:13px'>{legend} &nbsp; \u2715 wrong</div>"), plots,
                         summary, why, gallery, sizing_mode="stretch_width")

    @staticmethod
    def panel_figure(source, i: int, variant: str, width: int = 440):
        from bokeh.models import BoxSelectTool, HoverTool, LassoSelectTool
        from bokeh.plotting import figure

        # The lasso selects once, on release: Bokeh's default sends every mouse move to the server, and each one
        # rebuilt the gallery (its cards, thumbnails and digests) for a selection about to change again.
        lasso = LassoSelectTool(continuous=False)
        f = figure(title=canvas_text(variant), width=width, height=width * 10 // 11,
                   tools=[lasso, BoxSelectTool(), "wheel_zoom", "pan", "reset"], active_drag=lasso, toolbar_location="above")
        f.scatter(x=f"x_{i}", y=f"y_{i}", source=source, color="color", marker=f"marker_{i}", size=f"size_{i}",
                  line_width=2, alpha=0.85, nonselection_alpha=0.12)
        f.add_tools(HoverTool(tooltips=[("image", "@image_id"), ("true", "@true_label"), ("said", f"@pred_{i}")]))
        f.axis.visible = False
        f.grid.visible = False
        return f
