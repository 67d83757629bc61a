"""
End-to-end tests of scripts/base_train.py on a tiny model, tiny tokenizer and tiny local shards (CPU):
an interrupted-then-resumed run is bit-identical to an uninterrupted one (also after SIGTERM, on 1 and 2 ranks, and
after a disk-full save); 2 gloo ranks train the same model as 1 process with 2 accumulation steps; a fresh run
refuses another run's checkpoints; bad inputs fail at start-up naming the fix.
"""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.report import read_metric_log
from conftest import (REPO, TORCHRUN, base_train_in_process, copy_dirs, died_before, make_pretraining_dir,
                      run_script, start_and_signal)

STEPS = 6
FLAGS = ["--depth=2", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=32", "--window-pattern=SL",
         "--device-batch-size=2", "--total-batch-size=128", f"--num-iterations={STEPS}", "--warmup-steps=1",
         "--eval-every=3", "--eval-tokens=256", "--core-metric-every=-1", "--sample-every=-1", "--save-every=3"]
CKPT = os.path.join("base_checkpoints", "d2")
LOG = os.path.join("logs", "base_d2.jsonl")
DETERMINISTIC = ("step", "flops", "loss", "smooth_loss", "lrm", "epoch", "val_bpb")  # not dt, tok/s, time

def losses(stdout):
    """{step: debiased loss} and {step: val bpb} from the log lines."""
    train = {int(m.group(1)): float(m.group(2))
             for m in re.finditer(r"^step (\d+)/\d+ .*\| loss: ([\d.]+)", stdout, re.M)}
    val = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^step (\d+) \| val bpb: ([\d.]+)", stdout, re.M)}
    return train, val

def final_state(base):
    return torch.load(os.path.join(base, CKPT, f"model_{STEPS:06d}.pt"), weights_only=True)

def final_meta(base):
    with open(os.path.join(base, CKPT, f"meta_{STEPS:06d}.json")) as f:
        return json.load(f)

@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_tokenizer):
    """One process, 2 gradient-accumulation steps, checkpoints at steps 3 and 6."""
    base = tmp_path_factory.mktemp("reference")
    make_pretraining_dir(base, tiny_tokenizer)
    stdout = run_script([sys.executable, "-m", "scripts.base_train", *FLAGS], base)
    return base, stdout

def test_reference_run_records_everything_to_resume(reference_run):
    base, stdout = reference_run
    train, val = losses(stdout)
    assert sorted(train) == list(range(1, STEPS + 1)) and sorted(val) == [0, 3, 6]
    assert val[6] < val[0], f"val bpb should fall over training: {val}"
    meta = final_meta(base)
    assert meta["step"] == STEPS and meta["grad_accum_steps"] == 2 and meta["total_batch_size"] == 128
    assert meta["model_config"]["window_pattern"] == "SL" and meta["window_sizes"] == [32, 32]  # S rounds up to 128 > T
    assert len(meta["dataloader_state_dict"]["streams"]) == 2
    val_log = [r["val_bpb"] for r in read_metric_log(base / LOG) if "val_bpb" in r]  # steps 0, 3, 6
    assert meta["val_bpb"] == val_log[-1] and meta["loop_state"]["min_val_bpb"] == min(val_log), (meta, val_log)

