"""
Artifacts cannot be mixed, swapped or silently corrupted:
- one run per checkpoint directory (a second one fails at start naming the holder's pid/host and --model-tag; the
  lock dies with its holder, even on kill -9);
- every checkpoint file and the meta itself are checked against the sha256 recorded at save time (a flipped bit in
  the weights, an edited sequence_len, a meta whose hashes were removed), the tokenizer against its fingerprint
  (same vocab size, other merges);
- temp files of a killed save are removed by the next save in the directory;
- --resume with flags that change the trajectory fails naming them unless --resume-override, which then uses them.
"""

import json
import os
import runpy
import signal
import socket
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.checkpoint import (save_checkpoint, load_model, load_checkpoint, lock_checkpoint_dir, check_resume_flags,
                                 find_last_step, meta_sha256)
from nanochat.tokenizer import Tokenizer
from conftest import REPO, TINY_CORPUS, base_train_in_process, make_pretraining_dir, save_tiny_gpt

def saved_d2(base_dir, tokenizer):
    """-> the directory of base checkpoint d2 step 7, saved as base_train saves it."""
    save_tiny_gpt(base_dir, tokenizer)
    return base_dir / "base_checkpoints" / "d2"

# -----------------------------------------------------------------------------
# one run per directory

HOLDER = """
import sys, time
from nanochat.checkpoint import lock_checkpoint_dir
for directory in sys.argv[1:]:
    lock_checkpoint_dir(directory, "d2")
print("locked", flush=True)
time.sleep(120)
"""

def start_holder(*directories):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, directories)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=REPO))
    assert holder.stdout.readline().strip() == "locked"
    return holder

def test_second_run_on_a_directory_fails_naming_the_first(tmp_path, monkeypatch, tiny_tokenizer):
    make_pretraining_dir(tmp_path, tiny_tokenizer)
    directory, mid_directory = tmp_path / "base_checkpoints" / "d2", tmp_path / "mid_checkpoints" / "d2"
    holder = start_holder(directory, mid_directory)  # another process, as a concurrent run on another terminal would be
    try:
        with pytest.raises(RuntimeError, match=rf"being written by another run \(pid {holder.pid} on host "
                                               rf"{socket.gethostname()}.*different --model-tag \(this run's: d2\)"):
            run_base_train(monkeypatch, tmp_path, "--num-iterations=2")
        assert not directory.exists()  # refused before training: nothing written, not even an empty tag directory
        save_tiny_gpt(tmp_path, tiny_tokenizer)  # a base model for mid-training (chat_sft's loop) to start from
        monkeypatch.setattr(sys, "argv", ["mid_train", "--mixture=synthetic", "--device-type=cpu"])
        with pytest.raises(RuntimeError, match=rf"{mid_directory} is being written by another run \(pid {holder.pid}"):
            runpy.run_module("scripts.mid_train", run_name="__main__")
    finally:
        holder.send_signal(signal.SIGKILL)  # as a crash: the OS drops the lock with the process
        holder.wait()
    lock_checkpoint_dir(str(directory), "d2")
    lock_checkpoint_dir(str(directory), "d2")  # the holder may ask again (a script run twice in one process)
    assert json.load(open(f"{directory}.lock.json"))["pid"] == os.getpid()

# -----------------------------------------------------------------------------
# verified on load

def test_flipped_bit_in_the_weights_is_an_error(base_dir, tiny_tokenizer):
    directory = saved_d2(base_dir, tiny_tokenizer)
    path = directory / "model_000007.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit, inside the tensor data: torch.load alone would not notice
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"model_000007\.pt is corrupt: its sha256 .* Restore the file, or delete"):
        load_model("base", "cpu")

