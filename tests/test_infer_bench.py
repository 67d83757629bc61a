"""infer_bench runs on CPU with a random model and ends with one JSON line holding every number it printed."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def test_infer_bench_random_model_json(base_dir):
    cmd = [sys.executable, "-m", "scripts.infer_bench", "--depth", "1", "--max-seq-len", "64", "--prompt-tokens", "16",
           "--decode-tokens", "4", "--batch-sizes", "1,2", "--device-type", "cpu"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu"
    assert [row["batch_size"] for row in result["decode"]] == [1, 2]
    for row in result["decode"]:
        assert row["tok_per_s"] > 0 and row["tpot_s"] > 0
    assert result["prefill"]["ttft_s"] > 0 and result["prefill"]["prompt_tokens"] == 16
    # Engine.generate rows: every sample runs the full count (no stop token can be sampled)
    assert [(r["samples"], r["tokens"]) for r in result["engine"]] == [(1, 32), (8, 8 * 32)]
    assert all(r["tok_per_s"] > 0 for r in result["engine"])
