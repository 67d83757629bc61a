"""
The chat stages' recipes and their epoch, end to end through scripts/chat_sft.main on a tiny model (depth 2, width
64, T 96), the tiny tokenizer and a 40-conversation task whose every conversation names its index ("item 17"):
- one epoch trains every conversation exactly once and then stops, at 1 rank and at 2 gloo ranks (read from the
  rows each training micro-batch actually receives, not from the loader's bookkeeping);
- karpathy/nanochat's recipes: mid-training lrs 0.2/0.004/0.02 x 1.0 and SFT x 0.02 on every group (the values by
  hand: D2 in conftest.py), no batch-size factor whatever the source's lrs and batch, Muon momentum ramp (mid)
  or constant 0.95 (SFT), SFT's 32 conversations per step, one per row in the stream's order (--pack=1 packs them);
- SFT warm-started from a 2-rank mid checkpoint on 1 rank warns, starts the momenta fresh and goes on.
"""

import math
import os
import re
import shutil
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

from nanochat.checkpoint import find_last_step, load_meta
from conftest import D2, MID, SFT, NumberedTask, by_group, checkpoint, make_base_checkpoint_dir

N = 40  # conversations in the training task

def run_recorded(base, stage, flags, setattr_fn=setattr, rows=None):
    """main(stage) on NumberedTask in this process -> the item numbers of every trained micro-batch, in order
    (and, into `rows` if given, those of each row: [] for padding)."""
    import scripts.chat_sft as chat_sft
    from nanochat.tokenizer import get_tokenizer
    tokenizer = get_tokenizer()
    loss_fn = chat_sft.token_weighted_loss
    trained = []

    def recording_loss(model, inputs, targets, num_supervised):
        for row in inputs.tolist():
            items = [int(m) for m in re.findall(r"item (\d+)", tokenizer.decode(row))]
            trained.extend(items)
            if rows is not None:
                rows.append(items)
        return loss_fn(model, inputs, targets, num_supervised)

    setattr_fn(chat_sft, "build_mixture", lambda stage, mixture: (NumberedTask(N), NumberedTask(8), []))
    setattr_fn(chat_sft, "token_weighted_loss", recording_loss)
    setattr_fn(sys, "argv", [stage, "--mixture=synthetic", "--eval-every=-1", "--chat-eval-every=0", "--model-tag=d2",
                             *flags])
    chat_sft.main(stage)
    return trained

def _worker(rank, world_size, port, base, stage, flags, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), NANOCHAT_BASE_DIR=str(base), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    trained = run_recorded(base, stage, flags)
    with open(os.path.join(out_dir, f"trained_{rank}.txt"), "w") as f:
        f.write(" ".join(map(str, trained)))

def run_two_ranks(base, stage, flags, out_dir):
    """-> the item numbers trained on each of 2 gloo ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, str(base), stage, flags, str(out_dir)), nprocs=2, join=True,
                       start_method="spawn")
    return [list(map(int, open(os.path.join(out_dir, f"trained_{r}.txt")).read().split())) for r in range(2)]

def last_step(base, directory):
    return find_last_step(str(base / directory))

def muon_momenta(base, directory, step, rank=0):
    state = torch.load(os.path.join(base, directory, f"optim_{step:06d}_rank{rank}.pt"), weights_only=True)
    return [g["momentum"] for g in state["param_groups"] if g.get("kind") == "muon"]

MID_FLAGS = ["--device-batch-size=1", "--total-batch-size=192"]

@pytest.fixture(scope="module")
def mid_two_ranks(tmp_path_factory, tiny_tokenizer):
    """Mid-training of one epoch on 2 gloo ranks (a 96-token row each) from a base whose lrs are not the recipe's."""
    base = tmp_path_factory.mktemp("recipe")
    # pretraining lrs 0.25/0.005/0.03 and 192-token batches: neither may leak in
    make_base_checkpoint_dir(base, tiny_tokenizer)
    out = tmp_path_factory.mktemp("trained")
    return base, run_two_ranks(base, "mid", MID_FLAGS, out)

