"""
Causal sliding-window attention, one exact implementation per device.

Every implementation takes q (B, Tq, H, D) and k, v (B, Tk, Hkv, D) with Tq <= Tk and the queries
aligned to the END of the keys: query i sits at key position Tk - Tq + i and sees key j iff 0 <=
pos_i - j <= window. H must be a multiple of Hkv (query head h reads kv head h // (H / Hkv)). Each
returns (B, Tq, H, D).

    y = attention(q, k, v, window)       # picks per device: fa3 | flex on CUDA, sdpa on CPU/MPS
    print0(attention_banner(device, window_sizes, sequence_len))   # scripts say which path runs

FA3 comes from the `kernels` package when it is installed (CUDA, bf16); otherwise, on CUDA,
FlexAttention for sliding windows in a compiled model (SDPA with a mask uncompiled) and SDPA's flash
kernel for full causal; SDPA on CPU/MPS. attention_reference is an explicit masked softmax that the
tests hold the others to. ATTN_IMPL forces one (tests, debugging).
"""

import functools
import importlib.util
import math
import os

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from nanochat.common import COMPUTE_DTYPE, print0

ATTN_IMPL = None  # None = pick per device; "fa3" | "flex" | "sdpa" | "reference" forces one
FLEX_BLOCK = 128

def visible_mask(Tq, Tk, window, device):
    """(Tq, Tk) boolean: causal within a left window, queries aligned to the end of the keys."""
    dist = torch.arange(Tk - Tq, Tk, device=device)[:, None] - torch.arange(Tk, device=device)
    return (dist >= 0) & (dist <= window)

