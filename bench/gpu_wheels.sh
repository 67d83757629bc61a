#!/usr/bin/env bash
# On a machine with network: download into .whl/ (git-ignored) the wheels bench/gpu_check.sh needs on a GPU machine
# that has no network and lacks them: kernels (it loads FA3) and rustbpe (gpu_check itself needs no BPE trainer; it is
# there for tok_train, should you go on to train on that machine), with their dependencies,
# built for CPython 3.12 on manylinux x86_64 (the GPU image's Python). Then carry .whl/ along with the repo.
#   bash bench/gpu_wheels.sh          # ~11 MB; on the GPU machine: bash bench/gpu_check.sh
# gpu_check.sh installs only the wheels of packages that machine lacks, never over its own copies. FA3 itself is a
# kernel build that `kernels` fetches from the HF hub at first use: without network it loads only from an HF cache
# already on the machine, else the FA3 row skips and training uses flex.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p .whl
"$PY" -m pip download --only-binary=:all: --implementation cp --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 --dest .whl "rustbpe>=0.1.0" "kernels>=0.11.7"
ls .whl
