"""Which folders the dashboard may read images from and launch studies on.

* data roots: ``WBC_DATA_ROOTS`` (``os.pathsep``-separated), else the folder ``core.data.find_data_root()``
  finds, if any. The launcher only accepts data / test folders under one of them.
* image roots: the data roots, the cache (``default_cache_dir()``), the run store, and the ``enhanced/``
  folder of the ``--cache-dir`` each stored run was made with (from its run.json). The gallery reads
  (and thumbnails) no file outside them.

Paths are resolved (``..`` and symlinks followed) before the check, so ``root/../etc`` or a symlink
inside a root pointing elsewhere is refused.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from core.config import default_cache_dir, default_runs_dir


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
        except OSError:
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
    for extra in (default_cache_dir(), Path(store)):
        try:
            roots.append(Path(extra).resolve())
        except OSError:
            pass
    return tuple(roots)


@lru_cache(maxsize=8)
def run_cache_roots(store: str, _key) -> tuple[Path, ...]:
    """``<cache_dir>/enhanced`` of every stored run made with its own ``--cache-dir`` (enhanced images only)."""
    import json

    out = []
    for meta in Path(store).glob("*/run.json"):
        try:
            cache = (json.loads(meta.read_text()).get("config") or {}).get("cache_dir")
            if cache:
                out.append((Path(cache).expanduser() / "enhanced").resolve(strict=True))
        except (OSError, ValueError, AttributeError):
            continue
    return tuple(sorted(set(out)))


def _is_under(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def resolve_under(path: str | os.PathLike, roots: list[Path], what: str = "folder") -> Path:
    """``path`` resolved, if it lies under one of ``roots``; else ``PathNotAllowed`` with a clear message."""
    if path is None or str(path).strip() == "":
        raise PathNotAllowed(f"no {what} given")
    raw = Path(str(path)).expanduser()
    if not raw.is_absolute():
        raise PathNotAllowed(f"{what} {str(path)!r} must be an absolute path")
    try:
        p = raw.resolve(strict=True)
    except (OSError, RuntimeError):
        raise PathNotAllowed(f"{what} {str(path)!r} does not exist") from None
    for r in roots:
        if _is_under(p, r):
            return p
    shown = ", ".join(str(r) for r in roots) or "(none configured: set WBC_DATA_ROOTS)"
    if p != raw.absolute():
        raise PathNotAllowed(f"{what} {str(path)!r} resolves to {p}, outside the allowed roots: {shown}")
    raise PathNotAllowed(f"{what} {str(path)!r} is outside the allowed roots: {shown}")


def safe_data_folder(path) -> Path:
    p = resolve_under(path, data_roots(), "data folder")
    if not p.is_dir():
        raise PathNotAllowed(f"data folder {str(path)!r} is not a folder")
    return p
