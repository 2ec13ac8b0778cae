"""Benchmark of the source-grouping audit: embedding throughput per view count, cache reads, clustering.

    .venv/bin/python benchmarks/bench_audit.py [--data DIR] [--n 64] [--views 1,4,8] [--cluster-n 2500]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np
import torch

from core.data import find_data_root, scan_class_folders, find_split_dirs
from core import groups as G


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=None)
    ap.add_argument("--n", type=int, default=64, help="images to embed per view count")
    ap.add_argument("--views", default="1,4,8")
    ap.add_argument("--cluster-n", type=int, default=2500, help="images in one (split, class) to cluster")
    a = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}")
    root = find_data_root(a.data)
    df, _ = scan_class_folders(find_split_dirs(root)["TRAIN"], "TRAIN")
    df = df.sample(n=min(a.n, len(df)), random_state=0)
    G._get_model("cpu")  # load once, outside the timings
    for v in (int(x) for x in a.views.split(",")):
        with tempfile.TemporaryDirectory() as cache:
            t = time.perf_counter()
            G.embed_images(df["path"].tolist(), df["sha1"].tolist(), cache, views=v, batch_size=32)
            dt = time.perf_counter() - t
            t = time.perf_counter()
            G.embed_images(df["path"].tolist(), df["sha1"].tolist(), cache, views=v)
            dc = time.perf_counter() - t
        print(f"embed views={v}: {len(df) / dt:.2f} img/s ({dt / len(df):.3f} s/img, "
              f"{dt / len(df) / v:.3f} s/img/view); cached re-read {dc:.3f} s")
    # How far a mirror image lands from its original, relative to the gap between different images.
    from PIL import Image

    sub = df.head(16)
    with tempfile.TemporaryDirectory() as tmp:
        flips = []
        for i, p in enumerate(sub["path"]):
            q = f"{tmp}/{i}.png"
            Image.open(p).convert("RGB").transpose(Image.FLIP_LEFT_RIGHT).save(q)
            flips.append(q)
        for v in (4, 8):
            e = G.embed_images(sub["path"].tolist() + flips, [f"a{i}" for i in range(32)], tmp, views=v)
            e = G.centre(e)
            mirror = np.mean(1 - np.sum(e[:16] * e[16:], 1))
            d = 1 - e[:16] @ e[:16].T
            other = d[np.triu_indices(16, 1)].mean()
            print(f"views={v}: centred cosine distance image vs its mirror {mirror:.3f}; "
                  f"between different images {other:.3f}")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(a.cluster_n // 20, 1280))
    emb = centres.repeat(20, 0) + 0.3 * rng.normal(size=(a.cluster_n // 20 * 20, 1280))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    t = time.perf_counter()
    lab = G.cluster(emb)
    print(f"cluster {len(emb)} embeddings: {time.perf_counter() - t:.2f} s ({lab.max() + 1} groups)")


if __name__ == "__main__":
    main()