def test_resume_is_bit_identical(reference_run, tmp_path):
    base, stdout = reference_run
    resumed = died_before(base, tmp_path / "resumed", CKPT, STEPS)  # resumes from step 3
    with open(resumed / LOG, "a") as f:
        f.write('{"step": 7, "loss": 3.')  # and it died mid-write of a metric line
    resumed_stdout = run_script([sys.executable, "-m", "scripts.base_train", *FLAGS, "--resume"], resumed)
    assert "resuming from" in resumed_stdout and "step 3" in resumed_stdout
    train, val = losses(stdout)
    train_r, val_r = losses(resumed_stdout)
    assert sorted(train_r) == [4, 5, 6]
    assert all(train_r[s] == train[s] for s in train_r) and val_r[6] == val[6]
    reference, result = final_state(base), final_state(resumed)
    assert all(torch.equal(reference[k], result[k]) for k in reference), "resumed weights differ from uninterrupted"
    assert final_meta(resumed)["loop_state"] == final_meta(base)["loop_state"]
    assert final_meta(resumed)["dataloader_state_dict"] == final_meta(base)["dataloader_state_dict"]
    # the metric log: every step once (steps 3+ logged again, the torn line dropped), the same numbers
    reference_log, resumed_log = read_metric_log(base / LOG), read_metric_log(resumed / LOG)
    assert [r["step"] for r in resumed_log] == list(range(STEPS + 1))
    assert [{k: r.get(k) for k in DETERMINISTIC} for r in resumed_log] == \
           [{k: r.get(k) for k in DETERMINISTIC} for r in reference_log]
    assert [r["step"] for r in reference_log if "val_bpb" in r] == [0, 3, 6] and "loss" not in reference_log[-1]

def test_sweep_row_comes_from_the_runs_own_records(reference_run, monkeypatch, tmp_path):
    base, _ = reference_run
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    # what runs/miniseries.sh and runs/scaling_laws.sh append
    from scripts.scaling_analysis import run_row, add_run, COLUMNS
    row, meta = run_row("d2"), final_meta(base)
    assert row["depth"] == 2 and row["num_iterations"] == STEPS and row["tokens_trained"] == STEPS * 128
    assert row["val_bpb"] == meta["val_bpb"] and row["num_scaling_params"] == meta["num_scaling_params"] > 0
    assert row["total_flops"] == meta["flops_per_token"] * STEPS * 128
    assert row["num_params"] == meta["param_counts"]["total"]
    csv_path = tmp_path / "results.csv"
    other = "other_d9,9" + "," * (len(COLUMNS) - 2)
    csv_path.write_text(",".join(COLUMNS) + "\n" + other + "\n")
    add_run("d2", str(csv_path))
    add_run("d2", str(csv_path))  # again: replaces its row, leaves the others as they were
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 3 and lines[1] == other and lines[2].startswith("d2,2,64,")

@pytest.fixture(scope="module")
def ddp_run(reference_run, tmp_path_factory):
    """The reference run on 2 gloo ranks, 1 accumulation step each."""
    ddp = copy_dirs(reference_run[0], tmp_path_factory.mktemp("ddp"), "tokenizer", "base_data_local")
    return ddp, run_script([*TORCHRUN, "-m", "scripts.base_train", "--", *FLAGS], ddp)

def test_two_ranks_equal_one_rank_with_accumulation(reference_run, ddp_run):
    base, stdout = reference_run
    ddp, ddp_stdout = ddp_run
    assert "world size: 2" in ddp_stdout
    train, val = losses(stdout)
    train_d, val_d = losses(ddp_stdout)
    assert train_d.keys() == train.keys() and val_d.keys() == val.keys()
    assert all(abs(train_d[s] - train[s]) < 1e-5 for s in train), (train, train_d)
    assert all(abs(val_d[s] - val[s]) < 1e-5 for s in val), (val, val_d)  # same val set on any number of ranks
    reference, result = final_state(base), final_state(ddp)
    for k in reference:
        assert torch.allclose(reference[k], result[k], atol=1e-5, rtol=1e-4), k
    assert final_meta(ddp)["world_size"] == 2 and final_meta(ddp)["optim_shards"] == 2
    assert os.path.exists(ddp / CKPT / f"optim_{STEPS:06d}_rank1.pt")

