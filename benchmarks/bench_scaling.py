"""CPU scaling: one process (all cores) vs ``torchrun --nproc-per-node N`` gloo ranks (one thread each).

    python benchmarks/bench_scaling.py --data ../shared/data/blood-cells --ranks 2

Times ``wbc enhance`` (realesr-animevideov3 on ``--n`` TRAIN images) and a small ``wbc study`` (original only,
EfficientNet-Lite0, ``--per-class`` images, cold cache each time) both ways, and checks that the enhanced files
are byte-identical. On a 2-core machine this measures the overhead of the launcher and of the collectives, not a
speed-up: one process already keeps both cores busy.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode not in (0,):
        sys.exit(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("WBC_DATA", str(ROOT.parent / "shared/data/blood-cells")))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--n", type=int, default=48, help="images to enhance")
    ap.add_argument("--per-class", type=int, default=60)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wbc-scaling-"))
    src = work / "in"
    for i, p in enumerate(sorted(Path(args.data).glob("TRAIN/*/*.jpeg"))[:: 40][: args.n]):
        (src / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, src / p.parent.name / p.name)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}"]
    one, many = [sys.executable], torchrun
    base = dict(os.environ, WBC_OFFLINE="1", PYTHONPATH=str(ROOT))
    from core.devices import cpu_model

    cpu = cpu_model()
    print(f"# {date.today()} cores={os.cpu_count()} cpu={cpu} ranks={args.ranks}")
    print("| work | 1 process (all cores) | torchrun gloo ranks (1 thread each) | ratio |")
    print("| --- | --- | --- | --- |")
    for label, make in (
        (f"wbc enhance, realesr-animevideov3, {args.n} images",
         lambda pre, tag: [*pre, "-m", "core", "enhance", "--model", "realesr-animevideov3", "--device", "cpu",
                           "--no-estimate", str(src), str(work / f"out-{tag}")]),
        (f"wbc study, original, efficientnet_lite0, {args.per_class}/class, 2 epochs",
         lambda pre, tag: [*pre, "-m", "core", "study", "--data", args.data, "--variants", "original",
                           "--per-class", str(args.per_class), "--test-per-class", "10", "--epochs", "2",
                           "--image-size", "128", "--runs-dir", str(work / "runs"), "--run-id", f"s-{tag}",
                           "--cache-dir", str(work / f"cache-{tag}"), "--device", "cpu", "--quiet"]),
    ):
        t1 = timed(make(one, "one"), dict(base, WBC_CACHE_DIR=str(work / "c1")))
        tn = timed(make(many, "many"), dict(base, WBC_CACHE_DIR=str(work / "cn"), OMP_NUM_THREADS="1"))
        print(f"| {label} | {t1:.1f} s | {tn:.1f} s | {tn / t1:.2f} |")
    a, b = work / "out-one", work / "out-many"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    same = files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        filecmp.cmp(a / f, b / f, shallow=False) for f in files)
    print(f"# enhanced files identical: {same}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
