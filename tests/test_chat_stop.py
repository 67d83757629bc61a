"""
SIGTERM during mid-training (the loop scripts/chat_sft.py shares with SFT): the step finishes, a checkpoint is saved,
the printed command resumes it, and the result is the uninterrupted run's model bit for bit.
"""

import os
import re
import signal
import subprocess
import sys

import torch

from conftest import MID, MID_RUN_FLAGS, MID_RUN_STEPS, REPO, checkpoint, copy_dirs, start_and_signal

def test_sigterm_mid_training_saves_and_resumes_exactly(mid_reference_run, tmp_path):
    base, _ = mid_reference_run
    stopped = copy_dirs(base, tmp_path / "stopped", "tokenizer", "base_checkpoints")
    rc, stdout = start_and_signal([sys.executable, "-m", "scripts.mid_train", *MID_RUN_FLAGS], stopped, lambda p: p.pid)
    assert rc == 128 + signal.SIGTERM, stdout[-3000:]
    step = int(re.search(r"stopped by SIGTERM at step (\d+);", stdout).group(1))
    assert 0 < step < MID_RUN_STEPS and checkpoint(stopped, MID, step)[1]["periodic"]
    command = stdout.split("Resume with:\n")[1].splitlines()[0]
    assert command == (f"NANOCHAT_BASE_DIR={stopped} NANOCHAT_DATASET=local python -m scripts.mid_train "
                       f"{' '.join(MID_RUN_FLAGS)} --resume")
    out = subprocess.run(command, shell=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and f"resuming from {stopped / MID} step {step}" in out.stdout, out.stderr[-3000:]
    reference, result = checkpoint(base, MID, MID_RUN_STEPS)[0], checkpoint(stopped, MID, MID_RUN_STEPS)[0]
    assert all(torch.equal(reference[k], result[k]) for k in reference), "stopped + resumed differs from uninterrupted"
