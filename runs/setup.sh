#!/usr/bin/env bash
# One-time set-up shared by runs/runcpu.sh and runs/test.sh: installs torch and this package.
# On a CPU machine `torch==2.13.0` is the local CPU wheel; on a GPU machine, install your CUDA build
# of torch (2.11 - 2.13) first and this script leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[test]"
