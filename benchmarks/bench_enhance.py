"""Images/s of the official one-image-at-a-time ``RealESRGANer.enhance`` loop vs our batched fast path.

Both run file -> file on the same real images, same weights, same device (fp32 on CPU): the official loop is
``cv2.imread`` -> ``enhance(outscale=4)`` -> ``cv2.imwrite`` per image (as in inference_realesrgan.py); ours
decodes/encodes in background threads around ``enhance_batch``. One warm-up image each, not timed.

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
    ap.add_argument("--half", action="store_true", help="fp16 autocast for ours (CUDA only)")
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
        t0 = time.perf_counter()
        for p in paths:  # the official loop
            out, _ = ref.enhance(cv2.imread(str(p), cv2.IMREAD_UNCHANGED), outscale=4)
            cv2.imwrite(str(out_ref / f"{p.stem}.png"), out)
        t_ref = time.perf_counter() - t0

        ours.enhance_batch([load_rgb(warm)])
        t0 = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            chunks = [paths[i : i + args.batch_size] for i in range(0, len(paths), args.batch_size)]
            nxt = pool.submit(lambda c: [load_rgb(p) for p in c], chunks[0])
            saves = []
            for k, chunk in enumerate(chunks):
                ims = nxt.result()
                if k + 1 < len(chunks):
                    nxt = pool.submit(lambda c: [load_rgb(p) for p in c], chunks[k + 1])
                for p, o in zip(chunk, ours.enhance_batch(ims)):
                    saves.append(pool.submit(save_image_atomic, o, out_ours / f"{p.stem}.png"))
            [f.result() for f in saves]
        t_ours = time.perf_counter() - t0

        a = load_rgb(out_ref / f"{paths[0].stem}.png")
        b = load_rgb(out_ours / f"{paths[0].stem}.png")
        q = psnr(a, b)
    r, o = args.n / t_ref, args.n / t_ours
    print(f"official RealESRGANer.enhance loop: {r:.3f} img/s ({t_ref / args.n:.2f} s/img)")
    print(f"ours (batched fast path):           {o:.3f} img/s ({t_ours / args.n:.2f} s/img)")
    print(f"ratio ours/official: {o / r:.2f}x   PSNR(ours, official) on {paths[0].name}: {q:.1f} dB "
          f"({'fp16' if ours.half else 'fp32'})")


if __name__ == "__main__":
    main()
