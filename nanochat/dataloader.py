"""
Data loaders that turn text into (inputs, targets) batches of shape (B, T), int64.

    from nanochat.dataloader import pretrain_loader, chat_loader
    for inputs, targets, state in pretrain_loader(tokenizer, B=32, T=2048, split="train"): ...
    for inputs, targets, state in chat_loader(task, tokenizer, B=32, T=2048, device=device): ...

pretrain_loader: BOS-aligned best-fit packing of parquet documents (nanochat.dataset shards).
  Every row starts with <|bos|> and is filled completely: each row (capacity T+1) repeatedly takes
  the largest buffered document that still fits, and when none fits, the shortest one is cropped to
  fill the rest. This crops fewer tokens than greedy packing (karpathy/nanochat's measurement at
  T=2048: 39.4% greedy, 34.6% best-fit).
  Resume is EXACT: the state names the next unread document and the documents sitting in the buffer
  (by position in the data, not by content), so a new loader re-reads and re-tokenizes them and
  produces the very batches the uninterrupted loader would have produced. The state is a small
  JSON-serialisable dict (a few KB at buffer 1000).

chat_loader: best-fit packing of rendered conversations WITH BOS padding and no cropping, for
mid-training/SFT.

Sharding: stream `rank` of `world_size` reads row groups rank, rank+W, ... of the global row-group
list (every file's row groups in order, then again for the next epoch), so any stream count works,
even more streams than row groups (chat: examples rank, rank+W, ...). base_train gives every (GPU,
gradient-accumulation micro-step) pair its own stream, so what a run trains on depends on the total
batch only, not on how it is split across GPUs and accumulation.

Leaves out: karpathy/nanochat's unaligned flat-token-stream loader (unused) and a per-conversation
padded iterator.
"""

import os
from array import array
from bisect import bisect_left, bisect_right, insort

import torch

from nanochat.dataset import list_parquet_files, num_row_groups, read_row_group, repair_command

# -----------------------------------------------------------------------------
# Shared: rows -> device tensors

def _to_device(batch, device):
    """
    One host->device copy of an int64 CPU tensor. On CUDA it is staged in pinned memory and sent
    non-blocking, so the next batch is assembled while the GPU trains; PyTorch's caching host
    allocator does not hand the pinned block out again until that copy has finished, so no double
    buffering is needed here.
    """
    if torch.device(device).type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)

# -----------------------------------------------------------------------------
# Pretraining: BOS-aligned best-fit packing with exact resume

def _row_group_index(paths):
    """(path, row group) of every row group of the files, in order: the global list the streams
    stride over."""
    key = tuple((p, os.path.getsize(p), os.path.getmtime(p)) for p in paths)
    if key not in _row_group_cache:  # 512 streams in one process read the footers once, not 512x
        _row_group_cache[key] = [(p, r) for p in paths for r in range(num_row_groups(p))]
    return _row_group_cache[key]
_row_group_cache = {}

