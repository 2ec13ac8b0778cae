"""Images/s of the official one-image-at-a-time ``RealESRGANer.enhance`` loop vs our batched fast path.

Both run file -> file on the same real images, same weights, same device (fp32 on CPU): the official loop is
``cv2.imread`` -> ``enhance(outscale=4)`` -> ``cv2.imwrite`` per image (as in inference_realesrgan.py); ours
decodes/encodes in a thread pool around ``enhance_batch``. One warm-up image each, not timed. The two are
interleaved chunk by chunk so that other load on the machine hits both alike.

    python benchmarks/bench_enhance.py --model realesr-animevideov3 --n 8 --device cpu --batch-size 2
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
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--half", action="store_true", help="ours in reduced precision: fp16 autocast on CUDA, bf16 on CPU")
    ap.add_argument("--data", default=os.environ.get("WBC_DATA", "/work/shared/data/blood-cells"))
    args = ap.parse_args()

    import cv2
    import numpy as np
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
    print(f"# {date.today()} {args.model} n={args.n} device={ours.device} batch={args.batch_size} "
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
            for i in range(0, len(paths), args.batch_size):
                chunk = paths[i : i + args.batch_size]
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


if __name__ == "__main__":
    main()