def test_bf16_compute_trains_like_fp32(reference_run, tmp_path, monkeypatch):
    # CPUs with AVX512-BF16 or AMX train in bf16 by default (the suite pins fp32). Measured: val
    # bpb falls 0.071 over the 6 steps in both and ends 0.0001 apart; with the bf16 embeddings'
    # updates dropped it ends 0.006 apart.
    base, stdout = reference_run
    bf16 = copy_dirs(base, tmp_path / "bf16", "tokenizer", "base_data_local")
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    bf16_stdout = run_script([sys.executable, "-m", "scripts.base_train", *FLAGS], bf16)
    assert "compute dtype: torch.bfloat16" in bf16_stdout
    (_, val), (_, val_bf16) = losses(stdout), losses(bf16_stdout)
    assert abs(val_bf16[6] - val[6]) < 0.002 and val_bf16[0] - val_bf16[6] > 0.05, (val, val_bf16)

# -----------------------------------------------------------------------------
# Start-up errors (in-process: they fail before any training, so no subprocess is needed)

@pytest.mark.parametrize("flags, error, message", [
    (["--total-batch-size=96", "--model-tag=split"], ValueError,
     r"not divisible by device_batch_size x seq_len x GPUs = 2 x 32 x 1 = 64.*--total-batch-size"),
    (["--head-dim=33", "--model-tag=heads"], ValueError, "head_dim=33 is odd"),
    (["--fp8", "--model-tag=fp8"], RuntimeError, "(?i)drop --fp8"),
], ids=["impossible batch split", "odd head_dim", "fp8 off CUDA"])
def test_bad_flag_fails_at_start(monkeypatch, reference_run, flags, error, message):
    with pytest.raises(error, match=message):
        base_train_in_process(monkeypatch, reference_run[0], *FLAGS, *flags)

def test_missing_tokenizer_and_data(monkeypatch, tmp_path, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="python -m scripts.tok_train"):
        base_train_in_process(monkeypatch, tmp_path, *FLAGS)
    tiny_tokenizer.save(str(tmp_path / "tokenizer"))
    with pytest.raises(FileNotFoundError, match="python -m nanochat.dataset --dataset local"):
        base_train_in_process(monkeypatch, tmp_path, *FLAGS)

@pytest.mark.parametrize("flag, named", [("--window-pattern=L", "window_pattern"), ("--depth=3", "n_layer"),
                                         ("--total-batch-size=256", "total_batch_size"),
                                         ("--max-seq-len=64", "max_seq_len")])
def test_resume_with_a_different_config_fails(monkeypatch, reference_run, flag, named):
    base, _ = reference_run
    with pytest.raises(ValueError, match=f"cannot resume .* different configuration: .*{named}"):
        base_train_in_process(monkeypatch, base, *FLAGS, flag, "--resume", "--model-tag=d2")

class Vocab32K:
    """Stands in for a 32,768-token tokenizer: karpathy/nanochat's batch sizes are stated for that vocab."""
    def get_vocab_size(self):
        return 32768

@pytest.mark.parametrize("depth, batch", [(8, 2 ** 18), (12, 2 ** 19), (16, 2 ** 19), (20, 2 ** 20), (26, 2 ** 20),
                                          (32, 2 ** 21)])
def test_auto_batch_size_follows_depth(monkeypatch, reference_run, depth, batch):
    # B = 2^round(log2(2^19 (N/N_d12)^0.383)): karpathy/nanochat's d8 2^18, d10-16 2^19, d18-26 2^20, d32+ 2^21.
    # 3 rows x 2048 never divides a power of two, so the run stops at the batch check and the message names B.
    import nanochat.tokenizer
    base, _ = reference_run
    monkeypatch.setattr(nanochat.tokenizer, "get_tokenizer", Vocab32K)
    monkeypatch.setattr(nanochat.tokenizer, "get_token_bytes", lambda device: torch.ones(32768, dtype=torch.int32))
    with pytest.raises(ValueError, match=f"total batch {batch:,} tokens is not divisible"):
        base_train_in_process(monkeypatch, base, f"--depth={depth}", "--device-batch-size=3",
                              f"--model-tag=auto{depth}")

# -----------------------------------------------------------------------------
# Never replace a finished run; SIGTERM stops after a step with a checkpoint; a full disk keeps the last checkpoint

