"""
Attention paths in nanochat/attention.py against the explicit masked-softmax reference (and the reference against
hand-worked answers): full causal, sliding windows, GQA, one-token decode and cache chunks, gradients,
FlexAttention's block-mask structure, and the ATTN_IMPL override.
FlexAttention runs only inside a torch.compile trace (uncompiled calls take SDPA with a mask); here that trace runs
flex's own dense CPU implementation, forward only (torch has no CPU flex backward). The CUDA kernel reads the same
BlockMask, whose full/partial block classification is checked exhaustively against the dense mask.
"""

import pytest
import torch

from nanochat import attention as attn
from nanochat.gpt import GPT, GPTConfig

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

def qkv(B, Tq, Tk, H, Hkv, D=16, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, H, D, generator=g)
    k = torch.randn(B, Tk, Hkv, D, generator=g)
    v = torch.randn(B, Tk, Hkv, D, generator=g)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]

# -----------------------------------------------------------------------------
# The reference itself, against answers worked by hand

def test_reference_window_zero_returns_own_value():
    # window 0: every query sees only its own key, so softmax is 1 on it and the output is v itself
    q, k, v = qkv(2, 9, 9, 2, 2)
    torch.testing.assert_close(attn.attention_reference(q, k, v, 0), v)

def test_reference_uniform_scores_average_visible_values():
    # q = 0 makes every score equal: the output is the plain mean of the visible values
    _, k, v = qkv(1, 12, 12, 1, 1)
    q = torch.zeros(1, 12, 1, 16)
    window = 3
    expected = torch.stack([v[0, max(0, t - window):t + 1, 0].mean(0) for t in range(12)])
    torch.testing.assert_close(attn.attention_reference(q, k, v, window)[0, :, 0], expected)

