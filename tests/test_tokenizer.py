"""
Tokenizer tests: a tiny rustbpe tokenizer (256 bytes + 64 merges + 9 specials, the `tiny_tokenizer` fixture)
checked for round trips, special-token safety, the chat loss mask against hand-laid-out answers, agreement
between the trainer's and tiktoken's text splitting, persistence, and clear errors on bad input.
"""

import os
import json
import pickle
import runpy
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import rustbpe
import torch

from conftest import TINY_CORPUS
from nanochat.dataset import get_data_dir, val_shard_index
from nanochat.tokenizer import (SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, get_token_bytes, get_tokenizer)

VOCAB = 256 + 64 + 9

TEXTS = [
    "Hello world! The quick brown fox.",
    "Café naïve résumé — señor Müller",
    "你好，世界！ こんにちは 안녕하세요",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷",
    "Zyxwvut qqq ŁÓДЖ ∑∫√ never seen in training\t\n\r\n   trailing  ",
    "numbers 1234567 3.14159 -42 2024-06-01, I'm we'll they've",
    "",
]

def test_vocab_size_and_special_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.get_vocab_size() == VOCAB
    # specials take the last 9 ids, in SPECIAL_TOKENS order
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(VOCAB - 9, VOCAB))
    assert tok.get_bos_token_id() == VOCAB - 9 == tok.encode_special("<|bos|>")
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS)
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode_special("hello")

@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert all(0 <= i < VOCAB - 9 for i in ids), ids
    # merges learned from the corpus actually compress it
    if text == TEXTS[0]:
        assert len(ids) < len(text.encode()), (len(ids), len(text.encode()))

def test_special_strings_in_text_stay_ordinary(tiny_tokenizer):
    tok = tiny_tokenizer
    for s in SPECIAL_TOKENS + ["<|endoftext|>"]:
        ids = tok.encode(f"a {s} b")
        assert not set(ids) & set(range(VOCAB - 9, VOCAB)), (s, ids)
        assert tok.decode(ids) == f"a {s} b"

def test_prepend_append(tiny_tokenizer):
    tok = tiny_tokenizer
    body = tok.encode("hello world")
    bos, end = tok.encode_special("<|bos|>"), tok.encode_special("<|assistant_end|>")
    assert tok.encode("hello world", prepend="<|bos|>", append="<|assistant_end|>") == [bos] + body + [end]
    assert tok.encode("hello world", prepend=bos, append=end) == [bos] + body + [end]
    assert tok.encode(["hello world", "x"], prepend=bos) == [[bos] + body, [bos] + tok.encode("x")]
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode("x", prepend="<|nope|>")
    with pytest.raises(ValueError, match="outside the vocab"):
        tok.encode("x", append=VOCAB)
    with pytest.raises(TypeError, match="str or a list"):
        tok.encode(b"bytes")

def test_batch_equals_single(tiny_tokenizer):
    tok = tiny_tokenizer
    texts = TEXTS * 5
    assert tok.encode(texts, num_threads=4) == [tok.encode(t) for t in texts]

# -----------------------------------------------------------------------------
# trainer and tiktoken must split text the same way: otherwise merges are learned that encoding never applies

def test_digits_group_by_two():
    # a corpus with only one piece type: every possible merge inside "12","34","56","7" is learned (3 merges)
    tok = Tokenizer.train_from_iterator(iter(["1234567 " * 50]), vocab_size=256 + 3 + 9)
    pieces = [tok.enc.decode_single_token_bytes(i) for i in tok.encode("1234567")]
    assert pieces == [b"12", b"34", b"56", b"7"]  # GPT-4's {1,3} grouping would give 123|456|7

def test_trainer_and_tiktoken_agree(tiny_tokenizer):
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(TINY_CORPUS), VOCAB - 9, pattern=SPLIT_PATTERN)
    ranks = {bytes(b): r for b, r in trainer.get_mergeable_ranks()}
    assert ranks == tiny_tokenizer.enc._mergeable_ranks
    varied = TEXTS + TINY_CORPUS[:7] + [
        "1234567890 12 123 x1y22z333", "٣٤٥ ١٢٣ ⅫⅦ ½¾", "i'M HE'LL 'Re 'S", "a\r\n\r\n b  \n\t c",
        "русский текст 123 中文1234字 🙂1🙂", "if x>=10:\n    return {'a': [1, 2]}  # done\n",
    ]
    for text in varied:
        assert trainer.encode(text) == tiny_tokenizer.encode(text), text

