"""
Tests for nanochat/dataloader.py: best-fit packing on hand-worked examples, exact resume (1 and 2 ranks,
across an epoch wrap), the val loader, and the chat packer's padding, cropping and loss mask.
"""

import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataloader import pretrain_loader, chat_loader
from nanochat.dataset import get_data_dir

def write_shards(shards, row_group_size):
    """shards: {index: [texts]} written as <data dir>/shard_NNNNN.parquet of the "local" dataset."""
    data_dir = get_data_dir("local")
    os.makedirs(data_dir, exist_ok=True)
    for index, texts in shards.items():
        pq.write_table(pa.table({"text": texts}), os.path.join(data_dir, f"shard_{index:05d}.parquet"),
                       row_group_size=row_group_size)

@pytest.fixture
def local_data(base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATASET", "local")
    return base_dir

class CharTokenizer:
    """Fake tokenizer: one token per character (its code point), BOS = 0; lengths are easy to hand-work."""
    def get_bos_token_id(self):
        return 0
    def encode(self, texts, prepend=None, num_threads=1):
        return [[prepend] + [ord(c) for c in text] for text in texts]

def random_texts(rng, n, max_words=60):
    words = "the of and a to in is was he for it with as his on be at by i this had not are but from".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, max_words))) for _ in range(n)]

# -----------------------------------------------------------------------------
# Pretraining loader

def test_best_fit_packing_hand_example(local_data):
    # token lengths with BOS: A 5, B 8, C 3, D 2, E 12, F 4; one row group, all tokenized in one refill
    texts = ["aaaa", "bbbbbbb", "cc", "d", "eeeeeeeeeee", "fff"]
    write_shards({0: texts}, row_group_size=6)
    loader = pretrain_loader(CharTokenizer(), B=3, T=9, split="train", buffer_size=1, tokenizer_batch_size=6)
    inputs, targets, _ = next(loader)
    rows = torch.cat([inputs, targets[:, -1:]], dim=1).tolist()
    enc = lambda s: [0] + [ord(c) for c in s]
    # row 0: largest that fits 10 is B (8), then D (2) fills the row exactly
    # row 1: A (5), then F (4); 1 slot left and nothing fits, so the shortest (C) is cropped to 1 token (its BOS)
    # row 2: only E (12) is left and does not fit: cropped to 10
    assert rows == [enc("bbbbbbb") + enc("d"), enc("aaaa") + enc("fff") + enc("cc")[:1], enc("eeeeeeeeeee")[:10]]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the inputs shifted by one
    assert inputs.dtype == targets.dtype == torch.int64

def test_best_fit_ties_go_to_the_document_that_came_first(local_data):
    # five documents of 4 tokens (with BOS) across three row groups; rows of 4 take one each, in stream order
    # (a bisect for the largest fitting length alone lands on the last of them)
    write_shards({0: ["xxx", "yyy"], 1: ["ppp", "qqq", "rrr"]}, row_group_size=2)
    loader = pretrain_loader(CharTokenizer(), B=5, T=3, split="train", buffer_size=5, tokenizer_batch_size=2)
    inputs, targets, _ = next(loader)
    rows = torch.cat([inputs, targets[:, -1:]], dim=1).tolist()
    assert [chr(row[1]) for row in rows] == ["x", "y", "p", "q", "r"]

def test_rows_start_with_bos_and_are_full_documents(local_data, tiny_tokenizer):
    rng = random.Random(0)
    docs = random_texts(rng, 200)
    write_shards({0: docs[:100], 1: docs[100:], 9: random_texts(rng, 20)}, row_group_size=16)
    bos = tiny_tokenizer.get_bos_token_id()
    encoded = {tuple(ids) for ids in tiny_tokenizer.encode(docs, prepend=bos)}
    prefixes = {tuple(ids[:n]) for ids in encoded for n in range(1, len(ids) + 1)}
    loader = pretrain_loader(tiny_tokenizer, B=4, T=64, split="train", buffer_size=50)
    for _ in range(10):
        inputs, targets, _ = next(loader)
        for row in torch.cat([inputs, targets[:, -1:]], dim=1).tolist():
            assert row[0] == bos
            starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
            pieces = [tuple(row[a:b]) for a, b in zip(starts, starts[1:])]
            assert all(p in encoded for p in pieces[:-1]), "every document but the last in a row is whole"
            assert pieces[-1] in prefixes, "the last one is a whole document or its cropped start (no padding)"

