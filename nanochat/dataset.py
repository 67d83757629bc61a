"""
Pretraining data: download parquet shards of ClimbMix (default) or FineWeb-EDU, or build a small
local corpus with no network, and read any of them back one row group at a time.

    python -m nanochat.dataset -n 8              # ClimbMix train shards 0..7 + the pinned val shard
    python -m nanochat.dataset -n -1 -w 8        # every shard, 8 parallel downloads
    python -m nanochat.dataset --dataset fineweb-edu -n 8
    python -m nanochat.dataset --dataset local   # offline corpus from this Python's stdlib

Shards live in <base>/base_data_<name>/shard_NNNNN.parquet: one string column "text", documents
grouped into row groups, zstd. Readers pick the dataset from env NANOCHAT_DATASET (default
climbmix). The validation shard is pinned per dataset (the last shard index), so it never depends on
how many shards were fetched; train = every other shard present. Env NANOCHAT_DATA_URL overrides the
URL base of the hosted datasets (tests point it at a local server; mirrors work the same way).

A download is renamed into place only after its size matches Content-Length and its parquet footer
reads (row groups, a string column "text"). A shard that cannot be read fails naming the file and
the command that rebuilds or re-downloads it. Left out: checksums of downloaded shards (the host
serves none) and the repackaging of upstream datasets into shards.
"""

import argparse
import ast
import contextlib
import hashlib
import os
import platform
import random
import re
import shutil
import sysconfig
from multiprocessing.pool import ThreadPool

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import atomic_path, get_base_dir, download_url, print0

# -----------------------------------------------------------------------------
# Datasets: name -> (URL base, index of the last shard). The last shard is the pinned val shard.
# "local" has no URL: build_local_corpus() writes its LOCAL_NUM_SHARDS shards.

HF = "https://huggingface.co/datasets/karpathy"
DATASETS = {"climbmix": (f"{HF}/climbmix-400b-shuffle/resolve/main", 6542),
            "fineweb-edu": (f"{HF}/fineweb-edu-100b-shuffle/resolve/main", 1822),
            "local": (None, 9)}
DEFAULT_DATASET = "climbmix"

def shard_name(index):
    return f"shard_{index:05d}.parquet"

def get_dataset_name(dataset=None):
    name = dataset or os.environ.get("NANOCHAT_DATASET") or DEFAULT_DATASET
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} (argument or NANOCHAT_DATASET): pick one of "
                         f"{sorted(DATASETS)}")
    return name

def get_data_dir(dataset=None):
    return os.path.join(get_base_dir(), "base_data_" + get_dataset_name(dataset).replace("-", "_"))

def val_shard_index(dataset=None):
    return DATASETS[get_dataset_name(dataset)][1]

def fetch_command(dataset=None, num_files=8):
    """The command that makes this dataset's shards appear (train shards 0..num_files-1 and the val
    shard), for error messages."""
    name = get_dataset_name(dataset)
    count = "" if name == "local" else f"-n {num_files} "
    return f"python -m nanochat.dataset {count}--dataset {name}"

# -----------------------------------------------------------------------------
# Readers

_announced = set()  # datasets whose name was already printed by this process

def list_parquet_files(split=None, dataset=None):
    """Sorted shard paths of one split: "train" (every shard but the pinned val shard), "val" (the
    pinned shard) or None (all). Temp files of unfinished downloads are ignored. Raises naming the
    fix when empty."""
    assert split in (None, "train", "val"), f"split must be 'train', 'val' or None, got {split!r}"
    name, data_dir = get_dataset_name(dataset), get_data_dir(dataset)
    if name not in _announced:
        _announced.add(name)
        print0(f"pretraining data: {name} ({data_dir})")
    listing = os.listdir(data_dir) if os.path.isdir(data_dir) else []
    files = sorted(f for f in listing if re.fullmatch(r"shard_\d{5}\.parquet", f))
    if not files:
        raise FileNotFoundError(f"no parquet shards of dataset {name!r} in {data_dir}; run "
                                f"`{fetch_command(name)}`")
    val = shard_name(val_shard_index(name))
    if split == "val":
        if val not in files:
            raise FileNotFoundError(f"validation shard {val} of dataset {name!r} is missing in "
                                    f"{data_dir}; run `{fetch_command(name, num_files=0)}`")
        files = [val]
    elif split == "train":
        files = [f for f in files if f != val]
        if not files:
            raise FileNotFoundError(f"no train shards of dataset {name!r} in {data_dir} "
                                    f"(only the val shard); run `{fetch_command(name)}`")
    return [os.path.join(data_dir, f) for f in files]

