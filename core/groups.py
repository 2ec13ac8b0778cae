"""Source-cell grouping: which images are augmentations of the same source cell.

The Kaggle images are rotations/shifts/zooms/flips of few source cells and the file names do not say
which (see the dataset's SOURCE.md). We embed every image with the offline ImageNet EfficientNet-Lite0
(pooled features of a centre crop, averaged over the four 90-degree rotations), centre the embeddings
on the collection being compared (blood smears share a large common component), and cluster each
(split, label) by average-linkage agglomerative clustering on cosine distance, cut at
:data:`GROUP_THRESHOLD`. A near-copy (for leakage and cross-split checks) is a nearest same-class
neighbour closer than :data:`NEAR_COPY_THRESHOLD`. Validation: docs/RIGOR.md.
"""

from __future__ import annotations

import hashlib
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from core.fsio import atomic_write
from core.paths import default_cache_dir
from core.progress import ProgressFn

#: Average-linkage cut (cosine distance between centred, view-averaged embeddings) that defines a group.
#: Chosen on all of real TRAIN: of the cuts 0.50-0.70 it brings the groups per class closest to the
#: 75/27/16/159 source cells implied by the file names (found 75/23/24/122; docs/RIGOR.md). Where it errs
#: it merges different cells (harmless for a grouped split, which only gets coarser) rather than
#: splitting one (which would leak).
GROUP_THRESHOLD: float = 0.60

#: Nearest-neighbour distance below which a same-class image counts as a near-copy (leakage and
#: cross-split overlap). A single nearest pair is much closer than a cluster's average distance, so this
#: is a separate, smaller number: the 5th percentile (0.211) of the distance from each TEST_SIMPLE image
#: to its nearest same-class TRAIN image, pairs that are different cells by construction, i.e. ~4% false
#: near-copies for a new cell. On an 80/20 split of TRAIN it flags 79% of a random split's validation
#: images and 1.8% of a grouped split's (docs/RIGOR.md).
NEAR_COPY_THRESHOLD: float = 0.20

EMBED_MODEL = "efficientnet_lite0"
CROP = 200  # centre crop (pixels of the 320x240 original); the cell of interest sits near the centre
SIZE = 128  # network input size; ~3-4x cheaper than 224 (not compared for grouping quality)
# Views averaged per image: 4 = the 90-degree rotations; 8 adds the mirror images (twice the cost; the
# mirror-image gap it closes is measured by benchmarks/bench_audit.py); 1 = none.
VIEWS = 4


def model_id(views: int = VIEWS, crop: int = CROP, size: int = SIZE) -> str:
    return f"{EMBED_MODEL}-imagenet-c{crop}-s{size}-v{views}"


def _cache_folder(cache_dir: Path | None, mid: str) -> Path:
    return Path(cache_dir or default_cache_dir()) / "embeddings" / mid


def _load_cache(folder: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("part-*.npz")):
        try:
            with np.load(f) as z:
                out.update(zip(z["sha1"].tolist(), z["emb"]))
        except Exception:  # a damaged shard is just recomputed
            continue
    return out


