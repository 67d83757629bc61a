"""
Reinforcement learning on problems with a checkable answer: GSM8K, or the offline synthetic
arithmetic task.

    python -m scripts.chat_rl                 # GSM8K (fetched on first use), from the sft model
    python -m scripts.chat_rl --task=synthetic-math --num-iterations=30  # offline: word problems
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --run=rl1
    python -m scripts.chat_rl --resume        # continue from the newest checkpoint, exactly

The algorithm is on-policy REINFORCE with a group-mean baseline (a simplified "GRPO"):
- Each step takes --examples-per-step questions (spread over ranks) and samples --num-samples
  completions of each through the Engine (passes of --device-batch-size), so calculator calls run
  and their results are forced in.
- reward = task.reward(question, completion) (1.0 when the "#### N" answer is right); the advantage
  of a sample is its reward minus the mean reward of its question's samples (no division by the
  std). A question whose samples all score the same teaches nothing and contributes exactly zero
  gradient (its passes are skipped).
- loss of a pass = -sum(logp(token) * advantage) over its trained tokens / (trained tokens in the
  pass x passes per question x questions per rank): token-level normalisation (DAPO,
  arXiv:2503.14476) within a question. Trained tokens are the ones the model sampled; the prompt,
  the forced calculator output, the padding and (unless --train-stop-token=1) the sampled stop
  token are not (mask 0). Training the stop token too changed no pass@1..4 on the CPU demo's RL
  stage (d2, 15 seeds: paired pass@1 difference -0.001 +- 0.024), so the default is
  karpathy/nanochat's.
- No KL penalty, no reference model, no PPO ratio or clipping: one optimizer step per batch of
  fresh samples. LR decays linearly to 0 over the run.
- pass@k (k = 1..--num-samples-eval) on held-out test problems at step 0, every --eval-every steps
  and at the end.
- Checkpoints hold the optimizer shards and the loop state. Sampling seeds are a function of (step,
  question, pass), so the loop state is also the sampling RNG state and --resume continues bit for
  bit.
Leaves out: importance ratios for off-policy reuse, KL to a reference model, fp16 GradScaler,
torch.compile (sequence lengths vary from step to step).
"""

import os
import time
import zlib

# as every training script: sampled and trained sequence lengths vary from step to step, which
# fragments CUDA's fixed-size segments (importing scripts.chat_sft below sets it too)
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import torch

from nanochat.attention import attention_banner
from nanochat.common import (check_flags, compute_init, compute_cleanup, print0, init_wandb,
                             synchronize, rank_and_world, reduce_across_ranks, gather_across_ranks)
from nanochat.checkpoint import (load_source, start_or_resume, load_resume, TrainingSaves,
                                 load_optimizer_state, SOURCE_DIRS)
from nanochat.engine import Engine
from nanochat.report import get_report, MetricLog
from tasks.gsm8k import GSM8K
from tasks.synthetic import SyntheticMath
from scripts.chat_sft import RECIPE_LRS, stage_parser

def rl_tasks(name):
    """-> (train task, held-out test task) for --task."""
    if name == "gsm8k":
        return GSM8K(subset="main", split="train"), GSM8K(subset="main", split="test")
    # seed 3: problems neither mid-training (0) nor SFT (1) saw; the test split is chat_eval's
    return SyntheticMath(split="train", size=8000, seed=3), SyntheticMath(split="test", size=200)

# -----------------------------------------------------------------------------
# Sampling, batching and the loss: the pieces the tests check one by one

def sample_seed(*key):
    """A stable 31-bit seed for a key like ("train", step,
    example, pass) (crc32: hash() is salted per process)."""
    return zlib.crc32("/".join(map(str, key)).encode()) & 0x7FFFFFFF

