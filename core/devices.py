"""Device resolution, one rule for the classifier and the enhancers. A leaf module (imports torch lazily)."""

from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda")


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), for benchmark figures; else what platform knows."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; 'cuda' without CUDA or an unknown name -> ValueError."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in DEVICES:
        raise ValueError(f"--device: unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return device
