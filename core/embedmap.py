"""A 2-D map of a run's test set: where each model puts each image (``Table.EMBEDDINGS`` -> ``Table.EMBEDDING_MAP``).

Each model's penultimate features (stored by the pipeline for every test image) are reduced to 50 dimensions by
PCA, then laid out in 2-D by t-SNE (scikit-learn; ``umap-learn`` is not a dependency), one map per variant of a
(seed, image size). Maps are computed once and cached in the run folder; the dashboard's Map page and
``wbc explain RUN --map`` read them. Variants are laid out independently, so their axes mean nothing across
panels: an image is linked across them by its ``image_id``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.progress import ProgressFn
from core.store import KEYS, DamagedTable, Run, Table

METHODS = ("tsne", "pca")
PCA_DIMS = 50
PERPLEXITY = 30.0


class NoEmbeddings(LookupError):
    """The run stored no penultimate features (made before they were, or it has no finished model)."""


def models_with_embeddings(run: Run) -> list[tuple[str, int, int]]:
    """(variant, seed, image_size) of every model whose features are stored, in the run's order."""
    keys = run.table(Table.EMBEDDINGS, columns=KEYS).drop_duplicates()
    if keys.empty:
        return []
    return [(str(v), int(s), int(z)) for v, s, z in keys.itertuples(index=False, name=None)]


def layout(features: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """(N, F) features -> (N, 2) coordinates: PCA to :data:`PCA_DIMS`, then t-SNE (or the first 2 components)."""
    from sklearn.decomposition import PCA

    if method not in METHODS:
        raise ValueError(f"map method: unknown {method!r}; choose from {', '.join(METHODS)}")
    x = np.asarray(features, dtype=np.float32)
    n = len(x)
    if n < 3:
        return np.zeros((n, 2), np.float32) if n else np.zeros((0, 2), np.float32)
    x = x - x.mean(0)
    dims = min(PCA_DIMS, n - 1, x.shape[1])
    z = PCA(n_components=dims, random_state=seed).fit_transform(x)
    if method == "pca" or dims < 2:
        return np.pad(z[:, :2], ((0, 0), (0, max(0, 2 - z.shape[1])))).astype(np.float32)
    from sklearn.manifold import TSNE

    perplexity = min(PERPLEXITY, (n - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                learning_rate="auto").fit_transform(z).astype(np.float32)


def embedding_map(run: Run, seed: int | None = None, size: int | None = None, method: str = "tsne",
                  on_progress: ProgressFn | None = None) -> pd.DataFrame:
    """Every variant's map for one (seed, image size) (default: the run's first), joined with the predictions:
    variant, image_id, x, y, true_label, pred_label, correct, confidence, path, enhanced_path. Cached."""
    models = models_with_embeddings(run)
    if not models:
        raise NoEmbeddings(f"run {run.run_id} has no stored features (embeddings.parquet): it was made before "
                           f"they were stored, or no model finished; run a new study for the map")
    seed = models[0][1] if seed is None else int(seed)
    size = models[0][2] if size is None else int(size)
    wanted = [m for m in models if m[1] == seed and m[2] == size]
    if not wanted:
        raise NoEmbeddings(f"run {run.run_id} has no features for seed {seed} at {size} px")
    cached = _cached_map(run)
    have = cached[(cached["method"] == method) & (cached["seed"] == seed) & (cached["image_size"] == size)] \
        if not cached.empty else cached
    todo = [m for m in wanted if m[0] not in set(have["variant"])] if not have.empty else wanted
    if todo:
        new = _compute(run, todo, method, on_progress)
        run.write_table(Table.EMBEDDING_MAP, pd.concat([cached, new], ignore_index=True) if not cached.empty else new)
        have = pd.concat([have, new], ignore_index=True) if not have.empty else new
    return _with_predictions(run, have[have["variant"].isin([m[0] for m in wanted])])


def _cached_map(run: Run) -> pd.DataFrame:
    """The cached layouts; a damaged cache file is only a cache: it is laid out again (and rewritten)."""
    try:
        return run.table(Table.EMBEDDING_MAP)
    except DamagedTable:
        return pd.DataFrame(columns=[*KEYS, "image_id", "x", "y", "method"])


def _features(run: Run, rows: pd.DataFrame, model: tuple) -> np.ndarray:
    """The stored vectors of one model as an (N, F) array; unusable ones (missing, ragged, not finite) are named."""
    where = f"run {run.run_id}, embeddings.parquet, {model[0]} seed {model[1]} {model[2]} px"
    if not len(rows):
        return np.zeros((0, 1), np.float32)
    try:
        x = np.stack([np.asarray(f, dtype=np.float32) for f in rows["feature"]])
    except (TypeError, ValueError) as e:
        raise NoEmbeddings(f"{where}: the stored features are missing or of unequal length ({e})") from None
    if x.ndim != 2 or not np.isfinite(x).all():
        raise NoEmbeddings(f"{where}: the stored features are not finite vectors; run the study again")
    return x


def _compute(run: Run, models: list[tuple], method: str, on_progress: ProgressFn | None) -> pd.DataFrame:
    emb = run.table(Table.EMBEDDINGS)
    out = []
    for i, (v, s, z) in enumerate(models):
        if on_progress:
            on_progress(i, len(models), f"laying out {v}")
        rows = emb[(emb["variant"] == v) & (emb["seed"] == s) & (emb["image_size"] == z)]
        xy = layout(_features(run, rows, (v, s, z)), method, seed=s)
        out.append(pd.DataFrame({"variant": v, "seed": s, "image_size": z, "image_id": rows["image_id"].to_numpy(),
                                 "x": xy[:, 0].astype(float), "y": xy[:, 1].astype(float), "method": method}))
    if on_progress:
        on_progress(len(models), len(models), "")
    return pd.concat(out, ignore_index=True)


def _with_predictions(run: Run, coords: pd.DataFrame) -> pd.DataFrame:
    pred = run.table(Table.PREDICTIONS)
    cols = [c for c in ("true_label", "pred_label", "correct", "confidence", "path", "enhanced_path", *_box_cols(pred))
            if c in pred.columns]
    return coords.merge(pred[[*KEYS, "image_id", *cols]], on=[*KEYS, "image_id"], how="left")


def _box_cols(pred: pd.DataFrame) -> list[str]:
    from core.regions import BOX_COLUMNS

    return [c for c in BOX_COLUMNS if c in pred.columns]


def wide(df: pd.DataFrame) -> pd.DataFrame:
    """One row per test image, the map's x/y per variant as ``x_<i>``/``y_<i>`` (i: the variant's position), for
    linked selection across the variants' panels; labels and files from the first variant's row, and
    ``correct_<i>`` per variant."""
    variants = list(dict.fromkeys(df["variant"]))
    base = df[df["variant"] == variants[0]].drop(columns=["x", "y", "correct", "variant"], errors="ignore")
    base = base.drop(columns=["pred_label", "confidence"], errors="ignore").set_index("image_id")
    for i, v in enumerate(variants):
        part = df[df["variant"] == v].set_index("image_id")
        base[f"x_{i}"], base[f"y_{i}"] = part["x"], part["y"]
        base[f"correct_{i}"], base[f"pred_{i}"] = part["correct"], part["pred_label"]
        if "enhanced_path" in part:
            enh = part["enhanced_path"]
            base["enhanced_path"] = base["enhanced_path"].fillna(enh) if "enhanced_path" in base else enh
    return base.reset_index()