def test_fresh_run_refuses_another_runs_checkpoints(monkeypatch, reference_run):
    base, _ = reference_run
    with pytest.raises(FileExistsError, match=rf"{CKPT} holds the checkpoints of an earlier run \(last step {STEPS}\): "
                                              r"add --resume to continue it, or --overwrite"):
        base_train_in_process(monkeypatch, base, *FLAGS)
    with pytest.raises(ValueError, match="pass one of them"):
        base_train_in_process(monkeypatch, base, *FLAGS, "--resume", "--overwrite")
    assert os.path.exists(base / CKPT / f"meta_{STEPS:06d}.json")

def test_overwrite_starts_over_and_periodic_saves_keep_the_newest(reference_run, tmp_path):
    base, _ = reference_run
    again = copy_dirs(base, tmp_path / "again", "tokenizer", "base_data_local", CKPT)
    shutil.copy(again / CKPT / "meta_000003.json", again / CKPT / "meta_000009.json")  # a step this run never makes
    # a time-based save after every step (0.6 ms), the newest 2 kept; step 3 (--save-every) and the last are kept too
    run_script([sys.executable, "-m", "scripts.base_train", *FLAGS, "--overwrite", "--save-every-minutes=0.00001",
                "--keep-periodic=2"], again)
    metas = sorted(f for f in os.listdir(again / CKPT) if f.startswith("meta"))
    assert metas == ["meta_000003.json", "meta_000004.json", "meta_000005.json", "meta_000006.json"]
    assert [json.loads((again / CKPT / f).read_text())["periodic"] for f in metas] == [False, True, True, False]
    assert not any("000001" in f or "000002" in f for f in os.listdir(again / CKPT))
    reference, result = final_state(base), final_state(again)
    assert all(torch.equal(reference[k], result[k]) for k in reference)

