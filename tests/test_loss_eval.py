"""
Bits-per-byte tests against a hand computation: a 4-token vocabulary with known byte lengths
(token 0 special, 0 bytes) and a fake model whose next-token probabilities are fixed powers of 1/2,
so every loss is a whole number of bits. Also checks the all-reduce on 2 gloo processes.
"""

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from nanochat.loss_eval import evaluate_bpb

# token:            0 (special)  1    2    3
PROBS = torch.tensor([1 / 8, 1 / 2, 1 / 4, 1 / 8])  # -log2 p = 3, 1, 2, 3 bits (exact up to fp32 rounding)
TOKEN_BYTES = torch.tensor([0, 4, 1, 2], dtype=torch.int32)

class FixedModel(nn.Module):
    """Predicts PROBS at every position, whatever the input; follows the GPT forward contract."""
    def forward(self, idx, targets=None, loss_reduction="mean"):
        logits = PROBS.log().expand(*idx.shape, 4)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, 4), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)
        return loss.view(targets.shape) if loss_reduction == "none" else loss

# two batches as the pretraining loader yields them: (inputs, targets, state); inputs do not matter to FixedModel
TARGETS = [torch.tensor([[1, 2, 0, -1, 3]]), torch.tensor([[3, 3, 1, -1, -1]])]
BATCHES = [(torch.zeros_like(y), y, {"batch": i}) for i, y in enumerate(TARGETS)]
# by hand, skipping the special target 0 and the ignored -1s:
#   row 0: tokens 1, 2, 3 -> 1 + 2 + 3 = 6 bits over 4 + 1 + 2 = 7 bytes
#   row 1: tokens 3, 3, 1 -> 3 + 3 + 1 = 7 bits over 2 + 2 + 4 = 8 bytes
EXPECTED_BPB = 13 / 15

def test_bpb_matches_hand_computation():
    assert math.isclose(evaluate_bpb(FixedModel(), iter(BATCHES), 2, TOKEN_BYTES), EXPECTED_BPB, rel_tol=1e-6)
    # plain (inputs, targets) pairs work too, and only `steps` batches are read
    pairs = [(x, y) for x, y, _ in BATCHES] + [(None, None)]  # a third batch would crash if it were read
    assert math.isclose(evaluate_bpb(FixedModel(), iter(pairs), 2, TOKEN_BYTES), EXPECTED_BPB, rel_tol=1e-6)
    # one batch alone: 6 bits / 7 bytes
    assert math.isclose(evaluate_bpb(FixedModel(), iter(BATCHES), 1, TOKEN_BYTES), 6 / 7, rel_tol=1e-6)

def test_bpb_without_bytes_is_an_error():
    # was float("inf"), which base_train wrote into its meta as non-standard JSON "Infinity"
    only_special_and_ignored = [(torch.zeros(1, 4, dtype=torch.long), torch.tensor([[0, -1, 0, -1]]))]
    with pytest.raises(ValueError, match="no text bytes"):
        evaluate_bpb(FixedModel(), iter(only_special_and_ignored), 1, TOKEN_BYTES)

def _worker(rank, world_size, port, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    bpb = evaluate_bpb(FixedModel(), iter(BATCHES[rank::world_size]), 1, TOKEN_BYTES)  # each rank sees one batch
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(bpb, f)
    dist.destroy_process_group()

def test_bpb_sums_across_two_processes(tmp_path, free_port):
    out_path = str(tmp_path / "bpb")
    mp.spawn(_worker, args=(2, free_port, out_path), nprocs=2, join=True)
    for rank in range(2):
        with open(f"{out_path}.{rank}") as f:
            assert math.isclose(json.load(f), EXPECTED_BPB, rel_tol=1e-6)  # every rank gets the global answer
