"""
Pretrain a base GPT. One dial, --depth, sets width, heads, horizon, batch size, learning rates and
weight decay.

    python -m scripts.base_train --depth=20                              # one GPU (or CPU/MPS, slowly)
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=24 --target-param-data-ratio=8 --fp8
    python -m scripts.base_train --depth=20 --resume                     # continue from the newest complete checkpoint
    python -m scripts.base_train --depth=20 --overwrite                  # delete that run's checkpoints, start over

Data: pretraining shards of the dataset named by --dataset, else env NANOCHAT_DATASET, else climbmix
(`python -m nanochat.dataset -n 8`; `--dataset local` is the offline corpus). Tokenizer: `python -m
scripts.tok_train`. Checkpoints go to <base>/base_checkpoints/<model tag>/ at the end, every
--save-every steps, every --save-every-minutes of wall time (only the newest --keep-periodic of
those are kept) and when SIGTERM/SIGINT stops the run after its current step (it prints the command
that resumes). Each holds everything needed to resume EXACTLY: model, per-rank optimizer shards, the
data loaders' positions, the loop state and every derived hyperparameter. A resumed run produces the
same steps, bit for bit, as one that was never stopped. A run without --resume refuses a directory
that holds checkpoints unless --overwrite says to delete them.

Data parallel streams: each (GPU, gradient-accumulation micro-step) pair reads its own stream of row
groups, so a run's data depends on the total batch only: 2 GPUs x 1 micro-step trains on the same
batches as 1 GPU x 2.

At the end it writes the "Base model training" section of the report card (nanochat/report.py);
every step appends one JSON line (loss, lrm, tok/s, MFU, FLOPs, val bpb when measured) to
<base>/logs/base_<tag>.jsonl. Leaves out: karpathy/nanochat's fp16 GradScaler path (bf16 or fp32
only) and batch-size ramps.
"""

import argparse
import contextlib
import itertools
import math
import os
import time

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import torch
import torch.distributed as dist

from nanochat.attention import attention_banner
from nanochat.common import (compute_init, compute_cleanup, print0, get_base_dir, get_peak_flops, init_wandb,
                             decide_compile, is_dist, check_flags, grad_accum_steps_for, collect_garbage, synchronize,
                             compile_for_training, COMPUTE_DTYPE)
from nanochat.gpt import GPT, config_for_depth
from nanochat.tokenizer import get_tokenizer, get_token_bytes
from nanochat.dataset import list_parquet_files, get_dataset_name
from nanochat.dataloader import pretrain_loader
from nanochat.checkpoint import (save_checkpoint, load_checkpoint, lock_checkpoint_dir, find_resume_step,
                                 check_resume_config, check_resume_flags, load_optimizer_state, loop_meta, restore_loop,
                                 check_fresh_start, prune_periodic, handle_stop_signals, stop_or_save_due,
                                 exit_after_stop, add_checkpoint_flags, SOURCE_DIRS)
from nanochat.core_eval import ensure_eval_bundle, evaluate_core
from nanochat.engine import Engine, greedy_completions
from nanochat.fp8 import check_fp8_supported, convert_to_float8_training, float8_disabled, worth_fp8
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import batch_size_for, batch_lr_scale, scaled_weight_decay
from nanochat.report import get_report, MetricLog

# -----------------------------------------------------------------------------
# CLI

parser = argparse.ArgumentParser(description="Pretrain a base model")
add = parser.add_argument
add("--run", type=str, default="dummy", help="wandb run name ('dummy' = no wandb)")
add("--device-type", type=str, default="", help="cuda|cpu|mps ('' = autodetect)")
add("--dataset", type=str, default=None, help="climbmix|fineweb-edu|local (default: env NANOCHAT_DATASET or climbmix)")
add("--compile", type=int, default=-1, help="torch.compile the model: 1 on, 0 off, -1 = auto (CUDA, and CPU with a "
    "working C++ compiler; env NANOCHAT_COMPILE=0/1 overrides auto)")