def check_stopped_then_resume(stdout, base, expected_command):
    """The run stopped before its end with a checkpoint of the step it stopped at; its printed command resumes it."""
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+);", stdout).group(1))
    assert 0 < stopped < STEPS and sorted(losses(stdout)[0]) == list(range(1, stopped + 1)), stdout[-3000:]
    assert json.loads((base / CKPT / f"meta_{stopped:06d}.json").read_text())["periodic"]
    command = stdout.split("Resume with:\n")[1].splitlines()[0]
    assert command == expected_command
    out = subprocess.run(command, shell=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and f"resuming from {base / CKPT} step {stopped}" in out.stdout, out.stderr[-3000:]

def test_sigterm_saves_and_resume_matches_uninterrupted(reference_run, tmp_path):
    base, _ = reference_run
    stopped = copy_dirs(base, tmp_path / "stopped", "tokenizer", "base_data_local")
    rc, stdout = start_and_signal([sys.executable, "-m", "scripts.base_train", *FLAGS], stopped, lambda p: p.pid)
    assert rc == 128 + signal.SIGTERM, stdout[-3000:]
    check_stopped_then_resume(stdout, stopped, f"NANOCHAT_BASE_DIR={stopped} NANOCHAT_DATASET=local "
                                                   f"python -m scripts.base_train {' '.join(FLAGS)} --resume")
    reference, result = final_state(base), final_state(stopped)
    assert all(torch.equal(reference[k], result[k]) for k in reference), "stopped + resumed differs from uninterrupted"
    assert [{k: r.get(k) for k in DETERMINISTIC} for r in read_metric_log(stopped / LOG)] == \
           [{k: r.get(k) for k in DETERMINISTIC} for r in read_metric_log(base / LOG)]

def rank1_pid(proc):
    """The pid of torchrun's worker with RANK=1 (the signal reaches one rank; rank 0 must learn it from rank 1)."""
    children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
    for pid in children:
        if b"RANK=1" in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
            return int(pid)
    raise AssertionError(f"no RANK=1 among torchrun's children {children}")

def test_sigterm_to_one_rank_stops_both_at_the_same_step(ddp_run, tmp_path):
    ddp, _ = ddp_run
    stopped = copy_dirs(ddp, tmp_path / "stopped", "tokenizer", "base_data_local")
    rc, stdout = start_and_signal([*TORCHRUN, "-m", "scripts.base_train", "--", *FLAGS], stopped, rank1_pid)
    step = int(re.search(r"stopped by SIGTERM at step (\d+);", stdout).group(1))
    assert json.loads((stopped / CKPT / f"meta_{step:06d}.json").read_text())["optim_shards"] == 2
    assert rc != 0 and stdout.count(f"stopped by SIGTERM at step {step};") == 1, stdout[-3000:]  # rank 0 prints
    check_stopped_then_resume(stdout, stopped,
                              f"NANOCHAT_BASE_DIR={stopped} NANOCHAT_DATASET=local torchrun --standalone "
                              f"--nproc_per_node=2 -m scripts.base_train -- {' '.join(FLAGS)} --resume")
    reference, result = final_state(ddp), final_state(stopped)
    assert all(torch.equal(reference[k], result[k]) for k in reference), "stopped + resumed differs from uninterrupted"

def test_second_signal_exits_at_once(tmp_path):
    # one stop request; a repeat within 2 s is the launcher forwarding the same Ctrl-C; a later one exits at once
    code = ("import os, signal, time\nfrom nanochat.checkpoint import handle_stop_signals, stop_or_save_due\n"
            "handle_stop_signals()\nos.kill(os.getpid(), signal.SIGINT)\nos.kill(os.getpid(), signal.SIGINT)\n"
            "print('flags', stop_or_save_due(time.time(), -1), flush=True)\ntime.sleep(2.1)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(5)\nprint('still running')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 128 + signal.SIGTERM, out
    assert out.stdout.count("SIGINT: finishing this step") == 1 and f"flags ({int(signal.SIGINT)}, False)" in out.stdout
    assert "SIGTERM again: exiting now" in out.stdout and "still running" not in out.stdout

def test_disk_full_keeps_the_last_checkpoint_and_log(reference_run, tmp_path):
    base, _ = reference_run
    full = died_before(base, tmp_path / "full", CKPT, STEPS)  # resumes from step 3, saves step 6
    limit = os.path.getsize(base / CKPT / f"model_{STEPS:06d}.pt") // 2  # the metric log and meta stay far below

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(full), NANOCHAT_DATASET="local", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-m", "scripts.base_train", *FLAGS, "--resume"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    assert out.returncode != 0
    message = out.stderr.strip().splitlines()[-1]
    assert re.search(rf"saving step {STEPS} into {full / CKPT} failed: File too large\. This rank's files need about "
                     rf"[\d,]+ bytes there", message), out.stderr[-3000:]
    needed = int(re.search(r"about ([\d,]+) bytes", message).group(1).replace(",", ""))
    assert 0.9 < needed / os.path.getsize(base / CKPT / f"model_{STEPS:06d}.pt") < 3  # model + Adam/Muon state
    assert sorted(os.listdir(full / CKPT)) == ["meta_000003.json", "model_000003.pt", "optim_000003_rank0.pt"]
    assert [r["step"] for r in read_metric_log(full / LOG)] == list(range(STEPS))  # steps 0-5, every line whole
    run_script([sys.executable, "-m", "scripts.base_train", *FLAGS, "--resume"], full)  # space freed: it resumes
    reference, result = final_state(base), final_state(full)
    assert all(torch.equal(reference[k], result[k]) for k in reference)

def test_val_shard_of_empty_documents_is_one_line(tmp_path, tiny_tokenizer):
    make_pretraining_dir(tmp_path, tiny_tokenizer)
    pq.write_table(pa.table({"text": [""] * 200}), str(tmp_path / "base_data_local" / "shard_00009.parquet"))
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), NANOCHAT_DATASET="local", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-m", "scripts.base_train", *FLAGS], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert re.fullmatch(r"error: val bpb at step 0: bits per byte is undefined: .*no text bytes.*re-download the val "
                        r"shard.*", out.stderr.strip()), out.stderr
