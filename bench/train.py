"""
Training throughput: tokens/s and MFU of full optimizer steps (forward, backward, MuonAdamW step) on random
tokens, for fixed model configs; plus how fast the pretraining loader packs batches from the shards on disk.

    python -m bench.train                                     # CPU: the small config, compiled if a C++ compiler works
    python -m bench.train --configs=cpu512 --compile=0        # CPU: d4 at T=512 (8,192 tokens/step), uncompiled
    python -m bench.train --configs=cpu4k --loader-batches=0  # CPU: the same at vocab 4,096 (docs/perf.md's yardstick)
    python -m bench.train --configs=d12,d20 --attn=auto,sdpa  # CUDA: FA3/flex (auto) vs plain SDPA
    python -m bench.train --configs=d20 --fp8 --compile=1     # CUDA: fp8 matmuls, compiled
    NANOCHAT_DTYPE=float32 python -m bench.train --configs=cpu  # the precision; unset: bf16 on
                                        # CUDA SM80+ and on CPUs with AVX512-BF16/AMX, else fp32

Prints a table, then one JSON line with every number. "peak RSS" is the process's high-water mark so far
(ru_maxrss): run one config per process to read it for that config alone. MFU = FLOPs/token x tok/s / peak bf16 FLOP/s
(common.get_peak_flops; CPU has no entry, so MFU shows as "-"). "cpu ms" is the process's CPU time per step:
on a shared CPU box it is what the step would take without contention (with one torch thread).
Leaves out: multi-GPU scaling (run base_train under torchrun for that) and memory-bound inference (infer_bench).
"""

import argparse
import json
import os
import resource
import time

# before torch loads, as base_train sets it: fewer fragmentation OOMs when shapes vary (first steps, fp8 casts)
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import torch

from nanochat.common import (autodetect_device_type, get_peak_flops, get_base_dir, decide_compile, synchronize,
                             compile_for_training, COMPUTE_DTYPE, COMPUTE_DTYPE_REASON)
import nanochat.attention as attention
from nanochat.dataloader import pretrain_loader
from nanochat.fp8 import convert_to_float8_training, worth_fp8
from nanochat.gpt import GPT, config_for_depth
from nanochat.tokenizer import get_tokenizer

# name -> (depth, head_dim, seq_len, device_batch_size, vocab); width = depth x 64 rounded up to whole heads.
# "cpu" is the runs/runcpu.sh base model (its tokenizer has 8,192 tokens: at width 256 a 32K vocab's lm_head and
# logits would cost ~2/3 of the step).
CONFIGS = {
    "cpu": (4, 64, 256, 16, 8192),
    "cpu512": (4, 64, 512, 16, 8192),  # the same model at T=512, 8,192 tokens/step: the CPU speed/memory yardstick
    "cpu4k": (4, 64, 512, 16, 4096),  # cpu512 with a 4,096 vocab: the shape docs/perf.md compares training speed at
    "d12": (12, 128, 2048, 32, 32768),
    # 16 rows, as runs/speedrun.sh trains d24: at 32, activations (~34 bytes per token, channel and layer: ~57 GB),
    # the 32K logits (~13 GB) and the weights with optimizer state (~9 GB) would fill an 80 GB H100 (estimated)
    "d20": (20, 128, 2048, 16, 32768),
}

parser = argparse.ArgumentParser(description="Training step throughput")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps ('' = autodetect)")
parser.add_argument("--configs", type=str, default="",
                    help=f"comma list of {sorted(CONFIGS)} ('' = cpu on CPU, d12,d20 on CUDA)")
parser.add_argument("--attn", type=str, default="auto", help="comma list of attention paths: auto, sdpa, flex, fa3")
parser.add_argument("--window-pattern", type=str, default="", help="'' = L on CPU, SSSL on CUDA")
parser.add_argument("--compile", type=int, default=-1, help="torch.compile: 1 on, 0 off, -1 = auto (as training)")
parser.add_argument("--fp8", action="store_true", help="fp8 matmuls for the big linears (CUDA SM89+)")
parser.add_argument("--device-batch-size", type=int, default=-1, help="rows per step (-1 = the config's)")
parser.add_argument("--vocab-size", type=int, default=-1,
                    help="vocab (-1 = the config's; lm_head and logits dominate small models' cost)")
parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
parser.add_argument("--steps", type=int, default=10, help="timed steps")
parser.add_argument("--loader-batches", type=int, default=20, help="batches for the loader measurement (0 = skip it)")
args = parser.parse_args()

device_type = args.device_type or autodetect_device_type()
device = torch.device(device_type)
configs = args.configs.split(",") if args.configs else (["d12", "d20"] if device_type == "cuda" else ["cpu"])
window_pattern = args.window_pattern or ("SSSL" if device_type == "cuda" else "L")
use_compile, compile_reason = decide_compile(args.compile, device_type)
peak_flops = get_peak_flops(device)

