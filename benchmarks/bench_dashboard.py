"""Dashboard speed with realistic numbers of rows (issue 4 item 8).

Generates a fixture store (default 10 runs x 2,500 test images x 2 variants = 5,000 predictions per run),
then

* in-process: builds the app for a session (``build_app`` + ``server_doc``, i.e. every Bokeh model of the
  first paint), shows every page once, switches runs and changes the misclassification filters, timing each
  step with the gallery's thumbnails cold (first time) and warm (cached on disk);
* in a browser (``--browser``, Debian Chromium): serves the app with ``panel serve dashboard`` and times the
  first paint (navigation to runs table visible) and a class-filter change (select to gallery updated).

    .venv/bin/python benchmarks/bench_dashboard.py [--runs 10] [--n-test 2500] [--browser] [--root DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, 1000 * (time.perf_counter() - t)


def in_process(store: dict) -> dict:
    import shutil

    from dashboard.data import thumbs_dir

    shutil.rmtree(thumbs_dir(), ignore_errors=True)  # measure with cold thumbnails
    res = {}
    t = time.perf_counter()
    import holoviews  # noqa: F401
    import panel  # noqa: F401

    import core  # noqa: F401
    from dashboard.app import build_app
    from dashboard.state import AppState

    res["imports (once per server) ms"] = 1000 * (time.perf_counter() - t)
    from bokeh.document import Document

    def session():
        state = AppState()
        tpl = build_app(state)
        tpl.server_doc(Document())
        return state

    state, res["first session: build + Bokeh models ms"] = timed(session)
    _, res["second session: build + Bokeh models ms"] = timed(session)
    for page in ["Overview", "Confusion", "Metrics", "Errors", "EOS/NEU"]:
        _, res[f"first view of {page} ms"] = timed(setattr, state, "page", page)
    state.page = "Errors"
    other = [r for r in store["run_ids"] if r != state.run_id][0]
    _, res["switch run (Errors page shown, cold) ms"] = timed(setattr, state, "run_id", other)
    filters = [("true_label", "eosinophil"), ("pred_label", "neutrophil"), ("variant", "realesrgan-x4plus"),
               ("confidence", (0.5, 1.0)), ("true_label", "(any)"), ("pred_label", "(any)"), ("variant", "(any)"),
               ("confidence", (0.0, 1.0)), ("true_label", "monocyte"), ("true_label", "lymphocyte")]
    cold = [timed(setattr, state, k, v)[1] for k, v in filters]
    warm = [timed(setattr, state, k, v)[1] for k, v in filters]
    res["filter change, thumbnails cold: median ms"] = statistics.median(cold)
    res["filter change, thumbnails cold: max ms"] = max(cold)
    res["filter change, thumbnails warm: median ms"] = statistics.median(warm)
    res["filter change, thumbnails warm: max ms"] = max(warm)
    state.page = "Overview"
    third = [r for r in store["run_ids"] if r not in (state.run_id, other)][0]
    _, res["switch run (Overview shown) ms"] = timed(setattr, state, "run_id", third)
    state.page = "Errors"
    _, res["switch run (Errors shown, tables cached) ms"] = timed(setattr, state, "run_id", other)
    return res


_FIND_JS = """
function find(root, sel) {
  const el = root.querySelector(sel); if (el) return el;
  for (const e of root.querySelectorAll('*')) { if (e.shadowRoot) { const r = find(e.shadowRoot, sel); if (r) return r; } }
  return null;
}
function text(sel) { const h = find(document, sel); return h ? (h.shadowRoot || h).textContent : null; }
"""
_FIRST_PAINT_JS = "(() => {" + _FIND_JS + """
  function poll() {
    const host = find(document, '.wbc-runs-table');
    if (host && find(host.shadowRoot || host, '.tabulator-row')) { window.__wbcFirstPaint = performance.now(); return; }
    requestAnimationFrame(poll);
  }
  requestAnimationFrame(poll);
})();"""
_COUNT_JS = "() => {" + _FIND_JS + "return text('.wbc-error-count');}"
_CHANGE_AND_WAIT_JS = "async ([value, before]) => {" + _FIND_JS + """
  const host = find(document, '.wbc-f-true');
  const select = find(host.shadowRoot || host, 'select');
  const t0 = performance.now();
  select.value = value;
  select.dispatchEvent(new Event('change', {bubbles: true}));
  while (text('.wbc-error-count') === before) { await new Promise(r => requestAnimationFrame(r)); }
  return performance.now() - t0;
}"""


def in_browser(store: dict) -> dict:
    import socket
    import subprocess
    import urllib.request

    from playwright.sync_api import expect, sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "panel", "serve", "dashboard", "--port", str(port), "--address",
                             "127.0.0.1", "--allow-websocket-origin", f"127.0.0.1:{port}"], cwd=str(REPO), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/dashboard"
    res = {}
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=30).read()  # also the first (cold) session
                break
            except OSError:
                time.sleep(0.2)
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            firsts = []
            for i in range(5):
                page = b.new_page(viewport={"width": 1500, "height": 1000})
                page.add_init_script(_FIRST_PAINT_JS)
                page.goto(url)
                page.wait_for_function("() => window.__wbcFirstPaint !== undefined", timeout=30_000)
                firsts.append(page.evaluate("() => window.__wbcFirstPaint"))
                if i < 4:
                    page.close()
            res["browser: first paint (navigation start -> runs table rows in DOM) ms, 5 loads"] = \
                [round(x) for x in firsts]
            res["browser: first paint median ms"] = statistics.median(firsts)
            page.locator(".bk-tab", has_text="Errors").first.click()
            expect(page.locator(".wbc-gallery-pane .wbc-card").first).to_be_visible(timeout=30_000)
            times = []
            for cls in ["eosinophil", "neutrophil", "monocyte", "lymphocyte", "(any)"] * 2:
                before = page.evaluate(_COUNT_JS)
                sel = page.locator(".wbc-f-true select")
                sel.wait_for()
                # time from the change event to the new count/gallery in the DOM, polled every frame
                ms = page.evaluate(_CHANGE_AND_WAIT_JS, [cls, before])
                times.append(ms)
            res["browser: class filter -> gallery updated ms (10 changes)"] = [round(x) for x in times]
            res["browser: class filter median ms"] = statistics.median(times)
            b.close()
    finally:
        proc.terminate()
        proc.wait(10)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--n-test", type=int, default=2500)
    ap.add_argument("--root", help="where to write the fixture store (default: a temporary folder)")
    ap.add_argument("--browser", action="store_true", help="also time the served app in Chromium")
    args = ap.parse_args(argv)
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-dashboard-"))
    os.environ.update(WBC_RUNS_DIR=str(root / "runs"), WBC_CACHE_DIR=str(root / "cache"),
                      WBC_DATA_ROOTS=str(root / "data"))
    from fixtures_store import make_fixture_store

    t = time.perf_counter()
    if (root / "runs").is_dir() and len(list((root / "runs").iterdir())) > args.runs:
        from fixtures_store import VARIANTS  # noqa: F401  (reuse an existing store)

        ids = sorted(p.name for p in (root / "runs").iterdir() if "fx" in p.name)
        store = {"run_ids": ids, "runs_dir": root / "runs"}
    else:
        store = make_fixture_store(root, n_runs=args.runs, n_test=args.n_test)
    print(f"store: {root} ({args.runs} runs x {args.n_test} test images x 2 variants) "
          f"in {time.perf_counter() - t:.1f} s")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f} (other work on the machine slows "
          "every number)")
    res = in_process(store)
    if args.browser:
        res.update(in_browser(store))
    for k, v in res.items():
        print(f"{k:60s} {v:8.0f}" if isinstance(v, float) else f"{k:60s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
