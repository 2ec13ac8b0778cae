"""Where the model looks: Grad-CAM for stored test images, from a run's best checkpoints.

``explain_run(run)`` computes, for each chosen test image and model, the Grad-CAM map (``pytorch-grad-cam``,
the maintained PyPI package ``grad-cam``) for the true and the predicted class on exactly the region the model
saw (the input policy's box; the cached enhanced region for enhanced variants). Each map is saved as a PNG
overlay under ``<run>/explain/`` and indexed in the run's ``explain`` table with ``heat_in_cell``: the share of
the map's heat on the stained white cell (its violet nucleus found as in ``core.regions``, widened to take in
the cytoplasm). ``wbc explain RUN`` runs it from the command line.
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.config import CLASSES, StudyConfig
from core.engine import Normalizer, centre_crop, load_images
from core.fsio import atomic_write_bytes, stat_key
from core.models import create_classifier, spec_of
from core.regions import BOX_COLUMNS, margin_for, stain_mask
from core.store import KEYS, Run, Table, check_name, first_line

CELL_WIDEN = 0.08  # the nucleus mask widened by this share of the view: the cytoplasm around it


class NoCheckpoint(ValueError):
    """A run (older, interrupted) without the checkpoint Grad-CAM needs; the rest of the run is unaffected."""


@dataclass(frozen=True)
class Model:
    """A stored model, ready for Grad-CAM: the network, its view size and the run's input policy."""

    net: nn.Module
    size: int
    policy: str


def checkpoint_path(run: Run, variant: str, seed: int, size: int) -> Path:
    """``<run>/checkpoints/<variant>-s<seed>-<size>.pt``; a variant name that could leave the run is refused."""
    return run.path / "checkpoints" / f"{check_name(variant)}-s{int(seed)}-{int(size)}.pt"


def load_model(run: Run, variant: str, seed: int, size: int) -> Model:
    """The tested model's weights: the restored best epoch, or the refit (``--refit``); the checkpoint a study
    writes for every variant, seed and size."""
    path = checkpoint_path(run, variant, seed, size)
    if not path.is_file():
        raise NoCheckpoint(f"run {run.run_id} has no checkpoint for {variant} seed {seed} {size}px ({path.name}): "
                           f"made before checkpoints were kept, or stopped before this model finished; "
                           f"its other results are unaffected")
    try:  # weights only: a checkpoint from a shared store cannot run code here (or in the dashboard's server)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        cfg = StudyConfig.from_dict(ckpt.get("config") or {})
        net, _ = create_classifier(cfg.classifier, len(CLASSES), "none")
        net.load_state_dict(ckpt["state_dict"])
    except Exception as e:  # noqa: BLE001 - damaged, foreign or hand-made: say which file, in one line
        raise ValueError(f"{path}: not a readable checkpoint of this study "
                         f"({(first_line(e) or type(e).__name__)[:200]})") from None
    return Model(net.eval(), size, cfg.input_policy)


def region(row: dict, model: Model, read=None) -> torch.Tensor:
    """uint8 (1, 3, size, size): what the model saw of this prediction's image. ``read(path) -> bytes`` (the
    dashboard's checked reader, ``dashboard.security.read_image``) reads the file; without it, it is opened as
    named. PermissionError when the reader refuses it or it is missing."""
    enhanced = isinstance(row.get("enhanced_path"), str)
    path = row["enhanced_path"] if enhanced else row["path"]
    source = path
    if read is not None:
        try:
            source = io.BytesIO(read(path))
        except OSError:  # refused (core.fsio.NotAllowed) or missing
            raise PermissionError(f"image {str(path)[:200]!r} is missing or outside the folders this dashboard "
                                  "may read") from None
    box = None if enhanced or model.policy == "full" else tuple(int(row[c]) for c in BOX_COLUMNS)
    x = load_images([source],
                    int(round(model.size * margin_for(model.policy))), workers=1,
                    boxes=None if box is None else [box])
    return centre_crop(x, model.size)


