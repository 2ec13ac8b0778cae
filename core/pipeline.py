"""A whole study, top to bottom: data -> groups/split -> enhance -> train -> evaluate -> store.

``run(config)`` is the one entry point (CLI and dashboard); ``resume(run_id)`` continues a run that stopped.
Read it from the top: every stage is a small function, and every result lands in the run folder as soon as it
exists. A daemon thread keeps the run's heartbeat fresh while it works (``core.store.effective_status``).
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from core import data as D
from core import distributed as dist
from core.config import CLASSES, StudyConfig, default_cache_dir
from core.devices import resolve_device
from core.engine import Cancelled, TrainSettings, fit, load_images, predict, seed_everything
from core.enhance import create_enhancer, enhance_to_cache, get_enhancer_spec
from core.enhance.realesrgan import CPU_PRECISIONS
from core.metrics import confusion_rows, metrics_rows, predictions_frame
from core.models import create_classifier
from core.registries import validate_config
from core.regions import add_regions, boxes_of, margin_for
from core.store import (CANCEL_FILE, HEARTBEAT_EVERY_S, KEYS, RESUMABLE_STATUSES, FollowerRun, Run, RunStore,
                        check_run_id, check_writable, clear_rank_errors, now_iso, rank_errors, record_rank_error)

OnProgress = Callable[[dict], None]


class Progress:
    """Writes progress.json (throttled) and log lines; raises Cancelled when a cancel is requested."""

    def __init__(self, run: Run, stages: list[str], on_progress: OnProgress | None = None):
        self.run, self.stages, self.on_progress = run, stages, on_progress
        self.stage, self.t_stage, self._last = "", time.perf_counter(), 0.0
        # the sub-step a stage is in (decoding, training, predicting: one callback each) and when it began, so
        # that each sub-step's ETA counts its own time only
        self._step, self._t_step, self._t_call = None, self.t_stage, self.t_stage
        self.durations: dict[str, float] = {}
        self.cancel_event = threading.Event()
        self.info: dict = {"stage": "starting", "percent": 0.0}  # the last progress written
        self._write_lock = threading.Lock()  # the heartbeat thread writes progress.json too

    def _write(self, info: dict) -> None:
        with self._write_lock:
            self.info = info
            self.run.write_progress(**info)

    def beat(self) -> None:
        """Refresh the heartbeat: the last progress again, with this process's pid, host and the time."""
        with self._write_lock:
            self.run.write_progress(**self.info)

    def start(self, stage: str, message: str = "") -> None:
        if self.stage:
            self.durations[self.stage] = round(time.perf_counter() - self.t_stage, 3)
        self.stage, self.t_stage = stage, time.perf_counter()
        self._step, self._t_step, self._t_call = None, self.t_stage, self.t_stage
        self.run.log(f"[{stage}] {message}".rstrip())
        self.update(0, 0, message, force=True)

    def finish(self) -> None:
        if self.stage:
            self.durations[self.stage] = round(time.perf_counter() - self.t_stage, 3)
        self.stage = ""

    def complete(self) -> None:
        self.finish()
        info = {"stage": "finished", "stage_index": len(self.stages), "stages": len(self.stages), "done": 1,
                "total": 1, "message": "finished", "eta_s": 0, "percent": 100.0}
        self._write(info)
        if self.on_progress:
            self.on_progress(info)

    def update(self, done: int, total: int, message: str = "", force: bool = False, step: str | None = None) -> None:
        """``done`` of ``total`` in the current sub-step ``step`` (default: the message). A new sub-step starts its
        clock where the last update left off, so its ETA is not inflated by the sub-steps before it."""
        if self.cancel_event.is_set() or self.run.cancel_requested():
            raise Cancelled("cancelled by user")
        now = time.perf_counter()
        step = message if step is None else step
        if step != self._step:
            self._step, self._t_step = step, self._t_call
        self._t_call = now
        if not force and now - self._last < 0.5 and done < total:
            return
        self._last = now
        elapsed = now - self._t_step
        eta = elapsed / done * (total - done) if done and total else None
        idx = self.stages.index(self.stage) if self.stage in self.stages else 0
        frac = done / total if total else 0.0
        info = {"stage": self.stage, "stage_index": idx + 1, "stages": len(self.stages), "done": done,
                "total": total, "message": message, "eta_s": None if eta is None else round(eta, 1),
                "percent": round(100 * (idx + frac) / max(len(self.stages), 1), 1)}
        self._write(info)
        if self.on_progress:
            self.on_progress(info)

    def callback(self, message: str = ""):
        """``fn(done, total, msg=None)`` for one sub-step: its own ETA, whatever ``msg`` says (epoch 3/6, ...)."""
        return lambda done, total, msg=None: self.update(done, total, msg or message, step=message)


