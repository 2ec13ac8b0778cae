"""Cached, failure-tolerant readers of the run store (through ``core.store``'s read API only), and thumbnails.

The dashboard never opens run.json or a Parquet file itself: it asks ``RunStore`` / ``Run`` and caches the
answer under the file's fingerprint (mtime, size) that core reports, so a rewritten file is re-read and an
unchanged one costs a dictionary lookup. Readers never raise for a damaged run: they return an empty frame
and a warning string the page shows. Cached frames are shared by every session of the server, so each caller
gets its own copy: one session's column added or sorted in place never reaches another.
"""

from __future__ import annotations

import base64
import hashlib
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import pandas as pd

from core.config import CLASSES, PROB_COLUMNS, default_cache_dir
from core.fsio import atomic_write_bytes, stat_key
from core.progress import fmt_duration
from core.store import (HEARTBEAT_EVERY_S, RUN_JSON, DamagedRun, DamagedTable, Progress, Run, RunInfo, RunStore,
                        Status, Table, effective_status, odd_labels, schema)

from dashboard.security import is_allowed_image, read_image

THUMB_SIZE = 128
LARGE_SIZE = 384


# ---------------------------------------------------------------------------------------------- runs
@lru_cache(maxsize=16)
def _runs_cached(root: str, key: tuple) -> pd.DataFrame:
    df = RunStore(root).list_runs()
    acc = df["accuracy"].apply(lambda a: a if isinstance(a, dict) else {})
    variants = []  # in the order the runs list them (baseline first)
    for a in acc:
        variants += [v for v in a if v not in variants and v != "image_size"]
    for v in variants:
        df[f"acc {v}"] = acc.apply(lambda a, v=v: a.get(v))
    df["date"] = pd.to_datetime(df["created_at"], errors="coerce", utc=True).dt.strftime("%Y-%m-%d %H:%M")
    df["duration"] = df["seconds"].apply(lambda s: fmt_duration(s, unknown="", short=True))  # a 100 px cell
    return df.drop(columns=["accuracy"])