def test_edited_sequence_len_is_an_error(base_dir, tiny_tokenizer):
    directory = saved_d2(base_dir, tiny_tokenizer)
    meta_path = directory / "meta_000007.json"
    meta = json.load(open(meta_path))
    meta["model_config"]["sequence_len"] = 4096
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"meta_000007\.json was edited after it was saved"):
        load_model("base", "cpu")
    del meta["meta_sha256"]  # an edit that also dropped the hashes is caught all the same
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"meta_000007\.json was edited after it was saved"):
        load_model("base", "cpu")
    del meta["sha256"]
    meta_path.write_text(json.dumps(dict(meta, meta_sha256=meta_sha256(meta))))
    with pytest.raises(ValueError, match=r"meta_000007\.json was edited after it was saved"):
        load_model("base", "cpu")

def test_a_different_tokenizer_of_the_same_size_is_an_error(base_dir, tiny_tokenizer):
    saved_d2(base_dir, tiny_tokenizer)
    reversed_corpus = iter([t[::-1] for t in TINY_CORPUS])
    other = Tokenizer.train_from_iterator(reversed_corpus, vocab_size=tiny_tokenizer.get_vocab_size())
    other.save(str(base_dir / "tokenizer"))
    with pytest.raises(ValueError, match=r"is not the one base d2 step 7 was trained with"):
        load_model("base", "cpu")

def test_meta_that_is_not_an_object(tmp_path):
    d = str(tmp_path)
    save_checkpoint(d, 1, {"w": torch.ones(2)}, None, {})
    save_checkpoint(d, 2, {"w": torch.ones(2)}, None, {})
    (tmp_path / "meta_000002.json").write_text("[1, 2]")
    assert find_last_step(d) == 1  # the newest is skipped, the previous step is still found
    with pytest.raises(ValueError, match=r"meta_000002\.json holds a JSON list"):
        load_checkpoint(d, 2, "cpu")

# -----------------------------------------------------------------------------
# orphaned temp files

def test_next_save_removes_temp_files_of_a_killed_save(tmp_path):
    orphans = ["model_000003.pt.tmp4242", "optim_000003_rank0.pt.tmp4242", "meta_000003.json.tmp4242"]
    others = ["optim_000003_rank1.pt.tmp4343", "notes.tmp1"]  # rank 1's own (it cleans those), not ours
    for name in orphans + others:
        (tmp_path / name).write_bytes(b"half a file")
    save_checkpoint(str(tmp_path), 4, {"w": torch.ones(2)}, {"m": torch.zeros(2)}, {})
    step_files = ["model_000004.pt", "optim_000004_rank0.pt", "meta_000004.json"]
    assert sorted(os.listdir(tmp_path)) == sorted(step_files + others)
    save_checkpoint(str(tmp_path), 4, {"w": torch.ones(2)}, {"m": torch.zeros(2)}, {}, rank=1)
    assert "optim_000003_rank1.pt.tmp4343" not in os.listdir(tmp_path)

# -----------------------------------------------------------------------------
# resume with flags that change the trajectory

TRAIN_FLAGS = ["--depth=2", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=32", "--window-pattern=SL",
               "--device-batch-size=2", "--total-batch-size=64", "--warmup-steps=1", "--eval-every=-1",
               "--core-metric-every=-1", "--sample-every=-1", "--device-type=cpu", "--compile=0"]

def run_base_train(monkeypatch, base, *flags):
    base_train_in_process(monkeypatch, base, *TRAIN_FLAGS, *flags)

def test_check_resume_flags():
    saved = {"matrix_lr": 0.02, "warmup_steps": 40, "seed": 1}
    assert check_resume_flags(saved, dict(saved, run="x"), ["matrix_lr", "warmup_steps", "seed"], False) == []
    with pytest.raises(ValueError, match=r"--warmup-steps: checkpoint 40 vs now 10; --seed: checkpoint 1 vs now 2\. "
                                         r".*--resume-override"):
        check_resume_flags(saved, dict(saved, warmup_steps=10, seed=2), ["matrix_lr", "warmup_steps", "seed"], False)
    assert check_resume_flags(saved, dict(saved, seed=2), ["seed"], True) == ["--seed: checkpoint 1 vs now 2"]

