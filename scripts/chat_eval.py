"""
Evaluate a chat model on the chat tasks and compute ChatCORE.

    python -m scripts.chat_eval -i sft                              # all tasks
    python -m scripts.chat_eval -i mid -a "ARC-Easy|GSM8K" -x 100   # some tasks, 100 problems each
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft

Categorical tasks (ARC, MMLU, SynthMC) need no sampling: each prompt ends in <|assistant_start|> and
the answer is the allowed letter with the highest logit at that position (one forward pass per
batch). Generative tasks (GSM8K, HumanEval, SpellingBee, the synthetic ones) sample through the
Engine, so calculator calls are executed; a problem passes if any of its --num-samples completions
passes (pass@k). Problems are spread over ranks and counts summed.

ChatCORE = mean over tasks of (accuracy - chance) / (1 - chance), printed when every real task was
run. Without the real datasets (offline) the synthetic tasks' test splits are evaluated instead
(ChatCORE-synthetic), and the skipped tasks are listed with how to fetch them. Leaves out:
per-subject MMLU breakdowns, saving completions.
"""

import argparse
import math
import os
import sys

import torch

from nanochat.checkpoint import load_model
from nanochat.common import (check_flags, compute_cleanup, compute_init, get_base_dir, print0,
                             rank_and_world, reduce_across_ranks)
from nanochat.engine import Engine, add_dtype_flag, prepare_for_inference
from nanochat.report import get_report
from tasks.common import hub_dataset_ready
from tasks.arc import ARC
from tasks.mmlu import MMLU
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.spellingbee import SpellingBee
from tasks.synthetic import SyntheticIdentity, SyntheticMath, SyntheticSpelling, SyntheticMC

def on_hub(name, subset):
    return lambda: hub_dataset_ready(name, subset, "test")

# name: (build the test task, is its data on disk, accuracy of random guessing)
REAL_TASKS = {
    "ARC-Easy": (lambda: ARC("ARC-Easy", "test"), on_hub("allenai/ai2_arc", "ARC-Easy"), 0.25),
    "ARC-Challenge": (lambda: ARC("ARC-Challenge", "test"),
                      on_hub("allenai/ai2_arc", "ARC-Challenge"), 0.25),
    "MMLU": (lambda: MMLU("all", "test"), on_hub("cais/mmlu", "all"), 0.25),
    "GSM8K": (lambda: GSM8K("main", "test"), on_hub("openai/gsm8k", "main"), 0.0),
    "HumanEval": (HumanEval, on_hub("openai/openai_humaneval", "openai_humaneval"), 0.0),
    "SpellingBee": (lambda: SpellingBee(size=256, split="test"),
                    lambda: os.path.exists(os.path.join(get_base_dir(), "words_alpha.txt")), 0.0),
}
# Test splits of the embedded synthetic tasks (train on split="train" of the same classes; disjoint
# by construction).
SYNTHETIC_TASKS = {
    "SynthIdentity": (lambda: SyntheticIdentity(split="test", size=200), lambda: True, 0.0),
    "SynthMath": (lambda: SyntheticMath(split="test", size=200), lambda: True, 0.0),
    "SynthSpelling": (lambda: SyntheticSpelling(split="test", size=200), lambda: True, 0.0),
    "SynthMC": (lambda: SyntheticMC(split="test", size=200), lambda: True, 0.25),
}
ALL_TASKS = {**REAL_TASKS, **SYNTHETIC_TASKS}

# -----------------------------------------------------------------------------
# Evaluation functions (also called by mid_train / chat_sft for periodic metrics)

