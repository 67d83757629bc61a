"""
runs/speedrun.sh killed anywhere (kill -9 of every process of the run: a node failure, a reclaimed spot instance) and
run again with the same command ends with the same chat model as a run that was never killed.
The uninterrupted run is also the smoke test of runs/speedrun.sh (its artifacts and chat answer are checked here).
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

# Put on PYTHONPATH for one run: every process pauses (prints the marker, sleeps) just before it renames a file whose
# path contains PATTERN into place, i.e. in the middle of that checkpoint's save, for the test to kill it there.
PAUSE_AT_SAVE = """
import os, sys, time
_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if {pattern!r} in str(dst):
        print("PAUSED IN A SAVE", flush=True)
        time.sleep(600)
    return _replace(src, dst, *args, **kwargs)
os.replace = replace
"""

def kill_tree(pid):
    """SIGKILL pid and every descendant. torchrun starts its workers in sessions of their own, so killing the shell's
    process group would leave them training (and writing checkpoints) on their own: stop, collect, then kill all."""
    def tree():
        children = {}
        for p in filter(str.isdigit, os.listdir("/proc")):
            try:
                ppid = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(p))
        found, todo = [], [pid]
        while todo:
            found.append(todo.pop())
            todo += children.get(found[-1], [])
        return found
    for sig in (signal.SIGSTOP, signal.SIGKILL):  # nothing stopped can start a process between the two walks
        for p in tree():
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass

def smoke(tmp_path, smoke_dir, kill_at=None, pause_at_save=None):
    """Run runs/speedrun_smoke.sh (copied out of the repo: report.md lands there) into smoke_dir; kill every process of
    it as soon as a printed line contains kill_at. -> (returncode, output, whether kill_at was seen)."""
    repo = tmp_path / "repo"
    if not repo.exists():
        shutil.copytree(os.path.join(REPO, "runs"), repo / "runs")
    # PYTHONPATH: this checkout's code, not whichever copy of the package is installed
    python_path = REPO
    if pause_at_save is not None:
        hook = tmp_path / "pause_hook"
        hook.mkdir(exist_ok=True)
        (hook / "sitecustomize.py").write_text(PAUSE_AT_SAVE.format(pattern=pause_at_save))
        python_path = f"{REPO}{os.pathsep}{hook}"
        kill_at = "PAUSED IN A SAVE"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXTRA_", "NANOCHAT_", "FRESH"))}  # it sets its own
    env.update(SMOKE_DIR=str(smoke_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=python_path)
    proc = subprocess.Popen(["bash", str(repo / "runs" / "speedrun_smoke.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    watchdog = threading.Timer(1200, kill_tree, (proc.pid,))
    watchdog.start()
    lines, seen = [], False
    for line in proc.stdout:
        lines.append(line)
        if kill_at is not None and kill_at in line and not seen:
            seen = True
            kill_tree(proc.pid)
    watchdog.cancel()
    return proc.wait(), "".join(lines), seen

@pytest.mark.slow
def test_killed_anywhere_then_rerun_is_bit_identical(tmp_path):
    # the smoke run: speedrun.sh's own lines, every stage on CPU, as a user would run them
    rc, out, _ = smoke(tmp_path, tmp_path / "whole")
    assert rc == 0, out[-3000:]
    for path in ("tokenizer", "base_checkpoints/d2", "mid_checkpoints/d2", "chatsft_checkpoints/d2",
                 "report/report.md"):
        assert (tmp_path / "whole" / path).exists(), f"{path} missing after the smoke run"
    assert "Assistant:" in out, "chat_cli answered the prompt"
    killed = tmp_path / "killed"
    base_dir, sft_dir = killed / "base_checkpoints" / "d2", killed / "chatsft_checkpoints" / "d2"
    points = [dict(kill_at="max_chars:"),                                     # tokenizer training starts
              dict(kill_at=f"saved checkpoint {base_dir} step 1"),            # base training, during step 2
              dict(pause_at_save=os.path.join("base_checkpoints", "d2", "model_000002.pt")),  # step 2's save
              dict(kill_at=f"saved checkpoint {sft_dir} step 1")]             # SFT, during its step 2
    outputs = []
    for point in points:
        rc, out, seen = smoke(tmp_path, killed, **point)
        outputs.append(out)
        assert rc == -signal.SIGKILL and seen, f"never reached {point}:\n{out[-3000:]}"
        if "pause_at_save" in point:  # the save was cut: step 2's model is a temp file, no meta says step 2 exists
            assert any(f.startswith("model_000002.pt.tmp") for f in os.listdir(base_dir))
            assert not (base_dir / "meta_000002.json").exists()
    rc, out, _ = smoke(tmp_path, killed)
    assert rc == 0, out[-3000:]
    # each rerun took up what was done: base training resumed at step 1 after both kills in step 2, the tokenizer and
    # the finished base model were kept, SFT resumed at its step 1
    assert f"resuming from {base_dir} step 1" in outputs[2] and f"resuming from {base_dir} step 1" in outputs[3]
    assert "was trained with these flags on climbmix: kept" in out
    assert "already trained to its last step 3: nothing to do" in out
    assert f"resuming from {sft_dir} step 1" in out
    reference = torch.load(tmp_path / "whole" / SFT_FINAL, weights_only=True)
    result = torch.load(killed / SFT_FINAL, weights_only=True)
    assert reference.keys() == result.keys()
    assert all(torch.equal(reference[k], result[k]) for k in reference), "killed + rerun differs from uninterrupted"