def attention_reference(q, k, v, window):
    """Explicit masked softmax in fp32: slow, obviously right, the yardstick for the fast paths."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.size(1), k.size(2)
    k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(D)
    scores = scores.masked_fill(~visible_mask(Tq, Tk, window, q.device), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.float()).to(q.dtype)

def attention_sdpa(q, k, v, window):
    """torch SDPA: is_causal for plain causal, sliced keys for one-token decode, else an explicit
    (Tq, Tk) mask."""
    Tq, Tk = q.size(1), k.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if Tq == 1:  # decode: the last window+1 keys are exactly the visible ones, no mask needed
        y = sdpa_heads_first(q, k[:, :, -(window + 1):], v[:, :, -(window + 1):])
    elif Tq == Tk and window >= Tk - 1:
        y = sdpa_heads_first(q, k, v, is_causal=True)
    else:  # sliding window or a chunk appended to a cache: SDPA's is_causal aligns top-left
        y = sdpa_heads_first(q, k, v, mask=visible_mask(Tq, Tk, window, q.device))
    return y.transpose(1, 2)

def sdpa_heads_first(q, k, v, mask=None, is_causal=False):
    """q (B, H, Tq, D), k and v (B, Hkv, Tk, D) -> (B, H, Tq, D): torch SDPA, or for one query on
    CPU attention_one_query (which sees every key: is_causal is for Tq == Tk > 1 only)."""
    if q.size(2) == 1 and q.device.type == "cpu":
        assert not is_causal, "one query: pass its visible keys, not is_causal (SDPA: top-left)"
        return attention_one_query(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=q.size(1) != k.size(1))

def attention_one_query(q, k, v, mask=None):
    """
    Decoding on CPU: q (B, H, 1, D), k and v (B, Hkv, Tk, D), mask None or broadcasting to
    (B, 1, 1, Tk) -> (B, H, 1, D). Two matmuls and an fp32 softmax: SDPA's CPU flash kernel tiles
    for many queries; for one it is faster below ~100 keys and 1.2-3.5x slower from 128 to 1,024
    (d20 heads, docs/perf.md, "Decode on CPU"). The query heads that share a kv head are stacked as
    columns, so GQA needs no copies of k and v. Keys times queries rather than queries times
    transposed keys: CPU matmul runs it 1.5-3x faster (docs/perf.md, "Decode on CPU").
    """
    (B, H, _, D), Hkv = q.shape, k.size(1)
    scores = torch.matmul(k, q.view(B, Hkv, H // Hkv, D).transpose(-1, -2)).transpose(-1, -2)
    scores = scores.float() / math.sqrt(D)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # (B, Hkv, H / Hkv, D) -> (B, H, 1, D)
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v).view(B, H, 1, D)

def sliding_block_mask(T, window, device, block=FLEX_BLOCK):
    """
    FlexAttention BlockMask for causal+window over T queries/keys, built from the (T/block)^2 block
    grid, never a T x T mask. A block pair is "full" when every (query, key) pair in it is visible
    (no mask_mod call needed), "partial" when only some are.
    """
    n = -(-T // block)
    lo = torch.arange(n, device=device, dtype=torch.int32) * block
    hi = (lo + block - 1).clamp(max=T - 1)
    q_lo, q_hi, k_lo, k_hi = lo[:, None], hi[:, None], lo[None, :], hi[None, :]
    full = (q_lo - k_hi >= 0) & (q_hi - k_lo <= window)
    partial = (q_hi - k_lo >= 0) & (q_lo - k_hi <= window) & ~full

    def blocks(m):  # (1, 1, n) counts and (1, 1, n, n) indices with the listed blocks first
        order = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True)
        return m.sum(dim=-1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

    return BlockMask.from_kv_blocks(*blocks(partial), *blocks(full), BLOCK_SIZE=block,
                                    mask_mod=mask_mod, seq_lengths=(T, T))

def attention_flex(q, k, v, window):
    """
    CUDA path without FA3. Inside a torch.compile trace (the compiled training model) sliding
    windows run as FlexAttention: the plain flex_attention call becomes part of the model's graph,
    which compiles it into one block-sparse kernel. Everything else goes to SDPA: full causal (flash
    kernel), decode and cache chunks (Tq < Tk: small masks), and any uncompiled call, sliding
    windows included, with an explicit (T, T) mask. Uncompiled flex would materialize the
    B x H x T x T scores, and a standalone torch.compile(flex_attention) with static shapes
    recompiles for every new (B, T) of eager training or sampling, running eagerly after dynamo's 8.
    """
    if q.size(1) != k.size(1) or window >= k.size(1) - 1 or not torch.compiler.is_compiling():
        return attention_sdpa(q, k, v, window)
    block_mask = sliding_block_mask(q.size(1), window, q.device)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    y = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=q.size(1) != k.size(1))
    return y.transpose(1, 2)

@functools.cache
def load_fa3():
    """FA3 kernel module from the `kernels` package (Hopper build first), or None when not
    installed / not bf16. Looked up once per process."""
    cuda_bf16 = torch.cuda.is_available() and COMPUTE_DTYPE == torch.bfloat16
    if not cuda_bf16 or importlib.util.find_spec("kernels") is None:
        return None
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from kernels import get_kernel  # optional (CUDA only): imported once found
    major, _ = torch.cuda.get_device_capability()
    repo = "varunneal/flash-attention-3" if major == 9 else "kernels-community/flash-attn3"
    try:
        return get_kernel(repo).flash_attn_interface
    except Exception as e:  # no network / no build for this GPU: say so loudly, use flex
        print0(f"WARNING: `kernels` is installed but FA3 ({repo}) did not load "
               f"({type(e).__name__}: {e}); using flex")
        return None

def attention_fa3(q, k, v, window):
    # FA3 aligns causal masks bottom-right when Tq < Tk, as we do; some builds also return the LSE
    y = load_fa3().flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
    return y[0] if isinstance(y, tuple) else y

def attention_rows(q, k, v, k_cache, v_cache, positions, row_positions, window):
    """
    Rows at their own cache positions (a server decoding different requests together): positions
    (B, Tq) is where each row's new tokens go, row_positions the rows' cache lengths on the host.
    Writes each row's keys/values at its positions, then attends with a per-row causal-window mask,
    so a row never sees another row's longer history nor a stale slot past its own end. SDPA with
    an explicit (B, 1, Tq, Tk) mask on every device (one query on CPU: attention_one_query).
    """
    rows = torch.arange(q.size(0), device=q.device)[:, None]
    k_cache[rows, positions], v_cache[rows, positions] = k, v
    lo, hi = max(0, min(row_positions) - window), max(row_positions) + q.size(1)
    dist = positions[:, :, None] - torch.arange(lo, hi, device=q.device)[None, None, :]
    mask = ((dist >= 0) & (dist <= window))[:, None]
    k, v = k_cache[:, lo:hi].transpose(1, 2), v_cache[:, lo:hi].transpose(1, 2)
    return sdpa_heads_first(q.transpose(1, 2), k, v, mask).transpose(1, 2)

ATTENTION_IMPLS = dict(reference=attention_reference, sdpa=attention_sdpa, flex=attention_flex,
                       fa3=attention_fa3)

def pick_attention_impl(device):
    if ATTN_IMPL is not None:
        if ATTN_IMPL not in ATTENTION_IMPLS:
            raise ValueError(f"attention.ATTN_IMPL={ATTN_IMPL!r}: use one of "
                             f"{sorted(ATTENTION_IMPLS)} or None (auto)")
        if ATTN_IMPL == "fa3" and load_fa3() is None:
            raise ValueError("attention.ATTN_IMPL='fa3' but FA3 is unavailable (needs CUDA, bf16, "
                             "`kernels` with a build for this GPU): use None (auto) or 'flex'")
        return ATTN_IMPL
    if torch.device(device).type == "cuda":
        return "fa3" if load_fa3() is not None else "flex"
    return "sdpa"

def attention(q, k, v, window):
    return ATTENTION_IMPLS[pick_attention_impl(q.device)](q, k, v, window)

def attention_banner(device, window_sizes, sequence_len):
    """One line saying which attention path runs; loud when it is a slow one."""
    impl = pick_attention_impl(device)
    windowed = any(w < sequence_len for w in window_sizes)
    mask_note = " (sliding windows via an explicit T x T mask)"
    msg = {
        "fa3": "attention: FA3 (kernels package), sliding windows native",
        "flex": "attention: FlexAttention block-sparse for sliding windows in a compiled model; "
                "SDPA for full causal, decode and uncompiled calls" + mask_note,
        "sdpa": "attention: torch SDPA" + (mask_note if windowed else ""),
        "reference": "WARNING: attention: explicit reference softmax (slow, tests only)",
    }[impl]
    if impl == "sdpa" and torch.device(device).type == "cuda" and windowed:
        msg = f"WARNING: {msg} on CUDA is slow; use ATTN_IMPL=None (flex) or --window-pattern L"
    return msg
