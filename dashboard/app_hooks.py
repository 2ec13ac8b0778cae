"""Bokeh server lifecycle hooks of the directory app: warm the slow imports once at server start."""

import sys
import threading
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def on_server_loaded(server_context):
    def warm():
        try:
            import core  # noqa: F401  (torch, registries)
            import core.explain  # noqa: F401  (pytorch-grad-cam, for the Errors page's "Why?")
            import pytorch_grad_cam  # noqa: F401
            import dashboard.app  # noqa: F401
            import dashboard.pages.launch  # noqa: F401
        except Exception:
            pass

    threading.Thread(target=warm, daemon=True, name="warm-imports").start()
