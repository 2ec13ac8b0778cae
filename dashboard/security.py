"""Which folders the dashboard may read images from and launch studies on.

* data roots: ``WBC_DATA_ROOTS`` (``os.pathsep``-separated), else the folder ``core.data.find_data_root()``
  finds, if any. The launcher only accepts data / test folders under one of them.
* image roots: the data roots, the cache (``default_cache_dir()``), the run store, and the ``enhanced/``
  folder of the ``--cache-dir`` each stored run was made with (from its run.json). The gallery reads
  (and thumbnails) no file outside them.

Paths are resolved (``..`` and symlinks followed) before the check, so ``root/../etc`` or a symlink
inside a root pointing elsewhere is refused. An image is read only through :func:`read_image`, which checks the
file it has open (``core.fsio.read_within``), so a link swapped in after a check cannot redirect the read. The
roots themselves are resolved real folders, and a run's ``enhanced/`` that is a symlink is no root at all (a link
must never widen them). Every check fails closed:
an error while computing a root drops that root, an error while checking a path refuses the path.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from core.config import default_cache_dir, default_runs_dir
from core.fsio import is_under, read_within, real_folder
from core.store import RunStore


class PathNotAllowed(ValueError):
    pass


def data_roots() -> list[Path]:
    return list(_data_roots(os.environ.get("WBC_DATA_ROOTS"), os.environ.get("WBC_DATA")))


@lru_cache(maxsize=8)
def _data_roots(env: str | None, _wbc_data: str | None) -> tuple[Path, ...]:
    if env:
        roots = [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]
    else:
        try:
            from core.data import find_data_root

            roots = [find_data_root()]
        except Exception:
            roots = []
    out = []
    for r in roots:
        try:
            out.append(r.resolve(strict=True))
        except Exception:
            continue
    return tuple(out)


def image_roots(runs_dir: str | os.PathLike | None = None) -> list[Path]:
    store = Path(runs_dir) if runs_dir else default_runs_dir()
    try:
        key = store.stat().st_mtime_ns  # a new run folder changes the store's mtime
    except OSError:
        key = None
    return [*_image_roots(os.environ.get("WBC_DATA_ROOTS"), os.environ.get("WBC_CACHE_DIR"), str(store)),
            *run_cache_roots(str(store), key)]


@lru_cache(maxsize=8)
def _image_roots(_env, _cache, store: str) -> tuple[Path, ...]:
    roots = list(data_roots())
    for extra in (default_cache_dir, lambda: store):
        try:
            roots.append(Path(extra()).resolve())
        except Exception:
            pass
    return tuple(roots)


@lru_cache(maxsize=8)
def run_cache_roots(store: str, _key) -> tuple[Path, ...]:
    """``<cache_dir>/enhanced`` of every stored run made with its own ``--cache-dir`` (enhanced images only)."""
    try:
        caches = [e.info.cache_dir for e in RunStore(store).list() if e.info is not None]
    except Exception:
        return ()
    return tuple(sorted({r for r in map(_enhanced_root, caches) if r is not None}))


def _enhanced_root(cache: str | None) -> Path | None:
    """A run's ``<cache_dir>/enhanced`` as a resolved real folder; None if there is none, or if ``enhanced`` is
    a symlink (``enhanced -> /`` would make every file an image)."""
    try:
        if not cache:
            return None
        return real_folder(Path(cache).expanduser().resolve(strict=True) / "enhanced")
    except Exception:
        return None


def resolve_under(path: str | os.PathLike, roots: list[Path], what: str = "folder") -> Path:
    """``path`` resolved, if it lies under one of ``roots``; else ``PathNotAllowed`` with a clear message."""
    if path is None or str(path).strip() == "":
        raise PathNotAllowed(f"no {what} given")
    try:
        raw = Path(str(path)).expanduser()
    except Exception:
        raise PathNotAllowed(f"{what} {str(path)!r} is not a usable path") from None
    if not raw.is_absolute():
        raise PathNotAllowed(f"{what} {str(path)!r} must be an absolute path")
    try:
        p = raw.resolve(strict=True)
    except Exception:  # missing, a symlink loop, a NUL byte: refused
        raise PathNotAllowed(f"{what} {str(path)!r} does not exist") from None
    if is_under(p, roots):
        return p
    shown = ", ".join(str(r) for r in roots) or "(none configured: set WBC_DATA_ROOTS)"
    if p != raw.absolute():
        raise PathNotAllowed(f"{what} {str(path)!r} resolves to {p}, outside the allowed roots: {shown}")
    raise PathNotAllowed(f"{what} {str(path)!r} is outside the allowed roots: {shown}")


def is_allowed_image(path, runs_dir=None) -> bool:
    """True if ``path`` resolves under an image root; any error is a refusal."""
    try:
        p = Path(path).resolve(strict=True)
        return is_under(p, image_roots(runs_dir))
    except Exception:
        return False


def read_image(path, runs_dir=None) -> bytes:
    """The bytes of an image file under an image root, checked on the file it has open: ``NotAllowed`` (a
    ``PermissionError``) for a file outside them, not a regular file or not a path; ``OSError`` for one that
    cannot be opened (missing)."""
    return read_within(path, image_roots(runs_dir))


def safe_data_folder(path) -> Path:
    p = resolve_under(path, data_roots(), "data folder")
    if not p.is_dir():
        raise PathNotAllowed(f"data folder {str(path)!r} is not a folder")
    return p
