"""infer_bench runs on CPU with a random model and ends with one JSON line holding every number it printed; its byte
and FLOP accounting matches a model of the same shape (parameter and KV-cache tensor sizes, counted matmuls)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nanochat.engine import INFERENCE_DTYPES, has_fbgemm
from nanochat.gpt import GPT, GPTConfig, KVCache
from conftest import seeded_gpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = ["float32", "bfloat16", "int8"] + (["float16"] if has_fbgemm() else [])  # float16: x86 only

def test_infer_bench_random_model_json(base_dir):
    cmd = [sys.executable, "-m", "scripts.infer_bench", "--depth", "1", "--max-seq-len", "64", "--prompt-tokens", "16",
           "--decode-tokens", "4", "--batch-sizes", "1,2", "--device-type", "cpu", "--engine-samples", "1,8",
           "--dtype", ",".join(DTYPES)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu"
    # one row per dtype x batch, in the order asked; MBU on CPU is against the bandwidth measured in the same run
    assert [(row["dtype"], row["batch_size"]) for row in result["decode"]] == \
        [(d, b) for d in DTYPES for b in (1, 2)]
    assert result["bandwidth_source"].startswith("measured") and result["read_bandwidth"] > 1e8
    for row in result["decode"]:
        assert row["tok_per_s"] > 0 and row["tpot_s"] > 0
        assert row["mbu"] == pytest.approx(row["bytes_per_s"] / result["read_bandwidth"])
    assert [p["dtype"] for p in result["prefills"]] == DTYPES
    assert result["prefill"]["ttft_s"] > 0 and result["prefill"]["prompt_tokens"] == 16
    # Engine.generate rows: every sample runs the full count (no stop token can be sampled)
    assert [(r["dtype"], r["samples"], r["tokens"]) for r in result["engine"]] == \
        [(d, s, s * 32) for d in DTYPES for s in (1, 8)]
    assert all(r["tok_per_s"] > 0 for r in result["engine"])
    # byte accounting against a model of the same shape (depth 1: width 64 rounded up to one 128-wide head), counted
    # in the dtype each run holds: 4 bytes a weight, 2 in bf16, int8 matrices 1 plus a 2-byte scale per output row,
    # float16 matrices 2 with the small gates and scalars in the fp32 of its activations
    model = GPT(GPTConfig(sequence_len=64, vocab_size=32768, n_layer=1, n_head=1, n_kv_head=1, n_embd=128))
    model.init_weights()
    embeddings = {id(p) for p in [model.transformer.wte.weight, *model.value_embeds.parameters()]}
    weights = [p for p in model.parameters() if id(p) not in embeddings]
    block = model.transformer.h[0]
    int8 = [m.weight for m in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.attn.c_proj, block.mlp.c_fc,
                               block.mlp.c_proj, model.lm_head)]
    numel = lambda ps: sum(p.numel() for p in ps)
    expected = {"float32": 4 * numel(weights), "bfloat16": 2 * numel(weights),
                "int8": numel(int8) + 2 * sum(w.size(0) for w in int8) + 2 * (numel(weights) - numel(int8)),
                "float16": 2 * numel(int8) + 4 * (numel(weights) - numel(int8))}
    expected = {d: expected[d] for d in DTYPES}
    cards = {card["dtype"]: card for card in result["cards"]}
    assert {d: card["weight_bytes_read_per_step"] for d, card in cards.items()} == expected
    assert result["card"] == cards["float32"] and cards["float32"]["params"] == numel(model.parameters())
    if "float16" in cards:  # the packed matrices count as parameters, beside the fp16 embedding tables
        card, embedding_numel = cards["float16"], numel(model.parameters()) - numel(weights)
        assert card["params"] == numel(model.parameters())
        assert sum(card["param_bytes_by_dtype"].values()) == expected["float16"] + 2 * embedding_numel
    for dtype, card in cards.items():
        # the KV cache follows the activations
        cache = KVCache(1, 1, 64, 128, 1, "cpu", dtype=INFERENCE_DTYPES[dtype])
        assert card["kv_bytes_per_token"] == (cache.k_cache.nbytes + cache.v_cache.nbytes) // 64
        kv_read = card["kv_bytes_per_token"] * min(card["mid_ctx"], 64)  # one layer, window = the whole context
        assert card["kv_read_bytes_per_row_at_mid_ctx"] == kv_read
        for row in [row for row in result["decode"] if row["dtype"] == dtype]:
            assert row["bytes_per_s"] * row["tpot_s"] == pytest.approx(expected[dtype] + row["batch_size"] * kv_read)

def test_flop_estimates_match_the_counted_matmuls_plus_hand_counted_attention():
    """infer_bench's MFU divides by estimate_prefill_flops / estimate_decode_flops. FlopCounterMode counts every
    matmul the forward runs. Prefill attention is CPU SDPA, one fused op it does not count, so it is added by
    hand: 4 x heads x head_dim per (query, key) pair a layer attends, causal, a window w showing w + 1 keys.
    One-token decode attention on CPU is two matmuls, which it counts."""
    model = seeded_gpt(GPTConfig(sequence_len=64, vocab_size=200, n_layer=2, n_head=2, n_kv_head=1, n_embd=64,
                                 window_pattern="SL"))
    model.window_sizes = [8, 64]  # a window shorter than the prompt: the estimates must cap at it
    n, hd = 20, 2 * 32
    pairs = sum(sum(min(t + 1, w + 1) for t in range(n)) for w in model.window_sizes)
    cache = KVCache(1, 1, 64, 32, 2, "cpu")
    with torch.no_grad(), FlopCounterMode(display=False) as prefill:
        model(torch.randint(0, 200, (1, n)), kv_cache=cache)
    assert prefill.get_total_flops() + 4 * hd * pairs == model.estimate_prefill_flops(n)
    with torch.no_grad(), FlopCounterMode(display=False) as decode:
        model(torch.randint(0, 200, (1, 1)), kv_cache=cache)  # one token with n cached: attends to n + 1 keys
    assert decode.get_total_flops() == model.estimate_decode_flops(n + 1)  # 9 keys in the window-8 layer, 21
