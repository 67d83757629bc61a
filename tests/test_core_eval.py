"""
CORE eval tests on a small bundle in the eval bundle's own format (core.yaml, eval_meta_data.csv,
eval_data/*.jsonl with one task of each type; tests/conftest.py writes it), scored by fake models:
an oracle that knows the gold prompts, a uniform model and a seeded bigram model.
Checks rendered prompts and continuation spans against hand-worked strings, accuracy and centering,
batching and 1-vs-2-process invariance, the bundle download/unzip and the errors a user can hit.
"""

import io
import json
import os
import random
import zipfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from nanochat import core_eval
from nanochat.core_eval import (continuation_spans, crop_left, evaluate_core, render_prompts, sample_fewshot)
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from conftest import CORE_YAML, LM_DATA, MC_DATA, SCHEMA_DATA, WORDS, write_bundle

@pytest.fixture
def bundle(base_dir):
    """The fixture bundle written under the test's NANOCHAT_BASE_DIR, where evaluate_core looks for it."""
    return write_bundle(base_dir)

def gold_sequences(tokenizer, bundle, max_per_task=-1):
    """The token rows the gold answers are scored on (what an oracle must predict), in evaluate_core's order."""
    tasks, _ = core_eval.load_core_config(str(bundle))
    golds = {}
    for task in tasks:
        data = core_eval.load_task_data(os.path.join(bundle, "eval_data", task["dataset_uri"]), task["task_type"])
        random.Random(1337).shuffle(data)
        data = data[:max_per_task] if max_per_task > 0 else data
        examples, _ = core_eval.prepare_examples(task, data, range(len(data)), tokenizer)
        golds[task["label"]] = [rows[gold or 0][0] for _, rows, gold in examples]
    return golds

# -----------------------------------------------------------------------------
# Fake models: forward(idx, targets=None, loss_reduction="mean") -> logits (B, T, vocab), as the GPT contract

class OracleModel(nn.Module):
    """A big logit on the next token of whichever gold row the prefix so far follows; uniform off those rows."""
    def __init__(self, vocab_size, sequences):
        super().__init__()
        self.vocab_size = vocab_size
        self.trie = {}
        for seq in sequences:
            node = self.trie
            for token in seq:
                node = node.setdefault(token, {})

    def forward(self, idx, targets=None, loss_reduction="mean"):
        logits = torch.zeros(*idx.shape, self.vocab_size)
        for b, row in enumerate(idx.tolist()):
            node = self.trie
            for t, token in enumerate(row):
                node = node.get(token)
                if not node:
                    break
                logits[b, t, next(iter(node))] = 20.0
        return logits

class UniformModel(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, idx, targets=None, loss_reduction="mean"):
        return torch.zeros(*idx.shape, self.vocab_size)

class BigramModel(nn.Module):
    """Seeded random bigram logits: arbitrary but deterministic, and each row independent of the others."""
    def __init__(self, vocab_size):
        super().__init__()
        self.table = nn.Embedding(vocab_size, vocab_size)
        with torch.no_grad():
            self.table.weight.copy_(torch.randn(vocab_size, vocab_size, generator=torch.Generator().manual_seed(0)))

    def forward(self, idx, targets=None, loss_reduction="mean"):
        return self.table(idx)

# -----------------------------------------------------------------------------
# Prompts and continuation spans, hand-worked

