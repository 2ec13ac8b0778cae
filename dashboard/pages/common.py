"""Small helpers shared by the pages."""

from __future__ import annotations

import base64
import re

import pandas as pd
import panel as pn

from core.config import CLASS_ABBR
from core.progress import fmt_duration
from core.store import LIVE_STATUSES, RESUMABLE_STATUSES, Progress, Status
from dashboard.data import cam_maps, run_state
from dashboard.safe import as_float, esc


# One colour per variant on every page (bars, curves), so a variant is recognised at a glance.
VARIANT_COLORS = {"original": "#4c78a8", "realesrgan-x4plus": "#e45756", "realesr-animevideov3": "#f58518",
                  "realesrgan-x4plus-anime": "#b279a2", "realesr-general-x4v3": "#9d755d", "bicubic-x4": "#54a24b",
                  "lanczos-x4": "#72b7b2"}
_SPARE = ["#eeca3b", "#ff9da6", "#bab0ac", "#17becf", "#8c564b"]


def ab(label) -> str:
    """A class's short name (EOS, LYM, MON, NEU), or the label as it is."""
    return CLASS_ABBR.get(str(label), str(label))


def variant_color(variant: str) -> str:
    import zlib

    return VARIANT_COLORS.get(str(variant)) or _SPARE[zlib.crc32(str(variant).encode()) % len(_SPARE)]


def variant_colors(variants) -> dict:
    return {v: variant_color(v) for v in variants}


def swatch(variant) -> str:
    """The variant's colour as a small square (HTML), as in the charts."""
    return (f'<span style="display:inline-block;width:11px;height:11px;background:{variant_color(variant)};'
            f'margin-right:5px;vertical-align:-1px"></span>')


def color_key(variants) -> pn.pane.HTML:
    """A legend line: a coloured square and the name of each variant."""
    spans = "".join(f'<span style="margin-right:14px">{swatch(v)}{esc(v)}</span>' for v in variants)
    return pn.pane.HTML(f'<div style="font-size:13px">{spans}</div>', css_classes=["wbc-color-key"])


def escaped_titles(df) -> dict:
    """Tabulator ``titles`` for a frame whose column names come from the data (Tabulator shows titles as HTML)."""
    return {c: esc(c) for c in df.columns}


# Long cells and column titles wrap, so that a table with many columns fits the page instead of scrolling sideways.
WRAP_CELLS = [".tabulator-cell { white-space: normal !important; overflow-wrap: break-word; }",
              ".tabulator-col-title { white-space: normal !important; overflow-wrap: break-word; }"]
MIN_COLUMN = 64  # px: a number such as "0.8451" fits on one line
# fitted_table's fixed column widths: a run id on one line, small numbers narrow; the other columns share the rest
_FIXED_WIDTHS = {"run": 190, "variant": 145, "test set": 110, "n": 55, "n_seeds": 70, "seeds": 65, "seed": 55,
                 "image_size": 64, "size px": 60, "sha256": 150}


def fitted_table(df, css: str, **kw) -> pn.widgets.Tabulator:
    """A read-only table whose columns share the page's width (no sideways scroll at 1400 px), long cells and
    titles wrapped (titles at spaces: image_size reads 'image size'). No column is narrower than a number such as
    0.8451 (``MIN_COLUMN``): in a narrow window the table scrolls sideways instead of breaking numbers and words
    letter by letter."""
    cols = list(getattr(df, "columns", ()))
    widths = {c: w for c, w in _FIXED_WIDTHS.items() if c in cols}
    widths.update(kw.pop("widths", {}))
    titles = {c: esc(str(c).replace("_", " ")) for c in cols}
    # each free column at least as wide as its longest word (title or cell): a word never breaks letter by letter
    # a number column's numbers and title sit right, whatever its formatter (Tabulator's "money" aligns left)
    right = {"hozAlign": "right", "headerHozAlign": "right"}
    floors = [{"field": str(c), **({} if c in widths else {"minWidth": min_width(c, df[c])}),
               **(right if pd.api.types.is_numeric_dtype(df[c]) else {})} for c in cols]
    return pn.widgets.Tabulator(df, show_index=False, disabled=True, sizing_mode="stretch_width", layout="fit_columns",
                                css_classes=[css], stylesheets=WRAP_CELLS + kw.pop("stylesheets", []),
                                widths=widths, titles={**titles, **kw.pop("titles", {})},
                                # a few rows: no sort arrows, whose room the wrapped titles need
                                configuration={"columnDefaults": {"headerSort": False, "minWidth": MIN_COLUMN},
                                               "columns": floors}, **kw)


