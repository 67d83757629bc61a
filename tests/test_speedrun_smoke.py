"""
runs/speedrun.sh must not fail on a typo after hours of training: runs/speedrun_smoke.sh runs its very lines on CPU
(2 gloo ranks, depth 2, a few steps per stage), which works only while every stage appends its $(extra NAME) flags.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_speedrun_smoke.py   (the smoke run: ~2.5 CPU-minutes)
"""

import os
import re
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def stage_lines():
    """(line, module) of every command speedrun.sh runs with python -m or torchrun (commented-out stages excluded)."""
    lines = open(os.path.join(REPO, "runs", "speedrun.sh")).read().splitlines()
    return [(line, re.search(r"-m (?:scripts|nanochat)\.(\w+)", line).group(1)) for line in lines
            if re.match(r"\s*(python|torchrun) ", line) and re.search(r"-m (?:scripts|nanochat)\.", line)]

def test_every_stage_takes_extra_flags():
    stages = stage_lines()
    assert {"base_train", "base_eval", "chat_sft", "chat_eval", "tok_train"} <= {m for _, m in stages}
    for line, module in stages:
        assert re.search(rf"\$\(extra {module}\)( &)?$", line.rstrip()), (
            f"runs/speedrun.sh stage without its overrides (the smoke run would train it at full size): {line!r}; "
            f"end it with $(extra {module})")

@pytest.mark.slow
def test_speedrun_smoke(tmp_path):
    # run copies of the scripts from a scratch "repo" (the package is installed), so report.md lands there, not in ours
    shutil.copytree(os.path.join(REPO, "runs"), tmp_path / "repo" / "runs")
    env = dict(os.environ, SMOKE_DIR=str(tmp_path / "smoke"), OMP_NUM_THREADS="1")
    for key in [k for k in env if k.startswith(("EXTRA_", "NANOCHAT_"))]:  # the script sets its own
        del env[key]
    result = subprocess.run(["bash", str(tmp_path / "repo" / "runs" / "speedrun_smoke.sh")], env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for path in ("tokenizer", "base_checkpoints/d2", "mid_checkpoints/d2", "chatsft_checkpoints/d2",
                 "report/report.md"):
        assert (tmp_path / "smoke" / path).exists(), f"{path} missing after the smoke run"
    assert "Assistant:" in result.stdout, "chat_cli answered the prompt"
