"""Where things live: the repository, the run store, the cache, the known data locations. A leaf module."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_runs_dir() -> Path:
    """``WBC_RUNS_DIR`` if set, else ``runs/`` at the repository root."""
    return Path(os.environ.get("WBC_RUNS_DIR") or REPO_ROOT / "runs")


def default_cache_dir() -> Path:
    """Where enhanced images, converted weights, embeddings and thumbnails are cached.

    ``WBC_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/wbc`` (``~/.cache/wbc``).
    """
    if os.environ.get("WBC_CACHE_DIR"):
        return Path(os.environ["WBC_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "wbc"


# Known places where the team keeps the real images, tried after --data and WBC_DATA.
KNOWN_DATA_LOCATIONS: tuple[Path, ...] = (
    REPO_ROOT / "data" / "blood-cells",
    REPO_ROOT.parent / "shared" / "data" / "blood-cells",
    Path.home() / ".cache" / "wbc" / "data" / "blood-cells",
)


def path_arg(text: str) -> str:
    """An argparse ``type`` for a path flag: an empty value (``--runs-dir "$UNSET"``) is refused instead of
    silently meaning the default store or the current folder."""
    if not text.strip():
        import argparse

        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?); leave the flag out for the default")
    return text