_BREAKS = re.compile(r"[ \t\r\n]+")  # where a cell may wrap; a no-break space (an interval) does not
_TITLE_BREAKS = re.compile(r"[ \t\r\n]+|(?<=[A-Za-z]-)")  # a title also wraps after a word's hyphen ('group-bootstrap')
CELL_CHAR_PX, TITLE_CHAR_PX, PAD_PX, MAX_FLOOR = 6.6, 7.5, 12, 200  # measured: 14 px Tabulator fonts, 4 px padding (titles bold)


def min_width(column, values) -> int:
    """The px a column needs so that its longest word, in the title or a cell, stays on one line (at least
    ``MIN_COLUMN``, at most ``MAX_FLOOR``: a longer word, such as a path, still wraps). Numbers are shown
    rounded, so they take ``MIN_COLUMN``."""
    title = max((len(w) + sum(ch.isupper() for ch in w) for w in  # a bold capital: about two letters wide
                 _TITLE_BREAKS.split(str(column).replace("_", " "))), default=0)
    cells = 0
    if not pd.api.types.is_float_dtype(values):
        cells = max((len(w) for v in values if not _blank(v) for w in _BREAKS.split(str(v))), default=0)
    return int(min(MAX_FLOOR, max(MIN_COLUMN, title * TITLE_CHAR_PX + PAD_PX, cells * CELL_CHAR_PX + PAD_PX)))


def _blank(v) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):  # a list or an array read from disk: shown as text
        return False


def interval(lo: str, hi: str) -> str:
    """A confidence interval's two formatted ends as '[lo, hi]', joined by a no-break space: it never wraps inside
    its cell (at the space it did, '[0.754,' over '0.925]'), and fitted_table counts it as one word."""
    return f"[{lo},\u00a0{hi}]"


def warnings_md(warnings) -> str:
    """A Markdown list of the warnings (they name run folders and quote errors: escaped)."""
    return "\n".join(f"* {esc(w)}" for w in warnings if w)


def warnings_alert(warnings) -> pn.pane.Alert:
    ws = [w for w in warnings if w]
    return pn.pane.Alert(warnings_md(ws), alert_type="warning", visible=bool(ws),
                         css_classes=["wbc-warning"], sizing_mode="stretch_width")


def no_run() -> pn.pane.Markdown:
    return pn.pane.Markdown("Choose a run on the **Runs** page (or in the sidebar).", css_classes=["wbc-norun"])


def fmt_p(p) -> str:
    p = as_float(p)
    if p is None:
        return ""
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"


def fmt_eta(s) -> str:
    """Seconds as '2 min 05 s' / '45 s'; '—' when unknown (core.progress.fmt_duration)."""
    return fmt_duration(s)


def progress_summary(prog: Progress, default: str = "starting") -> str:
    """What a run's progress says it is doing, escaped: 'enhancing with X, 39%'."""
    what = esc(prog.message or prog.stage or default)
    return what + (f", {prog.percent:.0f}%" if prog.percent is not None else "")


ENHANCED_GONE = ("this run's enhanced images are no longer on disk (its cache was cleared or moved). Run the study "
                 "again with the same --cache-dir to make them again.")


def enhanced_gone_warning(paths) -> list[str]:
    """[a warning] when enhanced images of the run's errors are missing from disk (they would show as grey boxes),
    else []. The count is of all the run's errors, not of the cards the filters leave: it says so."""
    from pathlib import Path

    wanted = {str(p) for p in paths if isinstance(p, str) and p}
    gone = sum(1 for p in wanted if not Path(p).is_file())
    return [f"{gone} of the {len(wanted)} enhanced images among the errors of this run (before any filter) show as grey "
            f"boxes: {ENHANCED_GONE}"] if gone else []


def outside_roots_warning(paths, runs_dir) -> list[str]:
    """[a warning] when images a page shows are on disk but outside the folders the dashboard may read (a study run
    with ``--test-dir`` elsewhere): they show as grey boxes, and the warning says which folder to allow. Else []."""
    import os
    from pathlib import Path

    from dashboard.security import is_allowed_image

    wanted = sorted({str(p) for p in paths if isinstance(p, str) and p})
    refused = [p for p in wanted if Path(p).is_file() and not is_allowed_image(p, runs_dir)]
    if not refused:
        return []
    folders = sorted({str(Path(p).parent.parent) for p in refused})  # the test folder above the class folders
    shown = ", ".join(folders[:2]) + (f" and {len(folders) - 2} more" if len(folders) > 2 else "")
    return [f"{len(refused)} of {len(wanted)} original images show as grey boxes: they lie outside the folders this "
            f"dashboard may read ({shown}). To show them, start it with WBC_DATA_ROOTS naming that folder as well as "
            f"the data root (separated by '{os.pathsep}')."]


