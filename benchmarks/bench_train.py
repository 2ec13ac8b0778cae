"""Training and inference throughput of the registered classifiers (images/s) on this machine.

    python benchmarks/bench_train.py --classifiers efficientnet_lite0,resnet50 --sizes 224 --n 64

Uses random uint8 images through the same engine code as a study (normalise on device, channels_last,
AMP on GPU), so the figures are what a run gets per epoch, excluding image decoding.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from core.devices import resolve_device
from core.engine import TrainSettings, fit, predict
from core.models import create_classifier


def bench(name: str, size: int, n: int, batch: int, device: torch.device) -> dict:
    model, _ = create_classifier(name, 4, "none")
    x = torch.randint(0, 255, (n, 3, size, size), dtype=torch.uint8)
    y = np.arange(n) % 4
    s = TrainSettings(epochs=1, batch_size=batch, patience=1)
    fit(model, (x[:batch], y[:batch]), (x[:batch], y[:batch]), s, device)  # warm-up
    t = time.perf_counter()
    fit(model, (x, y), (x[:batch], y[:batch]), s, device)
    train = n / (time.perf_counter() - t - 0)  # includes one small validation pass
    t = time.perf_counter()
    predict(model, x, device, batch_size=64)
    infer = n / (time.perf_counter() - t)
    return {"classifier": name, "size": size, "train_img_s": train, "predict_img_s": infer}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classifiers", default="efficientnet_lite0,resnet50")
    ap.add_argument("--sizes", default="224")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    device = torch.device(resolve_device(a.device))
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name}), torch {torch.__version__}")
    print(f"{'classifier':20}{'size':>6}{'train img/s':>14}{'s/img':>8}{'predict img/s':>16}{'s/img':>8}")
    for c in a.classifiers.split(","):
        for size in map(int, a.sizes.split(",")):
            r = bench(c, size, a.n, a.batch_size, device)
            print(f"{c:20}{size:>6}{r['train_img_s']:>14.1f}{1 / r['train_img_s']:>8.3f}"
                  f"{r['predict_img_s']:>16.1f}{1 / r['predict_img_s']:>8.3f}")


if __name__ == "__main__":
    main()
