"""Progress callbacks and human-readable durations (progress lines, run lists, ETAs). A leaf module."""

from __future__ import annotations

from typing import Callable

# on_progress(done, total, message): every long loop in core reports through this one signature.
ProgressFn = Callable[[int, int, str], None]


def _seconds(s) -> float | None:
    try:
        s = float(s)
    except (TypeError, ValueError):
        return None
    return None if s != s or s < 0 or s == float("inf") else s


def fmt_duration(s, unknown: str = "—", short: bool = False) -> str:
    """Seconds as '45 s', '2 min 05 s' or '1 h 02 min' (``short``: '45s', '2m 05s', '1h 02m', for narrow table
    cells); ``unknown`` for None, NaN or negative values."""
    s = _seconds(s)
    if s is None:
        return unknown
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    hu, mu, su = ("h", "m", "s") if short else (" h", " min", " s")
    if h:
        return f"{h}{hu} {m:02d}{mu}"
    return f"{m}{mu} {sec:02d}{su}" if m else f"{sec}{su}"
