"""The run store: ``runs/<run_id>/`` with ``run.json``, ``progress.json``, ``log.txt`` and Parquet tables.

Every write is atomic (temporary file + ``os.replace``), so a reader never sees half a file and a
crash never damages another run. The schemas below are the contract between ``core`` and the dashboard.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
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


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def new_run_id(preset: str = "custom") -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{preset}-{secrets.token_hex(2)}"


def check_run_id(run_id: str) -> str:
    if not _RUN_ID_RE.match(run_id or "") or ".." in run_id:
        raise ValueError(f"invalid run id {run_id!r}")
    return run_id


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
        if name not in SCHEMAS:
            raise ValueError(f"unknown table {name!r}; choose from {', '.join(SCHEMAS)}")
        p = self.path / f"{name}.parquet"
        if not p.exists():
            return pd.DataFrame(columns=columns or SCHEMAS[name])
        return pd.read_parquet(p, columns=columns)

    def write_progress(self, **progress) -> None:
        atomic_write_json(self.path / PROGRESS_JSON, {"updated_at": now_iso(), **progress})

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

    def request_cancel(self) -> None:
        (self.path / CANCEL_FILE).touch()

    def cancel_requested(self) -> bool:
        return (self.path / CANCEL_FILE).exists()


class RunStore:
    """All runs under one folder (``runs/`` by default, or ``WBC_RUNS_DIR``)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root else default_runs_dir()

    def create(self, config: dict, run_id: str | None = None) -> Run:
        run_id = check_run_id(run_id or new_run_id(config.get("preset", "custom")))
        path = self.root / run_id
        if (path / RUN_JSON).exists():
            raise FileExistsError(f"run {run_id} already exists in {self.root}")
        path.mkdir(parents=True, exist_ok=True)
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
                    "status": meta.get("status", "unknown"),
                    "preset": cfg.get("preset"),
                    "variants": ",".join(cfg.get("variants", [])),
                    "classifier": cfg.get("classifier"),
                    "test_set": (meta.get("data") or {}).get("test_source"),
                    "accuracy": (meta.get("summary") or {}).get("accuracy", {}),
                    "created_at": meta.get("created_at"),
                    "seconds": meta.get("duration_s"),
                    "error": (meta.get("error") or {}).get("message") if meta.get("error") else None,
                    "warning": None,
                })
            except Exception as e:
                rows.append({"run_id": rid, "status": "unreadable", "warning": f"{type(e).__name__}: {e}"})
        return pd.DataFrame(rows, columns=["run_id", "status", "preset", "variants", "classifier", "test_set",
                                           "accuracy", "created_at", "seconds", "error", "warning"])
