"""Small helpers shared by the pages."""

from __future__ import annotations

import panel as pn

from dashboard.safe import as_float, esc


# One colour per variant on every page (bars, curves), so a variant is recognised at a glance.
VARIANT_COLORS = {"original": "#4c78a8", "realesrgan-x4plus": "#e45756", "realesr-animevideov3": "#f58518",
                  "realesrgan-x4plus-anime": "#b279a2", "realesr-general-x4v3": "#9d755d", "bicubic-x4": "#54a24b",
                  "lanczos-x4": "#72b7b2"}
_SPARE = ["#eeca3b", "#ff9da6", "#bab0ac", "#17becf", "#8c564b"]


def variant_color(variant: str) -> str:
    import zlib

    return VARIANT_COLORS.get(str(variant)) or _SPARE[zlib.crc32(str(variant).encode()) % len(_SPARE)]


def variant_colors(variants) -> dict:
    return {v: variant_color(v) for v in variants}


def color_key(variants) -> pn.pane.HTML:
    """A legend line: a coloured square and the name of each variant."""
    spans = "".join(f'<span style="margin-right:14px"><span style="display:inline-block;width:11px;height:11px;'
                    f'background:{variant_color(v)};margin-right:5px;vertical-align:-1px"></span>{esc(v)}'
                    f'</span>' for v in variants)
    return pn.pane.HTML(f'<div style="font-size:13px">{spans}</div>', css_classes=["wbc-color-key"])


def escaped_titles(df) -> dict:
    """Tabulator ``titles`` for a frame whose column names come from the data (Tabulator shows titles as HTML)."""
    return {c: esc(c) for c in df.columns}


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
    """Seconds as '2 min 05 s' / '45 s'; '—' when unknown."""
    try:
        s = float(s)
    except (TypeError, ValueError):
        return "—"
    if s != s or s < 0:
        return "—"
    m, sec = divmod(int(s), 60)
    return f"{m} min {sec:02d} s" if m else f"{sec} s"


def progress_summary(prog: dict, default: str = "starting") -> str:
    """What a run's progress.json says it is doing, escaped: 'enhancing with X, 39%'."""
    what = esc(prog.get("message") or prog.get("stage") or default)
    pct = prog.get("percent")
    return what + (f", {pct:.0f}%" if isinstance(pct, (int, float)) else "")


def run_banner(state, run_id) -> tuple[pn.pane.Alert | None, bool]:
    """(a banner for a run that is not finished, whether its results can be shown at all). A run whose process
    is gone is ``interrupted`` (core.store.effective_status): what it stored is shown."""
    from core.store import RESUMABLE_STATUSES, Run, effective_status
    from dashboard.data import read_meta

    if not run_id:
        return None, True
    rd = state.run_dir(run_id)
    meta, _ = read_meta(rd)
    prog = Run(rd).read_progress()
    status = effective_status(meta, prog)
    if status == "finished":
        return None, True
    rid = esc(run_id)
    if status in ("running", "queued"):
        eta = fmt_eta(prog.get("eta_s")) if prog.get("eta_s") else None
        text = (f"Run <code>{rid}</code> is {status}: {progress_summary(prog, status)}"
                + (f", about {eta} left" if eta else "")
                + ". Its results appear here when it finishes (press Refresh on the Runs page).")
        return pn.pane.Alert(text, alert_type="info", css_classes=["wbc-run-banner"], sizing_mode="stretch_width"), False
    err = esc(str(meta.get("error") or "")[:300])  # cut before escaping: no half entities
    resume = f" Continue it with <code>wbc study --resume {rid}</code>." if status in RESUMABLE_STATUSES else ""
    text = f"Run <code>{rid}</code> is {esc(status)}" + (f": {err}" if err else "") + \
        ". What it stored before stopping is shown below." + resume
    return pn.pane.Alert(text, alert_type="warning", css_classes=["wbc-run-banner"], sizing_mode="stretch_width"), True


def gated(state, name: str, render, *deps):
    """``pn.bind(render, *deps)`` that only re-renders while page ``name`` is shown.

    While the page is hidden, changes are skipped (the old content stays); showing the page renders once
    if the inputs changed meanwhile. This keeps run switches and filter changes cheap: only the visible
    page does any work.
    """
    from param.parameterized import Skip

    memo = {"key": None, "done": False}

    def fn(page, *vals):
        key = tuple(repr(v) for v in vals)
        if memo["done"] and (page != name or key == memo["key"]):
            raise Skip()
        memo.update(key=key, done=True)
        if deps and getattr(deps[0], "name", None) == "run_id":  # a run that is not finished says so
            banner, show = run_banner(state, vals[0])
            if banner is not None:
                return pn.Column(banner, render(*vals), sizing_mode="stretch_width") if show else banner
        return render(*vals)

    return pn.panel(pn.bind(fn, state.param.page, *deps), sizing_mode="stretch_width")
