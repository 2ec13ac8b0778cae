"""The app shell (one per browser session): a FastListTemplate with a sidebar (run choice) and one tab per page.

It only wires pages to the session's shared :class:`AppState`. A page is a ``dashboard.pages.base.Page``
(a ``pn.viewable.Viewer``), imported and built the first time its tab is shown, so the first paint is cheap
(the Launch page imports torch for the registries)."""

from __future__ import annotations

import importlib

import holoviews as hv
import panel as pn

from core.store import Status
from dashboard.data import list_runs
from dashboard.safe import esc
from dashboard.state import AppState

# Tab title -> "module:Page class" under dashboard.pages. Add a page: one line here and its module.
PAGE_CLASSES = {
    "Runs": "runs:RunsPage", "Overview": "overview:OverviewPage", "Confusion": "confusion:ConfusionPage",
    "Metrics": "metrics:MetricsPage", "Errors": "errors:ErrorsPage", "EOS/NEU": "eos_neu:EosNeuPage",
    "Map": "embedmap:MapPage", "Launch": "launch:LaunchPage",
}
PAGES = list(PAGE_CLASSES)


def page_class(title: str):
    module, cls = PAGE_CLASSES[title].split(":")
    return getattr(importlib.import_module(f"dashboard.pages.{module}"), cls)


_LOADED = []


def _no_web_font() -> None:
    """The Fast design links Open Sans from fonts.googleapis.com in every page: offline (the usual case on a lab
    machine) that is a console error, online a request to a third party for each visitor. Drop that one link;
    the design's own font list falls back to the browser's sans-serif. Everything else is served by Panel."""
    from panel.theme.fast import Fast

    Fast._resources = {k: v for k, v in Fast._resources.items() if k != "font"}


def _extensions():
    """Panel / HoloViews extensions: once per process for HoloViews (it is global), every session for Panel
    (it records the resources the page needs)."""
    pn.extension("tabulator", sizing_mode="stretch_width", notifications=False)
    if not _LOADED:
        hv.extension("bokeh", logo=False)
        _no_web_font()
        _LOADED.append(True)


def is_local_client(served: bool = False) -> bool:
    """True if this session's browser connects from this machine (or WBC_DASHBOARD_ALLOW_REMOTE=1).

    Fails closed: an address that cannot be read, or a reverse proxy's forwarding header (X-Forwarded-For,
    X-Real-IP, Forwarded) naming another machine, is a refusal. Outside a served session (tests, notebooks)
    it is True unless ``served`` says this code only runs in one (main.py)."""
    import os

    if os.environ.get("WBC_DASHBOARD_ALLOW_REMOTE") == "1":
        return True
    try:
        doc = pn.state.curdoc
        if doc is None or doc.session_context is None:
            return not served
        request = doc.session_context.request
        return _loopback(request.remote_ip) and all(map(_loopback, _forwarded(getattr(request, "headers", None))))
    except Exception:
        return False


def _forwarded(headers) -> list[str]:
    """The client addresses a proxy put in the request headers."""
    import re

    out = []
    for name, value in dict(headers or {}).items():
        name = str(name).lower()
        for v in value if isinstance(value, list) else [value]:
            if name in ("x-forwarded-for", "x-real-ip"):
                out += str(v).split(",")
            elif name == "forwarded":
                out += re.findall(r'for=("[^"]*"|[^;,\s]*)', str(v), flags=re.I) or ["?"]
    return out


def _loopback(addr) -> bool:
    """'127.0.0.1', '::1', '[::1]:8080', '"127.0.0.1:80"', 'fe80::1%lo' -> is it loopback (unreadable: False)."""
    import ipaddress

    a = str(addr).strip().strip('"')
    if a.startswith("["):
        a = a[1:].split("]")[0]
    elif a.count(":") == 1:
        a = a.split(":")[0]
    try:
        return ipaddress.ip_address(a.split("%")[0]).is_loopback
    except ValueError:
        return False


def refused_app():
    return pn.pane.Alert("This dashboard only answers browsers on the machine it runs on (it can launch studies "
                         "and read the data). Use an SSH tunnel, or set WBC_DASHBOARD_ALLOW_REMOTE=1 (also "
                         "needed behind a reverse proxy).", alert_type="danger")