def pretrain_loader(tokenizer, B, T, split, rank=0, world_size=1, device="cpu", state=None,
                    buffer_size=1000, tokenizer_threads=4, tokenizer_batch_size=128, dataset=None):
    """
    Infinite generator of (inputs, targets, state): inputs/targets int64 (B, T), targets are inputs
    shifted by one; streams are sharded as the module docstring says. `state` resumes exactly where
    a previous loader's yielded state left off (same split, rank, world_size, B, T, buffer_size,
    tokenizer_batch_size and the same files). The yielded state describes the loader AFTER that
    batch. Epochs start at 1 (epoch = global row group // row groups per epoch + 1). Validation:
    call with split="val" and no state; it always starts at the beginning of the val shard.
    """
    assert split in ("train", "val"), f"split must be 'train' or 'val', got {split!r}"
    assert 0 <= rank < world_size, f"rank {rank} out of range for world_size {world_size}"
    paths = list_parquet_files(split, dataset=dataset)
    index = _row_group_index(paths)
    if not index:
        raise ValueError(f"the {split} files hold no row groups ({', '.join(paths)}); to replace "
                         f"them: {repair_command(paths[0])}")
    bos = tokenizer.get_bos_token_id()

    # Stream cursor: the next unread document is doc_idx of global row group g (epoch g //
    # len(index) + 1).
    g, doc_idx = rank, 0
    # Buffer, kept sorted by key = (length, g, doc_idx): best-fit is a bisect, ties go to the
    # document that came first in the stream, and the order never depends on when a document entered
    # the buffer. Token ids are stored as int32 arrays (4 bytes a token, not ~36 for a list of
    # Python ints): a 1-GPU run can hold hundreds of streams x 1000 buffered documents.
    keys, tokens = [], {}  # tokens: doc position (g, doc) -> token ids (BOS first)

    def read_texts(g):
        return read_row_group(*index[g % len(index)])

    def add_docs(positions, texts):
        rows = tokenizer.encode(texts, prepend=bos, num_threads=tokenizer_threads)
        for position, ids in zip(positions, rows):
            tokens[position] = array("i", ids)
            insort(keys, (len(ids), *position))

    if state is not None:
        if "row_group" not in state:
            raise ValueError(f"dataloader state of an older format (keys {sorted(state)}): "
                             f"resume with the nanochat version that wrote it or start a new run")
        assert state["num_row_groups"] == len(index), (
            f"dataloader state was saved with {state['num_row_groups']} {split} row groups "
            f"but the files now have {len(index)}: resume with the same data shards")
        g, doc_idx = state["row_group"], state["doc_idx"]
        for rg, docs in state["buffer"]:
            texts = read_texts(rg)
            assert max(docs) < len(texts), (
                f"buffered docs of row group {rg} are gone: resume with the same data shards")
            add_docs([(rg, d) for d in docs], [texts[d] for d in docs])

    texts, texts_at = None, None  # the row group under the cursor, read once
    def refill():
        """Tokenize the next up to tokenizer_batch_size documents of this rank's stream into the
        buffer."""
        nonlocal g, doc_idx, texts, texts_at
        # the current row group, then at most a whole epoch of them: when all those are empty, the
        # stride only comes back to them, so this stream has no documents at all
        for _ in range(len(index) + 2):
            if texts_at != g:
                texts, texts_at = read_texts(g), g
            if doc_idx < len(texts):
                chunk = texts[doc_idx:doc_idx + tokenizer_batch_size]
                add_docs([(g, doc_idx + i) for i in range(len(chunk))], chunk)
                doc_idx += len(chunk)
                return
            g, doc_idx = g + world_size, 0
        raise ValueError(f"the {split} files hold no documents ({', '.join(paths)}); to replace "
                         f"them: {repair_command(paths[0])}")

    def get_state():
        buffer = {}
        for position in sorted(tokens):
            buffer.setdefault(position[0], []).append(position[1])
        return {"epoch": g // len(index) + 1, "row_group": g, "doc_idx": doc_idx,
                "num_row_groups": len(index), "buffer": [[rg, docs] for rg, docs in buffer.items()]}

    while True:
        rows = torch.empty((B, T + 1), dtype=torch.int64)
        for b in range(B):
            pos = 0
            while pos < T + 1:
                while len(keys) < buffer_size:
                    refill()
                space = T + 1 - pos
                i = bisect_right(keys, (space, float("inf"))) - 1  # largest document <= space
                # the earliest one of that length; when none fits, crop the shortest to fill the
                # row exactly (the rest is dropped)
                i = bisect_left(keys, (keys[i][0],)) if i >= 0 else 0
                doc = tokens.pop(keys.pop(i)[1:])[:space]
                rows[b, pos:pos + len(doc)] = torch.frombuffer(doc, dtype=torch.int32)
                pos += len(doc)
        inputs, targets = _to_device(torch.stack([rows[:, :-1], rows[:, 1:]]), device).unbind(0)
        yield inputs, targets, get_state()

# -----------------------------------------------------------------------------
# Chat: best-fit packing with BOS padding, never cropping between rows

