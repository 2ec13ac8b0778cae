"""Run store: schemas, atomic writes, listing with unreadable folders."""

import json
from pathlib import Path

import pandas as pd
import pytest

from core.fsio import atomic_write_json
from core.store import SCHEMAS, Run, RunStore, conform


def test_create_get_and_list(tmp_path):
    store = RunStore(tmp_path)
    r = store.create({"preset": "quick", "variants": ["original", "bicubic-x4"], "classifier": "simple_cnn"})
    assert r.read_meta()["status"] == "queued"
    r.update_meta(status="finished", summary={"accuracy": {"original": 0.5}}, data={"test_source": "TEST"})
    assert store.get(r.run_id).read_meta()["status"] == "finished"
    df = store.list_runs()
    assert df.loc[0, "run_id"] == r.run_id and df.loc[0, "accuracy"] == {"original": 0.5}
    assert df.loc[0, "variants"] == "original,bicubic-x4" and df.loc[0, "test_set"] == "TEST"
    with pytest.raises(FileExistsError):
        store.create({}, run_id=r.run_id)


def test_unreadable_run_folder_gives_warning_row(tmp_path):
    store = RunStore(tmp_path)
    good = store.create({"preset": "quick"})
    (tmp_path / "half-written").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text('{"status": "runn')
    df = store.list_runs().set_index("run_id")
    assert df.loc[good.run_id, "status"] == "queued"
    assert df.loc["half-written", "status"] == "unreadable" and "FileNotFoundError" in df.loc["half-written", "warning"]
    assert df.loc["broken", "status"] == "unreadable" and "JSONDecodeError" in df.loc["broken", "warning"]


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "a" * 200])
def test_run_ids_cannot_escape_the_store(tmp_path, bad):
    with pytest.raises((ValueError, KeyError)):
        RunStore(tmp_path).get(bad)


def test_tables_conform_to_schema(tmp_path):
    r = RunStore(tmp_path).create({})
    df = pd.DataFrame({"variant": ["original"], "seed": [0], "image_size": [224], "label": ["accuracy"],
                       "f1": [0.9], "support": [10]})
    r.write_table("metrics", df)
    back = r.table("metrics")
    assert list(back.columns) == SCHEMAS["metrics"]
    assert back.loc[0, "f1"] == 0.9 and pd.isna(back.loc[0, "precision"])
    with pytest.raises(ValueError, match="not in the schema"):
        conform("metrics", df.assign(bogus=1))
    assert list(r.table("stats").columns) == SCHEMAS["stats"]  # absent table: empty, right columns
    with pytest.raises(ValueError, match="unknown table"):
        r.table("nope")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    atomic_write_json(tmp_path / "x.json", {"a": 2})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_progress_log_and_cancel(tmp_path):
    r = RunStore(tmp_path).create({})
    r.write_progress(stage="train", done=3, total=10)
    assert r.read_progress()["done"] == 3
    r.log("hello")
    r.log("world")
    assert [line.split(" ", 1)[1] for line in r.log_tail(2)] == ["hello", "world"]
    assert not r.cancel_requested()
    r.request_cancel()
    assert Run(r.path).cancel_requested()


# ------------------------------------------------------------------ the typed contract and older layouts
V1 = Path(__file__).parent / "fixtures" / "store-v1"  # a run made by the code before schema versions (1d87421~1)


def test_a_stored_version_1_run_reads_through_the_api(tmp_path):
    import shutil

    from core.config import StudyConfig
    from core.store import SCHEMA_VERSION, Table

    shutil.copytree(V1, tmp_path / "runs")
    store = RunStore(tmp_path / "runs")
    [entry] = store.list()
    info = entry.info
    assert entry.status == "finished" and info.schema_version == 1 < SCHEMA_VERSION
    assert info.variants == ["original", "bicubic-x4"] and set(info.accuracy()) == {"original", "bicubic-x4"}
    cfg = StudyConfig.from_dict(info.config)  # augment=True (bool) of the old layout migrates
    assert (cfg.input_policy, cfg.augment, cfg.tta, cfg.select_by) == ("full", "dihedral-batch", 1, "val_loss")
    run = entry.run
    pred = run.table(Table.PREDICTIONS)
    assert list(pred.columns) == SCHEMAS["predictions"] and len(pred) == 24
    assert pred["box_left"].isna().all() and pred["region_note"].isna().all()  # columns added later: nulls
    assert pred["correct"].dtype == bool and pred["prob_eosinophil"].dtype == "float64"
    hist = run.table("history")
    assert hist["val_macro_f1"].isna().all() and hist["epoch"].dtype == "int64"
    assert run.table("validation").empty  # a table added later: empty, with its columns
    assert run.progress.stage == "finished" and run.progress.fraction_percent() is not None


def test_a_newer_layout_is_unreadable_with_a_clear_reason(tmp_path):
    from core.store import DamagedRun

    store = RunStore(tmp_path)
    r = store.create({"preset": "quick"})
    assert r.info.schema_version >= 2
    r.update_meta(schema_version=99)
    with pytest.raises(DamagedRun, match="schema_version 99 is newer"):
        r.info
    [entry] = store.list()
    assert entry.status == "unreadable" and "newer" in entry.warning


def test_typed_records_tolerate_hand_edited_values(tmp_path):
    from core.store import Progress, RunInfo

    info = RunInfo.from_json({"status": "finished", "config": "nope", "duration_s": "long", "error": "boom",
                              "summary": {"accuracy": "high"}}, "r")
    assert info.config == {} and info.duration_s is None and info.error_message == "boom" and info.accuracy() == {}
    p = Progress.from_json({"done": "3", "total": 10, "percent": None, "pid": 12.0, "stage": 5})
    assert (p.done, p.total, p.pid, p.stage, p.fraction_percent()) == (None, 10.0, 12, "5", 0.0)