@dataclass
class StudyData:
    pool: pd.DataFrame  # training pool (train + validation), a per-class subset of TRAIN
    test: pd.DataFrame
    test_source: str
    manifest: D.Manifest
    enhanced: dict[str, dict[str, str]] = field(default_factory=dict)  # variant -> sha1 -> cached path
    policy: str = "full"  # the input policy the regions were cut for
    copies: dict = field(default_factory=dict)  # byte-identical test files (core.data.exact_copies)


def decoded_size(policy: str, size: int) -> int:
    """Pixels decoded for a ``size`` view: the region plus the policy's margin for jitter."""
    return int(round(size * margin_for(policy)))


# ---------------------------------------------------------------- stages


def prepare_data(cfg: StudyConfig, prog: Progress) -> StudyData:
    root = D.find_data_root(cfg.data_dir)
    prog.run.log(f"data root: {root}")
    man = D.build_manifest(root, cfg.test_dir)
    train = man.split("TRAIN")
    seed0 = cfg.seeds[0]
    if "TEST" in man.split_dirs:
        test, source = man.split("TEST"), "TEST" if cfg.test_dir is None else f"TEST ({cfg.test_dir})"
    elif "TEST_SIMPLE" in man.split_dirs:
        test, source = man.split("TEST_SIMPLE"), "TEST_SIMPLE"
    else:  # no test folder at all: hold out 20% of TRAIN by source cell, whatever --split says
        train, test = _grouped_split(train, 0.2, seed0 + 10_000, cfg, prog)
        source = "TRAIN held-out (20%, by source cell)"
    pool = D.subset_per_class(train, cfg.per_class, seed0)
    check_every_class(pool, man.split_dirs.get("TRAIN"))
    test = D.subset_per_class(test, cfg.test_per_class, seed0)
    copies = D.exact_copies(train, test)  # against all of TRAIN: a copy of any training file is not an unseen cell
    if test.empty:
        raise ValueError(f"no test images: {source} is empty (each class has a single source group?); "
                         f"pass --test-dir DIR")
    pool, test = (add_regions(df, cfg.input_policy, cfg.crop) for df in (pool, test))
    notes = int((pool["region_note"] != "").sum() + (test["region_note"] != "").sum())
    prog.run.log(f"input policy {cfg.input_policy}: {notes} of {len(pool) + len(test)} images fell back")
    if copies["test_repeated"] or copies["test_in_train"]:
        prog.run.log(f"exact copies: {copies['test_repeated']} test images repeat another test image, "
                     f"{copies['test_in_train']} are also TRAIN files")
    return StudyData(pool=pool, test=test, test_source=source, manifest=man, policy=cfg.input_policy,
                     copies=copies)


def check_every_class(pool: pd.DataFrame, train_dir: str | None) -> None:
    """A class with no usable training image is an error naming it (it would train a model blind to it)."""
    empty = [c for c in CLASSES if not (pool["label"] == c).any()]
    if empty:
        raise ValueError(f"{', '.join(empty)}: 0 usable images in the training pool ({train_dir}); every class "
                         f"needs training images (files skipped at scan time are listed in run.json)")


def _groups(df: pd.DataFrame, cfg: StudyConfig, prog: Progress, learn_from: pd.DataFrame | None = None) -> np.ndarray:
    from core.groups import assign_groups

    _embed_sharded(df, cfg, df if learn_from is None else learn_from)
    return assign_groups(df, cache_dir=_cache(cfg), device=resolve_device(cfg.device),
                         on_progress=prog.callback("embedding images for source grouping"), learn_from=learn_from)


def _embed_sharded(df: pd.DataFrame, cfg: StudyConfig, learn_from: pd.DataFrame) -> None:
    """Under torchrun: rank 0 copy-tunes the grouping network (cached; the others wait), each rank embeds its share
    of ``df`` into the shared cache, all wait for all, and rank 0 learns the copy whitening into it. So the grouping
    that follows (on every rank) finds the one network, every embedding and the one whitening cached, and every rank
    groups in the very same space. One process: nothing to do."""
    w = dist.world()
    if not w.active:
        return
    from core.groups import copy_tune, embed_in, whitening

    cache, device = _cache(cfg), resolve_device(cfg.device)
    if w.main:
        copy_tune(learn_from, cache, device)
    dist.barrier()
    tuned = copy_tune(learn_from, cache, device)  # cached now (None: too small to tune, the ImageNet network)
    embed_in(df.iloc[w.mine(len(df))], tuned, cache, device)
    dist.barrier()
    if w.main:
        learn_from = learn_from.reset_index(drop=True)
        whitening(learn_from, embed_in(learn_from, tuned, cache, device), cache, device, tuned=tuned)
    dist.barrier()


