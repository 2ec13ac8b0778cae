"""Small helpers shared by the pages."""

from __future__ import annotations

import panel as pn


def warnings_alert(warnings) -> pn.pane.Alert:
    ws = [w for w in warnings if w]
    return pn.pane.Alert("\n".join(f"* {w}" for w in ws), alert_type="warning", visible=bool(ws),
                         css_classes=["wbc-warning"], sizing_mode="stretch_width")


def no_run() -> pn.pane.Markdown:
    return pn.pane.Markdown("Choose a run on the **Runs** page (or in the sidebar).", css_classes=["wbc-norun"])


def fmt_p(p) -> str:
    try:
        p = float(p)
    except (TypeError, ValueError):
        return ""
    if p != p:
        return ""
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"


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
        return render(*vals)

    return pn.panel(pn.bind(fn, state.param.page, *deps), sizing_mode="stretch_width")
