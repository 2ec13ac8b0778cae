"""Source-cell grouping: which images are augmentations of the same source cell.

The Kaggle images are rotations/shifts/zooms/flips of few source cells and the file names do not say
which (see the dataset's SOURCE.md). We embed every image with EfficientNet-Lite0 (pooled features of a centre
crop, averaged over the four 90-degree rotations). For a collection of at least :data:`TUNE_MIN_IMAGES` TRAIN
images the network is first copy-tuned (:func:`copy_tune`: a short contrastive fine-tune on copies we make of the
collection's own images); smaller ones keep the ImageNet weights. The embeddings are centred on the collection
being compared (blood smears share a large common component), projected through a whitening learned from copies
of the collection's images (copies close, different images far), and each (split, label) is clustered by
average-linkage agglomerative clustering on cosine distance. The cut that defines a group and the distance below
which a nearest same-class neighbour is a near-copy (leakage, cross-split checks) belong to the network's
space (:class:`Space`). Validation: docs/RIGOR.md.
"""

from __future__ import annotations

import hashlib
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.fsio import atomic_write
from core.paths import default_cache_dir
from core.progress import ProgressFn
from core.terminal import one_line

#: Average-linkage cut (cosine distance in :func:`grouping_space`) that defines a group. Chosen on all of real
#: TRAIN as the cut closest to the 75/27/16/159 source cells implied by the file names with no class above its
#: cell count (found 67/26/16/133; docs/RIGOR.md). Where it errs it merges different cells (harmless for a
#: grouped split, which only gets coarser) rather than splitting one (which would leak).
GROUP_THRESHOLD: float = 0.60
#: How clusters merge (scipy.cluster.hierarchy.linkage): "average" = mean pairwise distance.
LINKAGE: str = "average"

#: Nearest-neighbour distance below which a same-class image counts as a near-copy (leakage and
#: cross-split overlap). A single nearest pair is much closer than a cluster's average distance, so this
#: is a separate number: the 5th percentile (0.277) of the distance from each TEST_SIMPLE image to its
#: nearest same-class TRAIN image, pairs that are different cells by construction, i.e. ~5% false
#: near-copies for a new cell. On an 80/20 split of TRAIN it flags 92% of a random split's validation
#: images and 0.2% of a grouped split's (docs/RIGOR.md, benchmarks/leakage_grouping.py).
NEAR_COPY_THRESHOLD: float = 0.28

#: The same two cuts in the copy-tuned space (:func:`copy_tune`), chosen the same way (docs/RIGOR.md).
TUNED_GROUP_THRESHOLD: float = 0.325
TUNED_NEAR_COPY_THRESHOLD: float = 0.17

# Copy tuning (docs/RIGOR.md, Method, step 4): a contrastive fine-tune of the embedding network on dataset-like
# copies of the collection's own TRAIN images, for collections big enough to pay for it (about 4 min on 2 cores).
TUNE_MIN_IMAGES = 2000  # fewer distinct TRAIN images (the quick preset's pool): the whitened ImageNet embedding
TUNE_IMAGES = 2000  # the seeded sample it learns from, grouped first in the whitened ImageNet space
TUNE_STEPS = 150
TUNE_BATCH = 32  # images per step, each from a different source group, two copies each
TUNE_LR = 1e-4  # the network's (its projection head: 1e-3), AdamW
TUNE_TEMPERATURE = 0.1
TUNE_VIEWS = 2  # views averaged per image with the tuned network (4 fits the counts as well at twice the cost)
TUNE_VERSION = 1

