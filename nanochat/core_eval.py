"""
The CORE metric of the DCLM paper (https://arxiv.org/abs/2406.11794): 22 in-context-learning tasks
scored by a base model's likelihoods, each accuracy centered on its random baseline, then averaged.

Data: the DCLM eval bundle (core.yaml, eval_meta_data.csv, eval_data/**.jsonl), fetched once into
<base>/eval_bundle/ by ensure_eval_bundle(). Three task types, one JSONL row per example:
    multiple_choice    {"query", "choices", "gold"}               a prompt per choice, same context
    schema             {"context_options", "continuation", "gold"}  a prompt per context, same end
    language_modeling  {"context", "continuation"}                exact match of the greedy tokens

Called by scripts/base_train.py (max 500 examples per task) and scripts/base_eval.py (all of them):
    out = evaluate_core(model, tokenizer, device, max_per_task=-1)
Under torchrun every rank must call it; examples are strided across ranks and the per-example
correctness is all-reduced. The model must accept model(idx) -> logits (B, T, vocab). Prompts are
scored whole, however long (10-shot prompts run far past a 2,048-token training context): a model
with ensure_rotary_positions(n) (our GPT) grows its rotary tables to the longest prompt. Only a
model with a hard context limit, an attribute max_seq_len (e.g. HF GPT-2's 1024), gets prompts
cropped on the left; an example whose scored tokens cannot fit in it is skipped and counted in the
result's "skipped". Leaves out: loading HF models (nanochat/hf/causal_lm.py adapts them), other eval
suites, confidence intervals.
"""

import csv
import json
import os
import random
import shutil
import tempfile
import time
import zipfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
import yaml
from filelock import FileLock

from nanochat.common import get_base_dir, get_dist_info, download_url, is_dist, print0

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
# Keys each JSONL row needs, checked at load: a bad bundle fails with a file and line, not mid-eval
REQUIRED_KEYS = {"multiple_choice": ("query", "choices", "gold"),
                 "schema": ("context_options", "continuation", "gold"),
                 "language_modeling": ("context", "continuation")}  # the three task types

class EvalBundleUnavailable(RuntimeError):
    """The bundle is not on disk and could not be downloaded
    (offline). Callers may skip CORE on this one."""

# -----------------------------------------------------------------------------
# The eval bundle on disk

def get_eval_bundle_dir():
    return os.path.join(get_base_dir(), "eval_bundle")

def eval_bundle_available():
    """True when <base>/eval_bundle/ holds a complete
    bundle (it only ever appears complete, by rename)."""
    return os.path.isfile(os.path.join(get_eval_bundle_dir(), "core.yaml"))

def _extract_bundle(zip_path, bundle_dir):
    """Unzip into a temp dir next to bundle_dir, then rename, so a crash never leaves half a bundle.
    A bad zip is deleted, else every rerun would find it on disk and fail again."""
    if os.path.exists(bundle_dir):
        raise RuntimeError(f"{bundle_dir} exists but has no core.yaml; delete it and rerun to "
                           f"fetch the bundle again")
    tmp_dir = tempfile.mkdtemp(prefix="eval_bundle.tmp", dir=os.path.dirname(bundle_dir))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp_dir)
        # the published zip holds a top-level eval_bundle/ folder; accept a flat zip too
        roots = [r for r in (tmp_dir, os.path.join(tmp_dir, "eval_bundle"))
                 if os.path.isfile(os.path.join(r, "core.yaml"))]
        if not roots:
            os.remove(zip_path)
            raise RuntimeError(f"{zip_path} holds no core.yaml (neither at the top nor under "
                               f"eval_bundle/); it was deleted, rerun to download it again")
        os.replace(roots[0], bundle_dir)
    except zipfile.BadZipFile as e:
        os.remove(zip_path)
        raise RuntimeError(f"{zip_path} is not a valid zip ({e}); it was deleted, rerun to "
                           f"fetch it again") from e
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # leftovers only; the bundle was renamed out
    # extracted: no longer needed. Any other failure (a full disk) keeps the 162 MB download
    os.remove(zip_path)

