"""
Evaluate a base model: train/val bits per byte, the CORE metric, and a few samples.

    python -m scripts.base_eval                                  # all three, newest base checkpoint
    python -m scripts.base_eval --eval=core --max-per-task=16    # a quick CORE estimate
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval -- --device-batch-size=16
    python -m scripts.base_eval --hf-path=openai-community/gpt2  # any HF causal LM: CORE and bpb

bpb: --split-tokens tokens of each split through the pretraining loader (rounded down to whole
steps of device_batch_size x sequence_len x world_size tokens). CORE: all 22 tasks of the DCLM eval
bundle, written to <base>/base_eval/base_model_SSSSSS.csv ("Task, Accuracy, Centered", then a CORE
line) and printed. Samples (rank 0): greedy completions of fixed prompts and a few unconditioned
samples. --hf-path evaluates a Hugging Face causal LM (hub name or directory, e.g. one written by
scripts.export_hf) through nanochat/hf/causal_lm.py: CORE with prompts cropped on the left to its
max_position_embeddings (GPT-2: 1024), as karpathy/nanochat did for its published GPT-2 CORE,
written to <base>/base_eval/<name>.csv; bpb on our pretraining data with the model's own tokenizer
(byte-level BPE only); no samples. Without the eval bundle and without network, CORE is skipped with
how to fetch the bundle; the rest still runs. Results also go to the report card ("Base model loss",
"Base model evaluation"). Leaves out: samples from HF models.
"""

import argparse
import os
import re

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

from nanochat.common import (atomic_write_text, compute_cleanup, compute_init, get_base_dir,
                             is_master, print0)
from nanochat.checkpoint import load_model
from nanochat.core_eval import EvalBundleUnavailable, ensure_eval_bundle, evaluate_core
from nanochat.dataloader import pretrain_loader
from nanochat.engine import Engine, greedy_completions
from nanochat.hf.causal_lm import load_hf_model
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes

parser = argparse.ArgumentParser(description="Evaluate a base model: bpb, CORE, samples")
add = parser.add_argument
add("--eval", help="comma-separated subset of core,bpb,sample (default: all; core,bpb for HF)")
add("--hf-path", help="evaluate this Hugging Face causal LM instead: a hub name, or a local "
    "directory (which may run its own modeling code)")
add("--model-tag", help="base_checkpoints/<tag> (default: largest)")
add("--step", type=int, help="checkpoint step (default: the newest)")
add("--max-per-task", type=int, default=-1, help="CORE examples a task (-1 = all)")
add("--device-batch-size", type=int, default=32, help="bpb rows per forward per device; CORE packs "
    "up to this many x sequence_len tokens per forward")
add("--split-tokens", type=int, default=40 * 524288, help="bpb tokens per split")
add("--dataset", help="bpb data (default: the model's training data)")
add("--device-type", default="", help="cuda|cpu|mps ('' = autodetect)")
args = parser.parse_args()
args.eval = args.eval or ("core,bpb" if args.hf_path else "core,bpb,sample")
evals = [e.strip() for e in args.eval.split(",") if e.strip()]
unknown = sorted(set(evals) - {"core", "bpb", "sample"})
if unknown or not evals:
    parser.error(f"--eval={args.eval!r}: pick a comma-separated subset of core,bpb,sample "
                 f"(unknown: {unknown})")
if args.hf_path and (args.model_tag or args.step is not None):
    parser.error("--model-tag and --step pick a nanochat checkpoint; "
                 "--hf-path names the model on its own")
if args.hf_path and "sample" in evals:
    parser.error("--hf-path models are not sampled here (nanochat's "
                 "Engine runs nanochat models only); use --eval=core,bpb")

ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
if args.hf_path:
    model, tokenizer = load_hf_model(args.hf_path, device)
    meta, sequence_len = {}, model.max_seq_len  # bpb rows are as long as the model's context
    if sequence_len is None:
        parser.error(f"{args.hf_path}'s config has no max_position_embeddings: "
                     f"its context length is unknown")
    model_name, csv_name = args.hf_path, re.sub(r"[^\w.-]+", "-", args.hf_path).strip("-.") + ".csv"