def repair_command(path):
    """What to run when the shard at `path` is unreadable (for error messages)."""
    shard_dir = os.path.dirname(os.path.abspath(path))
    name = next((n for n in DATASETS if shard_dir == get_data_dir(n)), None)
    if name is None:
        return "delete it, then rebuild or re-download it"
    if name == "local":
        return fetch_command(name) + " --force"
    index = int(re.search(r"\d+", os.path.basename(path)).group())
    num_files = 0 if index == val_shard_index(name) else index + 1  # -n 0: only the val shard
    return f"rm {path} && {fetch_command(name, num_files)}"

@contextlib.contextmanager
def _shard_errors(path):
    """pyarrow's errors name neither the file nor the fix: re-raise them naming both."""
    try:
        yield
    except (pa.ArrowException, OSError, ValueError, KeyError) as e:
        raise RuntimeError(f"cannot read shard {path} ({type(e).__name__}: {e}); it is truncated "
                           f"or corrupt: to replace it: {repair_command(path)}") from None

def num_row_groups(path):
    with _shard_errors(path):
        return pq.ParquetFile(path).num_row_groups

def read_row_group(path, rg_idx):
    """The texts of row group rg_idx of one shard."""
    with _shard_errors(path):
        return pq.ParquetFile(path).read_row_group(rg_idx, columns=["text"])["text"].to_pylist()

def verify_shard(path):
    """Raises ValueError unless path is a complete parquet shard: readable footer, row groups,
    string column "text"."""
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"not a complete parquet file ({e})") from None
    text_type = schema.field("text").type if "text" in schema.names else pa.null()
    if pf.num_row_groups < 1 or text_type not in (pa.string(), pa.large_string()):
        raise ValueError(f"not a text shard: {pf.num_row_groups} row groups, schema {schema}")

def parquets_iter_batched(split, start=0, step=1, dataset=None):
    """Yield one row group's texts at a time: in every file of the split (in order), row groups
    start, start+step, ... (rank r of W ranks passes start=r, step=W and reads a disjoint share)."""
    assert 0 <= start and step >= 1, f"need start >= 0 and step >= 1, got start={start} step={step}"
    for path in list_parquet_files(split, dataset):
        for rg_idx in range(start, num_row_groups(path), step):
            yield read_row_group(path, rg_idx)

def write_shard(path, texts, row_group_size):
    """Write texts as one shard (column "text", zstd), via a temp file and rename."""
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    with atomic_path(path) as tmp_path:
        pq.write_table(table, tmp_path, row_group_size=row_group_size, compression="zstd",
                       compression_level=3, use_dictionary=False, write_statistics=False)

# -----------------------------------------------------------------------------
# Downloader

DOWNLOAD_ATTEMPTS = 5
DOWNLOAD_BACKOFF = 2.0  # seconds, raised to the attempt number: waits 2, 4, 8, 16 (tests set 0)

