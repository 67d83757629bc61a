"""
The task framework shared by mid-training, SFT, RL and chat evaluation.

A Task is a sliced, indexable view over conversations ({"messages": [...]}, see
nanochat/tokenizer.py) that also knows how to grade an assistant response. TaskMixture shuffles
several tasks together for training; TaskSequence concatenates them (a curriculum). render_mc is the
one multiple-choice prompt format.

Real datasets come from the Hugging Face hub's auto-generated parquet export (no `datasets`
dependency): load_hub_dataset downloads the shards once into <base>/task_data/ and reads them with
pyarrow. Set NANOCHAT_HF_URL to point at a mirror (the tests point it at a 127.0.0.1 server). Leaves
out: streaming, private/gated datasets (no auth token is sent).
"""

import os
import re
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from nanochat.common import get_base_dir, download_url, atomic_write_text

# -----------------------------------------------------------------------------
# Task: a sliced view over a dataset of conversations

class Task:
    """
    Task(start, stop, step) views examples start, start+step, ... (< stop) of the underlying
    dataset. Subclasses implement num_examples(), get_example(index), evaluate(conversation,
    response) and set eval_type: "categorical" (the answer is one of conversation["letters"], scored
    by logits) or "generative" (sampled and graded).
    """
    eval_type = None

    def __init__(self, start=0, stop=None, step=1):
        assert start >= 0, f"start must be >= 0, got {start}"
        assert stop is None or stop >= start, f"stop ({stop}) must be >= start ({start})"
        assert step >= 1, f"step must be >= 1, got {step}"
        self.start, self.stop, self.step = start, stop, step

    def evaluate(self, conversation, assistant_response):
        raise NotImplementedError(f"{type(self).__name__} has no evaluation (training data only)")

    def reward(self, conversation, assistant_response):
        """RL reward; by default 1.0 for a passing response, else 0.0."""
        return float(self.evaluate(conversation, assistant_response))

    def __len__(self):
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))  # ceil((stop - start) / step)

    def __getitem__(self, i):
        assert 0 <= i < len(self), f"index {i} out of range for {type(self).__name__} ({len(self)})"
        return self.get_example(self.start + i * self.step)


class TaskMixture(Task):
    """All examples of all tasks, shuffled together once with random.Random(42) so every epoch
    interleaves them. Passing a task twice oversamples it (each copy gives every example once)."""
    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.index_map = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
        random.Random(42).shuffle(self.index_map)

    def num_examples(self):
        return len(self.index_map)

    def get_example(self, index):
        t, i = self.index_map[index]
        return self.tasks[t][i]


class TaskSequence(Task):
    """All examples of the first task, then the second, ... (a curriculum; no shuffling)."""
    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.offsets = np.cumsum([0] + [len(task) for task in tasks]).tolist()

    def num_examples(self):
        return self.offsets[-1]

    def get_example(self, index):  # an index out of range fails in the task's own __getitem__
        t = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.tasks[t][index - self.offsets[t]]

# -----------------------------------------------------------------------------
# Multiple choice

def render_mc(question, letters, choices):
    """The multiple-choice prompt. The letter comes after its choice with no space after "=", so the
    token the model sees in the prompt is the bare-letter token it must emit as the answer (small
    models benefit)."""
    assert len(letters) == len(choices), f"{len(letters)} letters for {len(choices)} choices"
    options = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return (f"Multiple Choice question: {question}\n{options}\n"
            "Respond only with the letter of the correct answer.")

def qa_conversation(question, answer, **extra):
    """One user message and the assistant's answer (a
    string or a list of parts), plus any extra fields."""
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}], **extra}

def mc_conversation(question, letters, choices, answer, **extra):
    """The render_mc prompt, the answer letter as reply and the letters evaluate_letter allows."""
    return qa_conversation(render_mc(question, letters, choices), answer, letters=letters, **extra)

def evaluate_letter(conversation, assistant_response):
    """Categorical grading: the response must be exactly the reference letter."""
    letters = conversation["letters"]
    assert assistant_response in letters, f"response {assistant_response!r} is not one of {letters}"
    return assistant_response == conversation["messages"][-1]["content"]

# -----------------------------------------------------------------------------
# Hugging Face hub parquet export, downloaded once into
# <base>/task_data/<owner--repo>/<subset>/<split>/

HF_URL = "https://huggingface.co"

def hub_dataset_dir(repo, subset, split):
    return os.path.join(get_base_dir(), "task_data", repo.replace("/", "--"), subset, split)

def hub_dataset_ready(repo, subset, split):
    """True when the dataset was fully downloaded (its manifest exists); no network access."""
    return os.path.exists(os.path.join(hub_dataset_dir(repo, subset, split), "manifest.json"))


