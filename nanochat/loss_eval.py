"""
Bits per byte (bpb): the validation loss that does not depend on the tokenizer.

Mean cross-entropy per token changes with the vocabulary (a bigger vocab packs more bytes into each
token and so has a larger loss per token), so we normalise by the UTF-8 bytes the targets stand for:
    bpb = sum of nats over real target tokens / (ln 2 * sum of their bytes)
Special tokens (<|bos|> etc.) stand for no text: token_bytes gives them 0 bytes and their loss is
left out. Targets < 0 are padding/ignored and count for nothing.

Used by scripts/base_train.py (val bpb), scripts/base_eval.py (train and val bpb) and chat_sft.
Leaves out: per-document or per-domain breakdowns.
"""

import math

import torch
import torch.distributed as dist

from nanochat.common import is_dist

@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """
    Run `steps` batches of (inputs, targets) (or (inputs, targets, state), as the pretraining loader
    yields) through model(inputs, targets, loss_reduction="none") and return bits per byte.
    Under a multi-rank group every rank must call this with the same `steps`; sums are all-reduced.
    token_bytes: int tensor [vocab] of UTF-8 byte lengths, 0 for special tokens.
    Raises ValueError when the targets hold no bytes at all (bpb is undefined: a val set of empty
    documents).
    """
    device = token_bytes.device
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # nats, bytes (exact below 2^53)
    batch_iter = iter(batches)
    for _ in range(steps):
        x, y = next(batch_iter)[:2]
        loss = model(x, y, loss_reduction="none").view(-1)  # (B*T,) nats, 0 where ignored
        y = y.view(-1).to(device)
        # indexing token_bytes with -1 would silently read the last entry: clamp, then zero out
        num_bytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
        nats = torch.where(num_bytes > 0, loss.to(device, torch.float64), 0.0).sum()
        totals += torch.stack([nats, num_bytes.sum().double()])
    if is_dist():
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    total_nats, total_bytes = totals.tolist()
    if total_bytes == 0:
        raise ValueError(f"bits per byte is undefined: the {steps} evaluation batches hold no text "
                         f"bytes (only padding and special tokens: empty validation documents); "
                         f"rebuild or re-download the val shard (python -m nanochat.dataset)")
    return total_nats / (math.log(2) * total_bytes)