def ensure_eval_bundle(url=EVAL_BUNDLE_URL):
    """
    Return <base>/eval_bundle/, downloading and unzipping it first if needed. Local rank 0 of each
    node fetches (under a file lock, for nodes sharing a disk); everyone waits at a barrier. Raises
    EvalBundleUnavailable with how to fetch it by hand when it cannot be had.
    """
    base_dir, bundle_dir = get_base_dir(), get_eval_bundle_dir()
    if not eval_bundle_available() and get_dist_info()[2] == 0:
        with FileLock(bundle_dir + ".lock"):
            if not eval_bundle_available():
                zip_path = bundle_dir + ".zip"
                print(f"Downloading the CORE eval bundle (~162 MB) from {url}", flush=True)
                # on failure download_url prints why; everyone raises below with how to fetch it
                if download_url(url, zip_path):
                    _extract_bundle(zip_path, bundle_dir)
    if is_dist():
        dist.barrier()
    if not eval_bundle_available():
        raise EvalBundleUnavailable(
            f"the CORE eval bundle is not at {bundle_dir} and could not be downloaded "
            f"from {url}. Fetch it by hand: curl -L -o eval_bundle.zip {url} && unzip "
            f"eval_bundle.zip -d {base_dir} (it must leave {bundle_dir}/core.yaml)")
    return bundle_dir

# -----------------------------------------------------------------------------
# Task config, random baselines and data, read from the bundle

