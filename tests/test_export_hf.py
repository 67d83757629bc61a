"""
Tests for scripts/export_hf.py and nanochat/hf/: a tiny GPT with sliding windows, exported, then run by transformers
(logits, greedy generate with its KV cache), its tokenizer.json and chat template read by AutoTokenizer, and the
directory loaded back by load_model bit for bit.
"""

import json
import os
import random
import runpy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # installed with transformers

from nanochat.checkpoint import load_model, save_checkpoint
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig
from nanochat.hf.export import export_model
from conftest import seeded_gpt

SEQ_LEN = 512  # short window = 128 tokens, so a 200-token batch really slides on the "S" layers

@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer):
    """(nanochat model, tokenizer, export dir): a random GPT, every parameter non-trivial, exported by the script."""
    base = tmp_path_factory.mktemp("nanochat_base")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        tiny_tokenizer.save(str(base / "tokenizer"))
        config = GPTConfig(sequence_len=SEQ_LEN, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=3, n_head=4,
                           n_kv_head=2, n_embd=64, window_pattern="SL")
        model = seeded_gpt(config, perturb=0.05)  # c_proj, smear and lambdas start at 0 or 1: each path shows
        with torch.no_grad():
            model.smear_lambda.fill_(0.5)
        meta = {"model_config": config.__dict__, "user_config": {}, "val_bpb": 1.234, "metrics": {"gsm8k": 0.05},
                "tokenizer_fingerprint": tiny_tokenizer.fingerprint()}
        save_checkpoint(str(base / "chatsft_checkpoints" / "d3"), 5, model.state_dict(), None, meta)
        out = str(base / "export")
        argv = sys.argv
        sys.argv = ["export_hf", "-i", "sft", "-o", out, "--check"]
        try:
            runpy.run_module("scripts.export_hf", run_name="__main__")
        finally:
            sys.argv = argv
        assert model.window_sizes == [128, 512, 512]
        yield model.eval(), tiny_tokenizer, out

def hf_model(out):
    return transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()

def test_export_directory(exported):
    _, _, out = exported
    files = set(os.listdir(out))
    umask = os.umask(0)
    os.umask(umask)
    modes = {f: oct(os.stat(os.path.join(out, f)).st_mode & 0o777) for f in files}
    assert modes == {f: oct(0o666 & ~umask) for f in files}  # model.safetensors too (safetensors makes it 0600)
    assert {"model.safetensors", "config.json", "configuration_nanochat.py", "modeling_nanochat.py", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "generation_config.json", "README.md"} <= files
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nanochat.NanoChatForCausalLM"
    card = open(os.path.join(out, "README.md")).read()
    assert "1.2340" in card and "gsm8k" in card and "trust_remote_code=True" in card

def test_transformers_logits_match(exported):
    model, tok, out = exported
    torch.manual_seed(1)
    idx = torch.randint(0, tok.get_vocab_size(), (2, 200))
    with torch.no_grad():
        diff = (hf_model(out)(idx).logits - model(idx)).abs().max().item()
    assert diff <= 1e-5, diff

def test_transformers_greedy_generate_matches_engine(exported):
    model, tok, out = exported
    prompt = tok.encode("def add(a, b): return a + b  # Hello world! " * 6, prepend="<|bos|>")
    assert len(prompt) > 128  # decoding runs past the short window
    ours, _ = Engine(model, tok).generate_batch(prompt, num_samples=1, max_tokens=32, temperature=0.0)
    with torch.no_grad():
        theirs = hf_model(out).generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
    assert theirs[0].tolist() == ours[0]
    assert len(ours[0]) == len(prompt) + 32  # the random model did not stop early: 32 decode steps compared

