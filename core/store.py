"""The run store: ``runs/<run_id>/`` with ``run.json``, ``progress.json``, ``log.txt`` and Parquet tables.

Every write is atomic (temporary file + ``os.replace``), so a reader never sees half a file and a
crash never damages another run. The schemas below are the contract between ``core`` and the dashboard.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from core.config import CLASSES, PROB_COLUMNS, default_runs_dir
from core.regions import BOX_COLUMNS

RUN_JSON = "run.json"
PROGRESS_JSON = "progress.json"
LOG_TXT = "log.txt"
CANCEL_FILE = "CANCEL"

# Table name -> ordered columns. seed and image_size identify one trained model within a variant.
KEYS = ["variant", "seed", "image_size"]
# The region of the original image the model saw (core.regions; null in runs made before input policies),
# and why the policy was not applied as asked (e.g. "no stained nucleus found: centre crop").
_PRED = ["image_id", "path", "enhanced_path", "true_label", "pred_label", "correct", *PROB_COLUMNS, "group_id",
         *BOX_COLUMNS, "region_note"]
SCHEMAS: dict[str, list[str]] = {
    "predictions": KEYS + _PRED,
    "misclassified": KEYS + _PRED,
    "metrics": KEYS + ["label", "precision", "recall", "f1", "support"],
    "confusion": KEYS + ["true_label", "pred_label", "count"],
    "history": KEYS + ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1", "lr", "seconds"],
    # Each model's validation figures at its best (restored) epoch: the number the paper reports. split is
    # "grouped" (no source cell on both sides) or "random" (leaky: near-copies of training cells).
    "validation": KEYS + ["split", "leaky", "best_epoch", "selected_by", "val_accuracy", "val_macro_f1",
                          "val_loss", "n_val", "val_groups_disjoint"],
    # kind: "ci" (per variant/seed: bootstrap CI), "paired" (variant vs baseline on the same images: accuracy
    # difference with CI, exact McNemar p_value, detail = JSON {"b": .., "c": ..}), "seeds" (seed = -1:
    # estimate = mean over seeds, sd = standard deviation, detail = JSON list of per-seed values).
    "stats": ["kind", "variant", "baseline", "seed", "image_size", "metric", "estimate", "sd", "ci_low",
              "ci_high", "p_value", "n", "detail"],
    # Which images trained, validated and tested each model (role: train | val | test).
    "splits": KEYS + ["image_id", "role", "label", "group_id"],
    "skipped": ["path", "split", "error"],
}
METRIC_LABELS = [*CLASSES, "accuracy", "macro avg", "weighted avg"]
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# The run lifecycle. A study refreshes its heartbeat every HEARTBEAT_EVERY_S seconds (and on each progress
# update); a heartbeat older than HEARTBEAT_STALE_S means the study is gone (killed, machine down, hung).
HEARTBEAT_EVERY_S = 10.0
HEARTBEAT_STALE_S = 120.0
LIVE_STATUSES = ("queued", "running")
INTERRUPTED = "interrupted"
RESUMABLE_STATUSES = (INTERRUPTED, "failed", "cancelled")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def new_run_id(preset: str = "custom") -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{preset}-{secrets.token_hex(2)}"


def check_run_id(run_id: str) -> str:
    if not _RUN_ID_RE.match(run_id or "") or ".." in run_id:
        raise ValueError(f"invalid run id {run_id!r}")
    return run_id


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
        raise ValueError(f"{what} {folder}: not writable ({e.strerror or type(e).__name__})") from None
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
    if status not in LIVE_STATUSES:
        return status
    progress = progress if isinstance(progress, dict) else {}
    pid = progress.get("pid", meta.get("pid"))
    host = progress.get("host", meta.get("host"))
    if pid is not None and host in (None, socket.gethostname()) and not pid_alive(pid):
        return INTERRUPTED
    age = heartbeat_age(progress, now)
    if age is None and pid is None:
        age = heartbeat_age({"updated_at": meta.get("created_at")}, now)
    return INTERRUPTED if age is not None and age > HEARTBEAT_STALE_S else status


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=str).encode())


def atomic_write_parquet(path: Path, df: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def conform(name: str, df: pd.DataFrame) -> pd.DataFrame:
    """Columns of ``df`` in the schema's order; missing columns are added as nulls, extras are refused."""
    cols = SCHEMAS[name]
    extra = [c for c in df.columns if c not in cols]
    if extra:
        raise ValueError(f"{name}: columns not in the schema: {extra}")
    out = df.copy()
    for c in cols:
        if c not in out.columns:
            out[c] = pd.Series([None] * len(out), dtype="object")
    return out[cols].reset_index(drop=True)