add("--fp8", action=argparse.BooleanOptionalAction, default=False,
    help="fp8 matmuls (tensorwise scaling) for the big linears (CUDA SM89+; --no-fp8 undoes --fp8)")
# model
add("--depth", type=int, default=20, help="number of layers: the one complexity dial")
add("--aspect-ratio", type=int, default=64, help="width = depth x this, up to whole heads")
add("--head-dim", type=int, default=128, help="attention head dimension")
add("--max-seq-len", type=int, default=2048, help="context length T")
add("--window-pattern", type=str, default="SSSL", help="per-layer attention windows, tiled: L = full context, "
    "S = T/4 rounded up to 128; last layer always L")
# horizon (first one set wins)
add("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = from --target-flops or the ratio)")
add("--target-flops", type=float, default=-1.0, help="training FLOPs budget (-1 = use the ratio)")
add("--target-param-data-ratio", type=float, default=12, help="tokens / scaling params (-1 = unset)")
# batch
add("--device-batch-size", type=int, default=32, help="rows per forward/backward per GPU")
add("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (-1 = from depth, B_opt ~ D^0.383)")
# optimizer
add("--embedding-lr", type=float, default=0.3, help="AdamW lr of the token embedding")
add("--unembedding-lr", type=float, default=0.008, help="AdamW lr of lm_head")
add("--matrix-lr", type=float, default=0.02, help="Muon lr of the transformer matrices")
add("--scalar-lr", type=float, default=0.5, help="AdamW lr of the per-layer scalars")
add("--weight-decay", type=float, default=0.28, help="Muon weight decay at d12 with 2^19-token batches (then scaled)")
add("--warmup-steps", type=int, default=40, help="linear LR warmup steps")
add("--warmdown-ratio", type=float, default=0.65, help="final fraction of steps: linear LR warmdown")
add("--final-lr-frac", type=float, default=0.05, help="LR multiplier at the last step")
# resume
add("--resume", action="store_true", help="resume from the newest complete checkpoint of --model-tag (or start fresh)")
add("--resume-from-step", type=int, default=-1, help="resume from this checkpoint step (-1 = no)")
add("--resume-override", action="store_true", help="resume with LR/schedule flags that differ from the checkpoint's")
# evaluation and output
add("--eval-every", type=int, default=250, help="val bpb every N steps, also at step 0 and the last step (-1 = never)")
add("--eval-tokens", type=int, default=80 * 524288, help="tokens per val bpb evaluation")
add("--core-metric-every", type=int, default=2000, help="CORE metric every N steps and at the last step (-1 = never)")
add("--core-metric-max-per-task", type=int, default=500, help="examples per CORE task (-1 = all)")
add("--sample-every", type=int, default=2000, help="greedy samples every N steps and at the last step (-1 = never)")
add("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
add_checkpoint_flags(parser)  # --overwrite, --save-every-minutes, --keep-periodic
add("--model-tag", type=str, default=None, help="checkpoint directory name (default d<depth>)")
args = parser.parse_args()
user_config = vars(args).copy()
check_flags([  # -1 is the one "derive it" sentinel: 0 or -5 is a typo, not a request to derive
    ("--num-iterations", args.num_iterations, args.num_iterations >= 1 or args.num_iterations == -1,
     ">= 1, or -1 to derive it from --target-flops / --target-param-data-ratio"),
    ("--target-flops", args.target_flops, args.target_flops > 0 or args.target_flops == -1,
     "> 0, or -1 to use the ratio"),
    ("--target-param-data-ratio", args.target_param_data_ratio,
     args.target_param_data_ratio > 0 or args.target_param_data_ratio == -1, "> 0, or -1 to leave it unset"),
    ("--total-batch-size", args.total_batch_size, args.total_batch_size >= 1 or args.total_batch_size == -1,
     ">= 1 tokens, or -1 to derive it from --depth"),
    ("--device-batch-size", args.device_batch_size, args.device_batch_size >= 1, ">= 1 rows"),
    ("--depth", args.depth, args.depth >= 1, ">= 1 layers"),
    ("--aspect-ratio", args.aspect_ratio, args.aspect_ratio >= 1, ">= 1 (model_dim = depth x aspect ratio)"),
    ("--head-dim", args.head_dim, args.head_dim >= 1, ">= 1"),
    ("--max-seq-len", args.max_seq_len, args.max_seq_len >= 1, ">= 1 tokens"),
    ("--warmup-steps", args.warmup_steps, args.warmup_steps >= 0, ">= 0 steps"),
    ("--warmdown-ratio", args.warmdown_ratio, 0 <= args.warmdown_ratio <= 1, "a fraction in [0, 1]"),
    ("--final-lr-frac", args.final_lr_frac, 0 <= args.final_lr_frac <= 1, "a fraction in [0, 1]"),
])

# -----------------------------------------------------------------------------
# Setup: device, tokenizer, data (fail here, with the command to run, rather than after the model is
# built)

ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
master = rank == 0
device_type = device.type
dataset = get_dataset_name(args.dataset)
tokenizer = get_tokenizer()
token_bytes = get_token_bytes(device)
vocab_size = tokenizer.get_vocab_size()
list_parquet_files("train", dataset=dataset)
list_parquet_files("val", dataset=dataset)
use_compile, compile_reason = decide_compile(args.compile, device_type)
print0(f"torch.compile: {compile_reason}")
if args.fp8:
    check_fp8_supported(device)  # raises on CPU/MPS and on GPUs older than SM89, naming the fix
    if COMPUTE_DTYPE != torch.bfloat16:
        raise RuntimeError(f"--fp8 trains around bf16 activations but the compute dtype "
                           f"is {COMPUTE_DTYPE}: unset NANOCHAT_DTYPE or drop --fp8")
wandb_run = init_wandb("nanochat", args.run, user_config, master)

# -----------------------------------------------------------------------------
# Model: everything follows from depth

def scaling_params(model):
    # "Kaplan-style": transformer matrices + lm_head give the cleanest scaling laws
    # (https://github.com/karpathy/nanochat/blob/master/dev/LOG.md, Jan 27)
    counts = model.num_scaling_params()
    return counts["transformer_matrices"] + counts["lm_head"]

shape = dict(aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, sequence_len=args.max_seq_len,
             vocab_size=vocab_size, window_pattern=args.window_pattern)
config = config_for_depth(args.depth, **shape)
with torch.device("meta"):
    model = GPT(config)           # raises naming the problem for e.g. an odd head dim or a bad window pattern
    reference_model = GPT(config_for_depth(12, **shape))  # d12 is where the learning rates and weight decay were tuned
param_counts = model.num_scaling_params()
num_scaling_params = scaling_params(model)
num_flops_per_token = model.estimate_flops()  # counted before any fp8 swap (karpathy/nanochat undercounted after)
print0(f"depth {args.depth}: width {config.n_embd}, {config.n_head} heads of {args.head_dim}, "
       f"windows {model.window_sizes}, vocab {vocab_size}")
print0("parameters: " + ", ".join(f"{k} {v:,}" for k, v in param_counts.items()) + f" | scaling {num_scaling_params:,}")
print0(f"FLOPs per token: {num_flops_per_token:e}")
print0(attention_banner(device, model.window_sizes, config.sequence_len))

# -----------------------------------------------------------------------------
# Derivation. N = scaling params; the LRs and weight decay were tuned at d12 (N_d12) with 2^19-token
# batches.
# 1. batch         B = 2^round(log2(2^19 x (N / N_d12)^0.383))        Power Lines, B_opt ~ D^0.383
# (batch_size_for)
# 2. horizon       steps = --num-iterations | --target-flops / (FLOPs per token x B) | ratio x N / B
# The ratio (default 12 tokens per scaling parameter) is the compute-optimal one: IsoFLOP sweeps
# over depth
# (runs/scaling_laws.sh, docs/scaling.md) put the loss minimum at a roughly constant tokens:params
# ratio when N
# counts the block matrices + lm_head, as Chinchilla found with its own counting
# (https://arxiv.org/abs/2203.15556;
# ~20 there); 10.5 from the first sweep, 12 after a re-run. A smaller ratio trains a bigger model
# for less time.
# 3. LR scale      every lr x sqrt(B / 2^19)
# (batch_lr_scale)
# 4. weight decay  --weight-decay x sqrt(B / 2^19) x N_d12 / N, cosine to 0 over the run
# (scaled_weight_decay)

reference_scaling_params = scaling_params(reference_model)
total_batch_size = args.total_batch_size
if total_batch_size == -1:
    total_batch_size = batch_size_for(num_scaling_params, reference_scaling_params)
grad_accum_steps = grad_accum_steps_for(total_batch_size, args.device_batch_size, args.max_seq_len, world_size)
tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len * world_size

if args.num_iterations > 0:
    num_iterations, horizon = args.num_iterations, "--num-iterations"
elif args.target_flops > 0:
    num_iterations, horizon = round(args.target_flops / (num_flops_per_token * total_batch_size)), "--target-flops"
elif args.target_param_data_ratio > 0:
    num_iterations = int(args.target_param_data_ratio * num_scaling_params) // total_batch_size
    horizon = "--target-param-data-ratio"
else:
    raise ValueError("no training horizon: set --num-iterations, --target-flops or --target-param-data-ratio")
if num_iterations < 1:
    raise ValueError(f"{horizon} gives {num_iterations} steps at {total_batch_size:,} "
                     f"tokens per step: raise it or lower the batch")
total_tokens = num_iterations * total_batch_size
lr_scale = batch_lr_scale(total_batch_size)
weight_decay_scaled = scaled_weight_decay(args.weight_decay, total_batch_size, num_scaling_params,
                                          reference_scaling_params)
print0(f"horizon ({horizon}): {num_iterations:,} steps x {total_batch_size:,} "
       f"tokens = {total_tokens:,} tokens ({total_tokens / num_scaling_params:.2f} "
       f"tokens per scaling param, {num_flops_per_token * total_tokens:e} FLOPs)")
print0(f"batch: {total_batch_size:,} tokens = {args.device_batch_size} rows x "
       f"{args.max_seq_len} x {world_size} GPUs x {grad_accum_steps} accumulation "
       f"steps | lr scale {lr_scale:.4f} | muon weight decay {weight_decay_scaled:.5f}")

# -----------------------------------------------------------------------------
# Resume: find the checkpoint and refuse one from a different configuration, before allocating
# anything

model_tag = args.model_tag or f"d{args.depth}"
checkpoint_dir = os.path.join(get_base_dir(), SOURCE_DIRS["base"], model_tag)
lock_checkpoint_dir(checkpoint_dir, model_tag)  # a second run writing this directory fails here, naming this one
check_fresh_start(checkpoint_dir, args.resume or args.resume_from_step >= 0, args.overwrite)
num_streams = world_size * grad_accum_steps
resume_step = args.resume_from_step if args.resume_from_step >= 0 else None
if resume_step is None and args.resume:
    resume_step = find_resume_step(checkpoint_dir, "from scratch")
derived = {  # what must match between a checkpoint and the run resuming it
    "model_config": dict(config.__dict__), "total_batch_size": total_batch_size, "num_iterations": num_iterations,
    "device_batch_size": args.device_batch_size, "max_seq_len": args.max_seq_len, "world_size": world_size,
    "dataset": dataset,
}
if resume_step is not None:
    model_state, optimizer_state, meta = load_checkpoint(checkpoint_dir, resume_step, device, load_optimizer=True,
                                                         rank=rank)
    check_resume_config(meta, derived, checkpoint_dir, resume_step)
    check_resume_flags(meta["user_config"], user_config, ["embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr",
                       "weight_decay", "warmup_steps", "warmdown_ratio", "final_lr_frac"], args.resume_override)
    if resume_step == num_iterations:  # e.g. runs/speedrun.sh run again after a later stage failed
        print0(f"{checkpoint_dir} is already trained to its last step {num_iterations}: nothing to do")
        raise SystemExit(0)
    print0(f"resuming from {checkpoint_dir} step {resume_step}")

# -----------------------------------------------------------------------------
# Build the model and optimizer

model.to_empty(device=device)
model.init_weights()
if resume_step is not None:
    model.load_state_dict(model_state, strict=True)
    del model_state
orig_model = model  # uncompiled: CORE, sampling and saving use it
if args.fp8:
    convert_to_float8_training(model, module_filter_fn=worth_fp8)
optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                  matrix_lr=args.matrix_lr, weight_decay=weight_decay_scaled, scalar_lr=args.scalar_lr,
                                  lr_scale=lr_scale)