def check_mid_epoch(base, trained, tokenizer):
    assert sorted(trained) == list(range(N)), sorted(trained)  # each once: none left in a buffer, none repeated
    step = last_step(base, MID)
    meta = load_meta(str(base / MID), step)
    assert meta["loop_state"]["progress"] == 1.0
    assert by_group(meta["initial_lrs"]) == pytest.approx(D2["mid"], rel=1e-9)  # x 1.0, no batch-size factor
    # the momentum ramp 0.85 -> 0.95 over 300 steps, as set for the last step trained (step - 1)
    momenta = muon_momenta(base, MID, step)
    assert momenta == pytest.approx([0.85 + 0.1 * (step - 1) / 300] * len(momenta))
    return step

def test_mid_epoch_trains_every_conversation_once_one_rank(tmp_path, tiny_tokenizer, monkeypatch):
    make_base_checkpoint_dir(tmp_path, tiny_tokenizer)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    trained = run_recorded(tmp_path, "mid", MID_FLAGS, monkeypatch.setattr)  # 1 row x 2 accumulation steps
    check_mid_epoch(tmp_path, trained, tiny_tokenizer)

def test_mid_epoch_trains_every_conversation_once_two_ranks(mid_two_ranks, tiny_tokenizer):
    base, trained = mid_two_ranks
    assert all(trained)  # both ranks trained
    check_mid_epoch(base, trained[0] + trained[1], tiny_tokenizer)

def test_sft_recipe_and_warm_start_from_two_ranks(mid_two_ranks, tiny_tokenizer, tmp_path, monkeypatch, capsys):
    """SFT from the 2-rank mid checkpoint on 1 rank: warns and starts the momenta fresh (same as --load-optimizer=0).
    Rows of 8, 32 conversations per step: 4 micro-batches (streams) of 8 rows, one conversation per row, each stream
    in its order (k, k + 4, k + 8, ...): a packer's largest-first pick would put the 10-filler items 4, 9, ... first."""
    base, _ = mid_two_ranks
    assert load_meta(str(base / MID), last_step(base, MID))["optim_shards"] == 2
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    runs = {}
    for load in (1, 0):
        rows = []
        trained = run_recorded(base, "sft", [f"--load-optimizer={load}", "--device-batch-size=8"], monkeypatch.setattr,
                               rows)
        assert sorted(trained) == list(range(N))
        assert all(len(items) <= 1 for items in rows), rows
        for k in range(4):
            assert [i for i in trained if i % 4 == k] == list(range(k, N, 4)), trained
        runs[load] = checkpoint(base, SFT, last_step(base, SFT))
        shutil.move(base / SFT, tmp_path / f"sft_{load}")
    stdout = capsys.readouterr().out
    assert "WARNING: --load-optimizer=1 but mid d2 step" in stdout and "saved optimizer shards for 2 rank(s)" in stdout
    (warm, meta), (fresh, _) = runs[1], runs[0]
    for k in fresh:
        assert torch.equal(warm[k], fresh[k]), k
    # 32 conversations per step: 40 take 2 steps; the recipe's lrs x 0.02; momentum constant 0.95
    assert meta["step"] == math.ceil(N / 32) == 2 and meta["examples_per_step"] == 32
    assert "one epoch = 2 steps of 32 conversations" in stdout
    assert by_group(meta["initial_lrs"]) == pytest.approx(D2["sft"], rel=1e-9)  # x 0.02, smear/backout included
    assert set(muon_momenta(tmp_path, "sft_0", 2)) == {0.95}
    assert "matrix_lr 0.02 (sft recipe)" in stdout and "max_seq_len 96 (mid checkpoint)" in stdout
    assert "pack 0 (sft recipe)" in stdout and "batch 3,072 tokens = 8 x 96 x 1 GPUs x 4 |" in stdout

def test_sft_pack_flag_packs_conversations(mid_two_ranks, monkeypatch, tmp_path):
    """--pack=1: several conversations share a row (mid-training's packer), still each trained once an epoch."""
    base = tmp_path / "base"
    shutil.copytree(mid_two_ranks[0], base)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    rows = []
    trained = run_recorded(base, "sft", ["--pack=1", "--device-batch-size=8"], monkeypatch.setattr, rows)
    assert sorted(trained) == list(range(N))
    assert max(len(items) for items in rows) > 1, rows