class HubDataset:
    """Rows of a pyarrow table as dicts, optionally through a permutation (from shuffle)."""
    def __init__(self, table, indices=None):
        self.table, self.indices = table, indices

    def __len__(self):
        return self.table.num_rows if self.indices is None else len(self.indices)

    def __getitem__(self, i):
        assert 0 <= i < len(self), f"row {i} out of range for {len(self)} rows"
        j = i if self.indices is None else int(self.indices[i])
        return {name: self.table.column(name)[j].as_py() for name in self.table.column_names}

    def shuffle(self, seed):
        """A shuffled view (the original is untouched); same
        order as Hugging Face datasets' .shuffle(seed=seed)."""
        perm = np.random.default_rng(seed).permutation(len(self))
        indices = perm if self.indices is None else self.indices[perm]
        return HubDataset(self.table, indices)


def _shard_sort_key(url):
    stem = url.rsplit("/", 1)[-1].split("?")[0].removesuffix(".parquet")
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)

def _download_hub_dataset(repo, subset, split, data_dir):
    hub = os.environ.get("NANOCHAT_HF_URL", HF_URL).rstrip("/")
    listing_url = f"{hub}/api/datasets/{repo}/parquet/{subset}/{split}"
    how_to = (f"Fetch it on a machine with internet access (any nanochat command that uses "
              f"it downloads it), or download the parquet files listed at {listing_url} "
              f"and place them, in listing order, as {data_dir}/00000.parquet, "
              f"00001.parquet, ... plus a manifest.json {{\"files\": [...]}} naming them.")
    listing_path = os.path.join(data_dir, "listing.json")
    if not download_url(listing_url, listing_path, attempts=2):
        note = " (NANOCHAT_OFFLINE=1 is set)" if os.environ.get("NANOCHAT_OFFLINE") == "1" else ""
        raise RuntimeError(f"dataset {repo} ({subset}/{split}) is not in {data_dir} "
                           f"and {listing_url} could not be fetched{note}. {how_to}")
    with open(listing_path, encoding="utf-8") as f:
        urls = json.load(f)
    assert isinstance(urls, list) and urls, f"{listing_url} returned {urls!r}, not a list of URLs"
    files = [f"{i:05d}.parquet" for i in range(len(urls))]
    for i, url in enumerate(sorted(urls, key=_shard_sort_key)):
        if not download_url(url, os.path.join(data_dir, files[i])):
            raise RuntimeError(f"could not download {url} (shard {i} of {repo} {subset}/{split}). "
                               f"{how_to}")
    # Written last: its presence means every shard is complete (download_url renames atomically).
    manifest = {"repo": repo, "subset": subset, "split": split, "urls": urls, "files": files}
    atomic_write_text(os.path.join(data_dir, "manifest.json"), json.dumps(manifest, indent=1))
    os.remove(listing_path)

def load_hub_dataset(repo, subset, split):
    """Rows of a hub dataset's parquet export as a HubDataset, downloading it the first time.
    One process downloads (file lock); the others wait, then read the same files."""
    data_dir = hub_dataset_dir(repo, subset, split)
    manifest_path = os.path.join(data_dir, "manifest.json")
    if not os.path.exists(manifest_path):
        os.makedirs(data_dir, exist_ok=True)
        with FileLock(data_dir + ".lock"):
            if not os.path.exists(manifest_path):
                _download_hub_dataset(repo, subset, split, data_dir)
    with open(manifest_path, encoding="utf-8") as f:
        files = json.load(f)["files"]
    tables = [pq.read_table(os.path.join(data_dir, name)) for name in files]
    return HubDataset(pa.concat_tables(tables, promote_options="default"))


class HubTask(Task):
    """A Task over a hub dataset in one fixed shuffled order (seed 42). Subclasses set repo, splits
    ({subset: its splits}) and conversation(row)."""
    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        name, splits = type(self).__name__, self.splits
        assert subset in splits, f"{name} subset must be one of {list(splits)}, got {subset!r}"
        assert split in splits[subset], f"{name} {subset} splits are {splits[subset]}: {split!r}?"
        self.ds = load_hub_dataset(self.repo, subset, split).shuffle(seed=42)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        return self.conversation(self.ds[index])

# -----------------------------------------------------------------------------
# "#### N" answers (GSM8K, SpellingBee and the synthetic word problems)

def calculator_conversation(question, before, expr, output, after):
    """A question, and a reply that says `before`, calls the
    calculator on expr (its output), then says `after`."""
    parts = zip(["text", "python", "python_output", "text"], [before, expr, output, after])
    return qa_conversation(question, [{"type": kind, "text": text} for kind, text in parts])

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")

def extract_answer(text):
    """The characters after the first "#### " that make a number, commas removed ("1,234" ->
    "1234"); or None. A trailing period stays ("#### 18." -> "18.", which does not equal "18"), as
    in OpenAI's own normalization (github.com/openai/grade-school-math, dataset.py), so GSM8K scores
    and RL rewards compare with published ones."""
    match = ANSWER_RE.search(text)
    return match.group(1).replace(",", "") if match else None

def evaluate_answer(conversation, assistant_response):
    """Generative grading: the response's "#### N" equals
    the reference's (the last part of the last message)."""
    reference = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
    return reference is not None and extract_answer(assistant_response) == reference
