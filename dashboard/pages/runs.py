"""Runs: every run in the store; pick one, or two to compare. Failed runs show their error."""

from __future__ import annotations

import pandas as pd
import panel as pn

from core.store import Metric, StatKind, Status, Table
from dashboard.data import list_runs, load_table, read_info, read_meta, run_state
from dashboard.pages.base import Page
from dashboard.pages.common import WRAP_CELLS, interval, warnings_alert, warnings_md
from dashboard.safe import esc

COLUMNS = ["run_id", "status", "preset"]  # then accuracy and Δ (the columns read most), then AFTER and "when"
AFTER = ["classifier", "test_set"]  # the variants are named in the accuracy column
# The paired difference with its group-bootstrap CI: McNemar's p counts copies of one cell as independent, so the
# Runs table does not show it (Overview shows it beside the group sign-flip p, with that caveat)
DELTA = "Δ vs baseline [95% CI]"
ACC = "accuracy [95% CI]"  # each variant's accuracy; a failed run's reason, or a pending run's variants


def _acc_cells(state, df: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Per run: each (variant, image size)'s accuracy [95% CI] (the seed mean and its own CI with several
    seeds; core.stats.model_summary), and the paired difference vs the baseline with its 95% CI."""
    from core.stats import model_summary

    acc_col, paired_col = [], []
    for i, rid in enumerate(df["run_id"]):
        finished = df["status"].iloc[i] == Status.FINISHED
        stats, _ = load_table(state.run_dir(rid), Table.STATS) if finished else (None, None)
        acc, paired = model_summary(stats), model_summary(stats, Metric.ACCURACY_DIFF, kind=StatKind.PAIRED)
        order = str(df["variants"].iloc[i] or "").split(",")
        acc = acc.assign(_o=[order.index(v) if v in order else len(order) for v in acc["variant"]]).sort_values(
            ["_o", "image_size"], kind="stable")
        many = acc["image_size"].nunique() > 1
        acc_col.append("<br>".join(f"{esc(r.variant)}{f' @{esc(r.image_size)}px' if many else ''}: {_num(r.estimate)}"
                                   + (f" {interval(_num(r.ci_low), _num(r.ci_high))}" if r.ci_low == r.ci_low else "")
                                   + (f" (mean of {esc(r.n_seeds)} seeds)" if r.n_seeds > 1 else "")
                                   for r in acc.itertuples()) or _summary_cell(df, i))
        paired_col.append("<br>".join(
            f"{esc(r.variant)}{f' @{esc(r.image_size)}px' if many else ''}: {_num(r.estimate, '+')}"
            + (f" {interval(_num(r.ci_low, '+'), _num(r.ci_high, '+'))}" if r.ci_low == r.ci_low and r.ci_high == r.ci_high
               else "")
            for r in paired.itertuples())
            or ("— (one variant)" if finished and acc["variant"].nunique() == 1 else ""))  # nothing to compare
    return acc_col, paired_col


def _why_cell(error, warning, status=None) -> str:
    """'error: ...' (or the warning) in red, escaped, for a row with no accuracy to show; '' for neither.
    A cancelled run's reason ('cancelled by user') is not an error: it shows in grey, as 'stopped: ...'."""
    for word, text in (("error", error), ("warning", warning)):
        if isinstance(text, str) and text.strip():
            short = text if len(text) <= 90 else text[:89] + "…"
            word, colour = ("stopped", "#666") if word == "error" and status == Status.CANCELLED else (word, "#d62728")
            return f'<span style="color: {colour}; white-space: normal">{word}: {esc(short)}</span>'
    return ""


def _num(x, sign: str = "") -> str:
    """x to 3 decimals (``sign="+"``: signed), "?" for a missing value; anything else escaped, as it is."""
    try:
        return f"{float(x):{sign}.3f}" if x is not None and x == x else "?"
    except (TypeError, ValueError):  # a hand-edited run.json: show it, escaped, never crash
        return esc(x)