@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_is_exact(local_data, tiny_tokenizer, world_size):
    rng = random.Random(1)
    write_shards({0: random_texts(rng, 60), 1: random_texts(rng, 45), 9: random_texts(rng, 10)}, row_group_size=8)
    kw = dict(B=2, T=32, split="train", world_size=world_size, buffer_size=12, tokenizer_batch_size=5)
    for rank in range(world_size):
        reference = pretrain_loader(tiny_tokenizer, rank=rank, **kw)
        batches = [next(reference) for _ in range(40)]
        assert batches[-1][2]["epoch"] > 1, "the stream should wrap into epoch 2 within 40 batches"
        for k in (0, 7, 23):
            state = json.loads(json.dumps(batches[k][2]))  # goes through checkpoint meta as JSON
            resumed = pretrain_loader(tiny_tokenizer, rank=rank, state=state, **kw)
            for inputs, targets, state in batches[k + 1:]:
                x, y, s = next(resumed)
                assert torch.equal(x, inputs) and torch.equal(y, targets) and s == state

def test_ranks_read_disjoint_row_groups(local_data):
    # each row group is one document of a distinct letter; rank r of 2 must see only row groups r, r+2, ...
    write_shards({0: [c * 7 for c in "abcdef"]}, row_group_size=1)
    seen = []
    for rank in range(2):
        loader = pretrain_loader(CharTokenizer(), B=3, T=7, split="train", rank=rank, world_size=2, buffer_size=1)
        inputs, _, _ = next(loader)
        seen.append({chr(t) for t in inputs[:, 1].tolist()})
    assert seen == [{"a", "c", "e"}, {"b", "d", "f"}]

def test_512_streams_on_a_tiny_corpus(local_data):
    """More streams than row groups (one GPU at device batch 1: hundreds of micro-steps): every stream gets data.
    Stream r of W reads global row groups r, r+W, ... of the 9 row groups (5 in file 0, 4 in file 1), wrapping
    into later epochs; so the k-th row of stream r is document (r + k*W) % 9, and together the first 9 streams read
    every row group exactly once."""
    letters = "abcdefghi"
    write_shards({0: [c * 7 for c in letters[:5]], 1: [c * 7 for c in letters[5:]], 9: ["zzzzzzz"]}, row_group_size=1)
    W, kw = 512, dict(B=3, T=7, split="train", world_size=512, buffer_size=1)
    for rank in range(W):
        loader = pretrain_loader(CharTokenizer(), rank=rank, **kw)
        inputs, _, state = next(loader)
        assert [chr(t) for t in inputs[:, 1].tolist()] == [letters[(rank + j * W) % 9] for j in range(3)], rank
    # exact resume of the last stream, deep into later epochs
    reference = pretrain_loader(CharTokenizer(), rank=W - 1, **kw)
    batches = [next(reference) for _ in range(6)]
    assert batches[-1][2]["epoch"] > 300
    resumed = pretrain_loader(CharTokenizer(), rank=W - 1, state=json.loads(json.dumps(batches[2][2])), **kw)
    for inputs, targets, state in batches[3:]:
        x, y, s = next(resumed)
        assert torch.equal(x, inputs) and torch.equal(y, targets) and s == state

def test_resume_with_different_shards_is_an_error(local_data):
    write_shards({0: [c * 7 for c in "abcd"], 9: ["zzzzzzz"]}, row_group_size=1)
    _, _, state = next(pretrain_loader(CharTokenizer(), B=1, T=7, split="train", buffer_size=1))
    write_shards({1: ["eeeeeee"]}, row_group_size=1)  # one more train shard since the state was saved
    with pytest.raises(AssertionError, match="resume with the same data shards"):
        next(pretrain_loader(CharTokenizer(), B=1, T=7, split="train", buffer_size=1, state=state))

