"""
Tokenizer benchmark: BPE training with rustbpe vs HF `tokenizers` on the same text and vocab, and encode
throughput of the resulting tokenizers.

    python -m nanochat.dataset --dataset local     # once: the embedded offline corpus
    python -m bench.tokenizer                      # ~2 minutes on 2 cores

Training text: every document of the `local` dataset's train split, uncropped. Encode text: its val shard.
Each training run happens in a fresh spawned process so that peak memory is that run's alone: peak RSS is
resource.getrusage(RUSAGE_SELF).ru_maxrss of that process, "train delta" is the peak minus the peak
before training started (the corpus already loaded). tracemalloc is not used: it cannot see Rust allocations.
"train CPU s" is user+sys CPU of that process over all its threads: steadier than wall time on a busy box.
Also checked for HF: does tiktoken, fed HF's merges, encode the val docs exactly as HF does (the condition
for training with HF and encoding with tiktoken).
Prints a table, then one JSON line. Leaves out: other corpora, repeated runs (2-core shared box: expect noise).
"""

import json
import multiprocessing
import resource
import time

import tiktoken

from nanochat.dataset import parquets_iter_batched
from nanochat.hf.export import bytes_to_unicode
from nanochat.tokenizer import SPLIT_PATTERN, SPECIAL_TOKENS

VOCAB_SIZES = [4096, 32768]
BATCH_THREADS = 8  # Tokenizer.encode's default; the box has 2 cores

def load_docs(split):
    return [doc for batch in parquets_iter_batched(split, dataset="local") for doc in batch]

def cpu_s():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

def train_one(job):
    """Runs in a fresh process. Returns timing, memory and the learned tokenizer in a picklable form."""
    trainer_name, vocab_size = job
    docs = load_docs("train")
    before = peak_rss_mb()
    num_ranks = vocab_size - len(SPECIAL_TOKENS)
    t0, c0 = time.perf_counter(), cpu_s()
    if trainer_name == "rustbpe":
        import rustbpe  # here, not at the top: a spawned run loads only its own trainer (peak RSS)
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(docs), num_ranks, pattern=SPLIT_PATTERN)
        learned = [(bytes(b), r) for b, r in trainer.get_mergeable_ranks()]
    else:
        from tokenizers import Tokenizer, Regex, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=num_ranks, min_frequency=0, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
        tok.train_from_iterator(iter(docs), trainer)
        learned = tok.to_str()
    train_s, train_cpu_s = time.perf_counter() - t0, cpu_s() - c0
    peak = peak_rss_mb()
    return {"trainer": trainer_name, "vocab": vocab_size, "train_s": train_s, "train_cpu_s": train_cpu_s,
            "chars": sum(map(len, docs)), "peak_rss_mb": peak, "train_delta_mb": peak - before, "learned": learned}

def mb_per_s(fn, num_bytes, repeats=3):
    """Best of `repeats`: on a shared box the fastest run is the least disturbed one."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return num_bytes / best / 1e6

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    jobs = [(t, v) for v in VOCAB_SIZES for t in ("rustbpe", "hf")]
    runs = []
    ctx = multiprocessing.get_context("spawn")
    for job in jobs:
        with ctx.Pool(1) as pool:  # one process per run: ru_maxrss is a process-lifetime high-water mark
            runs.append(pool.apply(train_one, (job,)))
        print(f"trained {job[0]} vocab {job[1]}: {runs[-1]['train_s']:.1f}s", flush=True)

    from tokenizers import Tokenizer as HFTokenizer
    val = load_docs("val")
    val_bytes = sum(len(d.encode()) for d in val)
    # throughput on the first ~1 MB of val docs (HF is slow enough that the whole shard x 3 repeats takes minutes)
    speed_docs = []
    while sum(len(d.encode()) for d in speed_docs) < 1_000_000 and len(speed_docs) < len(val):
        speed_docs.append(val[len(speed_docs)])
    speed_bytes = sum(len(d.encode()) for d in speed_docs)
    speed_text = "\n".join(speed_docs)
    decoder = {c: b for b, c in bytes_to_unicode().items()}  # HF ByteLevel's printable chars -> bytes
    for run in runs:
        learned = run.pop("learned")
        if run["trainer"] == "rustbpe":
            enc = tiktoken.Encoding("bench", pat_str=SPLIT_PATTERN, mergeable_ranks=dict(learned), special_tokens={})
            ids = enc.encode_ordinary_batch(val, num_threads=BATCH_THREADS)
            run["encoder"] = "tiktoken"
            run["encode_1t_mb_s"] = mb_per_s(lambda: enc.encode_ordinary(speed_text), speed_bytes)
            encode_batch = lambda: enc.encode_ordinary_batch(speed_docs, num_threads=BATCH_THREADS)
            run["encode_batch_mb_s"] = mb_per_s(encode_batch, speed_bytes)
        else:
            hf = HFTokenizer.from_str(learned)
            ids = [e.ids for e in hf.encode_batch(val)]
            run["encoder"] = "hf"
            run["encode_1t_mb_s"] = mb_per_s(lambda: hf.encode(speed_text), speed_bytes)
            run["encode_batch_mb_s"] = mb_per_s(lambda: hf.encode_batch(speed_docs), speed_bytes)
            # tiktoken with HF's merges (ids are HF's): identical ids on every val doc or not?
            ranks = {bytes(decoder[c] for c in token): i for token, i in hf.get_vocab().items()}
            enc = tiktoken.Encoding("hf", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
            run["tiktoken_agrees_docs"] = sum(enc.encode_ordinary(d) == row for d, row in zip(val, ids))
        run["val_bytes_per_token"] = val_bytes / sum(map(len, ids))

    header = ("| trainer  |  vocab | train s | train CPU s | peak RSS MB | train delta MB | encoder  "
              "| enc 1-thread MB/s | enc batch MB/s | val bytes/tok |")
    print(f"\ntraining text: local train split, {runs[0]['chars']:,} chars; encode text: local val shard, "
          f"{len(val):,} docs, {val_bytes:,} bytes (throughput: first {len(speed_docs)} docs, {speed_bytes:,} bytes, "
          f"best of 3); batch = {BATCH_THREADS} threads on {multiprocessing.cpu_count()} cores\n")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for r in runs:
        print(f"| {r['trainer']:<8} | {r['vocab']:>6} | {r['train_s']:>7.1f} | {r['train_cpu_s']:>11.1f} | "
              f"{r['peak_rss_mb']:>11.0f} | {r['train_delta_mb']:>14.0f} | {r['encoder']:<8} | "
              f"{r['encode_1t_mb_s']:>17.1f} | {r['encode_batch_mb_s']:>14.1f} | {r['val_bytes_per_token']:>13.3f} |")
    for r in runs:
        if "tiktoken_agrees_docs" in r:
            print(f"tiktoken with HF's vocab {r['vocab']} merges: {r['tiktoken_agrees_docs']}/{len(val)} val docs "
                  f"encode identically to HF")
    print(json.dumps({"val_docs": len(val), "val_bytes": val_bytes, "runs": runs}))