def sample_completions(engine, prompt, num_samples, device_batch_size, seeds,
                       train_stop_token=False, **sampling):
    """
    -> passes: per pass of up to device_batch_size samples (seeded seeds[p]), a list of (tokens,
    mask) completions. A completion ends with the stop token the model sampled unless it ran out of
    tokens; mask 0 marks calculator output the Engine forced in, and the stop token unless
    train_stop_token (karpathy/nanochat's RL never trains it). sampling: max_tokens, temperature,
    top_k.
    """
    passes = []
    for p, start in enumerate(range(0, num_samples, device_batch_size)):
        n = min(device_batch_size, num_samples - start)
        rows, done = [([], []) for _ in range(n)], [False] * n
        generated = engine.generate(prompt, num_samples=n, seed=seeds[p], **sampling)
        for token_column, mask_column in generated:
            for i, (token, mask) in enumerate(zip(token_column, mask_column)):
                if not done[i]:
                    done[i] = token in engine.stop_tokens
                    rows[i][0].append(token)
                    rows[i][1].append(mask if train_stop_token or not done[i] else 0)
        passes.append(rows)
    return passes

def completion_text(engine, tokens):
    """The decoded answer without its stop token (what the task grades)."""
    stopped = tokens and tokens[-1] in engine.stop_tokens
    return engine.tokenizer.decode(tokens[:-1] if stopped else tokens)

def make_batch(prompt, completions, pad_id, device="cpu"):
    """One pass as a training batch: rows prompt + completion, right-padded with pad_id. -> inputs
    (B, L-1), targets (B, L-1) with -1 wherever the target token is prompt, forced output or
    padding."""
    rows = [prompt + tokens for tokens, _ in completions]
    masks = [[0] * len(prompt) + mask for _, mask in completions]
    length = max(len(row) for row in rows)
    ids = torch.tensor([row + [pad_id] * (length - len(row)) for row in rows], device=device)
    mask = torch.tensor([m + [0] * (length - len(m)) for m in masks], device=device).bool()
    return ids[:, :-1], ids[:, 1:].masked_fill(~mask[:, 1:], -1)

def group_advantages(rewards):
    """reward - mean reward of the question's samples (the baseline); no division by the std."""
    rewards = torch.tensor(rewards, dtype=torch.float32)
    return rewards - rewards.mean()

def pass_loss(model, inputs, targets, advantages, normalizer):
    """-sum(logp * advantage) over the pass's trained tokens
    / (their count x normalizer); logp = -cross-entropy."""
    logp = -model(inputs, targets, loss_reduction="none")  # (B, T), 0 where targets == -1
    num_trained = (targets >= 0).sum().clamp(min=1)
    return -(logp * advantages.to(logp.device)[:, None]).sum() / (num_trained * normalizer)

def policy_gradient_backward(model, groups, pad_id):
    """
    Accumulate the step's gradients. groups: per question (prompt, passes, advantages of all its
    samples in pass order). Normalizer = passes per question x questions: every question weighs the
    same. -> summed loss (float). Questions with all-zero advantages would add exactly zero and are
    skipped; parameters left without a gradient get zeros, so every rank enters the optimizer's
    collectives with the same tensors.
    """
    device, total = model.get_device(), 0.0
    for prompt, passes, advantages in groups:
        if not advantages.any():
            continue
        for completions, pass_advantages in zip(passes, advantages.split([len(c) for c in passes])):
            inputs, targets = make_batch(prompt, completions, pad_id, device)
            loss = pass_loss(model, inputs, targets, pass_advantages, len(passes) * len(groups))
            loss.backward()
            total += loss.item()
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return total