def run_banner(state, run_id) -> tuple[pn.pane.Alert | None, bool]:
    """(a banner for a run that is not finished, whether its results can be shown at all). A run whose process
    is gone is ``interrupted`` (core.store.effective_status): what it stored is shown."""
    if not run_id:
        return None, True
    status, prog, info = run_state(state.run_dir(run_id))
    if status == Status.FINISHED:
        return None, True
    rid = esc(run_id)
    if status in LIVE_STATUSES:
        eta = fmt_eta(prog.eta_s) if prog.eta_s else None
        text = (f"Run <code>{rid}</code> is {status}: {progress_summary(prog, status)}"
                # the percentage is of the whole run, the time of the step it is on (core.pipeline's eta_s)
                + (f"; this step: about {eta} left" if eta else "")
                + ". Its results appear here when it finishes (press Refresh on the Runs page).")
        return pn.pane.Alert(text, alert_type="info", css_classes=["wbc-run-banner"], sizing_mode="stretch_width"), False
    # a cancel's reason ('cancelled by user') reads on its own; a failure's keeps its type ('RuntimeError: ...')
    line = (info.error_message if status == Status.CANCELLED else info.error_line) if info else None
    err = esc((line or "")[:300])  # cut before escaping: no half entities
    resume = f" Continue it with <code>wbc study --resume {rid}</code>." if status in RESUMABLE_STATUSES else ""
    text = f"Run <code>{rid}</code> is {esc(status)}" + (f": {err}" if err else "") + \
        ". What it stored before stopping is shown below." + resume
    return pn.pane.Alert(text, alert_type="warning", css_classes=["wbc-run-banner"], sizing_mode="stretch_width"), True


def why_view(run_dir, row: dict) -> pn.viewable.Viewable:
    """Where each variant's model looked in this image, for the true and the predicted class (Grad-CAM)."""
    from core.explain import NoCheckpoint

    skipped: list[tuple[str, str]] = []  # a variant with no model, or its image not readable here: said, the rest drawn
    try:
        maps = cam_maps(run_dir, row["image_id"], row["seed"], row["image_size"], skipped=skipped)
    except (NoCheckpoint, PermissionError) as e:  # no model, or an image outside the folders: nothing to show
        return pn.pane.Alert(f"No Grad-CAM: {esc(e)}", alert_type="warning", css_classes=["wbc-why"])
    except Exception as e:  # a damaged checkpoint or image: said, not raised
        return pn.pane.Alert(f"Grad-CAM failed: {esc(type(e).__name__)}: {esc(e)}", alert_type="danger",
                             css_classes=["wbc-why"])
    cards = "".join(
        # a fixed width, top-aligned: the cards line up in columns whatever their captions' lengths
        f"<div class='wbc-cam-card' style='display:inline-block;vertical-align:top;width:196px;margin:0 10px 8px 0;"
        f"font-size:12px'>"
        f"<img src='data:image/png;base64,{base64.b64encode(m['png']).decode()}' width='192' height='192'><br>"
        f"<b>{esc(m['variant'])}</b> (said {esc(m['pred_label'])}): {role} class {esc(m['class_label'])}"
        f"<br>heat on the stained cell: {_share(m['heat_in_cell'])}</div>" for m, role in cam_cards(maps))
    notes = "".join(f"<div class='wbc-cam-skipped'>No Grad-CAM for <b>{esc(v)}</b>: {esc(reason)}</div>"
                    for v, reason in skipped)
    if not maps:
        return pn.pane.Alert(notes or "No Grad-CAM: no variant predicted this image", alert_type="warning",
                             css_classes=["wbc-why"])
    return pn.pane.HTML("<div><b>Where each model looked</b> (Grad-CAM, red = most evidence for the class named)"
                        f"<br>{cards}{notes}</div>", css_classes=["wbc-why"], sizing_mode="stretch_width")


def cam_cards(maps: list[dict]) -> list[tuple[dict, str]]:
    """(map, role words) per Grad-CAM card: a variant whose model was right has one map, "true = predicted", not the
    same map twice (its true and its predicted class are the same class)."""
    right = {m["variant"] for m in maps if m["role"] == "true" and m["class_label"] == m["pred_label"]}
    return [(m, "true = predicted" if m["variant"] in right else esc(m["role"])) for m in maps
            if not (m["variant"] in right and m["role"] != "true")]


def _share(x) -> str:
    # None: the map is all zero (the model saw no evidence for this class anywhere: usual for the class it did not
    # choose), or no stained cell was found to measure against (core.explain.heat_in_cell)
    return ("n/a: no evidence for this class anywhere in the image (or no stained cell found)" if x is None or x != x
            else f"{x:.2f}")
