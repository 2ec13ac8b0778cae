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

from core.distributed import Held, World, all_sum, gather_rows, world
from core.models import spec_of
from core.progress import ProgressFn



class Cancelled(Exception):
    """Raised from a progress callback to stop a run cleanly."""


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed every generator. ``deterministic``: bitwise-repeatable cuDNN kernels; else cuDNN benchmarks and picks
    the fastest (GPU only: on a CPU a run is repeatable either way)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def _load_resized(path, size: int, box=None) -> np.ndarray:
    """Decode ``path`` (a file name or a binary file object), cut ``box`` (left, top, right, bottom; None: the
    whole image), resize to a square."""
    with Image.open(path) as im:
        if box is None:
            im.draft("RGB", (size, size))  # JPEG: decode at reduced scale when much larger than needed
        im = im.convert("RGB")
        if box is not None:
            im = im.crop(tuple(int(v) for v in box))
        return np.array(im.resize((size, size), Image.Resampling.BICUBIC))


def load_images(paths: Sequence, size: int, workers: int | None = None,
                on_progress: ProgressFn | None = None, boxes: Sequence | None = None) -> torch.Tensor:
    """Decode, cut (``boxes``, one per path or None) and resize every image (a file name or a binary file object
    each): uint8 (N, 3, size, size)."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    boxes = list(boxes) if boxes is not None else [None] * len(paths)
    with ThreadPoolExecutor(max_workers=workers) as ex:
        for i, arr in enumerate(ex.map(lambda pb: _load_resized(pb[0], size, pb[1]), zip(paths, boxes))):
            out[i] = torch.from_numpy(arr).permute(2, 0, 1)
            if on_progress and (i + 1) % 64 == 0:
                on_progress(i + 1, len(paths), "decoding images")
    return out


def dihedral_view(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 dihedral transforms (k % 4 quarter turns, mirrored when k >= 4): exact, no resampling."""
    x = x.flip(-1) if k >= 4 else x
    return torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x