def test_val_loader_starts_at_beginning(local_data, tiny_tokenizer):
    rng = random.Random(2)
    val_docs = random_texts(rng, 30)
    write_shards({0: random_texts(rng, 30), 9: val_docs}, row_group_size=8)
    first = [next(pretrain_loader(tiny_tokenizer, B=2, T=32, split="val", buffer_size=1))[0] for _ in range(2)]
    assert torch.equal(first[0], first[1])
    bos = tiny_tokenizer.get_bos_token_id()
    # buffer of 1: the first row starts with a document of the val shard's first row group
    candidates = tiny_tokenizer.encode(val_docs[:8], prepend=bos)  # the first row group
    row = first[0][0].tolist()
    assert any(row[:len(c)] == c[:len(row)] for c in candidates)

def test_missing_data_names_the_command(local_data, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="python -m nanochat.dataset --dataset local"):
        next(pretrain_loader(tiny_tokenizer, B=1, T=8, split="train"))

# -----------------------------------------------------------------------------
# Chat packer

class FakeChatTokenizer:
    """render_conversation of {"id": i, "user": u, "assistant": a}: BOS, u user tokens (100+i), a assistant (200+i)."""
    def get_bos_token_id(self):
        return 0
    def render_conversation(self, conversation, max_tokens=2048):
        i, u, a = conversation["id"], conversation["user"], conversation["assistant"]
        ids = [0] + [100 + i] * u + [200 + i] * a
        mask = [0] * (1 + u) + [1] * a
        return ids[:max_tokens], mask[:max_tokens]