def _split(df: pd.DataFrame, fraction: float, seed: int, cfg: StudyConfig, prog: Progress):
    if cfg.split == "random":
        return D.random_split(df, fraction, seed)
    return _grouped_split(df, fraction, seed, cfg, prog)


def _grouped_split(df: pd.DataFrame, fraction: float, seed: int, cfg: StudyConfig, prog: Progress):
    if "group_id" not in df:
        df = df.assign(group_id=_groups(df, cfg, prog))
    return D.grouped_split(df, df["group_id"].to_numpy(), fraction, seed)


def assign_source_groups(sd: StudyData, cfg: StudyConfig, prog: Progress) -> None:
    """Source-cell groups for the pool (grouped split) and the test set (group bootstrap)."""
    if "group_id" not in sd.pool and cfg.split == "grouped":
        sd.pool["group_id"] = _groups(sd.pool, cfg, prog)
    if "group_id" not in sd.test:
        sd.test["group_id"] = _groups(sd.test, cfg, prog, learn_from=sd.pool)  # in the pool's space


def preflight(cfg: StudyConfig, pinned: dict | None = None) -> dict:
    """Fail in seconds, not hours: the classifier's and every enhancer's weights must load first. With
    ``--enhance-precision fast`` each process probes its CPU; ``pinned`` (variant -> precision, a resumed run's
    record) and then rank 0's choice override that, so one run's images are made in one precision."""
    create_classifier(cfg.classifier, len(CLASSES), cfg.pretrained)
    enhancers = {v: create_enhancer(v, device=cfg.device, batch_size=cfg.enhance_batch_size, half=cfg.enhance_half,
                                    compile=cfg.enhance_compile)
                 for v in cfg.variants if not get_enhancer_spec(v).identity}
    for v, enh in enhancers.items():
        if getattr(enh, "precision_probe", None):
            prior = (pinned or {}).get(v)
            enh.pin_precision(dist.broadcast_object(prior if prior in CPU_PRECISIONS else enh.precision))
    return enhancers


def enhance_variants(sd: StudyData, cfg: StudyConfig, enhancers: dict, prog: Progress) -> tuple[dict, list[dict]]:
    """Enhance every image the study uses with every non-identity variant (cached on disk)."""
    provenance, errors = {}, []
    images = pd.concat([sd.pool, sd.test]).drop_duplicates("sha1")
    for v in cfg.variants:
        spec = get_enhancer_spec(v)
        if spec.identity:
            provenance[v] = {"enhancer": v}
            continue
        prog.start(f"enhance:{v}", f"{len(images)} images with {v}")
        enh = enhancers[v]
        boxes = [None] * len(images) if cfg.input_policy == "full" else boxes_of(images)
        sources = list(zip(images["path"], images["sha1"], boxes))
        made = _enhance_sharded(sources, enh, cfg, prog, v)
        res = enhance_to_cache(sources, enh, _cache(cfg), batch_size=cfg.enhance_batch_size, fmt=cfg.enhance_format,
                               on_progress=prog.callback(f"enhancing with {v}"))
        made += res.made
        from_cache = len(sources) - made - len(res.errors)
        prog.run.log(f"{v}: {made} made, {from_cache} from cache, {len(res.errors)} errors")
        provenance[v] = {**enh.provenance(), "weights_id": enh.weights_id(), "made": made, "from_cache": from_cache}
        errors += [{**e, "split": f"enhance:{v}"} for e in res.errors]
        sd.enhanced[v] = res.paths
    return provenance, errors


def run_enhancers(run: Run, cfg: StudyConfig) -> dict:
    """:func:`preflight` for a run: the precisions its run.json records (a resumed run's images were made in them)
    are pinned, and the ones used are recorded before any image is made."""
    prior = run.read_meta().get("enhance_precision")
    enhancers = preflight(cfg, pinned=prior if isinstance(prior, dict) else None)
    run.update_meta(enhance_precision={v: e.precision for v, e in enhancers.items() if hasattr(e, "precision")})
    return enhancers


def _enhance_sharded(sources: list[tuple], enh, cfg: StudyConfig, prog: Progress, v: str) -> int:
    """Under torchrun: each rank enhances its share into the shared cache (atomic writes: any rank can resume
    any share), then all wait for all; the whole pass that follows finds them cached. Returns how many the
    ranks made together (0 in one process)."""
    w = dist.world()
    if not w.active:
        return 0
    res = enhance_to_cache(list(w.shard(sources)), enh, _cache(cfg), batch_size=cfg.enhance_batch_size,
                           fmt=cfg.enhance_format, on_progress=prog.callback(f"enhancing with {v} (rank 0's share)"))
    dist.barrier()
    return sum(dist.all_gather_object(res.made))


