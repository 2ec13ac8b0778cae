"""Seconds for the embedding map (cold, then cached) and the HTML report over a run of N test images.

    python benchmarks/bench_map.py --n 2500 --dims 1280

The run is the tests' fixture store (tests/fixtures_store.py: two variants, EfficientNet-Lite0-sized features,
real thumbnails unless --no-images), so the figures are for the code, not for a model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2500)
    ap.add_argument("--dims", type=int, default=1280)
    ap.add_argument("--no-images", action="store_true")
    args = ap.parse_args()

    import numpy as np

    import fixtures_store
    from core.embedmap import embedding_map
    from core.report import report_blocks, to_html
    from core.store import Run, Table

    dims = args.dims
    orig = fixtures_store._embeddings
    fixtures_store._embeddings = lambda preds, rng, dims=dims: orig(preds, rng, dims)
    root = Path(tempfile.mkdtemp(prefix="wbc-map-"))
    info = fixtures_store.make_fixture_store(root, n_runs=1, n_test=args.n, with_images=not args.no_images)
    run = Run(info["runs_dir"] / info["run_ids"][0])
    emb = run.table(Table.EMBEDDINGS)
    from core.devices import cpu_model

    cpu = cpu_model()
    print(f"# {date.today()} cpu={cpu} n={args.n} per variant, {len(np.asarray(emb['feature'].iloc[0]))}-d features")
    t0 = time.perf_counter()
    df = embedding_map(run)
    t1 = time.perf_counter()
    embedding_map(run)
    t2 = time.perf_counter()
    html = to_html(report_blocks(run))
    t3 = time.perf_counter()
    print(f"map, {df['variant'].nunique()} variants x {args.n} points, t-SNE, first time: {t1 - t0:.1f} s")
    print(f"map, cached: {t2 - t1:.2f} s")
    print(f"report (HTML, {len(html) / 1e6:.1f} MB): {t3 - t2:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
