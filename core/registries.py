"""Config validation against the registries: the one place that knows both the config and what is registered.

``core.config`` checks values it can judge alone; this adds the names that only the enhancer and classifier
registries know. The CLI and :func:`core.pipeline.run` call :func:`validate_config`.
"""

from __future__ import annotations

from core.config import StudyConfig
from core.enhance.registry import list_enhancers
from core.models import list_classifiers


def validate_config(cfg: StudyConfig) -> StudyConfig:
    """Raise ``ValueError`` naming the first bad value; returns ``cfg``."""
    for v in cfg.variants:
        if v not in list_enhancers():
            raise ValueError(f"--variants: unknown variant {v!r}; choose from {', '.join(list_enhancers())}")
    if cfg.classifier not in list_classifiers():
        raise ValueError(f"--classifier: unknown classifier {cfg.classifier!r}; choose from "
                         f"{', '.join(list_classifiers())}")
    cfg.validate()
    return cfg