def test_stats_names_are_typed_constants():
    from core.store import Metric, StatKind, class_metric

    assert StatKind.PAIRED == "paired" and Metric.ACCURACY_DIFF == "accuracy_diff"
    assert class_metric("recall", "eosinophil") == "recall:eosinophil"
    df = pd.DataFrame({"kind": ["ci", "paired"]})
    assert (df["kind"] == StatKind.CI).tolist() == [True, False]  # enum members compare as their strings


def test_writes_cast_to_the_schema_dtypes(tmp_path):
    r = RunStore(tmp_path).create({})
    r.write_table("confusion", pd.DataFrame({"variant": ["original"], "seed": [0.0], "image_size": [224.0],
                                             "true_label": ["eosinophil"], "pred_label": ["eosinophil"],
                                             "count": [3.0]}))
    back = r.table("confusion")
    assert back["count"].dtype == "int64" and back["seed"].dtype == "int64"


def test_read_within_checks_the_file_it_has_open(tmp_path, monkeypatch):
    """``core.fsio.read_within``: the name is checked before anything is opened, and the open file again, so a
    link (to a file or a folder) swapped in between the two reads nothing outside; special, huge and unusable
    paths are refused without blocking; a missing file is an OSError, not a refusal."""
    import os

    from core.fsio import NotAllowed, read_within

    root, private = tmp_path / "root", tmp_path / "private"
    (root / "sub").mkdir(parents=True)
    private.mkdir()
    (private / "f.jpg").write_bytes(b"SECRET")
    (root / "f.jpg").write_bytes(b"cell")
    (root / "sub" / "f.jpg").write_bytes(b"cell in sub")
    roots = [root.resolve()]
    assert read_within(root / "f.jpg", roots) == b"cell"
    assert read_within(root / "sub" / ".." / "f.jpg", roots) == b"cell"
    (root / "inside-link.jpg").symlink_to(root / "f.jpg")  # a link that stays inside is fine
    assert read_within(root / "inside-link.jpg", roots) == b"cell"

    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(os.fspath(p)) or real_open(p, *a, **k))
    for bad in (private / "f.jpg", root / ".." / "private" / "f.jpg"):
        with pytest.raises(NotAllowed, match="outside the folders"):
            read_within(bad, roots)
    (root / "out-link.jpg").symlink_to(private / "f.jpg")
    with pytest.raises(NotAllowed, match="outside the folders"):
        read_within(root / "out-link.jpg", roots)
    assert not any(str(private) in p for p in opened)  # refused by name: never opened

    def swap_then_open(swap):
        def fake(p, *a, **k):  # the attacker's move, after the name check and before the open
            swap()
            return real_open(p, *a, **k)
        return fake

    def file_to_link():
        (root / "f.jpg").unlink()
        (root / "f.jpg").symlink_to(private / "f.jpg")

    def folder_to_link():
        os.rename(root / "sub", tmp_path / "sub-moved")
        (root / "sub").symlink_to(private)

    for swap, path in ((file_to_link, root / "f.jpg"), (folder_to_link, root / "sub" / "f.jpg")):
        monkeypatch.setattr(os, "open", swap_then_open(swap))
        with pytest.raises(NotAllowed, match="outside the folders"):
            read_within(path, roots)
    monkeypatch.setattr(os, "open", real_open)

    os.mkfifo(root / "pipe.jpg")  # would block a plain open until a writer came
    with pytest.raises(NotAllowed, match="not a regular file"):
        read_within(root / "pipe.jpg", roots)
    (root / "big.jpg").write_bytes(b"x" * 2048)
    with pytest.raises(NotAllowed, match="larger than"):
        read_within(root / "big.jpg", roots, max_bytes=1024)
    for unusable in ("/tmp/\x00nul", None):
        with pytest.raises(NotAllowed, match="not a usable path"):
            read_within(unusable, roots)
    with pytest.raises(OSError) as gone:
        read_within(root / "gone.jpg", roots)
    assert not isinstance(gone.value, NotAllowed)

    def no_proc(*a, **k):
        raise FileNotFoundError("no /proc")

    monkeypatch.setattr(os, "readlink", no_proc)  # no /proc mounted: the open file is checked by device and inode
    (root / "g.jpg").write_bytes(b"cell")
    assert read_within(root / "g.jpg", roots) == b"cell"

    def swap_g():
        (root / "g.jpg").unlink()
        (root / "g.jpg").symlink_to(private / "f.jpg")

    monkeypatch.setattr(os, "open", swap_then_open(swap_g))
    with pytest.raises(NotAllowed, match="outside the folders"):
        read_within(root / "g.jpg", roots)


def test_paper_table_shows_supports_as_counts_over_several_seeds():
    from core.metrics import metrics_rows, paper_table

    y = ["eosinophil"] * 3 + ["neutrophil"] * 5
    m = pd.concat([metrics_rows({"variant": "original", "seed": s}, y, p)
                   for s, p in ((0, y), (1, ["neutrophil"] * 8))], ignore_index=True)
    t = paper_table(m, values=("recall", "support")).set_index("class")
    assert str(t["original support"].dtype) == "Int64"
    assert t.loc["eosinophil", "original support"] == 3 and t.loc["accuracy", "original support"] == 8
    assert t.loc["eosinophil", "original recall"] == 0.5  # the mean over seeds stays a mean