else:
    model, tokenizer, meta = load_model("base", device, model_tag=args.model_tag, step=args.step)
    sequence_len = model.config.sequence_len
    model_name, csv_name = f"base_model (step {meta['step']})", f"base_model_{meta['step']:06d}.csv"
model_line = {"model": model_name}
loss_report = []  # "Base model loss": bpb and samples; "Base model evaluation": CORE

# -----------------------------------------------------------------------------
# CORE

if "core" in evals:
    try:
        ensure_eval_bundle()
    except EvalBundleUnavailable as e:
        print0(f"Skipping CORE: {e}")
    else:
        print0(f"CORE on {'all' if args.max_per_task < 0 else args.max_per_task} examples per task")
        out = evaluate_core(model, tokenizer, device, max_per_task=args.max_per_task,
                            batch_tokens=args.device_batch_size * sequence_len)
        centered = out["centered_results"]
        rows = [("Task", "Accuracy", "Centered")]
        rows += [(task, f"{acc:.6f}", f"{centered[task]:.6f}")
                 for task, acc in out["results"].items()]
        rows += [("CORE", "", f"{out['core_metric']:.6f}")]
        if is_master():
            csv_path = os.path.join(get_base_dir(), "base_eval", csv_name)
            os.makedirs(os.path.dirname(csv_path), exist_ok=True)
            atomic_write_text(csv_path, "".join(", ".join(row) + "\n" for row in rows))
            width = max(len(label) for label in out["results"])
            print0("\n".join(f"{label:<{width}}  {acc:<10}  {c}" for label, acc, c in rows))
            print0(f"Wrote {csv_path}")
        get_report().log("Base model evaluation",
                         [model_line, {"CORE": out["core_metric"]}, centered])

# -----------------------------------------------------------------------------
# Bits per byte on the train and val splits

if "bpb" in evals:
    dataset = args.dataset or meta.get("dataset")
    tokens_per_step = args.device_batch_size * sequence_len * world_size
    steps = args.split_tokens // tokens_per_step
    if steps < 1:
        raise ValueError(f"--split-tokens={args.split_tokens} is less than one step of "
                         f"{tokens_per_step} tokens (device_batch_size {args.device_batch_size} "
                         f"x sequence_len {sequence_len} x {world_size} ranks); raise it")
    print0(f"bpb over {steps * tokens_per_step:,} tokens per split "
           f"({steps} steps of {tokens_per_step:,})")
    token_bytes = tokenizer.token_bytes().to(device) if args.hf_path else get_token_bytes(device)
    bpb = {}
    for split in ("train", "val"):
        loader = pretrain_loader(tokenizer, args.device_batch_size, sequence_len, split, rank=rank,
                                 world_size=world_size, device=device, dataset=dataset)
        bpb[split] = evaluate_bpb(model, loader, steps, token_bytes)
        print0(f"{split} bpb: {bpb[split]:.6f}")
    loss_report.append({"train bpb": bpb["train"], "val bpb": bpb["val"]})

# -----------------------------------------------------------------------------
# Samples (rank 0): greedy completions of fixed prompts, then unconditioned samples from <|bos|>

if "sample" in evals and is_master():
    engine = Engine(model, tokenizer)
    samples = greedy_completions(engine, tokenizer)
    print0("Greedy completions:\n" + "\n".join(f"  {s!r}" for s in samples))
    sequences, _ = engine.generate_batch([tokenizer.get_bos_token_id()], num_samples=8,
                                         max_tokens=min(128, sequence_len - 1), temperature=1.0)
    unconditioned = [tokenizer.decode(sequence[1:]) for sequence in sequences]
    print0("Unconditioned samples (temperature 1.0):\n"
           + "\n".join(f"  {s!r}" for s in unconditioned))
    samples += unconditioned
    loss_report.append("\n".join(f"- sample {i}: {s!r}" for i, s in enumerate(samples)))

if loss_report:
    get_report().log("Base model loss", [model_line] + loss_report)
compute_cleanup()
