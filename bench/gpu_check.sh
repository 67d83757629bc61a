#!/usr/bin/env bash
# Check a GPU machine in one call (< 8 minutes on one H100/H200, --budget): FA3/compiled flex/SDPA attention, fp8
# matmuls and the compiled optimizer step against fp32 references, then d12/d20 training steps (ms, tok/s, MFU, peak
# memory), KV-cache decode, CORE examples/s and a tiny base_train --fp8 -> base_eval round trip, each row in its own
# process with its own timeout. Prints a table and a JSON line; with OUT=dir set, each row also goes to
# $OUT/gpu_check.jsonl as it finishes (logs in $OUT/logs/), then gpu_check.txt and gpu_check.json. Without CUDA
# every row says "skip: no CUDA device". See bench/gpu_check.py.
#   OUT=dir bash bench/gpu_check.sh [--skip-speed] [--budget=450]
# Needs no network: packages the machine lacks (rustbpe, kernels) come from wheels in .whl/ (WHEELS=dir to use
# another), downloaded beforehand by bench/gpu_wheels.sh on a machine with network. A wheel of a package this
# Python already has is skipped: the machine's own copy is never shadowed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"  # GPU images often have python3 and no python
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
WHEELS="${WHEELS:-.whl}"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    missing=$("$PY" - "$WHEELS"/*.whl <<'EOF'
import importlib.metadata as md, os, sys
for path in sys.argv[1:]:
    try:
        md.version(os.path.basename(path).split("-")[0])  # installed already: keep the machine's own
    except md.PackageNotFoundError:
        print(path)
EOF
)
    if [ -n "$missing" ]; then
        target="$(mktemp -d "${TMPDIR:-/tmp}/nanochat_wheels.XXXXXX")"
        # shellcheck disable=SC2086  # one wheel path per word
        if "$PY" -m pip install --quiet --no-index --no-deps --target "$target" $missing; then
            export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
            echo "gpu_check: installed from $WHEELS into $target: $(echo $missing | xargs -n1 basename | tr '\n' ' ')"
        else  # no pip, or a wheel for another platform: the rows that need them say so, the rest still run
            echo "gpu_check: could not install the wheels in $WHEELS (pip's error above); going on without them"
        fi
        # kernels needs a recent huggingface_hub; if this machine's is too old, importing kernels would break every
        # CUDA training row (attention.load_fa3 imports it). Drop it then: FA3 skips, training uses flex.
        if [ -d "$target/kernels" ] && ! err=$("$PY" -c "import kernels" 2>&1); then
            echo "gpu_check: kernels from $WHEELS does not import ($(echo "$err" | tail -1)); running without FA3"
            rm -rf "$target"/kernels "$target"/kernels-*.dist-info
        fi
    fi
fi
exec "$PY" -m bench.gpu_check "$@"