@torch.inference_mode()
def run_categorical_eval(task, tokenizer, model, batch_size, max_problems=None):
    """
    -> (num_correct, num_problems) over all ranks. Batches of consecutive problems are strided
    across ranks; each batch is right-padded with BOS (causal attention: padding after a prompt
    cannot change its last logits).
    """
    rank, world = rank_and_world()
    device, bos = model.get_device(), tokenizer.get_bos_token_id()
    num_problems = len(task) if max_problems is None else min(len(task), max_problems)
    correct = total = 0
    for start in range(rank * batch_size, num_problems, world * batch_size):
        conversations = [task[i] for i in range(start, min(start + batch_size, num_problems))]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        longest = max(len(p) for p in prompts)
        ids = [p + [bos] * (longest - len(p)) for p in prompts]
        logits = model(torch.tensor(ids, dtype=torch.long, device=device))
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            letter_ids = [tokenizer.encode(letter) for letter in letters]
            assert all(len(i) == 1 for i in letter_ids), f"letters {letters} encode to {letter_ids}"
            scores = logits[row, len(prompt) - 1, [i[0] for i in letter_ids]]
            correct += int(task.evaluate(conversation, letters[int(scores.argmax())]))
            total += 1
    return tuple(reduce_across_ranks(torch.tensor([correct, total], device=device)).tolist())

@torch.inference_mode()
def run_generative_eval(task, tokenizer, model, engine, num_samples=1, max_new_tokens=512,
                        temperature=0.0, top_k=50, max_problems=None, progress=True):
    """
    -> (num_passed, num_problems) over all ranks; problem i is evaluated by rank i % world, sampled
    with seed i (so the result does not depend on the number of ranks). A prompt that leaves no room
    to answer in the model's context counts as failed.
    """
    rank, world = rank_and_world()
    device, context = model.get_device(), model.config.sequence_len
    num_problems = len(task) if max_problems is None else min(len(task), max_problems)
    passed = total = 0
    for i in range(rank, num_problems, world):
        conversation = task[i]
        tokens = tokenizer.render_for_completion(conversation)
        budget = min(max_new_tokens, context - len(tokens))
        if budget >= 1:
            sequences, _ = engine.generate_batch(tokens, num_samples=num_samples, max_tokens=budget,
                                                 temperature=temperature, top_k=top_k, seed=i)
            passed += any(task.evaluate(conversation, tokenizer.decode(seq[len(tokens):]))
                          for seq in sequences)
        total += 1
        if progress:
            print(f"\r\033[Krank {rank} | {passed}/{total} ({100 * passed / total:.1f}%)", end="",
                  flush=True)
    if progress and total:
        print()
    return tuple(reduce_across_ranks(torch.tensor([passed, total], device=device)).tolist())

def run_chat_eval(task_name, model, tokenizer, engine, batch_size=8, num_samples=1,
                  max_new_tokens=512, temperature=0.0, top_k=50, max_problems=None):
    """
    Accuracy of the model on one task, given by name (a key of ALL_TASKS) or as a Task object.
    Every rank must call it (counts are summed across ranks). The caller puts the model in eval
    mode.
    """
    task = ALL_TASKS[task_name][0]() if isinstance(task_name, str) else task_name
    if task.eval_type == "categorical":
        correct, total = run_categorical_eval(task, tokenizer, model, batch_size, max_problems)
    else:
        correct, total = run_generative_eval(task, tokenizer, model, engine, num_samples,
                                             max_new_tokens, temperature, top_k, max_problems)
    assert total > 0, f"no problems were evaluated for {task_name} (max_problems={max_problems})"
    return correct / total

def chance_accuracy(task_name):
    """Accuracy of random guessing: 1/num_letters for multiple
    choice (all ours have 4), 0 for generative tasks."""
    return ALL_TASKS[task_name][2]

def chatcore(accuracies):
    """Mean centered accuracy: 0 = chance, 1 = perfect,
    over the tasks in `accuracies` ({name: accuracy})."""
    centered = [(acc - chance_accuracy(name)) / (1.0 - chance_accuracy(name))
                for name, acc in accuracies.items()]
    return sum(centered) / len(centered)

# -----------------------------------------------------------------------------

def resolve_tasks(task_names):
    """
    -> ({name: task}, skipped {name: reason}). Named tasks must load (a missing dataset raises with
    how to get it). Without names: every real task whose data is here or can be fetched; once a
    fetch fails (offline) the rest are skipped, and if no real task is available the synthetic test
    splits are used instead.
    """
    if task_names is not None:
        unknown = [n for n in task_names if n not in ALL_TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}: choose from {'|'.join(ALL_TASKS)}")
        return {name: ALL_TASKS[name][0]() for name in task_names}, {}
    tasks, skipped = {}, {}
    for name, (build, ready, _) in REAL_TASKS.items():
        if skipped and not ready():  # something skipped: a fetch has failed
            skipped[name] = "not fetched: an earlier download failed (offline?)"
            continue
        try:
            tasks[name] = build()
        except RuntimeError as e:  # hub or word list not fetched; the message says how to fetch it
            skipped[name] = str(e)
    if not tasks:
        print0("No real task data could be loaded (offline?): "
               "evaluating the synthetic tasks' test splits instead")
        tasks = {name: build() for name, (build, _, _) in SYNTHETIC_TASKS.items()}
    return tasks, skipped

