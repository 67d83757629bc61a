"""
Tests for nanochat/checkpoint.py: round trip, a save that dies half-way leaves the previous checkpoint as the
newest complete one, tag selection, and load_model rebuilding a GPT (window pattern, bf16, errors).
"""

import hashlib
import json
import os
import time

import pytest
import torch
import torch.nn as nn

import nanochat.checkpoint as ckpt
from nanochat.checkpoint import save_checkpoint, load_checkpoint, find_last_step, find_model_tag, load_model
from nanochat.common import atomic_write_text
from conftest import save_tiny_gpt

def small_model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt

def test_round_trip(tmp_path):
    model, opt = small_model_and_optimizer(0)
    save_checkpoint(str(tmp_path), 5, model.state_dict(), opt.state_dict(), {"val_bpb": 1.5})
    assert sorted(os.listdir(tmp_path)) == ["meta_000005.json", "model_000005.pt", "optim_000005_rank0.pt"]
    model_state, optim_state, meta = load_checkpoint(str(tmp_path), 5, "cpu", load_optimizer=True)
    assert all(torch.equal(model_state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(optim_state["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    hashes = {name: hashlib.sha256(open(os.path.join(tmp_path, name), "rb").read()).hexdigest()
              for name in ["model_000005.pt", "optim_000005_rank0.pt"]}
    assert meta == {"val_bpb": 1.5, "step": 5, "optim_shards": 1, "sha256": hashes, "meta_sha256": meta["meta_sha256"]}
    assert find_last_step(str(tmp_path)) == 5

def test_save_killed_halfway_keeps_previous_checkpoint(tmp_path, monkeypatch):
    d = str(tmp_path)
    model, opt = small_model_and_optimizer(0)
    save_checkpoint(d, 10, model.state_dict(), opt.state_dict(), {"tag": "good"})
    newer, newer_opt = small_model_and_optimizer(1)

    # dies after the model and optimizer files are in place, while publishing the meta
    def crash(path, text):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt, "atomic_write_text", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(d, 20, newer.state_dict(), newer_opt.state_dict(), {"tag": "new"})
    monkeypatch.undo()
    assert os.path.exists(os.path.join(d, "model_000020.pt"))
    assert not os.path.exists(os.path.join(d, "meta_000020.json"))

    # dies while writing the model file: nothing of step 30 appears, not even a temp file
    real_save = torch.save
    def crash_midway(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("killed")
    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(d, 30, newer.state_dict(), newer_opt.state_dict(), {"tag": "new"})
    monkeypatch.setattr(torch, "save", real_save)
    assert not any("000030" in f for f in os.listdir(d))

    assert find_last_step(d) == 10
    model_state, _, meta = load_checkpoint(d, find_last_step(d), "cpu")
    assert meta["tag"] == "good" and torch.equal(model_state["0.weight"], model.state_dict()["0.weight"])

def test_atomic_write_text_that_fails_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "meta.json"
    atomic_write_text(str(path), "old")
    with pytest.raises(TypeError):
        atomic_write_text(str(path), 123)  # fails after the temp file is opened
    assert os.listdir(tmp_path) == ["meta.json"] and path.read_text() == "old"

def test_find_last_step_checks_the_files(tmp_path):
    d = str(tmp_path)
    model, opt = small_model_and_optimizer(0)
    save_checkpoint(d, 1, model.state_dict(), opt.state_dict(), {})
    save_checkpoint(d, 2, model.state_dict(), opt.state_dict(), {})
    save_checkpoint(d, 3, model.state_dict(), opt.state_dict(), {})
    # step 3: a truncated model file; step 2: meta says 2 optimizer shards (2 ranks) but rank 1's never landed
    path = os.path.join(d, "model_000003.pt")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    meta_path = os.path.join(d, "meta_000002.json")
    meta = json.load(open(meta_path))
    json.dump(dict(meta, optim_shards=2), open(meta_path, "w"))
    assert find_last_step(d) == 1
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_last_step(str(tmp_path / "empty"))

def test_find_model_tag(tmp_path):
    for tag in ["d4", "d12", "d8", "mytag"]:
        (tmp_path / tag).mkdir()
    assert find_model_tag(str(tmp_path)) == "d12"  # numerically largest, not "d8" > "d12" as strings
    other = tmp_path / "other"
    for tag in ["old", "new"]:
        (other / tag).mkdir(parents=True)
    past = time.time() - 100
    os.utime(other / "old", (past, past))
    assert find_model_tag(str(other)) == "new"

# -----------------------------------------------------------------------------
# load_model with a tiny GPT

def test_load_model_rebuilds_the_same_model(base_dir, tiny_tokenizer):
    saved = save_tiny_gpt(base_dir, tiny_tokenizer)
    model, tok, meta = load_model("base", "cpu", phase="eval")
    assert not model.training and meta["step"] == 7
    assert model.config.window_pattern == "SL" and model.window_sizes == saved.window_sizes
    idx = torch.randint(0, tok.get_vocab_size(), (2, 16))
    assert torch.equal(model(idx), saved(idx))
    model, _, _ = load_model("base", "cpu", phase="train", model_tag="d2", step=7)
    assert model.training

def test_load_model_upcasts_bf16_on_cpu(base_dir, tiny_tokenizer):
    saved = save_tiny_gpt(base_dir, tiny_tokenizer, source_dir="chatsft_checkpoints", bf16=True)
    model, _, _ = load_model("sft", "cpu")
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        assert torch.equal(p, saved.state_dict()[name].bfloat16().float()), name

def test_load_model_errors_name_what_exists(base_dir, tiny_tokenizer):
    save_tiny_gpt(base_dir, tiny_tokenizer)
    with pytest.raises(ValueError, match=r"unknown checkpoint source 'bass'.*'base'"):
        load_model("bass", "cpu")
    with pytest.raises(FileNotFoundError, match="python -m scripts.chat_sft"):
        load_model("sft", "cpu")
    with pytest.raises(FileNotFoundError, match=r"no model tag 'd3'.*\['d2'\]"):
        load_model("base", "cpu", model_tag="d3")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 8.*\[7\]"):
        load_model("base", "cpu", step=8)

def test_load_model_rejects_a_different_tokenizer(base_dir, tiny_tokenizer):
    from nanochat.tokenizer import Tokenizer
    save_tiny_gpt(base_dir, tiny_tokenizer)
    other = Tokenizer.train_from_iterator(iter(["some other text entirely"] * 10), vocab_size=256 + 9 + 3)
    other.save(str(base_dir / "tokenizer"))
    with pytest.raises(AssertionError, match="tokenizer vocab 268 != model vocab"):
        load_model("base", "cpu")