@dataclass
class Run:
    """A handle on one run folder."""

    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    def read_meta(self) -> dict:
        return json.loads((self.path / RUN_JSON).read_text())

    def update_meta(self, **changes) -> dict:
        meta = self.read_meta() if (self.path / RUN_JSON).exists() else {}
        meta.update(changes)
        atomic_write_json(self.path / RUN_JSON, meta)
        return meta

    def write_table(self, name: str, df: pd.DataFrame) -> Path:
        p = self.path / f"{name}.parquet"
        atomic_write_parquet(p, conform(name, df))
        return p

    def read_table(self, name: str, columns: list[str] | None = None) -> pd.DataFrame:
        """A stored table (empty with the schema's columns if absent); a damaged file raises
        :class:`DamagedTable` naming it."""
        if name not in SCHEMAS:
            raise ValueError(f"unknown table {name!r}; choose from {', '.join(SCHEMAS)}")
        p = self.path / f"{name}.parquet"
        if not p.exists():
            return pd.DataFrame(columns=columns or SCHEMAS[name])
        try:
            return pd.read_parquet(p, columns=columns)
        except Exception as e:
            raise DamagedTable(f"{p}: cannot be read ({type(e).__name__}: {_first_line(e)})") from e

    def write_progress(self, **progress) -> None:
        """progress.json with the heartbeat: this process's pid and host, and the time."""
        beat = {"updated_at": now_iso(), "pid": os.getpid(), "host": socket.gethostname()}
        atomic_write_json(self.path / PROGRESS_JSON, {**beat, **progress})

    def read_progress(self) -> dict:
        try:
            return json.loads((self.path / PROGRESS_JSON).read_text())
        except (OSError, ValueError):
            return {}

    def log(self, line: str) -> None:
        with open(self.path / LOG_TXT, "a") as f:
            f.write(f"{dt.datetime.now().strftime('%H:%M:%S')} {line}\n")

    def log_tail(self, n: int = 20) -> list[str]:
        try:
            return (self.path / LOG_TXT).read_text().splitlines()[-n:]
        except OSError:
            return []

    def status(self) -> str:
        """run.json's status, or ``interrupted`` (see :func:`effective_status`)."""
        return effective_status(self.read_meta(), self.read_progress())

    def request_cancel(self) -> None:
        (self.path / CANCEL_FILE).touch()

    def cancel_requested(self) -> bool:
        return (self.path / CANCEL_FILE).exists()


class DamagedTable(Exception):
    """A stored table that exists but cannot be read (truncated, not Parquet)."""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _summary_accuracy(summary: dict) -> dict:
    """{variant: seed-mean accuracy}; with several image sizes {"variant@SIZEpx": ...} for every size."""
    by_size = summary.get("accuracy_by_size") or {}
    if isinstance(by_size, dict) and len(by_size) > 1:
        return {f"{v}@{z}px": a for z, accs in by_size.items() if isinstance(accs, dict) for v, a in accs.items()}
    return summary.get("accuracy", {})


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
        run.update_meta(run_id=run_id, status="queued", created_at=now_iso(), config=config)
        return run

    def get(self, run_id: str) -> Run:
        path = self.root / check_run_id(run_id)
        if not (path / RUN_JSON).exists():
            raise KeyError(f"no run {run_id!r} in {self.root}")
        return Run(path)

    def run_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted((p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      reverse=True)

    def list_runs(self) -> pd.DataFrame:
        """One row per run folder; an unreadable folder gives a row with status 'unreadable' and a warning."""
        rows = []
        for rid in self.run_ids():
            p = self.root / rid
            try:
                meta = json.loads((p / RUN_JSON).read_text())
                cfg = meta.get("config", {})
                rows.append({
                    "run_id": rid,
                    "status": effective_status(meta, Run(p).read_progress()),
                    "preset": cfg.get("preset"),
                    "variants": ",".join(cfg.get("variants", [])),
                    "classifier": cfg.get("classifier"),
                    "test_set": (meta.get("data") or {}).get("test_source"),
                    "accuracy": _summary_accuracy(meta.get("summary") or {}),
                    "created_at": meta.get("created_at"),
                    "seconds": meta.get("duration_s"),
                    "error": (meta.get("error") or {}).get("message") if meta.get("error") else None,
                    "warning": None,
                })
            except Exception as e:
                rows.append({"run_id": rid, "status": "unreadable", "warning": f"{type(e).__name__}: {e}"})
        return pd.DataFrame(rows, columns=["run_id", "status", "preset", "variants", "classifier", "test_set",
                                           "accuracy", "created_at", "seconds", "error", "warning"])
