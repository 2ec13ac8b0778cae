"""Reliability of core (issue 10): the run lifecycle (heartbeat, ``interrupted``, ``kill -9`` then ``--resume``),
atomic run creation, input limits, the CLI's one error path and ``wbc enhance``'s folders.

docs/RELIABILITY.md's bad-input and fault matrix names these tests. Studies are tiny (generated images,
``simple_cnn``, 32 px): seconds each.
"""

import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core import RunStore, make_config, run_study
from core import data as D
from core.config import PROB_COLUMNS
from core.store import HEARTBEAT_STALE_S, KEYS, effective_status
from tests.gen_data import cell_image, make_dataset

TINY_ARGS = ["--classifier", "simple_cnn", "--pretrained", "none", "--image-size", "32", "--epochs", "2",
             "--batch-size", "8", "--variants", "original,bicubic-x4", "--split", "random", "--seeds", "2", "--quiet"]
TINY = dict(classifier="simple_cnn", pretrained="none", image_sizes=(32,), epochs=2, batch_size=8,
            variants=("original", "bicubic-x4"), split="random")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), train_per_class=10, test_per_class=4)


@pytest.fixture(scope="module")
def store(tmp_path_factory, data_dir):
    """A store holding one uninterrupted tiny study (2 variants x 2 seeds), made by ``wbc study``: (root, runs,
    the study's arguments, its run id)."""
    root = tmp_path_factory.mktemp("store")
    args = ["study", "--data", data_dir, *TINY_ARGS, "--runs-dir", root / "runs", "--cache-dir", root / "cache"]
    p = _wbc(*args, "--run-id", "reference")
    assert p.returncode == 0, p.stderr
    return root, root / "runs", args, "reference"


@pytest.fixture(scope="module")
def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def unwritable(tmp_path):
    """A folder no file can be written in: read-only for a user; for root (who ignores modes), under a file."""
    if os.geteuid() == 0:
        (tmp_path / "a-file").write_text("x")
        yield tmp_path / "a-file" / "sub"
        return
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o555)
    yield d
    d.chmod(0o755)


def _wbc(*args, **kw):
    return subprocess.run([sys.executable, "-m", "core", *map(str, args)], capture_output=True, text=True, **kw)


def _main(capsys, *args) -> tuple[int, str, str]:
    """``wbc ARGS`` in this process (the same ``core.cli.main``): (exit code, stdout, stderr)."""
    from core.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _models(run_dir: Path) -> set:
    return {tuple(k) for k in pd.read_parquet(run_dir / "validation.parquet")[KEYS].values.tolist()}