def bench_model(name, attn):
    depth, head_dim, T, B, vocab_size = CONFIGS[name]
    B = args.device_batch_size if args.device_batch_size > 0 else B
    vocab_size = args.vocab_size if args.vocab_size > 0 else vocab_size
    config = config_for_depth(depth, head_dim=head_dim, sequence_len=T, vocab_size=vocab_size,
                              window_pattern=window_pattern)
    attention.ATTN_IMPL = None if attn == "auto" else attn
    impl = attention.pick_attention_impl(device)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    flops_per_token = model.estimate_flops()
    num_params = sum(p.numel() for p in model.parameters())
    if args.fp8:
        convert_to_float8_training(model, module_filter_fn=worth_fp8)  # as base_train converts
    optimizer = model.setup_optimizer()
    train_model = compile_for_training(model) if use_compile else model
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, config.vocab_size, (B, T), generator=g).to(device)
    y = torch.randint(0, config.vocab_size, (B, T), generator=g).to(device)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_start = time.time()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            synchronize(device)
            t0, c0 = time.time(), time.process_time()
        loss = train_model(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        if i == 0:
            synchronize(device)
            first_step_s = time.time() - t_start  # with torch.compile: mostly compilation
    synchronize(device)
    dt = (time.time() - t0) / args.steps
    cpu_dt = (time.process_time() - c0) / args.steps  # on a shared CPU box: what the step costs without contention
    tok_per_sec = B * T / dt
    mfu = 100 * flops_per_token * tok_per_sec / peak_flops if peak_flops != float("inf") else None
    row = {"config": name, "vocab": vocab_size, "attn": impl, "window": window_pattern, "compile": use_compile,
           "fp8": args.fp8, "dtype": str(COMPUTE_DTYPE).removeprefix("torch."), "B": B, "T": T, "params": num_params,
           "flops_per_token": flops_per_token, "ms_per_step": 1000 * dt, "cpu_ms_per_step": 1000 * cpu_dt,
           "tok_per_sec": tok_per_sec, "mfu": mfu, "first_step_s": first_step_s,
           "loss": loss.item(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if device_type == "cuda":
        row["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    del model, train_model, optimizer
    return row

def bench_loader():
    """Batches per second of pretrain_loader on the shards under the base dir (device cpu: packing only)."""
    tokenizer = get_tokenizer()
    rows = []
    for B, T in [(8, 256), (32, 2048)]:
        loader = pretrain_loader(tokenizer, B, T, "train")
        t0 = time.time()
        next(loader)  # the first batch tokenizes the whole 1,000-document buffer
        t_first = time.time() - t0
        t0 = time.time()
        for _ in range(args.loader_batches):
            next(loader)
        dt = (time.time() - t0) / args.loader_batches
        rows.append({"B": B, "T": T, "first_batch_s": t_first, "ms_per_batch": 1000 * dt, "tok_per_sec": B * T / dt})
    return rows

results = []
print(f"device: {device_type} | compute dtype: {COMPUTE_DTYPE} ({COMPUTE_DTYPE_REASON}) | "
      f"torch.compile: {compile_reason} | fp8: {args.fp8} | "
      f"torch threads: {torch.get_num_threads()}")
print(f"{'config':<6} {'attn':<9} {'window':<6} {'B x T':>10} {'params':>8} {'FLOPs/tok':>10} {'ms/step':>9} "
      f"{'cpu ms':>9} {'tok/s':>10} {'MFU %':>6} {'peak RSS MB':>11} {'1st step s':>10}")
for name in configs:
    for attn in args.attn.split(","):
        r = bench_model(name, attn)
        results.append(r)
        mfu = f"{r['mfu']:.1f}" if r["mfu"] is not None else "-"
        print(f"{name:<6} {r['attn']:<9} {r['window']:<6} {r['B']:>4} x {r['T']:<4} {r['params'] / 1e6:>7.1f}M "
              f"{r['flops_per_token']:>10.2e} {r['ms_per_step']:>9.1f} {r['cpu_ms_per_step']:>9.1f} "
              f"{r['tok_per_sec']:>10,.0f} {mfu:>6} {r['peak_rss_mb']:>11,.0f} {r['first_step_s']:>10.1f}")

loader_rows = []
if args.loader_batches > 0:
    try:
        loader_rows = bench_loader()
    except FileNotFoundError as e:  # no tokenizer or shards yet: say so, the model numbers above still stand
        print(f"loader: not measured: {e}")
    for r in loader_rows:
        print(f"loader {r['B']:>4} x {r['T']:<4}: first batch {r['first_batch_s']:.2f}s, then "
              f"{r['ms_per_batch']:.1f} ms/batch = {r['tok_per_sec']:,.0f} tok/s "
              f"({os.environ.get('NANOCHAT_DATASET', 'climbmix')} data, {get_base_dir()})")
print(json.dumps({"device": device_type, "train": results, "loader": loader_rows}))