def chat_loader(dataset, tokenizer, B, T, rank=0, world_size=1, device="cpu", state=None,
                buffer_size=100, train_all_tokens=False, num_epochs=None, max_per_batch=None,
                pack=True):
    """
    Infinite generator of (inputs, targets, state) over a dataset of conversations (len() and [i]).
    Each row (capacity T+1) takes the largest buffered conversation that fits the space left; when
    none fits, the rest of the row is BOS padding (targets -1) and the next row starts. A
    conversation longer than T+1 tokens is cropped to T+1 when it is rendered, so every conversation
    fits an empty row: nothing is skipped and no row is all padding. Targets are -1 where the render
    mask is 0 (only assistant tokens are trained) and on padding; train_all_tokens=True trains every
    real token (user turns too), as karpathy/nanochat's mid-training did. Epochs never mix: the next
    epoch's conversations enter the buffer only once this epoch's are all placed in rows (the last
    rows of an epoch are less full), so each conversation of the stream is trained exactly once per
    epoch and "progress" counts conversations placed in yielded rows, not pulled into the buffer
    (~buffer_size of them).
    num_epochs: after that many epochs every row is padding (targets all -1, nothing trained) and
    progress stays at num_epochs, so a stream that finishes first waits for the others without
    repeating anything. None = forever.
    max_per_batch: at most this many conversations per yielded batch, the rest padding (None = fill
    the rows), so an optimizer step trains a set number of conversations as unpacked SFT does,
    whatever their lengths. state = {"epoch", "cursor" (next example index of this rank's stream),
    "buffer" (example indices), "epoch_start" (the cursor this epoch began at), "consumed" (this
    epoch's conversations placed in rows), "progress" (epochs consumed as a float: 0.5 = half of
    this stream's share of the dataset trained)}; pass it back to resume.
    pack=False: one conversation per row, the rest padding (with buffer_size=1: in the stream's
    order).
    """
    n = len(dataset)
    assert n > 0, "the conversation dataset is empty"
    assert 0 <= rank < world_size, f"rank {rank} out of range for world_size {world_size}"
    bos = tokenizer.get_bos_token_id()
    # buffer: (example index, ids, mask) in the order they were pulled. Streams beyond the dataset's
    # size (a tiny validation set read by many GPUs x accumulation steps) start at rank % n instead
    # of past the end.
    epoch, cursor, buffer, consumed = 1, rank % n, [], 0
    epoch_start = cursor

    def render(index):
        ids, mask = tokenizer.render_conversation(dataset[index], max_tokens=T + 1)
        return (index, ids, [1] * len(ids) if train_all_tokens else mask)

    if state is not None:
        epoch, cursor = state["epoch"], state["cursor"]
        consumed, epoch_start = state["consumed"], state["epoch_start"]
        buffer = [render(index) for index in state["buffer"]]

    while True:
        rows = torch.full((B, T + 1), bos, dtype=torch.int64)
        supervised = torch.zeros((B, T + 1), dtype=torch.bool)
        placed = 0
        for b in range(B):
            pos = 0
            while pos < T + 1 and placed != max_per_batch and (pack or pos == 0):
                while len(buffer) < buffer_size and cursor < n:
                    buffer.append(render(cursor))
                    cursor += world_size
                if not buffer:  # every conversation of this epoch is placed
                    if num_epochs is not None and epoch >= num_epochs:
                        break  # done: padding only from here on
                    # next epoch; the stride continues across the wrap (a stride > n passes
                    # whole epochs)
                    epoch, cursor, consumed = epoch + cursor // n, cursor % n, 0
                    epoch_start = cursor
                    continue
                space = T + 1 - pos
                fits = [i for i, item in enumerate(buffer) if len(item[1]) <= space]
                if not fits:
                    break  # pad the rest of this row with BOS
                i = max(fits, key=lambda i: (len(buffer[i][1]), -i))  # largest; ties: pulled first
                _, ids, mask = buffer.pop(i)
                rows[b, pos:pos + len(ids)] = torch.tensor(ids, dtype=torch.int64)
                supervised[b, pos:pos + len(ids)] = torch.tensor(mask, dtype=torch.bool)
                pos += len(ids)
                consumed += 1
                placed += 1
        targets = rows[:, 1:].masked_fill(~supervised[:, 1:], -1)
        inputs, targets = _to_device(torch.stack([rows[:, :-1], targets]), device).unbind(0)
        # this stream's share of an epoch that began at cursor epoch_start: start, start+W, ... < n
        share = -(-(n - epoch_start) // world_size)
        yield inputs, targets, {"epoch": epoch, "cursor": cursor,
                                "buffer": [item[0] for item in buffer], "epoch_start": epoch_start,
                                "consumed": consumed, "progress": epoch - 1 + consumed / share}