if resume_step is not None:
    load_optimizer_state(optimizer, optimizer_state)  # the momenta; this run's LRs (checked above) rule
    del optimizer_state
if use_compile:
    model = compile_for_training(model)

def bf16_eval():
    """Evaluation and sampling run plain bf16 linears (sharing the fp8 layers' weights). Swapping modules under a
    compiled model would recompile it every time, so with --fp8 evaluation runs the uncompiled model."""
    return float8_disabled(orig_model) if args.fp8 else contextlib.nullcontext()
eval_model = orig_model if args.fp8 else model

# -----------------------------------------------------------------------------
# Schedules (plain functions of the step)

warmdown_iters = round(args.warmdown_ratio * num_iterations)
warmdown_start = num_iterations - warmdown_iters

def get_lr_multiplier(it):
    """Linear warmup, constant, then linear warmdown over
    the last warmdown_ratio of steps to final_lr_frac."""
    if it < args.warmup_steps:
        return (it + 1) / args.warmup_steps
    if it < warmdown_start:
        return 1.0
    progress = (num_iterations - it) / warmdown_iters
    return progress + (1 - progress) * args.final_lr_frac

def get_muon_momentum(it):
    """
    0.85 -> 0.97 over the first 400 steps; then during the LR warmdown 0.97 -> 0.90. The ramp comes
    first, as in karpathy/nanochat: a run shorter than 400 steps ramps to the end (200 steps: 0.85
    -> 0.91, no jump to 0.97 where the warmdown begins), and a longer one whose warmdown starts
    inside the ramp steps down to the warmdown line at 400.
    """
    if it < 400:
        return 0.85 + 0.12 * it / 400
    if warmdown_iters > 0 and it >= warmdown_start:
        return 0.97 - 0.07 * (it - warmdown_start) / warmdown_iters
    return 0.97

