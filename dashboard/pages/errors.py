"""Misclassification browser: filter by variant, true / predicted class and confidence; thumbnails of the
original and the enhanced image side by side; a click on a card shows both larger with the probabilities."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import panel as pn

from core.config import CLASSES, PROB_COLUMNS

from dashboard.data import LARGE_SIZE, load_table, run_variants, thumbnail_uri, warm_thumbnails
from dashboard.gallery import Gallery, gallery_items, region_of_row
from dashboard.pages.common import run_banner, warnings_alert, warnings_md
from dashboard.safe import esc
from dashboard.state import ANY

PAGE_SIZE = 24


def load_errors(state, run_id) -> tuple[pd.DataFrame, list]:
    rd = state.run_dir(run_id)
    df, w = load_table(rd, "misclassified")
    ws = [w]
    if df.empty:
        pred, w2 = load_table(rd, "predictions")
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
    pred, _ = load_table(state.run_dir(run_id), "predictions")
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


def detail_view(row: dict, runs_dir) -> pn.viewable.Viewable:
    def big(path, label, box=None):
        uri = thumbnail_uri(path, size=LARGE_SIZE, runs_dir=runs_dir, box=box) if path else None
        img = (f'<img src="{uri}" style="width:{LARGE_SIZE}px;height:{LARGE_SIZE * 3 // 4}px;object-fit:contain;'
               f'background:#eee">' if uri
               else '<div style="color:#999">not available</div>')
        return pn.pane.HTML(f"<div style='margin-right:12px'><b>{esc(label)}</b><br>{img}</div>",
                            css_classes=["wbc-large"])

    probs = "".join(
        f"<tr><td>{c}</td><td><div style='background:#4c78a8;height:10px;width:{int(200 * float(row[p]))}px'></div></td>"
        f"<td>{float(row[p]):.3f}</td></tr>" for c, p in zip(CLASSES, PROB_COLUMNS) if p in row)
    info = pn.pane.HTML(
        f"<b>{esc(row.get('image_id'))}</b><br>variant <b>{esc(row['variant'])}</b>, "
        f"seed {esc(row['seed'])}, size {esc(row['image_size'])}<br>true <b>{esc(row['true_label'])}</b>, predicted "
        f"<b>{esc(row['pred_label'])}</b><table>{probs}</table>", css_classes=["wbc-detail-info"])
    box = region_of_row(row)
    region = "" if box is None else ", the region the model saw"
    imgs = [big(row.get("path"), f"original{region}", box)]
    if isinstance(row.get("enhanced_path"), str):
        imgs.append(big(row.get("enhanced_path"), f"enhanced ({row.get('enhanced_from') or row['variant']}){region}"))
    return pn.Row(*imgs, info)


def view(state) -> pn.viewable.Viewable:
    variant = pn.widgets.Select(name="Variant", options=[ANY], value=ANY, width=200, css_classes=["wbc-f-variant"])
    true_w = pn.widgets.Select.from_param(state.param.true_label, name="True class", width=160,
                                          css_classes=["wbc-f-true"])
    pred_w = pn.widgets.Select.from_param(state.param.pred_label, name="Predicted class", width=160,
                                          css_classes=["wbc-f-pred"])
    conf_w = pn.widgets.RangeSlider.from_param(state.param.confidence, name="Confidence (max probability)",
                                               step=0.01, width=240, css_classes=["wbc-f-conf"])
    reset = pn.widgets.Button(name="Clear filters", width=110, css_classes=["wbc-f-reset"])
    page = pn.widgets.IntInput(name="Page", value=1, start=1, width=90, css_classes=["wbc-f-page"])
    count = pn.pane.Markdown("", css_classes=["wbc-error-count"])
    warn = warnings_alert([])
    gallery = Gallery(sizing_mode="stretch_width", css_classes=["wbc-gallery-pane"], min_height=120)
    detail = pn.Column(sizing_mode="stretch_width", css_classes=["wbc-detail"])
    banner = pn.Column(sizing_mode="stretch_width")  # says so when the run is running, failed or cancelled
    cache = {"dirty": False, "run": None, "df": pd.DataFrame(), "rows": pd.DataFrame(), "key": None}

    def load(*_):
        if state.page != "Errors" and cache["run"] is not None:
            cache["dirty"] = True  # re-read when the page is shown
            return
        cache["dirty"] = False
        rid = state.run_id
        df, ws = load_errors(state, rid) if rid else (pd.DataFrame(), [])
        cache.update(run=rid, df=df)
        warn.object = warnings_md(ws)
        warn.visible = any(ws)
        b, _ = run_banner(state, rid)
        banner.objects = [b] if b is not None else []
        variants = run_variants(state.run_dir(rid)) if rid else []
        if not df.empty:
            variants = [v for v in variants if v in set(df["variant"])] or sorted(df["variant"].astype(str).unique())
        variant.options = [ANY, *variants]
        if state.variant not in variant.options:
            state.variant = ANY
        variant.value = state.variant
        if not df.empty:
            first = df.sort_values("confidence", ascending=False, kind="stable")  # the gallery's order
            warm_thumbnails([p for pair in zip(first["path"], first["enhanced_path"]) for p in pair],
                            runs_dir=state.runs_dir)
        update()

    def update(*_):
        t0 = time.perf_counter()
        df = cache["df"]
        if not state.run_id:
            count.object = "Choose a run on the **Runs** page."
            gallery.items = []
            return
        rows = filter_errors(df, state.variant, state.true_label, state.pred_label, state.confidence)
        cache["rows"] = rows
        n_pages = max(1, int(np.ceil(len(rows) / PAGE_SIZE)))
        page.end = n_pages
        if page.value > n_pages:
            page.value = 1
        start = (page.value - 1) * PAGE_SIZE
        shown = rows.iloc[start:start + PAGE_SIZE]
        cache["shown"] = shown
        gallery.items = gallery_items(shown, runs_dir=state.runs_dir)
        count.object = (f"**{len(rows)}** misclassified image(s) match (of {len(df)}); page {page.value}/{n_pages}"
                        f" <span style='color:#999'>({1000 * (time.perf_counter() - t0):.0f} ms)</span>")
        detail.objects = []

    def on_variant(e):
        state.variant = e.new

    def on_state_variant(e):
        if e.new in variant.options:
            variant.value = e.new

    def on_page(e):
        if e.new == "Errors" and cache.get("dirty"):
            load()

    def on_filter(*_):
        if state.page != "Errors" and cache["run"] is not None:
            cache["dirty"] = True
            return
        if page.value != 1:
            page.value = 1  # triggers update
        else:
            update()

    def on_click(e):
        if e.new is None or e.new < 0:
            return
        shown = cache.get("shown")
        if shown is not None and e.new < len(shown):
            detail.objects = [pn.pane.Markdown("#### Larger view"), detail_view(shown.iloc[e.new].to_dict(), state.runs_dir)]

    variant.param.watch(on_variant, "value")
    state.param.watch(on_state_variant, "variant")
    state.param.watch(load, ["run_id", "refresh"])
    state.param.watch(on_page, "page")
    state.param.watch(on_filter, ["variant", "true_label", "pred_label", "confidence"])
    page.param.watch(update, "value")
    gallery.param.watch(on_click, "selected")
    reset.on_click(lambda e: state.param.update(variant=ANY, true_label=ANY, pred_label=ANY, confidence=(0.0, 1.0)))
    load()
    filters = pn.Row(variant, true_w, pred_w, conf_w, page, reset, sizing_mode="stretch_width",
                     css_classes=["wbc-filters"])
    return pn.Column(filters, banner, warn, count, detail, gallery, sizing_mode="stretch_width",
                     css_classes=["wbc-page-errors"])