@dataclass
class Decoded:
    """Every image of the study for one (variant, size), decoded once and shared by all seeds. Under torchrun
    each rank decodes and holds only its images (``mine``: every size-th of the study's list)."""

    index: dict[str, int]  # sha1 -> the image's position in the study's list (every rank's)
    held: dist.Held  # uint8 (3, D, D) per image this rank holds: the region widened by the policy's margin
    files: list[str]  # the file read for each position

    def take(self, df: pd.DataFrame) -> tuple[pd.DataFrame, dist.Held, list[str]]:
        """Rows of ``df`` that have an image for this variant, the images of them this rank holds, their files."""
        df = df[df["sha1"].isin(self.index.keys())].reset_index(drop=True)
        pos = np.array([self.index[s] for s in df["sha1"]], dtype=np.int64)
        return df, self.held.subset(pos), [self.files[i] for i in pos]


def decode_variant(sd: StudyData, variant: str, size: int, prog: Progress) -> Decoded:
    """Decode the policy's region of every image: cut from the original, or the cached enhanced region."""
    images = pd.concat([sd.pool, sd.test]).drop_duplicates("sha1")
    if variant in sd.enhanced:  # images whose enhancement failed are left out
        images = images[images["sha1"].isin(sd.enhanced[variant].keys())]
        files, boxes = [sd.enhanced[variant][s] for s in images["sha1"]], None  # the file is the region
    else:
        files = list(images["path"])
        boxes = None if sd.policy == "full" else boxes_of(images)
    w = dist.world()  # under torchrun each rank decodes and keeps its share only
    x = load_images(w.shard(files), decoded_size(sd.policy, size), on_progress=prog.callback("decoding images"),
                    boxes=None if boxes is None else w.shard(boxes))
    return Decoded(index={s: i for i, s in enumerate(images["sha1"])}, held=dist.Held(x, w.mine(len(files))),
                   files=files)


def train_and_evaluate(sd: StudyData, cfg: StudyConfig, variant: str, seed: int, size: int, decoded: Decoded,
                       device: torch.device, prog: Progress) -> dict:
    """One model: split, fit, predict. Returns the tables for this (variant, seed, size)."""
    keys = {"variant": variant, "seed": seed, "image_size": size}
    train, val = _split(sd.pool, cfg.val_fraction, seed, cfg, prog)
    if val.empty or train.empty:
        raise ValueError(f"the {cfg.split} validation split left {len(train)} training and {len(val)} validation "
                         f"images: every class has a single source group; use more images or --split random")
    (train, x_tr, _), (val, x_va, _) = decoded.take(train), decoded.take(val)
    test, x_te, te_files = decoded.take(sd.test)
    y = {"train": _label_ids(train), "val": _label_ids(val)}
    seed_everything(seed, cfg.deterministic)  # the new head's initialisation depends on the seed alone
    model, weights = create_classifier(cfg.classifier, len(CLASSES), cfg.pretrained)
    s = TrainSettings(epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr,
                      weight_decay=cfg.weight_decay, patience=cfg.patience, augment=cfg.augment,
                      freeze_backbone=cfg.freeze_backbone, seed=seed, view=size,
                      label_smoothing=cfg.label_smoothing, select_by=cfg.select_by, deterministic=cfg.deterministic,
                      ema=cfg.ema, mixup=cfg.mixup, backbone_lr=cfg.backbone_lr)
    w = dist.world()
    if not w.active:  # one process holds every image: plain tensors
        x_tr, x_va = x_tr.x, x_va.x
    result = fit(model, (x_tr, y["train"]), (x_va, y["val"]), s, device, on_progress=prog.callback("training"))
    tested = result  # the model whose weights predict the test images and are kept
    if cfg.refit:
        del x_tr, x_va  # the refit takes its own copy of both
        model, tested = _refit(cfg, s, decoded, train, val, result["best_epoch"], device, prog)
    # each rank predicts the test images it holds; all of them meet on every rank
    probs, feats = predict(model, x_te.x, device, batch_size=max(cfg.batch_size, 64), view=size, tta=cfg.tta,
                           features=True, on_progress=prog.callback(f"predicting the test images ({cfg.tta} views)"))
    probs, feats = dist.gather_rows(probs, x_te.mine), dist.gather_rows(feats, x_te.mine)
    enhanced = te_files if variant in sd.enhanced else [None] * len(test)
    pred = predictions_frame(keys, test, probs, enhanced)
    ckpt = prog.run.path / "checkpoints" / f"{variant}-s{seed}-{size}.pt"
    if w.main:
        _save_checkpoint(ckpt, tested, cfg, keys)
    acc = float(pred["correct"].mean()) if len(pred) else float("nan")
    refit = f", refit on train + val for {result['best_epoch']} epochs" if cfg.refit else ""
    prog.run.log(f"{variant} seed {seed} {size}px: best epoch {result['best_epoch']}, validation accuracy "
                 f"{result['best_val_acc']:.3f}{refit}, test accuracy {acc:.3f} ({len(train)} train / {len(val)} "
                 f"val / {len(test)} test, {result['seconds'] + (tested['seconds'] if cfg.refit else 0):.0f} s)")
    validation = pd.DataFrame([{**keys, "split": cfg.split, "leaky": cfg.split == "random",
                                "best_epoch": result["best_epoch"], "selected_by": cfg.select_by,
                                "val_accuracy": result["best_val_acc"], "val_macro_f1": result["best_val_macro_f1"],
                                "val_loss": result["best_val_loss"], "n_val": len(val),
                                "val_groups_disjoint": _disjoint(train, val),
                                "refit_epochs": result["best_epoch"] if cfg.refit else None}])
    return {
        "predictions": pred,
        "metrics": metrics_rows(keys, pred["true_label"], pred["pred_label"]),
        "confusion": confusion_rows(keys, pred["true_label"], pred["pred_label"]),
        "history": pd.DataFrame([{**keys, **h} for h in result["history"]]),
        "validation": validation,
        "embeddings": pd.DataFrame({"image_id": test["image_id"].to_numpy(),
                                    "feature": list(np.asarray(feats, np.float32))}).assign(**keys),
        "splits": pd.concat([df.reindex(columns=["image_id", "label", "group_id"]).assign(**keys, role=role)
                             for role, df in (("train", train), ("val", val), ("test", test))], ignore_index=True),
        "weights": weights, "counts": {"train": len(train), "val": len(val), "test": len(test)},
        "val_groups_disjoint": _disjoint(train, val),
    }