# Learned copy whitening (docs/RIGOR.md, Method, step 3): a projection under which augmented copies of one
# image are close and different images far, learned per collection from dataset-like copies we make ourselves.
# Chosen on real TRAIN's known cell counts (benchmarks/sweep_grouping.py --whiten).
WHITEN_IMAGES = 600  # images it learns from: a seeded sample of the collection's TRAIN rows (else all rows)
WHITEN_COPIES = 2  # dataset-like copies made of each (:func:`dataset_like`)
WHITEN_VIEWS = 2  # dihedral views averaged per copy (the copies are already turned at random)
WHITEN_DIMS = 256  # PCA of the centred embeddings before whitening
WHITEN_KEEP = 128  # dimensions kept after it
WHITEN_SHRINK = 0.3  # added to the copy covariance's eigenvalues, times their mean
WHITEN_MIN_IMAGES = 300  # fewer distinct images: centring only (too few to estimate a 256-d whitening)
WHITEN_VERSION = 1

EMBED_MODEL = "efficientnet_lite0"
CROP = 200  # centre crop (pixels of the 320x240 original); the cell of interest sits near the centre
SIZE = 128  # network input size; ~3-4x cheaper than 224 (not compared for grouping quality)
# Views averaged per image: 4 = the 90-degree rotations; 8 adds the mirror images (twice the cost; the
# mirror-image gap it closes is measured by benchmarks/bench_audit.py); 1 = none.
VIEWS = 4


def model_id(views: int = VIEWS, crop: int = CROP, size: int = SIZE, tuned: Path | None = None) -> str:
    """Names the cache folder of one embedding: the network (ImageNet, or copy-tuned weights by their key), the
    crop, the input size and the views."""
    weights = "imagenet" if tuned is None else f"copytune-{Path(tuned).stem}"
    return f"{EMBED_MODEL}-{weights}-c{crop}-s{size}-v{views}"


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
        return _centre_square(im.convert("RGB"), crop, size)


def _centre_square(im, crop: int, size: int) -> np.ndarray:
    """The ``crop`` px centre square of a PIL RGB image, resized to ``size``: what the embedding sees."""
    from PIL import Image

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


def _get_model(device: str, tuned: Path | None = None):
    """(network, mean, std): the ImageNet EfficientNet-Lite0, or with copy-tuned weights (:func:`copy_tune`)."""
    key = (device, None if tuned is None else str(tuned))
    if key not in _MODEL_CACHE:
        import torch

        from core.models import create_classifier, get_classifier_spec

        m, _ = create_classifier(EMBED_MODEL, 4, "imagenet")
        if tuned is not None:
            m.load_state_dict(torch.load(tuned, map_location="cpu", weights_only=True))
        spec = get_classifier_spec(EMBED_MODEL)
        # channels_last: 1.55x on a 2-core Xeon for the same fp32 numbers (max abs difference 1e-5; docs/BENCHMARKS.md)
        _MODEL_CACHE[key] = (m.eval().to(device, memory_format=torch.channels_last), spec.mean, spec.std)
    return _MODEL_CACHE[key]


def embed_images(paths: list[str], sha1s: list[str], cache_dir: Path | None = None, device: str = "cpu",
                 on_progress: ProgressFn | None = None, batch_size: int = 64, views: int = VIEWS,
                 tuned: Path | None = None) -> np.ndarray:
    """(N, 1280) float32 L2-normalised embeddings, averaged over dihedral views; cached per sha1 (and network:
    ``tuned`` is a copy-tuned weights file from :func:`copy_tune`, None the ImageNet weights).

    ``on_progress(done, total, message)`` counts all N requested images (cached ones count as done at once).
    """
    if len(paths) != len(sha1s):
        raise ValueError("paths and sha1s differ in length")
    folder = _cache_folder(cache_dir, model_id(views, tuned=tuned))
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
        items = list(todo.items())
        pending_s, pending_e = [], []
        with ThreadPoolExecutor(max_workers=2) as pool:
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                imgs = list(pool.map(lambda it: _load_image(it[1], CROP, SIZE), chunk))
                e = _embed_batch(imgs, device, views, tuned)
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


#: Forward passes per call of the network (images x views). On CPU a big batch's activations are fresh memory
#: the allocator maps and zeroes on every call (half the CPU time went to the kernel): 256 at a time ran at
#: 18-22 img/s on a 2-core Xeon, 8 at 47 img/s, with the same numbers (docs/BENCHMARKS.md). CUDA takes 1,024.
_FORWARDS = {"cpu": 8}


