"""A tiny end-to-end study on generated images (seconds), the stored tables, failures and the CLI."""

from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import classification_report, confusion_matrix

from core import RunStore, make_config, run_study
from core.config import CLASSES, PROB_COLUMNS
from core.engine import Cancelled
from core.store import SCHEMAS
from tests.gen_data import make_dataset

TINY = dict(classifier="simple_cnn", pretrained="none", image_sizes=(32,), epochs=2, batch_size=8,
            variants=("original", "bicubic-x4"), split="random")


def _distinct_images(root) -> int:
    from core.data import build_manifest

    return build_manifest(root).df["sha1"].nunique()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), train_per_class=10, test_per_class=4)


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    cfg = make_config(None, data_dir=str(data_dir), runs_dir=str(root / "runs"), cache_dir=str(root / "cache"),
                      **TINY)
    events = []
    run = run_study(cfg, on_progress=events.append)
    return run, cfg, events


def test_run_finishes_and_describes_itself(tiny_run):
    run, cfg, events = tiny_run
    meta = run.read_meta()
    assert meta["status"] == "finished"
    assert meta["config"]["variants"] == ["original", "bicubic-x4"]
    assert meta["data"]["test_source"] == "TEST_SIMPLE" and meta["data"]["split"] == "random"
    assert set(meta["summary"]["accuracy"]) == {"original", "bicubic-x4"}
    # every distinct image (by sha1) of the pool and the test set, enhanced once
    assert meta["weights"]["enhancers"]["bicubic-x4"]["made"] == _distinct_images(cfg.data_dir)
    assert {"data", "groups", "enhance:bicubic-x4", "train:original:s0:32"} <= set(meta["stages"])
    assert meta["versions"]["torch"] and meta["device"] == "cpu"
    stages = [e["stage"] for e in events]
    assert stages.index("data") < stages.index("enhance:bicubic-x4") < stages.index("train:original:s0:32")
    assert events[-1]["stage"] == "finished" and events[-1]["percent"] == 100
    pct = [e["percent"] for e in events]
    assert pct == sorted(pct)  # overall progress never goes back


def test_run_json_records_the_code_version(tiny_run):
    run, _, _ = tiny_run
    versions = run.read_meta()["versions"]
    assert {"python", "torch", "numpy"} <= set(versions)
    if (Path(__file__).resolve().parent.parent / ".git").exists():  # a git checkout: its commit is recorded
        assert len(versions["code"].split("+")[0]) >= 7


def test_run_json_says_how_each_variant_was_made(tiny_run):
    from dashboard.pages.overview import provenance_table

    run, cfg, _ = tiny_run
    t = provenance_table(run.read_meta()).set_index("variant")
    assert list(t.index) == ["original", "bicubic-x4"]
    assert t.loc["bicubic-x4", "method"] == "PIL BICUBIC" and t.loc["bicubic-x4", "made"] > 0


def test_tables_match_schema_and_sklearn(tiny_run):
    run, cfg, _ = tiny_run
    pred = run.table("predictions")
    assert list(pred.columns) == SCHEMAS["predictions"]
    assert len(pred) == 2 * 16 and pred.groupby("variant").size().eq(16).all()
    assert pred[list(PROB_COLUMNS)].sum(axis=1).round(6).eq(1).all()
    assert pred.loc[pred["variant"] == "original", "enhanced_path"].isna().all()
    enh = pred.loc[pred["variant"] == "bicubic-x4", "enhanced_path"]
    assert enh.map(lambda p: Path(p).is_file()).all()
    mis = run.table("misclassified")
    assert len(mis) == (~pred["correct"]).sum() and not mis["correct"].any()
    metrics, confusion = run.table("metrics"), run.table("confusion")
    for v, g in pred.groupby("variant"):
        rep = classification_report(g["true_label"], g["pred_label"], labels=list(CLASSES), output_dict=True,
                                    zero_division=0)
        m = metrics[metrics["variant"] == v].set_index("label")
        for label in [*CLASSES, "macro avg", "weighted avg"]:
            assert m.loc[label, "precision"] == rep[label]["precision"]
            assert m.loc[label, "recall"] == rep[label]["recall"]
            assert m.loc[label, "f1"] == rep[label]["f1-score"]
            assert m.loc[label, "support"] == rep[label]["support"]
        assert m.loc["accuracy", "f1"] == g["correct"].mean()
        cm = confusion_matrix(g["true_label"], g["pred_label"], labels=list(CLASSES))
        c = confusion[confusion["variant"] == v].pivot(index="true_label", columns="pred_label", values="count")
        assert (c.loc[list(CLASSES), list(CLASSES)].to_numpy() == cm).all()
    hist = run.table("history")
    assert set(hist["variant"]) == {"original", "bicubic-x4"} and hist["epoch"].max() <= cfg.epochs
    assert (run.path / "checkpoints" / "original-s0-32.pt").is_file()
    splits = run.table("splits")
    assert list(splits.columns) == SCHEMAS["splits"]
    for v, g in splits.groupby("variant"):
        roles = g.groupby("role")["image_id"].apply(set)
        assert not roles["train"] & roles["val"] and roles["test"] == set(pred.loc[pred["variant"] == v, "image_id"])
        assert len(roles["train"]) + len(roles["val"]) == 40


