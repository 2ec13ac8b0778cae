"""The per-session application state shared by all pages."""

from __future__ import annotations

from pathlib import Path

import param

from core.config import CLASSES, default_runs_dir

ANY = "(any)"


class AppState(param.Parameterized):
    """Selected run(s), the variant and the misclassification filters. One instance per browser session."""

    runs_dir = param.String(default="", doc="The run store (WBC_RUNS_DIR or runs/).")
    run_id = param.String(default=None, allow_None=True, doc="The run being analysed.")
    compare_run_id = param.String(default=None, allow_None=True, doc="A second run to compare with.")
    variant = param.String(default=ANY, doc="Variant filter of the misclassification browser.")
    true_label = param.Selector(default=ANY, objects=[ANY, *CLASSES])
    pred_label = param.Selector(default=ANY, objects=[ANY, *CLASSES])
    confidence = param.Range(default=(0.0, 1.0), bounds=(0.0, 1.0))
    page = param.String(default="Runs", doc="The tab shown.")
    refresh = param.Integer(default=0, doc="Bumped to re-read the run list (new or changed runs).")

    def __init__(self, **params):
        if not params.get("runs_dir"):
            params["runs_dir"] = str(default_runs_dir())
        super().__init__(**params)

    def run_dir(self, run_id: str | None = None) -> Path | None:
        rid = run_id or self.run_id
        return Path(self.runs_dir) / rid if rid else None

    def show_errors(self, variant: str, true_label: str, pred_label: str) -> None:
        """Open the misclassification browser filtered to one confusion cell."""
        self.param.update(variant=variant, true_label=true_label, pred_label=pred_label,
                          confidence=(0.0, 1.0), page="Errors")