def _embed_batch(imgs: list[np.ndarray], device: str, views: int, tuned: Path | None = None) -> np.ndarray:
    """(B, 1280) L2-normalised embeddings of (size, size, 3) uint8 images, averaged over ``views``."""
    import torch

    model, mean, std = _get_model(device, tuned)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
    x = ((x - torch.tensor(mean).view(1, 3, 1, 1) * 255) / (torch.tensor(std).view(1, 3, 1, 1) * 255)).to(device)
    step = max(1, _FORWARDS.get(torch.device(device).type, 1024) // views)
    out = []
    with torch.inference_mode():
        for i in range(0, len(imgs), step):
            xb = x[i:i + step]
            f = model.features(_dihedral(xb, views).contiguous(memory_format=torch.channels_last))
            f = torch.nn.functional.normalize(f, dim=1)  # each view counts equally
            out.append(torch.nn.functional.normalize(f.view(views, len(xb), -1).mean(0), dim=1).cpu())
    return torch.cat(out).numpy()


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def centre(emb: np.ndarray) -> np.ndarray:
    """Subtract the collection's mean embedding and re-normalise.

    All blood-smear images share a large common component (raw cosine distances between *different*
    cells are only ~0.05-0.1); removing it spreads cells apart (different cells ~0.5, copies ~0.15).
    The mean is taken over the images being compared (all splits and classes passed in).
    """
    return _unit(emb - emb.mean(0, keepdims=True))


def dataset_like(im, rng: np.random.Generator):
    """One augmentation of the family the Kaggle copies show (docs/RIGOR.md): any rotation with black corners,
    a shear, zoom 0.85-1.3, a shift of up to an eighth of the frame, a mirror. A PIL RGB image in and out."""
    from PIL import Image

    w, h = im.size
    a, sh, z = np.deg2rad(rng.uniform(0, 360)), rng.uniform(-0.15, 0.15), rng.uniform(0.85, 1.3)
    tx, ty = rng.uniform(-w / 8, w / 8), rng.uniform(-h / 8, h / 8)
    inv = np.linalg.inv(np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.array([[1, sh], [0, 1]]) * z)
    c = np.array([w / 2, h / 2])
    off = c - inv @ (c + np.array([tx, ty]))  # PIL maps each output pixel back to the input
    out = im.transform((w, h), Image.AFFINE, (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1]),
                       resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    return out.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


def learn_whitening(x: np.ndarray, x_aug: np.ndarray, owner: np.ndarray, dims: int = WHITEN_DIMS,
                    keep: int = WHITEN_KEEP, shrink: float = WHITEN_SHRINK) -> np.ndarray:
    """A (D, keep) projection under which copies of one image are close and different images far.

    PCA of ``x`` to ``dims``; whitening of the copy differences ``x_aug - x[owner]`` (the learned whitening of
    Radenovic et al., 2016, with ``shrink`` times the mean eigenvalue added); then PCA of the whitened ``x``,
    keeping ``keep`` directions. ``x``: centred embeddings of different images; ``x_aug``: of copies, row i a
    copy of ``x[owner[i]]``."""
    dims = min(dims, len(x) - 1, x.shape[1])
    mu = x.mean(0)
    p0 = np.linalg.svd(x - mu, full_matrices=False)[2][:dims].T
    diff = (x_aug - x[owner]) @ p0
    lam, u = np.linalg.eigh(diff.T @ diff / len(diff))
    p1 = (u / np.sqrt(np.maximum(lam, 0) + shrink * lam.mean())) @ u.T
    y = (x - mu) @ p0 @ p1
    p2 = np.linalg.svd(y - y.mean(0), full_matrices=False)[2][:min(keep, dims)].T
    return (p0 @ p1 @ p2).astype(np.float32)


def project(emb: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Centred embeddings through a learned whitening, centred again on the collection and L2-normalised."""
    y = emb @ w
    return _unit(y - y.mean(0, keepdims=True))


def whitening(df: pd.DataFrame, raw: np.ndarray, cache_dir=None, device: str = "cpu",
              on_progress: ProgressFn | None = None, tuned: Path | None = None) -> np.ndarray | None:
    """The collection's learned copy whitening (:func:`learn_whitening`), or None when it has fewer than
    :data:`WHITEN_MIN_IMAGES` distinct images. Learned from a seeded sample of the TRAIN rows (all rows when
    there are none) and :data:`WHITEN_COPIES` :func:`dataset_like` copies of each; cached by the sample's sha1s."""
    from PIL import Image

    df = df.reset_index(drop=True)
    rows = _train_rows(df)
    if len(rows) < WHITEN_MIN_IMAGES:
        return None
    rng = np.random.default_rng(0)
    pick = rows.iloc[np.sort(rng.choice(len(rows), min(WHITEN_IMAGES, len(rows)), replace=False))]
    params = (WHITEN_VERSION, WHITEN_COPIES, WHITEN_DIMS, WHITEN_KEEP, WHITEN_SHRINK, _space_id(tuned), WHITEN_VIEWS)
    key = hashlib.sha1((repr(params) + "".join(pick["sha1"])).encode()).hexdigest()[:16]
    path = _cache_folder(cache_dir, _space_id(tuned)) / f"whiten-{key}.npy"
    try:
        return np.load(path)
    except Exception:  # absent or damaged: learn it again
        pass
    copies, owner, total = [], [], len(pick) * WHITEN_COPIES
    for i, p in enumerate(pick["path"]):
        with Image.open(p) as im:
            src = im.convert("RGB")
        for _ in range(WHITEN_COPIES):
            copies.append(_centre_square(dataset_like(src, rng), CROP, SIZE))
            owner.append(i)
    emb_aug = []
    for start in range(0, total, 64):
        emb_aug.append(_embed_batch(copies[start:start + 64], device, WHITEN_VIEWS, tuned))
        if on_progress:
            on_progress(start + len(emb_aug[-1]), total, "learning the copy whitening")
    at = {s: i for i, s in enumerate(df["sha1"])}
    own = raw[[at[s] for s in rows["sha1"]]]
    m = own.mean(0, keepdims=True)
    w = learn_whitening(_unit(raw[[at[s] for s in pick["sha1"]]] - m), _unit(np.concatenate(emb_aug) - m),
                        np.asarray(owner), WHITEN_DIMS, WHITEN_KEEP, WHITEN_SHRINK)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a path
            np.save(f, w)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    return w


def _views(tuned: Path | None) -> int:
    """Views averaged per image by a network: :data:`VIEWS` for ImageNet's, :data:`TUNE_VIEWS` for copy-tuned ones."""
    return VIEWS if tuned is None else TUNE_VIEWS


def _space_id(tuned: Path | None) -> str:
    return model_id(_views(tuned), tuned=tuned)


def _train_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The distinct TRAIN rows a collection learns from (all rows when it has no TRAIN), sorted by sha1."""
    rows = df[df["split"] == "TRAIN"] if "split" in df and (df["split"] == "TRAIN").any() else df
    return rows.drop_duplicates("sha1").sort_values("sha1")


def copy_tune(df: pd.DataFrame, cache_dir=None, device: str = "cpu",
              on_progress: ProgressFn | None = None) -> Path | None:
    """Weights of the embedding network fine-tuned to tell cells apart (docs/RIGOR.md, Method, step 4), or None
    when the collection has fewer than :data:`TUNE_MIN_IMAGES` distinct TRAIN images.

    Contrastive (SimCLR's loss, temperature :data:`TUNE_TEMPERATURE`): each step takes :data:`TUNE_BATCH` images
    of different source groups (found in the whitened ImageNet space on a seeded sample of :data:`TUNE_IMAGES`
    TRAIN rows), makes two :func:`dataset_like` copies of each, and pulls each copy towards its twin and away
    from the other images' copies. Batch-norm statistics stay ImageNet's. Cached by the sample's sha1s and the
    settings as ``<cache>/embeddings/copytune/<key>.pt``; a damaged file is learned again."""
    import torch

    rows = _train_rows(df)
    if len(rows) < TUNE_MIN_IMAGES:
        return None
    rng = np.random.default_rng(0)
    pick = rows.iloc[np.sort(rng.choice(len(rows), min(TUNE_IMAGES, len(rows)), replace=False))].reset_index(drop=True)
    params = (TUNE_VERSION, TUNE_STEPS, TUNE_BATCH, TUNE_LR, TUNE_TEMPERATURE, CROP, SIZE, GROUP_THRESHOLD)
    key = hashlib.sha1((repr(params) + "".join(pick["sha1"])).encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / "embeddings" / "copytune" / f"{key}.pt"
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return path
    except Exception:  # absent or damaged: learn it again
        pass
    sample = pick.assign(split="TRAIN")
    first = grouping_space(sample, cache_dir, device, on_progress, tune=False)
    groups = groups_from_embeddings(sample, first.emb, first.group_cut)
    members = [np.nonzero(groups == g)[0] for g in np.unique(groups)]
    batch = min(TUNE_BATCH, len(members))
    net = _tune(pick["path"].tolist(), members, batch, device, rng, on_progress)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(net.state_dict(), f)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    return path


def _tune(paths: list[str], members: list[np.ndarray], batch: int, device: str, rng: np.random.Generator,
          on_progress: ProgressFn | None):
    """The contrastive fine-tune of :func:`copy_tune`: the network (in eval mode again) after :data:`TUNE_STEPS`."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from core.models import create_classifier, get_classifier_spec

    torch.manual_seed(0)
    net, _ = create_classifier(EMBED_MODEL, 4, "imagenet")
    spec = get_classifier_spec(EMBED_MODEL)
    net = net.to(device, memory_format=torch.channels_last).train()
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()  # batches of 2x32 copies would only make noisier statistics than ImageNet's
    head = torch.nn.Sequential(torch.nn.Linear(1280, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128)).to(device)
    opt = torch.optim.AdamW([{"params": net.parameters(), "lr": TUNE_LR}, {"params": head.parameters(), "lr": 1e-3}],
                            weight_decay=1e-4)
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1) * 255

    def twins(item):
        path, seed = item
        r = np.random.default_rng(seed)
        with Image.open(path) as im:
            src = im.convert("RGB")
        return [_centre_square(dataset_like(src, r), CROP, SIZE) for _ in range(2)]

    target = torch.cat([torch.arange(batch, 2 * batch), torch.arange(0, batch)]).to(device)
    with ThreadPoolExecutor(max_workers=2) as pool:
        for step in range(TUNE_STEPS):
            groups = rng.choice(len(members), batch, replace=False)  # different source groups: true negatives
            items = [(paths[rng.choice(members[g])], int(rng.integers(1 << 31))) for g in groups]
            pairs = list(pool.map(twins, items))
            x = torch.from_numpy(np.stack([p[0] for p in pairs] + [p[1] for p in pairs])).permute(0, 3, 1, 2)
            x = ((x.to(device).float() - mean) / std).contiguous(memory_format=torch.channels_last)
            z = F.normalize(head(net.features(x)), dim=1)
            sim = (z @ z.T / TUNE_TEMPERATURE).fill_diagonal_(float("-inf"))
            loss = F.cross_entropy(sim, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_progress:
                on_progress(step + 1, TUNE_STEPS, "tuning the embedding to tell cells apart")
    return net.eval().cpu()


@dataclass(frozen=True)
class Space:
    """Embeddings to group and compare in, with the cuts chosen for that space (docs/RIGOR.md)."""

    emb: np.ndarray
    group_cut: float  # average-linkage cut that defines a group
    near_copy_cut: float  # nearest-neighbour distance below which an image has a near-copy
    network: str  # "copy-tuned" or "imagenet"


def embed_in(df: pd.DataFrame, tuned: Path | None, cache_dir=None, device: str = "cpu",
             on_progress: ProgressFn | None = None) -> np.ndarray:
    """Raw (uncentred) embeddings of ``df``'s rows with one network (``tuned``: :func:`copy_tune` weights, or None
    for ImageNet's) at its views; cached per sha1."""
    return embed_images(df["path"].tolist(), df["sha1"].tolist(), cache_dir, device, on_progress,
                        views=_views(tuned), tuned=tuned)


def grouping_space(df: pd.DataFrame, cache_dir=None, device: str = "cpu", on_progress: ProgressFn | None = None,
                   tune: bool = True, learn_from: pd.DataFrame | None = None) -> Space:
    """Where every grouping and near-copy distance is measured (docs/RIGOR.md, Method).

    ``df``'s rows embedded with the :func:`copy_tune` network of ``learn_from`` (default: ``df`` itself; a study
    passes its training pool when it groups its test set, so that both live in one space; the ImageNet network
    when ``learn_from`` is too small to tune, or ``tune=False``), centred on ``df`` (:func:`centre`), then through
    ``learn_from``'s learned :func:`whitening` when it has enough images. The :class:`Space` carries the cuts
    chosen for its network."""
    learn_from = df if learn_from is None else learn_from.reset_index(drop=True)
    tuned = copy_tune(learn_from, cache_dir, device, on_progress) if tune else None
    raw = embed_in(df, tuned, cache_dir, device, on_progress)
    own = raw if learn_from is df else embed_in(learn_from, tuned, cache_dir, device, on_progress)
    w = whitening(learn_from, own, cache_dir, device, on_progress, tuned)
    emb = centre(raw) if w is None else project(centre(raw), w)
    if tuned is None:
        return Space(emb, GROUP_THRESHOLD, NEAR_COPY_THRESHOLD, "imagenet")
    return Space(emb, TUNED_GROUP_THRESHOLD, TUNED_NEAR_COPY_THRESHOLD, "copy-tuned")


def cluster(emb: np.ndarray, threshold: float = GROUP_THRESHOLD, keys: list[str] | None = None,
            method: str = LINKAGE) -> np.ndarray:
    """Cluster labels 0..k-1 (numbered by first appearance): agglomerative clustering (``method``: a scipy
    linkage, :data:`LINKAGE` by default) on cosine distance, cut at ``threshold``. Rows with the same key (sha1)
    always share a label.

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
        lab_u = fcluster(linkage(cond, method), threshold, "distance")
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


def assign_groups(df: pd.DataFrame, cache_dir=None, device: str = "cpu", on_progress: ProgressFn | None = None,
                  threshold: float | None = None, learn_from: pd.DataFrame | None = None) -> np.ndarray:
    """One source-group id per row of ``df`` (columns path, sha1, split, label), in the :func:`grouping_space`
    learned from ``learn_from`` (default ``df``)."""
    df = df.reset_index(drop=True)
    space = grouping_space(df, cache_dir, device, on_progress, learn_from=learn_from)
    return groups_from_embeddings(df, space.emb, space.group_cut if threshold is None else threshold)


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
    (default: the grouping space's near-copy cut, :class:`Space`). ``median_nn_distance``: compare with a split
    known to be clean (docs/RIGOR.md). ``share_grouped``: validation images whose group, when train and
    validation are clustered together (the space's group cut), holds a training image.
    """
    both = pd.concat([train_df, val_df], ignore_index=True)
    space = grouping_space(both, cache_dir, device)
    t = space.near_copy_cut if threshold is None else threshold
    emb = space.emb
    both = both.assign(split="x")
    ntr = len(train_df)
    d = nearest_distance(emb[ntr:], val_df["label"], emb[:ntr], train_df["label"])
    leaked = d < t
    g = groups_from_embeddings(both, emb, space.group_cut)
    in_train = set(g[:ntr])
    shared = np.array([x in in_train for x in g[ntr:]], dtype=bool)
    lab = val_df["label"].to_numpy()
    return {"threshold": t, "group_threshold": space.group_cut, "network": space.network,
            "n_val": int(len(val_df)), "n_leaked": int(leaked.sum()),
            "share": float(leaked.mean()) if len(leaked) else 0.0,
            "share_grouped": float(shared.mean()) if len(shared) else 0.0,
            "per_class": {c: float(leaked[lab == c].mean()) for c in sorted(set(lab))},
            "median_nn_distance": float(np.median(d)) if len(d) else float("nan")}


NETWORK_WORDS = {
    "copy-tuned": "the copy-tuned embedding: EfficientNet-Lite0 fine-tuned to tell one cell's copies from other cells",
    "imagenet": "the ImageNet embedding: EfficientNet-Lite0's ImageNet features",
}


def leakage_words(leak) -> str:
    """:func:`leakage`'s result (run.json ``data.leakage``) as one plain-text sentence, or "" when it holds nothing
    readable. It comes from a run.json that may be damaged or hand-edited: only finite shares in [0, 1], whole
    counts with ``n_leaked <= n_val``, and a short one-line network name are used (escape it for HTML)."""
    d = leak if isinstance(leak, dict) else {}

    def share(x) -> float | None:
        ok = isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1
        return float(x) if ok else None

    def whole(x) -> int | None:
        return x if isinstance(x, int) and not isinstance(x, bool) and x >= 0 else None

    n_val, n_leaked, cut = whole(d.get("n_val")), whole(d.get("n_leaked")), d.get("threshold")
    if not n_val or n_leaked is None or n_leaked > n_val:
        return ""
    net = d.get("network")
    net = one_line(net, 40) if isinstance(net, str) and net.strip() else "the grouping"
    # what each space is, so that two runs' shares are not read as one scale (each space has its own cut)
    net = NETWORK_WORDS.get(net, f"the {net} embedding")
    where = (f" (cosine distance below {cut:.2f} in {net})"
             if isinstance(cut, (int, float)) and not isinstance(cut, bool) and 0 < cut < 2 else "")
    per = d.get("per_class") if isinstance(d.get("per_class"), dict) else {}
    per = [f"{str(c)[:3].upper()} {100 * share(v):.1f}%" for c, v in per.items()
           if isinstance(c, str) and share(v) is not None][:8]
    grouped = share(d.get("share_grouped"))
    return (f"{n_leaked} of {n_val} validation images ({100 * n_leaked / n_val:.1f}%) have a near-copy of the same "
            f"class in training{where}" + (f"; by class {', '.join(per)}" if per else "")
            + (f"; {100 * grouped:.1f}% share a source group with training images" if grouped is not None else "")
            + ".")


def cross_split_overlap(df: pd.DataFrame, groups: np.ndarray, emb: np.ndarray, threshold: float) -> pd.DataFrame:
    """For each ordered pair of splits and class: how many groups (images) of one have a near-copy in the other.

    ``emb`` must be centred the same way as for grouping (see :func:`centre`); ``threshold`` is its
    :class:`Space`'s near-copy cut.
    """
    df = df.reset_index(drop=True).assign(group=np.asarray(groups))
    rows = []
    splits = list(dict.fromkeys(df["split"]))
    for a in splits:
        for b in splits:
            if a == b:
                continue
            ma, mb = (df["split"] == a).to_numpy(), (df["split"] == b).to_numpy()
            d = nearest_distance(emb[ma], df.loc[ma, "label"], emb[mb], df.loc[mb, "label"])
            sub = df[ma].assign(copy=d < threshold)
            for label, g in sub.groupby("label", sort=True):
                hit = g.groupby("group")["copy"].any()
                rows.append({"split": a, "other_split": b, "label": label, "groups": int(len(hit)),
                             "groups_with_copy": int(hit.sum()), "images": int(len(g)),
                             "images_with_copy": int(g["copy"].sum())})
    return pd.DataFrame(rows, columns=["split", "other_split", "label", "groups", "groups_with_copy",
                                       "images", "images_with_copy"])
