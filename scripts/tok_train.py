"""
Train the BPE tokenizer on the train split of the pretraining data; save it to <base>/tokenizer/.

    python -m scripts.tok_train                               # 2B chars, vocab 32,768
    python -m scripts.tok_train --max-chars=100000000 --vocab-size=4096
    NANOCHAT_DATASET=local python -m scripts.tok_train        # the embedded offline corpus
    python -m scripts.tok_train --overwrite                   # replace one that checkpoints use

Writes tokenizer.json (data only: pattern, base64 merges, specials) and token_bytes.pt (raw byte
length per token id, 0 for specials; loss_eval turns nats into bits per byte with it),
tok_train.json (these flags, the dataset and the fingerprint) and a "Tokenizer training" report
section. Run again with the same flags and dataset, it keeps the tokenizer (runs/speedrun.sh relies
on that to resume); a tokenizer that checkpoints were trained with (their meta records its
fingerprint) is replaced only with --overwrite: those checkpoints would no longer load. Leaves out:
shuffling documents (rustbpe counts pieces over the whole stream, order does not matter).
"""

import argparse
import glob
import itertools
import json
import os
import time

from nanochat.checkpoint import SOURCE_DIRS, read_meta
from nanochat.common import get_base_dir, check_flags, atomic_write_text, read_json
from nanochat.dataset import parquets_iter_batched, get_dataset_name
from nanochat.report import get_report
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

def count(text):
    return int(float(text))

parser = argparse.ArgumentParser(description="Train the nanochat BPE tokenizer")
parser.add_argument("--max-chars", type=count, default=2_000_000_000,
                    help="stop after this many characters of training text (2e9 style accepted)")
parser.add_argument("--doc-cap", type=count, default=10_000, help="crop documents to this length")
parser.add_argument("--vocab-size", type=int, default=32_768, help="including the 9 special tokens")
parser.add_argument("--overwrite", action="store_true", help="retrain even if the tokenizer exists "
                    "with these flags or checkpoints were trained with it")
args = parser.parse_args()
check_flags([
    ("--max-chars", args.max_chars, args.max_chars >= 1, ">= 1 characters of training text"),
    ("--doc-cap", args.doc_cap, args.doc_cap >= 1, ">= 1 (0 would crop every document to nothing)"),
    ("--vocab-size", args.vocab_size, args.vocab_size >= 256 + len(SPECIAL_TOKENS),
     f">= {256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"),
])
print(f"max_chars: {args.max_chars:,} | doc_cap: {args.doc_cap:,} | "
      f"vocab_size: {args.vocab_size:,}")

# -----------------------------------------------------------------------------
# An existing tokenizer: keep it if these flags made it; never replace one that checkpoints use
# without --overwrite

tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
record_path = os.path.join(tokenizer_dir, "tok_train.json")
config = {"max_chars": args.max_chars, "doc_cap": args.doc_cap, "vocab_size": args.vocab_size,
          "dataset": get_dataset_name()}
if os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")) and not args.overwrite:
    existing = Tokenizer.from_directory(tokenizer_dir)
    fingerprint = existing.fingerprint()
    record = read_json(record_path) if os.path.exists(record_path) else {}
    if record == dict(config, fingerprint=fingerprint):
        # token_bytes.pt is derived from tokenizer.json: rewritten, so that deleting a damaged one
        # and rerunning (what its error says) repairs it
        existing.save(tokenizer_dir)
        print(f"{tokenizer_dir} was trained with these flags on {config['dataset']}: "
              f"kept (--overwrite retrains it); token_bytes.pt rewritten")
        raise SystemExit(0)
    users = sorted({os.path.dirname(path) for source in SOURCE_DIRS.values()
                    for path in glob.glob(os.path.join(get_base_dir(), source, "*", "meta_*.json"))
                    if read_meta(path).get("tokenizer_fingerprint") == fingerprint})
    if users:
        raise SystemExit(f"the tokenizer in {tokenizer_dir} is the one the checkpoints "
                         f"in {', '.join(users)} were trained with; a new one would "
                         f"stop them loading. Use another NANOCHAT_BASE_DIR, or pass "
                         f"--overwrite to replace it anyway")

# -----------------------------------------------------------------------------
# Training text: train-split documents, each cropped, until max_chars

num_chars = num_docs = 0

def text_iterator():
    global num_chars, num_docs
    for doc in (doc[:args.doc_cap] for batch in parquets_iter_batched("train") for doc in batch):
        if doc:
            num_chars, num_docs = num_chars + len(doc), num_docs + 1
            yield doc
            if num_chars > args.max_chars:
                return

texts = text_iterator()
first = next(texts, None)
if first is None:
    raise SystemExit("the train split has no text: download or build shards first, e.g. "
                     "`python -m nanochat.dataset -n 8` (or `--dataset local` offline)")

# -----------------------------------------------------------------------------
# Train

t0 = time.time()
tokenizer = Tokenizer.train_from_iterator(itertools.chain([first], texts), args.vocab_size)
train_time = time.time() - t0
print(f"trained on {num_chars:,} chars from {num_docs:,} documents in {train_time:.2f}s")

# Round trip on text that stresses the split pattern: digit groups, contractions, symbols, CJK,
# emoji.
sample = ("Hello world! This is a test. Numbers: 123, 4567, 89 and 3.14159. Contractions: I'm, "
          "you're, it's, we'll, they've. Special chars: @#$%^&*()_+-=[]{}|;':\",./<>? Unicode: "
          "你好世界 🌍🚀 naïve café\n\ttabs")
ids = tokenizer.encode(sample)
assert tokenizer.decode(ids) == sample, "round trip failed on the sample text"
print(f"round trip ok: {len(sample.encode())} bytes -> {len(ids)} tokens")

# -----------------------------------------------------------------------------
# Save, then summarize token lengths over the ordinary (non-special) tokens

tokenizer.save(tokenizer_dir)
atomic_write_text(record_path, json.dumps(dict(config, fingerprint=tokenizer.fingerprint())))
print(f"saved tokenizer.json and token_bytes.pt to {tokenizer_dir}")

token_bytes = tokenizer.token_bytes()
lengths = token_bytes[token_bytes > 0].float()
stats = {"token_bytes_min": int(lengths.min()), "token_bytes_max": int(lengths.max()),
         "token_bytes_mean": lengths.mean().item(), "token_bytes_std": lengths.std().item()}
print(" | ".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}"
                 for k, v in stats.items()))
run = {"train_time": train_time, "num_chars": num_chars, "num_docs": num_docs,
       "num_special_tokens": len(tokenizer.get_special_tokens())}
get_report().log("Tokenizer training", [vars(args), run, stats])