def load_core_config(bundle_dir):
    """-> (tasks, baselines): tasks = list of dicts from
    core.yaml, baselines = {label: random baseline in percent}."""
    yaml_path = os.path.join(bundle_dir, "core.yaml")
    with open(yaml_path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    tasks = []
    for i, entry in enumerate(config["icl_tasks"]):
        missing = [k for k in ("label", "dataset_uri", "num_fewshot", "icl_task_type")
                   if k not in entry]
        if missing:
            raise ValueError(f"{yaml_path}: icl_tasks entry {i} lacks {missing}")
        if entry["icl_task_type"] not in REQUIRED_KEYS:
            raise ValueError(f"{yaml_path}: task {entry['label']!r} has icl_task_type "
                             f"{entry['icl_task_type']!r}, expected one of {tuple(REQUIRED_KEYS)}")
        k = entry["num_fewshot"]
        tasks.append({"label": entry["label"], "dataset_uri": entry["dataset_uri"],
                      "num_fewshot": int(k[0] if isinstance(k, list) else k),  # the bundle has [10]
                      "task_type": entry["icl_task_type"],
                      "continuation_delimiter": entry.get("continuation_delimiter", " ")})
    csv_path = os.path.join(bundle_dir, "eval_meta_data.csv")
    with open(csv_path, encoding="utf-8", newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    missing = [task["label"] for task in tasks if task["label"] not in baselines]
    if missing:
        raise ValueError(f"{csv_path} has no 'Random baseline' row for core.yaml tasks {missing}")
    return tasks, baselines

def load_task_data(path, task_type):
    """Read a task's JSONL file; malformed lines and missing keys raise naming the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CORE task file {path} is missing: the eval bundle "
                                f"is incomplete; delete {os.path.dirname(path)} up "
                                f"to eval_bundle/ and rerun to fetch it again")
    data = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column "
                                 f"{e.colno})") from e
            missing = [k for k in REQUIRED_KEYS[task_type] if k not in item]
            if missing:
                raise ValueError(f"{path}:{lineno}: a {task_type} example needs keys "
                                 f"{list(REQUIRED_KEYS[task_type])}, this one lacks {missing}")
            data.append(item)
    return data

# -----------------------------------------------------------------------------
# Prompts: few-shot examples first (each a solved example), separated by blank lines, then the item

def sample_fewshot(data, idx, k):
    """k examples other than data[idx], drawn with
    random.Random(1234 + idx) so every run and rank agrees."""
    # a task cropped by max_per_task can hold fewer than k + 1 examples: use all the others then
    # (rng.sample would raise mid-eval); with enough examples the draws are karpathy/nanochat's
    k = min(k, len(data) - 1)
    if k <= 0:
        return []
    # the same draws as rng.sample over the list of all indices but idx, without building that list
    # per example
    picks = random.Random(1234 + idx).sample(range(len(data) - 1), k)
    return [data[i + (i >= idx)] for i in picks]

def render_prompts(task_type, item, delimiter, fewshot):
    """
    The prompt strings to score for one item.
    multiple_choice: one per choice; schema: one per context option;
    language_modeling: [prompt without the continuation (trailing whitespace stripped), prompt with
    it].
    """
    d = delimiter
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n"
                        for ex in fewshot)
        return [f"{shots}{ctx}{d}{item['continuation']}" for ctx in item["context_options"]]
    shots = "".join(f"{ex['context'].strip()}{d}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{shots}{item['context'].strip()}{d}"
    # stripping lets the delimiter's space merge into the continuation's first token, as in running
    # text
    return [without.rstrip(), without + item["continuation"]]

def continuation_spans(task_type, token_lists):
    """
    Which tokens are scored. Returns (sequences, spans) with spans[i] = (start, end) into
    sequences[i].
    multiple_choice: tokens after the common prefix of all choices' prompts;
    schema: the common suffix of all options' prompts;
    language_modeling: tokens of prompt-with beyond prompt-without (which must be a token prefix of
    it).
    """
    if task_type == "language_modeling":
        without, with_ = token_lists
        if with_[:len(without)] != without or len(with_) == len(without):
            raise ValueError(f"language_modeling prompt without the continuation ({len(without)} "
                             f"tokens) is not a strict token prefix of the one with it "
                             f"({len(with_)} tokens)")
        return [with_], [(len(without), len(with_))]
    # keep at least one token on each side of the cut: every prompt then scores >= 1 token and
    # every scored token has a token before it (BOS is common to all prompts, so prefix >= 1)
    limit = min(len(t) for t in token_lists) - 1
    if task_type == "multiple_choice":
        n = _common_prefix_len(token_lists, limit)
        return token_lists, [(n, len(t)) for t in token_lists]
    n = _common_prefix_len([t[::-1] for t in token_lists], limit)
    return token_lists, [(len(t) - n, len(t)) for t in token_lists]

def _common_prefix_len(seqs, limit):
    """Longest n <= limit with seqs[i][:n] equal for all i: a
    binary search of C-speed slice compares (long prompts)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        head = seqs[0][:mid]
        if all(s[:mid] == head for s in seqs[1:]):
            lo = mid
        else:
            hi = mid - 1
    return lo

def crop_left(tokens, start, end, max_len):
    """Drop tokens from the left so the sequence fits a hard context of max_len (None = no limit);
    the scored span moves with it. None when the span plus the one token before it (which predicts
    the first scored token) cannot fit."""
    excess = len(tokens) - max_len if max_len is not None else 0
    if excess <= 0:
        return tokens, start, end
    return (tokens[excess:], start - excess, end - excess) if start - excess >= 1 else None

# -----------------------------------------------------------------------------
# Scoring

@torch.no_grad()
def score_rows(model, rows, pad_id, device):
    """
    One forward over right-padded rows [(tokens, start, end), ...]. Returns per row
    (mean cross-entropy over tokens[start:end], whether argmax predicted every one of them).
    Right padding is harmless: with causal attention no real position sees the pad tokens.
    """
    ids = pad_sequence([torch.tensor(tokens, dtype=torch.long) for tokens, _, _ in rows],
                       batch_first=True, padding_value=pad_id).to(device)
    # (row, position) of the logits that score each continuation token: position t predicts t + 1
    row_idx, pos = torch.tensor([(r, p) for r, (_, start, end) in enumerate(rows)
                                 for p in range(start - 1, end - 1)], device=device).T
    logits = model(ids)
    # only the continuation positions, not the (rows, T, vocab) log-softmax of everything
    selected = logits[row_idx, pos].float()
    targets = ids[row_idx, pos + 1]
    losses = F.cross_entropy(selected, targets, reduction="none")
    misses = (selected.argmax(dim=-1) != targets).float()
    # per row: [scored tokens, summed loss, misses]
    sums = torch.zeros(3, len(rows), device=device).index_add_(
        1, row_idx, torch.stack([torch.ones_like(losses), losses, misses]))
    return (sums[1] / sums[0]).tolist(), (sums[2] == 0).tolist()

def prepare_examples(task, data, indices, tokenizer, max_len=None):
    """Render, tokenize (with BOS, one batched encode call) and, for a hard context max_len, crop
    examples. Returns ([(idx, rows, gold)] for score_rows, [indices skipped because a scored span
    does not fit max_len])."""
    prompt_lists = [render_prompts(task["task_type"], data[idx], task["continuation_delimiter"],
                                   sample_fewshot(data, idx, task["num_fewshot"]))
                    for idx in indices]
    flat = iter(tokenizer.encode([p for prompts in prompt_lists for p in prompts],
                                 prepend=tokenizer.get_bos_token_id()))
    examples, skipped = [], []
    for idx, prompts in zip(indices, prompt_lists):
        sequences, spans = continuation_spans(task["task_type"], [next(flat) for _ in prompts])
        rows = [crop_left(tokens, *span, max_len) for tokens, span in zip(sequences, spans)]
        if None in rows:
            skipped.append(idx)
        else:
            examples.append((idx, rows, data[idx].get("gold")))
    return examples, skipped

def evaluate_task(model, tokenizer, data, task, device, batch_tokens=32768, chunk_size=1024):
    """
    Returns (accuracy over the scored examples, number skipped). This rank takes examples rank, rank
    + world, ...; each chunk of them is sorted by length and packed into forwards of at most
    ~batch_tokens (padded) tokens, so short prompts share a batch (a prompt longer than batch_tokens
    gets a forward of its own).
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_dist() else (0, 1)
    max_len = getattr(model, "max_seq_len", None)  # a hard context limit; our own models have none
    lm = task["task_type"] == "language_modeling"  # scored by exact match, not the lowest loss
    bos = tokenizer.get_bos_token_id()
    # on the host, one copy to the device at the end: row 0 = correct, row 1 = skipped (its span did
    # not fit max_len)
    outcome = torch.zeros(2, len(data), dtype=torch.float32)
    length = lambda example: max(len(tokens) for tokens, _, _ in example[1])  # its longest row
    my_indices = list(range(rank, len(data), world))
    for c in range(0, len(my_indices), chunk_size):
        # prepared a chunk at a time: tokenized prompts of a whole 10k-example task would take GBs
        # as Python lists
        chunk = my_indices[c:c + chunk_size]
        examples, skipped = prepare_examples(task, data, chunk, tokenizer, max_len)
        outcome[1, skipped] = 1.0
        examples.sort(key=length, reverse=True)
        if examples and hasattr(model, "ensure_rotary_positions"):
            model.ensure_rotary_positions(length(examples[0]))
        i = 0
        while i < len(examples):
            # longest first, so the first example's length is the batch's padded length
            j, num_rows, max_rows = i + 1, len(examples[i][1]), batch_tokens // length(examples[i])
            while j < len(examples) and num_rows + len(examples[j][1]) <= max_rows:
                num_rows += len(examples[j][1])
                j += 1
            batch = examples[i:j]
            rows = [row for _, ex_rows, _ in batch for row in ex_rows]
            mean_losses, all_hit = score_rows(model, rows, bos, device)
            r = 0
            for idx, ex_rows, gold in batch:
                losses = mean_losses[r:r + len(ex_rows)]  # the lowest wins, ties go to the first
                outcome[0, idx] = float(all_hit[r] if lm else losses.index(min(losses)) == gold)
                r += len(ex_rows)
            i = j
    if is_dist():
        outcome = outcome.to(device)  # NCCL reduces device tensors only
        dist.all_reduce(outcome, op=dist.ReduceOp.SUM)
    # sums of 0/1 floats are exact; the division is done in float64
    num_correct, num_skipped = (int(x) for x in outcome.sum(dim=1).tolist())
    num_scored = len(data) - num_skipped
    if num_scored == 0:
        raise ValueError(f"CORE task {task['label']!r}: none of its {len(data)} examples "
                         f"fits the model's hard context limit max_seq_len={max_len}; "
                         f"evaluate a model with a longer context or leave the task out")
    return num_correct / num_scored, num_skipped

def evaluate_core(model, tokenizer, device, max_per_task=-1, batch_tokens=32768):
    """
    Evaluate every task of the bundle's core.yaml (fetching the bundle if needed).
    max_per_task: examples per task after the fixed shuffle (-1 = all).
    batch_tokens: padded tokens per forward; lower it if the logits (batch_tokens x vocab fp32) do
    not fit. Returns {"results": {label: accuracy}, "centered_results": {label: centered},
    "core_metric": mean centered, "skipped": {label: examples left out because they do not fit a
    hard context limit (0 for our models)}}. Prints one line per task with examples/s.
    """
    bundle_dir = ensure_eval_bundle()
    tasks, baselines = load_core_config(bundle_dir)
    results, centered_results, skipped = {}, {}, {}
    for task in tasks:
        t0 = time.time()
        label = task["label"]
        path = os.path.join(bundle_dir, "eval_data", task["dataset_uri"])
        data = load_task_data(path, task["task_type"])
        if not data:
            raise ValueError(f"CORE task file {path} has no examples")
        random.Random(1337).shuffle(data)  # fixed: a cropped task is the same subset every time
        data = data[:max_per_task] if max_per_task > 0 else data
        accuracy, skipped[label] = evaluate_task(model, tokenizer, data, task, device, batch_tokens)
        baseline = 0.01 * baselines[label]
        results[label] = accuracy
        centered_results[label] = (accuracy - baseline) / (1.0 - baseline)
        dt = time.time() - t0
        note = f" | {skipped[label]} skipped: longer than max_seq_len" if skipped[label] else ""
        print0(f"{label:<35} accuracy {accuracy:.4f} | centered {centered_results[label]:+.4f} | "
               f"{len(data)} examples in {dt:.2f}s ({len(data) / dt:.1f} examples/s){note}")
    core_metric = sum(centered_results.values()) / len(centered_results)
    return {"results": results, "centered_results": centered_results, "core_metric": core_metric,
            "skipped": skipped}
