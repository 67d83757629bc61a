"""
bench/serve.py --soak against a real chat_web on 127.0.0.1 (random demo-shaped model): well-formed requests all
succeed while other clients cut streams off and send malformed bodies, and the server still answers afterwards.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.mark.slow
def test_soak_survives_cut_streams_and_malformed_bodies():
    out = subprocess.run([sys.executable, "-m", "bench.serve", "--soak", "4", "--seconds", "8", "--max-tokens", "8",
                          "--disconnect-share", "0.3", "--malformed-share", "0.3"], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    soak = json.loads(out.stdout.strip().splitlines()[-1])["soak"]
    assert soak["errors"] == 0 and soak["first_error"] is None
    assert soak["served"] > 0 and soak["cut_mid_stream"] > 0 and soak["refused"] > 0, soak
    assert soak["latency_p50_s"] <= soak["latency_p99_s"] and 0 < soak["rss_start_mib"] <= soak["rss_end_mib"] * 2
