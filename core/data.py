"""Data: find the images, build a manifest, subset and split them.

The Kaggle "Blood Cell Images" layout is ``TRAIN/ TEST/ TEST_SIMPLE/`` each holding one folder per
class (``EOSINOPHIL`` ...), possibly nested as ``dataset2-master/dataset2-master/images/``. Any
ImageFolder root (class folders directly inside) works too.

The manifest has one row per readable image: ``image_id, path, split, label, sha1, width, height``.
Unreadable or non-image files, and images above the pixel budget (:data:`MAX_PIXELS`), are never fatal: they
are returned as ``skipped`` with the reason and recorded in the run, before anything is enhanced.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from core.config import CLASSES, KNOWN_DATA_LOCATIONS
from core.terminal import one_line

# Pillow warns (two lines, with its own path) on opening an image above 89 MP; our pixel budget (MAX_PIXELS, far
# lower) refuses such an image anyway, in one line naming it
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

SPLIT_NAMES = ("TRAIN", "TEST", "TEST_SIMPLE")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
MANIFEST_COLUMNS = ("image_id", "path", "split", "label", "sha1", "width", "height")
# The pixel budget of one input image: 2048x2048 (4.2 MP; a Kaggle image is 320x240 = 0.08 MP). An x4
# enhancement of it (67 MP) stays under Pillow's decompression-bomb limits (warning at 89 MP, error at 179 MP),
# so every enhanced image the cache holds can be read back. Larger images are skipped at scan time.
MAX_PIXELS = 2048 * 2048

GET_DATA_HELP = (
    "No blood-cell images found. Get them with one of:\n"
    "  wbc data fetch                      # downloads the Kaggle dataset (needs network and kagglehub)\n"
    "  wbc study --data /path/to/images    # a folder with TRAIN/ (and TEST/ or TEST_SIMPLE/) class folders\n"
    "  export WBC_DATA=/path/to/images\n"
    "Searched: --data, $WBC_DATA, then " + ", ".join(str(p) for p in KNOWN_DATA_LOCATIONS)
)


class DataNotFoundError(FileNotFoundError):
    pass


def class_of_folder(name: str) -> str | None:
    """Map a folder name to a class (case-insensitive, singular or plural), else None."""
    n = name.strip().lower().rstrip("s")
    return n if n in CLASSES else None


def is_class_root(folder: Path) -> bool:
    """True if ``folder`` directly holds at least two class folders (an ImageFolder root)."""
    if not folder.is_dir():
        return False
    return sum(1 for c in folder.iterdir() if c.is_dir() and class_of_folder(c.name)) >= 2


def find_split_dirs(root: Path, max_depth: int = 5) -> dict[str, Path]:
    """Locate TRAIN/TEST/TEST_SIMPLE under ``root`` (breadth first, the shallowest wins).

    A root that is itself an ImageFolder root is returned as ``{"TRAIN": root}``.
    """
    root = Path(root)
    if is_class_root(root):
        return {"TRAIN": root}
    found: dict[str, Path] = {}
    frontier = [root]
    for _ in range(max_depth):
        nxt = []
        for d in frontier:
            try:
                children = sorted(c for c in d.iterdir() if c.is_dir())
            except OSError:
                continue
            for c in children:
                key = c.name.upper().replace("-", "_")
                if key in SPLIT_NAMES and key not in found and is_class_root(c):
                    found[key] = c
                else:
                    nxt.append(c)
        if "TRAIN" in found:
            break
        frontier = nxt
    return found


def find_data_root(explicit: str | os.PathLike | None = None) -> Path:
    """``--data``, then ``$WBC_DATA``, then the known local locations; raise with help if none has images."""
    candidates: list[Path] = []
    if explicit:
        p = Path(explicit).expanduser()
        if not find_split_dirs(p):
            raise DataNotFoundError(f"--data {explicit}: no TRAIN/ or class folders found there.\n" + GET_DATA_HELP)
        return p
    if os.environ.get("WBC_DATA"):
        candidates.append(Path(os.environ["WBC_DATA"]).expanduser())
    candidates.extend(KNOWN_DATA_LOCATIONS)
    for c in candidates:
        if c.is_dir() and find_split_dirs(c):
            return c
    raise DataNotFoundError(GET_DATA_HELP)


BUFFER_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")  # Pillow names the buffer it read


def _inspect(path: Path) -> tuple[str, int, int]:
    """sha1 and size of a fully decodable image; raises on anything else."""
    data = path.read_bytes()
    from io import BytesIO

    with Image.open(BytesIO(data)) as im:
        w, h = im.size  # from the header: a huge image is refused before it is decoded
        check_pixels(w, h)
        im.load()  # full decode: catches truncated files now rather than mid-training
    return hashlib.sha1(data).hexdigest(), w, h


class ImageTooLarge(ValueError):
    pass


def check_pixels(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(f"{width}x{height} = {width * height / 1e6:.1f} MP is above the pixel budget of "
                            f"{MAX_PIXELS / 1e6:.1f} MP (core.data.MAX_PIXELS)")


def scan_class_folders(folder: Path, split: str, id_prefix: str | None = None,
                       workers: int = 4) -> tuple[pd.DataFrame, list[dict]]:
    """One manifest row per readable image in ``folder/<CLASS>/``; the rest go to ``skipped``."""
    folder = Path(folder)
    prefix = id_prefix if id_prefix is not None else split
    files: list[tuple[Path, str]] = []
    skipped: list[dict] = []
    for c in sorted(folder.iterdir()):
        label = class_of_folder(c.name) if c.is_dir() else None
        if label is None:
            continue
        for f in sorted(c.rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                files.append((f, label))
            elif f.is_symlink() and not f.exists():  # said, like any file that cannot be read
                skipped.append({"path": str(f), "split": split, "error": "a broken symbolic link"})

    def inspect(item):
        f, label = item
        if f.suffix.lower() not in IMAGE_EXTENSIONS:
            return item, None, "not an image file (extension)"
        try:
            return item, _inspect(f), None
        except Exception as e:  # truncated, corrupt, not an image
            return item, None, f"{type(e).__name__}: {BUFFER_REPR.sub('', str(e))}"

    rows = []
    with ThreadPoolExecutor(max_workers=workers) as ex:
        for (f, label), info, err in ex.map(inspect, files):
            if err:
                skipped.append({"path": str(f), "split": split, "error": err})
                continue
            sha1, w, h = info
            rows.append({
                "image_id": f"{prefix}/{f.relative_to(folder).as_posix()}",
                "path": str(f.resolve()),
                "split": split,
                "label": label,
                "sha1": sha1,
                "width": w,
                "height": h,
            })
    df = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    return df.astype({"width": "int64", "height": "int64"}), skipped


@dataclass
class Manifest:
    df: pd.DataFrame
    skipped: list[dict] = field(default_factory=list)
    root: Path | None = None
    split_dirs: dict[str, str] = field(default_factory=dict)

    def split(self, name: str) -> pd.DataFrame:
        return self.df[self.df["split"] == name].reset_index(drop=True)


def test_split_dir(test_dir: str | os.PathLike) -> Path | None:
    """The class folders ``--test-dir`` reads: its TEST, else the folder itself (or a TRAIN), else TEST_SIMPLE,
    found also when nested (``dataset2-master/dataset2-master/images/TEST``); None when there are none."""
    tdirs = find_split_dirs(Path(test_dir))
    return tdirs.get("TEST") or tdirs.get("TRAIN") or tdirs.get("TEST_SIMPLE")


def split_dirs(root: Path, test_dir: str | os.PathLike | None = None, require_train: bool = True) -> dict[str, Path]:
    """The split folders of a data root, with ``--test-dir`` as TEST; raises when a needed one is missing."""
    dirs = find_split_dirs(root)
    if test_dir is not None:
        tdir = test_split_dir(test_dir)
        if tdir is None:
            raise DataNotFoundError(f"--test-dir {test_dir}: no class folders (EOSINOPHIL/ ...) found there")
        dirs["TEST"] = tdir
    if "TRAIN" not in dirs and (require_train or not dirs):
        what = "TRAIN/ folder" if require_train else "TRAIN/, TEST/ or TEST_SIMPLE/ folder"
        raise DataNotFoundError(f"{root}: no {what} with class folders found.\n" + GET_DATA_HELP)
    return dirs


def check_data(data_dir: str | os.PathLike | None, test_dir: str | os.PathLike | None = None) -> Path:
    """The data root a study will read, checked in milliseconds before a run folder exists: TRAIN (and
    ``--test-dir``) must have class folders holding at least one image file (by name; decoding comes later)."""
    root = find_data_root(data_dir)
    dirs = split_dirs(root, test_dir)
    for split in ("TRAIN", "TEST") if test_dir is not None else ("TRAIN",):
        if not _has_image_file(dirs[split]):
            flag = "--test-dir" if split == "TEST" else "--data"
            raise DataNotFoundError(f"{flag}: {dirs[split]} has class folders but no image files in them "
                                    f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return root


def _has_image_file(folder: Path) -> bool:
    for c in folder.iterdir():
        if c.is_dir() and class_of_folder(c.name):
            for _, _, files in os.walk(c):
                if any(Path(f).suffix.lower() in IMAGE_EXTENSIONS and not f.startswith(".") for f in files):
                    return True
    return False


def build_manifest(root: str | os.PathLike, test_dir: str | os.PathLike | None = None,
                   splits: tuple[str, ...] = SPLIT_NAMES, require_train: bool = True) -> Manifest:
    """Scan a data root (and an extra TEST folder) into a manifest. ``require_train=False`` (the audit) also
    accepts a root that holds only a test split."""
    root = Path(root)
    dirs = split_dirs(root, test_dir, require_train)
    frames, skipped = [], []
    for split in splits:
        if split in dirs:
            df, sk = scan_class_folders(dirs[split], split)
            frames.append(df)
            skipped += sk
    df = pd.concat(frames, ignore_index=True)
    if df.empty:
        raise DataNotFoundError(f"{root}: no readable images found")
    return Manifest(df=df, skipped=skipped, root=root, split_dirs={k: str(v) for k, v in dirs.items()})


def exact_copies(train: pd.DataFrame, test: pd.DataFrame, examples: int = 5) -> dict:
    """Byte-identical files the test set should not hold (by ``sha1``): test images that repeat an earlier test
    image (counted twice in every metric) and test images that are also training files (not unseen: their score
    is recall of a copy). Returns counts and up to ``examples`` test image ids of each kind."""
    repeated = test[test["sha1"].duplicated(keep="first")]
    first = test.drop_duplicates("sha1").set_index("sha1")["image_id"]  # the file each repeat repeats
    in_train = test[test["sha1"].isin(set(train["sha1"]))]
    return {"test_repeated": int(len(repeated)), "test_in_train": int(len(in_train)),
            "repeated_examples": repeated["image_id"].head(examples).tolist(),
            "repeated_of": first.loc[repeated["sha1"].head(examples)].tolist(),
            "in_train_examples": in_train["image_id"].head(examples).tolist()}


def copies_words(copies, n_test: int | None = None) -> list[tuple[str, str]]:
    """What :func:`exact_copies` found, as (level, sentence) for the dashboard and the reports; plain text (the
    names come from disk: escape them for HTML). Level ``warning``: copies of training files in the test set.
    ``copies`` is read from a run.json that may be damaged or hand-edited: a count that is not a whole number
    between 1 and ``n_test`` (the test set's size, when known) says nothing, and only text names are shown, each
    on one line and at most 120 characters."""
    c = copies if isinstance(copies, dict) else {}

    def count(key: str) -> int:
        n = c.get(key)
        ok = isinstance(n, int) and not isinstance(n, bool) and n > 0 and (n_test is None or n <= n_test)
        return n if ok else 0

    def names(key: str) -> str:
        ex = c.get(key)
        ex = [one_line(x, 120) for x in ex if isinstance(x, str)][:5] if isinstance(ex, list) else []
        return f" (e.g. {', '.join(x for x in ex if x)})" if any(ex) else ""

    def pairs() -> str:
        """Each repeat with the file it repeats ("B repeats A"): a bare list of repeats read as copies of each
        other. Runs before the pairs were recorded (or damaged lists) name the repeats only."""
        copy, of = c.get("repeated_examples"), c.get("repeated_of")
        ok = isinstance(copy, list) and isinstance(of, list) and len(copy) == len(of)
        both = [(one_line(b, 120), one_line(a, 120)) for b, a in zip(copy, of)
                if isinstance(b, str) and isinstance(a, str) and b.strip() and a.strip()][:5] if ok else []
        if not both:
            return names("repeated_examples")
        return f" (e.g. {'; '.join(f'{b} repeats {a}' for b, a in both)})"

    out = []
    if count("test_in_train"):
        out.append(("warning", f"{count('test_in_train')} test images are byte-identical to training files"
                               f"{names('in_train_examples')}: they are not unseen cells, so the test figures "
                               "(\"unseen cells\" in the scorecard) overstate what the model does on new cells. Use a "
                               "test folder of other cells."))
    if count("test_repeated"):
        shared = c.get("repeats_share_a_group")
        together = (" The confidence intervals resample each copy with its original (one source group)." if shared is True
                    else " Some copies fell in other source groups than their originals, so the confidence intervals "
                         "are a little too narrow." if shared is False else "")
        out.append(("info", f"{count('test_repeated')} test images repeat another test image byte for byte"
                            f"{pairs()}: each copy counts in every metric.{together}"))
    return out


def run_copies_words(data) -> list[tuple[str, str]]:
    """:func:`copies_words` for a run.json's ``data`` section, checked against the test set's size it records."""
    d = data if isinstance(data, dict) else {}
    counts = d.get("counts") if isinstance(d.get("counts"), dict) else {}
    test = counts.get("test") if isinstance(counts.get("test"), dict) else {}
    n = sum(v for v in test.values() if isinstance(v, int) and not isinstance(v, bool) and v > 0)
    return copies_words(d.get("copies"), n or None)


def subset_per_class(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """At most ``n`` images per class, sampled with ``seed`` (all if ``n`` is None)."""
    if n is None:
        return df.reset_index(drop=True)
    parts = [g.sample(n=min(n, len(g)), random_state=seed) for _, g in df.groupby("label", sort=True)]
    return pd.concat(parts).sort_values("image_id").reset_index(drop=True)


def random_split(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stratified random split (the paper's 80/20). Leaky on this dataset: near-copies cross it."""
    rng = np.random.default_rng(seed)
    val_idx = []
    for _, g in df.groupby("label", sort=True):
        k = max(1, int(round(len(g) * fraction)))
        val_idx.extend(rng.choice(g.index.to_numpy(), size=min(k, len(g) - 1), replace=False))
    val = df.index.isin(val_idx)
    return df[~val].reset_index(drop=True), df[val].reset_index(drop=True)


def grouped_split(df: pd.DataFrame, groups: np.ndarray, fraction: float,
                  seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per class, whole source-cell groups go to validation until ``fraction`` of images is reached.

    No group is on both sides. Each class keeps at least one group on each side.
    """
    rng = np.random.default_rng(seed)
    df = df.assign(_group=np.asarray(groups))
    val_groups: set = set()
    for _, g in df.groupby("label", sort=True):
        sizes = g.groupby("_group").size()
        order = rng.permutation(sizes.index.to_numpy())
        target, taken = fraction * len(g), 0
        for i, grp in enumerate(order):
            if taken >= target or i == len(order) - 1:
                break
            val_groups.add(grp)
            taken += sizes[grp]
    val = df["_group"].isin(val_groups)
    return (df[~val].drop(columns="_group").reset_index(drop=True),
            df[val].drop(columns="_group").reset_index(drop=True))
