#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, then run the whole suite.
# Usage: bash runs/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
# System packages some tests need (bubblewrap: the code sandbox's isolation, tests/test_sandbox_attacks.py;
# chromium + chromium-driver: the chat_web browser test, tests/test_chat_web.py; g++: torch.compile's CPU kernels,
# the default training path, tests/test_compile.py; tmux: chat_cli in a real terminal, tests/test_chat_cli.py).
# Installed only when missing and running as root with apt (CI); elsewhere those tests skip, saying why.
APT_PACKAGES="bubblewrap chromium chromium-driver g++ tmux"
missing=$(for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
fi
bash runs/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Two pytest workers (pytest-xdist): the suite is mostly single-threaded, so it runs on both cores of the 2-core CI
# machine; `-n 0` in the arguments runs it in one process
python -m pytest -q -n 2 "$@"