def test_render_prompts_each_type():
    mc = {"query": "Which animal barks?", "choices": ["dog", "cat"], "gold": 0}
    shot = {"query": "Which animal purrs?", "choices": ["dog", "cat"], "gold": 1}
    assert render_prompts("multiple_choice", mc, "\nAnswer: ", [shot]) == [
        "Which animal purrs?\nAnswer: cat\n\nWhich animal barks?\nAnswer: dog",
        "Which animal purrs?\nAnswer: cat\n\nWhich animal barks?\nAnswer: cat",
    ]
    schema = {"context_options": ["Anna thanked Bea because Anna", "Anna thanked Bea because Bea"],
              "continuation": "helped.", "gold": 1}
    shot = {"context_options": ["Tom beat Sam so Tom", "Tom beat Sam so Sam"], "continuation": "was sad.", "gold": 1}
    assert render_prompts("schema", schema, " ", [shot, shot]) == [
        "Tom beat Sam so Sam was sad.\n\nTom beat Sam so Sam was sad.\n\nAnna thanked Bea because Anna helped.",
        "Tom beat Sam so Sam was sad.\n\nTom beat Sam so Sam was sad.\n\nAnna thanked Bea because Bea helped.",
    ]
    lm = {"context": "  The opposite of hot is ", "continuation": "cold"}
    shot = {"context": "The capital of France is\n", "continuation": "Paris"}
    # context trimmed; prompt-without loses the trailing delimiter space so " cold" can be one token's start
    assert render_prompts("language_modeling", lm, " ", [shot]) == [
        "The capital of France is Paris\n\nThe opposite of hot is",
        "The capital of France is Paris\n\nThe opposite of hot is cold",
    ]
    assert render_prompts("language_modeling", lm, "\nAnswer: ", []) == [
        "The opposite of hot is\nAnswer:", "The opposite of hot is\nAnswer: cold"]

def test_fewshot_draws_match_seeded_sample_excluding_self():
    data = [{"i": i} for i in range(50)]
    for idx in (0, 7, 49):
        others = [d for j, d in enumerate(data) if j != idx]
        assert sample_fewshot(data, idx, 5) == random.Random(1234 + idx).sample(others, 5)
        assert data[idx] not in sample_fewshot(data, idx, 49)  # all the others, never itself
    assert sample_fewshot(data, 3, 0) == []
    # a task cropped (max_per_task) below k + 1 examples gets all the others instead of crashing
    small = data[:4]
    assert sorted(d["i"] for d in sample_fewshot(small, 1, 10)) == [0, 2, 3]
    assert sample_fewshot(small[:1], 0, 10) == []

def test_continuation_spans_on_tiny_tokenizer(tiny_tokenizer):
    tok = tiny_tokenizer
    bos = tok.get_bos_token_id()
    decode_spans = lambda seqs, spans: [tok.decode(s[a:b]) for s, (a, b) in zip(seqs, spans)]

    # multiple choice: everything after the common token prefix
    mc = {"query": "Which animal barks?", "choices": ["dog", "fox", "red"], "gold": 0}
    prompts = render_prompts("multiple_choice", mc, "\nAnswer: ", [])
    seqs, spans = continuation_spans("multiple_choice", tok.encode(prompts, prepend=bos))
    assert decode_spans(seqs, spans) == [" dog", " fox", " red"]
    assert seqs[0][:spans[0][0]] == [bos] + tok.encode("Which animal barks?\nAnswer:")
    # the tiny tokenizer has no ' c' or ' g' merge, so the shared ' ' token belongs to the prefix
    prompts = render_prompts("multiple_choice", {"query": "Pick:", "choices": ["cat", "green"], "gold": 0}, " ", [])
    seqs, spans = continuation_spans("multiple_choice", tok.encode(prompts, prepend=bos))
    assert decode_spans(seqs, spans) == ["cat", "green"]

    # schema: the common token suffix
    prompts = render_prompts("schema", SCHEMA_DATA[0], " ", [])
    seqs, spans = continuation_spans("schema", tok.encode(prompts, prepend=bos))
    assert decode_spans(seqs, spans) == [" was too big.", " was too big."]
    assert tok.decode(seqs[1][1:spans[1][0]]) == "The trophy did not fit in the suitcase because the suitcase"

    # language modeling: prompt-with beyond prompt-without, a single sequence is scored
    prompts = render_prompts("language_modeling", LM_DATA[0], " ", [])
    seqs, spans = continuation_spans("language_modeling", tok.encode(prompts, prepend=bos))
    assert len(seqs) == 1 and decode_spans(seqs, spans) == [" cold"]
    assert seqs[0] == [bos] + tok.encode("The opposite of hot is cold")

