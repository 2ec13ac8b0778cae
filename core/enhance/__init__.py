"""Image enhancement: a registry of enhancers (identity, interpolation controls, Real-ESRGAN)."""

from core.enhance.registry import (  # noqa: F401
    Enhancer,
    EnhancerSpec,
    create_enhancer,
    get_enhancer_spec,
    list_enhancers,
    register_enhancer,
)
from core.enhance import resize  # noqa: F401  (registers original, bicubic-x4, lanczos-x4)
from core.enhance.cache import EnhanceResult, enhance_to_cache, load_rgb  # noqa: F401
from core.enhance import realesrgan  # noqa: F401  (registers the Real-ESRGAN enhancers)