def conversations(lengths):
    """Conversations of the given rendered lengths: half user, half assistant tokens."""
    return [{"id": i, "user": (n - 1) // 2, "assistant": n - 1 - (n - 1) // 2} for i, n in enumerate(lengths)]

def test_chat_best_fit_with_padding_hand_example():
    tok = FakeChatTokenizer()
    data = conversations([7, 5, 4, 9])
    loader = chat_loader(data, tok, B=2, T=9, buffer_size=3)
    inputs, targets, state = next(loader)
    rows = torch.cat([inputs, inputs.new_zeros(2, 1)], dim=1).tolist()  # last column: see targets below
    render = lambda i: tok.render_conversation(data[i])[0]
    # row 0: buffer {c0 7, c1 5, c2 4}: c0 (largest that fits 10); then c3 (9) enters the buffer, nothing fits 3 -> pad
    assert rows[0][:7] == render(0) and rows[0][7:9] == [0, 0]
    # row 1: buffer {c1 5, c2 4, c3 9}: c3 (pulled last, but the largest that fits); 1 slot left -> pad. The epoch's
    # conversations are all pulled, so nothing refills the buffer until c1 and c2 are placed too
    assert rows[1][:9] == render(3)
    # targets: next token where the render mask is 1 (assistant tokens), -1 on user tokens, BOS and padding
    mask0 = [0] * 4 + [1] * 3
    expected0 = [t if m else -1 for t, m in zip(render(0)[1:], mask0[1:])] + [-1, -1, -1]
    assert targets[0].tolist() == expected0
    assert targets[1].tolist() == [t if m else -1 for t, m in zip(render(3)[1:], ([0] * 5 + [1] * 4)[1:])] + [-1]
    assert state["buffer"] == [1, 2] and state["epoch"] == 1
    assert state["consumed"] == 2 and state["progress"] == 0.5  # placed in rows, not pulled (that would be 1.0)

def test_chat_overlong_conversation_is_cropped_not_skipped():
    tok = FakeChatTokenizer()
    data = conversations([25])  # 12 user + 12 assistant tokens: longer than T+1 = 10
    inputs, targets, _ = next(chat_loader(data, tok, B=2, T=9, buffer_size=1))
    full = tok.render_conversation(data[0], max_tokens=None)[0]
    for row in range(2):  # one conversation repeated (epochs): each row is its first 10 tokens, no padding
        assert inputs[row].tolist() == full[:9]
        assert (targets[row] == -1).all()  # the crop kept only user tokens: nothing to supervise in this row

def test_chat_train_all_tokens_keeps_padding_masked():
    tok = FakeChatTokenizer()
    data = conversations([6])
    _, targets, _ = next(chat_loader(data, tok, B=1, T=9, buffer_size=1, train_all_tokens=True))
    ids = tok.render_conversation(data[0])[0]
    # 6 + 4 padding: nothing else fits; every real token is a target (the next conversation's BOS can't fit)
    assert targets[0].tolist() == ids[1:] + [-1] * 4

def test_chat_resume_and_rank_stride():
    rng = random.Random(3)
    tok = FakeChatTokenizer()
    data = conversations([rng.randint(2, 30) for _ in range(40)])
    for rank in range(2):
        kw = dict(B=3, T=15, rank=rank, world_size=2, buffer_size=6)
        batches = [next_batch for next_batch, _ in zip(chat_loader(data, tok, **kw), range(30))]
        ids_seen = {t - 100 for x, _, _ in batches for t in x.flatten().tolist() if 100 <= t < 200}
        assert ids_seen and all(i % 2 == rank for i in ids_seen)  # ranks stride the dataset
        assert batches[-1][2]["progress"] > 1.0  # more than an epoch consumed
        for k in (0, 11):
            state = json.loads(json.dumps(batches[k][2]))
            resumed = chat_loader(data, tok, state=state, **kw)
            for inputs, targets, state in batches[k + 1:]:
                x, y, s = next(resumed)
                assert torch.equal(x, inputs) and torch.equal(y, targets) and s == state

def test_chat_more_streams_than_conversations():
    """A 3-conversation validation set read by 4 streams (GPUs x accumulation): every stream still yields rows."""
    tok = FakeChatTokenizer()
    data = conversations([5, 6, 7])
    for rank in range(4):
        inputs, _, state = next(chat_loader(data, tok, B=1, T=9, rank=rank, world_size=4, buffer_size=2))
        # stream r starts at r % 3 and strides by 4: one conversation per epoch (r % 3 + 4 is past the end). The row
        # takes it; the next epoch's one (5-7 tokens) does not fit the 3-5 slots left, so the rest is padding
        first, following = rank % 3, (rank % 3 + 4) % 3
        ids = tok.render_conversation(data[first])[0]
        assert inputs[0].tolist()[:len(ids)] == ids
        assert state["buffer"] == [following] and state["epoch"] == 1 + (rank % 3 + 4) // 3

def test_chat_epoch_trains_each_conversation_once_then_pads():
    """num_epochs=1: across 3 streams every conversation is placed exactly once, then the rows are all padding."""
    rng = random.Random(4)
    tok = FakeChatTokenizer()
    data = conversations([rng.randint(2, 12) for _ in range(50)])
    placed = []
    for rank in range(3):
        # training every token makes the targets the rows shifted by one, so the rows' last column can be read back
        loader = chat_loader(data, tok, B=2, T=15, rank=rank, world_size=3, buffer_size=8, num_epochs=1,
                             train_all_tokens=True)
        while True:
            inputs, targets, state = next(loader)
            rows = torch.cat([inputs, targets[:, -1:].clamp(min=0)], dim=1).tolist()
            # the token after each BOS names the conversation: 100 + i (user) or 200 + i (no user tokens)
            placed += [row[i] % 100 for row in rows for i in range(1, len(row)) if row[i - 1] == 0 and row[i]]
            if state["progress"] >= 1.0:
                break
        assert state["progress"] == 1.0 and state["buffer"] == []
        inputs, targets, state = next(loader)
        assert (inputs == 0).all() and (targets == -1).all() and state["progress"] == 1.0
    assert sorted(placed) == list(range(len(data)))