# -----------------------------------------------------------------------------
# chat rendering

def test_render_conversation_mask_by_hand(tiny_tokenizer):
    tok = tiny_tokenizer
    sp = {s: tok.encode_special(s) for s in SPECIAL_TOKENS}
    conversation = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "2+2"},
            {"type": "python_output", "text": "4"},
            {"type": "text", "text": "It is 4."},
        ]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    E = tok.encode
    expected = [  # (ids, mask) per segment: mask 1 on what the assistant writes itself, tool output excluded
        ([sp["<|bos|>"]], 0),
        ([sp["<|user_start|>"]] + E("Be brief.\n\nWhat is 2+2?") + [sp["<|user_end|>"]], 0),
        ([sp["<|assistant_start|>"]], 0),
        (E("Let me compute."), 1),
        ([sp["<|python_start|>"]] + E("2+2") + [sp["<|python_end|>"]], 1),
        ([sp["<|output_start|>"]] + E("4") + [sp["<|output_end|>"]], 0),
        (E("It is 4.") + [sp["<|assistant_end|>"]], 1),
        ([sp["<|user_start|>"]] + E("Thanks") + [sp["<|user_end|>"], sp["<|assistant_start|>"]], 0),
        (E("You're welcome.") + [sp["<|assistant_end|>"]], 1),
    ]
    want_ids = [i for seg, _ in expected for i in seg]
    want_mask = [m for seg, m in expected for _ in seg]
    ids, mask = tok.render_conversation(conversation)
    assert ids == want_ids
    assert mask == want_mask
    # supervised tokens decode to exactly the assistant's own words and calls
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == (
        "Let me compute.<|python_start|>2+2<|python_end|>It is 4.<|assistant_end|>You're welcome.<|assistant_end|>")

def test_system_merge_equals_manual_merge(tiny_tokenizer):
    with_system = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                {"role": "assistant", "content": "A"}]}
    manual = {"messages": [{"role": "user", "content": "S\n\nU"}, {"role": "assistant", "content": "A"}]}
    assert tiny_tokenizer.render_conversation(with_system) == tiny_tokenizer.render_conversation(manual)

def test_truncation(tiny_tokenizer):
    conversation = {"messages": [{"role": "user", "content": "hello " * 50},
                                 {"role": "assistant", "content": "world " * 50}]}
    full_ids, full_mask = tiny_tokenizer.render_conversation(conversation)
    assert len(full_ids) > 40
    ids, mask = tiny_tokenizer.render_conversation(conversation, max_tokens=40)
    assert (ids, mask) == (full_ids[:40], full_mask[:40])

def test_render_for_completion(tiny_tokenizer):
    tok = tiny_tokenizer
    conversation = {"messages": [{"role": "user", "content": "What is 2+2?"},
                                 {"role": "assistant", "content": "#### 4"}]}
    prompt = tok.render_for_completion(conversation)
    full, _ = tok.render_conversation(conversation)
    answer = tok.encode("#### 4")
    # the prompt is the full render up to and including <|assistant_start|>, never the answer
    assert prompt == full[:len(prompt)]
    assert prompt[-1] == tok.encode_special("<|assistant_start|>")
    assert full[len(prompt):] == answer + [tok.encode_special("<|assistant_end|>")]
    assert len(conversation["messages"]) == 2  # the caller's conversation is untouched
    # a conversation that already ends with the user's turn renders the same prompt
    assert tok.render_for_completion({"messages": conversation["messages"][:1]}) == prompt

