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


# Pre-computes core's source-grouping embeddings of the fixture test images into the fixture cache, in the
# background, so the launch test's tiny study does not spend ~30 s loading the embedding model.
_WARM_EMBEDDINGS = """
import hashlib, sys
from pathlib import Path
try:
    import torch
    from core.groups import embed_images
except ImportError:
    raise SystemExit(0)
paths = sorted(str(p) for p in Path(sys.argv[1]).rglob('*.jpeg'))
sha1s = [hashlib.sha1(Path(p).read_bytes()).hexdigest() for p in paths]
embed_images(paths, sha1s, cache_dir=Path(sys.argv[2]), device='cpu')
"""


@pytest.fixture(scope="session")
def dashboard_root(tmp_path_factory):
    return tmp_path_factory.mktemp("dashstore")


@pytest.fixture(scope="session")
def dashboard_store(dashboard_root):
    """A fixture run store (2 finished runs, 1 failed) plus the broken cases (corrupt Parquet, no / truncated
    run.json), with generated images, data roots and a cache of its own."""
    from fixtures_store import corrupt_store, make_fixture_store

    info = make_fixture_store(dashboard_root, n_runs=2, n_test=80)
    info["broken"] = corrupt_store(info["runs_dir"])
    return info


@pytest.fixture(scope="session")
def dashboard_launch_data(dashboard_root):
    """A second data root with a very small Kaggle-like layout (6 train + 3 test images per class) for the
    launch test's seconds-long study."""
    from fixtures_store import make_images

    d = Path(dashboard_root) / "launchdata"
    make_images(d, Path(dashboard_root) / "launchdata-enh", n_test=12, n_train_per_class=6)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_env(root: Path, data_roots: list[Path]) -> dict:
    return dict(os.environ, WBC_RUNS_DIR=str(root / "runs"), WBC_CACHE_DIR=str(root / "cache"),
                WBC_DATA_ROOTS=os.pathsep.join(str(d) for d in data_roots),
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _start_server(root: Path, env: dict):
    """``panel serve dashboard`` on a free localhost port with ``env``: (process, url, log)."""
    port = _free_port()
    log = open(root / "panel-serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "panel", "serve", "dashboard", "--port", str(port), "--address", "127.0.0.1",
         "--allow-websocket-origin", f"127.0.0.1:{port}", "--num-procs", "1"],
        cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}/dashboard", log


def _wait_until_up(proc, url: str, log) -> None:
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"panel serve exited ({proc.returncode}); see {log.name}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"panel serve did not answer on {url}; see {log.name}")
            time.sleep(0.2)  # polling interval of the port check, not a wait for the UI


def _stop_server(proc, log) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="session")
def dashboard_server(dashboard_root, request):
    """``panel serve dashboard`` on a free localhost port over the fixture store; yields the URL.

    The server starts first and the store is written while it imports (sessions read the store on demand)."""
    root = Path(dashboard_root)
    for sub in ("runs", "cache", "data", "launchdata"):
        (root / sub).mkdir(exist_ok=True)
    env = _server_env(root, [root / "data", root / "launchdata"])
    proc, url, log = _start_server(root, env)
    launch_data = request.getfixturevalue("dashboard_launch_data")
    store = request.getfixturevalue("dashboard_store")
    warm = subprocess.Popen([sys.executable, "-c", _WARM_EMBEDDINGS, str(launch_data),
                             str(store["cache_dir"])], cwd=str(REPO), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_until_up(proc, url, log)
    yield url
    if warm.poll() is None:
        warm.kill()
    warm.wait()
    _stop_server(proc, log)


@pytest.fixture(scope="session")
def hostile_server(tmp_path_factory):
    """A served dashboard over a store full of stored-XSS payloads (fixtures_store.make_hostile_store);
    yields (url, store info)."""
    from fixtures_store import make_hostile_store

    root = Path(tmp_path_factory.mktemp("hostile"))
    for sub in ("runs", "cache", "data"):
        (root / sub).mkdir(exist_ok=True)
    proc, url, log = _start_server(root, _server_env(root, [root / "data"]))
    store = make_hostile_store(root)
    _wait_until_up(proc, url, log)
    yield url, store
    _stop_server(proc, log)


@pytest.fixture(scope="session")
def dashboard_browser():
    pw_sync = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium not installed (apt-get install -y chromium)")
    with pw_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.dashboard_failed = rep.failed


@pytest.fixture
def dashboard_page(dashboard_browser, dashboard_server, request):
    ctx = dashboard_browser.new_context(viewport={"width": 1500, "height": 1000})
    page = ctx.new_page()
    page.set_default_timeout(20_000)
    yield page
    if getattr(request.node, "dashboard_failed", False):
        d = REPO / "test-artifacts"
        d.mkdir(exist_ok=True)
        page.screenshot(path=str(d / f"FAILED-{request.node.name}.png"), full_page=True)
    ctx.close()


@pytest.fixture(scope="session")
def artifacts_dir():
    d = REPO / "test-artifacts"
    d.mkdir(exist_ok=True)
    return d