@torch.no_grad()
def evaluate_pass_at_k(engine, task, num_problems, num_samples, device_batch_size, **sampling):
    """
    -> ({k: fraction of problems solved by one of the first k samples}, problems) over all ranks.
    Problem i runs on rank i % world with seeds from i only, so the numbers do not depend on the
    number of ranks or the step. A prompt with no room left in the context counts as failed.
    """
    rank, world = rank_and_world()
    # problems solved within k samples, k = 1..num_samples, then the total
    counts = torch.zeros(num_samples + 1, dtype=torch.long, device=engine.model.get_device())
    for i in range(rank, num_problems, world):
        conversation = task[i]
        prompt = engine.tokenizer.render_for_completion(conversation)
        budget = min(sampling["max_tokens"], engine.model.config.sequence_len - len(prompt))
        counts[num_samples] += 1
        if budget < 1:
            continue
        seeds = [sample_seed("eval", i, p) for p in range(num_samples)]
        passes = sample_completions(engine, prompt, num_samples, device_batch_size, seeds,
                                    **{**sampling, "max_tokens": budget})
        outcomes = [task.evaluate(conversation, completion_text(engine, tokens))
                    for completions in passes for tokens, _ in completions]
        if any(outcomes):
            counts[outcomes.index(True):num_samples] += 1
    total = int(reduce_across_ranks(counts)[num_samples])
    return {k: counts[k - 1].item() / max(total, 1) for k in range(1, num_samples + 1)}, total

# -----------------------------------------------------------------------------

