"""
bench/gpu_check.sh on a machine without CUDA: runs to completion, every row a "no CUDA device" skip, table + JSON,
files under $OUT. Its numeric checks also run here on CPU at toy sizes (the same code the GPU runs, other device), and
a broken attention path must FAIL them.
"""

import json
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_check_skips_every_row_without_cuda(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    result = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_check.sh")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    names = [r["check"] for r in record["rows"]]
    assert names == ["attention fa3", "attention flex", "attention sdpa", "fp8 matmul vs fp32",
                     "optimizer compiled vs fp32", "train d12 bf16", "train d20 bf16", "train d12 fp8", "train d20 fp8",
                     "infer_bench d20", "CORE examples/s d20"]
    assert all(r["status"] == "skip" and r["detail"] == "no CUDA device" for r in record["rows"])
    assert "11 checks: 0 ok, 0 FAIL, 11 skipped" in result.stdout
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()) == record
    assert "no CUDA device" in (tmp_path / "out" / "gpu_check.txt").read_text()

TINY_CASES = [  # name, B, Tq, Tk, H, Hkv, D, window
    ("causal", 1, 64, 64, 2, 2, 32, 63),
    ("window 16", 1, 64, 64, 2, 2, 32, 16),
    ("GQA 4/2", 1, 32, 32, 4, 2, 32, 31),
    ("chunk 8 of 64", 1, 8, 64, 2, 2, 32, 63),
]

def test_numeric_checks_pass_on_cpu_and_catch_a_broken_path(monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    import bench.gpu_check as gc
    import nanochat.attention as attention
    monkeypatch.setattr(gc, "rows", [])
    cpu = torch.device("cpu")
    gc.check_attention(cpu, ["sdpa"], cases=TINY_CASES)  # flex has no backward on CPU (torch 2.13)
    gc.check_fp8(cpu, M=128, K=128, N=256)
    assert [(r["check"], r["status"]) for r in gc.rows] == [
        ("attention sdpa", "ok"), ("fp8 matmul vs fp32", "ok")]
    assert 0 < gc.rows[0]["fwd_err"] < gc.ATTN_FWD_TOL  # bf16 rounding shows, far below the bar
    assert 0.01 < gc.rows[1]["fp8_err"]["fwd"] < gc.FP8_FWD_TOL  # e4m3 error is visibly larger than bf16's
    assert gc.rows[1]["bf16_err"]["fwd"] < gc.rows[1]["fp8_err"]["fwd"] / 5
    # a path that ignores the sliding window (full causal instead) must fail the window case
    full_causal = lambda q, k, v, window: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    monkeypatch.setitem(attention.ATTENTION_IMPLS, "sdpa", full_causal)
    gc.check_attention(cpu, ["sdpa"], cases=TINY_CASES[:2])
    assert gc.rows[-1]["status"] == "FAIL" and "window 16" in gc.rows[-1]["detail"]