def test_reference_gqa_equals_repeated_kv_heads():
    q, k, v = qkv(1, 10, 10, 4, 2)
    got = attn.attention_reference(q, k, v, 4)
    # query heads 0,1 read kv head 0; heads 2,3 read kv head 1
    for h in range(4):
        expected = attn.attention_reference(q[:, :, h:h + 1], k[:, :, h // 2:h // 2 + 1], v[:, :, h // 2:h // 2 + 1], 4)
        torch.testing.assert_close(got[:, :, h:h + 1], expected)

def test_reference_decode_query_sits_at_end_of_keys():
    # a single query attends like the last row of the full computation
    q, k, v = qkv(1, 20, 20, 2, 2)
    full = attn.attention_reference(q, k, v, 5)
    torch.testing.assert_close(attn.attention_reference(q[:, -1:], k, v, 5), full[:, -1:])

# -----------------------------------------------------------------------------
# Fast paths == reference

CASES = [  # (B, Tq, Tk, H, Hkv, window)
    (2, 64, 64, 4, 4, 64),     # full causal (window covers everything)
    (2, 64, 64, 4, 4, 10**6),  # full causal, huge window
    (2, 200, 200, 4, 4, 37),   # sliding window, T not a multiple of the flex block
    (1, 300, 300, 4, 2, 128),  # window + GQA, several flex blocks
    (2, 150, 150, 6, 2, 0),    # window 0 (self only), GQA 3:1
    (2, 1, 50, 4, 2, 8),       # one-token decode, window shorter than the cache
    (2, 1, 50, 4, 4, 100),     # one-token decode, window longer than the cache
    (2, 7, 40, 4, 2, 12),      # chunk appended to a cache, windowed
    (1, 5, 30, 2, 1, 10**6),   # chunk appended to a cache, full context
]

@pytest.mark.parametrize("impl", ["sdpa"])  # flex: test_flex_inside_a_compiled_graph_matches_reference
@pytest.mark.parametrize("B,Tq,Tk,H,Hkv,window", CASES)
def test_fast_path_matches_reference(impl, B, Tq, Tk, H, Hkv, window):
    q, k, v = qkv(B, Tq, Tk, H, Hkv, seed=Tq * 1000 + window % 997)
    expected = attn.attention_reference(q, k, v, window)
    got = attn.ATTENTION_IMPLS[impl](q, k, v, window)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize("Tq,Tk,window", [(64, 64, 64), (96, 96, 20), (1, 40, 8), (6, 30, 9)])
def test_sdpa_gradients_match_reference(Tq, Tk, window):
    q, k, v = qkv(2, Tq, Tk, 4, 2, requires_grad=True)
    grad_out = torch.randn(2, Tq, 4, 16, generator=torch.Generator().manual_seed(1))
    ref_grads = torch.autograd.grad(attn.attention_reference(q, k, v, window), (q, k, v), grad_out)
    got_grads = torch.autograd.grad(attn.attention_sdpa(q, k, v, window), (q, k, v), grad_out)
    for name, got, ref in zip("qkv", got_grads, ref_grads):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=f"grad of {name}")

WINDOWED = [case for case in CASES if case[1] == case[2] and case[5] < case[2] - 1]  # the cases flex takes

@pytest.mark.parametrize("B,Tq,Tk,H,Hkv,window", WINDOWED)
def test_flex_inside_a_compiled_graph_matches_reference(B, Tq, Tk, H, Hkv, window):
    # A compiled model traces attention_flex: the graph must hold the flex_attention op (not a dense fallback), give
    # the reference's answer (the backend runs the graph as traced, flex's dense CPU path), and a second call of the
    # same shape must reuse the graph: no module state changed during the trace for a guard to trip on.
    graphs = []
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    flex = torch.compile(attn.attention_flex, backend=backend, fullgraph=True, dynamic=False)
    q, k, v = qkv(B, Tq, Tk, H, Hkv, seed=Tq * 1000 + window % 997)
    expected = attn.attention_reference(q, k, v, window)
    torch.testing.assert_close(flex(q, k, v, window), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex(q, k, v, window), expected, atol=1e-5, rtol=1e-5)
    assert len(graphs) == 1 and "higher_order.flex_attention" in graphs[0].code
    torch._dynamo.reset()

def test_uncompiled_flex_uses_sdpa_with_a_mask(monkeypatch):
    # Eager training with windows (chat_rl, no FA3): flex uncompiled would materialize B x H x T x T scores, and a
    # standalone compiled flex would recompile for every new (B, T). Neither may run; values and grads stay exact.
    def refuse(*args, **kwargs):
        raise AssertionError("flex_attention or torch.compile called outside a compiled model")
    monkeypatch.setattr(attn, "flex_attention", refuse)  # the name attention_flex calls
    monkeypatch.setattr(torch, "compile", refuse)
    for B, T, window in [(2, 96, 20), (3, 130, 37)]:  # two (B, T): a new shape compiles nothing either
        q, k, v = qkv(B, T, T, 4, 2, requires_grad=True)
        grad_out = torch.randn(B, T, 4, 16, generator=torch.Generator().manual_seed(1))
        got = attn.attention_flex(q, k, v, window)
        expected = attn.attention_reference(q, k, v, window)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        got_grads = torch.autograd.grad(got, (q, k, v), grad_out)
        ref_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
        for name, a, b in zip("qkv", got_grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"grad of {name}")

@pytest.mark.parametrize("T,window", [(128, 5), (200, 199), (300, 37), (384, 200), (640, 256), (130, 0), (1000, 129)])
def test_flex_block_mask_classifies_blocks_exactly(T, window):
    # Compiled flex skips mask_mod on "full" blocks and skips absent blocks, so each block pair must be
    # full iff every in-range (q, k) pair is visible, listed iff at least one is.
    bm = attn.sliding_block_mask(T, window, "cpu")
    dense = attn.visible_mask(T, T, window, "cpu")
    n, blk = -(-T // attn.FLEX_BLOCK), attn.FLEX_BLOCK
    partial_n, partial_idx = bm.kv_num_blocks[0, 0], bm.kv_indices[0, 0]
    full_n, full_idx = bm.full_kv_num_blocks[0, 0], bm.full_kv_indices[0, 0]
    for qb in range(n):
        partial = set(partial_idx[qb, :partial_n[qb]].tolist())
        full = set(full_idx[qb, :full_n[qb]].tolist())
        assert not partial & full, f"block row {qb}: {partial & full} both partial and full"
        for kb in range(n):
            tile = dense[qb * blk:(qb + 1) * blk, kb * blk:(kb + 1) * blk]
            assert (kb in full) == bool(tile.all()), f"T={T} w={window} block ({qb},{kb}) full flag wrong"
            is_partial = bool(tile.any() and not tile.all())
            assert (kb in partial) == is_partial, f"T={T} w={window} block ({qb},{kb}) partial flag wrong"

# -----------------------------------------------------------------------------
# Dispatch

def test_override_and_auto_pick(monkeypatch):
    monkeypatch.setattr(attn, "ATTN_IMPL", None)
    assert attn.pick_attention_impl("cpu") == "sdpa"
    for impl in ["reference", "sdpa", "flex"]:
        monkeypatch.setattr(attn, "ATTN_IMPL", impl)
        assert attn.pick_attention_impl("cpu") == impl
    # the override really routes calls: a spy in place of the reference sees them
    calls = []
    monkeypatch.setitem(attn.ATTENTION_IMPLS, "reference", lambda q, k, v, w: calls.append(w) or q)
    monkeypatch.setattr(attn, "ATTN_IMPL", "reference")
    q, k, v = qkv(1, 4, 4, 2, 2)
    attn.attention(q, k, v, 3)
    assert calls == [3]
    # forcing FA3 where it cannot load is an error at pick time, not an AttributeError inside the forward
    monkeypatch.setattr(attn, "ATTN_IMPL", "fa3")
    with pytest.raises(ValueError, match="FA3 is unavailable"):
        attn.pick_attention_impl("cpu")
    monkeypatch.setattr(attn, "ATTN_IMPL", "flash9")
    with pytest.raises(ValueError, match="ATTN_IMPL"):
        attn.pick_attention_impl("cpu")

def test_banner_names_the_path_and_building_a_model_prints_nothing(capsys, monkeypatch):
    windowed = "attention: torch SDPA (sliding windows via an explicit T x T mask)"
    assert attn.attention_banner("cpu", [128, 256], 256) == windowed
    assert attn.attention_banner("cpu", [256, 256], 256) == "attention: torch SDPA"
    monkeypatch.setattr(attn, "ATTN_IMPL", "flex")  # what a CUDA run without FA3 prints
    assert attn.attention_banner("cpu", [128, 256], 256) == (
        "attention: FlexAttention block-sparse for sliding windows in a compiled model; SDPA for full causal, decode "
        "and uncompiled calls (sliding windows via an explicit T x T mask)")
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=64, vocab_size=100, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.to_empty(device="cpu")
    model.init_weights()  # scripts print the banner once; loading a model (chat_cli, chat_eval, ...) says nothing
    assert capsys.readouterr().out == ""
