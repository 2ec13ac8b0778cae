"""The run store, and the contract between ``core`` and everything that reads it (the dashboard, ``wbc runs``).

``runs/<run_id>/`` holds ``run.json`` (:class:`RunInfo`), ``progress.json`` (:class:`Progress`), ``log.txt`` and
one Parquet file per :class:`Table`, each with its :class:`TableSchema` (column names and dtypes). Readers use
:class:`RunStore` / :class:`Run` only: ``RunStore.list()``, ``Run.info``, ``Run.progress``, ``Run.table(name)``.
Every write is atomic (``core.fsio``), so a reader never sees half a file and a crash never damages another run.

``run.json`` carries ``schema_version`` (:data:`SCHEMA_VERSION`). Runs made before it (version 1: no version
key, a boolean ``augment``, predictions without the region columns, no ``validation`` table) are read through
the same API: missing columns come back as nulls, and the config migrates in ``StudyConfig.from_dict``.

A running study keeps a heartbeat in ``progress.json`` (``pid``, ``host``, ``updated_at``); a run marked
running whose process is gone or whose heartbeat is stale is *interrupted* (:func:`effective_status`, the one
rule every reader uses). What the store promises is in docs/RELIABILITY.md.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import socket
import tempfile
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path

import numpy as np
import pandas as pd

from core.config import CLASSES, PROB_COLUMNS, default_runs_dir
from core.fsio import atomic_write_json, atomic_write_parquet, stat_key
from core.regions import BOX_COLUMNS
from core.terminal import one_line

RUN_JSON = "run.json"
PROGRESS_JSON = "progress.json"
LOG_TXT = "log.txt"
RANK_ERROR_PREFIX = "rank-error-"  # rank-error-<rank>.json: a failed torchrun rank's error (record_rank_error)
CANCEL_FILE = "CANCEL"
# 2: schema_version in run.json, input policies (region columns, validation table). 1: everything before.
SCHEMA_VERSION = 2


# ------------------------------------------------------------------------------------------ names
class Table(StrEnum):
    PREDICTIONS = "predictions"
    MISCLASSIFIED = "misclassified"
    METRICS = "metrics"
    CONFUSION = "confusion"
    HISTORY = "history"
    VALIDATION = "validation"
    STATS = "stats"
    SPLITS = "splits"
    SKIPPED = "skipped"
    EXPLAIN = "explain"
    SR_CHANGE = "sr_change"
    EMBEDDINGS = "embeddings"
    EMBEDDING_MAP = "embedding_map"


class Status(StrEnum):
    """A run's lifecycle. INTERRUPTED is never written: readers derive it (:func:`effective_status`)."""

    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    UNREADABLE = "unreadable"  # a listed folder whose run.json cannot be read


class StatKind(StrEnum):
    """Rows of the stats table by ``kind`` (core.stats has what each holds)."""

    CI = "ci"  # per model: a metric with its bootstrap CI
    PAIRED = "paired"  # variant minus baseline on the same images
    CLASS_DIFF = "class_diff"  # per-class recall/F1 differences (eosinophil, neutrophil)
    SEEDS = "seeds"  # seed = SEED_MEAN: the seed mean, with the CI of the seed-averaged metric


SEED_MEAN = -1  # the ``seed`` of a ``seeds`` stats row: the mean over seeds, not one seed


class Metric(StrEnum):
    ACCURACY = "accuracy"
    MACRO_F1 = "macro_f1"
    BALANCED_ACCURACY = "balanced_accuracy"  # mean recall over the classes in the test set
    ACCURACY_DIFF = "accuracy_diff"
    MACRO_F1_DIFF = "macro_f1_diff"


def class_metric(measure: str, cls: str) -> str:
    """The stats ``metric`` of a per-class difference: ``recall:eosinophil``, ``f1:neutrophil``."""
    return f"{measure}:{cls}"


