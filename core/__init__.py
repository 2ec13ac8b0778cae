"""core: data -> enhance -> train -> evaluate -> store for the Real-ESRGAN white-blood-cell study.

Public API:

    from core import make_config, run_study, RunStore, PRESETS, CLASSES
    run = run_study(make_config("quick"), on_progress=print)
    run = resume_study(run.run_id)  # an interrupted, failed or cancelled run: continue it
    run.info, run.progress, run.table("predictions")  # the store's typed read API (core.store)

The dashboard reads runs only through ``core.store`` (RunStore, Run, the table schemas and names) and takes its
option lists from ``core.config`` and the registries; docs/ARCHITECTURE.md has the whole map.
"""

from core.config import CLASSES, PRESETS, SPLITS, StudyConfig, default_runs_dir, make_config  # noqa: F401
from core.regions import POLICIES  # noqa: F401
from core.enhance import create_enhancer, list_enhancers  # noqa: F401
from core.models import create_classifier, list_classifiers  # noqa: F401
from core.store import SCHEMAS, Metric, Run, RunInfo, RunStore, StatKind, Table  # noqa: F401


def run_study(config, on_progress=None, run_id=None, store=None):
    """Run a whole study (see core.pipeline.run); returns the finished Run."""
    from core.pipeline import run

    return run(config, on_progress=on_progress, run_id=run_id, store=store)


def resume_study(run_id, store=None, on_progress=None):
    """Continue an interrupted, failed or cancelled run (see core.pipeline.resume); returns the finished Run."""
    from core.pipeline import resume

    return resume(run_id, store=store, on_progress=on_progress)
