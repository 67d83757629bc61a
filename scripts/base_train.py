"""
Pretrain a base GPT. One dial, --depth, sets width, heads, horizon, batch size, learning rates and
weight decay.

    python -m scripts.base_train --depth=20               # one GPU (or CPU/MPS, slowly)
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=24 --fp8
    python -m scripts.base_train --depth=20 --resume      # from the newest complete checkpoint
    python -m scripts.base_train --depth=20 --overwrite   # delete its checkpoints, start over

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
from nanochat.common import (compute_init, compute_cleanup, print0, get_base_dir, get_peak_flops,
                             init_wandb, decide_compile, is_dist, check_flags, grad_accum_steps_for,
                             collect_garbage, synchronize, compile_for_training, COMPUTE_DTYPE)
from nanochat.gpt import GPT, config_for_depth
from nanochat.tokenizer import get_tokenizer, get_token_bytes
from nanochat.dataset import list_parquet_files, get_dataset_name
from nanochat.dataloader import pretrain_loader
from nanochat.checkpoint import (lock_checkpoint_dir, start_or_resume, load_resume, TrainingSaves,
                                 load_optimizer_state, loop_meta, restore_loop,
                                 add_checkpoint_flags, SOURCE_DIRS)
from nanochat.core_eval import ensure_eval_bundle, evaluate_core
from nanochat.engine import Engine, greedy_completions
from nanochat.fp8 import (check_fp8_supported, convert_to_float8_training, float8_disabled,
                          worth_fp8)
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import batch_size_for, batch_lr_scale, scaled_weight_decay
from nanochat.report import get_report, MetricLog

# -----------------------------------------------------------------------------
# CLI

parser = argparse.ArgumentParser(description="Pretrain a base model")
add = parser.add_argument
add("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
add("--device-type", default="", help="cuda|cpu|mps ('' = autodetect)")
add("--dataset", help="climbmix|fineweb-edu|local (default: env NANOCHAT_DATASET or climbmix)")
add("--compile", type=int, default=-1, help="torch.compile the model: 1 on, 0 off, -1 = auto "
    "(CUDA, and CPU with a working C++ compiler; env NANOCHAT_COMPILE=0/1 overrides auto)")
add("--fp8", action=argparse.BooleanOptionalAction, default=False,
    help="fp8 matmuls (tensorwise scaling) for the big linears (CUDA SM89+; --no-fp8 undoes --fp8)")
# model
add("--depth", type=int, default=20, help="number of layers: the one complexity dial")
add("--aspect-ratio", type=int, default=64, help="width = depth x this, up to whole heads")
add("--head-dim", type=int, default=128, help="attention head dimension")
add("--max-seq-len", type=int, default=2048, help="context length T")
add("--window-pattern", default="SSSL", help="per-layer attention windows, tiled: L = full "
    "context, S = T/4 rounded up to 128; last layer always L")
# horizon (first one set wins)
add("--num-iterations", type=int, default=-1, help="steps (-1 = from --target-flops or the ratio)")
add("--target-flops", type=float, default=-1.0, help="training FLOPs budget (-1 = use the ratio)")
add("--target-param-data-ratio", type=float, default=12, help="tokens per scaling param (-1 = no)")
# batch
add("--device-batch-size", type=int, default=32, help="rows per forward/backward per GPU")
add("--total-batch-size", type=int, default=-1, help="tokens per step (-1 = from depth, ~D^0.383)")
# optimizer
add("--embedding-lr", type=float, default=0.3, help="AdamW lr of the token embedding")
add("--unembedding-lr", type=float, default=0.008, help="AdamW lr of lm_head")
add("--matrix-lr", type=float, default=0.02, help="Muon lr of the transformer matrices")
add("--scalar-lr", type=float, default=0.5, help="AdamW lr of the per-layer scalars")
add("--weight-decay", type=float, default=0.28, help="Muon weight decay at d12, 2^19-token batches")
add("--warmup-steps", type=int, default=40, help="linear LR warmup steps")
add("--warmdown-ratio", type=float, default=0.65, help="last fraction of steps: linear LR warmdown")
add("--final-lr-frac", type=float, default=0.05, help="LR multiplier at the last step")
# evaluation and output
add("--eval-every", type=int, default=250, help="val bpb every N steps, at 0 and end (-1 = never)")
add("--eval-tokens", type=int, default=80 * 524288, help="tokens per val bpb evaluation")
add("--core-metric-every", type=int, default=2000, help="CORE every N steps and at end (-1 = no)")
add("--core-metric-max-per-task", type=int, default=500, help="examples per CORE task (-1 = all)")
add("--sample-every", type=int, default=2000, help="samples every N steps and at end (-1 = no)")
add("--model-tag", help="checkpoint directory name (default d<depth>)")
# --resume, --resume-override, --overwrite, --save-every, --save-every-minutes, --keep-periodic
add_checkpoint_flags(parser)
add("--resume-from-step", type=int, default=-1, help="resume from this checkpoint step (-1 = no)")
args = parser.parse_args()
user_config = vars(args).copy()
derive = lambda v: v > 0 or v == -1  # -1 is the one "derive it" sentinel: 0 or -5 is a typo
at_least_1, fraction = lambda v: v >= 1, lambda v: 0 <= v <= 1
check_flags([(f"--{k.replace('_', '-')}", getattr(args, k), ok(getattr(args, k)), requirement)
             for k, ok, requirement in [
    ("num_iterations", derive, ">= 1, or -1 to derive it from --target-flops or the ratio"),
    ("target_flops", derive, "> 0, or -1 to use the ratio"),
    ("target_param_data_ratio", derive, "> 0, or -1 to leave it unset"),
    ("total_batch_size", derive, ">= 1 tokens, or -1 to derive it from --depth"),
    ("device_batch_size", at_least_1, ">= 1 rows"),
    ("depth", at_least_1, ">= 1 layers"),
    ("head_dim", at_least_1, ">= 1"),
    ("max_seq_len", at_least_1, ">= 1 tokens"),
    ("aspect_ratio", at_least_1, ">= 1 (model_dim = depth x aspect ratio)"),
    ("warmup_steps", lambda v: v >= 0, ">= 0 steps"),
    *[(k, fraction, "a fraction in [0, 1]") for k in ("warmdown_ratio", "final_lr_frac")]]])

# -----------------------------------------------------------------------------
# Setup: device, tokenizer, data (fail here, with the command to run, not after building the model)

ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
master = rank == 0
dataset = get_dataset_name(args.dataset)
tokenizer = get_tokenizer()
token_bytes = get_token_bytes(device)
list_parquet_files("train", dataset=dataset)
list_parquet_files("val", dataset=dataset)
use_compile, compile_reason = decide_compile(args.compile, device.type)
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
             vocab_size=tokenizer.get_vocab_size(), window_pattern=args.window_pattern)
config = config_for_depth(args.depth, **shape)
with torch.device("meta"):
    model = GPT(config)  # raises naming the problem, e.g. an odd head dim or a bad window pattern
    reference_model = GPT(config_for_depth(12, **shape))  # where the LRs and weight decay were set
param_counts = model.num_scaling_params()
num_scaling_params = scaling_params(model)
# counted before any fp8 swap (karpathy/nanochat undercounted after)
num_flops_per_token = model.estimate_flops()
print0(f"depth {args.depth}: width {config.n_embd}, {config.n_head} heads of {args.head_dim}, "
       f"windows {model.window_sizes}, vocab {config.vocab_size}")
print0("parameters: " + ", ".join(f"{k} {v:,}" for k, v in param_counts.items())
       + f" | scaling {num_scaling_params:,}")
print0(f"FLOPs per token: {num_flops_per_token:e}")
print0(attention_banner(device, model.window_sizes, config.sequence_len))

# -----------------------------------------------------------------------------
# Derivation. N = scaling params; the LRs and weight decay were tuned at d12 (N_d12) with 2^19-token
# batches.
# 1. batch         B = 2^round(log2(2^19 x (N / N_d12)^0.383))  Power Lines, B_opt ~ D^0.383
#                  (batch_size_for)
# 2. horizon       steps = --num-iterations | --target-flops / (FLOPs per token x B) | ratio x N / B
#    The ratio (default 12 tokens per scaling parameter) is the compute-optimal one: IsoFLOP sweeps
#    over depth (runs/scaling_laws.sh, docs/scaling.md) put the loss minimum at a roughly constant
#    tokens:params ratio when N counts the block matrices + lm_head, as Chinchilla found with its
#    own counting (https://arxiv.org/abs/2203.15556; ~20 there). A smaller ratio trains a bigger
#    model for less time.
# 3. LR scale      every lr x sqrt(B / 2^19) (batch_lr_scale)
# 4. weight decay  --weight-decay x sqrt(B / 2^19) x N_d12 / N, cosine to 0 over the run
#                  (scaled_weight_decay)

reference_scaling_params = scaling_params(reference_model)
total_batch_size = (args.total_batch_size if args.total_batch_size > 0 else
                    batch_size_for(num_scaling_params, reference_scaling_params))
grad_accum_steps = grad_accum_steps_for(total_batch_size, args.device_batch_size, args.max_seq_len,
                                        world_size)
tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len * world_size

if args.num_iterations > 0:
    num_iterations, horizon = args.num_iterations, "--num-iterations"
elif args.target_flops > 0:
    num_iterations = round(args.target_flops / (num_flops_per_token * total_batch_size))
    horizon = "--target-flops"
elif args.target_param_data_ratio > 0:
    num_iterations = int(args.target_param_data_ratio * num_scaling_params) // total_batch_size
    horizon = "--target-param-data-ratio"
else:
    raise ValueError("no training horizon: set --num-iterations, --target-flops or "
                     "--target-param-data-ratio")
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
lock_checkpoint_dir(checkpoint_dir, model_tag)  # a second run on it fails here, naming this one
resume_step = start_or_resume(checkpoint_dir, args.resume, args.overwrite, "from scratch",
                              args.resume_from_step if args.resume_from_step >= 0 else None)
derived = {  # what must match between a checkpoint and the run resuming it
    "model_config": dict(config.__dict__), "total_batch_size": total_batch_size,
    "num_iterations": num_iterations, "device_batch_size": args.device_batch_size,
    "max_seq_len": args.max_seq_len, "world_size": world_size, "dataset": dataset}
if resume_step is not None:
    trajectory = ["embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "weight_decay",
                  "warmup_steps", "warmdown_ratio", "final_lr_frac"]
    model_state, optimizer_state, meta = load_resume(checkpoint_dir, resume_step, device, rank,
                                                     derived, user_config, trajectory,
                                                     args.resume_override)
    if resume_step == num_iterations:  # e.g. runs/speedrun.sh run again after a later stage failed
        print0(f"{checkpoint_dir} is already trained to its last step {num_iterations}: "
               f"nothing to do")
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
optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr, matrix_lr=args.matrix_lr,
                                  embedding_lr=args.embedding_lr, scalar_lr=args.scalar_lr,
                                  weight_decay=weight_decay_scaled, lr_scale=lr_scale)
if resume_step is not None:
    load_optimizer_state(optimizer, optimizer_state)  # the momenta; this run's LRs (checked) rule
    del optimizer_state
if use_compile:
    model = compile_for_training(model)

@contextlib.contextmanager
def evaluating(m):
    """m in eval mode, then back to training; yields the model to evaluate. Evaluation and sampling
    run plain bf16 linears (sharing the fp8 layers' weights). Swapping modules under a compiled
    model would recompile it every time, so with --fp8 evaluation runs the uncompiled model."""
    m.eval()
    with float8_disabled(orig_model) if args.fp8 else contextlib.nullcontext():
        yield orig_model if args.fp8 else m
    m.train()

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

def stream_loader(split, a, **kwargs):
    """The loader of local stream a (the streams of rank r follow those of rank r-1)."""
    return pretrain_loader(tokenizer, args.device_batch_size, args.max_seq_len, split,
                           rank * grad_accum_steps + a, world_size * grad_accum_steps, device,
                           dataset=dataset, **kwargs)
train_loaders = [stream_loader("train", a, state=stream_states[a]) for a in range(grad_accum_steps)]
batches = [next(loader) for loader in train_loaders]  # prefetched: what the next step trains on

def val_batches():
    """Fresh val streams from the start of the val shard, split
    like the train ones (the same val set on any GPUs)."""
    loaders = [stream_loader("val", a) for a in range(grad_accum_steps)]
    return (next(loader) for loader in itertools.cycle(loaders))

eval_steps = args.eval_tokens // tokens_per_fwdbwd
if args.eval_every > 0 and eval_steps < 1:
    raise ValueError(f"--eval-tokens={args.eval_tokens} is less than one batch "
                     f"of {tokens_per_fwdbwd} tokens across GPUs; raise it")
if args.core_metric_every > 0:
    ensure_eval_bundle()  # now rather than after hours of training; raises with how to fetch it
peak_flops = get_peak_flops(device)
start_step = step
metric_log = MetricLog("base", model_tag, resume_step)  # <base>/logs/base_<tag>.jsonl
saves = TrainingSaves(checkpoint_dir, "scripts.base_train", args, start_step)

def due(every, last_step):
    """An evaluation every `every` steps (-1 = never) and at the last step."""
    return every > 0 and (last_step or (step > 0 and step % every == 0))

# -----------------------------------------------------------------------------
# Training loop: runs num_iterations + 1 times; the last pass only evaluates and saves

while True:
    last_step = step == num_iterations
    stopping = saves.stopping(last_step)  # skip the evaluations due: the resumed run does them
    flops = num_flops_per_token * total_batch_size * step
    record = {"step": step, "flops": flops}

    if not stopping and args.eval_every > 0 and (last_step or step % args.eval_every == 0):
        try:
            with evaluating(model) as eval_model:
                val_bpb = evaluate_bpb(eval_model, val_batches(), eval_steps, token_bytes)
        except ValueError as e:  # its one error: a val shard with no text (only empty documents)
            raise SystemExit(f"error: val bpb at step {step}: {e}") from None
        min_val_bpb = min(min_val_bpb, val_bpb)
        record["val_bpb"] = val_bpb
        print0(f"step {step:05d} | val bpb: {val_bpb:.6f}")
        wandb_run.log({"step": step, "total_training_flops": flops, "val/bpb": val_bpb})

    if not stopping and due(args.core_metric_every, last_step):
        with evaluating(orig_model):  # in the memory of a micro-batch
            core = evaluate_core(orig_model, tokenizer, device, args.core_metric_max_per_task,
                                 batch_tokens=args.device_batch_size * args.max_seq_len)
        record["core_metric"] = core["core_metric"]
        print0(f"step {step:05d} | CORE metric: {core['core_metric']:.4f}")
        wandb_run.log({"step": step, "core_metric": core["core_metric"],
                       "centered_results": core["centered_results"]})

    if not stopping and master and due(args.sample_every, last_step):
        with evaluating(orig_model):
            for text in greedy_completions(Engine(orig_model, tokenizer), tokenizer):
                print0(text)

    if saves.due(step, last_step):
        saves.save(step, orig_model, optimizer, {
            "val_bpb": val_bpb, **derived, "user_config": user_config, "model_tag": model_tag,
            "window_sizes": orig_model.window_sizes, "grad_accum_steps": grad_accum_steps,
            "tokenizer_fingerprint": tokenizer.fingerprint(), "param_counts": param_counts,
            "num_scaling_params": num_scaling_params, "flops_per_token": num_flops_per_token,
            "batch_lr_scale": lr_scale, "weight_decay_scaled": weight_decay_scaled,
            "warmdown_iters": warmdown_iters,
            "initial_lrs": {g["name"]: g["initial_lr"] for g in optimizer.param_groups},
            **loop_meta(stream_states, min_val_bpb=min_val_bpb, smooth_train_loss=smooth_train_loss,
                        total_training_time=total_training_time)})

    if last_step:
        metric_log.log(record)
        break

    # ---- one optimizer step
    synchronize(device)
    t0 = time.time()
    loss_sum = torch.zeros((), device=device)
    for a in range(grad_accum_steps):
        inputs, targets, stream_states[a] = batches[a]  # saved after this step: it trains on them
        loss = model(inputs, targets)
        loss_sum += loss.detach()
        (loss / grad_accum_steps).backward()
        batches[a] = next(train_loaders[a])  # prefetch while the GPU works
    lrm = get_lr_multiplier(step)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group.update(momentum=get_muon_momentum(step), weight_decay=get_weight_decay(step))
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
    eta = "-"
    if step > 10:  # the first steps include compilation
        total_training_time += dt
        eta = f"{total_training_time / (step - 10) * (num_iterations - step) / 60:.1f}m"
    tok_per_sec = total_batch_size / dt
    mfu = 100 * num_flops_per_token * tok_per_sec / (peak_flops * world_size)
    epoch = min(s["epoch"] for _, _, s in batches)
    print0(f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.2f}%) "
           f"| loss: {debiased_loss:.6f} | lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | "
           f"tok/s: {tok_per_sec:,.0f} | mfu: {mfu:.2f} | epoch: {epoch} | total time: "
           f"{total_training_time / 60:.2f}m | eta: {eta}")
    stats = {"lrm": lrm, "dt": dt, "tok_per_sec": tok_per_sec, "mfu": mfu, "epoch": epoch}
    metric_log.log({**record, "loss": train_loss, "smooth_loss": debiased_loss, **stats,
                    "time": total_training_time})
    if step % 100 == 0:
        wandb_run.log({"step": step, "total_training_flops": flops + num_flops_per_token *
                       total_batch_size, "total_training_time": total_training_time,
                       "train/loss": debiased_loss, **{f"train/{k}": v for k, v in stats.items()}})
    if step == start_step + 1 and use_compile:
        print0(f"first step took {dt:.1f}s, most of it torch.compile; later steps reuse the graph")
    collect_garbage(step, start_step)
    saves.poll()

# -----------------------------------------------------------------------------

peak_memory = torch.cuda.max_memory_allocated() / 1024 ** 2 if device.type == "cuda" else None
if peak_memory is not None:
    print0(f"peak memory: {peak_memory:.0f} MiB")
print0(f"total training time: {total_training_time / 60:.2f}m | min val bpb: {min_val_bpb:.6f}")
get_report().log("Base model training", [user_config, {
    "Number of parameters": param_counts["total"],
    "Number of scaling parameters": num_scaling_params,
    "FLOPs per token": f"{num_flops_per_token:e}", "Iterations": num_iterations,
    "Training tokens": total_tokens, "Tokens : scaling params": total_tokens / num_scaling_params,
    "Total batch size": total_batch_size, "World size": world_size,
    "Muon weight decay": weight_decay_scaled, "Min val bpb": min_val_bpb, "Final val bpb": val_bpb,
    "Total training FLOPs": f"{num_flops_per_token * total_tokens:e}",
    "Total training time (min)": total_training_time / 60, "Peak memory (MiB)": peak_memory}])
wandb_run.finish()
metric_log.close()
compute_cleanup()
