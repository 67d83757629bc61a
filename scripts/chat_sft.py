"""
Teach a pretrained model to chat. Mid-training and supervised fine-tuning are two runs of this one
loop:

    python -m scripts.mid_train                     # base -> mid: the large conversation mixture
    python -m scripts.chat_sft                      # mid -> sft: the small high-quality mixture
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --run=sft1
    python -m scripts.chat_sft --mixture=synthetic  # offline: tasks/synthetic.py
    python -m scripts.chat_sft --resume             # continue from the newest checkpoint, exactly

What differs between the stages is the table STAGES below (source checkpoint, LR, schedule) and
the data mixture (build_mixture); each writes its own checkpoints. Everything else is shared:
- Rows of T+1 tokens hold whole conversations (nanochat/dataloader.chat_loader; none is ever split
  across rows): mid-training packs several per row (best fit, largest first, BOS padding, causal
  attention across them), SFT puts one per row in the mixture's order, padded (--pack flips
  either). Only the assistant's tokens are trained (--train-user-tokens=1 trains the user's too, as
  karpathy/nanochat's mid-training did).
- The loss is the sum over the step's supervised tokens divided by their count across every
  micro-batch and rank, so each supervised token weighs the same and a micro-batch with no
  supervised token adds zero, where karpathy/nanochat's per-micro-batch mean turned into NaN.
- One epoch of the mixture, ending when every conversation of it has been trained once (or
  --num-iterations steps); the LR schedule is a function of the fraction of the run done (of the
  epoch trained, or of --num-iterations): constant, then a linear warmdown over the last
  --warmdown-ratio to 0. Muon weight decay 0.
- The recipes (STAGES) are karpathy/nanochat's separate mid-training and SFT stages: mid-training
  steps of 524,288 tokens, SFT steps of 32 conversations (its 4 rows x 8 GPUs; ~700 steps for an
  epoch of its ~23K-conversation mixture), each starting with fresh optimizer momenta.
- Sequence length and device batch size are inherited from the source checkpoint unless overridden
  (SFT takes one row per conversation of the step, at most the source's device batch); the start
  prints every setting with where it came from, the per-group lrs and the epoch's step count. The
  source model's window pattern is carried into the new checkpoint.
- Warm start (--load-optimizer=1): the source's optimizer momenta are loaded when it saved one shard
  per rank of this run; with another number of GPUs the run warns and starts the momenta fresh.
- Checkpoints hold the loader positions and the loop state, so --resume continues bit for bit.
Leaves out: the fp16 GradScaler path and fp8 (bf16 or fp32 only).
"""

import argparse
import itertools
import math
import os
import time

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import torch

from nanochat.attention import attention_banner
from nanochat.common import (check_flags, compute_init, compute_cleanup, print0, get_base_dir,
                             init_wandb, get_peak_flops, decide_compile, compile_for_training,
                             grad_accum_steps_for, collect_garbage, synchronize,
                             reduce_across_ranks)
from nanochat.checkpoint import (load_source, load_optimizer_shard, start_or_resume, load_resume,
                                 TrainingSaves, load_optimizer_state, loop_meta, restore_loop,
                                 SOURCE_DIRS, SOURCE_SCRIPTS, add_checkpoint_flags)
from nanochat.dataloader import chat_loader
from nanochat.engine import Engine
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report, MetricLog
from nanochat.tokenizer import get_token_bytes
from tasks.arc import ARC
from tasks.common import TaskMixture
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SpellingBee, SimpleSpelling
from tasks.synthetic import SyntheticIdentity, SyntheticMath, SyntheticSpelling, SyntheticMC
from scripts.chat_eval import ALL_TASKS, run_chat_eval, chatcore

