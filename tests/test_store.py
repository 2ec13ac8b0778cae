"""Run store: schemas, atomic writes, listing with unreadable folders."""

import json

import pandas as pd
import pytest

from core.store import SCHEMAS, Run, RunStore, atomic_write_json, conform


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
    back = r.read_table("metrics")
    assert list(back.columns) == SCHEMAS["metrics"]
    assert back.loc[0, "f1"] == 0.9 and pd.isna(back.loc[0, "precision"])
    with pytest.raises(ValueError, match="not in the schema"):
        conform("metrics", df.assign(bogus=1))
    assert list(r.read_table("stats").columns) == SCHEMAS["stats"]  # absent table: empty, right columns
    with pytest.raises(ValueError, match="unknown table"):
        r.read_table("nope")


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
