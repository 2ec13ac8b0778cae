"""Fill .gpucheck/, what benchmarks/gpu_check.sh needs on a GPU machine that has no network and no ../shared.

    python benchmarks/gpu_carry.py            # or: make gpu-carry

whl/      wheels the GPU image lacks (realesrgan, basicsr built from its sdist, addict, yapf)
weights/  <model>-fp16.pth for x4plus and realesr-animevideov3: the weights this machine resolves (the ncnn
          conversion is fp16 already, so halving loses nothing; a downloaded official file loses its fp32 tail)
data/     every 16th TRAIN image up to 150 per class, and TEST_SIMPLE, in the Kaggle layout
cache/    the source-grouping embeddings of those images (EfficientNet-Lite0 weights need not travel)

The device machine takes at most 64 MiB with the checkout; this prints the total.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
LIMIT_MIB = 64


def wheels(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest),
                    "realesrgan==0.3.0", "addict", "yapf"], check=True)
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), "basicsr==1.4.2"],
                   check=True)


# x4plus for the GPU figures; the compact model for the dry run's study and compile stages (x4plus would take
# minutes a frame there), so that the dry run can be run in an environment as bare as the GPU machine's
CARRIED_MODELS = ("realesrgan-x4plus", "realesr-animevideov3")


def weights(dest: Path) -> None:
    import torch

    from core.enhance.realesrgan import MODELS, RealESRGANEnhancer

    dest.mkdir(parents=True, exist_ok=True)
    for name in CARRIED_MODELS:
        enh = RealESRGANEnhancer(MODELS[name], device="cpu")
        sd = {k: v.half() for k, v in enh.model.state_dict().items()}
        torch.save({"params_ema": sd}, dest / f"{name}-fp16.pth")


def data(src: Path, dest: Path, per_class: int, every: int = 16) -> None:
    from core.data import class_of_folder, find_split_dirs

    dirs = find_split_dirs(src)
    for split, cap in (("TRAIN", per_class), ("TEST_SIMPLE", None)):
        if split not in dirs:
            continue
        for folder in sorted(p for p in Path(dirs[split]).iterdir() if p.is_dir() and class_of_folder(p.name)):
            files = sorted(folder.glob("*.jp*g"))
            files = files[::every][:cap] if cap else files
            (dest / split / folder.name).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy(f, dest / split / folder.name / f.name)


class Quiet:
    """The Progress that the pipeline's data and grouping stages report to, silenced."""

    class run:
        log = staticmethod(lambda *a, **k: None)

    def callback(self, message=""):
        return None


def embeddings(data_dir: Path, cache: Path) -> None:
    """Everything the check's studies take from the grouping network, through the pipeline's own data and
    grouping stages (so the cache keys are the ones the studies look up): each image's embedding, and the copy
    whitening learned from the training pool (the GPU machine has no EfficientNet-Lite weights to learn it)."""
    from gpu_check import SIZES

    from core.cli import build_parser, config_from_args
    from core.pipeline import assign_source_groups, prepare_data

    for mode in SIZES.values():
        args = build_parser().parse_args(["study", "--data", str(data_dir), *mode["study"], "--device", "cpu",
                                          "--cache-dir", str(cache)])
        cfg = config_from_args(args)
        sd = prepare_data(cfg, Quiet())
        assign_source_groups(sd, cfg, Quiet())


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> int:
    from core.data import find_data_root

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="data root (default: the one wbc finds)")
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--dest", default=str(ROOT / ".gpucheck"))
    args = ap.parse_args()
    dest = Path(args.dest)
    if dest.exists():
        shutil.rmtree(dest)
    wheels(dest / "whl")
    weights(dest / "weights")
    data(find_data_root(args.data), dest / "data", args.per_class)
    embeddings(dest / "data", dest / "cache")
    total = size_mib(dest)
    print(f"{dest}: {total:.1f} MiB (the device machine takes {LIMIT_MIB} MiB with the checkout)")
    return 0 if total < LIMIT_MIB - 4 else 1


if __name__ == "__main__":
    sys.exit(main())