def _path_cell(text) -> str:
    """A test set's name and folder, escaped, free to wrap after each "/" (not inside a folder's name)."""
    return esc(text).replace("/", "/<wbr>") if isinstance(text, str) else ""


def _pending_cell(variants) -> str:
    """No accuracy and no error (queued, running): the run's variants ("a,b" as listed), each with a dash."""
    return "<br>".join(f"{esc(v)}: —" for v in str(variants or "").split(",") if v)


def _summary_cell(df: pd.DataFrame, i: int) -> str:
    """No stats (running, failed, older runs): run.json's summary accuracy, without a CI."""
    accs = [c for c in df.columns if c.startswith("acc ")]
    return "<br>".join(f"{esc(c[4:])}: {_num(df[c].iloc[i])}" for c in accs
                       if df[c].iloc[i] is not None and df[c].iloc[i] == df[c].iloc[i])


def _when_cell(date, duration) -> str:
    """The date and, under it, how long the run took: 'took 7m 39s' (a bare '7 min 39 s' under the date read as a
    time of day). Either may be missing (NaN): left out."""
    lines = [date] if isinstance(date, str) and date else []
    if isinstance(duration, str) and duration:
        lines.append(f"took {duration}")
    return "<br>".join(esc(x) for x in lines)


def runs_frame(state, listing: pd.DataFrame | None = None):
    """The Runs table from the store's listing (``dashboard.data.list_runs``; read here unless given)."""
    df = (list_runs(state.runs_dir) if listing is None else listing).copy()
    accs = [c for c in df.columns if c.startswith("acc ")]
    out = df[COLUMNS + ["variants"] + accs + AFTER + ["date", "duration", "error", "warning"]].copy()
    acc_cells, paired = _acc_cells(state, out)
    out = out.drop(columns=accs)
    # a failed or unreadable run says why under its accuracy (if any), where it shows without scrolling sideways;
    # clicking the row shows the whole error
    # nothing to show yet (queued, running): the run's variants, each with a dash
    acc_cells = ["<br>".join(x for x in (cell, _why_cell(err, warn, status)) if x) or _pending_cell(variants)
                 for cell, err, warn, status, variants in zip(acc_cells, out["error"], out["warning"], out["status"],
                                                              out["variants"])]
    # the date and how long it took in one column: the table fits a 1400 px window without scrolling sideways
    out["when"] = [_when_cell(d, t) for d, t in zip(out["date"], out["duration"])]
    out = out.drop(columns=["error", "warning", "variants", "date", "duration"])
    out.insert(len(COLUMNS), ACC, acc_cells)
    out.insert(len(COLUMNS) + 1, DELTA, paired)
    out["test_set"] = [_path_cell(t) for t in out["test_set"]]
    out["status"] = [f'<span style="{_style_status(s)}">{esc(s)}</span>' for s in out["status"].astype(str)]
    return out


