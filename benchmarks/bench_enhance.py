"""Images/s of the official one-image-at-a-time ``RealESRGANer.enhance`` loop vs our batched fast path.

Both run file -> file on the same real images, same weights, same device (fp32 on CPU): the official loop is
``cv2.imread`` -> ``enhance(outscale=4)`` -> ``cv2.imwrite`` per image (as in inference_realesrgan.py); ours
decodes/encodes in a thread pool around ``enhance_batch``. One warm-up image each, not timed. The two are
interleaved chunk by chunk so that other load on the machine hits both alike.

    python benchmarks/bench_enhance.py --model realesr-animevideov3 --n 8 --device cpu

``--roofline`` also prints the ceiling: the model's convolution FLOPs for one 320x240 image, the device's
measured peak for a large 3x3 convolution (fp32 and the reduced precision), and therefore the most any
implementation built on that convolution can gain over the official loop.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="realesr-animevideov3")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the enhancer's (1 on CPU, 8 on CUDA)")
    ap.add_argument("--half", action="store_true", help="ours in reduced precision: fp16 autocast on CUDA, bf16 on CPU")
    ap.add_argument("--roofline", action="store_true",
                    help="also measure the device's 3x3-conv peak and the speed-up ceiling it implies")
    ap.add_argument("--data", default=os.environ.get("WBC_DATA", "/work/shared/data/blood-cells"))
    args = ap.parse_args()

    import cv2
    import torch

    from core.enhance import create_enhancer, load_rgb
    from core.enhance.cache import save_image_atomic
    from core.enhance.realesrgan import psnr

    paths = sorted(Path(args.data).glob("TRAIN/*/*.jpeg"))[: args.n + 1]
    if len(paths) < args.n + 1:
        sys.exit(f"need {args.n + 1} images under {args.data}/TRAIN")
    warm, paths = paths[0], paths[1:]
    ours = create_enhancer(args.model, device=args.device, batch_size=args.batch_size, half=args.half or None)
    ref = ours.reference()
    cpu = platform.processor() or platform.machine()
    bs = ours.batch_size
    print(f"# {date.today()} {args.model} n={args.n} device={ours.device} batch={bs} "
          f"threads={torch.get_num_threads()} cores={os.cpu_count()} cpu={cpu} torch={torch.__version__}")
    print(f"# weights: {ours.provenance()['source']} sha256={ours.weights_id()[:16]}")

    with tempfile.TemporaryDirectory() as tmp:
        out_ref, out_ours = Path(tmp, "ref"), Path(tmp, "ours")
        out_ref.mkdir(), out_ours.mkdir()
        ref.enhance(cv2.imread(str(warm)), outscale=4)
        ours.enhance_batch([load_rgb(warm)])
        load0 = os.getloadavg()[0]
        t_ref = t_ours = 0.0
        # Interleaved by chunk, so that a change in the machine's load hits both sides alike.
        with ThreadPoolExecutor(2) as pool:
            for i in range(0, len(paths), bs):
                chunk = paths[i : i + bs]
                t0 = time.perf_counter()
                for p in chunk:  # the official loop
                    out, _ = ref.enhance(cv2.imread(str(p), cv2.IMREAD_UNCHANGED), outscale=4)
                    cv2.imwrite(str(out_ref / f"{p.stem}.png"), out)
                t1 = time.perf_counter()
                ims = list(pool.map(load_rgb, chunk))  # ours: threaded decode, one batch, threaded encode
                outs = ours.enhance_batch(ims)
                list(pool.map(lambda po: save_image_atomic(po[1], out_ours / f"{po[0].stem}.png"), zip(chunk, outs)))
                t2 = time.perf_counter()
                t_ref, t_ours = t_ref + t1 - t0, t_ours + t2 - t1
        a = load_rgb(out_ref / f"{paths[0].stem}.png")
        b = load_rgb(out_ours / f"{paths[0].stem}.png")
        q = psnr(a, b)
    print(f"# load average (1 min) before/after: {load0:.1f} / {os.getloadavg()[0]:.1f}")
    r, o = args.n / t_ref, args.n / t_ours
    print(f"official RealESRGANer.enhance loop: {r:.3f} img/s ({t_ref / args.n:.2f} s/img)")
    print(f"ours (batched fast path):           {o:.3f} img/s ({t_ours / args.n:.2f} s/img)")
    print(f"ratio ours/official: {o / r:.2f}x   PSNR(ours, official) on {paths[0].name}: {q:.1f} dB "
          f"({ours.provenance()['precision']})")
    if args.roofline:
        roofline(ours, t_ref / args.n)


def conv_flops(model, x) -> float:
    """FLOPs of all Conv2d layers of ``model`` on input ``x`` (2 x MACs), counted with forward hooks."""
    import torch

    total = 0.0

    def hook(mod, inp, out):
        nonlocal total
        total += 2.0 * out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hs:
            h.remove()
    return total


def conv_peak(device: str, dtype, cin: int = 192, cout: int = 64, h: int = 250, w: int = 330) -> float:
    """Best FLOP/s of one large 3x3 convolution (the shape of x4plus's biggest layer), channels_last."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(1, cin, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    wt = torch.randn(cout, cin, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    best = float("inf")
    with torch.inference_mode():
        F.conv2d(x, wt, padding=1)  # warm-up: oneDNN / cuDNN pick and build the kernel
        for _ in range(8):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            F.conv2d(x, wt, padding=1)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return 2.0 * h * w * cout * cin * 9 / best


def roofline(ours, official_s_per_img: float) -> None:
    import torch

    dev = ours.device
    # The official loop runs one 320x240 image with a 10 px reflect pre-pad: a 330x250 forward.
    x = torch.zeros(1, 3, 240 + ours.pre_pad, 320 + ours.pre_pad, device=dev)
    fl = conv_flops(ours.model, x)
    half = torch.float16 if dev == "cuda" else torch.bfloat16
    p32, ph = conv_peak(dev, torch.float32), conv_peak(dev, half)
    achieved = fl / official_s_per_img
    hn = str(half).replace("torch.", "")
    print(f"# roofline: {fl / 1e12:.2f} TFLOP of convolutions per 320x240 image; official loop reaches "
          f"{achieved / 1e9:.0f} GFLOP/s")
    print(f"# roofline: 3x3 conv peak on {dev}: fp32 {p32 / 1e9:.0f} GFLOP/s, {hn} {ph / 1e9:.0f} GFLOP/s")
    print(f"# roofline: most any direct-convolution implementation can gain over the official loop: "
          f"fp32 {p32 / achieved:.2f}x, {hn} {ph / achieved:.2f}x (at 100% of peak, zero I/O)")


if __name__ == "__main__":
    main()
