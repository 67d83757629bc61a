#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, then run the whole suite.
# Usage: bash runs/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m pytest -q "$@"
