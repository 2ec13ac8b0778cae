"""A study report a colleague can open without our software: ``wbc report RUN --html FILE`` (one self-contained
file: tables, inline images, Bokeh plots with their JavaScript inlined) or ``--format md``.

Sections: the run and its caveats, the replication scorecard, accuracy with CIs and the paired test, the
per-class tables in the layout of the paper's Tables 3-6, the confusion matrices, training curves, the
eosinophil/neutrophil verdict flips with thumbnails (and Grad-CAM where ``wbc explain`` made it), provenance.
A report is a list of blocks (:class:`Block`) rendered to HTML or Markdown, so both say the same.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from core.config import CLASS_ABBR
from core.data import run_copies_words
from core.fsio import read_within, real_folder
from core.metrics import METRICS, confusion_counts, RIGHT_TO_WRONG, WRONG_TO_RIGHT, paper_table, per_class, verdict_pairs
from core.regions import BOX_COLUMNS
from core.store import Metric, Run, StatKind, Table

EOS, NEU = "eosinophil", "neutrophil"
FLIP_THUMBS = 12  # thumbnails per flip direction


@dataclass(frozen=True)
class Block:
    kind: str  # "h1" | "h2" | "p" | "table" | "images" | "bokeh"
    text: str = ""
    table: pd.DataFrame | None = None
    images: tuple = ()  # (bytes, mime, caption)
    plot: object = None  # a Bokeh model (HTML only)


# --------------------------------------------------------------------------------------------- sections
def report_blocks(run: Run, read=None) -> list[Block]:
    """The report's blocks. ``read(path) -> bytes``: how a test image named by the run's tables is read for a
    thumbnail (the dashboard passes its checked reader, which refuses files outside its image roots; None reads
    any image file the run names, as ``wbc report`` on one's own store does). Grad-CAM images are read only from
    the run's own ``explain/`` folder, always, checked on the open file (``core.fsio.read_within``)."""
    info = run.info
    blocks = [Block("h1", f"White-blood-cell super-resolution study: run {run.run_id}"), *_about(run, info)]
    for section in (_scorecard, _accuracy, _per_class, _confusions, _curves):
        blocks += section(run)
    return blocks + _flips(run, read) + _provenance(info)


def _about(run: Run, info) -> list[Block]:
    cfg = info.config
    lines = [f"Status {run.status()}; preset {info.preset}; classifier {cfg.get('classifier')} "
             f"({cfg.get('pretrained')}); variants {', '.join(info.variants)}; input policy "
             f"{cfg.get('input_policy', 'full')}; validation split {cfg.get('split')}; seeds {cfg.get('seeds')}; "
             f"image sizes {cfg.get('image_sizes')}; test set {info.test_source}; "
             f"{info.duration_s if info.duration_s is not None else '?'} s on {info.device}; created {info.created_at}."]
    notes = list(info.raw.get("notes") or cfg.get("notes") or [])
    copies = [f"{'Warning' if level == 'warning' else 'Note'}: {text}" for level, text in run_copies_words(info.data)]
    return [Block("p", lines[0])] + [Block("p", f"Note: {n}") for n in notes] + [Block("p", c) for c in copies]


def _scorecard(run: Run) -> list[Block]:
    from core.groups import leakage_words
    from core.scorecard import (NO_CI_WORDS, PAPER_CITATION, REFIT_WORDS, AccuracySource, fallback_predictions,
                                scorecard, scorecard_text)

    stats = run.table(Table.STATS)
    card = scorecard(run.table(Table.VALIDATION), stats, run.info.test_source, fallback_predictions(run, stats))
    if card.empty:
        return [Block("h2", "Replication scorecard"), Block("p", scorecard_text(card))]
    shown = card[["variant", "image_size", "paper_val_accuracy", "val_accuracy", "val_split", "n_val",
                  "test_accuracy", "test_ci_low", "test_ci_high", "seeds", "test_seeds"]
                 + (["refit"] if card["refit"].any() else [])]
    words = ("The validation split is random, so it is leaky (near-copies of training cells in it), like the "
             "paper's: read the test columns." if card["val_leaky"].any() else
             "Validation is grouped: no source cell is on both sides.")
    leak = leakage_words(run.info.data.get("leakage"))
    words += f" Leakage check of the validation split: {leak}" if leak else ""
    if (card["test_from"] == AccuracySource.PREDICTIONS).any():
        words += f" Test accuracy from the predictions ({NO_CI_WORDS})."
    if card["refit"].any():
        words += f" {REFIT_WORDS}"
    return [Block("h2", "Replication scorecard"), Block("p", f"Paper's figures: {PAPER_CITATION}. {words}"),
            Block("table", table=shown.round(3))]


def _accuracy(run: Run) -> list[Block]:
    from core.stats import model_summary, summary_text

    stats = run.table(Table.STATS)
    if stats.empty:
        return []
    rows = []
    for m in (Metric.ACCURACY, Metric.MACRO_F1, Metric.BALANCED_ACCURACY):
        s = model_summary(stats, m)
        rows += [{"metric": str(m), "variant": r.variant, "image size": r.image_size, "estimate": r.estimate,
                  "95% CI": f"[{r.ci_low:.3f}, {r.ci_high:.3f}]" if r.ci_low == r.ci_low else "",
                  "seeds": r.n_seeds} for r in s.itertuples()]
    paired = model_summary(stats, Metric.ACCURACY_DIFF, kind=StatKind.PAIRED)
    return [Block("h2", "Accuracy on the test set, with 95% CIs"), Block("table", table=pd.DataFrame(rows).round(4)),
            Block("h2", "Difference between variants (paired, same test images)"),
            Block("table", table=_points(paired)) if len(paired) else Block("p", "One variant."),
            *[Block("p", line) for line in summary_text(stats).splitlines() if line.strip()]]


def _points(paired: pd.DataFrame) -> pd.DataFrame:
    """The paired differences in percentage points (as the summary lines below the table say), one decimal."""
    out = paired.drop(columns=["sd"]).rename(columns={"estimate": "difference (points)", "ci_low": "CI low (points)",
                                                      "ci_high": "CI high (points)"})
    for c in ("difference (points)", "CI low (points)", "CI high (points)"):
        out[c] = (100 * out[c]).round(1)
    return out.round(4)


def _per_class(run: Run) -> list[Block]:
    """Per-class precision / recall / F1 / support per variant (mean over seeds), as in the paper's Tables 3-4."""
    m = per_class(run.table(Table.METRICS), run.info.variants)
    if m.empty:
        return []
    return [Block("h2", "Per-class metrics (mean over seeds; the paper's Tables 3-4)"),
            Block("table", table=paper_table(m, values=(*METRICS, "support")))]


def _confusions(run: Run) -> list[Block]:
    c = run.table(Table.CONFUSION)
    if c.empty:
        return []
    out = [Block("h2", "Confusion matrices (rows: true class, columns: predicted; summed over seeds; Tables 5-6)")]
    for v in c["variant"].drop_duplicates():
        cm = confusion_counts(c, pd.DataFrame(), v)
        cm.index = [CLASS_ABBR[x] for x in cm.index]
        cm.columns = [CLASS_ABBR[x] for x in cm.columns]
        out += [Block("p", f"{v}"), Block("table", table=cm.rename_axis("true \\ predicted").reset_index())]
    return out


def _curves(run: Run) -> list[Block]:
    h = run.table(Table.HISTORY)
    if h.empty:
        return []
    from bokeh.layouts import row
    from bokeh.palettes import Category10_10
    from bokeh.plotting import figure

    h = h.groupby(["variant", "epoch"], sort=False)[["train_loss", "val_loss", "train_acc", "val_acc"]].mean()
    figs = []
    for what in ("loss", "acc"):
        f = figure(width=460, height=300, title=f"{'loss' if what == 'loss' else 'accuracy'} (dashed: validation)",
                   x_axis_label="epoch")
        for i, (v, g) in enumerate(h.groupby(level=0, sort=False)):
            ep = g.index.get_level_values(1)
            colour = Category10_10[i % 10]
            f.line(ep, g[f"train_{what}"], color=colour, legend_label=f"{v} train")
            f.line(ep, g[f"val_{what}"], color=colour, line_dash="dashed", legend_label=f"{v} val")
        f.legend.location = "top_right" if what == "loss" else "bottom_right"
        figs.append(f)
    table = h.reset_index().round(4)
    return [Block("h2", "Training curves (mean over seeds)"), Block("bokeh", plot=row(*figs)),
            Block("table", table=table)]


def _flips(run: Run, read=None) -> list[Block]:
    """Eosinophils and neutrophils whose verdict flips between the baseline and each other variant."""
    pred = run.table(Table.PREDICTIONS)
    variants = [v for v in run.info.variants if v in set(pred["variant"])]
    if len(variants) < 2:
        return []
    cams = run.table(Table.EXPLAIN)
    out = [Block("h2", "Eosinophil / neutrophil verdict flips")]
    for other in variants[1:]:
        j = verdict_pairs(pred, variants[0], other, ["path", "true_label", "pred_label", *BOX_COLUMNS], ["pred_label"])
        j = j[j["true_label"].isin([EOS, NEU])]
        for right_in, g in ((variants[0], j[j["moved"] == RIGHT_TO_WRONG]), (other, j[j["moved"] == WRONG_TO_RIGHT])):
            wrong_in = other if right_in == variants[0] else variants[0]
            out.append(Block("p", f"Right with {right_in}, wrong with {wrong_in}: {len(g)} image(s)"
                                  + (f" (first {FLIP_THUMBS} shown)" if len(g) > FLIP_THUMBS else "")
                                  + (f"; captions: true class, prediction with {variants[0]} -> with {other}"
                                     if len(g) else "")))
            if len(g):
                out.append(Block("images", images=tuple(_flip_images(g.head(FLIP_THUMBS), other, cams,
                                                                     run.path / "explain", read))))
    return out


def _flip_images(g: pd.DataFrame, other: str, cams: pd.DataFrame, cam_dir: Path, read=None) -> list[tuple]:
    """Thumbnails (and Grad-CAM overlays) of flipped images. The tables are untrusted: an image path ``read``
    refuses, or a Grad-CAM path outside ``cam_dir``, is left out. Without ``read`` any regular file up to
    core.fsio's size limit is read (never a device or FIFO); ``cam_dir`` counts only if it is a real folder, not a
    link that would make another folder the run's own."""
    read = read or (lambda path: read_within(path, [Path("/").resolve()]))
    out, cam_roots = [], [root] if (root := real_folder(cam_dir)) else []
    for r in g.to_dict("records"):
        cap = (f"{r['image_id'].split('/')[-1]}: true {CLASS_ABBR[r['true_label']]}, "
               f"{CLASS_ABBR[r['pred_label_base']]} -> {CLASS_ABBR[r['pred_label_other']]}")
        thumb = _thumb(_read_or_none(read, r["path"]), tuple(r[c] for c in BOX_COLUMNS))
        if thumb:
            out.append((thumb, "image/jpeg", cap))
        cam = cams[(cams["image_id"] == r["image_id"]) & (cams["variant"] == other) & (cams["role"] == "pred")]
        png = _read_or_none(lambda p: read_within(p, cam_roots), cam["cam_path"].iloc[0]) if len(cam) else None
        if png is not None:
            out.append((png, "image/png", f"Grad-CAM, {other}"))
    return out


def _read_or_none(read, path) -> bytes | None:
    """``read(path)``, or None when the file is refused (core.fsio.NotAllowed), missing or not a path."""
    try:
        return read(path)
    except (OSError, ValueError, TypeError):
        return None


def _thumb(data: bytes | None, box, size: int = 128) -> bytes | None:
    from PIL import Image

    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if all(pd.notna(b) for b in box):
                im = im.crop(tuple(int(b) for b in box))
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=85)
            return buf.getvalue()
    except (OSError, ValueError):
        return None