def augment_batch(x: torch.Tensor, view: int, gen: torch.Generator, jitter: bool,
                  rows: torch.Tensor | None = None, n_global: int | None = None, hed: bool = False,
                  colour: bool = True, rotate: bool = False, erase: bool = False) -> torch.Tensor:
    """Per-image training augmentation of a float (B, 3, D, D) batch in 0-255 -> (B, 3, view, view).

    Each image gets its own dihedral transform; with ``jitter`` also a zoom (0.87-1.15x), a shift (up to 8%
    of the view) and a stain jitter (per-channel gain 0.9-1.1 and offset +-12 grey levels; not with ``colour=False``,
    which still draws them, so that the zoom and shift stay what they were); with ``hed`` also a
    jitter of each stain's amount (see :func:`hed_jitter`); with ``rotate`` also a turn by any angle in +-45 degrees
    (with the dihedral views, every angle: a cell on a slide has no upright); with ``erase`` also, on half the images,
    a rectangle (2-20% of the view, aspect 0.3-3.3) filled with the image's mean colour (random erasing,
    Zhong et al. 2020), so that no single spot of the cell decides. Under torchrun,
    ``x`` is this rank's ``rows`` of an ``n_global`` batch: every rank draws the whole batch's parameters
    from the same generator and applies its rows', so that N ranks augment exactly as one process does.
    """
    b, d = (len(x), x.shape[-1]) if rows is None else (n_global, x.shape[-1])
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])
    x = dihedral_per_image(x, pick(torch.randint(0, 8, (b,), generator=gen)))
    if not jitter:
        return centre_crop(x, view)
    zoom = pick(torch.exp((torch.rand(b, generator=gen) * 2 - 1) * math.log(1.15)))
    shift = pick((torch.rand(b, 2, generator=gen) * 2 - 1) * 0.08 * view / d)
    gain = pick(1 + (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1) * 0.1)
    offset = pick((torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1) * 12)
    if hed:  # drawn after the others, so that the plain jitter's draws stay what they were
        scale = pick(1 + (torch.rand(b, 3, generator=gen) * 2 - 1) * HED_SCALE)
        shift_od = pick((torch.rand(b, 3, generator=gen) * 2 - 1) * HED_SHIFT)
    if rotate:  # drawn last, so that every other draw stays what it was
        angle = pick((torch.rand(b, generator=gen) * 2 - 1) * math.pi / 4)
    if erase:  # after the rotation's draws, for the same reason
        box = pick(_erase_boxes(b, view, gen))
    if not len(x):  # this rank holds none of the batch (the draws above keep every rank's generator in step)
        return x.new_zeros((0, x.shape[1], view, view))
    theta = torch.zeros(len(x), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = view / d / zoom
    if rotate:  # the same scale, turned: [[cos, -sin], [sin, cos]]
        c, sn = torch.cos(angle) * view / d / zoom, torch.sin(angle) * view / d / zoom
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = c, -sn, sn, c
    theta[:, :, 2] = shift
    grid = nn.functional.affine_grid(theta.to(x.device), [len(x), 3, view, view], align_corners=False)
    x = nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if colour:
        x = (x * gain.to(x.device) + offset.to(x.device)).clamp(0, 255)
    if hed:
        x = hed_jitter(x, scale.to(x.device), shift_od.to(x.device))
    return erase_boxes(x, box) if erase else x


ERASE_P, ERASE_AREA, ERASE_ASPECT = 0.5, (0.02, 0.2), (0.3, 1 / 0.3)


def _erase_boxes(b: int, view: int, gen: torch.Generator) -> torch.Tensor:
    """(b, 4) int boxes (top, left, height, width) for random erasing; height 0 leaves an image alone."""
    on = torch.rand(b, generator=gen) < ERASE_P
    area = (ERASE_AREA[0] + torch.rand(b, generator=gen) * (ERASE_AREA[1] - ERASE_AREA[0])) * view * view
    aspect = torch.exp(math.log(ERASE_ASPECT[0]) + torch.rand(b, generator=gen) * math.log(ERASE_ASPECT[1] / ERASE_ASPECT[0]))
    h = (area * aspect).sqrt().round().clamp(1, view).long()
    w = (area / aspect).sqrt().round().clamp(1, view).long()
    top = (torch.rand(b, generator=gen) * (view - h + 1)).long()
    left = (torch.rand(b, generator=gen) * (view - w + 1)).long()
    return torch.stack([top, left, h * on, w], 1)


def erase_boxes(x: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Each image of a (B, 3, H, W) batch with its ``box`` (top, left, height, width) set to its mean colour."""
    r = torch.arange(x.shape[-2], device=x.device)[None, :, None]
    c = torch.arange(x.shape[-1], device=x.device)[None, None, :]
    t, l, h, w = (box[:, i].to(x.device)[:, None, None] for i in range(4))
    inside = ((r >= t) & (r < t + h) & (c >= l) & (c < l + w))[:, None]  # (B, 1, H, W)
    return torch.where(inside, x.mean(dim=(2, 3), keepdim=True), x)


# Stain jitter in haematoxylin-eosin-DAB space (Ruifrok & Johnston 2001 stain vectors, as in skimage's rgb2hed;
# Tellez et al. 2019, "Quantifying the effects of data augmentation and stain color normalization"): each
# image's amount of each stain scaled by 1 +- HED_SCALE and shifted by +- HED_SHIFT optical density (natural log:
# -ln(I / I0); skimage's units are these divided by -ln(1e-6) = 13.8).
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
HED_SCALE, HED_SHIFT = 0.2, 0.05


def hed_jitter(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """A float (B, 3, H, W) batch in 0-255 with image i's stain amounts ``hed * scale[i] + shift[i]`` (B, 3)."""
    od = -torch.log((x + 1) / 256)  # optical density per channel, >= 0
    hed = torch.einsum("bchw,cs->bshw", od, _HED_FROM_RGB.to(x))
    hed = hed * scale[:, :, None, None] + shift[:, :, None, None]
    od = torch.einsum("bshw,sc->bchw", hed, _RGB_FROM_HED.to(x))
    return (256 * torch.exp(-od) - 1).clamp(0, 255)


def dihedral_per_image(x: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Image i turned by the ``ks[i]``-th dihedral transform: one kernel per transform, not per image."""
    out = torch.empty_like(x)
    for k in ks.unique().tolist():
        sel = (ks == k).nonzero().flatten().to(x.device)
        out[sel] = dihedral_view(x[sel], k)
    return out


def centre_crop(x: torch.Tensor, view: int) -> torch.Tensor:
    """The central ``view`` x ``view`` pixels (what evaluation sees of a decoded region)."""
    o = (x.shape[-1] - view) // 2
    return x[..., o:o + view, o:o + view] if o else x


def mixup_pairs(alpha: float, n_global: int, gen: torch.Generator,
                rows: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """Mixup's weight and partners for one training batch: ``lam`` ~ Beta(alpha, alpha), folded to >= 0.5 so
    that the first label stays the larger share, and ``partner[j]``: the image that image j is mixed with.

    The partners form one random cycle over the images in hand. Every rank draws the same numbers from ``gen``
    (so that augmentation stays in step under torchrun) and pairs among its own ``rows`` of the global batch:
    with mixup, N ranks pair images differently from one process (docs/SCALING.md).
    """
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    perm = torch.randperm(n_global, generator=gen)
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    keys = perm if rows is None else perm[rows]
    order = torch.argsort(keys)
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)
    return max(lam, 1.0 - lam), partner


def _dihedral_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The old recipe: one random flip + 90-degree rotation for the whole batch (kept for the ablation)."""
    return dihedral_view(x, int(torch.randint(0, 8, (1,), generator=gen)))


@dataclass
class TrainSettings:
    epochs: int = 3
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 3
    augment: str = "dihedral+jitter"  # one of core.config.AUGMENTS
    freeze_backbone: bool = False
    seed: int = 0
    view: int | None = None  # pixels the model sees (centre of the decoded tensor); None: all of it
    label_smoothing: float = 0.0
    select_by: str = "macro_f1"  # best checkpoint: highest validation macro-F1 (ties: lower loss), or lowest loss
    warmup: float = 0.15  # share of the one-cycle schedule spent warming up
    deterministic: bool = False  # bitwise-repeatable cuDNN kernels (GPU); else cudnn.benchmark picks the fastest
    ema: float = 0.0  # > 0: validate and keep an exponential moving average of the weights over ~this many epochs
    mixup: float = 0.0  # > 0: Beta(mixup, mixup) mixup of training pairs (see mixup_pairs)
    backbone_lr: float = 1.0  # the pretrained layers' learning rate, as a fraction of lr (the head's)


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
    def in_head(name: str) -> bool:
        return name.startswith(head + ".")

    if s.freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad = in_head(name)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head_params = [p for n, p in named if in_head(n)]
    body = [p for n, p in named if not in_head(n)]
    # The pretrained layers may learn at a fraction of the new head's rate (s.backbone_lr); each group's rate is
    # its peak in the one-cycle schedule (fit reads it back from the groups).
    params = [g for g in ({"params": body, "lr": s.lr * s.backbone_lr}, {"params": head_params, "lr": s.lr})
              if g["params"]]
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=0.9, weight_decay=s.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return torch.autocast("cpu", enabled=False)


# The per-image augmentations (core.config.AUGMENTS but none / dihedral-batch) as augment_batch's flags; a flag
# not named keeps augment_batch's default (colour on; hed, rotate and erase off).
_PER_IMAGE = {"dihedral": dict(jitter=False), "dihedral+zoom": dict(jitter=True, colour=False),
              "dihedral+jitter": dict(jitter=True), "dihedral+jitter+hed": dict(jitter=True, hed=True),
              "dihedral+jitter+rotate": dict(jitter=True, rotate=True),
              "dihedral+jitter+erase": dict(jitter=True, erase=True)}


def _prepare(xb: torch.Tensor, s: TrainSettings, device, gen, train: bool, rows=None, n_global=None) -> torch.Tensor:
    """uint8 (B, 3, D, D) on the CPU -> augmented (train) or centre-cropped (eval) float on ``device``, 0-255.
    ``rows``/``n_global``: this rank's part of the global batch (see :func:`augment_batch`)."""
    view = s.view or xb.shape[-1]
    xb = xb.to(device, non_blocking=True)
    if not train or s.augment == "none":
        return centre_crop(xb, view).float()
    if s.augment == "dihedral-batch":
        return centre_crop(_dihedral_batch(xb, gen), view).float()
    if s.augment not in _PER_IMAGE:
        raise ValueError(f"unknown augmentation {s.augment!r}")  # validate_config says so first, in one line
    return augment_batch(xb.float(), view, gen, rows=rows, n_global=n_global, **_PER_IMAGE[s.augment])


def run_epoch(model, norm, x, y, s: TrainSettings, device, gen, optimizer=None, scheduler=None,
              scaler=None, on_batch: Callable[[int, int], None] | None = None, world: World = World()) -> dict:
    """One pass over (x, y); trains when an optimizer is given.

    Returns {"loss", "loss_sum", "acc", "pred"}: mean and summed loss (label-smoothed when training),
    accuracy, predicted classes. Loss and accuracy add up on the device: the host waits once per epoch, not
    per batch. Training under torchrun (``world.active``): every rank walks the same global batches and
    takes its rows of each; the loss is scaled so that DDP's gradient average equals one process's gradient.
    """
    train = optimizer is not None
    model.train(train and not s.freeze_backbone)  # a frozen backbone keeps its BatchNorm statistics
    loss_fn = nn.CrossEntropyLoss(label_smoothing=s.label_smoothing if train else 0.0, reduction="sum")
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    preds, seen = [], 0
    split = train and isinstance(x, Held)  # under torchrun: this rank holds some of the images
    mixing = train and s.mixup > 0
    with torch.set_grad_enabled(train):
        for bi, gidx in enumerate(_batches(len(x), s.batch_size, shuffle=train, gen=gen)):
            rows, xu8 = x.take(gidx) if split else (None, x[gidx])  # rows: positions in the global batch
            idx = gidx[rows] if split else gidx
            xb = norm(_prepare(xu8, s, device, gen, train, rows, len(gidx))).contiguous(memory_format=torch.channels_last)
            yb = y[idx].to(device, non_blocking=True)
            if mixing:
                lam, partner = mixup_pairs(s.mixup, len(gidx), gen, rows)
                partner = partner.to(device)
                xb = lam * xb + (1.0 - lam) * xb[partner]
            with _autocast(device):
                logits = model(xb)
                loss = loss_fn(logits.float(), yb)
                if mixing:
                    loss = lam * loss + (1.0 - lam) * loss_fn(logits.float(), yb[partner])
            if train:
                _step(loss * world.size / len(gidx) if split else loss / len(gidx), optimizer, scheduler, scaler)
            total_loss += loss.detach()
            pred = logits.argmax(1)
            if train:
                correct += (pred == yb).sum()
            else:
                preds.append(pred)
            seen += len(gidx)
            if on_batch:
                on_batch(bi + 1, math.ceil(len(x) / s.batch_size))
    if split:
        all_sum(total_loss), all_sum(correct)
    loss_sum = float(total_loss)
    if train:
        return {"loss": loss_sum / max(seen, 1), "loss_sum": loss_sum, "acc": int(correct) / seen if seen else 0.0}
    pred = torch.cat(preds).cpu().numpy() if preds else np.zeros(0, dtype=np.int64)
    acc = float((pred == y.numpy()).mean()) if len(pred) else 0.0
    return {"loss": loss_sum / max(seen, 1), "loss_sum": loss_sum, "acc": acc, "pred": pred}


def _validate(model, norm, x_val, y_val, s: TrainSettings, device, gen, world: World) -> dict:
    """Validation, each rank on the images it holds (:class:`Held`); the whole split's loss and predictions."""
    if not world.active:
        return run_epoch(model, norm, x_val, y_val, s, device, gen)
    held = x_val if isinstance(x_val, Held) else Held.split(x_val, world)
    va = run_epoch(model, norm, held.x, y_val[torch.from_numpy(held.mine)], s, device, gen)
    loss = all_sum(torch.tensor(va["loss_sum"], dtype=torch.float64, device=device))
    pred = gather_rows(va["pred"], held.mine)
    return {"loss": float(loss) / max(len(y_val), 1), "pred": pred,
            "acc": float((pred == y_val.numpy()).mean()) if len(pred) else 0.0}


def _wrap(model: nn.Module, device: torch.device, world: World) -> nn.Module:
    """Under torchrun: DistributedDataParallel, with synchronised BatchNorm on CUDA (gloo on CPU cannot: there
    each rank normalises by its own rows' statistics; docs/SCALING.md)."""
    if not world.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index if device.index is not None else torch.cuda.current_device()])
    return DistributedDataParallel(model)


def _step(loss, optimizer, scheduler, scaler) -> None:
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    scheduler.step()


class WeightAverage:
    """Exponential moving average of a model's weights and BatchNorm statistics, over about ``horizon_steps``
    optimiser steps (decay 1 - 1/horizon, ramped up over the first steps so that the average does not start
    stuck at the initial weights). The averaged copy is what gets validated and kept."""

    def __init__(self, model: nn.Module, horizon_steps: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.steps = 1.0 - 1.0 / max(horizon_steps, 1.0), 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for avg, cur in zip(self.model.state_dict().values(), model.state_dict().values()):
            if avg.dtype.is_floating_point:
                avg.lerp_(cur.detach(), 1.0 - d)
            else:  # BatchNorm's num_batches_tracked
                avg.copy_(cur)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Macro-averaged F1 over the classes present in ``y_true`` (0 for a class never predicted right)."""
    f1s = []
    for c in range(n_classes):
        tp = int(((y_pred == c) & (y_true == c)).sum())
        fp, fn = int(((y_pred == c) & (y_true != c)).sum()), int(((y_pred != c) & (y_true == c)).sum())
        if tp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else 0.0


def _better(ep: dict, best: dict | None, select_by: str) -> bool:
    if best is None:
        return True
    if select_by == "val_loss":
        return ep["val_loss"] < best["val_loss"] - 1e-6
    return (ep["val_macro_f1"], -ep["val_loss"]) > (best["val_macro_f1"] + 1e-9, -best["val_loss"])


def _snapshot(model: nn.Module) -> dict:
    """A CPU copy of ``model``'s weights, which later training steps leave alone."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def fit(model: nn.Module, train: tuple, val: tuple | None, s: TrainSettings, device: torch.device,
        on_progress: ProgressFn | None = None) -> dict:
    """Train on ``train`` = (uint8 images (N, 3, D, D), labels) and select on ``val``; the best epoch's
    weights (by ``s.select_by`` on validation) are loaded back into ``model``. Normalisation and the head come
    from the model's spec (``core.models.spec_of``).

    Early stopping after ``s.patience`` epochs without a better validation score. ``val`` None (a refit on
    every image): no validation, all ``s.epochs`` run and the last epoch's weights are kept. Returns {"history":
    [per-epoch dicts], "best_epoch", "best_val_loss", "best_val_acc", "best_val_macro_f1", "best_state",
    "seconds"}.
    """
    (x_train, y_train), (x_val, y_val) = train, (val if val is not None else (None, None))
    spec, w = spec_of(model), world()
    seed_everything(s.seed, s.deterministic)
    gen = torch.Generator().manual_seed(s.seed)
    model.to(device).to(memory_format=torch.channels_last)
    norm = Normalizer(spec.mean, spec.std).to(device)
    optimizer = _make_optimizer(model, s, spec.head)
    n_batches = math.ceil(len(x_train) / s.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=max(s.epochs * n_batches, 1),
        pct_start=s.warmup, anneal_strategy="cos", div_factor=10.0, final_div_factor=100.0)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and not torch.cuda.is_bf16_supported() else None
    y_train, y_val = torch.as_tensor(y_train), (None if val is None else torch.as_tensor(y_val))
    trained = _wrap(model, device, w)  # DDP under torchrun; the model itself otherwise
    if w.active and not isinstance(x_train, Held):  # every rank was given all images: keep its share
        x_train = Held.split(x_train, w)
    avg = WeightAverage(model, s.ema * n_batches) if s.ema > 0 else None
    kept = avg.model if avg else model  # the weights that are validated, selected and returned
    history, best, best_state, bad = [], None, None, 0
    t0 = time.perf_counter()
    for epoch in range(1, s.epochs + 1):
        te = time.perf_counter()

        def on_batch(b, nb, epoch=epoch):
            if avg:
                avg.update(model)
            if on_progress:
                on_progress((epoch - 1) * n_batches + b, s.epochs * n_batches, f"epoch {epoch}/{s.epochs}")

        tr = run_epoch(trained, norm, x_train, y_train, s, device, gen, optimizer, scheduler, scaler, on_batch, w)
        ep = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": math.nan,
              "val_acc": math.nan, "val_macro_f1": math.nan}
        if val is not None:
            with torch.inference_mode():
                va = _validate(kept, norm, x_val, y_val, s, device, gen, w)
            ep.update(val_loss=va["loss"], val_acc=va["acc"],
                      val_macro_f1=macro_f1(y_val.numpy(), va["pred"], int(getattr(model, spec.head).out_features)))
        ep.update(lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - te)
        history.append(ep)
        if val is None:  # a refit: nothing to select on, the last epoch is kept (copied once, after the loop)
            best = ep
        elif _better(ep, best, s.select_by):
            best, bad, best_state = ep, 0, _snapshot(kept)
        else:
            bad += 1
            if bad >= s.patience:
                break
    if val is None and history:
        best_state = _snapshot(kept)
    if best_state is not None:
        model.load_state_dict(best_state)
    best = best or {"epoch": 0, "val_loss": math.inf, "val_acc": math.nan, "val_macro_f1": math.nan}
    return {"history": history, "best_epoch": best["epoch"], "best_val_loss": best["val_loss"],
            "best_val_acc": best["val_acc"], "best_val_macro_f1": best["val_macro_f1"], "best_state": best_state,
            "seconds": time.perf_counter() - t0}


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 64,
            view: int | None = None, tta: int = 1, features: bool = False, on_progress: ProgressFn | None = None):
    """Class probabilities (N, C) as float64 of the centre ``view``; ``tta`` > 1 averages the softmax over
    that many dihedral views (8 = every flip and quarter turn). ``features``: also the penultimate features
    (N, F) float32, the head's input for the unturned view: returns (probabilities, features).
    ``on_progress(done, total)`` after each batch, in images (a test folder of thousands takes minutes on a CPU)."""
    spec = spec_of(model)
    model.to(device).eval()
    norm = Normalizer(spec.mean, spec.std).to(device)
    out, feats, seen = [], [], []
    hook = getattr(model, spec.head).register_forward_pre_hook(lambda m, a: seen.append(a[0])) if features else None
    if on_progress:
        on_progress(0, len(x))
    try:
        for i in range(0, len(x), batch_size):
            xb = centre_crop(x[i : i + batch_size].to(device), view or x.shape[-1]).float()
            p = 0
            for k in range(tta):
                with _autocast(device):
                    logits = model(norm(dihedral_view(xb, k)).contiguous(memory_format=torch.channels_last))
                p = p + torch.softmax(logits.float(), 1)
                if features and k == 0:
                    feats.append(seen.pop().float().flatten(1))
                seen.clear()
            out.append(p / tta)
            if on_progress:
                on_progress(min(i + batch_size, len(x)), len(x))
    finally:
        if hook is not None:
            hook.remove()
    probs = torch.cat(out).cpu().double().numpy() if out else np.zeros((0, 0))
    if not features:
        return probs
    return probs, torch.cat(feats).cpu().numpy() if feats else np.zeros((0, 0), np.float32)