def gradcam(net: nn.Module, x: torch.Tensor, class_index: int) -> np.ndarray:
    """Grad-CAM of ``class_index`` for one uint8 (1, 3, H, W) image: float32 (H, W) in [0, 1]."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    spec = spec_of(net)
    wrapped = nn.Sequential(Normalizer(spec.mean, spec.std), net).eval()
    layer = net.get_submodule(spec.cam_layer)
    with GradCAM(model=wrapped, target_layers=[layer]) as cam:
        heat = cam(input_tensor=x.float(), targets=[ClassifierOutputTarget(int(class_index))])
    return np.asarray(heat[0], dtype=np.float32)


def heat_in_cell(heat: np.ndarray, rgb: np.ndarray) -> float | None:
    """Share of the heat on the stained white cell (None when no stained pixels are found in the view)."""
    from scipy import ndimage as ndi

    mask = stain_mask(rgb)
    if mask.sum() < 10:
        return None
    mask = ndi.binary_dilation(mask, iterations=max(1, int(CELL_WIDEN * rgb.shape[0])))
    total = float(heat.sum())
    return float(heat[mask].sum() / total) if total > 0 else None


def overlay_png(rgb: np.ndarray, heat: np.ndarray) -> bytes:
    """The image with the map on top (jet colours, as Grad-CAM papers show it), PNG bytes."""
    from PIL import Image
    from pytorch_grad_cam.utils.image import show_cam_on_image

    vis = show_cam_on_image(rgb.astype(np.float32) / 255.0, heat, use_rgb=True, image_weight=0.55)
    buf = io.BytesIO()
    Image.fromarray(vis).save(buf, "PNG")
    return buf.getvalue()


@functools.lru_cache(maxsize=8)
def _cached_model(run_dir: str, variant: str, seed: int, size: int, _key) -> Model:
    return load_model(Run(Path(run_dir)), variant, seed, size)


def model_for(run: Run, variant: str, seed: int, size: int) -> Model:
    """:func:`load_model`, kept in memory until the checkpoint file changes."""
    ckpt = checkpoint_path(run, variant, seed, size)
    return _cached_model(str(run.path), variant, int(seed), int(size), stat_key(ckpt))


def row_maps(row: dict, model: Model, read=None) -> list[dict]:
    """Grad-CAM of one prediction row for its true and its predicted class, on the region the model saw:
    [{role, class_label, png (the overlay), heat_in_cell}]. ``read``: as for :func:`region`."""
    for role in ("true", "pred"):
        if str(row[f"{role}_label"]) not in CLASSES:
            raise ValueError(f"{role}_label {str(row[f'{role}_label'])[:40]!r} of image {str(row['image_id'])[:80]!r} "
                             f"is not one of {', '.join(CLASSES)}")
    x = region(row, model, read)
    rgb = x[0].permute(1, 2, 0).numpy()
    by_class: dict[str, dict] = {}  # a right prediction's true and predicted class are one class: one Grad-CAM
    for role in ("true", "pred"):
        cls = str(row[f"{role}_label"])
        if cls not in by_class:
            heat = gradcam(model.net, x, CLASSES.index(cls))
            by_class[cls] = {"class_label": cls, "png": overlay_png(rgb, heat), "heat_in_cell": heat_in_cell(heat, rgb)}
    return [{"role": role, **by_class[str(row[f"{role}_label"])]} for role in ("true", "pred")]


def image_maps(run: Run, image_id: str, seed: int, size: int, read=None,
               skipped: list[tuple[str, str]] | None = None) -> list[dict]:
    """Grad-CAM of one test image for every variant that predicted it (same seed and size), true and predicted
    class, without writing anything: [{variant, pred_label, role, class_label, png, heat_in_cell}] (the
    dashboard's "why" view). ``read(path) -> bytes``: how image files are read (as for :func:`region`).
    ``skipped``: a list to collect (variant, reason) for a variant with no checkpoint or an image that may not be opened, so that the
    other variants' maps are still drawn; without it, the first such variant raises."""
    pred = run.table(Table.PREDICTIONS)
    rows = pred[(pred["image_id"] == image_id) & (pred["seed"] == seed) & (pred["image_size"] == size)]
    out = []
    for r in rows.to_dict("records"):
        try:
            maps = row_maps(r, model_for(run, str(r["variant"]), seed, size), read)
        except (NoCheckpoint, PermissionError) as e:
            if skipped is None:
                raise
            skipped.append((str(r["variant"]), str(e)))
            continue
        out += [{"variant": str(r["variant"]), "pred_label": str(r["pred_label"]), **m} for m in maps]
    return out


def explain_rows(run: Run, rows: pd.DataFrame) -> pd.DataFrame:
    """Grad-CAM for the true and the predicted class of each prediction row; the explain table's rows."""
    out = []
    for r in rows.to_dict("records"):
        key = (str(r["variant"]), int(r["seed"]), int(r["image_size"]))
        for m in row_maps(r, model_for(run, *key)):
            name = hashlib.sha1(f"{key}|{r['image_id']}|{m['class_label']}".encode()).hexdigest()[:16]
            png = run.path / "explain" / f"{check_name(key[0])}-s{key[1]}-{key[2]}" / f"{name}.png"
            atomic_write_bytes(png, m["png"])
            out.append({**dict(zip(KEYS, key)), "image_id": r["image_id"], "role": m["role"],
                        "class_label": m["class_label"], "cam_path": str(png), "heat_in_cell": m["heat_in_cell"],
                        "correct": bool(r["correct"])})
    return pd.DataFrame(out)


def explain_run(run: Run, variant: str | None = None, only_errors: bool = False, limit: int | None = None,
                image_ids=None) -> pd.DataFrame:
    """Grad-CAM for a run's test predictions (filtered), merged into its ``explain`` table; returns the new rows."""
    pred = run.table(Table.PREDICTIONS)
    if variant is not None:
        if variant not in set(pred["variant"]):
            raise ValueError(f"--variant: run {run.run_id} has no variant {variant!r}; it has "
                             f"{', '.join(map(str, pred['variant'].unique()))}")
        pred = pred[pred["variant"] == variant]
    if only_errors:
        pred = pred[~pred["correct"].astype(bool)]
    if image_ids is not None:
        pred = pred[pred["image_id"].isin(list(image_ids))]
    if limit is not None:
        pred = pred.head(limit)
    new = explain_rows(run, pred)
    old = run.table(Table.EXPLAIN)
    ident = [*KEYS, "image_id", "role"]
    if len(old) and len(new):
        old = old[~old.set_index(ident).index.isin(new.set_index(ident).index)]
    run.write_table(Table.EXPLAIN, pd.concat([d for d in (old, new) if len(d)], ignore_index=True)
                    if len(old) or len(new) else new)
    return new