def _save_shard(folder: Path, sha1s: list[str], emb: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"part-{hashlib.sha1(''.join(sha1s).encode()).hexdigest()[:12]}-{secrets.token_hex(2)}"

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a path
            np.savez(f, sha1=np.array(sha1s), emb=emb.astype(np.float32))

    atomic_write(folder / f"{name}.npz", write)


def _load_image(path: str, crop: int, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        c = min(crop, w, h)
        left, top = (w - c) // 2, (h - c) // 2
        im = im.crop((left, top, left + c, top + c)).resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


# The views in the order embeddings were always made: quarter turns, then those turns mirrored (flip(rot k) is
# dihedral_view 4 + (-k mod 4)); the same pixels as before, so cached embeddings stay valid.
_VIEW_ORDER = (0, 1, 2, 3, 4, 7, 6, 5)


def _dihedral(x, views: int):
    """Stack of ``views`` dihedral transforms of a (B, C, H, W) batch: (views*B, C, H, W)."""
    import torch

    from core.engine import dihedral_view

    return torch.cat([dihedral_view(x, k) for k in _VIEW_ORDER[:views]], 0)


_MODEL_CACHE: dict = {}


def _get_model(device: str):
    if device not in _MODEL_CACHE:
        from core.models import create_classifier, get_classifier_spec

        m, _ = create_classifier(EMBED_MODEL, 4, "imagenet")
        spec = get_classifier_spec(EMBED_MODEL)
        _MODEL_CACHE[device] = (m.eval().to(device), spec.mean, spec.std)
    return _MODEL_CACHE[device]


def embed_images(paths: list[str], sha1s: list[str], cache_dir: Path | None = None, device: str = "cpu",
                 on_progress: ProgressFn | None = None, batch_size: int = 64, views: int = VIEWS) -> np.ndarray:
    """(N, 1280) float32 L2-normalised embeddings, averaged over dihedral views; cached per sha1.

    ``on_progress(done, total, message)`` counts all N requested images (cached ones count as done at once).
    """
    import torch

    if len(paths) != len(sha1s):
        raise ValueError("paths and sha1s differ in length")
    folder = _cache_folder(cache_dir, model_id(views))
    cached = _load_cache(folder) if folder.is_dir() else {}
    todo: dict[str, str] = {}
    for p, s in zip(paths, sha1s):
        if s not in cached and s not in todo:
            todo[s] = p
    total = len(sha1s)  # progress counts every requested image; cached ones are done at once
    done = total - len(todo)
    if on_progress:
        on_progress(done, total, "")
    if todo:
        model, mean, std = _get_model(device)
        mean_t = torch.tensor(mean).view(1, 3, 1, 1) * 255
        std_t = torch.tensor(std).view(1, 3, 1, 1) * 255
        items = list(todo.items())
        pending_s, pending_e = [], []
        with ThreadPoolExecutor(max_workers=2) as pool:
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                imgs = list(pool.map(lambda it: _load_image(it[1], CROP, SIZE), chunk))
                x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
                x = ((x - mean_t) / std_t).to(device)
                with torch.inference_mode():
                    f = model.features(_dihedral(x, views))
                    f = torch.nn.functional.normalize(f, dim=1)  # each view counts equally
                    f = f.view(views, len(chunk), -1).mean(0)
                e = torch.nn.functional.normalize(f, dim=1).cpu().numpy()
                for (s, _), v in zip(chunk, e):
                    cached[s] = v
                pending_s += [s for s, _ in chunk]
                pending_e.append(e)
                done += len(chunk)
                if len(pending_s) >= 256 or start + batch_size >= len(items):  # an interrupted run keeps its work
                    _save_shard(folder, pending_s, np.concatenate(pending_e))
                    pending_s, pending_e = [], []
                if on_progress:
                    on_progress(done, total, "")
    return np.stack([cached[s] for s in sha1s]).astype(np.float32) if sha1s else np.zeros((0, 1280), np.float32)


def centre(emb: np.ndarray) -> np.ndarray:
    """Subtract the collection's mean embedding and re-normalise.

    All blood-smear images share a large common component (raw cosine distances between *different*
    cells are only ~0.05-0.1); removing it spreads cells apart (different cells ~0.5, copies ~0.15).
    The mean is taken over the images being compared (all splits and classes passed in).
    """
    x = emb - emb.mean(0, keepdims=True)
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def cluster(emb: np.ndarray, threshold: float = GROUP_THRESHOLD, keys: list[str] | None = None) -> np.ndarray:
    """Cluster labels 0..k-1 (numbered by first appearance): average-linkage agglomerative clustering
    on cosine distance, cut at ``threshold``. Rows with the same key (sha1) always share a label.

    ``emb`` should already be centred (see :func:`centre`).
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    n = len(emb)
    if n == 0:
        return np.zeros(0, int)
    _, first, inv = np.unique(np.asarray(keys if keys is not None else np.arange(n)), return_index=True,
                              return_inverse=True)
    u = emb[first].astype(np.float64)
    if len(u) == 1:
        lab_u = np.zeros(1, int)
    else:
        d = np.clip(1.0 - u @ u.T, 0.0, 2.0)
        cond = d[np.triu_indices(len(u), 1)]
        lab_u = fcluster(linkage(cond, "average"), threshold, "distance")
    lab = lab_u[inv.ravel()]
    _, order = np.unique(lab, return_index=True)
    renum = np.empty(lab.max() + 1, int)
    renum[lab[np.sort(order)]] = np.arange(len(order))
    return renum[lab]


def groups_from_embeddings(df: pd.DataFrame, emb: np.ndarray, threshold: float = GROUP_THRESHOLD) -> np.ndarray:
    """Group ids ``"{split}/{label}/{k:04d}"``, clustering within each (split, label)."""
    df = df.reset_index(drop=True)
    out = np.empty(len(df), dtype=object)
    for (split, label), g in df.groupby(["split", "label"], sort=True):
        idx = g.index.to_numpy()
        lab = cluster(emb[idx], threshold, g["sha1"].tolist())  # emb: centred by the caller
        out[idx] = [f"{split}/{label}/{k:04d}" for k in lab]
    return out.astype(str)


def _embed_df(df: pd.DataFrame, cache_dir, device, on_progress) -> np.ndarray:
    return embed_images(df["path"].tolist(), df["sha1"].tolist(), cache_dir, device, on_progress)


def assign_groups(df: pd.DataFrame, cache_dir=None, device: str = "cpu", on_progress: ProgressFn | None = None,
                  threshold: float | None = None) -> np.ndarray:
    """One source-group id per row of ``df`` (columns path, sha1, split, label)."""
    df = df.reset_index(drop=True)
    emb = centre(_embed_df(df, cache_dir, device, on_progress))
    return groups_from_embeddings(df, emb, GROUP_THRESHOLD if threshold is None else threshold)


def nearest_distance(query: np.ndarray, q_labels, ref: np.ndarray, r_labels) -> np.ndarray:
    """Cosine distance from each query row to its nearest same-label reference row (inf if none)."""
    q_labels, r_labels = np.asarray(q_labels), np.asarray(r_labels)
    out = np.full(len(query), np.inf)
    for lab in np.unique(q_labels):
        qi, ri = np.nonzero(q_labels == lab)[0], np.nonzero(r_labels == lab)[0]
        if len(ri):
            out[qi] = 1.0 - (query[qi] @ ref[ri].T).max(1)
    return out


def leakage(train_df: pd.DataFrame, val_df: pd.DataFrame, cache_dir=None, device: str = "cpu",
            threshold: float | None = None) -> dict:
    """How much of validation has a near-copy in training.

    ``share``: validation images whose nearest same-class training image is closer than ``threshold``
    (default :data:`NEAR_COPY_THRESHOLD`; cosine distance of centred embeddings). ``median_nn_distance``:
    compare with a split known to be clean (docs/RIGOR.md). ``share_grouped``: validation images whose
    group, when train and validation are clustered together (:data:`GROUP_THRESHOLD`), holds a training image.
    """
    t = NEAR_COPY_THRESHOLD if threshold is None else threshold
    both = pd.concat([train_df.assign(split="x"), val_df.assign(split="x")], ignore_index=True)
    emb = centre(_embed_df(both, cache_dir, device, None))
    ntr = len(train_df)
    d = nearest_distance(emb[ntr:], val_df["label"], emb[:ntr], train_df["label"])
    leaked = d < t
    g = groups_from_embeddings(both, emb, GROUP_THRESHOLD)
    in_train = set(g[:ntr])
    shared = np.array([x in in_train for x in g[ntr:]], dtype=bool)
    lab = val_df["label"].to_numpy()
    return {"threshold": t, "group_threshold": GROUP_THRESHOLD, "n_val": int(len(val_df)), "n_leaked": int(leaked.sum()),
            "share": float(leaked.mean()) if len(leaked) else 0.0,
            "share_grouped": float(shared.mean()) if len(shared) else 0.0,
            "per_class": {c: float(leaked[lab == c].mean()) for c in sorted(set(lab))},
            "median_nn_distance": float(np.median(d)) if len(d) else float("nan")}


def cross_split_overlap(df: pd.DataFrame, groups: np.ndarray, emb: np.ndarray,
                        threshold: float | None = None) -> pd.DataFrame:
    """For each ordered pair of splits and class: how many groups (images) of one have a near-copy in the other.

    ``emb`` must be centred the same way as for grouping (see :func:`centre`).
    """
    t = NEAR_COPY_THRESHOLD if threshold is None else threshold
    df = df.reset_index(drop=True).assign(group=np.asarray(groups))
    rows = []
    splits = list(dict.fromkeys(df["split"]))
    for a in splits:
        for b in splits:
            if a == b:
                continue
            ma, mb = (df["split"] == a).to_numpy(), (df["split"] == b).to_numpy()
            d = nearest_distance(emb[ma], df.loc[ma, "label"], emb[mb], df.loc[mb, "label"])
            sub = df[ma].assign(copy=d < t)
            for label, g in sub.groupby("label", sort=True):
                hit = g.groupby("group")["copy"].any()
                rows.append({"split": a, "other_split": b, "label": label, "groups": int(len(hit)),
                             "groups_with_copy": int(hit.sum()), "images": int(len(g)),
                             "images_with_copy": int(g["copy"].sum())})
    return pd.DataFrame(rows, columns=["split", "other_split", "label", "groups", "groups_with_copy",
                                       "images", "images_with_copy"])