def get_weight_decay(it):
    """Cosine from weight_decay_scaled to 0 over the run."""
    return weight_decay_scaled * 0.5 * (1 + math.cos(math.pi * it / num_iterations))

# -----------------------------------------------------------------------------
# Data: one train stream per (rank, micro-step); val always from the start of the val shard

stream_states = [None] * grad_accum_steps  # state after the last batch each local stream TRAINED on
step, val_bpb, min_val_bpb, smooth_train_loss, total_training_time = 0, None, float("inf"), 0.0, 0.0
if resume_step is not None:
    stream_states, loop = restore_loop(meta, rank, grad_accum_steps)
    step, val_bpb = resume_step, meta["val_bpb"]
    min_val_bpb, smooth_train_loss = loop["min_val_bpb"], loop["smooth_train_loss"]
    total_training_time = loop["total_training_time"]
train_loaders = [pretrain_loader(tokenizer, args.device_batch_size, args.max_seq_len, "train",
                                 rank=rank * grad_accum_steps + a, world_size=num_streams, device=device,
                                 state=stream_states[a], dataset=dataset) for a in range(grad_accum_steps)]
batches = [next(loader) for loader in train_loaders]  # prefetched: the batches the next step trains on
def val_batches():
    """Fresh val streams from the start of the val shard, split
    like the train ones (the same val set on any GPUs)."""
    loaders = [pretrain_loader(tokenizer, args.device_batch_size, args.max_seq_len, "val", dataset=dataset,
                               device=device, rank=rank * grad_accum_steps + a, world_size=num_streams)
               for a in range(grad_accum_steps)]
    for i in itertools.count():
        yield next(loaders[i % grad_accum_steps])

