"""Atomic file writes: the one helper every writer uses. A leaf module.

A file is written to a temporary name beside its destination, flushed and fsync'd, then renamed over the
destination (``os.replace``), so a reader sees the old file or the new one, never half of one, and a crash
leaves at most a ``.tmp`` file behind.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable


def stat_key(path: str | os.PathLike) -> tuple[int, int] | None:
    """(mtime in ns, size) of a file, or None if it cannot be read: a cache key that changes when the file does."""
    try:
        st = os.stat(path)
        return (st.st_mtime_ns, st.st_size)
    except OSError:
        return None


class NotAllowed(PermissionError):
    """A file a reader may not open: outside its folders, not a regular file, or too large (fail closed)."""


# A reader's images are kilobytes; a file this large named by a table is refused rather than read into memory.
MAX_READ_BYTES = 64 << 20


def read_within(path: str | os.PathLike, roots: Iterable[Path], max_bytes: int = MAX_READ_BYTES) -> bytes:
    """The bytes of the regular file ``path`` if the file actually opened lies under one of ``roots`` (resolved
    folders); else :class:`NotAllowed` (``OSError`` if it cannot be opened at all).

    The name is checked resolved (``..`` and links followed) before anything is opened, so a file outside is
    never opened; and the file actually opened is checked again on its descriptor: on Linux the kernel's path of
    the descriptor (``/proc/self/fd``), elsewhere the opened file must be the one the resolved name still points
    to. So a link swapped in between the check and the open cannot redirect the read. A FIFO or device is
    refused without blocking (opened non-blocking, then ``fstat``)."""
    roots = [Path(r) for r in roots]
    try:
        named = Path(os.fspath(path)).resolve(strict=True)
    except (TypeError, ValueError, RuntimeError):  # not a path, a NUL byte, a link loop
        raise NotAllowed(f"{str(path)[:200]!r} is not a usable path") from None
    if not is_under(named, roots):
        raise NotAllowed(f"{str(path)[:200]!r} is outside the folders this reader may open")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(named, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotAllowed(f"{str(path)[:200]!r} is not a regular file")
        real = _opened_path(fd, named, st)
        if real is None or not is_under(real, roots):
            raise NotAllowed(f"{str(path)[:200]!r} is outside the folders this reader may open")
        if st.st_size > max_bytes:
            raise NotAllowed(f"{str(path)[:200]!r} is larger than {max_bytes >> 20} MiB")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:  # it grew after the fstat
            raise NotAllowed(f"{str(path)[:200]!r} is larger than {max_bytes >> 20} MiB")
        return data
    finally:
        os.close(fd)


def is_under(p: Path, roots: Iterable[Path]) -> bool:
    """Whether the resolved path ``p`` is one of the resolved folders ``roots`` or lies inside one."""
    return any(p == r or r in p.parents for r in roots)


def real_folder(folder: Path) -> Path | None:
    """``folder`` resolved, if it is a folder and not itself a link (its parent may be reached through one): a
    link there must not make another folder this one (``enhanced -> /``, ``explain -> ~/.ssh``). None otherwise."""
    try:
        real = folder.resolve(strict=True)
        return real if real == folder.parent.resolve(strict=True) / folder.name and real.is_dir() else None
    except (OSError, RuntimeError, ValueError):
        return None


def _opened_path(fd: int, path, st: os.stat_result) -> Path | None:
    """The real path of the file open on ``fd``; None when it cannot be known for sure."""
    if sys.platform.startswith("linux"):
        try:
            return Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # no /proc mounted: the check below
            pass
    try:  # elsewhere: the resolved name must still name the very file that is open
        real = Path(path).resolve(strict=True)
        now = os.stat(real)
        return real if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) else None
    except (OSError, RuntimeError, ValueError):
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
