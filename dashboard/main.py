"""``panel serve dashboard``: Panel/Bokeh serve a directory app by running this main.py once per session."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from dashboard.app import build_app, is_local_client, refused_app  # noqa: E402

# Safe by default: the Makefile binds to 127.0.0.1, and a session from another machine (a server started
# with --address 0.0.0.0, or a reverse proxy) gets a refusal instead of the app; so does a session whose
# address cannot be read (served=True: main.py only runs in a served session).
(build_app() if is_local_client(served=True) else refused_app()).servable()
