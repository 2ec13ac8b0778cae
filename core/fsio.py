"""Atomic file writes: the one helper every writer uses. A leaf module.

A file is written to a temporary name beside its destination, flushed and fsync'd, then renamed over the
destination (``os.replace``), so a reader sees the old file or the new one, never half of one, and a crash
leaves at most a ``.tmp`` file behind.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from pathlib import Path
from typing import Any, Callable


def stat_key(path: str | os.PathLike) -> tuple[int, int] | None:
    """(mtime in ns, size) of a file, or None if it cannot be read: a cache key that changes when the file does."""
    try:
        st = os.stat(path)
        return (st.st_mtime_ns, st.st_size)
    except OSError:
        return None


def temp_path(path: Path) -> Path:
    """A hidden temporary name beside ``path``, unique per process, thread and call."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(3)}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to produce the file at a temporary path, fsync it and move it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_bytes(path, json.dumps(obj, indent=indent, default=str).encode())


def atomic_write_parquet(path: str | os.PathLike, df) -> Path:
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