def _run_options(state) -> list[str]:
    df = list_runs(state.runs_dir)
    return list(df.loc[df["status"] != Status.UNREADABLE, "run_id"])


def build_app(state: AppState | None = None, template: bool = True, eager: bool = False):
    """The app for one session. ``eager`` builds every page now (benchmark); otherwise on first view."""
    _extensions()
    state = state or AppState()
    options = _run_options(state)
    if state.run_id is None and options:  # the newest finished run is the default
        df = list_runs(state.runs_dir)
        fin = df[df["status"] == Status.FINISHED]
        state.run_id = fin["run_id"].iloc[0] if len(fin) else options[0]
    run_sel, cmp_sel = _run_selects(state, options)
    tabs = _tabs(state, eager)
    if not template:
        return pn.Column(pn.Row(run_sel, cmp_sel), tabs, sizing_mode="stretch_width"), state
    info = pn.pane.Markdown(f"Run store: <code>{esc(state.runs_dir)}</code>", css_classes=["wbc-store"])
    tpl = pn.template.FastListTemplate(
        title="WBC super-resolution study", sidebar=[run_sel, cmp_sel, info], main=[tabs],
        sidebar_width=300, header_background="#5b3a8c", accent_base_color="#5b3a8c", main_layout=None)
    tpl.state = state  # for tests and the benchmark
    return tpl


def _run_selects(state: AppState, options: list[str]):
    """The sidebar's run and compare-with selects, kept in step with the state both ways."""
    run_sel = pn.widgets.Select(name="Run", options=options, value=state.run_id, css_classes=["wbc-run-select"])
    cmp_sel = pn.widgets.Select(name="Compare with", options=["(none)", *(o for o in options if o != state.run_id)],
                                value=state.compare_run_id or "(none)", css_classes=["wbc-compare-select"])

    syncing = False  # the selects are being set from the state: their own events must not write back

    def to_state(*_):
        if not syncing:
            state.param.update(run_id=run_sel.value,
                               compare_run_id=None if cmp_sel.value in ("(none)", run_sel.value) else cmp_sel.value)

    def from_state(*_):
        nonlocal syncing
        if state.compare_run_id is not None and state.compare_run_id == state.run_id:
            state.compare_run_id = None  # the compared run became the main run: nothing left to compare
            return  # (that update calls this again)
        opts = _run_options(state)
        syncing = True  # new options reset a select's value to its first: that must not reach the state (a
        try:  # swap of the two runs, from a tap on the compared run's matrix, was undone that way)
            run_sel.options = opts
            cmp_sel.options = ["(none)", *(o for o in opts if o != state.run_id)]  # never the main run itself
            if state.run_id in opts:
                run_sel.value = state.run_id
            cmp_sel.value = state.compare_run_id if state.compare_run_id in cmp_sel.options else "(none)"
        finally:
            syncing = False

    run_sel.param.watch(to_state, "value")
    cmp_sel.param.watch(to_state, "value")
    state.param.watch(from_state, ["run_id", "compare_run_id", "refresh"])
    return run_sel, cmp_sel


def _tabs(state: AppState, eager: bool) -> pn.Tabs:
    """One tab per page; a page is built the first time it is shown (all now with ``eager``)."""
    holders = {name: pn.Column(sizing_mode="stretch_width", name=name) for name in PAGES}

    def ensure(name):
        if not holders[name].objects:
            holders[name].objects = [page_class(name)(state)]

    # Bokeh hides an inactive tab with visibility: hidden, so it keeps its height and a short page scrolled into the
    # tallest page's blank space; display: none lets the page be as tall as what it shows
    tabs = pn.Tabs(*holders.values(), dynamic=False, css_classes=["wbc-tabs"], sizing_mode="stretch_width",
                   stylesheets=['div[aria-hidden="true"], div[style*="visibility: hidden"] { display: none !important; }'])
    for name in (PAGES if eager else [state.page if state.page in PAGES else "Runs"]):
        ensure(name)
    tabs.active = PAGES.index(state.page) if state.page in PAGES else 0

    def on_tab(e):
        ensure(PAGES[e.new])
        if state.page != PAGES[e.new]:
            state.page = PAGES[e.new]

    def on_page(e):
        if e.new in PAGES:
            ensure(e.new)
            tabs.active = PAGES.index(e.new)

    tabs.param.watch(on_tab, "active")
    state.param.watch(on_page, "page")
    return tabs
