"""
runs/speedrun.sh must not fail on a typo after hours of training: runs/speedrun_smoke.sh runs its very lines on CPU
(2 gloo ranks, depth 2, a few steps per stage), which works only while every stage appends its $(extra NAME) flags.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_speedrun_smoke.py   (the smoke run: ~2.5 CPU-minutes)
"""

import os
import re

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

# The smoke run itself (every stage of speedrun.sh on CPU, then its artifacts) is the uninterrupted reference run of
# tests/test_speedrun_resume.py, which checks it there: one run serves both.