def validate_args(args):
    """Bad values end the program with one line naming the
    flag and the fix (a 0 batch or budget would report 0%)."""
    t, x = args.temperature, args.max_problems
    check_flags([
        ("-t/--temperature", t, math.isfinite(t) and t >= 0, "a finite number >= 0 (0 = greedy)"),
        ("-m/--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1 tokens"),
        ("-n/--num-samples", args.num_samples, args.num_samples >= 1, ">= 1"),
        ("-k/--top-k", args.top_k, args.top_k >= 1, ">= 1"),
        ("-b/--batch-size", args.batch_size, args.batch_size >= 1, ">= 1 problems"),
        ("-x/--max-problems", x, x is None or x >= 1, ">= 1, or left out for all"),
    ])

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Evaluate a chat model on the chat tasks")
    add = parser.add_argument
    add("-i", "--source", required=True, choices=["mid", "sft", "rl"])
    add("-a", "--task-name", help=f"tasks separated by '|' from {'|'.join(ALL_TASKS)}; default: "
        f"all real tasks (the synthetic ones when no real dataset is available)")
    add("-t", "--temperature", type=float, default=0.0, help="0 = greedy")
    add("-m", "--max-new-tokens", type=int, default=512, help="per completion")
    add("-n", "--num-samples", type=int, default=1, help="per problem (pass@k)")
    add("-k", "--top-k", type=int, default=50, help="sample from the k likeliest")
    add("-b", "--batch-size", type=int, default=8, help="problems per forward pass (categorical)")
    add("-g", "--model-tag", help="default: the largest d<N>")
    add("-s", "--step", type=int, help="default: the newest")
    add("-x", "--max-problems", type=int, help="default: all")
    add("--device-type", default="", help="cuda|cpu|mps (empty = autodetect)")
    add_dtype_flag(parser)
    args = parser.parse_args()
    validate_args(args)

    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    try:
        model, tokenizer, meta = load_model(args.source, device, model_tag=args.model_tag,
                                            step=args.step)
        prepare_for_inference(model, args.dtype)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # missing, corrupt or mismatched
        sys.exit(f"error: {e}")
    engine = Engine(model, tokenizer)

    tasks, skipped = resolve_tasks(args.task_name.split("|") if args.task_name else None)
    settings = {k: vars(args)[k] for k in ("batch_size", "num_samples", "max_new_tokens",
                                           "temperature", "top_k", "max_problems")}
    results = {}
    for name, task in tasks.items():
        results[name] = run_chat_eval(task, model, tokenizer, engine, **settings)
        print0(f"{name} accuracy: {100 * results[name]:.2f}% "
               f"(chance {100 * chance_accuracy(name):.0f}%)")

    summary = dict(results)
    for label, names, note in (("ChatCORE", REAL_TASKS, ""), ("ChatCORE-synthetic", SYNTHETIC_TASKS,
                               " (the embedded demo tasks, not comparable to ChatCORE)")):
        if all(name in results for name in names):
            summary[label] = chatcore({name: results[name] for name in names})
            print0(f"{label}{note}: {summary[label]:.4f}")
    for name, reason in skipped.items():
        print0(f"skipped {name}: {reason}")
    if skipped:
        print0(f"To evaluate them, run on a machine with internet access once (the "
               f"datasets are cached under {get_base_dir()}/task_data/), e.g. python "
               f"-m scripts.chat_eval -i {args.source} -a \"{'|'.join(skipped)}\"")
    get_report().log(section=f"Chat evaluation {args.source}", data=[vars(args), summary,
                     {f"skipped {name}": "no data" for name in skipped}])
    compute_cleanup()