def test_continuation_span_edge_cases():
    # a choice that is a token prefix of another still scores one token of its own
    assert continuation_spans("multiple_choice", [[9, 1, 2], [9, 1, 2, 3]])[1] == [(2, 3), (2, 4)]
    assert continuation_spans("schema", [[9, 5, 7, 8], [9, 6, 7, 8]])[1] == [(2, 4), (2, 4)]
    with pytest.raises(ValueError, match="not a strict token prefix"):
        continuation_spans("language_modeling", [[9, 1, 2], [9, 1, 4, 5]])  # BPE merged across the boundary
    # left crop keeps the last max_len tokens and moves the span with them
    assert crop_left(list(range(10)), 7, 10, 5) == ([5, 6, 7, 8, 9], 2, 5)
    assert crop_left([1, 2, 3], 1, 3, 5) == ([1, 2, 3], 1, 3)
    assert crop_left(list(range(10)), 7, 10, None) == (list(range(10)), 7, 10)  # no hard limit: never cropped
    # the span and the token before it must fit: 4 tokens fit a 4-token span only with its predecessor cut off
    assert crop_left(list(range(10)), 6, 10, 5) == ([5, 6, 7, 8, 9], 1, 5)
    assert crop_left(list(range(10)), 6, 10, 4) is None

# -----------------------------------------------------------------------------
# Scoring

def test_oracle_scores_one_and_uniform_scores_the_baseline(tiny_tokenizer, bundle):
    V = tiny_tokenizer.get_vocab_size()
    golds = gold_sequences(tiny_tokenizer, bundle)
    oracle = OracleModel(V, [s for seqs in golds.values() for s in seqs])
    out = evaluate_core(oracle, tiny_tokenizer, "cpu")
    assert out["results"] == {"mc_task": 1.0, "schema_task": 1.0, "lm_task": 1.0}
    assert out["centered_results"] == {"mc_task": 1.0, "schema_task": 1.0, "lm_task": 1.0}
    assert out["core_metric"] == 1.0

    # uniform: every option ties and the first wins, so accuracy = share of gold == 0 = the random baseline here
    out = evaluate_core(UniformModel(V), tiny_tokenizer, "cpu")
    assert out["results"] == {"mc_task": 0.25, "schema_task": 0.5, "lm_task": 0.0}
    assert out["centered_results"] == pytest.approx({"mc_task": 0.0, "schema_task": 0.0, "lm_task": 0.0}, abs=1e-12)

def test_partial_oracle_centering_and_max_per_task(tiny_tokenizer, bundle):
    V = tiny_tokenizer.get_vocab_size()
    golds = gold_sequences(tiny_tokenizer, bundle)
    # the oracle knows the MC answers of the first 3 shuffled examples only; the rest fall back to choice 0
    data = list(MC_DATA)
    random.Random(1337).shuffle(data)
    known = 3
    expected = (known + sum(ex["gold"] == 0 for ex in data[known:])) / len(data)
    out = evaluate_core(OracleModel(V, golds["mc_task"][:known]), tiny_tokenizer, "cpu")
    assert out["results"]["mc_task"] == pytest.approx(expected)
    assert out["centered_results"]["mc_task"] == pytest.approx((expected - 0.25) / 0.75)
    assert out["core_metric"] == pytest.approx(sum(out["centered_results"].values()) / 3)
    # max_per_task keeps the first N of the same shuffle, and few-shot examples come from those N only
    cropped = gold_sequences(tiny_tokenizer, bundle, max_per_task=known)
    assert [tiny_tokenizer.decode(s).split("\n\n")[-1] for s in cropped["mc_task"]] == \
        [f"{ex['query']}\nAnswer: {WORDS[ex['gold']]}" for ex in data[:known]]
    out = evaluate_core(OracleModel(V, cropped["mc_task"]), tiny_tokenizer, "cpu", max_per_task=known)
    assert out["results"]["mc_task"] == 1.0