def varied_strings(n=200):
    rng = random.Random(0)
    pieces = ["def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { a[i] = i; }", "你好，世界！", "こんにちは",
              "안녕하세요", "🙂🚀👍🏽", "Café naïve résumé", "  leading spaces", "tabs\tand\nnewlines\r\n", "1234567890",
              "<|bos|>", "<|user_start|>hi<|user_end|>", "<|assistant_end|>", "it's we'll they've I'M",
              "$3.50 2024-06-01", "\u200b zero width", "ﬁ ligature", "x" * 40, "   ", "\n\n\n", "émoji🙂mix中文abc123"]
    strings = []
    for _ in range(n):
        k = rng.randint(1, 4)
        strings.append("".join(rng.choice(pieces) + rng.choice(["", " ", "\n", "."]) for _ in range(k)))
    return strings

def test_auto_tokenizer_matches_ours(exported):
    _, tok, out = exported
    hf = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    strings = varied_strings()
    assert sum("<|" in s for s in strings) > 20
    for s in strings:
        # nanochat never reads specials out of text; split_special_tokens=True asks the same of transformers
        assert hf.encode(s, add_special_tokens=False, split_special_tokens=True) == tok.encode(s), s
        assert hf.decode(tok.encode(s)) == s
    # by default transformers does read specials out of text (its chat template relies on it)
    assert hf.encode("<|bos|>", add_special_tokens=False) == [tok.get_bos_token_id()]

def test_chat_template_matches_render_for_completion(exported):
    _, tok, out = exported
    hf = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    conversations = [
        [{"role": "user", "content": "Why is the sky blue?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好 🙂"},
         {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "2+2?"}],
        [{"role": "user", "content": "count r in strawberry"},
         {"role": "assistant", "content": [{"type": "text", "text": "Let me count. "},
                                           {"type": "python", "text": "'strawberry'.count('r')"},
                                           {"type": "python_output", "text": "3"}, {"type": "text", "text": "3."}]},
         {"role": "user", "content": "thanks"}],
    ]
    for messages in conversations:
        ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(ids) == tok.render_for_completion({"messages": messages}), messages

def test_load_model_reads_an_export_bit_for_bit(exported):
    model, tok, out = exported
    loaded, loaded_tok, meta = load_model(out, "cpu")
    assert loaded.config == model.config and not loaded.training
    assert loaded_tok.fingerprint() == tok.fingerprint() and meta["val_bpb"] == 1.234
    theirs = loaded.state_dict()
    assert theirs.keys() == model.state_dict().keys()
    assert all(torch.equal(theirs[k], v) for k, v in model.state_dict().items())

def test_mixed_dtype_checkpoint_exports_as_it_was_trained(exported, tmp_path):
    """A CUDA checkpoint keeps embeddings in bf16 and matrices in fp32 masters: the export keeps both dtypes (bit for
    bit) and tells transformers to compute in bf16, as nanochat did."""
    model, tok, out = exported
    state = {k: v.bfloat16() if k.startswith(("transformer.wte", "value_embeds")) else v
             for k, v in model.state_dict().items()}
    export_model(state, json.load(open(os.path.join(out, "nanochat_meta.json"))), tok, str(tmp_path))
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert all(saved[k].dtype == v.dtype and torch.equal(saved[k], v) for k, v in state.items())
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True)
    assert hf.dtype == torch.bfloat16
    loaded, _, _ = load_model(str(tmp_path), "cpu")  # CPU computes in fp32: bf16 tensors are upcast exactly
    assert all(torch.equal(loaded.state_dict()[k], v.float()) for k, v in state.items())

def test_chat_cli_chats_with_an_export(exported, monkeypatch, capsys):
    """A downloaded export is a chat_cli source: the reply is the Engine's greedy reply from the original model."""
    model, tok, out = exported
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "hello"}]})
    seqs, _ = Engine(model, tok).generate_batch(prompt, max_tokens=8, temperature=0.0)
    monkeypatch.setattr(sys, "argv", ["chat_cli", "--device-type=cpu", "-i", out, "-p", "hello", "-t", "0", "-m", "8"])
    runpy.run_module("scripts.chat_cli", run_name="__main__")
    reply = capsys.readouterr().out.split("Assistant: ")[1]
    assert reply == tok.decode(seqs[0][len(prompt):]) + "\n"