@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 has role 'user' where 'assist"),
    ([{"role": "assistant", "content": "a"}], "message 0 has role 'assistant' where 'user'"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "system", "content": "x"}],
     "message 2 has role 'system' where 'assistant'"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "followed by a user message"),
    ([{"role": "user", "content": "u"}, {"role": "assistant", "content": [{"type": "image", "text": ""}]}],
     "unknown part type 'image'"),
    ([{"role": "user", "content": [{"type": "text", "text": "u"}]}], "user content must be a string"),
    ([], "no user or assistant messages"),
])
def test_render_rejects_bad_conversations(tiny_tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        tiny_tokenizer.render_conversation({"messages": messages})

# -----------------------------------------------------------------------------
# persistence and token_bytes

def test_save_load_round_trip(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token_bytes.pt", "tokenizer.json"]  # no temp files left
    loaded = Tokenizer.from_directory(tmp_path)
    assert loaded.get_vocab_size() == VOCAB
    assert loaded.get_bos_token_id() == tiny_tokenizer.get_bos_token_id()
    for text in TEXTS:
        assert loaded.encode(text) == tiny_tokenizer.encode(text)
    conversation = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert loaded.render_conversation(conversation) == tiny_tokenizer.render_conversation(conversation)

def test_token_bytes_count_raw_bytes(tiny_tokenizer, base_dir):
    tiny_tokenizer.save(base_dir / "tokenizer")
    token_bytes = get_token_bytes()
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (VOCAB,)
    assert token_bytes[:256].tolist() == [1] * 256
    assert token_bytes[VOCAB - 9:].tolist() == [0] * 9
    assert torch.equal(token_bytes, tiny_tokenizer.token_bytes())
    # CJK/emoji fall apart into lone bytes >= 0x80 here; each must count 1 byte, not 3 for U+FFFD (the OLD bug)
    for text in TEXTS:
        ids = get_tokenizer().encode(text)
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8")), text

# -----------------------------------------------------------------------------
# bad inputs

def test_missing_tokenizer_names_the_fix(base_dir):
    with pytest.raises(FileNotFoundError, match="python -m scripts.tok_train"):
        get_tokenizer()
    with pytest.raises(FileNotFoundError, match="python -m scripts.tok_train"):
        get_token_bytes()

@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_object", "bad_base64", "special_ids_gap"])
def test_corrupt_tokenizer_file(tiny_tokenizer, tmp_path, damage):
    tiny_tokenizer.save(tmp_path)
    path = tmp_path / "tokenizer.json"
    data = json.loads(path.read_text())
    path.write_text({"garbage": "not json at all", "truncated": path.read_text()[:100],
                     "wrong_object": json.dumps([1, 2]),
                     "bad_base64": json.dumps(dict(data, mergeable_ranks=data["mergeable_ranks"][:-1] + ["**"])),
                     "special_ids_gap": json.dumps(dict(data, special_tokens={"<|bos|>": VOCAB + 5}))}[damage])
    with pytest.raises(RuntimeError, match=r"tokenizer\.json.*tok_train"):
        Tokenizer.from_directory(tmp_path)

class Planted:
    """A pickle that runs code when loaded: it creates the file named in its argument."""
    def __init__(self, marker):
        self.marker = marker
    def __reduce__(self):
        return (open, (self.marker, "w"))

def test_pickle_tokenizer_needs_opt_in(tiny_tokenizer, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "tokenizer.pkl").write_bytes(pickle.dumps(Planted(str(marker))))
    monkeypatch.delenv("NANOCHAT_ALLOW_PICKLE_TOKENIZER", raising=False)
    with pytest.raises(RuntimeError, match="NANOCHAT_ALLOW_PICKLE_TOKENIZER=1.*tok_train"):
        Tokenizer.from_directory(planted)
    assert not marker.exists()  # the pickle was never unpickled
    # an old tokenizer the user made: with the opt-in it loads once and is converted to the data-only file
    old = tmp_path / "old"
    old.mkdir()
    (old / "tokenizer.pkl").write_bytes(pickle.dumps(tiny_tokenizer.enc))
    monkeypatch.setenv("NANOCHAT_ALLOW_PICKLE_TOKENIZER", "1")
    loaded = Tokenizer.from_directory(old)
    assert (old / "tokenizer.json").exists() and loaded.fingerprint() == tiny_tokenizer.fingerprint()
    monkeypatch.delenv("NANOCHAT_ALLOW_PICKLE_TOKENIZER")
    assert Tokenizer.from_directory(old).encode(TEXTS[0]) == tiny_tokenizer.encode(TEXTS[0])

def test_without_rustbpe_tokenizers_load_and_training_names_the_fix(tiny_tokenizer, tmp_path):
    # GPU machines may have tiktoken but not the trainer: everything but training must work there
    tiny_tokenizer.save(str(tmp_path / "tok"))
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "rustbpe.py").write_text("raise ImportError('rustbpe is blocked in this test')\n")
    code = """if True:
        import sys, pkgutil, importlib, nanochat
        for m in pkgutil.walk_packages(nanochat.__path__, "nanochat."):
            importlib.import_module(m.name)  # every library module imports without the trainer
        import bench.gpu_check
        from nanochat.tokenizer import Tokenizer
        tok = Tokenizer.from_directory(sys.argv[1])
        print(tok.encode("Hello world!"))
        try:
            Tokenizer.train_from_iterator(iter(["a b"] * 9), vocab_size=266)
        except ImportError as e:
            print("ERROR", e)
    """
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "block"), repo]))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tok")], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == str(tiny_tokenizer.encode("Hello world!"))
    assert lines[-1].startswith("ERROR") and "pip install rustbpe" in lines[-1]