def test_lm_exact_match_fails_on_one_wrong_token(tiny_tokenizer, bundle):
    V = tiny_tokenizer.get_vocab_size()
    golds = gold_sequences(tiny_tokenizer, bundle)
    lm = [list(s) for s in golds["lm_task"]]
    target = next(i for i, s in enumerate(lm) if tiny_tokenizer.decode(s).endswith("dog and the cat"))
    lm[target][-1] = (lm[target][-1] + 1) % V  # the oracle now predicts a wrong last token for that example only
    out = evaluate_core(OracleModel(V, lm), tiny_tokenizer, "cpu")
    assert out["results"]["lm_task"] == pytest.approx(5 / 6)

def test_batching_does_not_change_results(tiny_tokenizer, bundle):
    model = BigramModel(tiny_tokenizer.get_vocab_size())
    one_per_forward = evaluate_core(model, tiny_tokenizer, "cpu", batch_tokens=1)
    all_in_one = evaluate_core(model, tiny_tokenizer, "cpu", batch_tokens=1 << 20)
    assert one_per_forward == all_in_one
    # and a hard context limit (left crop) is a different, still well-defined evaluation
    model.max_seq_len = 40
    cropped = evaluate_core(model, tiny_tokenizer, "cpu")
    assert set(cropped["results"]) == set(all_in_one["results"])

# -----------------------------------------------------------------------------
# A real GPT: prompts past its context are scored whole; only a hard context limit crops

def _random_gpt(vocab_size, sequence_len):
    """A tiny GPT with random weights everywhere (init zeroes the projections, which would hide attention)."""
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                          n_embd=64, window_pattern="L"))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    return model.eval()

def _task_rows(tokenizer, bundle):
    """{label: (task, data, uncropped examples)} in evaluate_core's order."""
    tasks, _ = core_eval.load_core_config(str(bundle))
    out = {}
    for task in tasks:
        data = core_eval.load_task_data(os.path.join(bundle, "eval_data", task["dataset_uri"]), task["task_type"])
        random.Random(1337).shuffle(data)
        out[task["label"]] = (task, data, core_eval.prepare_examples(task, data, range(len(data)), tokenizer)[0])
    return out

def test_prompt_longer_than_context_is_scored_whole(tiny_tokenizer, bundle):
    V = tiny_tokenizer.get_vocab_size()
    short = _random_gpt(V, sequence_len=6)  # rotary tables for 60 positions, prompts up to 72 tokens
    # the same weights built for a 256-token context attend within the same windows, the way a model reads any
    # sequence longer than its training context (FA3's window_size=(sequence_len, 0) does the same)
    long = _random_gpt(V, sequence_len=256)
    long.load_state_dict(short.state_dict())
    long.window_sizes = list(short.window_sizes)
    rows = _task_rows(tiny_tokenizer, bundle)
    longest = max(len(t) for _, _, examples in rows.values() for _, ex_rows, _ in examples for t, _, _ in ex_rows)
    assert longest > short.cos.size(1) > short.config.sequence_len  # past the rotary headroom, not only the context
    out_short = evaluate_core(short, tiny_tokenizer, "cpu")
    assert short.cos.size(1) >= longest  # the tables grew to the longest prompt
    out_long = evaluate_core(long, tiny_tokenizer, "cpu")
    assert out_short == out_long
    assert out_short["skipped"] == {"mc_task": 0, "schema_task": 0, "lm_task": 0}
    # per-row scores too (accuracies are coarse): every continuation's mean loss is the long model's, bit for bit
    for _, _, examples in rows.values():
        flat = [row for _, ex_rows, _ in examples for row in ex_rows]
        assert core_eval.score_rows(short, flat, tiny_tokenizer.get_bos_token_id(), "cpu") == \
            core_eval.score_rows(long, flat, tiny_tokenizer.get_bos_token_id(), "cpu")
    # and scoring whole matters here: left-cropped to the 6-token context, the same model scores differently
    cropped = [core_eval.crop_left(t, a, b, 6) for _, _, examples in rows.values() for _, ex_rows, _ in examples
               for t, a, b in ex_rows]
    kept = [r for r in cropped if r is not None]
    whole = [r for r, c in zip((row for _, _, ex in rows.values() for _, ex_rows, _ in ex for row in ex_rows), cropped)
             if c is not None]
    bos = tiny_tokenizer.get_bos_token_id()
    assert core_eval.score_rows(short, kept, bos, "cpu")[0] != core_eval.score_rows(short, whole, bos, "cpu")[0]

