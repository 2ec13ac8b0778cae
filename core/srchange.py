"""What super-resolution changed in each test image, and whether the images whose verdict flips differ in it.

The measure (``hf_gain``): high-frequency energy (mean squared Laplacian of the grey image) of the enhanced
region, over that of a bicubic x4 of the same region of the original, as a log2 ratio. 0 means the enhancer
added no more fine detail than interpolation; +1, twice the energy (sharper edges, texture; also halos and
invented detail); negative, smoother than bicubic. It is computed once per (variant, test image) on exactly the
region the classifier saw, and stored in the run's ``sr_change`` table by ``wbc explain RUN --sr-change``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from core.fsio import NotAllowed
from core.metrics import UNCHANGED, verdict_pairs
from core.regions import BOX_COLUMNS
from core.store import Run, Table


BORDER = 0.06  # share of each side left out: region borders carry resampling and padding seams, not detail


def hf_energy(rgb: np.ndarray) -> float:
    """Mean squared Laplacian of the grey image (0-255 scale), inside a :data:`BORDER` margin."""
    from scipy import ndimage as ndi

    grey = np.asarray(rgb, dtype=np.float32)[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    lap = ndi.laplace(grey)
    dy, dx = int(BORDER * lap.shape[0]), int(BORDER * lap.shape[1])
    return float(np.mean(lap[dy:lap.shape[0] - dy, dx:lap.shape[1] - dx] ** 2))


def hf_gain(path, box, enhanced_path) -> float | None:
    """log2(HF energy of the enhanced region / HF energy of bicubic x4 of the original region); None if unreadable.
    ``path`` and ``enhanced_path``: file names or binary file objects."""
    from PIL import Image

    try:
        with Image.open(enhanced_path) as e:
            enhanced = np.asarray(e.convert("RGB"))
        with Image.open(path) as im:
            im = im.convert("RGB")
            if box is not None and all(pd.notna(b) for b in box):
                im = im.crop(tuple(int(b) for b in box))
            bicubic = np.asarray(im.resize((enhanced.shape[1], enhanced.shape[0]), Image.Resampling.BICUBIC))
    except (OSError, ValueError):
        return None
    e, b = hf_energy(enhanced), hf_energy(bicubic)
    return math.log2(e / b) if e > 0 and b > 0 else None


_REFUSED = "refused"  # a row whose file the reader refuses: left out of the table


def sr_change(run: Run, workers: int = 2, on_progress: Callable[[int, int], None] | None = None,
              read: Callable[[str], bytes] | None = None) -> pd.DataFrame:
    """``hf_gain`` for every (enhanced variant, test image) of the run: the ``sr_change`` table's rows.
    ``on_progress(done, total)`` as images are measured; ``read(path) -> bytes``: a reader that must not open
    every path the run names (the dashboard's ``read_image``) leaves out the rows whose original or enhanced file
    it refuses (``core.fsio.NotAllowed``); a file it cannot open (missing) gives no gain, as without a reader."""
    pred = run.table(Table.PREDICTIONS)
    pred = pred[pred["enhanced_path"].notna()].drop_duplicates(["variant", "image_id"])
    boxes = [tuple(r) for r in pred[list(BOX_COLUMNS)].itertuples(index=False)]

    def measure(path, box, enhanced_path):
        if read is None:
            return hf_gain(path, box, enhanced_path)
        try:
            original, enhanced = io.BytesIO(read(path)), io.BytesIO(read(enhanced_path))
        except NotAllowed:
            return _REFUSED
        except OSError:
            return None
        return hf_gain(original, box, enhanced)

    gains, total = [], len(pred)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for g in pool.map(measure, pred["path"], boxes, pred["enhanced_path"]):
            gains.append(g)
            if on_progress and (len(gains) % 25 == 0 or len(gains) == total):
                on_progress(len(gains), total)
    kept = np.array([g is not _REFUSED for g in gains], dtype=bool)
    return pd.DataFrame({"variant": pred["variant"].astype(str).to_numpy()[kept],
                         "image_id": pred["image_id"].to_numpy()[kept],
                         "hf_gain": np.array([g for g in gains if g is not _REFUSED], dtype=float)})


def flip_groups(pred: pd.DataFrame, change: pd.DataFrame, base: str, other: str) -> pd.DataFrame:
    """Per test image (and seed, size): ``other``'s hf_gain and how its verdict moved from ``base``'s (``flip``:
    core.metrics.verdict_pairs' 'right -> wrong', 'wrong -> right' or 'unchanged')."""
    j = verdict_pairs(pred, base, other, ["true_label"]).rename(columns={"moved": "flip"})
    gains = change[change["variant"] == other].set_index("image_id")["hf_gain"]
    return j.assign(hf_gain=j["image_id"].map(gains)).dropna(subset=["hf_gain"])


def flip_test(groups: pd.DataFrame) -> tuple[float | None, str]:
    """Two-sided Mann-Whitney U of hf_gain, images whose verdict flipped (either way) vs the rest: (p, words)."""
    from scipy.stats import mannwhitneyu

    flipped = groups.loc[groups["flip"] != UNCHANGED, "hf_gain"]
    same = groups.loc[groups["flip"] == UNCHANGED, "hf_gain"]
    if len(flipped) < 3 or len(same) < 3:
        return None, (f"Too few verdict flips to test ({len(flipped)} flipped, {len(same)} unchanged images): "
                      "the measure is shown, not tested.")
    p = float(mannwhitneyu(flipped, same, alternative="two-sided").pvalue)
    more = "more" if flipped.median() > same.median() else "less"
    verdict = (f"the flipped images had {more} added fine detail than the rest (p = {p:.3g}, Mann-Whitney U)"
               if p < 0.05 else
               f"no evidence that the flipped images were changed differently from the rest (p = {p:.3g}, "
               "Mann-Whitney U)")
    return p, (f"Median gain {flipped.median():+.2f} for the {len(flipped)} flipped images, {same.median():+.2f} for "
               f"the {len(same)} others: {verdict}.")