def test_fingerprint_tells_same_size_tokenizers_apart(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path)
    assert Tokenizer.from_directory(tmp_path).fingerprint() == tiny_tokenizer.fingerprint()
    other = Tokenizer.train_from_iterator(iter([t[::-1] for t in TINY_CORPUS]), vocab_size=VOCAB)
    assert other.get_vocab_size() == VOCAB and other.fingerprint() != tiny_tokenizer.fingerprint()

def test_vocab_size_limits():
    with pytest.raises(ValueError, match="at least 256 bytes"):
        Tokenizer.train_from_iterator(iter(["abc"]), vocab_size=256 + 8)
    # 256 + 9 is the smallest valid vocab: pure bytes, still round-trips anything
    tok = Tokenizer.train_from_iterator(iter(["abc"]), vocab_size=256 + 9)
    assert tok.encode("héllo 🙂") == list("héllo 🙂".encode())
    # a corpus too small for the requested merges must fail, not silently shift the special ids
    with pytest.raises(ValueError, match="only supports"):
        Tokenizer.train_from_iterator(iter(["ab ab ab"]), vocab_size=256 + 9 + 100)

# -----------------------------------------------------------------------------
# scripts, run in-process on a tiny local corpus

def write_local_corpus(texts):
    data_dir = get_data_dir("local")
    os.makedirs(data_dir, exist_ok=True)
    for index in (0, val_shard_index("local")):  # one train shard and the pinned val shard
        pq.write_table(pa.table({"text": texts}), f"{data_dir}/shard_{index:05d}.parquet", row_group_size=16)

def run_script(name, argv, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATASET", "local")
    monkeypatch.setattr(sys, "argv", [name] + argv)
    runpy.run_module(name, run_name="__main__")

def test_tok_train_and_tok_eval_offline(base_dir, monkeypatch, capsys):
    write_local_corpus(TINY_CORPUS)
    run_script("scripts.tok_train", ["--vocab-size", str(VOCAB), "--max-chars", "2e3"], monkeypatch)
    out = capsys.readouterr().out
    assert "round trip ok" in out and "token_bytes_min: 1" in out, out
    tok = get_tokenizer()
    assert tok.get_vocab_size() == VOCAB
    assert torch.equal(get_token_bytes(), tok.token_bytes())

    def offline(cls, name):  # what tiktoken raises with no network and no cache
        raise requests.exceptions.ConnectionError(f"cannot reach the host for {name}")
    monkeypatch.setattr(Tokenizer, "from_pretrained", classmethod(offline))
    run_script("scripts.tok_eval", [], monkeypatch)
    out = capsys.readouterr().out
    assert "gpt2 baseline skipped" in out and "TIKTOKEN_CACHE_DIR" in out, out
    for row in ("news", "korean", "code", "math", "science", "local-train", "local-val"):
        assert f"| {row} " in out, out

def test_tok_train_empty_corpus(base_dir, monkeypatch):
    write_local_corpus(["", ""])
    with pytest.raises(SystemExit, match="no text"):
        run_script("scripts.tok_train", ["--vocab-size", str(VOCAB)], monkeypatch)