# Keys inside the stats table's ``detail`` JSON (a dict for ci/paired/class_diff rows, a list for seeds rows).
DETAIL_RESAMPLE = "resample"  # "groups" (cluster bootstrap over source cells) | "images"
DETAIL_N_GROUPS = "n_groups"
DETAIL_N_BOOT = "n_boot"
DETAIL_B = "b"  # paired: baseline right, variant wrong
DETAIL_C = "c"  # paired: baseline wrong, variant right
DETAIL_P_GROUP_SIGNFLIP = "p_group_signflip"  # paired: exact two-sided p of the group sign-flip test (core.stats)
# Runs stored before 2026-11-28 carry "p_cluster_boot" instead (a percentile-bootstrap p, too small with few
# discordant images); it is no longer read.


def parse_detail(value) -> dict:
    """A stats row's ``detail`` as a dict ({} for none, a seeds list, or unreadable JSON)."""
    if not isinstance(value, str) or not value.startswith("{"):
        return {}
    try:
        d = json.loads(value)
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


# ----------------------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class Col:
    name: str
    dtype: str  # "str" | "int" | "float" | "bool" | "json" (a JSON string) | "vector" (float32 array per row)


@dataclass(frozen=True)
class TableSchema:
    """One table's columns, in order, with their dtypes. Writes and reads go through :meth:`conform`."""

    name: str
    columns: tuple[Col, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def empty(self) -> pd.DataFrame:
        return pd.DataFrame(columns=self.names)

    def conform(self, df: pd.DataFrame, strict: bool = True) -> pd.DataFrame:
        """Columns in the schema's order with the schema's dtypes; missing columns become nulls (older runs).
        ``strict`` (writes) refuses columns that are not in the schema; reads drop them."""
        extra = [c for c in df.columns if c not in self.names]
        if extra and strict:
            raise ValueError(f"{self.name}: columns not in the schema: {extra}")
        out = df.copy()
        for c in self.columns:
            out[c.name] = _cast(out[c.name], c.dtype) if c.name in out.columns else \
                pd.Series([None] * len(out), dtype="object", index=out.index)
        return out[self.names].reset_index(drop=True)


def _cast(s: pd.Series, dtype: str) -> pd.Series:
    """Numbers and flags to their dtype (nullable when a value is missing); text is left as it is. A column that
    cannot be cast raises ``ValueError`` naming it."""
    if s.empty or dtype in ("str", "json", "vector"):
        return s
    try:
        if dtype == "float":
            return pd.to_numeric(s, errors="raise").astype("float64")
        nulls = bool(s.isna().any())
        if dtype == "int":
            return s.astype("Int64" if nulls else "int64")
        if dtype == "bool":
            if not pd.api.types.is_bool_dtype(s.dtype) and \
                    not s.dropna().map(lambda v: isinstance(v, (bool, np.bool_))).all():
                raise ValueError  # the text "False" would read as True
            return s.astype("boolean" if nulls else "bool")
    except (TypeError, ValueError):  # a hand-edited or damaged column: said, naming it (reads: DamagedTable)
        raise ValueError(f"column {s.name!r} holds values that are not {dtype}") from None
    return s


def _cols(spec: str) -> tuple[Col, ...]:
    """'name:dtype name:dtype ...' -> columns."""
    return tuple(Col(*item.split(":")) for item in spec.split())


# seed and image_size identify one trained model within a variant.
KEYS = ["variant", "seed", "image_size"]
_KEYS = "variant:str seed:int image_size:int "
# The region of the original image the model saw (core.regions; null in runs made before input policies),
# and why the policy was not applied as asked (e.g. "no stained nucleus found: centre crop").
_PRED = ("image_id:str path:str enhanced_path:str true_label:str pred_label:str correct:bool "
         + " ".join(f"{c}:float" for c in PROB_COLUMNS) + " group_id:str "
         + " ".join(f"{c}:int" for c in BOX_COLUMNS) + " region_note:str")
TABLES: dict[Table, TableSchema] = {t: TableSchema(t.value, _cols(spec)) for t, spec in {
    Table.PREDICTIONS: _KEYS + _PRED,
    Table.MISCLASSIFIED: _KEYS + _PRED,
    Table.METRICS: _KEYS + "label:str precision:float recall:float f1:float support:int",
    Table.CONFUSION: _KEYS + "true_label:str pred_label:str count:int",
    Table.HISTORY: _KEYS + "epoch:int train_loss:float train_acc:float val_loss:float val_acc:float "
                           "val_macro_f1:float lr:float seconds:float",
    # Each model's validation figures at its best (restored) epoch: the number the paper reports. split is
    # "grouped" (no source cell on both sides) or "random" (leaky: near-copies of training cells). refit_epochs:
    # the epochs of the test model's refit on training + validation images (null: the validated model is tested).
    Table.VALIDATION: _KEYS + "split:str leaky:bool best_epoch:int selected_by:str val_accuracy:float "
                              "val_macro_f1:float val_loss:float n_val:int val_groups_disjoint:bool refit_epochs:int",
    # kind: StatKind; metric: Metric or class_metric(); detail: JSON (see DETAIL_* and core.stats).
    Table.STATS: "kind:str variant:str baseline:str seed:int image_size:int metric:str estimate:float sd:float "
                 "ci_low:float ci_high:float p_value:float n:int detail:json",
    # Which images trained, validated and tested each model (role: train | val | test). With a refit (validation
    # table: refit_epochs set) the tested model trained on the val rows too, after they had chosen its epochs.
    Table.SPLITS: _KEYS + "image_id:str role:str label:str group_id:str",
    Table.SKIPPED: "path:str split:str error:str",
    # Grad-CAM maps (core.explain): one row per test image, model and class (role: true | pred), the PNG overlay
    # under <run>/explain/, and the share of the map's heat on the stained cell.
    Table.EXPLAIN: _KEYS + "image_id:str role:str class_label:str cam_path:str heat_in_cell:float correct:bool",
    # What super-resolution changed (core.srchange): log2 high-frequency energy, enhanced vs bicubic x4.
    Table.SR_CHANGE: "variant:str image_id:str hf_gain:float",
    # Penultimate features (the head's input, unturned view) of every test image, per model: float32 vectors.
    Table.EMBEDDINGS: _KEYS + "image_id:str feature:vector",
    # Their 2-D map (core.embedmap), cached: method is "tsne" or "pca".
    Table.EMBEDDING_MAP: _KEYS + "image_id:str x:float y:float method:str",
}.items()}
SCHEMAS: dict[str, list[str]] = {t.value: s.names for t, s in TABLES.items()}  # name -> column names


def schema(name: str | Table) -> TableSchema:
    try:
        return TABLES[Table(name)]
    except ValueError:
        raise ValueError(f"unknown table {name!r}; choose from {', '.join(SCHEMAS)}") from None


def conform(name: str | Table, df: pd.DataFrame) -> pd.DataFrame:
    """``df`` in table ``name``'s columns and dtypes; columns not in the schema are refused (a write)."""
    return schema(name).conform(df)


_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# The run lifecycle. A study refreshes its heartbeat every HEARTBEAT_EVERY_S seconds (and on each progress
# update); a heartbeat older than HEARTBEAT_STALE_S means the study is gone (killed, machine down, hung).
HEARTBEAT_EVERY_S = 10.0
HEARTBEAT_STALE_S = 120.0
LIVE_STATUSES = (Status.QUEUED, Status.RUNNING)
INTERRUPTED = Status.INTERRUPTED
RESUMABLE_STATUSES = (Status.INTERRUPTED, Status.FAILED, Status.CANCELLED)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def new_run_id(preset: str = "custom") -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{preset}-{secrets.token_hex(2)}"


def _safe_name(name) -> bool:
    """Letters, digits, '.', '_', '-' (no '/', no leading dot), and no '..': a name that stays inside its folder."""
    return isinstance(name, str) and bool(_RUN_ID_RE.match(name)) and ".." not in name


def check_run_id(run_id: str) -> str:
    if not _safe_name(run_id):
        raise ValueError(f"invalid run id {run_id!r}")
    return run_id


def _created(path: Path) -> float:
    """When a run folder was made: run.json's ``created_at``, else the folder's modification time."""
    try:
        stamp = json.loads((path / RUN_JSON).read_text(encoding="utf-8")).get("created_at")
        return dt.datetime.fromisoformat(stamp).timestamp()
    except Exception:  # noqa: BLE001 - missing, damaged or hand-edited: the folder's own time
        try:
            return path.stat().st_mtime
        except OSError:
            return 0.0


def check_name(name: str, what: str = "variant") -> str:
    """A name read from a run (a variant) that becomes part of a file name: the run-id rules (letters, digits,
    '.', '_', '-'; no '..', no '/'), so that no stored table can point a path outside its run."""
    if not _safe_name(name):
        raise ValueError(f"invalid {what} name {name!r}: letters, digits, '.', '_' and '-' only")
    return name


def check_output_file(out: Path, flag: str, suffixes: tuple[str, ...], kind: str, example: str) -> Path:
    """A file a command is about to write (``--html``, ``audit --out``), checked before the work: not a folder,
    not an existing file of another kind (so no run.json, table or notes are overwritten), and in a writable
    folder. ``kind`` names the allowed kind ("an .html"), ``example`` a file name to suggest inside a folder."""
    if out.is_dir():
        raise ValueError(f"{flag}: {out} is a folder; give a file name, e.g. {out / example}")
    if out.exists() and out.suffix.lower() not in suffixes:
        raise ValueError(f"{flag}: {out} exists and is not {kind} file; refusing to overwrite it")
    if out.exists() and (out.parent / RUN_JSON).is_file():  # a run's own table or report: stored results
        raise ValueError(f"{flag}: {out} is a file of the run in {out.parent}; refusing to overwrite it "
                         f"(give a new file name)")
    check_writable(out.parent, flag)
    return out


def check_writable(folder: str | os.PathLike, what: str) -> Path:
    """Create ``folder`` if needed and prove a file can be written in it, in milliseconds, before long work.

    Raises ``ValueError`` naming ``what`` (the flag) and the reason.
    """
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".wbc-write-check-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        blocked = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocked} is a file, not a folder" if blocked else (e.strerror or type(e).__name__)
        raise ValueError(f"{what} {folder}: not writable ({why})") from None
    return folder


def pid_alive(pid) -> bool:
    """Whether process ``pid`` exists on this machine (another user's counts)."""
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, OverflowError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _parse_time(value) -> dt.datetime | None:
    try:
        t = dt.datetime.fromisoformat(str(value))
    except (TypeError, ValueError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def heartbeat_age(progress: dict, now: dt.datetime | None = None) -> float | None:
    """Seconds since the heartbeat in ``progress`` (None without a readable ``updated_at``)."""
    t = _parse_time(progress.get("updated_at")) if isinstance(progress, dict) else None
    if t is None:
        return None
    return ((now or dt.datetime.now(dt.timezone.utc)) - t).total_seconds()


def effective_status(meta: dict, progress: dict, now: dt.datetime | None = None) -> str:
    """The status to show: run.json's, except that a queued or running run is ``interrupted`` when its
    process is gone (same host, pid not alive) or its heartbeat is older than :data:`HEARTBEAT_STALE_S`.

    The heartbeat's pid and host come from progress.json, else from run.json (runs made before heartbeats;
    a pid without a host is taken as this machine's). A run with neither a pid nor a heartbeat was last seen
    alive when it was created.
    """
    status = meta.get("status", "unknown")
    if not isinstance(status, str):  # a hand-edited run.json ({"s": 1}): not a status anyone could read
        return "unknown"
    if status not in LIVE_STATUSES:
        return status
    progress = progress if isinstance(progress, dict) else {}
    pid = progress.get("pid", meta.get("pid"))
    host = progress.get("host", meta.get("host"))
    if pid is not None and host in (None, socket.gethostname()) and not pid_alive(pid):
        return INTERRUPTED.value
    age = heartbeat_age(progress, now)
    if age is None and pid is None:
        age = heartbeat_age({"updated_at": meta.get("created_at")}, now)
    return INTERRUPTED.value if age is not None and age > HEARTBEAT_STALE_S else status


def odd_labels(df: pd.DataFrame, limit: int = 3) -> list[str]:
    """Up to ``limit`` true or predicted labels of a predictions / confusion table that are not one of the four
    classes (a hand-edited or foreign table: per-class figures and matrices leave them out), each on one line and
    cut to 40 characters."""
    cols = [c for c in ("true_label", "pred_label") if c in df.columns]
    found = sorted({str(v) for c in cols for v in df[c].dropna().unique()} - set(CLASSES))
    return [one_line(v, 40) for v in found[:limit]]


# ------------------------------------------------------------------------------------- typed records
class DamagedRun(Exception):
    """A run folder whose run.json is missing, unreadable, not an object, or from a newer layout."""


class DamagedTable(Exception):
    """A stored table that exists but cannot be read (truncated, not Parquet). ``str()`` names the whole path (the
    CLI); ``short`` names the run and the file (the dashboard)."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: cannot be read ({reason})")

    @property
    def short(self) -> str:
        return f"{self.path.parent.name}/{self.path.name} could not be read ({self.reason})"


def first_line(e: BaseException) -> str:
    """An error's message on one line: its first (a torch or pickle message can span many)."""
    return (str(e).strip().splitlines() or [""])[0]


def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def as_number(v) -> float | None:
    """A number read from disk (run.json, a stats detail) as a float; None for anything else, bools and NaN too."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None


def _text(v) -> str | None:
    return None if v is None else str(v)


_SCALAR = (str, int, float, bool, type(None))
_CONFIG_LISTS = ("variants", "image_sizes", "seeds", "notes")  # StudyConfig's sequence fields


def clean_meta(doc: dict) -> dict:
    """run.json with every field a reader relies on in its expected shape; a value of the wrong type (a hand-
    edited or foreign file) reads as absent instead of crashing a page or the report: ``config`` a dict of
    scalars (its sequence fields lists of scalars), ``notes`` a list of text, ``data``/``summary``/``versions``
    dicts, ``weights.enhancers`` a dict of dicts of scalars, ``error`` a dict."""
    out = dict(doc)
    cfg = {}
    for k, v in _dict(doc.get("config")).items():
        if k in _CONFIG_LISTS:
            if isinstance(v, list) and all(isinstance(x, _SCALAR) for x in v):
                cfg[k] = v
        elif isinstance(v, _SCALAR):
            cfg[k] = v
    out["config"] = cfg
    notes = doc.get("notes")
    out["notes"] = [str(n) for n in notes] if isinstance(notes, list) else ([notes] if isinstance(notes, str) else [])
    for k in ("data", "summary", "versions", "stages", "kernels", "distributed"):
        if k in doc:
            out[k] = _dict(doc[k])
    if "skipped" in doc:
        out["skipped"] = [x for x in doc["skipped"] if isinstance(x, dict)] if isinstance(doc["skipped"], list) else []
    weights = _dict(doc.get("weights"))
    if "enhancers" in weights:
        weights = {**weights, "enhancers": {str(v): _provenance(p) for v, p in _dict(weights["enhancers"]).items()
                                            if isinstance(p, dict)}}
    out["weights"] = weights
    err = doc.get("error")
    out["error"] = err if isinstance(err, dict) else ({"message": str(err)} if err else None)
    return out


_TEXT_FIELDS = ("sha256", "source", "path", "precision", "device", "method", "arch")  # of an enhancer's provenance


def _provenance(p: dict) -> dict:
    return {k: (str(v) if k in _TEXT_FIELDS and v is not None else v) for k, v in p.items() if isinstance(v, _SCALAR)}


@dataclass(frozen=True)
class RunInfo:
    """``run.json``, typed. Values of the wrong type read as absent (a hand-edited file still lists); the
    whole document stays in ``raw`` for what only some readers need (versions, stages, resumed, ...)."""

    run_id: str
    status: str = "unknown"  # as stored; the status to show is Run.status() (interrupted runs)
    schema_version: int = 1
    created_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    duration_s: float | None = None
    device: str | None = None
    config: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    error: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, doc, run_id: str) -> "RunInfo":
        if not isinstance(doc, dict):
            raise DamagedRun(f"{run_id}/{RUN_JSON} is not an object")
        version = doc.get("schema_version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise DamagedRun(f"{run_id}/{RUN_JSON}: schema_version {version!r} is newer than this code reads "
                             f"({SCHEMA_VERSION}); update wbc")
        doc = clean_meta(doc)
        err = doc.get("error")
        return cls(run_id=run_id, status=str(doc.get("status", "unknown")), schema_version=version,
                   created_at=_text(doc.get("created_at")), started_at=_text(doc.get("started_at")),
                   ended_at=_text(doc.get("ended_at")), duration_s=as_number(doc.get("duration_s")),
                   device=_text(doc.get("device")), config=_dict(doc.get("config")), data=_dict(doc.get("data")),
                   summary=_dict(doc.get("summary")), weights=_dict(doc.get("weights")),
                   error=err if isinstance(err, dict) else ({"message": str(err)} if err else None), raw=doc)

    @property
    def preset(self) -> str | None:
        return _text(self.config.get("preset"))

    @property
    def variants(self) -> list[str]:
        v = self.config.get("variants")
        return [str(x) for x in v] if isinstance(v, (list, tuple)) else []

    @property
    def test_source(self) -> str | None:
        return _text(self.data.get("test_source"))

    @property
    def cache_dir(self) -> str | None:
        return _text(self.config.get("cache_dir"))

    @property
    def error_message(self) -> str | None:
        return _text((self.error or {}).get("message")) if self.error else None

    @property
    def error_line(self) -> str | None:
        """The error as 'Type: message' (either alone where the other is missing), or None: the one wording
        of ``wbc report``, the dashboard's banners and its Runs detail."""
        if not self.error:
            return None
        kind, msg = _text(self.error.get("type")), self.error_message
        return f"{kind}: {msg}" if kind and msg else (msg or kind)

    def accuracy(self) -> dict:
        """{variant: seed-mean test accuracy}; with several image sizes {"variant@SIZEpx": ...} for every size."""
        by_size = self.summary.get("accuracy_by_size") or {}
        if isinstance(by_size, dict) and len(by_size) > 1:
            return {f"{v}@{z}px": a for z, accs in by_size.items() if isinstance(accs, dict) for v, a in accs.items()}
        acc = self.summary.get("accuracy", {})
        return acc if isinstance(acc, dict) else {}


@dataclass(frozen=True)
class Progress:
    """``progress.json``, typed: what a study is doing now, and its heartbeat."""

    stage: str | None = None
    stage_index: int | None = None
    stages: int | None = None
    done: float | None = None
    total: float | None = None
    percent: float | None = None
    message: str | None = None
    eta_s: float | None = None
    updated_at: str | None = None
    pid: int | None = None
    host: str | None = None

    @classmethod
    def from_json(cls, doc) -> "Progress":
        doc = _dict(doc)
        ints = {"stage_index", "stages", "pid"}
        nums = {"done", "total", "percent", "eta_s"}
        kw = {}
        for f in fields(cls):
            v = doc.get(f.name)
            kw[f.name] = (int(v) if as_number(v) is not None else None) if f.name in ints else \
                as_number(v) if f.name in nums else _text(v)
        return cls(**kw)

    def fraction_percent(self) -> float | None:
        """The percentage done: ``percent`` when given, else done/total."""
        if self.percent is not None:
            return self.percent
        return 100.0 * (self.done or 0) / self.total if self.total else None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


# -------------------------------------------------------------------------------------------- a run
@dataclass
class Run:
    """A handle on one run folder: typed reads (``info``, ``progress``, ``table``) and the writers a study uses."""

    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    def exists(self) -> bool:
        """Whether the run has written its run.json (a launched study's folder appears a moment later)."""
        return (self.path / RUN_JSON).is_file()

    # reads -------------------------------------------------------------------------------------------
    @property
    def info(self) -> RunInfo:
        """run.json, typed; :class:`DamagedRun` if it is missing or unreadable."""
        try:
            doc = json.loads((self.path / RUN_JSON).read_text())
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: arrays nested 100,000 deep
            raise DamagedRun(f"{self.run_id}/{RUN_JSON} unreadable ({type(e).__name__}: {first_line(e)})") from e
        return RunInfo.from_json(doc, self.run_id)

    @property
    def progress(self) -> Progress:
        return Progress.from_json(self.read_progress())

    def table(self, name: str | Table, columns: list[str] | None = None) -> pd.DataFrame:
        """A stored table in its schema's columns and dtypes (empty if absent; older runs' missing columns are
        nulls); a damaged file raises :class:`DamagedTable` naming it."""
        sch = schema(name)
        p = self.path / f"{sch.name}.parquet"
        if not p.exists():
            return sch.empty() if columns is None else sch.empty()[columns]
        try:
            df = _read_columns(p, columns)
        except Exception as e:
            raise DamagedTable(p, f"{type(e).__name__}: {first_line(e)[:160]}") from e
        try:
            df = sch.conform(df, strict=False)
        except ValueError as e:
            raise DamagedTable(p, str(e)) from None
        return df if columns is None else df[columns]

    def fingerprint(self, *names: str) -> tuple:
        """(mtime, size) of run.json/progress.json/``<table>.parquet`` files: a cache key that changes when they do."""
        files = [n if n in (RUN_JSON, PROGRESS_JSON) else f"{schema(n).name}.parquet" for n in names]
        return tuple(stat_key(self.path / f) for f in files)

    def status(self) -> str:
        """run.json's status, or ``interrupted`` (see :func:`effective_status`)."""
        return effective_status(self.read_meta(), self.read_progress())

    def log_tail(self, n: int = 20) -> list[str]:
        try:
            return (self.path / LOG_TXT).read_text().splitlines()[-n:]
        except OSError:
            return []

    def cancel_requested(self) -> bool:
        return (self.path / CANCEL_FILE).exists()

    # the raw documents (writers, and effective_status) -----------------------------------------------------
    def read_meta(self) -> dict:
        return json.loads((self.path / RUN_JSON).read_text())

    def read_progress(self) -> dict:
        try:
            doc = json.loads((self.path / PROGRESS_JSON).read_text())
        except (OSError, ValueError, RecursionError):
            return {}
        return doc if isinstance(doc, dict) else {}

    # writes ------------------------------------------------------------------------------------------
    def update_meta(self, **changes) -> dict:
        meta = self.read_meta() if (self.path / RUN_JSON).exists() else {}
        meta.update(changes)
        atomic_write_json(self.path / RUN_JSON, meta)
        return meta

    def write_table(self, name: str | Table, df: pd.DataFrame) -> Path:
        sch = schema(name)
        return atomic_write_parquet(self.path / f"{sch.name}.parquet", sch.conform(df))

    def write_progress(self, **progress) -> None:
        """progress.json with the heartbeat: this process's pid and host, and the time."""
        beat = {"updated_at": now_iso(), "pid": os.getpid(), "host": socket.gethostname()}
        atomic_write_json(self.path / PROGRESS_JSON, {**beat, **progress})

    def log(self, line: str) -> None:
        with open(self.path / LOG_TXT, "a") as f:
            f.write(f"{dt.datetime.now().strftime('%H:%M:%S')} {line}\n")

    def request_cancel(self) -> None:
        (self.path / CANCEL_FILE).touch()


def _read_columns(path: Path, columns: list[str] | None) -> pd.DataFrame:
    """Only ``columns`` when given (a table of feature vectors is large); all of them if the file lacks one."""
    if columns is not None:
        import pyarrow.parquet as pq

        have = set(pq.read_schema(path).names)
        return pd.read_parquet(path, columns=[c for c in columns if c in have])
    return pd.read_parquet(path)


class FollowerRun(Run):
    """The run as a torchrun rank other than 0 sees it: it reads what rank 0 writes and writes nothing, except
    :meth:`record_rank_error` (so that rank 0 can say which rank failed and why)."""

    def update_meta(self, **changes) -> dict:
        return {**self.read_meta(), **changes}

    def write_table(self, name: str | Table, df: pd.DataFrame) -> Path:
        return self.path / f"{schema(name).name}.parquet"

    def write_progress(self, **progress) -> None:
        pass

    def log(self, line: str) -> None:
        pass


def rank_error_file(run: Run, rank: int) -> Path:
    return run.path / f"{RANK_ERROR_PREFIX}{rank}.json"


def record_rank_error(run: Run, rank: int, error: BaseException) -> None:
    """A failing rank's last word (type and message), beside the run; rank 0 folds it into run.json's error."""
    atomic_write_json(rank_error_file(run, rank), {"rank": rank, "type": type(error).__name__, "message": str(error)})


def _rank_error_files(run: Run) -> list[Path]:
    return sorted(run.path.glob(f"{RANK_ERROR_PREFIX}*.json"))


def clear_rank_errors(run: Run) -> None:
    """Forget what failing ranks recorded (a resumed run starts a new attempt)."""
    for f in _rank_error_files(run):
        f.unlink(missing_ok=True)


def rank_errors(run: Run) -> list[dict]:
    """What failing ranks recorded (see :func:`record_rank_error`), by rank."""
    out = []
    for f in _rank_error_files(run):
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return sorted(out, key=lambda d: d.get("rank", 0) if isinstance(d.get("rank"), int) else 0)


@dataclass(frozen=True)
class RunEntry:
    """One folder of the store as listed: its run, typed info and effective status, or why it is unreadable."""

    run: Run
    info: RunInfo | None
    status: str
    warning: str | None = None

    @property
    def run_id(self) -> str:
        return self.run.run_id


LIST_COLUMNS = ["run_id", "status", "preset", "variants", "classifier", "test_set", "accuracy", "created_at",
                "seconds", "error", "warning"]


class RunStore:
    """All runs under one folder (``runs/`` by default, or ``WBC_RUNS_DIR``)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root else default_runs_dir()

    def create(self, config: dict, run_id: str | None = None) -> Run:
        """A new run folder. Creating the folder is the claim: of two creates of one id, exactly one wins."""
        run_id = check_run_id(run_id or new_run_id(config.get("preset", "custom")))
        path = self.root / run_id
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            raise FileExistsError(f"run {run_id} already exists in {self.root}; choose another --run-id, or "
                                  f"continue it with --resume {run_id}") from None
        run = Run(path)
        run.update_meta(run_id=run_id, schema_version=SCHEMA_VERSION, status=Status.QUEUED.value,
                        created_at=now_iso(), config=config)
        return run

    def get(self, run_id: str) -> Run:
        path = self.root / check_run_id(run_id)
        if not (path / RUN_JSON).exists():
            raise KeyError(f"no run {run_id!r} in {self.root}")
        return Run(path)

    def run_ids(self) -> list[str]:
        """Run folder names, newest first by creation time (``created_at`` in run.json; the folder's time when
        that is unreadable), not by name: a run named with ``--run-id`` sorts by when it was made. Hidden
        folders, like the launch lock's, are not runs."""
        if not self.root.is_dir():
            return []
        paths = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return [p.name for p in sorted(paths, key=lambda p: (_created(p), p.name), reverse=True)]

    def fingerprint(self) -> tuple:
        """A cache key of the whole listing: folder names and their run.json/progress.json (mtime, size)."""
        return tuple((rid, Run(self.root / rid).fingerprint(RUN_JSON, PROGRESS_JSON)) for rid in self.run_ids())

    def list(self) -> list[RunEntry]:
        """Every run folder, newest first; an unreadable one is listed with status ``unreadable`` and why."""
        out = []
        for rid in self.run_ids():
            run = Run(self.root / rid)
            try:
                info = run.info
                out.append(RunEntry(run, info, effective_status(info.raw, run.read_progress())))
            except Exception as e:  # DamagedRun, or anything else a hand-edited folder throws: listed, not fatal
                why = str(e) if isinstance(e, DamagedRun) else f"{rid}: {type(e).__name__}: {first_line(e)}"
                out.append(RunEntry(run, None, Status.UNREADABLE.value, why))
        return out

    def list_runs(self) -> pd.DataFrame:
        """:meth:`list` as a frame (``wbc runs``, the dashboard's run table): one row per run folder."""
        rows = []
        for e in self.list():
            i = e.info
            if i is None:
                rows.append({"run_id": e.run_id, "status": e.status, "warning": e.warning})
                continue
            rows.append({"run_id": e.run_id, "status": e.status, "preset": i.preset, "variants": ",".join(i.variants),
                         "classifier": _text(i.config.get("classifier")), "test_set": i.test_source,
                         "accuracy": i.accuracy(), "created_at": i.created_at, "seconds": i.duration_s,
                         "error": i.error_message, "warning": None})
        return pd.DataFrame(rows, columns=LIST_COLUMNS)