def test_hard_context_limit_crops_like_a_hand_cropped_evaluation(tiny_tokenizer, base_dir):
    """A model with max_seq_len (like HF GPT-2's 1024) gets left-cropped prompts; spans that cannot fit are skipped."""
    bundle = write_bundle(base_dir)
    model = _random_gpt(tiny_tokenizer.get_vocab_size(), sequence_len=64)
    M = 8
    model.max_seq_len = M
    out = evaluate_core(model, tiny_tokenizer, "cpu")
    # by hand: each prompt alone, its last M tokens, mean cross-entropy of the scored tokens, lowest wins
    for label, (task, data, examples) in _task_rows(tiny_tokenizer, bundle).items():
        correct = skipped = 0
        for _, ex_rows, gold in examples:
            if any(start - (len(tokens) - M) < 1 for tokens, start, _ in ex_rows):
                skipped += 1  # the scored tokens and the one before them do not fit in M
                continue
            losses, hits = [], []
            for tokens, start, end in ex_rows:
                cut = max(0, len(tokens) - M)
                ids = torch.tensor([tokens[cut:]])
                with torch.no_grad():
                    logits = model(ids)[0].float()
                pred = logits[start - cut - 1:end - cut - 1]
                target = ids[0, start - cut:end - cut]
                losses.append(torch.nn.functional.cross_entropy(pred, target).item())
                hits.append(bool((pred.argmax(-1) == target).all()))
            correct += hits[0] if task["task_type"] == "language_modeling" else losses.index(min(losses)) == gold
        assert out["skipped"][label] == skipped
        assert out["results"][label] == pytest.approx(correct / (len(data) - skipped), abs=1e-9)
    # at M = 8 the 10- and 8-token schema endings and the 8-token LM answer cannot fit; all MC answers (1 token) do
    assert out["skipped"] == {"mc_task": 0, "schema_task": 2, "lm_task": 1}

def _worker(rank, world_size, port, tokenizer_dir, out_path):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    out = evaluate_core(BigramModel(tokenizer.get_vocab_size()), tokenizer, "cpu")
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()

def test_two_processes_match_one(tiny_tokenizer, bundle, tmp_path, free_port):
    single = evaluate_core(BigramModel(tiny_tokenizer.get_vocab_size()), tiny_tokenizer, "cpu")
    assert 0 < sum(single["results"].values()) < 3  # a model that is neither always right nor always wrong
    tokenizer_dir = str(tmp_path / "tok")
    tiny_tokenizer.save(tokenizer_dir)
    out_path = str(tmp_path / "out.json")
    mp.spawn(_worker, args=(2, free_port, tokenizer_dir, out_path), nprocs=2, join=True)
    with open(out_path) as f:
        assert json.load(f) == single

# -----------------------------------------------------------------------------
# The bundle on disk: download, unzip, and the errors a user can hit

def zip_of(root):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(root).as_posix())
    return buf.getvalue()

