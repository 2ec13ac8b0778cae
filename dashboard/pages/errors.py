"""Misclassification browser: filter by variant, true / predicted class and confidence; thumbnails of the
original and the enhanced image side by side; a click on a card shows both larger with the probabilities."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import panel as pn
import param

from core.config import CLASSES, PROB_COLUMNS
from core.store import Table

from dashboard.data import LARGE_SIZE, load_table, run_variants, thumbnail_uri, warm_thumbnails
from dashboard.gallery import Gallery, gallery_items, region_of_row
from dashboard.pages.base import Page
from dashboard.pages.common import (enhanced_gone_warning, outside_roots_warning, run_banner, warnings_alert, warnings_md,
                                    why_view)
from dashboard.safe import esc
from dashboard.state import ANY

PAGE_SIZE = 24


def load_errors(state, run_id) -> tuple[pd.DataFrame, list]:
    rd = state.run_dir(run_id)
    df, w = load_table(rd, Table.MISCLASSIFIED)
    ws = [w]
    if df.empty:
        pred, w2 = load_table(rd, Table.PREDICTIONS)
        ws.append(w2)
        if not pred.empty:
            df = pred[~pred["correct"].astype(bool)]
    return with_enhanced_counterpart(state, run_id, df), ws


def with_enhanced_counterpart(state, run_id, df: pd.DataFrame) -> pd.DataFrame:
    """For rows of the un-enhanced variant, the enhanced version of the same image from another variant
    (so every card shows original and enhanced side by side); ``enhanced_from`` names that variant."""
    if df.empty or "enhanced_path" not in df.columns:
        return df
    missing = df["enhanced_path"].isna()
    df = df.assign(enhanced_from=np.where(missing, None, df["variant"].astype(str)))
    if not missing.any():
        return df
    pred, _ = load_table(state.run_dir(run_id), Table.PREDICTIONS)
    if pred.empty:
        return df
    enh = pred.loc[pred["enhanced_path"].notna(), ["image_id", "variant", "enhanced_path"]] \
        .drop_duplicates("image_id").set_index("image_id")
    ids = df.loc[missing, "image_id"]
    df.loc[missing, "enhanced_path"] = ids.map(enh["enhanced_path"]).to_numpy()
    df.loc[missing, "enhanced_from"] = ids.map(enh["variant"].astype(str)).to_numpy()
    return df


def filter_errors(df: pd.DataFrame, variant, true_label, pred_label, conf) -> pd.DataFrame:
    if df.empty:
        return df
    mask = np.ones(len(df), dtype=bool)
    if variant and variant != ANY:
        mask &= (df["variant"] == variant).to_numpy()
    if true_label and true_label != ANY:
        mask &= (df["true_label"] == true_label).to_numpy()
    if pred_label and pred_label != ANY:
        mask &= (df["pred_label"] == pred_label).to_numpy()
    lo, hi = conf
    c = df["confidence"].to_numpy()
    mask &= (c >= lo - 1e-9) & (c <= hi + 1e-9)
    return df[mask].sort_values("confidence", ascending=False, kind="stable")


SHOWN = 336  # px the larger view shows each image at (made at LARGE_SIZE): two images and the scores fit at 1400 px


def detail_view(row: dict, runs_dir, run_dir=None) -> pn.viewable.Viewable:
    def big(path, label, box=None):
        uri = thumbnail_uri(path, size=LARGE_SIZE, runs_dir=runs_dir, box=box) if path else None
        img = (f'<img src="{uri}" style="width:{SHOWN}px;height:{SHOWN * 3 // 4}px;object-fit:contain;'
               f'background:#eee">' if uri
               else '<div style="color:#999">not available</div>')
        return pn.pane.HTML(f"<div style='margin-right:12px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis'>"
                            f"<b>{esc(label)}</b><br>{img}</div>", css_classes=["wbc-large"], width=SHOWN + 12)

    probs = "".join(
        f"<tr><td>{c}</td><td><div style='background:#4c78a8;height:10px;width:{int(100 * float(row[p]))}px'></div></td>"
        f"<td>{float(row[p]):.3f}</td></tr>" for c, p in zip(CLASSES, PROB_COLUMNS) if p in row)
    info = pn.pane.HTML(
        f"<b>{esc(row.get('image_id'))}</b><br>variant <b>{esc(row['variant'])}</b>, "
        f"seed {esc(row['seed'])}, size {esc(row['image_size'])}<br>true <b>{esc(row['true_label'])}</b>, predicted "
        f"<b>{esc(row['pred_label'])}</b><table>{probs}</table>", css_classes=["wbc-detail-info"], width=250)
    box = region_of_row(row)
    imgs = [big(row.get("path"), "original", box)]  # short captions: one line each, so the two images align
    if isinstance(row.get("enhanced_path"), str):
        imgs.append(big(row.get("enhanced_path"), f"enhanced ({row.get('enhanced_from') or row['variant']})"))
    if box is not None:
        info.object += "<p style='color:#666'>The images show the region the model saw.</p>"
    row_ = pn.FlexBox(*imgs, info, flex_wrap="wrap", sizing_mode="stretch_width")  # info below when narrow
    if run_dir is None:
        return row_
    why = pn.Column(sizing_mode="stretch_width")
    button = pn.widgets.Button(name="Why? Grad-CAM of every variant", width=260, css_classes=["wbc-why-button"])
    button.on_click(lambda e: setattr(why, "objects", [why_view(run_dir, row)]))
    return pn.Column(row_, button, why, sizing_mode="stretch_width")


class ErrorsPage(Page):
    """The browser's filters live in the shared state (the Confusion page sets them); the page number here."""

    title = "Errors"
    css = "wbc-page-errors"
    # no bounds: a number typed outside 1..pages is brought back into range (and shown so), not silently refused
    page_number = param.Integer(default=1, doc="The gallery page shown.")

    def layout(self) -> list:
        st = self.state
        self.variant_w = pn.widgets.Select(name="Variant", options=[ANY], value=ANY, width=180,
                                           css_classes=["wbc-f-variant"])
        filters = pn.FlexBox(  # wraps onto a second line in a narrow window instead of running off the edge
            self.variant_w,
            pn.widgets.Select.from_param(st.param.true_label, name="True class", width=160, css_classes=["wbc-f-true"]),
            pn.widgets.Select.from_param(st.param.pred_label, name="Predicted class", width=160,
                                         css_classes=["wbc-f-pred"]),
            pn.widgets.RangeSlider.from_param(st.param.confidence, name="Confidence (max probability)", step=0.01,
                                              width=220, css_classes=["wbc-f-conf"]),
            self._page_widget(), self._reset_button(), flex_wrap="wrap", align_items="flex-end",
            sizing_mode="stretch_width", css_classes=["wbc-filters"])
        self.count = pn.pane.Markdown("", css_classes=["wbc-error-count"])
        self.warn = warnings_alert([])
        self.gallery = Gallery(sizing_mode="stretch_width", css_classes=["wbc-gallery-pane"], min_height=120)
        self.detail = pn.Column(sizing_mode="stretch_width", css_classes=["wbc-detail"])
        self.banner = pn.Column(sizing_mode="stretch_width")  # says so when the run is running, failed or cancelled
        self.df, self.shown_rows = pd.DataFrame(), pd.DataFrame()
        self.variant_w.param.watch(lambda e: setattr(st, "variant", e.new), "value")
        st.param.watch(lambda e: setattr(self.variant_w, "value", e.new) if e.new in self.variant_w.options else None,
                       "variant")
        st.param.watch(lambda *_: self.when_shown(self.load), ["run_id", "refresh"])
        st.param.watch(lambda *_: self.when_shown(self.update), "compare_run_id")  # the count says whose errors
        st.param.watch(lambda *_: self.when_shown(self.first_page), ["variant", "true_label", "pred_label", "confidence"])
        self.param.watch(lambda *_: self.update(), "page_number")
        self.gallery.param.watch(self.on_click, "selected")
        self.load()
        return [filters, self.banner, self.warn, self.count, self.detail, self.gallery]

    def _page_widget(self):
        self.page_w = pn.widgets.IntInput.from_param(self.param.page_number, name="Page", width=90,
                                                     css_classes=["wbc-f-page"])
        return self.page_w

    def _reset_button(self):
        reset = pn.widgets.Button(name="Clear filters", width=110, css_classes=["wbc-f-reset"])
        reset.on_click(lambda e: self.state.param.update(variant=ANY, true_label=ANY, pred_label=ANY,
                                                         confidence=(0.0, 1.0)))
        return reset

    def load(self) -> None:
        """Read the run's errors, offer its variants, warm the first thumbnails, show page 1."""
        st, rid = self.state, self.state.run_id
        self.df, ws = load_errors(st, rid) if rid else (pd.DataFrame(), [])
        if "enhanced_path" in self.df:
            ws = [*ws, *enhanced_gone_warning(self.df["enhanced_path"])]
        if "path" in self.df:
            ws = [*ws, *outside_roots_warning(self.df["path"], st.runs_dir)]
        self.warn.object = warnings_md(ws)
        self.warn.visible = any(ws)
        b, _ = run_banner(st, rid)
        self.banner.objects = [b] if b is not None else []
        variants = run_variants(st.run_dir(rid)) if rid else []
        if not self.df.empty:
            present = set(self.df["variant"])
            variants = [v for v in variants if v in present] or sorted(self.df["variant"].astype(str).unique())
            first = self.df.sort_values("confidence", ascending=False, kind="stable")  # the gallery's order
            warm_thumbnails([p for pair in zip(first["path"], first["enhanced_path"]) for p in pair],
                            runs_dir=st.runs_dir)
        self.variant_w.options = [ANY, *variants]
        if st.variant not in self.variant_w.options:
            st.variant = ANY
        self.variant_w.value = st.variant
        self.update()

    def first_page(self) -> None:
        if self.page_number != 1:
            self.page_number = 1  # triggers update
        else:
            self.update()

    def update(self) -> None:
        t0 = time.perf_counter()
        st = self.state
        if not st.run_id:
            self.count.object = "Choose a run on the **Runs** page."
            self.gallery.items = []
            return
        rows = filter_errors(self.df, st.variant, st.true_label, st.pred_label, st.confidence)
        n_pages = max(1, int(np.ceil(len(rows) / PAGE_SIZE)))
        if not 1 <= self.page_number <= n_pages:
            self.page_number = min(max(self.page_number, 1), n_pages)  # triggers update with the page in range
            return
        start = (self.page_number - 1) * PAGE_SIZE
        self.shown_rows = rows.iloc[start:start + PAGE_SIZE]
        self.gallery.items = gallery_items(self.shown_rows, runs_dir=st.runs_dir)
        pair = "enhanced_path" in rows and rows["enhanced_path"].notna().any()  # cards show two images
        self.count.object = (f"**{len(rows)}** misclassified image(s) match (of {len(self.df)}); page "
                             f"{self.page_number}/{n_pages}" + ("; each card: original left, enhanced right" if pair
                                                                else "") + " <span style='color:#999'>"
                             f"({1000 * (time.perf_counter() - t0):.0f} ms)</span>"
                             + (f". Main run <code>{esc(st.run_id)}</code> only; to browse "
                                f"<code>{esc(st.compare_run_id)}</code>, make it the main run on Runs"
                                if st.compare_run_id and st.compare_run_id != st.run_id else ""))
        self.detail.objects = []

    def on_click(self, e) -> None:
        if e.new is not None and 0 <= e.new < len(self.shown_rows):
            self.detail.objects = [pn.pane.Markdown("#### Larger view"),
                                   detail_view(self.shown_rows.iloc[e.new].to_dict(), self.state.runs_dir,
                                               self.state.run_dir(self.state.run_id))]