def test_second_run_reuses_enhanced_cache(tiny_run, data_dir):
    run, cfg, _ = tiny_run
    cfg2 = replace(cfg, variants=("bicubic-x4",))
    r2 = run_study(cfg2)
    prov = r2.read_meta()["weights"]["enhancers"]["bicubic-x4"]
    assert prov["made"] == 0 and prov["from_cache"] == _distinct_images(cfg.data_dir)
    # same seed, same data: the same model, whatever ran before it in the process
    a = run.table("predictions").query("variant == 'bicubic-x4'").reset_index(drop=True)
    b = r2.table("predictions").reset_index(drop=True)
    assert a["image_id"].tolist() == b["image_id"].tolist()
    assert (a[list(PROB_COLUMNS)].to_numpy() == b[list(PROB_COLUMNS)].to_numpy()).all()


def test_failed_run_is_marked_and_others_untouched(tiny_run, data_dir, monkeypatch):
    run, cfg, _ = tiny_run
    before = (run.path / "run.json").read_bytes()
    import core.pipeline as P

    def boom(*a, **k):
        raise RuntimeError("simulated crash in training")

    monkeypatch.setattr(P, "fit", boom)
    with pytest.raises(RuntimeError):
        run_study(replace(cfg), run_id="will-fail")
    meta = RunStore(cfg.runs_dir).get("will-fail").read_meta()
    assert meta["status"] == "failed" and meta["error"]["message"] == "simulated crash in training"
    assert "Traceback" in meta["error"]["traceback"] and meta["ended_at"]
    assert (run.path / "run.json").read_bytes() == before


def test_cancel_file_stops_the_run(tiny_run):
    run, cfg, _ = tiny_run
    store = RunStore(cfg.runs_dir)

    def cancel_once_training(info):
        if info["stage"].startswith("train"):
            store.get("to-cancel").request_cancel()

    with pytest.raises(Cancelled):
        run_study(replace(cfg), on_progress=cancel_once_training,
                  run_id="to-cancel")
    assert store.get("to-cancel").read_meta()["status"] == "cancelled"


def _wbc(*args, **kw):
    return subprocess.run([sys.executable, "-m", "core", *args], capture_output=True, text=True, **kw)


