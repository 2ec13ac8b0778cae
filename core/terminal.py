"""Text from disk on a terminal: run.json, table cells and file names may hold control characters and newlines.

ESC starts terminal sequences that clear the screen or recolour text; BEL, CR and the C1 controls rewrite or hide
what was printed. Commands that quote run folders or scanned files print them through :data:`CONTROL_CHARS`.
"""

from __future__ import annotations

# C0 and C1 control characters and DEL, but tab and newline: each shows as "?"
CONTROL_CHARS = {c: "?" for c in (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)) if c not in (0x09, 0x0A)}


def one_line(text, limit: int, more: str = "") -> str:
    """``text`` (any value) on one line, runs of whitespace as one space, cut to at most ``limit`` characters
    (ending in ``more`` when it was cut): text from disk that must not start lines of its own or grow a table."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - len(more)] + more


class ControlFree:
    """A text stream that writes through to another with :data:`CONTROL_CHARS` replaced."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(text.translate(CONTROL_CHARS))

    def __getattr__(self, name):  # flush, fileno, isatty, encoding...
        return getattr(self._stream, name)