def _provenance(info) -> list[Block]:
    rows = [{"variant": v, "source": p.get("source") or p.get("method") or "", "sha256": str(p.get("sha256") or "")[:16],
             "precision": p.get("precision") or "", "device": p.get("device") or ""}
            for v, p in ((info.weights.get("enhancers") or {}).items())]
    clf = info.weights.get("classifier") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (info.raw.get("versions") or {}).items())
    return [Block("h2", "Provenance"), Block("table", table=pd.DataFrame(rows)) if rows else Block("p", "-"),
            Block("p", f"Classifier weights: {clf.get('source', '?')} {str(clf.get('sha256') or '')[:16]}"),
            Block("p", f"Versions: {versions or '-'}")]


# --------------------------------------------------------------------------------------------- renderers
_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:24px auto;color:#222}table{border-collapse:collapse;"
        "margin:8px 0 16px;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
        "th{background:#f3f0f8}figure{display:inline-block;margin:0 8px 8px 0;font-size:11px;width:140px}"
        "h1{color:#5b3a8c}")


def to_html(blocks: list[Block]) -> str:
    """One self-contained HTML document: images inline, Bokeh's JavaScript inline (opens offline)."""
    from bokeh.embed import components
    from bokeh.resources import INLINE

    plots = [b.plot for b in blocks if b.kind == "bokeh"]
    script, divs = components(plots) if plots else ("", [])
    divs, body = list(divs), []
    for b in blocks:
        if b.kind in ("h1", "h2", "p"):
            body.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "table":
            body.append(b.table.to_html(index=False, na_rep="", escape=True, border=0))
        elif b.kind == "images":
            body += [f"<figure><img src='data:{mime};base64,{base64.b64encode(data).decode()}' width='128'>"
                     f"<figcaption>{html.escape(cap)}</figcaption></figure>" for data, mime, cap in b.images]
        elif b.kind == "bokeh":
            body.append(divs.pop(0))
    head = f"<meta charset='utf-8'><title>{html.escape(blocks[0].text)}</title><style>{_CSS}</style>"
    # Bokeh's code, inline. Only the inline code: a server process that imported Panel also lists Panel's
    # extension files, which a file opened on its own could not load and does not need.
    js = "".join(f"<script>{code}</script>" for code in INLINE.js_raw) if plots else ""
    return (f"<!DOCTYPE html><html><head>{head}{js}{script}</head><body>"
            + "\n".join(body) + "</body></html>")


