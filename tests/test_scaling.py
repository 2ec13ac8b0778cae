"""Scaling: GPU-side sizing that can be checked without a GPU, and the GPU check's CPU dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.enhance.realesrgan import MAX_AUTO_BATCH, batch_for_memory
from tests.gen_data import make_dataset

REPO = Path(__file__).resolve().parent.parent


def test_enhance_batch_fills_the_free_memory_share():
    gib = 2**30
    assert batch_for_memory(78 * gib, int(0.681 * gib)) == MAX_AUTO_BATCH  # an idle H100: capped
    assert batch_for_memory(10 * gib, 1 * gib) == 6  # 60% of 10 GiB at 1 GiB per image
    assert batch_for_memory(1 * gib, 2 * gib) == 1  # less than one image fits: 1 (then OOM -> tiles)
    assert batch_for_memory(10 * gib, 0) == MAX_AUTO_BATCH


def test_gpu_check_sizes_name_the_same_settings_in_both_modes():
    """The GPU mode cannot be run here: every setting the dry run uses must be there too (a missing one would
    only fail on the lent machine, in its few minutes)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from gpu_check import SIZES
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert set(SIZES["gpu"]) == set(SIZES["dry-run"])
    assert SIZES["gpu"]["device"] == "cuda" and SIZES["gpu"]["ours_n"] >= 1000