eval_steps = args.eval_tokens // tokens_per_fwdbwd
if args.eval_every > 0 and eval_steps < 1:
    raise ValueError(f"--eval-tokens={args.eval_tokens} is less than one batch "
                     f"of {tokens_per_fwdbwd} tokens across GPUs; raise it")
if args.core_metric_every > 0:
    ensure_eval_bundle()  # now rather than after hours of training; raises with how to fetch it by hand
peak_flops = get_peak_flops(device)
start_step = step
metric_log = MetricLog("base", model_tag, resume_step)  # <base>/logs/base_<tag>.jsonl, one line per step
handle_stop_signals()  # from here on SIGTERM/SIGINT stop after the current step, with a checkpoint
stop_signal, periodic_due, last_save_time = 0, False, time.time()

# -----------------------------------------------------------------------------
# Training loop: runs num_iterations + 1 times; the last pass only evaluates and saves

while True:
    last_step = step == num_iterations
    stopping = stop_signal and not last_step  # the evaluations due now are skipped: the resumed run does them first
    record = {"step": step, "flops": num_flops_per_token * total_batch_size * step}

    if not stopping and args.eval_every > 0 and (last_step or step % args.eval_every == 0):
        model.eval()
        try:
            with bf16_eval():
                val_bpb = evaluate_bpb(eval_model, val_batches(), eval_steps, token_bytes)
        except ValueError as e:  # its one error: a val shard with no text (e.g. only empty documents) is bad data
            raise SystemExit(f"error: val bpb at step {step}: {e}") from None
        model.train()
        min_val_bpb = min(min_val_bpb, val_bpb)
        record["val_bpb"] = val_bpb
        print0(f"step {step:05d} | val bpb: {val_bpb:.6f}")
        wandb_run.log({"step": step, "total_training_flops": record["flops"], "val/bpb": val_bpb})

    if not stopping and args.core_metric_every > 0 and (last_step or (step > 0 and step % args.core_metric_every == 0)):
        orig_model.eval()
        with bf16_eval():
            core = evaluate_core(orig_model, tokenizer, device, max_per_task=args.core_metric_max_per_task,  # in the
                                 batch_tokens=args.device_batch_size * args.max_seq_len)  # memory of a micro-batch
        orig_model.train()
        record["core_metric"] = core["core_metric"]
        print0(f"step {step:05d} | CORE metric: {core['core_metric']:.4f}")
        wandb_run.log({"step": step, "core_metric": core["core_metric"], "centered_results": core["centered_results"]})

    sample_due = last_step or (step > 0 and step % args.sample_every == 0)
    if not stopping and master and args.sample_every > 0 and sample_due:
        orig_model.eval()
        engine = Engine(orig_model, tokenizer)
        with bf16_eval():
            for text in greedy_completions(engine, tokenizer):
                print0(text)
        orig_model.train()

    kept_save = last_step or (args.save_every > 0 and step % args.save_every == 0)
    if step > start_step and (kept_save or periodic_due or stopping):
        meta = {
            "step": step, "val_bpb": val_bpb, **derived, "user_config": user_config,
            "model_tag": model_tag, "window_sizes": orig_model.window_sizes, "grad_accum_steps": grad_accum_steps,
            "tokenizer_fingerprint": tokenizer.fingerprint(), "periodic": not kept_save,
            "num_scaling_params": num_scaling_params, "param_counts": param_counts,
            "flops_per_token": num_flops_per_token,
            "batch_lr_scale": lr_scale, "weight_decay_scaled": weight_decay_scaled, "warmdown_iters": warmdown_iters,
            "initial_lrs": {g["name"]: g["initial_lr"] for g in optimizer.param_groups},
            **loop_meta(stream_states, min_val_bpb=min_val_bpb, smooth_train_loss=smooth_train_loss,
                        total_training_time=total_training_time),
        }
        t_save = time.time()
        save_checkpoint(checkpoint_dir, step, orig_model.state_dict(), optimizer.state_dict(), meta, rank=rank)
        print0(f"saved checkpoint {checkpoint_dir} step {step} in {time.time() - t_save:.2f}s")
        prune_periodic(checkpoint_dir, args.keep_periodic)
        last_save_time = time.time()
    if stopping:
        exit_after_stop(stop_signal, "scripts.base_train", checkpoint_dir, step)

    if last_step:
        metric_log.log(record)
        break

    # ---- one optimizer step
    synchronize(device)
    t0 = time.time()
    loss_sum = torch.zeros((), device=device)
    for a in range(grad_accum_steps):
        inputs, targets, state = batches[a]
        loss = model(inputs, targets)
        loss_sum += loss.detach()
        (loss / grad_accum_steps).backward()
        stream_states[a] = state
        batches[a] = next(train_loaders[a])  # prefetch while the GPU works
    lrm = get_lr_multiplier(step)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = get_muon_momentum(step)
            group["weight_decay"] = get_weight_decay(step)
    optimizer.step()
    model.zero_grad(set_to_none=True)
    if is_dist():
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)  # gloo has no AVG
    train_loss = loss_sum.item() / (grad_accum_steps * world_size)
    synchronize(device)
    dt = time.time() - t0
    step += 1

    # ---- logging: debiased EMA of the loss, throughput, MFU, ETA
    smooth_train_loss = 0.9 * smooth_train_loss + 0.1 * train_loss
    debiased_loss = smooth_train_loss / (1 - 0.9 ** step)
    if step > 10:
        total_training_time += dt  # the first steps include compilation
    tok_per_sec = total_batch_size / dt
    mfu = 100 * num_flops_per_token * tok_per_sec / (peak_flops * world_size)
    epoch = min(s["epoch"] for _, _, s in batches)
    eta = f"{total_training_time / (step - 10) * (num_iterations - step) / 60:.1f}m" if step > 10 else "-"
    print0(f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.2f}%) "
           f"| loss: {debiased_loss:.6f} | lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | "
           f"tok/s: {tok_per_sec:,.0f} | mfu: {mfu:.2f} | epoch: {epoch} | total time: "
           f"{total_training_time / 60:.2f}m | eta: {eta}")
    metric_log.log({**record, "loss": train_loss, "smooth_loss": debiased_loss, "lrm": lrm, "dt": dt,
                    "tok_per_sec": tok_per_sec, "mfu": mfu, "epoch": epoch, "time": total_training_time})
    if step % 100 == 0:
        wandb_run.log({"step": step, "total_training_flops": num_flops_per_token * total_batch_size * step,
                       "total_training_time": total_training_time, "train/loss": debiased_loss, "train/lrm": lrm,
                       "train/dt": dt, "train/tok_per_sec": tok_per_sec, "train/mfu": mfu, "train/epoch": epoch})
    if step == start_step + 1 and use_compile:
        print0(f"first step took {dt:.1f}s, most of it torch.compile; later steps reuse the compiled graph")
    collect_garbage(step, start_step)
    stop_signal, periodic_due = stop_or_save_due(last_save_time, args.save_every_minutes)

# -----------------------------------------------------------------------------

if device_type == "cuda":
    print0(f"peak memory: {torch.cuda.max_memory_allocated() / 1024 ** 2:.0f} MiB")
print0(f"total training time: {total_training_time / 60:.2f}m | min val bpb: {min_val_bpb:.6f}")
get_report().log("Base model training", [user_config, {
    "Number of parameters": param_counts["total"], "Number of scaling parameters": num_scaling_params,
    "FLOPs per token": f"{num_flops_per_token:e}", "Iterations": num_iterations, "Training tokens": total_tokens,
    "Tokens : scaling params": total_tokens / num_scaling_params, "Total batch size": total_batch_size,
    "World size": world_size, "Muon weight decay": weight_decay_scaled, "Min val bpb": min_val_bpb,
    "Final val bpb": val_bpb, "Total training FLOPs": f"{num_flops_per_token * total_tokens:e}",
    "Total training time (min)": total_training_time / 60,
    "Peak memory (MiB)": torch.cuda.max_memory_allocated() / 1024 ** 2 if device_type == "cuda" else None}])
wandb_run.finish()
metric_log.close()
compute_cleanup()