def _label_ids(df: pd.DataFrame) -> np.ndarray:
    return np.array([CLASSES.index(c) for c in df["label"]])


def _refit(cfg: StudyConfig, s: TrainSettings, decoded: Decoded, train: pd.DataFrame, val: pd.DataFrame,
           epochs: int, device: torch.device, prog: Progress) -> tuple[torch.nn.Module, dict]:
    """A fresh model (same seed) trained on the training and validation images together for the validated best
    epoch count, one-cycle over them, the last epoch kept: the source cells validation held out teach it too."""
    both, x, _ = decoded.take(pd.concat([train, val], ignore_index=True))
    seed_everything(s.seed, cfg.deterministic)
    model, _ = create_classifier(cfg.classifier, len(CLASSES), cfg.pretrained)
    if not dist.world().active:
        x = x.x
    result = fit(model, (x, _label_ids(both)), None, replace(s, epochs=epochs), device,
                 on_progress=prog.callback(f"refitting on training + validation images ({epochs} epochs)"))
    return model, result


def _save_checkpoint(path: Path, result: dict, cfg: StudyConfig, keys: dict) -> None:
    path.parent.mkdir(exist_ok=True)
    torch.save({"state_dict": result["best_state"], "config": cfg.to_dict(), "keys": keys,
                "best_epoch": result["best_epoch"], "best_val_loss": result["best_val_loss"],
                "refit_epochs": result["best_epoch"] if cfg.refit else None,  # then best_* is the refit's last epoch
                "classes": list(CLASSES)}, path)


def _disjoint(train: pd.DataFrame, val: pd.DataFrame) -> bool | None:
    if "group_id" not in train:
        return None
    return not set(train["group_id"]) & set(val["group_id"])


PART_TABLES = ("predictions", "metrics", "confusion", "history", "splits", "embeddings", "validation")  # validation last


def write_tables(run: Run, parts: list[dict]) -> None:
    for name in PART_TABLES:
        run.write_table(name, pd.concat([p[name] for p in parts], ignore_index=True))
    pred = pd.concat([p["predictions"] for p in parts], ignore_index=True)
    run.write_table("misclassified", pred[~pred["correct"]])


def _model_keys(df: pd.DataFrame) -> set[tuple]:
    return {(str(v), int(s), int(z)) for v, s, z in df[KEYS].itertuples(index=False, name=None)}


def stored_parts(run: Run) -> dict[tuple, dict]:
    """The models whose tables are complete in ``run`` (their rows are in predictions, validation and history),
    as parts like ``train_and_evaluate``'s: (variant, seed, image_size) -> tables."""
    tables = {name: run.table(name) for name in PART_TABLES}
    done = _model_keys(tables["predictions"]) & _model_keys(tables["validation"]) & _model_keys(tables["history"])
    weights = (run.read_meta().get("weights") or {}).get("classifier")
    parts = {}
    for key in done:
        rows = {name: df[(df["variant"] == key[0]) & (df["seed"] == key[1]) & (df["image_size"] == key[2])]
                .reset_index(drop=True) for name, df in tables.items()}
        disjoint = rows["validation"]["val_groups_disjoint"].iloc[0]
        counts = rows["splits"]["role"].value_counts()
        parts[key] = {**rows, "weights": weights, "val_groups_disjoint": None if pd.isna(disjoint) else bool(disjoint),
                      "counts": {role: int(counts.get(role, 0)) for role in ("train", "val", "test")}}
    return parts


