"""
Chat evaluation: the categorical scorer (argmax over allowed letters at the right position), pass@k wiring,
ChatCORE arithmetic, offline task resolution, rank invariance (1 vs 2 gloo processes) and the CLI end to end.
"""

import dataclasses
import json
import os
import subprocess
import sys
import zlib
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.checkpoint import save_checkpoint
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig
from nanochat.tokenizer import Tokenizer
from tasks.common import Task, render_mc, evaluate_letter, extract_answer
from tasks.synthetic import SyntheticMath, SyntheticMC
from scripts.chat_eval import (run_categorical_eval, run_generative_eval, run_chat_eval, chatcore, resolve_tasks,
                               REAL_TASKS, SYNTHETIC_TASKS)
from conftest import seeded_gpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ListTask(Task):
    def __init__(self, conversations, eval_type, evaluate=evaluate_letter, **kwargs):
        super().__init__(**kwargs)
        self.conversations, self.eval_type, self._evaluate = conversations, eval_type, evaluate

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]

    def evaluate(self, conversation, assistant_response):
        return self._evaluate(conversation, assistant_response)

# -----------------------------------------------------------------------------
# Categorical scoring with a model whose logits we choose

class PlannedLetterModel(torch.nn.Module):
    """
    At the prompt's last position (its final <|assistant_start|>) the planned letter scores 10 and "E", which is
    NOT an allowed letter, scores 100; at every other position "C" scores 50. So a scorer that reads the wrong
    position answers C, and one that does not restrict to the allowed letters answers E.
    """
    def __init__(self, tokenizer, plan):
        super().__init__()
        self.tokenizer, self.plan = tokenizer, plan
        self.config = SimpleNamespace(sequence_len=1024)

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids):
        tok = self.tokenizer
        vocab, start = tok.get_vocab_size(), tok.encode_special("<|assistant_start|>")
        logits = torch.zeros(*ids.shape, vocab)
        logits[:, :, tok.encode("C")[0]] = 50.0
        for b, row in enumerate(ids.tolist()):
            end = max(i for i, t in enumerate(row) if t == start)
            logits[b, end] = 0.0
            logits[b, end, tok.encode(self.plan[tuple(row[:end + 1])])[0]] = 10.0
            logits[b, end, tok.encode("E")[0]] = 100.0
        return logits

def test_categorical_eval_takes_argmax_over_allowed_letters(tiny_tokenizer):
    answers = ["A", "B", "C", "A", "B", "C"]
    predictions = ["A", "B", "A", "A", "C", "C"]  # right on problems 0, 1, 3, 5 -> 4/6
    conversations = [{"messages": [
        {"role": "user", "content": render_mc("Which one?" + " really" * i, ["A", "B", "C"], ["x", "y", "z"])},
        {"role": "assistant", "content": answer}], "letters": ["A", "B", "C"]} for i, answer in enumerate(answers)]
    plan = {tuple(tiny_tokenizer.render_for_completion(c)): p for c, p in zip(conversations, predictions)}
    model = PlannedLetterModel(tiny_tokenizer, plan)
    task = ListTask(conversations, "categorical")
    # batch 4: the second batch is partial, and rows of different lengths are right-padded with BOS
    assert run_categorical_eval(task, tiny_tokenizer, model, batch_size=4) == (4, 6)
    assert run_categorical_eval(task, tiny_tokenizer, model, batch_size=1, max_problems=3) == (2, 3)
    assert run_chat_eval(task, model, tiny_tokenizer, engine=None, batch_size=3) == pytest.approx(4 / 6)

# -----------------------------------------------------------------------------
# Generative scoring: pass@k and the context budget

