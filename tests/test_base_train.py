"""
End-to-end tests of scripts/base_train.py on a tiny model, tiny tokenizer and tiny local shards (CPU):
an interrupted-then-resumed run is bit-identical to an uninterrupted one; 2 gloo ranks train the same model as
1 process with 2 accumulation steps; bad inputs fail at start-up naming the fix.
"""

import json
import os
import random
import re
import runpy
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.report import read_metric_log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
FLAGS = ["--depth=2", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=32", "--window-pattern=SL",
         "--device-batch-size=2", "--total-batch-size=128", f"--num-iterations={STEPS}", "--warmup-steps=1",
         "--eval-every=3", "--eval-tokens=256", "--core-metric-every=-1", "--sample-every=-1", "--save-every=3"]
CKPT = os.path.join("base_checkpoints", "d2")
LOG = os.path.join("logs", "base_d2.jsonl")
DETERMINISTIC = ("step", "flops", "loss", "smooth_loss", "lrm", "epoch", "val_bpb")  # not dt, tok/s, time

def make_base_dir(path, tokenizer):
    """Tokenizer plus local-dataset shards (2 train, 1 val) of short documents, 20 docs per row group."""
    tokenizer.save(str(path / "tokenizer"))
    data_dir = path / "base_data_local"
    data_dir.mkdir(parents=True)
    words = "the cat sat on a mat while 12 dogs ran to the park , and then ! she said hello world".split()
    rng = random.Random(0)
    for index in (0, 1, 9):
        texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) for _ in range(200)]
        pq.write_table(pa.table({"text": texts}), str(data_dir / f"shard_{index:05d}.parquet"), row_group_size=20)

def run(cmd, base):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_DATASET="local", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

def copy_dirs(base, dest, *names):
    """A fresh base dir holding copies of base/<name> for each name (the DDP run starts from the same inputs)."""
    for name in names:
        shutil.copytree(base / name, dest / name)
    return dest

def died_before(base, dest, checkpoint_dir, step):
    """A copy of base without `step`'s checkpoint files: a run that died before saving that step."""
    shutil.copytree(base, dest)
    for f in os.listdir(dest / checkpoint_dir):
        if f"{step:06d}" in f:
            os.remove(dest / checkpoint_dir / f)
    return dest

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
    make_base_dir(base, tiny_tokenizer)
    stdout = run([sys.executable, "-m", "scripts.base_train", *FLAGS], base)
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
    resumed_stdout = run([sys.executable, "-m", "scripts.base_train", *FLAGS, "--resume"], resumed)
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

def test_two_ranks_equal_one_rank_with_accumulation(reference_run, tmp_path):
    base, stdout = reference_run
    ddp = copy_dirs(base, tmp_path / "ddp", "tokenizer", "base_data_local")
    ddp_stdout = run([*TORCHRUN, "-m", "scripts.base_train", "--", *FLAGS], ddp)
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

# -----------------------------------------------------------------------------
# Start-up errors (in-process: they fail before any training, so no subprocess is needed)

def run_in_process(monkeypatch, base, *flags):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_DATASET", "local")
    monkeypatch.setattr(sys, "argv", ["base_train", *flags])
    runpy.run_module("scripts.base_train", run_name="__main__")

@pytest.mark.parametrize("flags, error, message", [
    (["--total-batch-size=96", "--model-tag=split"], ValueError,
     r"not divisible by device_batch_size x seq_len x GPUs = 2 x 32 x 1 = 64.*--total-batch-size"),
    (["--head-dim=33", "--model-tag=heads"], ValueError, "head_dim=33 is odd"),
    (["--fp8", "--model-tag=fp8"], RuntimeError, "(?i)drop --fp8"),
], ids=["impossible batch split", "odd head_dim", "fp8 off CUDA"])
def test_bad_flag_fails_at_start(monkeypatch, reference_run, flags, error, message):
    with pytest.raises(error, match=message):
        run_in_process(monkeypatch, reference_run[0], *FLAGS, *flags)

def test_missing_tokenizer_and_data(monkeypatch, tmp_path, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="python -m scripts.tok_train"):
        run_in_process(monkeypatch, tmp_path, *FLAGS)
    tiny_tokenizer.save(str(tmp_path / "tokenizer"))
    with pytest.raises(FileNotFoundError, match="python -m nanochat.dataset --dataset local"):
        run_in_process(monkeypatch, tmp_path, *FLAGS)

@pytest.mark.parametrize("flag, named", [("--window-pattern=L", "window_pattern"), ("--depth=3", "n_layer"),
                                         ("--total-batch-size=256", "total_batch_size"),
                                         ("--max-seq-len=64", "max_seq_len")])
def test_resume_with_a_different_config_fails(monkeypatch, reference_run, flag, named):
    base, _ = reference_run
    with pytest.raises(ValueError, match=f"cannot resume .* different configuration: .*{named}"):
        run_in_process(monkeypatch, base, *FLAGS, flag, "--resume", "--model-tag=d2")

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
        run_in_process(monkeypatch, base, f"--depth={depth}", "--device-batch-size=3", f"--model-tag=auto{depth}")