def to_markdown(blocks: list[Block]) -> str:
    """Markdown for papers and notebooks: the same sections; images and plots are left to the HTML report."""
    out = []
    for b in blocks:  # names read from disk are text: markup in them (<script>, a file named so) is escaped
        if b.kind == "h1":
            out.append(f"# {_md(b.text)}")
        elif b.kind == "h2":
            out.append(f"## {_md(b.text)}")
        elif b.kind == "p":
            out.append(_md(b.text))
        elif b.kind == "table":
            out.append(_md_table(b.table))
        elif b.kind == "images":
            out.append(_md("; ".join(cap for _, _, cap in b.images) + " (images: see the HTML report)"))
    return "\n\n".join(out) + "\n"


def _md(text: str) -> str:
    """Text for Markdown that no renderer turns into HTML or a link: one line per paragraph, ``& < >`` escaped, and
    ``\\ [ ]`` backslash-escaped (a stored ``[x](javascript:...)`` stays text)."""
    text = html.escape(" ".join(str(text).split("\n")), quote=False)
    return text.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")


def _md_table(df: pd.DataFrame) -> str:
    cells = [[_md("" if pd.isna(v) else str(v)).replace("|", "\\|") for v in row] for row in df.itertuples(index=False)]
    head = [_md(str(c)).replace("|", "\\|") for c in df.columns]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(r) + " |" for r in cells])