# karpathy/nanochat's mid_train.py and chat_sft.py (the versions with a separate mid-training
# stage). lrs are the base optimizer's per-group values (AdamW ones then scale with width as in
# pretraining); neither stage multiplies them by pretraining's batch-size factor. momentum_ramp:
# Muon momentum 0.85 -> 0.95 over that many steps (0 = constant 0.95). examples_per_step:
# conversations per optimizer step (-1 = full rows, total_batch_size tokens, as mid-training). pack:
# 1 = several conversations per row (mid-training's packer), 0 = one per row, padded (SFT).
RECIPE_LRS = {"embedding_lr": 0.2, "unembedding_lr": 0.004, "matrix_lr": 0.02}
# the flags whose defaults the stage's recipe sets
RECIPE_FLAGS = (*RECIPE_LRS, "init_lr_frac", "warmdown_ratio", "momentum_ramp", "examples_per_step",
                "pack")
STAGES = {  # stage (= its output) -> source and recipe
    "mid": dict(source="base", init_lr_frac=1.0, warmdown_ratio=0.2, momentum_ramp=300, pack=1,
                **RECIPE_LRS, examples_per_step=-1, total_batch_size=2**19, title="Midtraining"),
    "sft": dict(source="mid", init_lr_frac=0.02, warmdown_ratio=1.0, momentum_ramp=0, pack=0,
                **RECIPE_LRS, examples_per_step=32, total_batch_size=2**19, title="Chat SFT"),
}