@pytest.mark.parametrize("args, needle", [
    (["study", "--variants", "original,nope"], "unknown variant 'nope'"),
    (["study", "--epochs", "0"], "--epochs: must be >= 1, got 0"),
    (["study", "--classifier", "vgg"], "unknown classifier 'vgg'"),
    (["study", "--image-size", "abc"], "invalid value 'abc'"),
    (["study", "--preset", "fast"], "invalid choice: 'fast'"),
    (["study", "--test-dir", "/no/such/dir"], "--test-dir: '/no/such/dir' is not a folder"),
    (["study", "--enhance-batch-size", "0"], "--enhance-batch-size: must be >= 1, got 0"),
    (["study", "--enhance-precision", "fp8"], "invalid choice: 'fp8'"),
    (["study", "--ema", "9", "--epochs", "6"], "--ema: must be between 0 (off) and --epochs (6) epochs, got 9.0"),
    (["study", "--backbone-lr", "2"], "--backbone-lr: must be a fraction of --lr in (0, 1], got 2.0"),
    (["study", "--mixup", "-1"], "--mixup: must be between 0 (off) and 10 (the Beta distribution's alpha), got -1.0"),
])
def test_cli_bad_arguments_one_line_exit_2(args, needle):
    p = _wbc(*args)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_cli_no_data_message(tmp_path):
    env = {"WBC_DATA": str(tmp_path), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    code = ("import core.config as c, core.data as d; d.KNOWN_DATA_LOCATIONS = (); "
            "from core.cli import main; raise SystemExit(main(['study', '--runs-dir', %r]))" % str(tmp_path / "r"))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 1 and "wbc data fetch" in p.stderr


def test_cli_runs_and_report(tiny_run):
    run, cfg, _ = tiny_run
    p = _wbc("runs", "--runs-dir", cfg.runs_dir)
    assert p.returncode == 0 and run.run_id in p.stdout
    p = _wbc("report", run.run_id, "--runs-dir", cfg.runs_dir)
    assert p.returncode == 0, p.stderr
    assert "confusion matrix [bicubic-x4]" in p.stdout and "macro avg" in p.stdout
    assert "variant bicubic-x4: PIL BICUBIC" in p.stdout  # how the variant's images were made
    assert _wbc("report", "no-such-run", "--runs-dir", cfg.runs_dir).returncode == 2


def test_missing_pretrained_weights_fail_before_any_long_stage(data_dir, tmp_path, monkeypatch):
    """The paper's ResNet-50 offline: a clear error in seconds, before enhancement starts."""
    import core.models as M

    def unavailable(num_classes, pretrained):
        raise M.PretrainedWeightsUnavailable("resnet50: ImageNet weights could not be loaded (offline)")

    spec = M.get_classifier_spec("resnet50")
    monkeypatch.setitem(M._REGISTRY._specs, "resnet50", replace(spec, factory=unavailable))
    cfg = make_config(None, data_dir=str(data_dir), runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "c"),
                      **{**TINY, "classifier": "resnet50", "pretrained": "imagenet"})
    with pytest.raises(M.PretrainedWeightsUnavailable):
        run_study(cfg, run_id="no-weights")
    meta = RunStore(cfg.runs_dir).get("no-weights").read_meta()
    assert meta["status"] == "failed" and "ImageNet weights" in meta["error"]["message"]
    assert "enhance:bicubic-x4" not in meta["stages"] and not (tmp_path / "c" / "enhanced").exists()


def test_seeds_and_sizes_decode_each_variant_once(tiny_run, monkeypatch):
    """Two seeds x two sizes: four models per variant, images decoded once per (variant, size)."""
    import core.pipeline as P

    run, cfg, _ = tiny_run
    calls = []
    real = P.load_images
    monkeypatch.setattr(P, "load_images", lambda files, size, **kw: calls.append(size) or real(files, size, **kw))
    r = run_study(replace(cfg, seeds=(0, 1), image_sizes=(32, 40), epochs=1))
    d32, d40 = P.decoded_size(cfg.input_policy, 32), P.decoded_size(cfg.input_policy, 40)  # region + margin
    assert sorted(calls) == [d32, d32, d40, d40]  # 2 variants x 2 sizes, not x 2 seeds
    pred = r.table("predictions")
    assert pred.groupby(["variant", "seed", "image_size"]).size().eq(16).all() and len(pred) == 2 * 2 * 2 * 16
    stats = r.table("stats")
    seeds = stats[stats["kind"] == "seeds"]
    assert set(seeds["seed"]) == {-1} and seeds["sd"].notna().all()
    assert {"original", "bicubic-x4"} <= set(seeds["variant"])
    # every image size is reported, labelled (wbc runs, the dashboard's run list), not only the first
    by_size = r.read_meta()["summary"]["accuracy_by_size"]
    assert set(by_size) == {"32", "40"} and set(by_size["40"]) == {"original", "bicubic-x4"}
    listed = RunStore(cfg.runs_dir).list_runs().set_index("run_id").loc[r.run_id, "accuracy"]
    assert set(listed) == {"original@32px", "bicubic-x4@32px", "original@40px", "bicubic-x4@40px"}


