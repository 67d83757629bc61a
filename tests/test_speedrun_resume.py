"""
runs/speedrun.sh killed anywhere (kill -9 of its whole process group: a node failure, a reclaimed spot instance) and
run again with the same command ends with the same chat model as a run that was never killed.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_speedrun_resume.py   (two smoke runs plus restarts: slow)
"""

import os
import shutil
import signal
import subprocess
import threading

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_FINAL = os.path.join("chatsft_checkpoints", "d2", "model_000002.pt")

def smoke(tmp_path, smoke_dir, kill_at=None):
    """Run runs/speedrun_smoke.sh (copied out of the repo: report.md lands there) into smoke_dir; with kill_at, kill -9
    its process group as soon as a line containing kill_at is printed. -> (returncode, output)."""
    repo = tmp_path / "repo"
    if not repo.exists():
        shutil.copytree(os.path.join(REPO, "runs"), repo / "runs")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXTRA_", "NANOCHAT_", "FRESH"))}  # it sets its own
    # PYTHONPATH: this checkout's code, not whichever copy of the package is installed
    env.update(SMOKE_DIR=str(smoke_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=REPO)
    proc = subprocess.Popen(["bash", str(repo / "runs" / "speedrun_smoke.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    watchdog = threading.Timer(1200, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if kill_at is not None and kill_at in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.stdout.close()
    watchdog.cancel()
    return proc.wait(), "".join(lines)

@pytest.mark.slow
def test_killed_anywhere_then_rerun_is_bit_identical(tmp_path):
    rc, out = smoke(tmp_path, tmp_path / "whole")
    assert rc == 0, out[-3000:]
    killed = tmp_path / "killed"
    points = ["max_chars:",                                                  # tokenizer training starts
              "saved checkpoint " + str(killed / "base_checkpoints" / "d2") + " step 1",  # mid-pretraining
              "step 00002 | val bpb",                                        # base step 2's save starts next
              "saved checkpoint " + str(killed / "chatsft_checkpoints" / "d2") + " step 1"]  # mid-SFT
    outputs = []
    for point in points:
        rc, out = smoke(tmp_path, killed, kill_at=point)
        outputs.append(out)
        assert rc == -signal.SIGKILL and point in out, f"never reached {point!r}:\n{out[-3000:]}"
    rc, out = smoke(tmp_path, killed)
    assert rc == 0, out[-3000:]
    # each rerun took up what was done: the tokenizer and finished stages kept, base training resumed at step 2
    assert "resuming from " + str(killed / "base_checkpoints" / "d2") + " step 1" in outputs[2]
    assert "resuming from " + str(killed / "chatsft_checkpoints" / "d2") + " step 1" in out
    assert "was trained with these flags on climbmix: kept" in out
    assert "already trained to its last step 3: nothing to do" in out
    reference = torch.load(tmp_path / "whole" / SFT_FINAL, weights_only=True)
    result = torch.load(killed / SFT_FINAL, weights_only=True)
    assert reference.keys() == result.keys()
    assert all(torch.equal(reference[k], result[k]) for k in reference), "killed + rerun differs from uninterrupted"
