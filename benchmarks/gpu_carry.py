"""Fill .gpucheck/, what benchmarks/gpu_check.sh needs on a GPU machine that has no network and no ../shared.

    python benchmarks/gpu_carry.py            # or: make gpu-carry

whl/      wheels the GPU image lacks (realesrgan, basicsr built from its sdist, addict, yapf)
weights/  realesrgan-x4plus-fp16.pth: the x4plus weights this machine resolves (the ncnn conversion is fp16
          already, so halving loses nothing; a downloaded official file loses its fp32 tail, PSNR noted)
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
sys.path.insert(0, str(ROOT))
LIMIT_MIB = 64


def wheels(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest),
                    "realesrgan==0.3.0", "addict", "yapf"], check=True)
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), "basicsr==1.4.2"],
                   check=True)


def weights(dest: Path) -> None:
    import torch

    from core.enhance.realesrgan import MODELS, RealESRGANEnhancer

    enh = RealESRGANEnhancer(MODELS["realesrgan-x4plus"], device="cpu")
    dest.mkdir(parents=True, exist_ok=True)
    sd = {k: v.half() for k, v in enh.model.state_dict().items()}
    torch.save({"params_ema": sd}, dest / "realesrgan-x4plus-fp16.pth")


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


def embeddings(data_dir: Path, cache: Path) -> None:
    import pandas as pd

    from core import data as D
    from core.groups import embed_images

    man = D.build_manifest(data_dir, None)
    df = pd.concat([man.split(s) for s in man.split_dirs])
    embed_images(list(df["path"]), list(df["sha1"]), cache_dir=cache)


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
