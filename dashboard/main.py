"""``panel serve dashboard``: Panel/Bokeh serve a directory app by running this main.py once per session."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from dashboard.app import build_app  # noqa: E402

build_app().servable()