class ScriptedEngine:
    """Sample 0 answers "#### 0"; sample 1 answers correctly on even problems. Records each call's max_tokens."""
    def __init__(self, tokenizer, task):
        self.tokenizer = tokenizer
        self.answers = {}
        for i in range(len(task)):
            conv = task[i]
            right = extract_answer(conv["messages"][-1]["content"][-1]["text"])
            self.answers[tuple(tokenizer.render_for_completion(conv))] = right if i % 2 == 0 else "-1"
        self.max_tokens = []

    def generate_batch(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        self.max_tokens.append(max_tokens)
        texts = ["I think\n#### 0", f"Let me see\n#### {self.answers[tuple(tokens)]}"]
        return [tokens + self.tokenizer.encode(texts[s % 2]) for s in range(num_samples)], None

def test_generative_eval_is_pass_at_k_within_the_context(tiny_tokenizer):
    task = SyntheticMath(split="test", size=6)
    engine = ScriptedEngine(tiny_tokenizer, task)
    lengths = [len(tiny_tokenizer.render_for_completion(task[i])) for i in range(6)]
    config = SimpleNamespace(sequence_len=max(lengths) + 5)
    model = SimpleNamespace(config=config, get_device=lambda: torch.device("cpu"))
    assert run_generative_eval(task, tiny_tokenizer, model, engine, num_samples=1, max_new_tokens=32) == (0, 6)
    assert run_generative_eval(task, tiny_tokenizer, model, engine, num_samples=2, max_new_tokens=32) == (3, 6)
    assert engine.max_tokens[-6:] == [min(32, max(lengths) + 5 - n) for n in lengths]  # clipped to the context
    # a prompt that leaves no room to answer fails without generating
    longest = lengths.index(max(lengths))
    model.config.sequence_len = max(lengths)
    engine.max_tokens.clear()
    passed, total = run_generative_eval(task, tiny_tokenizer, model, engine, num_samples=2, max_new_tokens=32)
    assert total == 6 and passed == 3 - (longest % 2 == 0) and len(engine.max_tokens) == 5

def test_chatcore_centers_by_chance():
    # (0.25 - 0.25) / 0.75 = 0 for ARC-Easy; (0.5 - 0) / 1 = 0.5 for GSM8K; mean 0.25
    assert chatcore({"ARC-Easy": 0.25, "GSM8K": 0.5}) == pytest.approx(0.25)
    assert chatcore({"MMLU": 1.0, "SynthMC": 0.625}) == pytest.approx((1.0 + 0.5) / 2)

def test_offline_resolution_falls_back_to_synthetic(http_server, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_HF_URL", http_server.url)  # serves nothing: every listing is a 404
    monkeypatch.setattr("nanochat.common.time.sleep", lambda s: None)
    tasks, skipped = resolve_tasks(None)
    assert list(tasks) == list(SYNTHETIC_TASKS) and list(skipped) == list(REAL_TASKS)
    assert "/api/datasets/allenai/ai2_arc/parquet/ARC-Easy/test" in skipped["ARC-Easy"]
    assert sum(http_server.hits.values()) == 2  # one listing, 2 attempts; after that no more fetches are tried
    with pytest.raises(RuntimeError, match="openai/gsm8k"):  # a task asked for by name must load
        resolve_tasks(["GSM8K"])
    with pytest.raises(ValueError, match="unknown task"):
        resolve_tasks(["NotATask"])

# -----------------------------------------------------------------------------
# Rank invariance: 1 process vs 2 gloo processes on a tiny random GPT

def tiny_model(vocab_size):
    config = GPTConfig(sequence_len=256, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                       window_pattern="L")
    return seeded_gpt(config, perturb=0.3).eval(), config

def evaluate_tiny(model, tokenizer):
    engine = Engine(model, tokenizer)
    # graded by a hash of the sampled text (1 in 4 samples pass, so a problem with 2 samples passes with p = 7/16):
    # any change in which seed or problem a rank uses changes the count
    coin = ListTask([SyntheticMath("test", size=7)[i] for i in range(7)], "generative",
                    evaluate=lambda conv, text: zlib.crc32(text.encode()) % 4 == 0)
    return {
        "categorical": run_categorical_eval(SyntheticMC("test", size=13), tokenizer, model, batch_size=3),
        "generative": run_generative_eval(coin, tokenizer, model, engine, num_samples=2, max_new_tokens=6,
                                          temperature=1.0, top_k=50, progress=False),
    }

def _worker(rank, world_size, port, tokenizer_dir, model_path, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    model, _ = tiny_model(tokenizer.get_vocab_size())
    model.load_state_dict(torch.load(model_path, weights_only=True))
    results = evaluate_tiny(model, tokenizer)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()

def test_results_identical_on_one_and_two_ranks(tiny_tokenizer, tmp_path, free_port):
    model, _ = tiny_model(tiny_tokenizer.get_vocab_size())
    single = json.loads(json.dumps(evaluate_tiny(model, tiny_tokenizer)))  # tuples -> lists, as from the workers
    assert single["categorical"][1] == 13 and single["generative"][1] == 7
    assert 0 < single["generative"][0] < 7  # the coin grader is not degenerate
    tiny_tokenizer.save(str(tmp_path / "tok"))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    paths = [str(tmp_path / name) for name in ("tok", "model.pt", "out.json")]
    mp.spawn(_worker, args=(2, free_port, *paths), nprocs=2, join=True)
    assert json.loads((tmp_path / "out.json").read_text()) == single

# -----------------------------------------------------------------------------
# The script, offline, on a saved checkpoint

def test_chat_eval_cli_offline_runs_synthetic_tasks(tiny_tokenizer, base_dir):
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    model, config = tiny_model(tiny_tokenizer.get_vocab_size())
    save_checkpoint(str(base_dir / "chatsft_checkpoints" / "d2"), 5, model.state_dict(), None,
                    {"model_config": dataclasses.asdict(config)})
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "scripts.chat_eval", "-i", "sft", "-x", "3", "-m", "4", "--device-type", "cpu"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in SYNTHETIC_TASKS:
        assert f"{name} accuracy: " in proc.stdout
    assert all(s in proc.stdout for s in ("ChatCORE-synthetic", "skipped ARC-Easy", "skipped SpellingBee"))
    section = (base_dir / "report" / "chat-evaluation-sft.md").read_text()
    assert "- SynthMC: " in section and "- ChatCORE-synthetic: " in section