def main():
    parser, add = stage_parser("RL (REINFORCE, group-mean baseline) on GSM8K or synthetic "
                               "arithmetic", ["mid", "sft"])
    parser.set_defaults(source="sft", **RECIPE_LRS, init_lr_frac=0.05)  # mid's LRs x 0.05
    add("--task", default="gsm8k", choices=["gsm8k", "synthetic-math"], help="gsm8k = GSM8K main "
        "(fetched on first use); synthetic-math = embedded word problems, offline")
    add("--num-epochs", type=int, default=1, help="passes over the training questions")
    add("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = --num-epochs epochs)")
    add("--device-batch-size", type=int, default=8, help="samples per generation / forward pass")
    add("--examples-per-step", type=int, default=16, help="questions per optimizer step, all ranks")
    add("--num-samples", type=int, default=16, help="completions sampled per question")
    add("--max-new-tokens", type=int, default=256, help="generation budget per completion")
    add("--temperature", type=float, default=1.0, help="sampling temperature (train and eval)")
    add("--top-k", type=int, default=50, help="sample from the k most likely tokens")
    add("--weight-decay", type=float, default=0.0, help="Muon weight decay")
    add("--train-stop-token", type=int, default=0, choices=[0, 1], help="1 = also train the "
        "sampled <|assistant_end|> (when to stop is an action too); 0 = only the answer's "
        "tokens, as karpathy/nanochat")
    add("--eval-every", type=int, default=60, help="pass@k every N steps, at 0 and the end (-1 = "
        "only those)")
    add("--eval-examples", type=int, default=400, help="held-out test problems per evaluation")
    add("--num-samples-eval", type=int, default=8, help="samples per test problem: pass@1..pass@N")
    add("--save-every", type=int, default=60, help="checkpoint every N steps (-1 = at the end)")
    add("--resume", action="store_true", help="resume from the newest complete checkpoint")
    add("--overwrite", action="store_true", help="delete this run's checkpoints, start afresh")
    args = parser.parse_args()
    user_config = vars(args).copy()
    check_flags([(f"--{k.replace('_', '-')}", getattr(args, k), getattr(args, k) >= 1, ">= 1")
                 for k in ("device_batch_size", "examples_per_step", "num_samples",
                           "num_samples_eval", "max_new_tokens")])

    # -------------------------------------------------------------------------
    # Setup

    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    if args.examples_per_step % world_size != 0:
        raise ValueError(f"--examples-per-step={args.examples_per_step} does not split over "
                         f"{world_size} ranks: use a multiple of {world_size}")
    examples_per_rank = args.examples_per_step // world_size
    model, tokenizer, source_meta, model_tag, output_dir = load_source(args, device, "rl")
    print0(attention_banner(device, model.window_sizes, model.config.sequence_len))
    # never replace another run's checkpoints silently
    resume_step = start_or_resume(output_dir, args.resume, args.overwrite,
                                  f"from the {args.source} model")
    engine = Engine(model, tokenizer)
    pad_id = tokenizer.encode_special("<|assistant_end|>")  # padding is never trained (mask 0)
    train_task, test_task = rl_tasks(args.task)
    epoch_steps = len(train_task) // args.examples_per_step
    num_steps = args.num_iterations if args.num_iterations > 0 else epoch_steps * args.num_epochs
    if num_steps < 1:
        raise ValueError(f"{len(train_task)} training questions make no step of "
                         f"{args.examples_per_step}: lower --examples-per-step or set "
                         f"--num-iterations")
    eval_problems = min(args.eval_examples, len(test_task))
    sampling = dict(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
    passes_per_question = -(-args.num_samples // args.device_batch_size)
    print0(f"Chat RL: {args.source} {model_tag} step {source_meta['step']} -> {SOURCE_DIRS['rl']} "
           f"| task {args.task}: {len(train_task):,} train, {eval_problems} test problems | "
           f"{num_steps} steps x {args.examples_per_step} questions ({examples_per_rank}/rank) x "
           f"{args.num_samples} samples in {passes_per_question} passes")

    # what a resumed run must match, the LRs included
    same = ["task", "device_batch_size", "examples_per_step", "num_samples", "max_new_tokens",
            "temperature", "top_k", "embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay",
            "init_lr_frac", "train_stop_token"]
    derived = {"source": args.source, "source_step": source_meta["step"], "world_size": world_size,
               "model_config": source_meta["model_config"], "num_steps": num_steps,
               **{k: user_config[k] for k in same}}
    optimizer = model.setup_optimizer(weight_decay=args.weight_decay, lr_frac=args.init_lr_frac,
                                      **{k: getattr(args, k) for k in RECIPE_LRS})
    step, history, times = 0, {}, {"sample": 0.0, "train": 0.0}
    if resume_step is not None:  # the LRs are in derived: no override here
        model_state, optim_state, meta = load_resume(output_dir, resume_step, device, rank, derived,
                                                     user_config)
        model.load_state_dict(model_state, strict=True)
        load_optimizer_state(optimizer, optim_state)
        step, times = resume_step, meta["loop_state"]["times"]
        history = {int(s): {int(k): v for k, v in m.items()}
                   for s, m in meta["loop_state"]["history"].items()}
        print0(f"resuming from {output_dir} step {resume_step}")
    wandb_run = init_wandb("nanochat-rl", args.run, user_config, rank == 0)
    metric_log = MetricLog("rl", model_tag, resume_step)  # <base>/logs/rl_<tag>.jsonl
    saves = TrainingSaves(output_dir, "scripts.chat_rl", args, step)

    # -------------------------------------------------------------------------
    # Training loop

    while True:
        last_step = step == num_steps
        # the model after `step` updates: its pass@k, and the samples update step+1 trains on
        record = {"step": step}
        if step == 0 or last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            history[step], problems = evaluate_pass_at_k(
                engine, test_task, eval_problems, args.num_samples_eval, args.device_batch_size,
                **sampling)
            metrics = {f"pass@{k}": v for k, v in history[step].items()}
            record.update(metrics)
            print0(f"step {step:05d} | {problems} test problems | "
                   + " | ".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
            wandb_run.log({"step": step, **metrics})

        if saves.due(step, last_step):
            saves.save(step, model, optimizer, {
                **derived, "user_config": user_config, "model_tag": model_tag,
                "tokenizer_fingerprint": tokenizer.fingerprint(),
                "pretrain_config": source_meta.get("pretrain_config",
                                                   source_meta.get("user_config")),
                "metrics": {f"pass@{k}": v for k, v in history[max(history)].items()},
                # the sampling seeds derive from the step: this is also the sampling RNG state
                "loop_state": {"history": history, "times": times}})

        if last_step:
            metric_log.log(record)
            break

        # ---- sample: question (step * E + j) for j = rank, rank + world, ... so ranks split the
        # same E questions
        t0 = time.time()
        groups, rewards, lengths, digests = [], [], [], []
        for j in range(rank, args.examples_per_step, world_size):
            example = step * args.examples_per_step + j
            conversation = train_task[example % len(train_task)]
            prompt = tokenizer.render_for_completion(conversation)
            budget = min(args.max_new_tokens, model.config.sequence_len - len(prompt))
            assert budget >= 1, (f"training question {example % len(train_task)} has "
                                 f"a {len(prompt)}-token prompt, no room left in the "
                                 f"model's {model.config.sequence_len}-token context")
            seeds = [sample_seed("train", step, example, p) for p in range(passes_per_question)]
            passes = sample_completions(engine, prompt, args.num_samples, args.device_batch_size,
                                        seeds, bool(args.train_stop_token),
                                        **{**sampling, "max_tokens": budget})
            completions = [c for completions in passes for c in completions]
            group_rewards = [train_task.reward(conversation, completion_text(engine, tokens))
                             for tokens, _ in completions]
            groups.append((prompt, passes, group_advantages(group_rewards)))
            rewards += group_rewards
            lengths += [len(tokens) for tokens, _ in completions]
            digests.append((example, zlib.crc32(repr([t for t, _ in completions]).encode())))
        t1 = time.time()

        # ---- train: one optimizer step on this batch of fresh samples
        loss = policy_gradient_backward(model, groups, pad_id)
        lrm = 1.0 - step / num_steps
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        optimizer.step()
        model.zero_grad(set_to_none=True)
        synchronize(device)
        t2 = time.time()

        # sums over ranks; the digest of every sampled token, in question order (same on any GPUs)
        totals = torch.tensor([sum(rewards), len(rewards), sum(lengths), loss], dtype=torch.float64,
                              device=device)
        reward_sum, num_samples, length_sum, loss_sum = reduce_across_ranks(totals).tolist()
        digests = [d for rank_digests in gather_across_ranks(digests) for d in rank_digests]
        digest = zlib.crc32(repr(sorted(digests)).encode())
        step += 1
        times["sample"] += t1 - t0
        times["train"] += t2 - t1
        mean_reward, mean_length = reward_sum / num_samples, length_sum / num_samples
        print0(f"step {step:05d}/{num_steps:05d} | reward: {mean_reward:.6f} | loss: "
               f"{loss_sum / world_size:+.6f} | length: {mean_length:.1f} | lrm: {lrm:.3f} "
               f"| sample: {t1 - t0:.2f}s | train: {t2 - t1:.2f}s | samples {digest:08x}")
        metric_log.log({**record, "reward": mean_reward, "loss": loss_sum / world_size, "lrm": lrm,
                        "sequence_length": mean_length, "time_sample": t1 - t0,
                        "time_train": t2 - t1})
        wandb_run.log({"step": step, "reward": mean_reward, "sequence_length": mean_length,
                       "lrm": lrm, "time/sample": t1 - t0, "time/train": t2 - t1})

    # -------------------------------------------------------------------------
    print0(f"done: {num_steps} steps | per step {times['sample'] / num_steps:.2f}s sampling + "
           f"{times['train'] / num_steps:.2f}s training")
    first, last, k_max = min(history), max(history), args.num_samples_eval
    get_report().log("Chat RL", [user_config, {
        "Source": f"{args.source} {model_tag} step {source_meta['step']}", "Task": args.task,
        "Steps": num_steps, "Test problems": eval_problems,
        **{f"pass@{k} at step {s}": history[s][k] for k in (1, k_max) for s in (first, last)},
        "Sampling time per step (s)": times["sample"] / num_steps,
        "Training time per step (s)": times["train"] / num_steps}])
    wandb_run.finish()
    metric_log.close()
    compute_cleanup()

if __name__ == "__main__":
    main()