def download_shards(num_files, dataset=None, num_workers=4):
    """Fetch train shards 0..num_files-1 (-1 = all) plus the pinned val shard, num_workers at a
    time. Shards already on disk are skipped without a request. Returns the names of shards that
    failed."""
    name = get_dataset_name(dataset)
    assert name != "local", "the local corpus is built, not downloaded: call build_local_corpus()"
    val_index = val_shard_index(name)
    indices = list(range(val_index if num_files < 0 else min(num_files, val_index))) + [val_index]
    data_dir = get_data_dir(name)
    os.makedirs(data_dir, exist_ok=True)
    url_base = (os.environ.get("NANOCHAT_DATA_URL") or DATASETS[name][0]).rstrip("/")
    jobs = [(f"{url_base}/{shard_name(i)}", path)
            for i in indices if not os.path.exists(path := os.path.join(data_dir, shard_name(i)))]
    print(f"dataset {name}: want {len(indices)} shards ({len(indices) - len(jobs)} present) in "
          f"{data_dir}", flush=True)
    # threads: downloads wait on the network, and a forked worker of a process that has threads
    # (torch's, a caller's server) can deadlock on a lock one of them held
    with ThreadPool(processes=max(1, min(num_workers, len(jobs)))) as pool:
        ok = pool.map(lambda job: download_url(*job, attempts=DOWNLOAD_ATTEMPTS,
                                               backoff=DOWNLOAD_BACKOFF, verify=verify_shard), jobs)
    failed = [os.path.basename(path) for (url, path), good in zip(jobs, ok) if not good]
    print(f"Downloaded: {len(indices) - len(failed)}/{len(indices)}", flush=True)
    return failed

# -----------------------------------------------------------------------------
# Local corpus: the standard library of the running Python, no network. Only the standard library,
# and only the parts every build of a Python version ships alike, so the corpus (and the tokenizer
# and demo model trained on it) is the same on every machine with the same Python version
# (site-packages would make it depend on what is installed). The build prints its size and a sha256
# (docs/perf.md, "Local corpus").

LOCAL_NUM_SHARDS = DATASETS["local"][1] + 1
LOCAL_ROW_GROUP = 64  # not the hosted 1,024: even the ~900-document val shard has many row groups
LOCAL_SEED = 42
MIN_DOC_CHARS = 200   # shorter pieces are mostly a stray import line or closing brace
# Files are split at blank lines into pieces of ~300 tokens, about one row of the demo's 256-token
# context: longer pieces would be cropped at the row's end, the rest never seen.
MAX_DOC_CHARS = 1_000
# Left out: generated tables (encodings), parts that distributions split into other packages
# (Debian: tkinter, idlelib, turtle, lib2to3, distutils, ensurepip, venv) or patch (site,
# sysconfig), and the test suite (optional).
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
             "lib-dynload", "encodings", "tkinter", "idlelib", "turtledemo", "lib2to3", "distutils",
             "ensurepip", "venv"}
SKIP_FILES = {"site.py", "sysconfig.py", "turtle.py"}
SKIP_PREFIXES = ("test_", "_sysconfigdata")
# license boilerplate, which would otherwise repeat across files
LICENSE_TEXT = re.compile(r"Permission is hereby granted|Licensed under the Apache License"
                          r"|THE SOFTWARE IS PROVIDED|GNU (Lesser )?General Public License"
                          r"|Redistribution and use in source and binary forms"
                          r"|This software is provided 'as-is'")

def _docs_of_file(path):
    """The documents one stdlib file contributes: the module's source, or for pydoc's help topics
    (the language reference as one dict of strings) each topic's prose."""
    name = os.path.basename(path)
    if not name.endswith(".py") or name.startswith(SKIP_PREFIXES) or name in SKIP_FILES:
        return []
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace").replace("\r\n", "\n")
    if name == "topics.py" and os.path.basename(os.path.dirname(path)) == "pydoc_data":
        body = ast.parse(text).body
        value = body[0].value if len(body) == 1 and isinstance(body[0], ast.Assign) else None
        if isinstance(value, ast.Dict):
            return list(ast.literal_eval(value).values())
    return [] if LICENSE_TEXT.search(text) else [text]

def split_doc(text, max_chars=MAX_DOC_CHARS):
    """Split at blank lines into pieces of at most max_chars (a longer paragraph is cut hard)."""
    pieces, current = [], ""
    for para in text.split("\n\n"):
        if current and len(current) + 2 + len(para) > max_chars:
            pieces.append(current)
            current = ""
        while len(para) > max_chars:
            pieces.append(para[:max_chars])
            para = para[max_chars:]
        current = f"{current}\n\n{para}" if current else para
    return pieces + [current] if current else pieces

