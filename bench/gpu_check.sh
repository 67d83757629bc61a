#!/usr/bin/env bash
# Check a GPU machine in one call (~5-7 minutes on one H100/H200): FA3/flex/SDPA attention, fp8 matmuls and the
# compiled optimizer step against fp32 references, then d12/d20 training step time, tok/s and MFU (compiled bf16 and
# --fp8), infer_bench on d20 and CORE scoring examples/s. Prints one table and a JSON line; with OUT=dir set, also
# writes gpu_check.txt and gpu_check.json there. Without CUDA every row says "skip: no CUDA device".
# See bench/gpu_check.py.
#   bash bench/gpu_check.sh [--skip-speed] [--timeout=180]
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
exec python -m bench.gpu_check "$@"