def stage_parser(description, sources):
    """The flags of every chat stage (mid, SFT, RL): where it starts and its learning rates (the
    caller sets their defaults). -> (parser, its add_argument)"""
    parser = argparse.ArgumentParser(description=description)
    add = parser.add_argument
    add("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    add("--device-type", default="", help="cuda|cpu|mps ('' = autodetect)")
    add("--source", choices=sources, help="checkpoint to start from")
    add("--model-tag", help="source (and output) model tag (default: the largest d<N>)")
    add("--model-step", type=int, help="source checkpoint step (default: the newest)")
    add("--embedding-lr", type=float, help="AdamW lr of wte (x width scaling)")
    add("--unembedding-lr", type=float, help="AdamW lr of lm_head (x width scaling)")
    add("--matrix-lr", type=float, help="Muon lr")
    add("--init-lr-frac", type=float, help="multiplies every learning rate")
    return parser, add

def identity_task():
    """The identity conversations: <base>/identity_conversations.jsonl
    if present (CustomJSON), else synthetic ones."""
    path = os.path.join(get_base_dir(), "identity_conversations.jsonl")
    found = os.path.exists(path)
    print0(f"identity conversations: {path if found else f'synthetic (no {path})'}")
    return CustomJSON(filepath=path) if found else SyntheticIdentity(split="train", size=1000)

def build_mixture(stage, mixture):
    """-> (train task, val task, names of the chat tasks to track during training)."""
    if mixture == "synthetic":
        # SFT sees fresh problems of the same skills
        size, seed = (4000, 0) if stage == "mid" else (1000, 1)
        skills = (SyntheticMath, SyntheticSpelling, SyntheticMC)
        train = TaskMixture([SyntheticIdentity(split="train", size=size // 2, seed=seed)] +
                            [cls(split="train", size=size, seed=seed) for cls in skills])
        val = TaskMixture([cls(split="test", size=100, seed=2) for cls in skills])
        return train, val, ["SynthIdentity", "SynthMath", "SynthSpelling", "SynthMC"]
    if stage == "mid":
        train = TaskMixture([SmolTalk(split="train"), MMLU("auxiliary_train", "train"),
                             GSM8K("main", "train"), identity_task(), identity_task(),
                             SimpleSpelling(size=200_000, split="train"),
                             SpellingBee(size=80_000, split="train")])
        val = TaskMixture([SmolTalk(split="test"), MMLU("all", "test", stop=5200),
                           GSM8K("main", "test", stop=420)])
    else:
        train = TaskMixture([ARC("ARC-Easy", "train"), ARC("ARC-Challenge", "train"),
                             GSM8K("main", "train"), SmolTalk(split="train", stop=10_000),
                             identity_task(), SimpleSpelling(size=300, split="train"),
                             SpellingBee(size=300, split="train")])
        val = SmolTalk(split="test")
    return train, val, ["ARC-Easy", "MMLU", "GSM8K"]

def mean_rendered_length(task, tokenizer, T, sample=1000):
    """Mean tokens per conversation as the packer renders them
    (cropped to T+1), over `sample` evenly spaced ones."""
    indices = range(0, len(task), max(1, len(task) // sample))
    lengths = [len(tokenizer.render_conversation(task[i], max_tokens=T + 1)[0]) for i in indices]
    return sum(lengths) / len(indices)

def count_supervised(micro_batch_targets):
    """Supervised tokens (target >= 0) in this step's
    micro-batches, summed over ranks: the loss denominator."""
    return reduce_across_ranks(sum((targets >= 0).sum() for targets in micro_batch_targets).float())

def token_weighted_loss(model, inputs, targets, num_supervised):
    """
    One micro-batch's share of the step loss: its summed token losses over the step's supervised
    count. Summed over micro-batches and ranks it is the mean over every supervised token of the
    step; a micro-batch without one adds exactly 0 (and a step without any trains nothing) instead
    of the NaN of a per-micro-batch mean.
    """
    token_losses = model(inputs, targets, loss_reduction="none")  # 0 where targets == -1
    return token_losses.sum() / num_supervised.clamp(min=1.0)

def main(stage):
    defaults = STAGES[stage]
    parser, add = stage_parser(f"{defaults['title']}: {defaults['source']} -> {stage}",
                               ["base", "mid", "sft"])
    add("--compile", type=int, default=-1, help="torch.compile the model: 1 on, 0 off, -1 = auto "
        "(CUDA, and CPU with a working C++ compiler; env NANOCHAT_COMPILE=0/1 overrides auto)")
    add("--mixture", default="real", choices=["real", "synthetic"], help="real = SmolTalk/MMLU/ARC/"
        "GSM8K/... (fetched on first use); synthetic = embedded offline tasks")
    add("--num-iterations", type=int, default=-1, help="steps (-1 = one epoch of the mixture)")
    add("--max-seq-len", type=int, help="row length T (default: the source's)")
    add("--device-batch-size", type=int, help="rows per forward/backward (default: the source's; "
        "SFT: enough rows for its conversations, at most the source's)")
    add("--total-batch-size", type=int, help=f"tokens per optimizer step (default: "
        f"{defaults['total_batch_size']:,}; with --examples-per-step > 0: the rows they need)")
    add("--examples-per-step", type=int, help="conversations per optimizer step, shared over GPUs "
        "and micro-steps (-1 = fill every row)")
    add("--warmdown-ratio", type=float, help="last fraction of the epoch: linear LR decay to 0")
    add("--momentum-ramp", type=int,
        help="steps of the Muon momentum ramp 0.85 -> 0.95 (0 = constant 0.95)")
    add("--pack", type=int, choices=[0, 1], help="1 = pack conversations into rows (best fit, "
        "largest first); 0 = one per row, padded, in order")
    parser.set_defaults(source=defaults["source"], **{k: defaults[k] for k in RECIPE_FLAGS})
    add("--load-optimizer", type=int, default=0, choices=[0, 1], help="1 = warm-start the "
        "optimizer momenta from the source checkpoint; 0 = fresh (karpathy/nanochat)")
    add("--train-user-tokens", type=int, default=0, help="1 = train user tokens too (as the "
        "karpathy/nanochat mid did)")
    add("--eval-every", type=int, default=150, help="val bpb every N steps, at step 0 and the end "
        "(-1 = never)")
    add("--eval-tokens", type=int, default=20 * 524288, help="tokens per val bpb evaluation")
    add("--chat-eval-every", type=int, default=-1, help="chat task accuracies every N steps and "
        "at the end (-1 = only at the end, 0 = never)")
    add("--chat-eval-max-problems", type=int, default=200, help="problems per task for those")
    # --resume, --resume-override, --overwrite, --save-every, --save-every-minutes, --keep-periodic
    add_checkpoint_flags(parser)
    args = parser.parse_args()
    user_config = vars(args).copy()
    inherited = {f"--{k.replace('_', '-')}": getattr(args, k)
                 for k in ("max_seq_len", "device_batch_size", "total_batch_size")}
    iters = args.num_iterations
    check_flags([(flag, v, v is None or v >= 1, ">= 1, or left out to inherit the source's")
                 for flag, v in inherited.items()]
                + [("--num-iterations", iters, iters >= 1 or iters == -1,
                    ">= 1, or -1 for one epoch of the mixture")])

    # -------------------------------------------------------------------------
    # Setup: the source model and what it inherits

    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    model, tokenizer, source_meta, model_tag, output_dir = load_source(args, device, stage)
    print0(attention_banner(device, model.window_sizes, model.config.sequence_len))
    source_step, source_name = source_meta["step"], f"{args.source} checkpoint"
    pretrain_config = source_meta.get("pretrain_config", source_meta["user_config"])  # base_train's
    recipe = f"{stage} recipe"
    source_rows = source_meta["device_batch_size"]
    # name -> (value, where it came from), printed below
    settings = {k: (user_config[k], "flag" if user_config[k] != defaults[k] else recipe)
                for k in RECIPE_FLAGS}

    def flag_or(name, default, origin):
        value = user_config[name]
        settings[name] = (value, "flag") if value is not None else (default, origin)
        return settings[name][0]

    T = flag_or("max_seq_len", source_meta["max_seq_len"], source_name)
    if T > model.config.sequence_len:
        raise ValueError(f"--max-seq-len={T} exceeds the model's context "
                         f"{model.config.sequence_len}")

    train_task, val_task, tracked_tasks = build_mixture(stage, args.mixture)
    # built once, evaluated at every chat eval
    eval_tasks = {name: ALL_TASKS[name][0]() for name in tracked_tasks if args.chat_eval_every != 0}
    mean_len = mean_rendered_length(train_task, tokenizer, T)
    print0(f"mixture ({args.mixture}): {len(train_task):,} training conversations "
           f"({mean_len:.0f} tokens on average), {len(val_task):,} validation")

    if args.examples_per_step > 0:
        # the rows each GPU needs for its share of the step's conversations: one each, or packed
        # (1.5x their mean length leaves room for the longer ones); rows left over are padding:
        # compute spent, nothing trained
        per_gpu = math.ceil(args.examples_per_step / world_size)
        rows = math.ceil(1.5 * per_gpu * mean_len / (T + 1)) if args.pack else per_gpu
        device_batch_size = flag_or("device_batch_size", min(rows, source_rows),
                                    f"{per_gpu} conversations per GPU, at most the {source_name}'s")
        micro_steps = math.ceil(rows / device_batch_size)
        total_batch_size = flag_or("total_batch_size",
                                   micro_steps * device_batch_size * T * world_size,
                                   f"{micro_steps} micro-batch(es) per GPU for {rows} rows")
    else:
        device_batch_size = flag_or("device_batch_size", source_rows, source_name)
        total_batch_size = flag_or("total_batch_size", defaults["total_batch_size"], recipe)
    grad_accum_steps = grad_accum_steps_for(total_batch_size, device_batch_size, T, world_size)
    num_streams = world_size * grad_accum_steps
    if 0 < args.examples_per_step < num_streams:
        raise ValueError(f"--examples-per-step={args.examples_per_step} is fewer than the "
                         f"{num_streams} data streams (GPUs x accumulation steps), so some would "
                         f"train nothing: raise it or use fewer GPUs / a larger "
                         f"--device-batch-size")
    per_stream = math.ceil(args.examples_per_step / num_streams)
    if not args.pack and per_stream > device_batch_size:
        rows_per_gpu = math.ceil(args.examples_per_step / (device_batch_size * world_size))
        raise ValueError(f"--examples-per-step={args.examples_per_step}, one conversation per row, "
                         f"needs {per_stream} rows per micro-batch, which has {device_batch_size}: "
                         f"raise --total-batch-size to "
                         f"{rows_per_gpu * device_batch_size * T * world_size} or pass --pack=1")

    def stream_cap(s):
        """Stream s (of rank s // accumulation steps) places its share of the step's
        conversations; the first take the rest."""
        quotient, remainder = divmod(args.examples_per_step, num_streams)
        return quotient + (s < remainder) if args.examples_per_step > 0 else None

    if args.num_iterations > 0:
        steps_line = f"{args.num_iterations} steps (--num-iterations)"
    elif args.examples_per_step > 0:
        steps_line = (f"one epoch = {math.ceil(len(train_task) / args.examples_per_step):,} "
                      f"steps of {args.examples_per_step} conversations")
    else:
        steps_line = (f"one epoch ~ {math.ceil(len(train_task) * mean_len / total_batch_size):,} "
                      f"steps at full rows (more as padding takes its share; the run ends when "
                      f"every conversation is trained)")
    print0(f"{defaults['title']}: {args.source} {model_tag} step {source_step} -> "
           f"{SOURCE_DIRS[stage]} | T {T} | batch {total_batch_size:,} tokens = "
           f"{device_batch_size} x {T} x {world_size} GPUs x {grad_accum_steps} | {steps_line}")
    print0("settings: " + " | ".join(f"{k} {v} ({origin})" for k, (v, origin) in settings.items()))

    derived = {"source": args.source, "source_step": source_step, "max_seq_len": T,
               "model_config": source_meta["model_config"], "device_batch_size": device_batch_size,
               "total_batch_size": total_batch_size, "world_size": world_size, "pack": args.pack,
               "mixture": args.mixture, "num_iterations": args.num_iterations,
               "examples_per_step": args.examples_per_step}
    # never replace another run's checkpoints silently; after the flag checks, so a bad flag gets
    # its own error
    resume_step = start_or_resume(output_dir, args.resume, args.overwrite,
                                  f"from the {args.source} model")

    optimizer = model.setup_optimizer(weight_decay=0.0, lr_frac=args.init_lr_frac,
                                      **{k: getattr(args, k) for k in RECIPE_LRS})
    initial_lrs = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}
    print0("initial lrs: " + " | ".join(f"{name} {lr:.6g}" for name, lr in initial_lrs.items()))
    step, val_bpb, stream_states = 0, None, [None] * grad_accum_steps
    loop = {"progress": 0.0, "min_val_bpb": float("inf"), "smooth_loss": 0.0, "total_time": 0.0}
    shards = source_meta.get("optim_shards", 0)
    if resume_step is not None:
        # the flags that change the trajectory, checked unless --resume-override (examples_per_step
        # and pack are in derived: they must match)
        model_state, optim_state, meta = load_resume(
            output_dir, resume_step, device, rank, derived, user_config,
            [*RECIPE_FLAGS, "train_user_tokens"], args.resume_override)
        model.load_state_dict(model_state, strict=True)
        load_optimizer_state(optimizer, optim_state)  # the momenta; this run's LRs (checked) rule
        stream_states, loop = restore_loop(meta, rank, grad_accum_steps)
        step, val_bpb = resume_step, meta["val_bpb"]
        print0(f"resuming from {output_dir} step {resume_step}")
    elif args.load_optimizer and shards == 0:
        raise ValueError(f"--load-optimizer=1 needs the source's optimizer state, but "
                         f"{args.source} {model_tag} step {source_step} saved none: pass "
                         f"--load-optimizer=0")
    elif args.load_optimizer and shards != world_size:
        # the state is sharded per rank (each rank owns a slice of every matrix group), so it
        # cannot be re-cut here
        print0(f"WARNING: --load-optimizer=1 but {args.source} {model_tag} step {source_step} "
               f"saved optimizer shards for {shards} rank(s) and this run has {world_size}: the "
               f"momenta start fresh (run with {shards} GPUs to warm-start them)")
    elif args.load_optimizer:
        # Warm start: the momenta of the source run help a little
        # (https://github.com/karpathy/nanochat/blob/master/dev/LOG.md, Feb 16); the fresh LRs stay.
        source_dir = os.path.join(get_base_dir(), SOURCE_DIRS[args.source], model_tag)
        load_optimizer_state(optimizer, load_optimizer_shard(source_dir, source_step, device, rank))
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]
            if group["kind"] == "muon":
                group["weight_decay"] = 0.0
    progress, min_val_bpb, smooth_loss, total_time = (
        loop[k] for k in ("progress", "min_val_bpb", "smooth_loss", "total_time"))
    orig_model = model
    use_compile, compile_reason = decide_compile(args.compile, device.type)
    print0(f"torch.compile: {compile_reason}")
    if use_compile:
        model = compile_for_training(model)  # rows of T+1: one shape

    # -------------------------------------------------------------------------
    # Data: one stream per (rank, micro-step), like base_train, so the data depends on the total
    # batch only

    def stream_loader(task, a, **kwargs):
        s = rank * grad_accum_steps + a
        return chat_loader(task, tokenizer, device_batch_size, T, s, num_streams, device,
                           pack=bool(args.pack), buffer_size=100 if args.pack else 1, **kwargs)
    # unpacked: in the mixture's order
    train_loaders = [stream_loader(train_task, a, state=stream_states[a],
                                   train_all_tokens=bool(args.train_user_tokens),
                                   num_epochs=1 if args.num_iterations <= 0 else None,
                                   max_per_batch=stream_cap(rank * grad_accum_steps + a))
                     for a in range(grad_accum_steps)]
    batches = [next(loader) for loader in train_loaders]
    token_bytes = get_token_bytes(device)
    eval_steps = max(1, args.eval_tokens // (device_batch_size * T * world_size))

    def val_batches():  # (inputs, targets) from the streams in turn
        loaders = [stream_loader(val_task, a) for a in range(grad_accum_steps)]
        return (next(loader)[:2] for loader in itertools.cycle(loaders))

    def epoch_progress():
        """
        Fraction of the epoch TRAINED by the slowest stream on any rank (same value on every rank):
        the states of the batches just trained, not of the prefetched ones, and conversations placed
        in rows, not pulled into the packer's buffer. A stream done with its share yields padding
        only (nothing trained twice) until all are done.
        """
        p = torch.tensor(min(state["progress"] for state in stream_states), dtype=torch.float64)
        return reduce_across_ranks(p, "MIN").item()

    def get_lr_multiplier(progress):
        if args.warmdown_ratio <= 0:
            return 1.0
        return max(0.0, min(1.0, (1.0 - progress) / args.warmdown_ratio))

    def get_muon_momentum(it):
        frac = min(it / args.momentum_ramp, 1.0) if args.momentum_ramp > 0 else 1.0
        return (1 - frac) * 0.85 + frac * 0.95

    wandb_run = init_wandb(f"nanochat-{stage}", args.run, user_config, rank == 0)
    engine = Engine(orig_model, tokenizer)
    peak_flops, flops_per_token = get_peak_flops(device), orig_model.estimate_flops()
    start_step, metrics = step, {}
    metric_log = MetricLog(stage, model_tag, resume_step)  # <base>/logs/<stage>_<tag>.jsonl
    saves = TrainingSaves(output_dir, SOURCE_SCRIPTS[stage], args, start_step)

    # -------------------------------------------------------------------------
    # Training loop

    while True:
        last_step = step >= args.num_iterations if args.num_iterations > 0 else progress >= 1.0
        record = {"step": step, "flops": flops_per_token * total_batch_size * step}

        stopping = saves.stopping(last_step)  # skip the evaluations due: the resumed run does them
        if not stopping and args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            model.eval()
            val_bpb = evaluate_bpb(model, val_batches(), eval_steps, token_bytes)
            model.train()
            min_val_bpb = min(min_val_bpb, val_bpb)
            record["val_bpb"] = val_bpb
            print0(f"step {step:05d} | val bpb: {val_bpb:.6f}")
            wandb_run.log({"step": step, "val/bpb": val_bpb})

        chat_eval_due = args.chat_eval_every > 0 and step > 0 and step % args.chat_eval_every == 0
        if not stopping and args.chat_eval_every != 0 and (last_step or chat_eval_due):
            orig_model.eval()
            metrics = {name: run_chat_eval(task, orig_model, tokenizer, engine, max_new_tokens=128,
                                           max_problems=args.chat_eval_max_problems)
                       for name, task in eval_tasks.items()}
            orig_model.train()
            # centered mean over the tracked tasks only: the full ChatCORE is chat_eval's
            tracked = "synthetic" if args.mixture == "synthetic" else "tracked"
            metrics[f"ChatCORE-{tracked}"] = chatcore(metrics)
            record.update(metrics)
            print0(f"step {step:05d} | " + " | ".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
            wandb_run.log({"step": step, **{f"chat/{k}": v for k, v in metrics.items()}})

        if saves.due(step, last_step):
            saves.save(step, orig_model, optimizer, {
                **derived, "val_bpb": val_bpb, "metrics": metrics, "user_config": user_config,
                "pretrain_config": pretrain_config, "model_tag": model_tag,
                "initial_lrs": initial_lrs, "tokenizer_fingerprint": tokenizer.fingerprint(),
                **loop_meta(stream_states, progress=progress, smooth_loss=smooth_loss,
                            min_val_bpb=min_val_bpb, total_time=total_time)})

        if last_step:
            metric_log.log(record)
            break

        # ---- one optimizer step: every supervised token of the step weighs the same
        t0 = time.time()
        num_supervised = count_supervised([targets for _, targets, _ in batches])
        loss_sum = torch.zeros((), device=device)
        for a in range(grad_accum_steps):
            inputs, targets, stream_states[a] = batches[a]  # the stream's state after this batch
            loss = token_weighted_loss(model, inputs, targets, num_supervised)
            loss_sum += loss.detach()
            (loss * world_size).backward()  # the optimizer averages gradients over ranks: undo it
            batches[a] = next(train_loaders[a])
        progress = epoch_progress()
        # with --num-iterations the schedule follows the steps: the run may end before the epoch
        # does or go past it
        lrm = get_lr_multiplier(step / args.num_iterations if args.num_iterations > 0 else progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = get_muon_momentum(step)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        train_loss = reduce_across_ranks(loss_sum).item()
        synchronize(device)
        dt = time.time() - t0
        step += 1
        if step > start_step + 1:
            total_time += dt
        supervised = int(num_supervised.item())
        if supervised > 0:  # a step with nothing to learn has no loss to average in
            smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
            record["loss"] = train_loss
        debiased = smooth_loss / (1 - 0.9 ** step)
        tok_per_sec = total_batch_size / dt
        mfu = 100 * flops_per_token * tok_per_sec / (peak_flops * world_size)
        print0(f"step {step:05d} ({100 * min(progress, 1.0):.1f}% of epoch) | loss: {debiased:.6f} "
               f"| lrm: {lrm:.3f} | supervised tokens: {supervised:,} | dt: "
               f"{dt * 1000:.0f}ms | tok/s: {tok_per_sec:,.0f} | mfu: {mfu:.2f}")
        metric_log.log({**record, "smooth_loss": debiased, "lrm": lrm, "dt": dt, "mfu": mfu,
                        "tok_per_sec": tok_per_sec, "progress": progress,
                        "supervised_tokens": supervised, "time": total_time})
        if step % 10 == 0:
            wandb_run.log({"step": step, "train/loss": debiased, "train/lrm": lrm, "train/dt": dt,
                           "train/mfu": mfu})
        if step == start_step + 1 and use_compile:
            print0(f"first step took {dt:.1f}s, most of it torch.compile; later steps reuse it")
        collect_garbage(step, start_step)
        saves.poll()

    # -------------------------------------------------------------------------
    print0(f"done: {step} steps, {total_time / 60:.2f}m, min val bpb {min_val_bpb:.6f}")
    get_report().log(defaults["title"], [user_config, {
        "Source": f"{args.source} {model_tag} step {source_step}", "Iterations": step,
        "Training conversations": len(train_task), "Tokens per step": total_batch_size,
        "Final train loss": smooth_loss / (1 - 0.9 ** max(step, 1)),
        "Min val bpb": min_val_bpb, "Training time (min)": total_time / 60}, metrics])
    wandb_run.finish()
    metric_log.close()
    compute_cleanup()

if __name__ == "__main__":
    main("sft")