def config_diff(meta_a: dict, meta_b: dict) -> list[tuple[str, str, str]]:
    """(setting, value in A, value in B) for every setting that differs between two runs' run.json:
    the config, and for each enhancer its weights (sha256) and precision."""
    def flat(meta: dict) -> dict:
        out = {k: v for k, v in (meta.get("config") or {}).items() if k not in ("notes", "preset", "runs_dir")}
        for v, prov in ((meta.get("weights") or {}).get("enhancers") or {}).items():
            if prov.get("sha256"):
                out[f"{v} weights"] = prov["sha256"][:16]
            if prov.get("precision"):
                out[f"{v} precision"] = prov["precision"]
        out["device"] = meta.get("device")
        for k, v in (meta.get("versions") or {}).items():
            out[f"version: {k}"] = v
        return out

    a, b = flat(meta_a), flat(meta_b)
    return [(k, str(a.get(k)), str(b.get(k))) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _style_status(v):
    colors = {Status.FINISHED: "#2ca02c", Status.FAILED: "#d62728", Status.RUNNING: "#1f77b4",
              Status.QUEUED: "#7f7f7f", Status.CANCELLED: "#ff7f0e", Status.INTERRUPTED: "#ff7f0e",
              Status.UNREADABLE: "#d62728"}
    c = colors.get(v)
    return f"color: {c}; font-weight: 600" if c else ""


class RunsPage(Page):
    title = "Runs"
    css = "wbc-page-runs"

    def layout(self) -> list:
        wrap = {"type": "textarea"}  # plain text (Tabulator escapes it) that wraps within the column's width
        formatters = {"status": {"type": "html"}, ACC: {"type": "html"},
                      DELTA: {"type": "html"}, "when": {"type": "html"},
                      "classifier": wrap, "test_set": {"type": "html"}}
        listing = list_runs(self.state.runs_dir)
        self.table = pn.widgets.Tabulator(
            runs_frame(self.state, listing), show_index=False, formatters=formatters, selectable=2, disabled=True,
            pagination="local", page_size=15, sizing_mode="stretch_width", css_classes=["wbc-runs-table"],
            # the columns share the page's width (no sideways scrolling at 1400 px) and long cells wrap
            layout="fit_columns", header_filters=False, frozen_columns=["run_id"],
            # a narrow window scrolls sideways (the run id stays) rather than squeezing the accuracy to a letter a line
            configuration={"columns": [{"field": ACC, "minWidth": 210}]},
            titles={"test_set": "test set"},
            # every column but the accuracy has a width; the accuracy takes what is left (wider or narrower windows)
            widths={"run_id": 140, "status": 80, "preset": 80, DELTA: 150, "classifier": 125,
                    "test_set": 110, "when": 100},
            # the selected row is dark: its coloured status text turns white to stay readable
            stylesheets=[".tabulator-row.tabulator-selected span { color: #fff !important; }",
                         # a long cell (run id, several seeds or sizes, an error) wraps instead of being cut off
                         *WRAP_CELLS])
        # both chosen rows are selected (blue); the compared one also has an orange edge on its run id
        self.table.style.apply(self.compare_edge, axis=1)
        help_md = pn.pane.Markdown(
            "Click a row to analyse that run; Ctrl-click (⌘-click on a Mac) a second row to compare the two (the "
            "first stays the main run; the compared one has an orange edge), or pick it under *Compare with*. Unreadable folders (no or damaged "
            "`run.json`) are listed with a warning and ignored.",
            sizing_mode="stretch_width")
        self.warn = warnings_alert([])
        self.detail = pn.Column(sizing_mode="stretch_width", css_classes=["wbc-run-detail"])
        refresh = pn.widgets.Button(name="Refresh", button_type="default", width=100, css_classes=["wbc-refresh"])
        refresh.on_click(lambda e: self.state.param.update(refresh=self.state.refresh + 1))
        self._syncing = False
        self.table.param.watch(self.on_select, "selection")
        self.state.param.watch(lambda *_: self.when_shown(self.update_table), "refresh")
        self.state.param.watch(lambda *_: self.when_shown(self.sync_selection), ["run_id", "compare_run_id"])
        self.show_listing(listing)
        return [pn.Row(help_md, refresh), self.warn, self.table, self.detail]

    def update_table(self) -> None:
        listing = list_runs(self.state.runs_dir)
        self.table.value = runs_frame(self.state, listing)
        self.show_listing(listing)

    def show_listing(self, listing: pd.DataFrame) -> None:
        """The warning for unreadable folders, and the selection, for the listing the table was built from."""
        bad = listing[listing["status"] == Status.UNREADABLE]
        ws = [f"{r.run_id}: unreadable run folder ({r.warning})" for r in bad.itertuples()]
        self.warn.object = warnings_md(ws)
        self.warn.visible = bool(ws)
        self.sync_selection()

    def sync_selection(self) -> None:
        """The table's selection follows the state (main run first, then the compared one)."""
        ids = list(self.table.value["run_id"])
        sel = [ids.index(r) for r in (self.state.run_id, self.state.compare_run_id) if r in ids]
        self._syncing = True
        try:
            self.table.selection = sel
            if len(ids):  # the styles follow a patch: patching the run ids with themselves redraws the edge
                self.table.patch({"run_id": list(enumerate(ids))})
        finally:
            self._syncing = False
        self.detail.objects = self.detail_parts()

    def compare_edge(self, row: pd.Series) -> list[str]:
        """The compared run's row: an orange edge on its run id cell (pandas Styler, one style per cell)."""
        edge = row.get("run_id") == self.state.compare_run_id and self.state.compare_run_id is not None
        return ["border-left: 6px solid #e6550d" if edge and c == "run_id" else "" for c in row.index]

    def on_select(self, event) -> None:
        if self._syncing:
            return
        ids = [self.table.value["run_id"].iloc[i] for i in event.new if i < len(self.table.value)]
        old = [i for i in (self.state.run_id, self.state.compare_run_id) if i]
        ordered = [i for i in old if i in ids] + [i for i in ids if i not in old]  # the main run stays first
        self.state.param.update(run_id=ordered[0] if ordered else None,
                                compare_run_id=ordered[1] if len(ordered) > 1 else None)

    def detail_parts(self) -> list:
        items = []
        for rid, role in ((self.state.run_id, "Main run"), (self.state.compare_run_id, "Compared with")):
            if rid:
                items += run_detail(self.state.run_dir(rid), rid, role)
        if self.state.run_id and self.state.compare_run_id:
            items.append(diff_pane(read_meta(self.state.run_dir(self.state.run_id))[0],
                                   read_meta(self.state.run_dir(self.state.compare_run_id))[0]))
        return items


def run_detail(run_dir, rid: str, role: str) -> list:
    """A run's settings in one line, its error with the traceback, and skipped images."""
    info, w = read_info(run_dir)
    if w:
        return [pn.pane.Alert(f"**{role} <code>{esc(rid)}</code>**: {esc(w)}", alert_type="warning")]
    meta, cfg = info.raw, info.config
    status, _, _ = run_state(run_dir)
    items = [pn.pane.Markdown(
        f"**{role}: <code>{esc(rid)}</code>** — status **{esc(status)}**, preset {esc(cfg.get('preset'))}, "
        f"{esc(cfg.get('classifier'))} ({esc(cfg.get('pretrained'))}), variants "
        f"{esc(', '.join(map(str, cfg.get('variants') or [])))}, epochs {esc(cfg.get('epochs'))}, seeds "
        f"{esc(cfg.get('seeds'))}, test set {esc((meta.get('data') or {}).get('test_source'))}, device "
        f"{esc(meta.get('device'))}", sizing_mode="stretch_width")]
    if info.error:
        tb = esc(str(info.error.get("traceback") or ""))
        stopped = status == Status.CANCELLED  # a cancel is not a failure: say so, in a warning's colour
        items.append(pn.pane.Alert(
            f"**Run {'stopped' if stopped else 'failed'}: {esc(info.error_line)}**"
            + (f"<details><summary>traceback</summary><pre>{tb}</pre></details>" if tb else ""),
            alert_type="warning" if stopped else "danger", css_classes=["wbc-run-error"], sizing_mode="stretch_width"))
    if meta.get("skipped"):
        items.append(pn.pane.Markdown(f"{len(meta['skipped'])} unreadable image(s) were skipped."))
    return items


def diff_pane(meta_a: dict, meta_b: dict) -> pn.pane.Markdown:
    diff = config_diff(meta_a, meta_b)
    rows = "\n".join(f"| {esc(k)} | <code>{esc(a)}</code> | <code>{esc(b)}</code> |" for k, a, b in diff)
    return pn.pane.Markdown(
        "**What differs between the two runs**\n\n| setting | main | compared |\n|---|---|---|\n" + rows
        if diff else "**The two runs have the same settings, weights and versions.**",
        css_classes=["wbc-config-diff"], sizing_mode="stretch_width")