def compute_and_write_stats(run: Run, cfg: StudyConfig) -> pd.DataFrame | None:
    from core.stats import compute_stats

    pred = run.table("predictions")
    baseline = "original" if "original" in cfg.variants else cfg.variants[0]
    stats = compute_stats(pred, baseline=baseline)
    run.write_table("stats", stats)
    return stats


def summarize(parts: list[dict]) -> dict:
    """Seed-mean test accuracy per variant, for the first image size (``accuracy``) and for every size
    (``accuracy_by_size``: {size: {variant: accuracy}})."""
    pred = pd.concat([p["predictions"] for p in parts], ignore_index=True)
    per = pred.groupby(["image_size", "variant", "seed"], sort=False)["correct"].mean()
    acc = per.groupby(level=[0, 1], sort=False).mean()
    by_size: dict[str, dict[str, float]] = {}
    for (size, v), a in acc.items():
        by_size.setdefault(str(int(size)), {})[v] = round(float(a), 4)
    first = next(iter(by_size))
    return {"accuracy": by_size[first], "image_size": int(first), "accuracy_by_size": by_size}


# ---------------------------------------------------------------- the run


def _cache(cfg: StudyConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


def _versions() -> dict:
    import sklearn

    out = {"python": platform.python_version(), "torch": torch.__version__, "sklearn": sklearn.__version__,
           "pandas": pd.__version__, "numpy": np.__version__}
    try:
        import torchvision

        out["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    code = _code_version()
    if code:
        out["code"] = code
    return out


def _code_version() -> str | None:
    """The git commit of this checkout (``+dirty`` with uncommitted changes), or None outside git."""
    import subprocess

    try:
        r = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty=+dirty",
                            "--abbrev=12"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def plan_stages(cfg: StudyConfig) -> list[str]:
    stages = ["data", "groups"]
    stages += [f"enhance:{v}" for v in cfg.variants if not get_enhancer_spec(v).identity]
    stages += [f"train:{v}:s{s}:{z}" for v in cfg.variants for z in cfg.image_sizes for s in cfg.seeds]
    return stages + ["stats"]


def run(cfg: StudyConfig, on_progress: OnProgress | None = None, run_id: str | None = None,
        store: RunStore | None = None, resume: bool = False) -> Run:
    """Run a whole study; the run folder records everything, also when it fails or is cancelled.

    Config, run id, device and the writability of the store and the cache are checked before any run folder
    exists. ``resume=True`` continues the existing run ``run_id`` (see :func:`resume`).
    """
    validate_config(cfg)
    if run_id is not None:
        check_run_id(run_id)
    D.check_data(cfg.data_dir, cfg.test_dir)  # no data, no run folder
    device = torch.device(resolve_device(cfg.device))
    w = dist.init(device.type)  # launched by torchrun: join its group (rank 0 writes the store)
    if w.active and device.type == "cuda":
        device = torch.device("cuda", w.local_rank)
    store = store or RunStore(cfg.runs_dir)
    run = _open_run(store, cfg, run_id, resume, w)
    prog = Progress(run, plan_stages(cfg), on_progress if w.main else None)
    prog.beat()  # a heartbeat before the status says running
    kept = stored_parts(run) if resume else {}
    t0 = time.time()
    run.update_meta(status="running", started_at=run.read_meta().get("started_at") or now_iso(), device=str(device),
                    versions=_versions(), pid=os.getpid(), host=socket.gethostname(), notes=cfg.notes, error=None,
                    device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                    kernels=_kernels(cfg, device), distributed=dist.describe(device))
    stop_heartbeat = _start_heartbeat(prog) if w.main else (lambda: None)
    restore = _install_sigterm(prog)
    try:
        _study(run, cfg, device, prog, kept, t0)
    except BaseException as e:
        stop_heartbeat()  # before the last progress is written: the thread must not overwrite it
        if w.main:
            _record_stop(run, prog, e, t0)
        else:
            record_rank_error(run, w.rank, e)
        raise
    finally:
        stop_heartbeat()
        restore()
    return run


def _open_run(store: RunStore, cfg: StudyConfig, run_id: str | None, resume: bool, w: dist.World) -> Run:
    """Rank 0 (or the only process) checks the store and cache, and creates or reopens the run; under
    torchrun the other ranks get its id (or its error) and follow the run without writing to it."""
    run, error = None, None
    if w.main:
        try:
            check_writable(store.root, "--runs-dir")
            check_writable(_cache(cfg), "--cache-dir")
            run = _reopen(store.get(run_id)) if resume else store.create(cfg.to_dict(), run_id)
        except Exception as e:
            if not w.active:
                raise
            error = e
    rid, error = dist.broadcast_object((run.run_id if run else None, error))
    if error is not None:
        raise error
    return run if w.main else FollowerRun(store.root / rid)


def _kernels(cfg: StudyConfig, device: torch.device) -> dict:
    """Which GPU kernels the run asked for (recorded: a benchmarked run is fast, not bitwise repeatable)."""
    if device.type != "cuda":
        return {"deterministic": True, "why": "CPU kernels are repeatable; cuDNN is not used"}
    return {"deterministic": cfg.deterministic, "cudnn_benchmark": not cfg.deterministic}


def resume(run_id: str, store: RunStore | None = None, on_progress: OnProgress | None = None) -> Run:
    """Continue an interrupted, failed or cancelled run with its stored config and seeds: models whose tables
    are complete are kept, the others are trained; the final tables and statistics cover them all."""
    store = store or RunStore()
    r = store.get(run_id)
    status = r.status()
    if status not in RESUMABLE_STATUSES:
        raise ValueError(f"run {run_id} is {status}; only an interrupted, failed or cancelled run can be resumed")
    cfg = StudyConfig.from_dict(r.read_meta().get("config") or {})
    return run(cfg, on_progress, run_id=run_id, store=store, resume=True)


def _reopen(run: Run) -> Run:
    """A stopped run, ready to continue: its cancel request is dropped, the attempt recorded."""
    (run.path / CANCEL_FILE).unlink(missing_ok=True)
    clear_rank_errors(run)  # an earlier attempt's failed ranks
    meta, status = run.read_meta(), run.status()
    run.update_meta(resumed=[*(meta.get("resumed") or []), {"at": now_iso(), "from": status, "error": meta.get("error")}])
    run.log(f"resuming (was {status})")
    return run


def _study(run: Run, cfg: StudyConfig, device: torch.device, prog: Progress, kept: dict, t0: float) -> None:
    """The stages, top to bottom; models in ``kept`` (a resumed run's complete ones) are not trained again."""
    prog.start("data", "checking weights, scanning images")
    enhancers = run_enhancers(run, cfg)
    sd = prepare_data(cfg, prog)
    skipped = sd.manifest.skipped
    run.log(f"test set: {sd.test_source}, {len(sd.test)} images; training pool {len(sd.pool)} images; "
            f"{len(skipped)} files skipped")
    absent = [c for c in CLASSES if not (sd.test["label"] == c).any()]
    if absent:  # allowed (a test folder of some classes), but every per-class and macro figure should say so
        note = (f"the test set ({sd.test_source}) has no {', '.join(absent)} images: their per-class figures are "
                "empty, and macro averages over the four classes count them as 0")
        run.log(f"warning: {note}")
        run.update_meta(notes=[*(cfg.notes or []), note])
    prog.start("groups", "source-cell grouping")
    assign_source_groups(sd, cfg, prog)
    data = _data_meta(sd, cfg)
    if kept:
        _check_same_data(run, data)
        run.log(f"resume: {len(kept)} complete model(s) kept: {', '.join(f'{v} s{s} {z}px' for v, s, z in sorted(kept))}")
    run.update_meta(data=data, skipped=skipped)
    enh_prov, enh_errors = enhance_variants(sd, cfg, enhancers, prog)
    skipped = skipped + enh_errors
    run.update_meta(weights={**(run.read_meta().get("weights") or {}), "enhancers": enh_prov}, skipped=skipped)
    if skipped:
        run.write_table("skipped", pd.DataFrame(skipped))
    parts = []
    for v in cfg.variants:  # variant and size outside: each image is decoded once for all seeds
        for size in cfg.image_sizes:
            decoded = None
            for seed in cfg.seeds:
                if (v, seed, size) in kept:
                    parts.append(kept[(v, seed, size)])
                    continue
                prog.start(f"train:{v}:s{seed}:{size}", f"{cfg.classifier} on {v}, seed {seed}, {size}px")
                decoded = decoded or decode_variant(sd, v, size, prog)
                parts.append(train_and_evaluate(sd, cfg, v, seed, size, decoded, device, prog))
                _record_model(run, parts)
    write_tables(run, parts)  # a resumed run: drops the rows of a model cut short
    if not dist.world().main:  # the rest is rank 0's: statistics and the final run.json
        return
    prog.start("stats", "bootstrap CIs and paired tests")
    compute_and_write_stats(run, cfg)
    prog.finish()
    meta = run.read_meta()
    run.update_meta(status="finished", ended_at=now_iso(), duration_s=round(time.time() - t0, 1),
                    stages=prog.durations, summary=summarize(parts),
                    weights={**meta.get("weights", {}), "classifier": _classifier_weights(parts)},
                    data={**meta["data"], "counts_per_model": [p["counts"] for p in parts],
                          "val_groups_disjoint": all(p["val_groups_disjoint"] is not False for p in parts)})
    prog.complete()
    run.log("finished")


def _record_model(run: Run, parts: list[dict]) -> None:
    """After each model: every table so far, the summary and the classifier's weights (a resume reads them)."""
    write_tables(run, parts)
    weights = run.read_meta().get("weights") or {}
    run.update_meta(summary=summarize(parts), weights={**weights, "classifier": _classifier_weights(parts)})


def _classifier_weights(parts: list[dict]) -> dict | None:
    return next((p["weights"] for p in parts if p.get("weights")), None)


def _check_same_data(run: Run, data: dict) -> None:
    """A resumed run must see the images it started with (the same per-class counts)."""
    before = (run.read_meta().get("data") or {}).get("counts")
    if before is not None and before != data["counts"]:
        raise ValueError(f"run {run.run_id}: the data changed since it started (per-class counts {before} -> "
                         f"{data['counts']}); start a new run")


CANCEL_TYPES = ("Cancelled", "KeyboardInterrupt")


def _record_stop(run: Run, prog: Progress, e: BaseException, t0: float) -> None:
    status = "cancelled" if isinstance(e, (Cancelled, KeyboardInterrupt)) else "failed"
    prog.finish()
    error = {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
    peers = rank_errors(run)  # under torchrun: what failed on the other ranks (rank 0 often sees only a lost peer)
    if peers:
        if any(p.get("type") not in CANCEL_TYPES for p in peers):  # a cancel reaches every rank: still a cancel
            status = "failed"
        error.update(ranks=peers, message="; ".join(f"rank {p.get('rank')}: {p.get('type')}: {p.get('message')}"
                                                     for p in peers) + f" (rank 0: {type(e).__name__}: {e})")
    run.update_meta(status=status, ended_at=now_iso(), duration_s=round(time.time() - t0, 1), stages=prog.durations,
                    error=error)
    run.write_progress(stage=status, message=str(e), percent=None)
    run.log(f"{status}: {type(e).__name__}: {e}")


def _start_heartbeat(prog: Progress, every: float = HEARTBEAT_EVERY_S):
    """A daemon thread refreshing the heartbeat every ``every`` s; returns the function that stops it."""
    stop = threading.Event()

    def beat():
        while not stop.wait(every):
            try:
                prog.beat()
            except OSError:  # a full disk: the next beat tries again; staleness shows if it never works
                pass

    t = threading.Thread(target=beat, name="wbc-heartbeat", daemon=True)
    t.start()

    def stop_it():
        stop.set()
        if t is not threading.current_thread():
            t.join()

    return stop_it


def _data_meta(sd: StudyData, cfg: StudyConfig) -> dict:
    meta = {"root": str(sd.manifest.root), "split_dirs": sd.manifest.split_dirs, "test_source": sd.test_source,
            "split": cfg.split, "counts": {
                "pool": sd.pool["label"].value_counts().reindex(CLASSES, fill_value=0).to_dict(),
                "test": sd.test["label"].value_counts().reindex(CLASSES, fill_value=0).to_dict()}}
    if "group_id" in sd.pool:
        meta["pool_groups"] = int(sd.pool["group_id"].nunique())
    if "group_id" in sd.test:
        meta["test_groups"] = int(sd.test["group_id"].nunique())
    meta["copies"] = dict(sd.copies)
    if sd.copies.get("test_repeated") and "group_id" in sd.test:  # do the CIs resample a file and its copy together?
        dup = sd.test[sd.test["sha1"].duplicated(keep=False)]
        meta["copies"]["repeats_share_a_group"] = bool((dup.groupby("sha1")["group_id"].nunique() == 1).all())
    meta["leakage"] = _leakage(sd, cfg)
    return meta


def _leakage(sd: StudyData, cfg: StudyConfig) -> dict:
    """Share of validation images with a near-copy in training, for the split used (first seed)."""
    from core.groups import leakage

    _embed_sharded(sd.pool, cfg, sd.pool)
    train, val = (D.random_split(sd.pool, cfg.val_fraction, cfg.seeds[0]) if cfg.split == "random" else
                  D.grouped_split(sd.pool, sd.pool["group_id"].to_numpy(), cfg.val_fraction, cfg.seeds[0]))
    return leakage(train, val, cache_dir=_cache(cfg), device=resolve_device(cfg.device))


def _install_sigterm(prog: Progress):
    """SIGTERM (the dashboard's cancel) stops the run at the next progress update."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        prog.cancel_event.set()

    old = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, old)