def test_sigterm_cancels_a_real_study(data_dir, tmp_path):
    """The dashboard's cancel: SIGTERM to a `wbc study` process mid-training stops it cleanly as cancelled."""
    import os
    import signal
    import time

    runs = tmp_path / "runs"
    argv = [sys.executable, "-m", "core", "study", "--data", str(data_dir), "--variants", "original",
            "--classifier", "simple_cnn", "--pretrained", "none", "--image-size", "32", "--epochs", "200",
            "--split", "random", "--runs-dir", str(runs), "--cache-dir", str(tmp_path / "cache"),
            "--run-id", "to-term"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store, deadline = RunStore(runs), time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if (store.get("to-term").progress.stage or "").startswith("train"):
                break
        except KeyError:
            pass
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().endswith("wbc study: cancelled"), err[-300:]
    info = store.get("to-term").info
    assert info.status == "cancelled" and info.ended_at
    assert store.get("to-term").status() == "cancelled"  # not 'interrupted': the process ended it itself


def test_a_preset_with_changed_settings_says_so_in_its_notes():
    cfg = make_config("cpu", per_class=500, epochs=4, variants=["original", "realesr-animevideov3"])
    assert cfg.notes[-1] == "changed from the cpu preset: per_class=500 (preset: 1500)"  # equal values: not listed
    assert len(make_config("quick").notes) == 1


def test_the_cpu_preset_refits_and_the_cli_can_turn_it_off():
    from core.cli import build_parser, config_from_args

    assert make_config("cpu").refit and not make_config("quick").refit
    off = config_from_args(build_parser().parse_args(["study", "--preset", "cpu", "--no-refit"]))
    assert off.refit is False and off.notes[-1] == "changed from the cpu preset: refit=False (preset: True)"
    assert config_from_args(build_parser().parse_args(["study", "--preset", "quick", "--refit"])).refit


def test_a_typed_flag_overrides_the_preset_even_with_none_and_an_untyped_one_leaves_it(capsys):
    """Only the flags typed reach the config (argparse SUPPRESS), so a flag can ask for None over a preset:
    `--per-class all` trains the cpu preset on every TRAIN image; a flag not typed keeps the preset's value; and
    `--resume` refuses a typed `--per-class all` as it refuses `--per-class 500`."""
    from core.cli import build_parser, config_from_args, main

    def cfg(*flags):
        return config_from_args(build_parser().parse_args(["study", *flags]))

    assert cfg("--preset", "cpu").per_class == 1500 and len(cfg("--preset", "cpu").notes) == 1
    every = cfg("--preset", "cpu", "--per-class", "ALL", "--test-per-class", "all")
    assert every.per_class is None and every.test_per_class is None and every.refit  # the rest: the preset's
    assert every.notes[-1] == "changed from the cpu preset: per_class='all' (preset: 1500)"
    assert cfg("--per-class", "7", "--seed", "4").per_class == 7 and cfg("--seed", "4").seeds == (4,)
    assert cfg("--preset", "quick", "--freeze-backbone").freeze_backbone  # store_true flags: typed or absent
    assert not cfg("--preset", "quick").freeze_backbone
    assert main(["study", "--resume", "r1", "--per-class", "all"]) == 2
    assert capsys.readouterr().err.strip() == "wbc study: error: --resume runs the stored config; drop --per-class"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["study", "--per-class", "most"])
    assert "give a count or 'all'" in capsys.readouterr().err


def test_each_model_stores_the_penultimate_features_of_its_test_images(tiny_run):
    """embeddings.parquet: one vector per test image and model, the head's input for the unturned view."""
    import torch

    from core.engine import load_images, predict
    from core.models import create_classifier

    run, cfg, _ = tiny_run
    emb, pred = run.table("embeddings"), run.table("predictions")
    assert len(emb) == len(pred) and set(emb["variant"]) == set(cfg.variants)
    assert emb[["variant", "seed", "image_size", "image_id"]].merge(pred, how="left")["true_label"].notna().all()
    # recomputed from the stored checkpoint, they are the same vectors
    row = emb[emb["variant"] == "original"].iloc[0]
    ckpt = torch.load(run.path / "checkpoints" / "original-s0-32.pt", weights_only=False)
    model, _ = create_classifier(cfg.classifier, 4, "none")
    model.load_state_dict(ckpt["state_dict"])
    path = pred.loc[(pred["variant"] == "original") & (pred["image_id"] == row["image_id"]), "path"].iloc[0]
    box = pred.loc[(pred["variant"] == "original") & (pred["image_id"] == row["image_id"]),
                   ["box_left", "box_top", "box_right", "box_bottom"]].iloc[0].tolist()
    from core.pipeline import decoded_size

    x = load_images([path], decoded_size(cfg.input_policy, 32), boxes=[None if cfg.input_policy == "full" else box])
    _, feats = predict(model, x, torch.device("cpu"), view=32, tta=cfg.tta, features=True)
    assert np.allclose(feats[0], np.asarray(row["feature"]), atol=1e-4)


