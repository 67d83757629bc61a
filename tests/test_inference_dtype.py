"""
Inference dtypes (engine.prepare_for_inference): a model converted to generate holds its weights once in bf16 (or
fp16, or int8 with bf16 scales) and copies none of them per forward, its logits stay within a written bound of the fp32
model's, its greedy tokens agree, and training-side models are untouched.
"""

import copy
import dataclasses
import os
import runpy
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanochat import engine
from nanochat.checkpoint import save_checkpoint
from nanochat.common import COMPUTE_DTYPE
from nanochat.engine import (INFERENCE_DTYPES, INT8_KERNEL_MAX_ROWS, Engine, Fp16Linear, Int8Linear, PackedLinear,
                             default_inference_dtype, has_fbgemm, new_kv_cache, prepare_for_inference,
                             uses_onednn_bf16)
from nanochat.gpt import GPT, GPTConfig, KVCache
from conftest import seeded_gpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float16 multiplies through FBGEMM, in x86 builds of torch only
REDUCED = ["bfloat16", "int8"] + (["float16"] if has_fbgemm() else [])

def trained_like(config, seed):
    """A seeded GPT whose matrices are N(0, 1/fan_in), as after training, instead of init's zero projections and
    tiny lm_head (those make every logit ~0, so any conversion would look exact): logits come out with std ~1."""
    model = seeded_gpt(config, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "wte" not in name and "value_embeds" not in name:
                p.normal_(0.0, p.size(1) ** -0.5)
    return model.eval()

def converted(model, dtype):
    model = copy.deepcopy(model)
    prepare_for_inference(model, dtype)
    return model

SMALL = GPTConfig(sequence_len=128, vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=128)
D20_LAYER = GPTConfig(sequence_len=256, vocab_size=512, n_layer=1, n_head=10, n_kv_head=10, n_embd=1280)

# Bounds, against the fp32 model on 8 (small) or 2 (d20 width) fixed 64-token prompts, logits of std ~1:
# bf16 keeps 8 significant bits, so each rounding errs by <= 2^-9 relative; through the embeddings, norms, matmuls
# and residual adds of 4 layers these add up like a random walk to ~1% of the logits' std (measured 1.06-1.08% rms
# and at most 0.055 over the 262k logits of seeds 0-2). int8 adds per-channel weight rounding (step max|w_row|/127,
# ~2.5 sigma / 127 for Gaussian rows, i.e. ~0.6% noise per matrix): measured 1.75-1.76% rms, max 0.092. The bounds
# sit at about 2x those. A broken conversion (scales off, rotary tables or weights in the wrong dtype) errs by the
# logits' whole scale. Greedy agreement: random logits have many near-ties, and a position flips when its top-2 gap
# is below the error; measured 98.0-98.4% (bf16) and 96.3-98.1% (int8) of 512 positions; a broken model agrees on
# ~1/vocab of them. float16 rounds only the weights, to 11 significant bits, and computes in fp32: measured
# 0.040-0.051% rms, max 0.0029, greedy agreement 99.8-100%.
BOUNDS = {  # dtype: (rms error / logit std, max |error|, least greedy agreement)
    "bfloat16": (0.02, 0.12, 0.95),
    "int8": (0.035, 0.2, 0.93),
    "float16": (0.001, 0.006, 0.99),
}

@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("config,rows", [(SMALL, 8), (D20_LAYER, 2)], ids=["small", "d20-width-layer"])
def test_logits_and_greedy_tokens_match_fp32_within_bound(dtype, config, rows):
    model = trained_like(config, seed=0)
    prompts = torch.randint(0, config.vocab_size, (rows, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(prompts)
        logits = converted(model, dtype)(prompts)
    rms_bound, max_bound, agreement_bound = BOUNDS[dtype]
    error = logits - reference
    assert error.pow(2).mean().sqrt() < rms_bound * reference.std()
    assert error.abs().max() < max_bound
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= agreement_bound

def test_float32_inference_model_computes_the_training_models_logits():
    """prepare_for_inference stacks c_q, c_k, c_v into one matrix: in fp32 that changes nothing but rounding."""
    model = trained_like(SMALL, seed=2)
    prepared = converted(model, "float32")
    assert prepared.transformer.h[0].attn.c_qkv.weight.shape == (128 + 2 * 64, 128)
    assert not hasattr(prepared.transformer.h[0].attn, "c_q")
    prompts = torch.randint(0, SMALL.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(prepared(prompts), model(prompts), atol=1e-4, rtol=0)

@pytest.mark.parametrize("dtype", REDUCED)
def test_cached_decoding_in_the_inference_dtype_matches_its_full_forward(dtype, tiny_tokenizer):
    """Engine's greedy tokens (batch-1 prefill, KV cache in the inference dtype, one token a step) are the argmax of
    the converted model's own full forward over the same sequence: the cache holds what the forward computed."""
    model = converted(trained_like(GPTConfig(sequence_len=64, vocab_size=tiny_tokenizer.get_vocab_size(),
                                             n_layer=2, n_head=2, n_kv_head=2, n_embd=64), seed=1), dtype)
    engine = Engine(model, tiny_tokenizer)
    assert new_kv_cache(model, 1, 8).k_cache.dtype == INFERENCE_DTYPES[dtype]
    prompt = [tiny_tokenizer.get_bos_token_id()] + tiny_tokenizer.encode("the cat sat")
    tokens = [t for t, in (column for column, _ in engine.generate(prompt, max_tokens=12, temperature=0.0))]
    with torch.no_grad():
        full = model(torch.tensor([prompt + tokens[:-1]]))[0, len(prompt) - 1:].argmax(-1).tolist()
    assert tokens == full

class CopiedElements(TorchDispatchMode):
    """Counts the elements every dtype conversion (aten._to_copy) writes."""
    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default:
            self.elements += out.numel()
        return out

def test_weights_are_held_once_in_the_inference_dtype_and_never_cast_per_forward():
    model = trained_like(SMALL, seed=0)
    matrices = model.num_matmul_params()
    token = torch.tensor([[5]])

    def copied_per_decode_step(model):
        cache = KVCache(1, SMALL.n_kv_head, 16, SMALL.n_embd // SMALL.n_head, SMALL.n_layer, "cpu",
                        dtype=model.compute_dtype)
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]), kv_cache=cache)
            with CopiedElements() as copies:
                model(token, kv_cache=cache)
        return copies.elements

    # training's way (fp32 masters, bf16 activations, as on CUDA): every matrix is cast again each forward
    casting = copy.deepcopy(model)
    casting.compute_dtype = torch.bfloat16
    casting.cos, casting.sin = casting.cos.bfloat16(), casting.sin.bfloat16()
    assert copied_per_decode_step(casting) >= matrices
    held_by_dtype = {"bfloat16": {torch.bfloat16}, "int8": {torch.bfloat16, torch.int8},
                     # fp16 embedding tables; the gates and lambdas in the fp32 of the activations
                     "float16": {torch.float16, torch.float32}}
    for dtype in REDUCED:
        prepared = converted(model, dtype)
        held = {p.dtype for p in prepared.parameters()} | {b.dtype for b in prepared.buffers()}
        assert held == held_by_dtype[dtype]
        assert prepared.compute_dtype == INFERENCE_DTYPES[dtype]
        assert not any(p.requires_grad for p in prepared.parameters())
        # what is left: the logits to fp32 for the softcap and a few scalars, far below one matrix
        assert copied_per_decode_step(prepared) < 0.05 * matrices
    if uses_onednn_bf16(torch.device("cpu")):  # this CPU runs bf16 matrices through oneDNN's packed layout
        assert isinstance(converted(model, "bfloat16").transformer.h[0].attn.c_qkv, PackedLinear)
    int8 = converted(model, "int8")
    assert isinstance(int8.lm_head, Int8Linear) and isinstance(int8.transformer.h[0].mlp.c_fc, Int8Linear)
    # one byte per weight of every matrix but the tiny gates (kept bf16), plus one bf16 scale per output row
    gates = [model.smear_gate] + [b.attn.ve_gate for b in model.transformer.h if b.attn.ve_gate is not None]
    int8_layers = [m for m in int8.modules() if isinstance(m, Int8Linear)]
    assert sum(m.weight.nbytes for m in int8_layers) == matrices - sum(g.weight.numel() for g in gates)
    assert sum(m.scales.nbytes for m in int8_layers) == 2 * sum(m.weight.size(0) for m in int8_layers)
    if has_fbgemm():  # two bytes per weight of the same matrices, packed by FBGEMM
        fp16_layers = [m for m in converted(model, "float16").modules() if isinstance(m, Fp16Linear)]
        assert sum(m.nbytes for m in fp16_layers) == 2 * sum(m.weight.numel() for m in int8_layers)
    # the training model is untouched: fp32 masters, the import-time compute dtype
    assert {p.dtype for p in model.parameters()} == {torch.float32} and model.compute_dtype == COMPUTE_DTYPE

def test_int8_weights_dequantize_to_the_original_within_half_a_step():
    model = trained_like(SMALL, seed=0)
    layer = Int8Linear(model.transformer.h[0].attn.c_q)
    original = model.transformer.h[0].attn.c_q.weight.detach()
    scales = layer.scales.float()[:, None]
    assert layer.weight.abs().max() <= 127 and (layer.weight.abs().amax(dim=1) >= 126).all()  # each row uses its range
    assert ((layer.weight.float() * scales - original).abs() <= 0.5 * scales + 1e-7).all()
    # decode rows run torch's int8 kernel, a prefill dequantizes first
    for shape in [(1, 1), (2, 2), (1, INT8_KERNEL_MAX_ROWS + 1)]:
        x = torch.randn(*shape, SMALL.n_embd).bfloat16()
        expected = x.float() @ (layer.weight.float() * scales).t()
        assert torch.allclose(layer(x).float(), expected, rtol=0.02, atol=0.02)

@pytest.mark.skipif(not uses_onednn_bf16(torch.device("cpu")), reason="oneDNN has no bf16 kernels on this CPU")
def test_packed_bf16_weights_multiply_as_the_plain_bf16_weight():
    """The packed layout changes where the weights sit, not the math: the same products as F.linear on the bf16
    weight, up to the rounding of bf16 outputs (2^-8 relative) and summation order."""
    linear = trained_like(SMALL, seed=0).transformer.h[0].mlp.c_fc
    packed = PackedLinear(linear)
    for shape in [(1, 1), (8, 1), (2, 64)]:  # decode rows and a prefill
        x = torch.randn(*shape, SMALL.n_embd).bfloat16()
        expected = torch.nn.functional.linear(x.float(), linear.weight.bfloat16().float())
        assert torch.allclose(packed(x).float(), expected, rtol=1e-2, atol=1e-2)

@pytest.mark.skipif(not has_fbgemm(), reason="no FBGEMM in this torch build")
def test_fp16_weights_multiply_as_the_fp16_rounded_weight_in_fp32():
    linear = trained_like(SMALL, seed=0).transformer.h[0].mlp.c_fc
    fp16 = Fp16Linear(linear)
    for shape in [(1, 1), (8, 1), (2, 64)]:  # decode rows and a prefill
        x = torch.randn(*shape, SMALL.n_embd)
        expected = torch.nn.functional.linear(x, linear.weight.half().float())
        assert torch.allclose(fp16(x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fp16(x), torch.nn.functional.linear(x, linear.weight), rtol=1e-5, atol=1e-5)

def test_default_dtype_follows_the_hardware_and_bad_choices_name_the_fix(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    for fbgemm in (True, False):
        monkeypatch.setattr(engine, "has_fbgemm", lambda: fbgemm)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
        name, reason = default_inference_dtype(cpu)
        assert name == "bfloat16" and "--dtype float16" in reason
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
        name, reason = default_inference_dtype(cpu)
        # x86 builds of torch have FBGEMM: fp16 weights; an ARM build falls back to fp32
        assert name == ("float16" if fbgemm else "float32") and "AVX512-BF16" in reason
    model = trained_like(SMALL, seed=0)
    assert prepare_for_inference(copy.deepcopy(model), "") == "float32"
    with pytest.raises(ValueError, match="float16.*float32"):
        prepare_for_inference(copy.deepcopy(model), "float16")
    with torch.device("meta"):
        meta = GPT(SMALL)
    with pytest.raises(ValueError, match="int8.*--dtype bfloat16"):
        prepare_for_inference(meta, "int8")

# -----------------------------------------------------------------------------
# The scripts' --dtype flag

@pytest.fixture
def saved_chat_model(base_dir, tiny_tokenizer):
    """A trained-scale tiny model saved as sft/d2 (tokenizer alongside) under the test's NANOCHAT_BASE_DIR."""
    config = GPTConfig(sequence_len=64, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                       n_kv_head=2, n_embd=64)
    model = trained_like(config, seed=2)
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    save_checkpoint(str(base_dir / "chatsft_checkpoints" / "d2"), 5, model.state_dict(), None,
                    {"model_config": dataclasses.asdict(config), "user_config": {}})
    return model

@pytest.mark.parametrize("dtype", ["", "float32", *REDUCED])
def test_chat_cli_generates_in_the_chosen_dtype(dtype, saved_chat_model, tiny_tokenizer, monkeypatch, capsys):
    flags = ["--dtype", dtype] if dtype else []
    monkeypatch.setattr(sys, "argv", ["chat_cli", "--device-type", "cpu", "-t", "0", "-m", "8", "-p", "hi", *flags])
    runpy.run_module("scripts.chat_cli", run_name="__main__")
    out = capsys.readouterr().out
    name, reason = (dtype, "set by --dtype") if dtype else default_inference_dtype(torch.device("cpu"))
    assert f"inference dtype: {name} ({reason})" in out
    # the reply is what the Engine generates from the same weights converted the same way
    tok = tiny_tokenizer
    prompt = [tok.get_bos_token_id(), tok.encode_special("<|user_start|>"), *tok.encode("hi"),
              tok.encode_special("<|user_end|>"), tok.encode_special("<|assistant_start|>")]
    sequences, _ = Engine(converted(saved_chat_model, name), tok).generate_batch(prompt, max_tokens=8, temperature=0)
    assert out.split("Assistant: ")[1] == tok.decode(sequences[0][len(prompt):]) + "\n"

def test_chat_eval_runs_with_int8_weights(saved_chat_model, base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "scripts.chat_eval", "-i", "sft", "-x", "2", "-m", "4", "--device-type", "cpu",
               "--dtype", "int8"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "inference dtype: int8 (set by --dtype)" in proc.stdout and "ChatCORE-synthetic" in proc.stdout