def test_bundle_download_and_unzip(base_dir, tmp_path, http_server):
    write_bundle(tmp_path / "src")
    http_server.routes["/eval_bundle.zip"] = zip_of(tmp_path / "src")
    url = http_server.url + "/eval_bundle.zip"
    assert not core_eval.eval_bundle_available()
    bundle_dir = core_eval.ensure_eval_bundle(url=url)
    assert bundle_dir == str(base_dir / "eval_bundle") and core_eval.eval_bundle_available()
    assert (base_dir / "eval_bundle" / "core.yaml").read_text() == CORE_YAML
    lm_task = base_dir / "eval_bundle/eval_data/language_understanding/lm_task.jsonl"
    assert lm_task.read_text().count("\n") == len(LM_DATA)
    assert not (base_dir / "eval_bundle.zip").exists()  # the zip is transient
    assert not [p for p in os.listdir(base_dir) if "tmp" in p]  # no temp dirs left behind
    core_eval.ensure_eval_bundle(url=url)
    assert http_server.hits["/eval_bundle.zip"] == 1  # fetched once

def test_bundle_offline_and_corrupt_zip(base_dir, http_server, monkeypatch):
    monkeypatch.setattr("nanochat.common.time.sleep", lambda s: None)  # skip the retry backoff
    url = http_server.url + "/missing.zip"
    with pytest.raises(core_eval.EvalBundleUnavailable) as e:
        core_eval.ensure_eval_bundle(url=url)
    message = str(e.value)
    assert f"curl -L -o eval_bundle.zip {url}" in message and f"unzip eval_bundle.zip -d {base_dir}" in message
    assert not (base_dir / "eval_bundle").exists()

    http_server.routes["/bad.zip"] = b"this is not a zip file"
    with pytest.raises(RuntimeError, match="not a valid zip"):
        core_eval.ensure_eval_bundle(url=http_server.url + "/bad.zip")
    assert not (base_dir / "eval_bundle.zip").exists() and not (base_dir / "eval_bundle").exists()

    # a valid zip without core.yaml is deleted too, so a rerun downloads again instead of failing on it forever
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("readme.txt", "not a bundle")
    http_server.routes["/other.zip"] = buf.getvalue()
    with pytest.raises(RuntimeError, match="no core.yaml.*rerun to download it again"):
        core_eval.ensure_eval_bundle(url=http_server.url + "/other.zip")
    assert not (base_dir / "eval_bundle.zip").exists() and not (base_dir / "eval_bundle").exists()

def test_extract_failure_other_than_a_bad_zip_keeps_the_download(tmp_path, monkeypatch):
    # a full disk while renaming the extracted bundle: the 162 MB zip must survive for the rerun
    zip_path, bundle_dir = tmp_path / "eval_bundle.zip", tmp_path / "eval_bundle"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("eval_bundle/core.yaml", "icl_tasks: []")
    def full_disk(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(core_eval.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        core_eval._extract_bundle(str(zip_path), str(bundle_dir))
    assert zip_path.exists() and not bundle_dir.exists()
    monkeypatch.undo()
    core_eval._extract_bundle(str(zip_path), str(bundle_dir))  # the rerun: extracted, zip removed
    assert (bundle_dir / "core.yaml").exists() and not zip_path.exists()

def test_missing_task_file_and_malformed_line(tiny_tokenizer, bundle):
    model = UniformModel(tiny_tokenizer.get_vocab_size())
    lm_path = bundle / "eval_data/language_understanding/lm_task.jsonl"
    lines = lm_path.read_text().splitlines()
    lm_path.write_text("\n".join(lines[:2] + ['{"context": "Hello", "continuation": '] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=r"lm_task\.jsonl:3: malformed JSON"):
        evaluate_core(model, tiny_tokenizer, "cpu")
    lm_path.write_text("\n".join(lines[:4] + ['{"context": "Hello"}']) + "\n")
    with pytest.raises(ValueError, match=r"lm_task\.jsonl:5: .*lacks \['continuation'\]"):
        evaluate_core(model, tiny_tokenizer, "cpu")
    (bundle / "eval_data/reasoning/mc_task.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"reasoning/mc_task\.jsonl is missing"):
        evaluate_core(model, tiny_tokenizer, "cpu")