def collect_local_documents(root=None):
    """All documents under root (default: the stdlib), in sorted walk order, deduplicated, small
    pieces dropped."""
    docs = []
    for dirpath, dirnames, filenames in os.walk(root or sysconfig.get_paths()["stdlib"]):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in SKIP_DIRS and not d.startswith("config-"))
        for filename in sorted(filenames):
            for doc in _docs_of_file(os.path.join(dirpath, filename)):
                docs += [piece for piece in split_doc(doc.strip()) if len(piece) >= MIN_DOC_CHARS]
    return list(dict.fromkeys(docs))  # each piece once, where it first appeared

def corpus_hash(docs):
    """sha256 of the documents in order (length-prefixed, so no two different lists collide by
    concatenation)."""
    h = hashlib.sha256()
    for doc in docs:
        data = doc.encode()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()

def build_local_corpus(force=False, root=None):
    """
    Build the local corpus into get_data_dir("local"): shuffle the documents (fixed seed) and deal
    them round-robin into LOCAL_NUM_SHARDS shards; the last one is the pinned val shard. All shards
    are written into a temp directory that is renamed into place, so a crash never leaves a half
    corpus. Returns the corpus sha256 (None when it was already built). root (default: the stdlib)
    lets tests build from a small directory.
    """
    data_dir = get_data_dir("local")
    paths = [os.path.join(data_dir, shard_name(i)) for i in range(LOCAL_NUM_SHARDS)]
    if not force and all(os.path.exists(p) for p in paths):
        print(f"local corpus already built in {data_dir} ({LOCAL_NUM_SHARDS} shards): --force "
              f"rebuilds it", flush=True)
        return None
    docs = collect_local_documents(root)
    random.Random(LOCAL_SEED).shuffle(docs)
    assert len(docs) >= 2 * LOCAL_NUM_SHARDS, f"{len(docs)} documents for {LOCAL_NUM_SHARDS} shards"
    tmp_dir = f"{data_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    for i in range(LOCAL_NUM_SHARDS):
        texts = docs[i::LOCAL_NUM_SHARDS]
        write_shard(os.path.join(tmp_dir, shard_name(i)), texts, LOCAL_ROW_GROUP)
        split = "val" if i == LOCAL_NUM_SHARDS - 1 else "train"
        print(f"{shard_name(i)} ({split}): {len(texts):,} docs, {sum(map(len, texts)):,} chars",
              flush=True)
    shutil.rmtree(data_dir, ignore_errors=True)  # whatever is left makes the rename below fail
    os.replace(tmp_dir, data_dir)
    digest = corpus_hash(docs)
    print(f"local corpus: {len(docs):,} docs, {sum(map(len, docs)):,} chars, {LOCAL_NUM_SHARDS} "
          f"shards in {data_dir}\nlocal corpus sha256 {digest} (Python {platform.python_version()} "
          f"standard library: the same Python version builds the same corpus anywhere)", flush=True)
    return digest

# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Download pretraining shards, or build the "
                                                 "offline local corpus")
    parser.add_argument("-n", "--num-files", type=int, default=-1,
                        help="train shards (-1 = all), plus the val shard")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--dataset", choices=sorted(DATASETS), help="default: $NANOCHAT_DATASET, "
                        f"else {DEFAULT_DATASET}; local = built offline from this Python's stdlib")
    parser.add_argument("--force", action="store_true", help="rebuild an existing local corpus")
    args = parser.parse_args(argv)
    name = get_dataset_name(args.dataset)
    if name == "local":
        if args.num_files != -1:
            parser.error("-n/--num-files does not apply to --dataset local (always built whole)")
        return build_local_corpus(force=args.force)
    if args.force:
        parser.error("--force is for --dataset local; delete a bad shard by hand to fetch it again")
    assert args.num_workers >= 1, f"--num-workers must be >= 1, got {args.num_workers}"
    failed = download_shards(args.num_files, name, args.num_workers)
    if failed:
        raise SystemExit(f"failed to download {len(failed)} shard(s) of {name}: "
                         f"{', '.join(failed)}; rerun to retry")

if __name__ == "__main__":
    main()
