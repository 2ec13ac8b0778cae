"""Train and evaluate one classifier. ``fit()`` and ``predict()`` return plain dicts/arrays.

Images are decoded and resized once into a uint8 tensor (``load_images``); epochs then only apply
dihedral augmentation (flips and 90-degree rotations: a blood cell has no orientation) on the fly.
That keeps 1280x960 enhanced images from being decoded every epoch.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

ProgressFn = Callable[[int, int, str], None]  # (done, total, message)


class Cancelled(Exception):
    """Raised from a progress callback to stop a run cleanly."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _load_resized(path: str, size: int) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.draft("RGB", (size, size))  # JPEG: decode at reduced scale when much larger than needed
        return np.array(im.resize((size, size), Image.Resampling.BICUBIC))


def load_images(paths: Sequence[str], size: int, workers: int | None = None,
                on_progress: ProgressFn | None = None) -> torch.Tensor:
    """Decode and resize every image to ``size`` x ``size``: a uint8 tensor (N, 3, size, size)."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as ex:
        for i, arr in enumerate(ex.map(lambda p: _load_resized(p, size), paths)):
            out[i] = torch.from_numpy(arr).permute(2, 0, 1)
            if on_progress and (i + 1) % 64 == 0:
                on_progress(i + 1, len(paths), "decoding images")
    return out


def _dihedral(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flip + 90-degree rotation per batch (cheap, exact, no interpolation)."""
    k = int(torch.randint(0, 4, (1,), generator=gen))
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(-1)
    return torch.rot90(x, k, dims=(-2, -1)) if k else x


@dataclass
class TrainSettings:
    epochs: int = 3
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 3
    augment: bool = True
    freeze_backbone: bool = False
    seed: int = 0


class Normalizer(nn.Module):
    """uint8 NCHW -> normalised float, on the model's device (keeps the data pipeline uint8)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

    def forward(self, x):
        return (x.float() - self.mean) / self.std


def _batches(n: int, batch_size: int, shuffle: bool, gen: torch.Generator):
    idx = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        yield idx[i : i + batch_size]


def _make_optimizer(model: nn.Module, s: TrainSettings, head: str):
    if s.freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith(head + ".")
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=0.9, weight_decay=s.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return torch.autocast("cpu", enabled=False)


def run_epoch(model, norm, x, y, s: TrainSettings, device, gen, optimizer=None, scheduler=None,
              scaler=None, on_batch: Callable[[int, int], None] | None = None) -> tuple[float, float]:
    """One pass over (x, y); trains when an optimizer is given. Returns (mean loss, accuracy)."""
    train = optimizer is not None
    model.train(train and not s.freeze_backbone)  # a frozen backbone keeps its BatchNorm statistics
    loss_fn = nn.CrossEntropyLoss()
    total_loss, correct, seen = 0.0, 0, 0
    with torch.set_grad_enabled(train):
        for bi, idx in enumerate(_batches(len(x), s.batch_size, shuffle=train, gen=gen)):
            xb = x[idx]
            if train and s.augment:
                xb = _dihedral(xb, gen)
            xb = norm(xb.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
            yb = y[idx].to(device, non_blocking=True)
            with _autocast(device):
                logits = model(xb)
                loss = loss_fn(logits.float(), yb)
            if train:
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                scheduler.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
            if on_batch:
                on_batch(bi + 1, math.ceil(len(x) / s.batch_size))
    return total_loss / max(seen, 1), correct / max(seen, 1)


def fit(model: nn.Module, mean, std, head: str, x_train, y_train, x_val, y_val, s: TrainSettings,
        device: torch.device, on_progress: ProgressFn | None = None) -> dict:
    """Train with early stopping on validation loss; the best state is loaded back into ``model``.

    Returns {"history": [per-epoch dicts], "best_epoch", "best_val_loss", "best_state", "seconds"}.
    """
    seed_everything(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    model.to(device).to(memory_format=torch.channels_last)
    norm = Normalizer(mean, std).to(device)
    optimizer = _make_optimizer(model, s, head)
    steps = s.epochs * math.ceil(len(x_train) / s.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=s.lr, total_steps=max(steps, 1), pct_start=0.1, anneal_strategy="cos",
        div_factor=10.0, final_div_factor=100.0)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and not torch.cuda.is_bf16_supported() else None
    y_train, y_val = torch.as_tensor(y_train), torch.as_tensor(y_val)
    history, best, best_state, best_epoch, bad = [], math.inf, None, 0, 0
    t0 = time.perf_counter()
    n_batches = math.ceil(len(x_train) / s.batch_size)
    for epoch in range(1, s.epochs + 1):
        te = time.perf_counter()

        def on_batch(b, nb, epoch=epoch):
            if on_progress:
                on_progress((epoch - 1) * n_batches + b, s.epochs * n_batches, f"epoch {epoch}/{s.epochs}")

        tr_loss, tr_acc = run_epoch(model, norm, x_train, y_train, s, device, gen, optimizer, scheduler, scaler,
                                    on_batch=on_batch)
        with torch.inference_mode():
            va_loss, va_acc = run_epoch(model, norm, x_val, y_val, s, device, gen)
        history.append({"epoch": epoch, "train_loss": tr_loss, "train_acc": tr_acc, "val_loss": va_loss,
                        "val_acc": va_acc, "lr": optimizer.param_groups[0]["lr"],
                        "seconds": time.perf_counter() - te})
        if va_loss < best - 1e-6:
            best, best_epoch, bad = va_loss, epoch, 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            bad += 1
            if bad >= s.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"history": history, "best_epoch": best_epoch, "best_val_loss": best, "best_state": best_state,
            "seconds": time.perf_counter() - t0}


@torch.inference_mode()
def predict(model: nn.Module, mean, std, x: torch.Tensor, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, C) as float64."""
    model.to(device).eval()
    norm = Normalizer(mean, std).to(device)
    out = []
    for i in range(0, len(x), batch_size):
        xb = norm(x[i : i + batch_size].to(device)).contiguous(memory_format=torch.channels_last)
        with _autocast(device):
            logits = model(xb)
        out.append(torch.softmax(logits.float(), 1).cpu())
    return torch.cat(out).double().numpy() if out else np.zeros((0, 0))