def list_runs(root) -> pd.DataFrame:
    """One row per run folder (core.store.RunStore.list_runs) with one ``acc <variant>`` column per variant.

    The status is core's effective one (a run whose process is gone shows ``interrupted``). It changes without
    a file changing (a killed process, a heartbeat growing old), so the listing is re-read at least every
    HEARTBEAT_EVERY_S seconds; run.json and progress.json changes re-read it at once."""
    store = RunStore(root)
    return _runs_cached(str(store.root), store.fingerprint() + (int(time.time() // HEARTBEAT_EVERY_S),)).copy()


@lru_cache(maxsize=64)
def _info_cached(run_dir: str, key) -> tuple[RunInfo | None, str | None]:
    try:
        return Run(Path(run_dir)).info, None
    except DamagedRun as e:
        return None, str(e)


def read_info(run_dir) -> tuple[RunInfo | None, str | None]:
    """(the run's typed run.json, None) or (None, why it cannot be read)."""
    run = Run(Path(run_dir))
    return _info_cached(str(run.path), run.fingerprint(RUN_JSON))


def read_meta(run_dir) -> tuple[dict, str | None]:
    """The run.json document as read by core (a fresh dict per call), and a warning if it is unreadable."""
    info, why = read_info(run_dir)
    return (dict(info.raw) if info else {}), why


def run_variants(run_dir) -> list[str]:
    info, _ = read_info(run_dir)
    return info.variants if info else []


def run_state(run_dir) -> tuple[str, Progress, RunInfo | None]:
    """(effective status, progress, info) of a run: what a banner or the launcher shows. run.json comes from the
    cache, progress.json is read once."""
    info, _ = read_info(run_dir)
    doc = Run(Path(run_dir)).read_progress()
    status = effective_status(info.raw, doc) if info else Status.UNREADABLE.value  # nothing to show as running
    return status, Progress.from_json(doc), info


# -------------------------------------------------------------------------------------------- tables
@lru_cache(maxsize=128)
def _table_cached(run_dir: str, key, name: str) -> tuple[pd.DataFrame, str | None]:
    try:
        df = Run(Path(run_dir)).table(name)
    except DamagedTable as e:
        return schema(name).empty(), e.short
    odd = odd_labels(df) if name in (Table.PREDICTIONS, Table.MISCLASSIFIED, Table.CONFUSION) else []
    warning = (f"{Path(run_dir).name}/{name}.parquet names classes that are not {', '.join(CLASSES)} (e.g. "
               f"{', '.join(odd)}): per-class figures and confusion matrices leave those rows out") if odd else None
    if name in (Table.PREDICTIONS, Table.MISCLASSIFIED) and len(df):
        probs = df[[c for c in PROB_COLUMNS if c in df.columns]].to_numpy(dtype="float32")
        df["confidence"] = probs.max(axis=1) if probs.size else 0.0
        for col in ("variant", "true_label", "pred_label"):
            df[col] = df[col].astype("category")
    return df, warning


def load_table(run_dir, name: Table) -> tuple[pd.DataFrame, str | None]:
    """(table, warning): the session's own copy. A missing table is an empty frame and no warning; a corrupt
    one, a warning."""
    if not run_dir:
        return schema(name).empty(), None
    run = Run(Path(run_dir))
    df, warning = _table_cached(str(run.path), run.fingerprint(name), str(name))
    return df.copy(), warning


def accuracy_from_predictions(pred: pd.DataFrame) -> pd.DataFrame:
    if pred.empty:
        return pd.DataFrame(columns=["variant", "accuracy", "n"])
    g = pred.groupby("variant", observed=True)["correct"]
    return pd.DataFrame({"accuracy": g.mean(), "n": g.size()}).reset_index()


def cam_maps(run_dir, image_id: str, seed: int, size: int,
             skipped: list[tuple[str, str]] | None = None) -> list[dict]:
    """Grad-CAM of one test image for every variant (core.explain.image_maps; nothing is written). ``skipped``
    collects (variant, reason) for the variants that cannot be drawn (no checkpoint, an image not readable here)."""
    from core.explain import image_maps

    run = Run(Path(run_dir))
    return image_maps(run, image_id, int(seed), int(size), read=reader_for(run), skipped=skipped)


def reader_for(run: Run):
    """``read(path) -> bytes`` for the image files a run's untrusted tables name: only files under the dashboard's
    image roots (its run store among them) are read, checked on the open file; any other is refused
    (``core.fsio.NotAllowed``, fail closed)."""
    return lambda path: read_image(path, run.path.parent)


SR_CHANGE_ON_DEMAND = 400  # test images the EOS/NEU page measures as it draws (~30 ms each); above, on a button
SR_CHANGE_MS_PER_IMAGE = 30
_sr_measured: dict[tuple, pd.DataFrame] = {}  # (run folder, predictions fingerprint) -> measured here, not written
_sr_running: dict[tuple, list[int]] = {}  # the same key -> [done, total] of the measurement under way
_sr_gates: dict[tuple, threading.Lock] = {}  # one measurement per key: a second click or session waits for it
_sr_lock = threading.Lock()


def _sr_key(run: Run) -> tuple:
    return str(run.path), run.fingerprint(Table.PREDICTIONS)


def measure_sr_change(run_dir) -> pd.DataFrame:
    """What super-resolution changed (core.srchange), measured here on the images the dashboard may read, and kept
    in memory for this run's predictions (nothing is written: ``wbc explain RUN --sr-change`` stores it). One
    measurement per run at a time: a second caller (a double click, another session) waits for it. Its progress:
    :func:`sr_change_progress`."""
    from core.srchange import sr_change

    run = Run(Path(run_dir))
    key = _sr_key(run)
    with _sr_lock:
        if key in _sr_measured:
            return _sr_measured[key]
        gate = _sr_gates.setdefault(key, threading.Lock())
    with gate:
        with _sr_lock:
            if key in _sr_measured:
                return _sr_measured[key]
            _sr_running[key] = [0, 0]

        def progress(done: int, total: int) -> None:
            _sr_running[key] = [done, total]

        try:  # a file gone from disk gives no gain (the page says why); one outside the roots leaves its row out
            frame = sr_change(run, on_progress=progress, read=reader_for(run))
        finally:
            with _sr_lock:
                _sr_running.pop(key, None)
        with _sr_lock:
            while len(_sr_measured) >= 8:
                _sr_measured.pop(next(iter(_sr_measured)))
            _sr_measured[key] = frame
            _sr_gates.pop(key, None)
    return frame


def sr_change_progress(run_dir) -> tuple[int, int] | None:
    """(done, total) of a measurement of this run under way in this dashboard (any session), else None."""
    try:
        key = _sr_key(Run(Path(run_dir)))
    except Exception:
        return None
    with _sr_lock:
        got = _sr_running.get(key)
    return (got[0], got[1]) if got is not None else None


def sr_change_frame(run_dir) -> tuple[pd.DataFrame, str | None, int]:
    """What super-resolution changed per enhanced test image: the stored ``sr_change`` table, else measured here
    (as the page draws for small test sets, on a button for large ones; kept in memory, not written). Returns
    (frame, why it is missing, how many enhanced test images the button would measure: 0 when stored, measured
    already, or few enough to measure as the page draws)."""
    stored, warning = load_table(run_dir, Table.SR_CHANGE)
    if len(stored) or warning:
        return stored, warning, 0
    run = Run(Path(run_dir))
    n = _enhanced_count(run_dir)
    with _sr_lock:
        measured = _sr_measured.get(_sr_key(run))
    if measured is None and n > SR_CHANGE_ON_DEMAND:
        return stored, (f"{n} enhanced test images are not measured yet: about {sr_change_seconds(n)} s here (kept "
                        f"until the dashboard restarts), or once for good with `wbc explain {run.run_id} --sr-change`."), n
    frame = measure_sr_change(run_dir) if measured is None else measured
    if frame.empty and n:
        return frame, ("The dashboard may not read this run's images (outside its data roots: add their folder to "
                       f"WBC_DATA_ROOTS), so it cannot measure them; `wbc explain {run.run_id} --sr-change` can."), 0
    return frame.copy(), None, 0


def _enhanced_count(run_dir) -> int:
    """Distinct (variant, test image) pairs with an enhanced image: what core.srchange measures (not one per seed)."""
    pred, _ = load_table(run_dir, Table.PREDICTIONS)
    if not len(pred):
        return 0
    return int(len(pred.loc[pred["enhanced_path"].notna(), ["variant", "image_id"]].drop_duplicates()))


def sr_change_seconds(n: int) -> int:
    return max(1, n * SR_CHANGE_MS_PER_IMAGE // 1000)


def embedding_map_frame(run_dir, method: str = "tsne", seed: int | None = None,
                        size: int | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The test set's map for one seed and image size (default: the run's first; core.embedmap: laid out once,
    then cached in the run), one row per image with every variant's x/y and verdict; and the variants in the
    run's order. LookupError when the run has no features."""
    from core.embedmap import embedding_map, wide

    df = embedding_map(Run(Path(run_dir)), seed=seed, size=size, method=method)
    return wide(df), list(dict.fromkeys(df["variant"]))


def map_models(run_dir) -> dict[str, str]:
    """The (seed, image size) pairs a run stored features for: {"seed 0, 224 px": "0/224", ...}."""
    from core.embedmap import models_with_embeddings

    try:
        models = models_with_embeddings(Run(Path(run_dir)))
    except Exception:  # damaged: the map itself says why
        return {}
    pairs = list(dict.fromkeys((s, z) for _, s, z in models))
    return {f"seed {s}, {z} px": f"{s}/{z}" for s, z in pairs}


def report_html(run_dir) -> bytes:
    """The run's self-contained HTML report (core.report), for the Download button."""
    from core.report import report_blocks, to_html

    run = Run(Path(run_dir))
    return to_html(report_blocks(run, read=reader_for(run))).encode()


# ---------------------------------------------------------------------------------------- thumbnails
def thumbs_dir() -> Path:
    return default_cache_dir() / "thumbs"


@lru_cache(maxsize=4096)
def _thumb_cached(path: str, key, size: int, box: tuple | None = None, runs_dir=None) -> str | None:
    h = hashlib.sha1(path.encode()).hexdigest()
    region = "" if box is None else "-" + "_".join(map(str, box))
    cache = thumbs_dir() / h[:2] / f"{h}-{key[0]}-{size}{region}.jpg"
    try:
        data = cache.read_bytes()
    except OSError:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(read_image(path, runs_dir))) as im:
                if box is None:
                    im.draft("RGB", (size, size))
                im = im.convert("RGB")
                if box is not None:  # the region the classifier saw (core.regions), enlarged like the enhanced one
                    box = _inside(box, im.size)
                    if box is None:  # a stored box off the image: nothing the classifier could have seen
                        return None
                    im = im.crop(box).resize((size, size), Image.BICUBIC)
                im.thumbnail((size, size), Image.LANCZOS if size > THUMB_SIZE else Image.BILINEAR)
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=85)
        except Exception:
            return None
        data = buf.getvalue()
        try:
            atomic_write_bytes(cache, data)
        except OSError:
            pass
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def thumbnail_uri(path, size: int = THUMB_SIZE, runs_dir=None, box=None) -> str | None:
    """A small JPEG data URI of an image under the allowed roots (None if missing, unreadable or outside).

    ``box`` (left, top, right, bottom in the image's pixels) shows only that region, as the classifier saw it.
    """
    key = _allowed_key(path, runs_dir)
    return None if key is None else _thumb_cached(str(Path(path)), key, size, region_box(box),
                                                  None if runs_dir is None else str(runs_dir))


def _allowed_key(path, runs_dir=None) -> tuple[int, int] | None:
    """The cache key (mtime, size) of an image file under the allowed roots; None if missing, unreadable, not a
    path or outside (never opened then)."""
    if not path or not isinstance(path, str):
        return None
    key = stat_key(path)
    return key if key is not None and is_allowed_image(path, runs_dir) else None


def file_digest(path, runs_dir=None) -> str | None:
    """SHA-1 of an image file's bytes under the allowed roots (None if missing, unreadable or outside); cached
    by the file's mtime and size. Cards use it to say which of them show one file under two names."""
    key = _allowed_key(path, runs_dir)
    return None if key is None else _digest_cached(str(Path(path).resolve()), key,
                                                   None if runs_dir is None else str(runs_dir))


@lru_cache(maxsize=8192)
def _digest_cached(path: str, _key, runs_dir=None) -> str | None:
    try:
        return hashlib.sha1(read_image(path, runs_dir)).hexdigest()
    except OSError:  # refused (NotAllowed) or gone
        return None


def region_box(box) -> tuple[int, int, int, int] | None:
    """A row's stored region as four non-negative ints with positive size, or None (older runs, bad values)."""
    try:
        b = tuple(int(v) for v in box)
    except (TypeError, ValueError):
        return None
    return b if len(b) == 4 and min(b) >= 0 and b[2] > b[0] and b[3] > b[1] else None


def _inside(box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """``box`` cut to an image of ``size`` (w, h), or None if nothing is left: a damaged box never makes Pillow
    allocate more than the image."""
    left, top, right, bottom = box[0], box[1], min(box[2], size[0]), min(box[3], size[1])
    return (left, top, right, bottom) if right > left and bottom > top else None


_warm_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="thumbs")


def warm_thumbnails(paths, runs_dir=None, limit: int = 1500) -> None:
    """Generate thumbnails in the background (first gallery pages stay fast on real, large images)."""
    paths = [p for p in paths if isinstance(p, str)][:limit]

    def work():
        for p in paths:
            thumbnail_uri(p, runs_dir=runs_dir)

    _warm_pool.submit(work)