def test_gpu_check_dry_run_runs_every_stage(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: the script the GPU machine runs, every stage at toy sizes on the CPU."""
    carry = tmp_path / "carry"
    make_dataset(carry / "data", train_per_class=8, test_per_class=3, size=(64, 48))
    out = tmp_path / "out"
    env = dict(os.environ, WBC_GPU_CARRY=str(carry), PYTHON=sys.executable, OUT=str(out),
               WBC_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    st = doc["stages"]
    assert doc["mode"] == "dry-run" and set(st) == {"env", "enhance", "compile", "train", "study", "torchrun",
                                                    "estimate", "fallback"}
    assert not [k for k, v in st.items() if "error" in v]
    assert st["enhance"]["ours_images"] == 3 and st["enhance"]["psnr_db_vs_official_fp32"]["min"] > 45
    comp = st["compile"]  # torch.compile on the same file -> file path (the compact model in the dry run)
    assert comp["images"] == 3 and comp["compile_s"] > 0 and comp["psnr_db_vs_eager"]["min"] >= 45
    assert comp["graphs_compiled"] >= 1 and comp["compiled_images_per_s"] > 0 and comp["eager_images_per_s"] > 0
    assert st["train"]["paper_batch_images_per_s"] > 0
    assert st["study"]["status"] == "finished" and st["study"]["kernels"]["deterministic"] is True
    assert (out / "gpu-paper.json").is_file() and st["estimate"]["total_min_without_decode"] > 0
    ddp = st["torchrun"]
    assert ddp["status"] == "finished" and ddp["distributed"]["world_size"] == 2 and ddp["distributed"]["backend"] == "gloo"
    assert 0 <= ddp["same_prediction_as_1_process"] <= 1
    # no out-of-memory on a CPU; the tiled path must match the untiled one (16-px tiles of 48-px crops are mostly
    # seams, where tiling differs by rounding: 39.9 dB measured; 128-px tiles of whole frames on the GPU)
    fb = st["fallback"]
    assert fb["frames_back"] == 3 and fb["psnr_db_vs_normal_batch"] >= 45 and fb["psnr_db_tiled_vs_untiled"] >= 35


def test_gpu_carry_caches_all_the_grouping_that_the_checks_studies_need(tmp_path, monkeypatch):
    """The GPU machine has no EfficientNet-Lite weights: every embedding and the copy whitening its studies look up
    must be in the carried cache. (On 2026-11-28 the carry held the embeddings but not the whitening, learned
    from pools of 300+ images, and the check's study stages failed on the H100.) Here the whitening threshold is
    lowered so that the tiny pools learn one, then the network is taken away and each mode's study groups."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_carry
        from gpu_check import SIZES
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from core import groups
    from core.cli import build_parser, config_from_args
    from core.pipeline import assign_source_groups, prepare_data

    data = make_dataset(tmp_path / "data", train_per_class=8, test_per_class=3, size=(64, 48))
    cache = tmp_path / "carried-cache"
    monkeypatch.setenv("WBC_CACHE_DIR", str(cache))
    monkeypatch.setattr(groups, "WHITEN_MIN_IMAGES", 20)
    gpu_carry.embeddings(data, cache)
    assert list(cache.glob("embeddings/*/whiten-*.npy")), "no whitening was carried"

    def no_network(*a, **k):
        raise RuntimeError("efficientnet_lite0 needs `pip install efficientnet-lite-pytorch`")

    monkeypatch.setattr(groups, "_embed_batch", no_network)
    for mode in SIZES.values():
        argv = ["study", "--data", str(data), *mode["study"], "--device", "cpu"]
        cfg = config_from_args(build_parser().parse_args(argv))
        sd = prepare_data(cfg, gpu_carry.Quiet())
        assign_source_groups(sd, cfg, gpu_carry.Quiet())
        assert sd.test["group_id"].notna().all()


# ------------------------------------------------------------------------------------- torchrun (gloo, CPU)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
STUDY = ["study", "--classifier", "simple_cnn", "--pretrained", "none", "--variants", "original",
         "--image-size", "48", "--epochs", "3", "--batch-size", "8", "--split", "random", "--tta", "2",
         "--device", "cpu", "--quiet"]


def _env(tmp_path: Path) -> dict:
    return dict(os.environ, WBC_CACHE_DIR=str(tmp_path / "cache"), WBC_OFFLINE="1", WBC_DIST_TIMEOUT_S="120",
                OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ddp") / "data", train_per_class=12, test_per_class=5, size=(64, 48))


def _study(cmd: list[str], data: Path, runs: Path, run_id: str, tmp_path: Path, extra=()) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, *STUDY, "--data", str(data), "--runs-dir", str(runs), "--run-id", run_id, *extra],
                          cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=600)


def test_two_rank_gloo_study_predicts_as_one_process(ddp_data, tmp_path):
    """torchrun with 2 gloo ranks and the same global batch and seed: the test predictions of a 1-process run.

    The backbone is frozen (BatchNorm in eval mode): on CPU each rank would otherwise normalise by its own half
    of the batch (SyncBatchNorm is CUDA-only), which docs/SCALING.md gives as the tolerance of a full fine-tune.
    What remains is the order of floating-point sums (DDP averages two half-batch gradients): 1e-5.
    """
    import pandas as pd

    runs = tmp_path / "runs"
    one = _study([sys.executable, "-m", "core"], ddp_data, runs, "one", tmp_path, ["--freeze-backbone"])
    assert one.returncode == 0, one.stderr[-2000:]
    two = _study([*TORCHRUN, "-m", "core"], ddp_data, runs, "two", tmp_path, ["--freeze-backbone"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.strip().splitlines() == ["two"]  # rank 0 alone speaks
    a, b = (pd.read_parquet(runs / r / "predictions.parquet") for r in ("one", "two"))
    probs = [c for c in a.columns if c.startswith("prob_")]
    assert len(a) == len(b) == 20 and list(a["image_id"]) == list(b["image_id"])
    assert (a["pred_label"] == b["pred_label"]).all()
    assert float((a[probs] - b[probs]).abs().max().max()) < 1e-5
    meta = json.loads((runs / "two" / "run.json").read_text())
    assert meta["status"] == "finished"
    dist = meta["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo" and [r["rank"] for r in dist["ranks"]] == [0, 1]
    assert json.loads((runs / "one" / "run.json").read_text())["distributed"]["world_size"] == 1
    # rank 1 wrote nothing of its own: the run folder holds what a 1-process run holds
    assert sorted(p.name for p in (runs / "two").iterdir()) == sorted(p.name for p in (runs / "one").iterdir())


def test_a_failing_rank_fails_the_run_cleanly(ddp_data, tmp_path):
    """Rank 1 raises as its first model starts: the run ends failed, naming rank 1's error, with no table of a
    model written and no temporary file left."""
    script = tmp_path / "failing_rank.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import core.pipeline as P\n"
        "if os.environ.get('RANK') == '1':\n"
        "    def boom(*a, **k):\n"
        "        raise RuntimeError('injected failure on rank 1')\n"
        "    P.fit = boom\n"
        "from core.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    runs = tmp_path / "runs"
    r = _study([*TORCHRUN, str(script)], ddp_data, runs, "broken", tmp_path)
    assert r.returncode != 0
    meta = json.loads((runs / "broken" / "run.json").read_text())
    assert meta["status"] == "failed"
    assert "rank 1: RuntimeError: injected failure on rank 1" in meta["error"]["message"]
    assert not list((runs / "broken").glob("*.parquet")) and not list((runs / "broken").rglob("*.tmp*"))


def test_two_rank_enhance_writes_the_files_one_process_writes(tmp_path):
    src = make_dataset(tmp_path / "in", train_per_class=3, test_per_class=1, size=(40, 32))
    (src / "TRAIN" / "EOSINOPHIL" / "bad.jpeg").write_text("not an image")
    args = ["enhance", "--model", "realesr-animevideov3", "--device", "cpu", str(src)]
    one = subprocess.run([sys.executable, "-m", "core", *args, str(tmp_path / "one")], cwd=REPO,
                         env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    two = subprocess.run([*TORCHRUN, "-m", "core", *args, str(tmp_path / "two")], cwd=REPO,
                         env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert one.returncode == two.returncode == 1  # the bad file, listed by both
    assert "on 2 ranks" in two.stderr and "enhanced 16, skipped 0 (already done), errors 1" in two.stderr
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) == 17  # 16 images and the error list
    for f in files:
        a, b = (tmp_path / "one" / f).read_bytes(), (tmp_path / "two" / f).read_bytes()
        assert a == b.replace(b"/two/", b"/one/") or a == b, f


def test_a_cancel_on_every_rank_is_recorded_as_cancelled_and_a_real_failure_as_failed(tmp_path):
    """Rank 0's record of a torchrun stop: peers that were cancelled too keep it a cancel; a peer's real error
    makes it a failure naming that rank."""
    from core.engine import Cancelled
    from core.pipeline import Progress, _record_stop
    from core.store import RunStore, record_rank_error

    store = RunStore(tmp_path / "runs")
    for rid, peer, expected in (("c", Cancelled("cancelled by user"), "cancelled"),
                                ("f", RuntimeError("CUDA error on rank 1"), "failed")):
        run = store.create({"preset": "quick"}, rid)
        record_rank_error(run, 1, peer)
        _record_stop(run, Progress(run, ["data"]), Cancelled("cancelled by user"), 0.0)
        meta = run.read_meta()
        assert meta["status"] == expected, meta["error"]
        assert f"rank 1: {type(peer).__name__}" in meta["error"]["message"]


def test_gpu_check_refuses_an_unknown_stage_and_a_bad_timeout_is_named(tmp_path, monkeypatch):
    carry = tmp_path / "carry"
    make_dataset(carry / "data", train_per_class=2, test_per_class=1, size=(64, 48))
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--carry", str(carry), "--only",
                        "env,nosuch", "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, WBC_CACHE_DIR=str(tmp_path / "cache")))
    assert r.returncode == 2 and "unknown stage(s) nosuch; choose from env, enhance" in r.stdout
    assert not (tmp_path / "out").exists()  # refused before anything is made (it left an output folder behind)
    from core import distributed

    monkeypatch.setenv(distributed.TIMEOUT_ENV, "abc")
    with pytest.raises(ValueError, match="WBC_DIST_TIMEOUT_S='abc'"):
        distributed._timeout_s()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "0")
    with pytest.raises(ValueError, match="WBC_DIST_TIMEOUT_S='0'"):
        distributed._timeout_s()


def test_a_rank_holds_only_its_images_and_takes_its_part_of_each_batch():
    """Held: the share of a set a rank keeps in memory, and the positions of a global batch it trains on."""
    import numpy as np
    import torch

    from core.distributed import Held, World

    x = torch.arange(10).view(10, 1, 1, 1).to(torch.uint8)
    parts = [Held.split(x, World(rank=r, size=3, backend="gloo")) for r in range(3)]
    assert [len(p.x) for p in parts] == [4, 3, 3] and all(len(p) == 10 for p in parts)
    gidx = torch.tensor([9, 0, 4, 5, 1])
    seen = {}
    for p in parts:
        pos, imgs = p.take(gidx)
        for q, v in zip(pos.tolist(), imgs.flatten().tolist()):
            seen[q] = v
    assert seen == {i: int(g) for i, g in enumerate(gidx)}  # every row of the batch, once, from its holder
    empty_pos, empty = parts[2].take(torch.tensor([0, 3]))
    assert len(empty_pos) == 0 and empty.shape == (0, 1, 1, 1)
    assert np.array_equal(parts[1].mine, np.arange(10) % 3 == 1)
