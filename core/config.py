"""One source of truth: class names, paths, presets and the study configuration.

Everything a run needs is in :class:`StudyConfig`; the resolved config is written verbatim into
``run.json`` so a run describes itself.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.devices import DEVICES
from core.enhance.registry import FAST_PRECISION, is_half_setting
# Paths live in the leaf module core.paths; re-exported here for callers that know them from config.
from core.paths import KNOWN_DATA_LOCATIONS, REPO_ROOT, default_cache_dir, default_runs_dir  # noqa: F401
from core.regions import POLICIES, check_policy  # noqa: F401  (POLICIES: the input-policy option list)

# The four classes, in the order used for probabilities, confusion matrices and tables.
CLASSES: tuple[str, ...] = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")
# Short names for compact plots (EOS/LYM/MON/NEU as in the paper's tables).
CLASS_ABBR: dict[str, str] = {c: c[:3].upper() for c in CLASSES}
PROB_COLUMNS: tuple[str, ...] = tuple(f"prob_{c}" for c in CLASSES)

SPLITS = ("grouped", "random")
OPTIMIZERS = ("adamw", "sgd")
PRETRAINED = ("imagenet", "none")  # or a path to a state dict
# The CLI's --enhance-precision -> StudyConfig.enhance_half. fast: fp16 on CUDA; on CPU bf16 only where a probe
# measures it faster than fp32 (CPUs with AMX), else fp32 (docs/ENHANCE.md).
ENHANCE_PRECISIONS: dict[str, bool | str | None] = {"auto": None, "fp32": False, "half": True, "fast": FAST_PRECISION}


def precision_name(enhance_half: bool | str | None) -> str:
    """The --enhance-precision name of a StudyConfig.enhance_half value (e.g. from a run.json)."""
    return next((k for k, v in ENHANCE_PRECISIONS.items() if v == enhance_half), "auto")
# The training recipe's choices (core.engine): augment none | dihedral-batch (one flip/quarter turn per batch,
# the old recipe) | dihedral (per image) | dihedral+zoom (also zoom, shift) | dihedral+jitter (also zoom, shift,
# stain jitter) | dihedral+jitter+hed
# (also each stain's amount jittered in haematoxylin-eosin space) | dihedral+jitter+rotate (also a turn by any
# angle) | dihedral+jitter+erase (also random erasing); checkpoint rule.
AUGMENTS = ("none", "dihedral-batch", "dihedral", "dihedral+zoom", "dihedral+jitter", "dihedral+jitter+hed",
            "dihedral+jitter+rotate", "dihedral+jitter+erase")
SELECT_BY = ("macro_f1", "val_loss")
IMAGE_SIZE_RANGE = (32, 1024)  # pixels the classifier may be given (--image-size)
MIN_PER_CLASS = 2  # --per-class / --test-per-class: fewer cannot be split or bootstrapped
TTA_VIEWS = (1, 2, 4, 8)


@dataclass
class StudyConfig:
    """Everything that defines a study. Defaults are the ``quick`` preset's."""

    preset: str = "custom"
    data_dir: str | None = None  # root of the Kaggle layout; resolved by core.data.find_data_root
    test_dir: str | None = None  # a TEST folder in the Kaggle layout; else TEST_SIMPLE; else held-out TRAIN
    variants: tuple[str, ...] = ("original", "bicubic-x4")
    classifier: str = "efficientnet_lite0"
    pretrained: str = "imagenet"  # imagenet | none | path to a state dict
    epochs: int = 3
    per_class: int | None = None  # training images per class (None: all)
    test_per_class: int | None = None  # test images per class (None: all)
    image_sizes: tuple[int, ...] = (224,)
    seeds: tuple[int, ...] = (0,)
    split: str = "grouped"  # grouped (no source cell on both sides) | random (the paper's 80/20, leaky)
    val_fraction: float = 0.2
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 3  # early stopping on validation loss
    freeze_backbone: bool = False  # train only the classifier head
    # The recipe (docs/BENCHMARKS.md has the ablation). augment: one of AUGMENTS (above; core.engine._PER_IMAGE).
    augment: str = "dihedral+jitter"
    label_smoothing: float = 0.1
    select_by: str = "macro_f1"  # best checkpoint by grouped-validation macro-F1 (or val_loss)
    ema: float = 0.0  # > 0: validate and keep a moving average of the weights over about this many epochs
    backbone_lr: float = 1.0  # the pretrained layers' learning rate as a fraction of --lr (the new head's)
    mixup: float = 0.0  # > 0: mix pairs of training images (and their labels) with a Beta(mixup, mixup) weight
    tta: int = 8  # test-time augmentation: softmax averaged over this many dihedral views (1 = none)
    # After validation has chosen the best epoch, train the test model afresh on training + validation images for
    # that many epochs (the cells validation held out teach it too); the validation figures stay the first fit's.
    refit: bool = False
    # What the classifier sees (core.regions): full (the frame squashed, the paper's) | center | cell.
    input_policy: str = "cell"
    crop: int | None = None  # region side in original pixels (None: 200 for center, 144 for cell)
    device: str = "auto"
    deterministic: bool = False  # bitwise-repeatable cuDNN kernels on a GPU; else cudnn.benchmark (faster)
    enhance_batch_size: int | None = None  # None: 1 on CPU; on CUDA sized from free memory (core.enhance.realesrgan)
    # Real-ESRGAN precision. None: fp16 on CUDA (as the official inference script), fp32 on CPU (equal to
    # RealESRGANer); True: also bf16 on CPU (52-54 dB PSNR vs fp32; ~3x faster with AMX, slower without);
    # FAST_PRECISION: fp16 on CUDA, bf16 on CPU only where measured faster; False: fp32 everywhere.
    enhance_half: bool | str | None = None
    enhance_compile: bool = False  # torch.compile the Real-ESRGAN model (core.enhance.realesrgan)
    enhance_format: str = "png"  # lossless by default: the comparison must not add JPEG artefacts
    runs_dir: str | None = None
    cache_dir: str | None = None
    notes: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad value. Names that live in the registries (variants,
        classifier) are checked by :func:`core.registries.validate_config`, which calls this first."""
        if not self.variants:
            raise ValueError("--variants: at least one variant is needed")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"--variants: duplicate variant in {','.join(self.variants)}")
        if self.pretrained not in PRETRAINED and not Path(self.pretrained).is_file():
            raise ValueError(f"--pretrained: {self.pretrained!r} is not 'imagenet', 'none' or an existing file")
        if self.epochs < 1:
            raise ValueError(f"--epochs: must be >= 1, got {self.epochs}")
        for name in ("per_class", "test_per_class"):
            n = getattr(self, name)
            if n is not None and n < MIN_PER_CLASS:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= {MIN_PER_CLASS}, got {n}")
        if not self.image_sizes:
            raise ValueError("--image-size: at least one size is needed")
        if len(set(self.image_sizes)) != len(self.image_sizes):
            raise ValueError(f"--image-size: duplicate size in {','.join(map(str, self.image_sizes))}")
        lo, hi = IMAGE_SIZE_RANGE
        for s in self.image_sizes:
            if not lo <= s <= hi:
                raise ValueError(f"--image-size: must be between {lo} and {hi}, got {s}")
        if not self.seeds:
            raise ValueError("--seeds: at least one seed is needed")
        if self.split not in SPLITS:
            raise ValueError(f"--split: unknown split {self.split!r}; choose from {', '.join(SPLITS)}")
        if not 0.0 < self.val_fraction < 0.9:
            raise ValueError(f"--val-fraction: must be in (0, 0.9), got {self.val_fraction}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer: unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.device not in DEVICES:
            raise ValueError(f"--device: unknown device {self.device!r}; choose from {', '.join(DEVICES)}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size: must be >= 1, got {self.batch_size}")
        if not is_half_setting(self.enhance_half):
            raise ValueError(f"--enhance-precision: unknown value {self.enhance_half!r}; choose from "
                             f"{', '.join(ENHANCE_PRECISIONS)}")
        if self.enhance_batch_size is not None and self.enhance_batch_size < 1:
            raise ValueError(f"--enhance-batch-size: must be >= 1, got {self.enhance_batch_size}")
        check_policy(self.input_policy)
        if self.augment not in AUGMENTS:
            raise ValueError(f"--augment: unknown augmentation {self.augment!r}; choose from {', '.join(AUGMENTS)}")
        if self.select_by not in SELECT_BY:
            raise ValueError(f"--select-by: unknown criterion {self.select_by!r}; choose from {', '.join(SELECT_BY)}")
        if self.tta not in TTA_VIEWS:
            raise ValueError(f"--tta: must be 1, 2, 4 or 8 dihedral views, got {self.tta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label-smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if not 0.0 <= self.ema <= self.epochs:
            raise ValueError(f"--ema: must be between 0 (off) and --epochs ({self.epochs}) epochs, got {self.ema}")
        if not 0.0 < self.backbone_lr <= 1.0:
            raise ValueError(f"--backbone-lr: must be a fraction of --lr in (0, 1], got {self.backbone_lr}")
        if not 0.0 <= self.mixup <= 10.0:
            raise ValueError(f"--mixup: must be between 0 (off) and 10 (the Beta distribution's alpha), got {self.mixup}")
        if self.crop is not None and not 32 <= self.crop <= 4096:
            raise ValueError(f"--crop: must be between 32 and 4096 pixels, got {self.crop}")
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ValueError(f"--seeds: seeds must be distinct and >= 0, got {list(self.seeds)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr: must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and 0 <= self.weight_decay < 1):
            raise ValueError(f"--weight-decay: must be a finite number in [0, 1), got {self.weight_decay}")
        if self.test_dir is not None and not Path(self.test_dir).is_dir():
            raise ValueError(f"--test-dir: {self.test_dir!r} is not a folder")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ValueError(f"--data: {self.data_dir!r} is not a folder")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["variants"] = list(self.variants)
        d["image_sizes"] = list(self.image_sizes)
        d["seeds"] = list(self.seeds)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StudyConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "input_policy" not in kw and isinstance(kw.get("augment"), bool):  # a run made before input policies
            kw.update(input_policy="full", tta=1, label_smoothing=0.0, select_by="val_loss",
                      augment="dihedral-batch" if kw["augment"] else "none")
        for k in ("variants", "image_sizes", "seeds"):
            if k in kw and kw[k] is not None:
                kw[k] = tuple(kw[k])
        return cls(**kw)


# The CPU recipe shared by `quick` and `cpu`: fine-tuned ImageNet EfficientNet-Lite0 (offline weights) on a
# 144 px region around the stained cell at 128 px, original vs the compact Real-ESRGAN (docs/BENCHMARKS.md).
_CPU_RECIPE = dict(variants=("original", "realesr-animevideov3"), classifier="efficientnet_lite0",
                   pretrained="imagenet", freeze_backbone=False, image_sizes=(128,), seeds=(0,), split="grouped",
                   batch_size=32, lr=1e-3, input_policy="cell")

# Presets: named overrides of StudyConfig. The CLI applies explicit flags on top of a preset.
PRESETS: dict[str, dict] = {
    # Real data, both variants, minutes on a 2-core CPU with no GPU and no network.
    "quick": dict(
        _CPU_RECIPE, epochs=6, per_class=300, patience=6,
        enhance_half=FAST_PRECISION,  # fp16 on CUDA; bf16 on a CPU where it is faster (AMX: ~3x), else fp32
        notes=[
            "quick preset: the enhanced variant uses the compact realesr-animevideov3 model "
            "(SRVGGNetCompact), in reduced precision where it is faster (fp16 on a GPU, bf16 on a CPU with AMX; "
            "else fp32: run.json says which), instead of the paper's RealESRGAN_x4plus (~20 s/image "
            "on CPU), and fine-tunes ImageNet EfficientNet-Lite0 instead of ResNet-50, on 300 training images "
            "per class and a 144 px region around the stained cell, so that it finishes in minutes on a CPU. "
            "Use --preset cpu for five times the data, or paper/study for the paper's protocol."
        ],
    ),
    # More data and epochs, still CPU-only: under an hour on 2 cores (docs/BENCHMARKS.md: 1,500/class raised
    # grouped-validation accuracy over 1,000 and fits the hour with the enhancement in bf16 on AMX, fp32 without).
    # weight_decay 0.05: higher grouped validation on 3 of 3 paired seeds at 600/class (docs/BENCHMARKS.md,
    # "Recipe ablation", 2026-11-27); quick keeps 1e-4: at 300/class 0.05 was higher on 1 seed of 3 only (same section).
    # augment dihedral-batch (one flip / quarter turn per batch, no zoom, shift or stain jitter): higher grouped
    # validation on 2 of 3 paired seeds and on average at 600/class (same section, 2026-11-28); quick keeps its recipe.
    # refit after a 4-epoch selection fit: on cells no arm trained on, the refitted model beat the 8-epoch recipe on
    # 2 of 2 seeds at this scale (same section, "Refit on the validation cells", 2026-11-28); about 1.14x the
    # training of one 8-epoch fit, so the hour still holds.
    "cpu": dict(
        _CPU_RECIPE, epochs=4, per_class=1500, patience=4, weight_decay=0.05, augment="dihedral-batch", refit=True,
        enhance_half=FAST_PRECISION,  # as in quick
        notes=[
            "cpu preset: fine-tunes ImageNet EfficientNet-Lite0 on 1,500 training images per class (a grouped "
            "subset of TRAIN, 60% of it) and a 144 px region around the stained cell, then refits the test model "
            "on the training and validation images for the epochs validation chose; the enhanced variant uses "
            "the compact realesr-animevideov3 model, in reduced precision where it is faster (as in quick), "
            "instead of RealESRGAN_x4plus (~20 "
            "s/image on CPU). Use --preset paper or study on a GPU for the paper's protocol."
        ],
    ),
    # The seed paper's protocol: ResNet-50 ImageNet, full TRAIN, 224 px, original vs RealESRGAN_x4plus,
    # random 80/20 validation split (leaky: near-copies of training cells land in validation).
    "paper": dict(
        variants=("original", "realesrgan-x4plus"),
        classifier="resnet50",
        pretrained="imagenet",
        epochs=20,
        per_class=None,
        image_sizes=(224,),
        seeds=(0,),
        split="random",
        batch_size=32,
        optimizer="adamw",
        lr=3e-4,
        patience=5,
        input_policy="full",  # the whole 320x240 frame squashed to 224 (1280x960 for x4plus), as the paper did
        tta=1,
        notes=["paper preset: random 80/20 split of TRAIN as in the paper (its validation is leaky), and the "
               "paper's input: the whole frame squashed to 224x224, no test-time augmentation."],
    ),
    # The rigorous design: controls, source-grouped split, 3 seeds, paired statistics.
    "study": dict(
        variants=("original", "bicubic-x4", "realesrgan-x4plus"),
        classifier="resnet50",
        pretrained="imagenet",
        epochs=20,
        per_class=None,
        image_sizes=(224,),
        seeds=(0, 1, 2),
        split="grouped",
        batch_size=32,
        lr=3e-4,
        patience=5,
    ),
}


def make_config(preset: str | None = None, **overrides) -> StudyConfig:
    """A config from a preset plus explicit overrides (``None`` overrides are ignored, as in timm). To set a
    setting to None over a preset (all training images, auto precision), give it to :func:`config_with`."""
    return config_with(preset, {k: v for k, v in overrides.items() if v is not None})


def config_with(preset: str | None, given: Mapping[str, Any]) -> StudyConfig:
    """A config from a preset and every setting in ``given``, None included (``per_class=None``: all images):
    the command line gives only the flags that were typed (``core.cli.config_from_args``)."""
    base: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"--preset: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        base = dict(PRESETS[preset], preset=preset)
        base["notes"] = list(base.get("notes", []))
        changed = _changed_from_preset(PRESETS[preset], given)
        if changed:  # the preset's own note describes the preset: say what this run does differently
            base["notes"].append(f"changed from the {preset} preset: {changed}")
    base.update(given)
    return StudyConfig.from_dict(base)


# What None means in the settings a flag can set to None over a preset (`--per-class all`, `--enhance-precision auto`)
NONE_MEANS = {"per_class": "all", "test_per_class": "all", "enhance_half": "auto"}


def _changed_from_preset(preset: dict, given: Mapping[str, Any]) -> str:
    """'per_class=500 (preset: 1500), ...' for the preset settings ``given`` changes, in the flags' words."""
    def shown(k, v):
        v = tuple(v) if isinstance(v, list) else v
        return precision_name(v) if k == "enhance_half" else NONE_MEANS.get(k, v) if v is None else v

    return ", ".join(f"{k}={shown(k, v)!r} (preset: {shown(k, preset[k])!r})" for k, v in given.items()
                     if k in preset and k != "notes" and shown(k, v) != shown(k, preset[k]))