def test_exact_copies_in_the_test_set_are_counted_recorded_and_shown(tmp_path, capsys):
    """A test file that is also a TRAIN file is not an unseen cell, and a repeated test file counts twice: the
    run counts both (checked against the files' own hashes), run.json keeps them, and Overview and the report say
    so, with the names from disk escaped."""
    import hashlib
    import shutil

    from core.data import copies_words
    from dashboard.data import report_html
    from dashboard.pages.overview import copies_alerts

    data = make_dataset(tmp_path / "data", train_per_class=6, test_per_class=2, sources=6)
    test = data / "TEST_SIMPLE"
    shutil.copy(data / "TRAIN" / "EOSINOPHIL" / "_0_0.jpeg", test / "NEUTROPHIL" / "<b>leak<i>.jpeg")
    shutil.copy(test / "MONOCYTE" / "_1_1.jpeg", test / "MONOCYTE" / "_1_1 copy.jpeg")

    def digests(split):
        return [hashlib.sha1(f.read_bytes()).hexdigest() for f in sorted((data / split).rglob("*.jpeg"))]

    train_d, test_d = set(digests("TRAIN")), digests("TEST_SIMPLE")
    in_train = sum(d in train_d for d in test_d)
    repeated = len(test_d) - len(set(test_d))
    assert in_train >= 1 and repeated >= 1  # the oracle sees what was planted (and any copy the generator made)

    cfg = make_config(None, data_dir=str(data), runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"),
                      **{**TINY, "epochs": 1, "variants": ("original",)})
    run = run_study(cfg)
    copies = run.read_meta()["data"]["copies"]
    assert (copies["test_in_train"], copies["test_repeated"]) == (in_train, repeated)
    assert "TEST_SIMPLE/NEUTROPHIL/<b>leak<i>.jpeg" in copies["in_train_examples"]
    words = dict(copies_words(copies))
    assert words["warning"].startswith(f"{in_train} test images are byte-identical to training files")
    assert "each copy counts in every metric" in words["info"]
    # the repeat named with the file it repeats (a bare list read as copies of each other)
    a, b = "TEST_SIMPLE/MONOCYTE/_1_1 copy.jpeg", "TEST_SIMPLE/MONOCYTE/_1_1.jpeg"
    assert f"{a} repeats {b}" in words["info"] or f"{b} repeats {a}" in words["info"], words["info"]

    alerts = copies_alerts(run.read_meta())
    assert [a.alert_type for a in alerts] == ["warning", "info"]
    assert "&lt;b&gt;leak&lt;i&gt;" in alerts[0].object and "<b>leak" not in alerts[0].object
    page = report_html(run.path).decode()
    assert "byte-identical to training files" in page and "<b>leak" not in page
    assert copies_words({"test_in_train": "3", "test_repeated": True, "in_train_examples": 7}) == []  # junk: nothing
    from core.cli import main

    assert main(["report", run.run_id, "--runs-dir", str(tmp_path / "runs")]) == 0  # the terminal report too
    assert f"warning: {in_train} test images are byte-identical" in capsys.readouterr().out


@pytest.mark.parametrize("copies, n_test, words", [
    ({"test_in_train": 3, "in_train_examples": 5}, None, ["warning: 3 test images are byte-identical to training files:"]),
    ({"test_repeated": 2, "repeats_share_a_group": [1]}, None, ["info: 2 test images repeat another test image byte"]),
    ({"test_in_train": 10 ** 30, "test_repeated": 600}, 500, []),  # more copies than test images: nothing
    ({"test_in_train": 2, "in_train_examples": "abcde"}, 71, ["warning: 2 test images are byte-identical to training files:"]),
    ({"test_in_train": 1, "in_train_examples": {"a": 1}}, 71, ["warning: 1 test images are byte-identical to training files:"]),
    ({"test_repeated": 1, "repeated_examples": ["x\n\n---\n\ny" + "z" * 500, 7]}, 71,
     ["info: 1 test images repeat another test image byte for byte (e.g. x --- yzzz"]),
    ("junk", 71, []), (None, None, []), ({"test_in_train": -4, "test_repeated": 1.5}, None, []),
    ({"test_repeated": 2, "repeated_examples": ["b", "d"], "repeated_of": ["a", "c"]}, 71,
     ["info: 2 test images repeat another test image byte for byte (e.g. b repeats a; d repeats c):"]),
    ({"test_repeated": 2, "repeated_examples": ["b", "d"], "repeated_of": ["a"]}, 71,  # lists that do not pair
     ["info: 2 test images repeat another test image byte for byte (e.g. b, d):"]),
    ({"test_repeated": 1, "repeated_examples": ["b\nx" * 99], "repeated_of": [7]}, 71,
     ["info: 1 test images repeat another test image byte for byte (e.g. b x"]),
])
def test_copies_words_survive_a_hand_edited_run_json(copies, n_test, words):
    """run.json is read back from disk: whatever its copies section holds, the words are a few sane lines or none
    (no exception, no list of characters, no name of 500 characters or several lines, no count above the test set)."""
    from core.data import copies_words

    got = [f"{level}: {text}" for level, text in copies_words(copies, n_test)]
    assert len(got) == len(words) and all(g.startswith(w) for g, w in zip(got, words)), got
    assert all("\n" not in g and "e.g. a, b" not in g and "z" * 121 not in g for g in got)
