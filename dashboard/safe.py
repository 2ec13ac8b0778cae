"""The one escaping helper: every value read from disk goes through ``esc`` before it reaches HTML.

Run folder names, run.json fields (status, notes, error, paths, device, ...), progress and log lines and the
strings in the Parquet tables (variant names, labels) are data, not markup: a store written by someone else, or
a damaged one, must not run script in the browser. ``esc`` HTML-escapes the value (``& < > " '``) and replaces
the characters Markdown gives a meaning to (emphasis, code, links / images, tables, headings, math) with
numeric character references, so its result shows as the same plain text in an HTML pane, a Markdown or Alert
pane, a Tabulator ``html`` cell or column title, and the gallery's captions.

In Markdown, wrap an escaped value in ``<code>…</code>``, not in backticks: a code span would show the
references themselves. Widgets that take plain text (Select options, Button names) need no escaping and must
not get it (they would show ``&lt;``).
"""

from __future__ import annotations

import html
import re

# quotes (html.escape's own would add '#'), then what markdown-it (gfm-like: tables, strikethrough, footnotes,
# emoji) and MathJax give a meaning to. Applied in one pass after html.escape(quote=False), whose output holds
# none of these characters.
_REFS = {ord(c): f"&#{ord(c)};" for c in "\"'\\`*_[]()!#|~$:^{}"}


def esc(value) -> str:
    """``value`` as text that no HTML or Markdown renderer interprets (``None`` is ``'None'``)."""
    return html.escape(str(value), quote=False).translate(_REFS)


def plain_markdown() -> None:
    """Markdown and Alert panes: no MathJax, no links made from bare text. Panel's Markdown renders to HTML
    (entities decoded back to ``$`` and ``\\``) and does not pass its ``disable_math`` on, so the browser typeset
    any ``$$...$$`` or ``\\(...\\)`` in a value read from disk (a run name, a file name) as TeX, ``\\href``
    included; and its parser's linkify turned an escaped ``www.example.com/login`` or ``a@b.com`` into a link. The
    dashboard shows no math and writes its own links as ``[text](url)``: every Markdown pane's model gets
    ``disable_math=True`` (as Panel's HTML pane has by default) and its parser ``linkify=False``. Called once when
    the app's modules load (idempotent)."""
    import panel as pn
    import param

    for cls in (pn.pane.Markdown, *param.concrete_descendents(pn.pane.Markdown).values()):  # Alert is one
        if cls._rename.get("disable_math") != "disable_math":
            cls._rename = {**cls._rename, "disable_math": "disable_math"}
        cls.param.disable_math.default = True
        cls.param.renderer_options.default = {**cls.param.renderer_options.default, "linkify": False}


# Bokeh typesets the text between these in a plot's title or axis label as TeX on its canvas (BokehJS
# parse_delimited_string): no DOM, so no script, but a variant named "$$\\frac{a}{b}$$" would be drawn as a formula.
_TEX_BREAK = re.compile(r"\$(?=\$)|\\(?=[\[\]()])")


def canvas_text(value) -> str:
    """``value`` as a Bokeh title or axis label drawn as typed: a zero-width space inside each TeX delimiter
    (``$$``, ``\\[``, ``\\(``, and their ends) stops Bokeh from typesetting it. Plot text read from disk (variant
    names) goes through it; widgets and HTML take :func:`esc` instead."""
    # every "$" before another "$" and every backslash before a bracket: runs like "$$$" leave no pair whole
    return _TEX_BREAK.sub(lambda m: m.group(0) + "\u200b", str(value))


def hv_title(value) -> str:
    """``value`` as a HoloViews ``title`` option drawn as typed: :func:`canvas_text`, and its braces doubled, since
    HoloViews fills ``{label}``-style fields in a title (a stored ``{x}`` raised KeyError and broke the page)."""
    return canvas_text(value).replace("{", "{{").replace("}", "}}")


def as_float(value) -> float | None:
    """A number read from disk as a float, or None when it is missing, NaN or not a number (never raises)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if x != x else x


plain_markdown()
