"""Shared pytest fixtures. Dashboard section: a fixture run store and a served dashboard (browser tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

# ------------------------------------------------------------------------------------------- dashboard
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def dashboard_store(tmp_path_factory):
    """A fixture run store (2 finished runs, 1 failed) plus the broken cases (corrupt Parquet, no / truncated
    run.json), with generated images, data roots and a cache of its own."""
    from fixtures_store import corrupt_store, make_fixture_store

    root = tmp_path_factory.mktemp("dashstore")
    info = make_fixture_store(root, n_runs=2, n_test=120)
    info["broken"] = corrupt_store(info["runs_dir"])
    return info


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def dashboard_server(dashboard_store):
    """``panel serve dashboard`` on a free localhost port over the fixture store; yields the URL."""
    port = _free_port()
    env = dict(os.environ, WBC_RUNS_DIR=str(dashboard_store["runs_dir"]),
               WBC_CACHE_DIR=str(dashboard_store["cache_dir"]), WBC_DATA_ROOTS=str(dashboard_store["data_dir"]),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(dashboard_store["root"] / "panel-serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "panel", "serve", "dashboard", "--port", str(port), "--address", "127.0.0.1",
         "--allow-websocket-origin", f"127.0.0.1:{port}", "--num-procs", "1"],
        cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/dashboard"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"panel serve exited ({proc.returncode}); see {log.name}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"panel serve did not answer on {url}; see {log.name}")
            time.sleep(0.2)  # polling interval of the port check, not a wait for the UI
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="session")
def dashboard_browser():
    pw_sync = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium not installed (apt-get install -y chromium)")
    with pw_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def dashboard_page(dashboard_browser, dashboard_server):
    ctx = dashboard_browser.new_context(viewport={"width": 1500, "height": 1000})
    page = ctx.new_page()
    page.set_default_timeout(20_000)
    yield page
    ctx.close()


@pytest.fixture(scope="session")
def artifacts_dir():
    d = REPO / "test-artifacts"
    d.mkdir(exist_ok=True)
    return d
