"""
Compression of our tokenizer (UTF-8 bytes per token, higher is better) against GPT-2 and GPT-4 on a
few sample texts written for this script (tok_eval_samples.txt: news, Korean, code, LaTeX math,
science) and on the first row group of the active dataset's train and val splits.

    python -m scripts.tok_eval

GPT-2 ("gpt2") and GPT-4 ("cl100k_base") come from tiktoken, which downloads them once and caches
them in $TIKTOKEN_CACHE_DIR; offline and uncached, the script says so and prints our column alone.
Relative diff = (baseline_tokens - our_tokens) / baseline_tokens (positive = we use fewer
tokens). Leaves out: flags (there is nothing to choose) and colour.
"""

import os
import re
import tempfile

import requests

from nanochat.dataset import get_dataset_name, parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import Tokenizer, get_tokenizer

# -----------------------------------------------------------------------------

# The samples: each opens with a line "=== name ===" (the texts are kept as written, lines and all)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tok_eval_samples.txt"),
          encoding="utf-8") as f:
    pieces = re.split(r"^=== (\w+) ===\n", f.read(), flags=re.MULTILINE)[1:]
all_text = [(name, text.strip()) for name, text in zip(pieces[::2], pieces[1::2])]
all_text += [(f"{get_dataset_name()}-{split}", "\n".join(next(parquets_iter_batched(split))))
             for split in ("train", "val")]  # the first row group of each

tokenizers = {"ours": get_tokenizer()}
for label, name in [("gpt2", "gpt2"), ("gpt4", "cl100k_base")]:
    try:
        tokenizers[label] = Tokenizer.from_pretrained(name)
    except requests.exceptions.RequestException as e:  # offline, proxy refusal, timeout, HTTP error
        default_cache = os.path.join(tempfile.gettempdir(), "data-gym-cache")  # tiktoken's
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or default_cache
        print(f"{label} baseline skipped: tiktoken could not download {name!r} "
              f"({type(e).__name__}). Run this script once with network access; "
              f"tiktoken then caches it in $TIKTOKEN_CACHE_DIR (now {cache}).")

tokens = {}  # (tokenizer label, text name) -> number of tokens
for label, tok in tokenizers.items():
    for name, text in all_text:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, f"{label} does not round-trip the {name} text"
        tokens[(label, name)] = len(ids)

# -----------------------------------------------------------------------------
# Tables: one per available baseline, else our columns alone

def table_row(cells):
    return "| " + " | ".join([f"{cells[0]:<16}"] + [f"{c:>10}" for c in cells[1:]]) + " |"

vocab = {label: tok.get_vocab_size() for label, tok in tokenizers.items()}
tables = []
for base in [label for label in tokenizers if label != "ours"] or [None]:
    labels = [base, "ours"] if base else ["ours"]
    header = ["Text", "Bytes"] + [f"{lab} {kind}" for lab in labels for kind in ("tok", "ratio")]
    header += ["Rel diff"] if base else []
    title = f"{base.upper()} (vocab {vocab[base]:,}) vs ours" if base else "Ours: bytes per token"
    lines = [title + f" (vocab {vocab['ours']:,})", "", table_row(header),
             "|" + "|".join("-" * (width + 2) for width in [16] + [10] * (len(header) - 1)) + "|"]
    for name, text in all_text:
        num_bytes = len(text.encode("utf-8"))
        cells = [name, num_bytes]
        for label in labels:
            cells += [tokens[(label, name)], f"{num_bytes / tokens[(label, name)]:.2f}"]
        if base:  # positive: we need fewer tokens than the baseline
            saved = tokens[(base, name)] - tokens[("ours", name)]
            cells.append(f"{saved / tokens[(base, name)]:+.1%}")
        lines.append(table_row(cells))
    tables.append(lines)

for lines in tables:
    print("\n" + "\n".join(lines))
get_report().log("Tokenizer evaluation", ["\n".join(lines) for lines in tables])
