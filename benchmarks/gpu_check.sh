#!/usr/bin/env bash
# The GPU check in one command (docs/SCALING.md, "The GPU check"): on the lent GPU machine, from the repo root,
#   bash benchmarks/gpu_check.sh            # figures to $OUT/gpu_check.json (and stdout), ~5 min on one H100
#   bash benchmarks/gpu_check.sh --dry-run  # every stage at toy sizes on a CPU (tests/test_scaling.py runs it)
# What it needs beside the checkout, in the ignored folder .gpucheck/ (`make gpu-carry` fills it, < 45 MiB):
#   whl/      wheels the GPU image lacks: realesrgan, basicsr (built from its sdist), addict, yapf
#   weights/  x4plus and realesr-animevideov3 as fp16 .pth (the ncnn conversion, whose weights are fp16 already)
#   data/     a subset of TRAIN (150 per class) and TEST_SIMPLE, Kaggle layout
#   cache/    the grouping embeddings of those images (so no EfficientNet-Lite weights need to travel)
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${WBC_GPU_CARRY:-.gpucheck}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ! "$PY" -c "from core.enhance._compat import ensure_basicsr_importable as e; e(); import realesrgan" 2>/dev/null; then
  if ls "$CARRY"/whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/wbc-site \
      "$CARRY"/whl/*.whl
    export PYTHONPATH=/tmp/wbc-site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "realesrgan/basicsr are not installed and $CARRY/whl has no wheels: run make gpu-carry" >&2; exit 2
  fi
fi
exec "$PY" benchmarks/gpu_check.py --carry "$CARRY" "$@"