# ------------------------------------------------------------------------------------------ run lifecycle
def test_kill_9_then_resume_matches_an_uninterrupted_run(store):
    root, runs, args, reference = store
    proc = subprocess.Popen([sys.executable, "-m", "core", *map(str, args), "--run-id", "killed"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = runs / "killed" / "validation.parquet"  # the last of a model's tables to be written
    deadline = time.monotonic() + 600
    while not first.exists():
        assert proc.poll() is None, "the study ended before its first model's tables were written"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = _models(runs / "killed")
    assert 1 <= len(kept) < 4  # killed mid-study: some models complete, some not
    ckpt = runs / "killed" / "checkpoints" / "original-s0-32.pt"
    mtime = ckpt.stat().st_mtime_ns
    assert json.loads((runs / "killed" / "run.json").read_text())["status"] == "running"  # as kill -9 left it

    listing = _wbc("runs", "--runs-dir", runs)
    assert re.search(r"killed\s+interrupted", listing.stdout), listing.stdout
    report = _wbc("report", "killed", "--runs-dir", runs)
    assert report.returncode == 0 and "run killed: interrupted" in report.stdout
    assert "confusion matrix [original]" in report.stdout  # the partial results, read normally

    resumed = _wbc("study", "--resume", "killed", "--runs-dir", runs, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    meta = json.loads((runs / "killed" / "run.json").read_text())
    assert meta["status"] == "finished" and meta["resumed"][0]["from"] == "interrupted" and not meta["error"]
    assert json.loads((runs / "killed" / "progress.json").read_text())["stage"] == "finished"
    assert ckpt.stat().st_mtime_ns == mtime  # a complete model is kept, not trained again
    assert "complete model(s) kept" in (runs / "killed" / "log.txt").read_text()

    order = [*KEYS, "image_id"]
    a, b = (pd.read_parquet(runs / rid / "predictions.parquet").sort_values(order).reset_index(drop=True)
            for rid in ("killed", reference))
    assert len(a) == 4 * 16 and a[order].equals(b[order])
    np.testing.assert_allclose(a[list(PROB_COLUMNS)].to_numpy(), b[list(PROB_COLUMNS)].to_numpy(), atol=1e-6)
    assert (a["pred_label"] == b["pred_label"]).all()
    assert _models(runs / "killed") == _models(runs / reference)
    sa, sb = (pd.read_parquet(runs / rid / "stats.parquet") for rid in ("killed", reference))
    assert len(sa) == len(sb) and set(sa["variant"]) == set(sb["variant"])


NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.timezone.utc)
FRESH, STALE = (NOW - dt.timedelta(seconds=5)).isoformat(), (NOW - dt.timedelta(seconds=HEARTBEAT_STALE_S + 1)).isoformat()
HOST = socket.gethostname()


@pytest.mark.parametrize("status, progress, meta, want", [
    ("running", {"pid": "ME", "host": HOST, "updated_at": FRESH}, {}, "running"),
    ("running", {"pid": "DEAD", "host": HOST, "updated_at": FRESH}, {}, "interrupted"),  # process gone
    ("running", {"pid": "DEAD", "host": "another-host", "updated_at": FRESH}, {}, "running"),  # not ours to check
    ("running", {"pid": "DEAD", "host": "another-host", "updated_at": STALE}, {}, "interrupted"),  # stale heartbeat
    ("running", {"pid": "ME", "host": HOST, "updated_at": STALE}, {}, "interrupted"),  # alive but silent: hung
    ("running", {"stage": "train", "updated_at": FRESH}, {"pid": "DEAD"}, "interrupted"),  # run.json's pid only
    ("queued", {}, {"created_at": STALE}, "interrupted"),  # never started, no heartbeat at all
    ("queued", {}, {"created_at": FRESH}, "queued"),
    ("running", {"pid": "ME", "host": HOST, "updated_at": "not a time"}, {}, "running"),
    ("finished", {"pid": "DEAD", "host": HOST, "updated_at": STALE}, {}, "finished"),
    ("failed", {}, {}, "failed"),
    ({"s": 1}, {}, {}, "unknown"),  # a hand-edited run.json: the banner had read "Run X is {'s': 1}"
    (["running"], {}, {}, "unknown"),
])
def test_effective_status_marks_gone_and_stale_runs_interrupted(status, progress, meta, want, dead_pid):
    pids = {"ME": os.getpid(), "DEAD": dead_pid}
    progress = {k: pids.get(v, v) for k, v in progress.items()}
    meta = {"status": status, **{k: pids.get(v, v) for k, v in meta.items()}}
    assert effective_status(meta, progress, now=NOW) == want


def test_heartbeat_is_refreshed_during_a_silent_stage(tmp_path):
    from core.pipeline import Progress, _start_heartbeat

    run = RunStore(tmp_path).create({})
    prog = Progress(run, ["data"])
    prog.start("data", "scanning a slow disk")  # then no progress update at all
    first = run.read_progress()["updated_at"]
    stop = _start_heartbeat(prog, every=0.05)
    deadline = time.monotonic() + 10
    while run.read_progress().get("updated_at") == first and time.monotonic() < deadline:
        time.sleep(0.05)
    stop()
    beat = run.read_progress()
    assert beat["updated_at"] > first and beat["stage"] == "data" and beat["message"] == "scanning a slow disk"
    assert beat["pid"] == os.getpid() and beat["host"] == socket.gethostname()


def test_dashboard_shows_an_interrupted_run_and_its_partial_results(tmp_path, dead_pid):
    from dashboard.data import list_runs, load_table
    from dashboard.jobs import running_elsewhere
    from dashboard.pages.common import run_banner
    from dashboard.state import AppState

    state = AppState(runs_dir=str(tmp_path / "runs"))
    run = RunStore(state.runs_dir).create({"preset": "quick"}, run_id="cut-short")
    run.update_meta(status="running", pid=dead_pid)
    run.write_progress(stage="train:original:s1:32", percent=40.0, pid=dead_pid)  # its last heartbeat
    run.write_table("predictions", pd.DataFrame([{"variant": "original", "seed": 0, "image_size": 32,
                                                  "image_id": "TEST/x.jpeg", "correct": True}]))
    assert list_runs(state.runs_dir).set_index("run_id").loc["cut-short", "status"] == "interrupted"
    banner, show = run_banner(state, "cut-short")
    assert show and "interrupted" in banner.object and "--resume" in banner.object
    table, warning = load_table(run.path, "predictions")
    assert len(table) == 1 and warning is None
    assert running_elsewhere(state.runs_dir) == []


def test_resume_refuses_finished_and_live_runs_and_other_flags(tmp_path, capsys):
    runs = tmp_path / "runs"
    s = RunStore(runs)
    s.create({}, run_id="done").update_meta(status="finished")
    live = s.create({}, run_id="live")
    live.update_meta(status="running")
    live.write_progress(stage="train")  # this process's heartbeat: alive and fresh
    for rid, word in (("done", "finished"), ("live", "running")):
        code, _, err = _main(capsys, "study", "--resume", rid, "--runs-dir", runs)
        assert code == 2 and _one_line(err) and f"run {rid} is {word}" in err
    code, _, err = _main(capsys, "study", "--resume", "done", "--epochs", "3", "--runs-dir", runs)
    assert code == 2 and _one_line(err) and "drop --epochs" in err
    code, _, err = _main(capsys, "study", "--resume", "nope", "--runs-dir", runs)
    assert code == 2 and _one_line(err) and "no run 'nope'" in err


def test_resume_retrains_a_model_cut_short_between_its_tables(tmp_path):
    from core.pipeline import stored_parts

    run = RunStore(tmp_path).create({})
    keys = [{"variant": "original", "seed": s, "image_size": 32} for s in (0, 1)]
    run.write_table("predictions", pd.DataFrame([{**k, "image_id": "a", "correct": True} for k in keys]))
    run.write_table("history", pd.DataFrame([{**k, "epoch": 1} for k in keys]))
    run.write_table("splits", pd.DataFrame([{**keys[0], "image_id": i, "role": r} for i, r in
                                            (("a", "test"), ("b", "train"), ("c", "train"), ("d", "val"))]))
    run.write_table("validation", pd.DataFrame([{**keys[0], "val_groups_disjoint": True}]))  # seed 1: killed before
    parts = stored_parts(run)
    assert list(parts) == [("original", 0, 32)]
    part = parts[("original", 0, 32)]
    assert len(part["predictions"]) == 1 and part["val_groups_disjoint"] is True
    assert part["counts"] == {"train": 2, "val": 1, "test": 1}


# -------------------------------------------------------------------------------------- run folders
def test_two_creates_of_one_run_id_exactly_one_wins(tmp_path):
    s = RunStore(tmp_path)
    for i in range(20):
        barrier, results = threading.Barrier(2), []

        def create(tag, rid=f"race-{i}"):
            barrier.wait()
            try:
                s.create({"tag": tag}, run_id=rid)
                results.append("won")
            except FileExistsError as e:
                results.append(str(e))

        threads = [threading.Thread(target=create, args=(t,)) for t in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count("won") == 1, results
        lost = next(r for r in results if r != "won")
        assert "already exists" in lost and "\n" not in lost


@pytest.mark.parametrize("existing", ["a run", "a folder without run.json"])
def test_existing_run_id_is_refused_in_one_line(existing, data_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    if existing == "a run":
        RunStore(runs).create({}, run_id="taken")
    else:
        (runs / "taken").mkdir(parents=True)
    code, _, err = _main(capsys, "study", "--data", data_dir, *TINY_ARGS, "--runs-dir", runs,
                         "--cache-dir", tmp_path / "c", "--run-id", "taken")
    assert code == 2 and _one_line(err) and "run taken already exists" in err and "--resume taken" in err
    assert not (runs / "taken" / "log.txt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_fails_before_any_run_folder(data_dir, tmp_path, capsys):
    code, _, err = _main(capsys, "study", "--data", data_dir, *TINY_ARGS, "--device", "cuda",
                         "--runs-dir", tmp_path / "runs", "--cache-dir", tmp_path / "c")
    assert code == 2 and _one_line(err) and "no CUDA device" in err
    assert not (tmp_path / "runs").exists()


def test_run_id_outside_the_store_is_refused(data_dir, tmp_path, capsys):
    runs = tmp_path / "a" / "b" / "runs"
    code, _, err = _main(capsys, "study", "--data", data_dir, *TINY_ARGS, "--runs-dir", runs,
                         "--cache-dir", tmp_path / "c", "--run-id", "../../x")
    assert code == 2 and _one_line(err) and "invalid run id '../../x'" in err
    assert not (tmp_path / "a" / "x").exists() and not runs.exists()


@pytest.mark.parametrize("flag", ["--runs-dir", "--cache-dir"])
def test_unwritable_store_or_cache_fails_before_any_work(flag, data_dir, tmp_path, unwritable, capsys):
    dirs = {"--runs-dir": tmp_path / "runs", "--cache-dir": tmp_path / "cache", flag: unwritable}
    code, _, err = _main(capsys, "study", "--data", data_dir, *TINY_ARGS, *[x for kv in dirs.items() for x in kv],
                         "--run-id", "r")
    assert code == 2 and _one_line(err) and f"{flag} {unwritable}: not writable" in err
    assert not (tmp_path / "runs" / "r").exists()


def test_pretrained_text_file_is_one_line(data_dir, tmp_path, capsys):
    txt = tmp_path / "weights.pth"
    txt.write_text("these are not weights\n")
    code, _, err = _main(capsys, "study", "--data", data_dir, *TINY_ARGS, "--pretrained", txt,
                         "--runs-dir", tmp_path / "runs", "--cache-dir", tmp_path / "c", "--run-id", "r")
    assert code == 2 and _one_line(err) and f"--pretrained {txt}: not a PyTorch state dict" in err
    meta = RunStore(tmp_path / "runs").get("r").read_meta()
    assert meta["status"] == "failed" and not any(k.startswith("enhance") for k in meta["stages"])


# ------------------------------------------------------------------------------------------ input limits
def test_images_above_the_pixel_budget_are_skipped_at_scan_time(tmp_path):
    root = make_dataset(tmp_path / "d", train_per_class=4, test_per_class=2)
    Image.new("RGB", (5000, 3750), (215, 215, 215)).save(root / "TRAIN" / "EOSINOPHIL" / "huge.png")
    m = D.build_manifest(root)
    skipped = {Path(s["path"]).name: s["error"] for s in m.skipped}
    assert "5000x3750 = 18.8 MP is above the pixel budget" in skipped["huge.png"]
    assert "huge.png" not in {Path(p).name for p in m.df["path"]} and len(m.split("TRAIN")) == 16


@pytest.mark.parametrize("how", ["an empty folder", "only unreadable files"])
def test_a_class_with_no_usable_training_image_is_an_error_naming_it(how, tmp_path):
    root = make_dataset(tmp_path / "d", train_per_class=6, test_per_class=2)
    mono = root / "TRAIN" / "MONOCYTE"
    for f in mono.iterdir():
        f.unlink()
    if how == "only unreadable files":
        (mono / "a.jpeg").write_text("not an image")
    cfg = make_config(None, data_dir=str(root), runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "c"), **TINY)
    with pytest.raises(ValueError, match="monocyte: 0 usable images in the training pool"):
        run_study(cfg, run_id="r")
    meta = RunStore(cfg.runs_dir).get("r").read_meta()
    assert meta["status"] == "failed" and not any(k.startswith("train:") for k in meta["stages"])


@pytest.mark.parametrize("flag,seeds", [("--seeds", "0"), ("--seeds", "-3"), ("--seeds", "1,-2"), ("--seeds", "1,1"),
                                        # a count that would build a billion seeds before any check; numpy's limit
                                        ("--seeds", "1000000000"), ("--seeds", "2,99999999999999999999"),
                                        ("--seed", "99999999999999999999")])
def test_bad_seeds_are_one_line_errors(flag, seeds):
    p = _wbc("study", flag, seeds)
    assert p.returncode == 2 and _one_line(p.stderr) and flag in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("run", ["", "  "])
def test_an_empty_resume_is_refused_and_starts_no_study(run, tmp_path):
    p = _wbc("study", "--resume", run, "--runs-dir", str(tmp_path / "runs"))  # e.g. an unset $RUN
    assert p.returncode == 2 and _one_line(p.stderr) and "--resume" in p.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# -------------------------------------------------------------------------------------- one error path
def test_report_on_a_truncated_table_is_one_line_and_debug_shows_the_traceback(store, tmp_path, capsys):
    _, runs, _, reference = store
    shutil.copytree(runs / reference, tmp_path / "runs" / reference)
    metrics = tmp_path / "runs" / reference / "metrics.parquet"
    metrics.write_bytes(metrics.read_bytes()[: metrics.stat().st_size // 2])
    code, _, err = _main(capsys, "report", reference, "--runs-dir", tmp_path / "runs")
    assert code == 1 and _one_line(err) and f"{metrics}: cannot be read" in err
    code, _, err = _main(capsys, "report", reference, "--runs-dir", tmp_path / "runs", "--debug")
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("wbc report: error:")


def test_report_into_a_closed_pipe_prints_no_traceback(store):
    """``wbc report RUN | head -1``: the reader goes away before the report is written."""
    _, runs, _, reference = store
    p = subprocess.Popen([sys.executable, "-m", "core", "report", reference, "--runs-dir", str(runs)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait()
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
    assert p.returncode == 141


def test_runs_lists_a_run_json_with_string_accuracy(tmp_path, capsys):
    s = RunStore(tmp_path)
    s.create({}, run_id="a-hand-edited").update_meta(status="finished", summary={"accuracy": {"original": "high"}})
    s.create({}, run_id="b-odd").update_meta(status="finished", summary={"accuracy": "0.9"})
    s.create({}, run_id="c-good").update_meta(status="finished", summary={"accuracy": {"original": 0.9}})
    code, out, err = _main(capsys, "runs", "--runs-dir", tmp_path)
    assert code == 0 and not err
    assert "original=high" in out and "original=0.900" in out and "b-odd" in out


def test_an_unexpected_error_is_one_line_naming_its_type(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(RunStore, "list_runs", lambda self: 1 / 0)
    code, _, err = _main(capsys, "runs", "--runs-dir", tmp_path)
    assert code == 1 and _one_line(err) and "ZeroDivisionError: division by zero" in err and "--debug" in err
    code, _, err = _main(capsys, "--debug", "runs", "--runs-dir", tmp_path)
    assert code == 1 and "Traceback" in err and "ZeroDivisionError" in err


# ----------------------------------------------------------------------------------------- wbc enhance
def _images(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        cell_image("lymphocyte", rng).save(folder / f"cell{i}.png")
    return folder


@pytest.mark.parametrize("where", ["IN itself", "IN through a symlink", "the parent of IN", "inside IN"])
def test_enhance_out_never_overlaps_in(where, tmp_path, capsys):
    src = _images(tmp_path / "data" / "cells")
    (tmp_path / "link").symlink_to(src)
    out = {"IN itself": src, "IN through a symlink": tmp_path / "link", "the parent of IN": src.parent,
           "inside IN": src / "enhanced"}[where]
    before = sorted(tmp_path.rglob("*"))
    code, _, err = _main(capsys, "enhance", "--model", "bicubic-x4", src, out)
    assert code == 2 and _one_line(err) and "OUT_DIR" in err and "outside IN_DIR" in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written: no outputs, no enhance_errors.csv in IN


def test_enhance_checks_out_is_writable_before_any_image(tmp_path, unwritable, capsys, monkeypatch):
    import core.enhance

    made = []
    monkeypatch.setattr(core.enhance, "create_enhancer", lambda *a, **k: made.append(1))
    src = _images(tmp_path / "cells")
    code, _, err = _main(capsys, "enhance", "--model", "bicubic-x4", src, unwritable)
    assert code == 2 and _one_line(err) and f"OUT_DIR {unwritable}: not writable" in err and not made


# ------------------------------------------------------------------ bad input found by a probe (2026-11-27)
@pytest.mark.parametrize("flags, words", [
    (["--lr", "nan"], "--lr: must be a finite number > 0"),
    (["--lr", "inf"], "--lr: must be a finite number > 0"),
    (["--weight-decay", "nan"], "--weight-decay: must be a finite number in [0, 1)"),
    (["--weight-decay", "-0.1"], "--weight-decay: must be a finite number in [0, 1)"),
    (["--image-size", ","], "--image-size: at least one size is needed"),
    (["--image-size", "32,32"], "--image-size: duplicate size in 32,32"),
])
def test_bad_rate_or_sizes_fail_before_any_run_folder(flags, words, data_dir, tmp_path, capsys):
    code, _, err = _main(capsys, "study", "--data", data_dir, *TINY_ARGS, *flags, "--runs-dir", tmp_path / "runs",
                         "--cache-dir", tmp_path / "c")
    assert code == 2 and _one_line(err) and words in err, err
    assert not (tmp_path / "runs").exists()


def test_weight_decay_flag_sets_the_config_and_the_preset_default_stays():
    from core.cli import build_parser, config_from_args

    def cfg(preset, *flags):
        return config_from_args(build_parser().parse_args(["study", "--preset", preset, *flags]))

    assert cfg("quick", "--weight-decay", "0.05").weight_decay == 0.05
    assert cfg("quick").weight_decay == 1e-4 and cfg("cpu").weight_decay == 0.05  # the presets' own (BENCHMARKS)
    assert cfg("quick").augment == "dihedral+jitter" and cfg("cpu").augment == "dihedral-batch"  # (BENCHMARKS)
    assert cfg("cpu", "--weight-decay", "0").weight_decay == 0.0


@pytest.mark.parametrize("how", ["no class folders", "class folders of text files", "empty class folders",
                                 "a test folder without images"])
def test_data_without_image_files_fails_before_any_run_folder(how, data_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    if how != "no class folders":
        for c in ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"):
            (bad / "TRAIN" / c).mkdir(parents=True)
            if how == "class folders of text files":
                (bad / "TRAIN" / c / "notes.txt").write_text("not an image")
    flags = ["--data", data_dir, "--test-dir", bad / "TRAIN"] if how.startswith("a test") else ["--data", bad]
    code, _, err = _main(capsys, "study", *flags, *TINY_ARGS, "--runs-dir", tmp_path / "runs",
                         "--cache-dir", tmp_path / "c")
    assert code != 0 and "Traceback" not in err
    first = err.strip().splitlines()[0]
    if how == "no class folders":
        assert "no TRAIN/ or class folders found there" in first
    else:
        flag = "--test-dir" if how.startswith("a test") else "--data"
        assert _one_line(err) and f"{flag}: {bad / 'TRAIN'} has class folders but no image files" in first, err
    assert not (tmp_path / "runs").exists()  # no failed run left in the store


def test_empty_path_flags_are_refused_not_read_as_the_default():
    for args in (["runs", "--runs-dir", ""], ["study", "--data", " "], ["audit", ""]):
        p = _wbc(*args)
        assert p.returncode == 2 and _one_line(p.stderr) and "an empty path" in p.stderr, (args, p.stderr)


@pytest.mark.parametrize("flags, words", [
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--per-class", "0"], "--per-class: must be >= 2"),
    (["--per-class", "-1"], "--per-class: must be >= 2"),
    (["--threshold", "nan"], "--threshold: a cosine-distance cut in (0, 2)"),
    (["--threshold", "-1"], "--threshold: a cosine-distance cut in (0, 2)"),
    (["--out", "FOLDER"], "is a folder; give a file name"),
    (["--out", "TEXT"], "exists and is not a .parquet file; refusing to overwrite it"),
])
def test_audit_flags_are_checked_before_any_embedding(flags, words, data_dir, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    flags = [{"FOLDER": tmp_path / "folder", "TEXT": tmp_path / "notes.txt"}.get(f, f) for f in flags]
    code, _, err = _main(capsys, "audit", data_dir, *flags, "--cache-dir", tmp_path / "cache")
    assert code == 2 and _one_line(err) and words in err, err
    assert not (tmp_path / "cache").exists() and (tmp_path / "notes.txt").read_text() == "mine"


def _copy_run(store, tmp_path) -> tuple[Path, str]:
    _, runs, _, reference = store
    shutil.copytree(runs / reference, tmp_path / "runs" / reference)
    return tmp_path / "runs" / reference, reference


def test_runs_and_report_print_no_terminal_control_codes_from_a_run_folder(store, tmp_path, capsys):
    """run.json is anyone's text: ESC (clear the screen, recolour), BEL and CR reach no terminal, and a note with a
    newline cannot print a line of its own (a fake "accuracy")."""
    rd, rid = _copy_run(store, tmp_path)
    meta = json.loads((rd / "run.json").read_text())
    meta["notes"] = ["line1\nFAKE: accuracy 0.99 \x1b[2J\x1b[31m\x07\r"]
    meta["device"] = "cpu\x1b]0;title\x07"
    (rd / "run.json").write_text(json.dumps(meta))
    for args in (("report", rid), ("runs",), ("report", rid, "--format", "md")):
        code, out, err = _main(capsys, *args, "--runs-dir", tmp_path / "runs")
        assert code == 0, err
        assert not any(c in out + err for c in "\x1b\x07\r\x9b"), repr(out[:300])
        assert not any(line.startswith("FAKE") for line in out.splitlines())
    assert "note: line1 FAKE: accuracy 0.99 ?[2J?[31m?\n" in _main(capsys, "report", rid, "--runs-dir", tmp_path / "runs")[1]
    meta.update(notes=["n" * 5_000_000], status="fin\nished " * 100)  # a 5 MB note; a status 1,300 long
    (rd / "run.json").write_text(json.dumps(meta))
    code, out, _ = _main(capsys, "report", rid, "--runs-dir", tmp_path / "runs")
    assert code == 0 and "note: " + "n" * 599 + "…\n" in out and len(out) < 100_000
    code, out, _ = _main(capsys, "runs", "--runs-dir", tmp_path / "runs")
    assert code == 0 and max(len(line) for line in out.splitlines()) < 250, out


def test_report_html_never_overwrites_a_run_file_or_a_non_html_file(store, tmp_path, capsys):
    rd, rid = _copy_run(store, tmp_path)
    before = (rd / "run.json").read_bytes()
    code, _, err = _main(capsys, "report", rid, "--runs-dir", tmp_path / "runs", "--html", rd / "run.json")
    assert code == 2 and _one_line(err) and "is not an .html file; refusing to overwrite it" in err
    assert (rd / "run.json").read_bytes() == before
    (tmp_path / "a-file").write_text("x")
    code, _, err = _main(capsys, "report", rid, "--runs-dir", tmp_path / "runs", "--html", tmp_path / "a-file" / "r.html")
    assert code == 2 and _one_line(err) and "a-file is a file, not a folder" in err
    old = tmp_path / "r.html"
    old.write_text("an earlier report")
    code, _, err = _main(capsys, "report", rid, "--runs-dir", tmp_path / "runs", "--html", old)
    assert code == 0 and "an earlier report" not in old.read_text() and rid in old.read_text()
    # a run's own table is refused as audit's --out too (it overwrote metrics.parquet: the report lost a section)
    table = next(rd.glob("*.parquet"))
    before = table.read_bytes()
    code, _, err = _main(capsys, "audit", str(tmp_path), "--out", table)
    assert code == 2 and _one_line(err) and "is a file of the run in" in err and table.read_bytes() == before


def test_latest_is_the_newest_run_not_the_last_name(tmp_path, capsys):
    s = RunStore(tmp_path)
    s.create({}, run_id="20261127-000000-quick-aaaa").update_meta(status="finished")
    s.create({}, run_id="aaa-old-baseline").update_meta(status="finished", created_at="2020-01-01T00:00:00+00:00")
    s.create({}, run_id="zzz-damaged")
    (tmp_path / "zzz-damaged" / "run.json").write_text("{")
    os.utime(tmp_path / "zzz-damaged", (0, 0))  # unreadable run.json: the folder's own time (1970)
    assert s.run_ids() == ["20261127-000000-quick-aaaa", "aaa-old-baseline", "zzz-damaged"]
    code, out, _ = _main(capsys, "report", "latest", "--runs-dir", tmp_path)
    assert out.startswith("run 20261127-000000-quick-aaaa")


def test_run_json_fields_of_the_wrong_type_read_as_absent(store, tmp_path, capsys):
    from dashboard.app import PAGES, build_app
    from dashboard.state import AppState

    rd, rid = _copy_run(store, tmp_path)
    meta = json.loads((rd / "run.json").read_text())
    meta["weights"]["enhancers"]["x"] = "str"
    meta["weights"]["enhancers"]["bicubic-x4"]["sha256"] = 12345
    meta["config"]["seeds"] = 5
    meta.update(notes="a single note", error="boom", skipped=3)
    (rd / "run.json").write_text(json.dumps(meta))
    code, out, err = _main(capsys, "report", rid, "--runs-dir", tmp_path / "runs")
    assert code == 0 and not err
    assert out.count("note: a single note") == 1 and "error: boom" in out
    state = AppState(runs_dir=str(tmp_path / "runs"), run_id=rid)
    build_app(state, eager=True)
    for page in PAGES:  # every page builds over the same run.json
        state.page = page


def test_report_names_a_skipped_file_and_why_not_a_python_dict(store, tmp_path, capsys):
    import json

    rd, rid = _copy_run(store, tmp_path)
    meta = json.loads((rd / "run.json").read_text())
    meta["skipped"] = [{"path": "/data/TRAIN/EOSINOPHIL/x.jpeg", "split": "TRAIN", "error": "truncated\nJPEG"}, 3]
    (rd / "run.json").write_text(json.dumps(meta))
    code, out, _ = _main(capsys, "report", rid, "--runs-dir", tmp_path / "runs")
    assert code == 0
    assert "1 files skipped (unreadable or not images), e.g. /data/TRAIN/EOSINOPHIL/x.jpeg (truncated JPEG)" in out
    assert "{'path'" not in out


def test_a_table_column_of_the_wrong_type_is_a_damaged_table(store, tmp_path, capsys):
    rd, rid = _copy_run(store, tmp_path)
    m = pd.read_parquet(rd / "metrics.parquet")
    m.assign(f1="high").to_parquet(rd / "metrics.parquet")
    code, _, err = _main(capsys, "report", rid, "--runs-dir", tmp_path / "runs", "--format", "md")
    assert code == 1 and _one_line(err)
    assert f"{rd / 'metrics.parquet'}: cannot be read (column 'f1' holds values that are not float)" in err
    # a flag stored as text: "False" would read as True (a grouped split reported as leaky); damaged instead
    m.to_parquet(rd / "metrics.parquet")
    v = pd.read_parquet(rd / "validation.parquet")
    v.assign(leaky=v["leaky"].map(str)).to_parquet(rd / "validation.parquet")
    code, _, err = _main(capsys, "report", rid, "--runs-dir", tmp_path / "runs")
    assert code == 1 and _one_line(err) and "column 'leaky' holds values that are not bool" in err


class _RunsCode:
    """A pickle that runs a shell command when it is loaded without ``weights_only``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_explain_loads_weights_only_and_names_a_damaged_checkpoint(store, tmp_path, capsys):
    rd, rid = _copy_run(store, tmp_path)
    ck = rd / "checkpoints" / "original-s0-32.pt"
    torch.save({"config": {}, "state_dict": {}, "x": _RunsCode(tmp_path / "pwned")}, ck)
    args = ["explain", rid, "--runs-dir", tmp_path / "runs", "--variant", "original", "--limit", "1"]
    code, _, err = _main(capsys, *args)
    assert code == 2 and _one_line(err) and f"{ck}: not a readable checkpoint of this study" in err, err
    assert not (tmp_path / "pwned").exists()
    ck.write_text("garbage\n")
    code, _, err = _main(capsys, *args)
    assert code == 2 and _one_line(err) and f"{ck}: not a readable checkpoint of this study" in err, err


def test_explain_refuses_a_variant_name_that_leaves_the_run(store, tmp_path, capsys):
    rd, rid = _copy_run(store, tmp_path)
    evil = "../../../escape/x"
    pred = pd.read_parquet(rd / "predictions.parquet")
    pred.assign(variant=evil).to_parquet(rd / "predictions.parquet")
    (tmp_path / "escape").mkdir()
    shutil.copy(rd / "checkpoints" / "original-s0-32.pt", tmp_path / "escape" / "x-s0-32.pt")
    code, _, err = _main(capsys, "explain", rid, "--runs-dir", tmp_path / "runs", "--variant", evil, "--limit", "1")
    assert code == 2 and _one_line(err) and "invalid variant name '../../../escape/x'" in err, err
    assert [p.name for p in (tmp_path / "escape").iterdir()] == ["x-s0-32.pt"]  # nothing written beside it


def test_a_run_stopped_before_its_statistics_shows_its_scorecard(store, tmp_path, capsys):
    """validation.parquet is written per model, stats.parquet at the end: a cancelled run has the first only."""
    import panel as pn

    from dashboard.app import PAGES, build_app
    from dashboard.pages.overview import scorecard_frame
    from dashboard.state import AppState

    rd, rid = _copy_run(store, tmp_path)
    (rd / "stats.parquet").unlink()
    RunStore(tmp_path / "runs").get(rid).update_meta(status="cancelled")
    state = AppState(runs_dir=str(tmp_path / "runs"), run_id=rid)
    card = scorecard_frame(state, rid)
    assert len(card) == 2 and card["this run validation acc"].notna().all()
    assert list(card.columns)[2:6] == ["paper validation acc", "this run validation acc", "test acc (unseen cells)",
                                       "test 95% CI"]  # the numbers to compare first: visible without scrolling
    # the test accuracy comes straight from the predictions, as in the accuracy table beside it, without a CI
    pred = pd.read_parquet(rd / "predictions.parquet")
    direct = pred.groupby("variant", sort=False)["correct"].mean()
    assert card.set_index("variant")["test acc (unseen cells)"].to_dict() == {v: f"{x:.3f}" for v, x in direct.items()}
    assert (card["test 95% CI"] == "none: no statistics").all()
    code, out, _ = _main(capsys, "report", rid, "--runs-dir", tmp_path / "runs")
    assert code == 0 and f"{direct['original']:.3f} (no CI: the run stopped before its statistics)" in out, out
    tpl = build_app(state, eager=True)
    for page in PAGES:
        state.page = page
        bad = [a.object for a in tpl.main[0].select(pn.pane.Alert) if a.visible and a.alert_type == "danger"]
        assert not bad, (page, bad)
    state.page = "Overview"
    acc = [t.value for t in tpl.main[0].select(pn.widgets.Tabulator) if "wbc-acc-table" in t.css_classes][0]
    assert acc["accuracy"].notna().all() and not {"macro_f1", "balanced_acc"} & set(acc.columns)  # no NaN columns


@pytest.mark.parametrize("how", ["--device cuda without a GPU", "an empty IN_DIR", "weights that are not weights"])
def test_enhance_that_cannot_start_leaves_no_empty_out_dir(how, tmp_path, capsys):
    if how.startswith("--device") and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    if not how.startswith("an empty"):
        cell_image("eosinophil", np.random.default_rng(0)).save(src / "a.png")
    junk = tmp_path / "junk.pth"
    junk.write_text("these are not weights\n" * 3)
    flags = {"--device cuda without a GPU": ["--model", "bicubic-x4", "--device", "cuda"],
             "an empty IN_DIR": ["--model", "bicubic-x4"],
             "weights that are not weights": ["--model", "realesr-animevideov3", "--weights", junk]}[how]
    code, _, err = _main(capsys, "enhance", *flags, src, out)
    lines = err.strip().splitlines()  # "N input files: ..." may come first; the error is the last line, and one
    assert code in (1, 2) and "Traceback" not in err and lines[-1].startswith("wbc enhance: error:"), err
    assert sum("error" in line for line in lines) == 1 and not any(line.startswith(" ") for line in lines), err
    assert not out.exists(), how


def test_each_sub_step_of_a_stage_has_its_own_eta(tmp_path, monkeypatch):
    """A stage trains, then predicts a test folder of thousands: the prediction's ETA counts its own time, not the
    training's before it (it said ~19x too long), and the model's predict reports its images as it goes."""
    import core.pipeline as pipeline
    from core.pipeline import Progress

    clock = [0.0]
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: clock[0])
    run = RunStore(tmp_path).create({})
    prog = Progress(run, ["train"])
    prog.start("train")
    training, predicting = prog.callback("training"), prog.callback("predicting the test images (8 views)")
    for t, done in ((10.0, 50), (20.0, 100)):
        clock[0] = t
        training(done, 100, f"epoch {done // 50}/2")  # the message changes by epoch: still one sub-step
    assert run.read_progress()["eta_s"] == 0
    clock[0] = 21.0
    predicting(10, 100)
    p = run.read_progress()
    assert p["message"] == "predicting the test images (8 views)" and p["eta_s"] == pytest.approx(9.0)

    import torch

    from core.engine import predict
    from core.models import create_classifier

    model, _ = create_classifier("simple_cnn", 4, "none")
    seen = []
    predict(model, torch.zeros(5, 3, 32, 32, dtype=torch.uint8), torch.device("cpu"), batch_size=2, tta=2,
            on_progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 5), (2, 5), (4, 5), (5, 5)]


def test_runs_says_when_the_runs_folder_is_missing_or_a_file(tmp_path, capsys):
    """A mistyped --runs-dir is noticed: a file is an error (exit 2, one line), a missing folder is said so."""
    (tmp_path / "afile").write_text("x")
    code, out, err = _main(capsys, "runs", "--runs-dir", tmp_path / "afile")
    assert code == 2 and _one_line(err) and "is a file, not a folder of runs" in err
    code, out, err = _main(capsys, "runs", "--runs-dir", tmp_path / "nope")
    assert code == 0 and "(no such folder yet)" in out and not (tmp_path / "nope").exists()


def test_report_warns_when_a_finished_run_lacks_a_table(store, tmp_path, capsys):
    """A deleted table (or a folder in its place) left a section blank with exit 0 and no word: now one warning
    line on stderr names it; the rest of the report is still printed."""
    rd, rid = _copy_run(store, tmp_path)
    code, out, err = _main(capsys, "report", rid, "--runs-dir", tmp_path / "runs")
    assert code == 0 and "warning" not in err
    (rd / "metrics.parquet").unlink()
    (rd / "confusion.parquet").unlink()
    (rd / "confusion.parquet").mkdir()
    code, out, err = _main(capsys, "report", rid, "--runs-dir", tmp_path / "runs")
    assert code == 0 and _one_line(err) and "metrics.parquet, confusion.parquet are missing or not a file" in err
    assert out.startswith(f"run {rid}: finished")


def test_a_run_json_nested_too_deep_is_unreadable_not_a_recursion_error(tmp_path, capsys):
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "run.json").write_text("[" * 100_000 + "]" * 100_000)
    code, out, err = _main(capsys, "report", "deep", "--runs-dir", tmp_path)
    assert code == 1 and _one_line(err) and "deep/run.json unreadable (RecursionError" in err
    code, out, err = _main(capsys, "runs", "--runs-dir", tmp_path)
    assert code == 0 and "unreadable" in out


def test_report_of_a_run_json_without_a_config_does_not_show_defaults(store, tmp_path, capsys):
    """config: ["a"] in run.json: the input line says unknown, not the default 224 px as if the run had used it."""
    rd, rid = _copy_run(store, tmp_path)
    meta = json.loads((rd / "run.json").read_text())
    meta["config"] = ["a"]
    (rd / "run.json").write_text(json.dumps(meta))
    code, out, err = _main(capsys, "report", rid, "--runs-dir", tmp_path / "runs")
    assert code == 0 and "input: unknown (run.json holds no readable config)\n" in out


def test_explain_of_a_run_without_predictions_says_so(tmp_path, capsys):
    """A run cancelled before its first model: "0 Grad-CAM maps of 0 images", exit 0, said nothing; now one line."""
    RunStore(tmp_path).create({}, run_id="stopped-early").update_meta(status="cancelled")
    code, out, err = _main(capsys, "explain", "stopped-early", "--runs-dir", tmp_path)
    assert code == 2 and _one_line(err) and "run stopped-early (cancelled) has no predictions: nothing to explain" in err


def test_report_warns_when_predictions_name_a_class_that_is_not_one_of_the_four(store, tmp_path, capsys):
    """A label renamed inside predictions.parquet gave a confusion row of zeros without a word."""
    rd, rid = _copy_run(store, tmp_path)
    p = pd.read_parquet(rd / "predictions.parquet")
    p.assign(true_label=p["true_label"].replace("monocyte", "mono\x1b[2Jcyte")).to_parquet(rd / "predictions.parquet")
    code, out, err = _main(capsys, "report", rid, "--runs-dir", tmp_path / "runs")
    assert code == 0 and _one_line(err) and "name classes that are not eosinophil, lymphocyte, monocyte, neutrophil" in err
    assert "(e.g. mono?[2Jcyte)" in err