def test_base_train_resume_with_new_lr_needs_override_and_then_uses_it(tmp_path, monkeypatch, tiny_tokenizer):
    make_pretraining_dir(tmp_path, tiny_tokenizer)
    run_base_train(monkeypatch, tmp_path, "--num-iterations=4", "--save-every=2")
    directory = str(tmp_path / "base_checkpoints" / "d2")
    original_state, _, original = load_checkpoint(directory, 4, "cpu")
    changed = ["--num-iterations=4", "--resume-from-step=2", "--matrix-lr=0.01", "--warmdown-ratio=0.5"]
    with pytest.raises(ValueError, match=r"--matrix-lr: checkpoint 0\.02 vs now 0\.01; --warmdown-ratio: checkpoint "
                                         r"0\.65 vs now 0\.5\. .*--resume-override"):
        run_base_train(monkeypatch, tmp_path, *changed)
    run_base_train(monkeypatch, tmp_path, *changed, "--resume-override")
    resumed_state, _, resumed = load_checkpoint(directory, 4, "cpu")
    for name, lr in original["initial_lrs"].items():  # the new Muon LR is what trained steps 3-4, not the restored one
        assert resumed["initial_lrs"][name] == pytest.approx(lr / 2 if name.startswith("muon") else lr), name
    assert any(not torch.equal(original_state[k], resumed_state[k]) for k in original_state)

# -----------------------------------------------------------------------------
# shards

def test_truncated_shard_names_the_file_and_the_fix(base_dir, monkeypatch):
    from nanochat import dataset
    monkeypatch.delenv("NANOCHAT_DATASET", raising=False)
    data_dir = base_dir / "base_data_climbmix"
    data_dir.mkdir()
    for index in (0, 3):
        pq.write_table(pa.table({"text": [f"doc {i} " * 20 for i in range(40)]}),
                       str(data_dir / f"shard_{index:05d}.parquet"), row_group_size=10)
    path = data_dir / "shard_00003.parquet"
    path.write_bytes(path.read_bytes()[:-100])  # the footer is gone
    fix = rf"rm {path} && python -m nanochat\.dataset -n 4 --dataset climbmix"
    with pytest.raises(RuntimeError, match=rf"cannot read shard {path} .*truncated or corrupt.*{fix}"):
        dataset.num_row_groups(str(path))
    with pytest.raises(RuntimeError, match=rf"cannot read shard {path} .*{fix}"):
        list(dataset.parquets_iter_batched(None))
    good = data_dir / "shard_00000.parquet"
    data = good.read_bytes()
    third = len(data) // 3
    good.write_bytes(data[:third] + bytes(len(data) - 2 * third) + data[-third:])  # the middle third zeroed
    with pytest.raises(RuntimeError, match=rf"cannot read shard {good} "):
        dataset.read_row_group(str(good), 1)

def test_download_is_verified_before_the_rename(http_server, base_dir, monkeypatch):
    from nanochat import dataset
    monkeypatch.setenv("NANOCHAT_DATA_URL", http_server.url)
    monkeypatch.setattr(dataset, "DOWNLOAD_BACKOFF", 0.0)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": ["hello world"] * 10}), sink)
    shard = sink.getvalue().to_pybytes()
    http_server.routes["/shard_00000.parquet"] = shard[:-50]  # a short body with a matching Content-Length
    http_server.routes["/shard_06542.parquet"] = shard
    failed = dataset.download_shards(1, "climbmix", num_workers=1)
    assert failed == ["shard_00000.parquet"] and http_server.hits["/shard_00000.parquet"] == dataset.DOWNLOAD_ATTEMPTS
    assert sorted(os.listdir(base_dir / "base_data_climbmix")) == ["shard_06542.parquet"]  # no bad file, no temp file
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"body": ["no text column"]}), sink)
    http_server.routes["/shard_00000.parquet"] = sink.getvalue().to_pybytes()
    assert dataset.download_shards(1, "climbmix", num_workers=1) == ["shard_00000.parquet"]
    http_server.routes["/shard_00000.parquet"] = shard
    assert dataset.download_shards(1, "climbmix", num_workers=1) == []
