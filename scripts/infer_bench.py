"""
Inference benchmark: time to first token, time per output token, throughput, and (on CUDA) how close decoding
gets to the memory-bandwidth limit (MBU) and to peak compute (MFU), for several batch sizes.

    python -m scripts.infer_bench                                   # newest base checkpoint; 2048-token prompt on CUDA
    python -m scripts.infer_bench -i sft -g d20 --batch-sizes 1,8,32,128
    python -m scripts.infer_bench --depth 4 --device-type cpu       # a random-init model: no training needed

It runs the Engine's path by hand so every step can be timed: a batch-1 prefill of the prompt into a KV cache, that
cache copied into B rows, then one token per row per step (sample_next_token, stop tokens ignored so every row
decodes the full count). Decode steps are timed one by one after an 8-step warm-up; the median is TPOT.
MBU = (weight bytes + B x KV bytes read at mid-decode) / TPOT / peak bandwidth, where weight bytes are every
parameter except the embedding tables (only B rows of those are read per step), at their stored dtype.
Decode MFU = B x decode FLOPs at mid-decode / TPOT / peak FLOP/s. Prints a table, then one JSON line with every number
(peaks unknown for this device -> null). Leaves out: multi-GPU, CUDA graphs, torch.compile, speculative decoding.
"""

import argparse
import json
import math
import statistics
import time

parser = argparse.ArgumentParser(description="Benchmark KV-cached inference")
add = parser.add_argument
add("-i", "--source", type=str, default="base", help="checkpoint source: base|mid|sft|rl (ignored with --depth)")
add("-g", "--model-tag", type=str, default=None, help="model tag, e.g. d20 (default: the largest d<N>)")
add("-s", "--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
add("--depth", type=int, default=-1, help="a random-init model of this depth instead of a checkpoint (-1 = load one)")
add("--max-seq-len", type=int, default=2048, help="context of the --depth model")
add("--vocab-size", type=int, default=32768, help="vocabulary of the --depth model (the CPU demo's is 8192)")
add("--head-dim", type=int, default=128, help="head width of the --depth model (the CPU demo's is 64)")
add("--prompt-tokens", type=int, default=-1, help="prompt length (-1 = 2048 on CUDA, else 128; clamped to the context)")
add("--decode-tokens", type=int, default=-1, help="timed decode steps (-1 = 256 on CUDA, 16 elsewhere)")
add("--batch-sizes", type=str, default="", help="rows decoded at once, comma list ('' = 1,8,32,128 on CUDA, else 1,4)")
add("-t", "--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
add("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
add("--engine-samples", type=str, default="1,8", help="Engine.generate rows: comma list of sample counts ('' = skip)")
add("--engine-prompt-tokens", type=int, default=64, help="prompt length of the Engine.generate rows")
add("--engine-tokens", type=int, default=128, help="tokens each sample generates in the Engine.generate rows")
add("--engine-temperature", type=float, default=1.0, help="temperature of the Engine.generate rows (Engine's default)")
add("--engine-top-k", type=int, default=-1, help="top-k of the Engine.generate rows (-1 = all, Engine's default)")
args = parser.parse_args()

import torch

from nanochat.checkpoint import load_model
from nanochat.common import compute_init, get_peak_flops, synchronize, COMPUTE_DTYPE
from nanochat.engine import Engine, sample_next_token
from nanochat.gpt import GPT, KVCache, config_for_depth

WARMUP_STEPS = 8
# Peak HBM bandwidth in bytes/s by device name, most specific first.
_PEAK_BANDWIDTH = [
    ("gb200", 8.0e12), ("b200", 8.0e12), ("b100", 8.0e12), ("h200", 4.8e12),
    ("h100 nvl", 3.9e12), ("h100 pcie", 2.0e12), ("h100", 3.35e12), ("h800", 3.35e12),
    ("a100", 2.0e12), ("a800", 2.0e12), ("mi300x", 5.3e12), ("mi325", 6.0e12),
    ("l40s", 0.864e12), ("l4", 0.3e12), ("5090", 1.79e12), ("4090", 1.01e12), ("3090", 0.936e12),
]

def get_peak_bandwidth(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((bw for key, bw in _PEAK_BANDWIDTH if key in name), None)

# -----------------------------------------------------------------------------
# Model and prompt

_, _, _, _, device = compute_init(args.device_type)
on_cuda = device.type == "cuda"
prompt_tokens = args.prompt_tokens if args.prompt_tokens > 0 else (2048 if on_cuda else 128)
decode_tokens = args.decode_tokens if args.decode_tokens > 0 else (256 if on_cuda else 16)
batch_sizes = [int(b) for b in (args.batch_sizes or ("1,8,32,128" if on_cuda else "1,4")).split(",")]
assert all(b >= 1 for b in batch_sizes), f"--batch-sizes must be positive integers, got {args.batch_sizes!r}"

if args.depth > 0:  # sized as base_train sizes it
    with torch.device("meta"):
        model = GPT(config_for_depth(args.depth, head_dim=args.head_dim, sequence_len=args.max_seq_len,
                                     vocab_size=args.vocab_size))
    model.to_empty(device=device)
    model.init_weights()
    model_name = f"random d{args.depth}"
else:
    model, _, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    model_name = f"{args.source} step {meta['step']}"
model.eval()
config = model.config
# A random prompt: the cost of a forward does not depend on which tokens go in, and --depth needs no tokenizer.
prompt_tokens = min(prompt_tokens, config.sequence_len - WARMUP_STEPS - decode_tokens)
assert prompt_tokens >= 1, (f"--decode-tokens {decode_tokens} + {WARMUP_STEPS} warm-up leave no room for a prompt in "
                           f"context {config.sequence_len}")
prompt = torch.randint(0, config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)

# -----------------------------------------------------------------------------
# Architecture card

params = list(model.named_parameters())
bytes_by_dtype = {}
for _, p in params:
    bytes_by_dtype[str(p.dtype)] = bytes_by_dtype.get(str(p.dtype), 0) + p.numel() * p.element_size()
embedding_ids = {id(p) for p in model.transformer.wte.parameters()} | {id(p) for p in model.value_embeds.parameters()}
weight_bytes = sum(p.numel() * p.element_size() for _, p in params if id(p) not in embedding_ids)
mid_ctx = prompt_tokens + WARMUP_STEPS + decode_tokens // 2
kv_read = model.kv_read_bytes(mid_ctx)
peak_bw, peak_flops = get_peak_bandwidth(device), get_peak_flops(device)
peak_flops = None if math.isinf(peak_flops) else peak_flops
vram = torch.cuda.get_device_properties(device).total_memory if on_cuda else None
card = {
    "model": model_name, "n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head,
    "sequence_len": config.sequence_len, "window_sizes": model.window_sizes, "compute_dtype": str(COMPUTE_DTYPE),
    "params": sum(p.numel() for _, p in params), "param_bytes_by_dtype": bytes_by_dtype,
    "weight_bytes_read_per_step": weight_bytes, "kv_bytes_per_token": model.kv_bytes_per_token(),
    "kv_read_bytes_per_row_at_mid_ctx": kv_read, "mid_ctx": mid_ctx,
    "peak_bandwidth": peak_bw, "peak_flops": peak_flops, "vram_bytes": vram,
    "batch1_decode_ceiling_tok_per_s": peak_bw / (weight_bytes + kv_read) if peak_bw else None,
    "max_full_context_rows": (vram - weight_bytes) // (model.kv_bytes_per_token() * config.sequence_len)
                             if vram else None,
}
print(f"device: {torch.cuda.get_device_name(device) if on_cuda else device} | model: {model_name}")
for k, v in card.items():
    print(f"  {k:36s} {v}")

# -----------------------------------------------------------------------------
# Measurements

def new_cache(batch_size, seq_len):
    return KVCache(batch_size=batch_size, num_heads=config.n_kv_head, seq_len=seq_len,
                   head_dim=config.n_embd // config.n_head, num_layers=config.n_layer, device=device,
                   dtype=COMPUTE_DTYPE)

def ratio(numerator, denominator):
    return numerator / denominator if denominator else None

rng = torch.Generator(device=device).manual_seed(42)

@torch.inference_mode()
def prefill(batch_size):
    """Batch-1 prefill, copy into a batch_size decode cache, sample the first tokens: -> (cache, tokens, seconds)."""
    synchronize(device)
    t0 = time.perf_counter()
    cache1 = new_cache(1, prompt_tokens)
    logits = model(prompt, kv_cache=cache1)[:, -1, :].expand(batch_size, -1)
    cache = new_cache(batch_size, prompt_tokens + WARMUP_STEPS + decode_tokens)
    cache.prefill(cache1)
    tokens = sample_next_token(logits, rng, args.temperature)
    synchronize(device)
    return cache, tokens, time.perf_counter() - t0

@torch.inference_mode()
def decode_step(cache, tokens):
    synchronize(device)
    t0 = time.perf_counter()
    logits = model(tokens, kv_cache=cache)[:, -1, :]
    tokens = sample_next_token(logits, rng, args.temperature)
    synchronize(device)
    return tokens, time.perf_counter() - t0

prefill(1)  # warm-up: allocator, kernel selection, compiled attention paths
_, _, ttft = prefill(1)
prefill_flops = model.estimate_prefill_flops(prompt_tokens)
prefill_result = {"prompt_tokens": prompt_tokens, "ttft_s": ttft, "tok_per_s": prompt_tokens / ttft,
                  "mfu": ratio(prefill_flops / ttft, peak_flops)}

decode_results = []
for batch_size in batch_sizes:
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    cache, tokens, ttft = prefill(batch_size)
    for _ in range(WARMUP_STEPS):
        tokens, _ = decode_step(cache, tokens)
    step_times = []
    for _ in range(decode_tokens):
        tokens, dt = decode_step(cache, tokens)
        step_times.append(dt)
    tpot = statistics.median(step_times)
    decode_results.append({
        "batch_size": batch_size, "ttft_s": ttft, "tpot_s": tpot,
        "tok_per_s": batch_size * len(step_times) / sum(step_times),
        "bytes_per_s": (weight_bytes + batch_size * kv_read) / tpot,  # achieved; shown even where the peak is unknown
        "mbu": ratio((weight_bytes + batch_size * kv_read) / tpot, peak_bw),
        "mfu": ratio(batch_size * model.estimate_decode_flops(mid_ctx) / tpot, peak_flops),
        "peak_vram_bytes": torch.cuda.max_memory_allocated(device) if on_cuda else None,
    })
    del cache

# Engine.generate end to end, as chat_eval and RL call it: one prompt, B samples, every step's sampling, per-row
# tool state machine and host sync included. Special tokens map past the vocabulary, so no row stops early.
class NoStopTokenizer:
    def __init__(self, vocab_size):
        self.vocab_size = vocab_size
    def encode_special(self, name):
        return self.vocab_size + ["<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>",
                                  "<|assistant_end|>"].index(name)
    def get_bos_token_id(self):
        return self.vocab_size + 5

engine_results = []
if args.engine_samples:
    engine = Engine(model, NoStopTokenizer(config.vocab_size))
    engine_tokens = min(args.engine_tokens, config.sequence_len // 2)
    engine_prompt_len = min(args.engine_prompt_tokens, config.sequence_len - engine_tokens)
    engine_prompt = torch.randint(0, config.vocab_size, (engine_prompt_len,),
                                  generator=torch.Generator().manual_seed(0)).tolist()
    for samples in [int(b) for b in args.engine_samples.split(",")]:
        top_k = None if args.engine_top_k == -1 else args.engine_top_k
        run = lambda n: sum(len(column) for column, _ in engine.generate(
            engine_prompt, num_samples=samples, max_tokens=n, temperature=args.engine_temperature, top_k=top_k))
        run(WARMUP_STEPS)
        seconds = []
        for _ in range(3):  # the best of 3 runs: a shared machine only ever adds time
            synchronize(device)
            t0 = time.perf_counter()
            tokens = run(engine_tokens)
            synchronize(device)
            seconds.append(time.perf_counter() - t0)
        engine_results.append({"samples": samples, "prompt_tokens": len(engine_prompt), "tokens": tokens,
                               "temperature": args.engine_temperature, "top_k": top_k,
                               "tok_per_s": tokens / min(seconds)})

# -----------------------------------------------------------------------------
# Report

fmt = lambda x, spec: "-" if x is None else format(x, spec)
print(f"\nprefill (batch 1, {prompt_tokens} tokens): TTFT {prefill_result['ttft_s'] * 1e3:.1f} ms | "
      f"{prefill_result['tok_per_s']:,.0f} tok/s | MFU {fmt(prefill_result['mfu'], '.1%')}")
print(f"decode ({decode_tokens} timed steps after {WARMUP_STEPS} warm-up, context {prompt_tokens}+):")
print(f"{'batch':>6} {'TTFT ms':>9} {'TPOT ms':>9} {'tok/s':>10} {'GB/s':>8} {'MBU':>7} {'MFU':>7} "
      f"{'peak VRAM GB':>13}")
for r in decode_results:
    vram_gb = None if r["peak_vram_bytes"] is None else r["peak_vram_bytes"] / 1e9
    print(f"{r['batch_size']:>6} {r['ttft_s'] * 1e3:>9.1f} {r['tpot_s'] * 1e3:>9.2f} {r['tok_per_s']:>10,.0f} "
          f"{r['bytes_per_s'] / 1e9:>8.1f} {fmt(r['mbu'], '.1%'):>7} {fmt(r['mfu'], '.1%'):>7} "
          f"{fmt(vram_gb, '.2f'):>13}")
for r in engine_results:
    print(f"Engine.generate: one {r['prompt_tokens']}-token prompt, {r['samples']} samples x "
          f"{r['tokens'] // r['samples']} tokens (T={r['temperature']}, top-k {r['top_k']}): "
          f"{r['tok_per_s']:,.0f} tok/s aggregate")
print(json.dumps({"device": str(device), "card": card, "prefill": prefill_result, "decode": decode_results,
                  "engine": engine_results, "decode_tokens": decode_tokens, "warmup_steps": WARMUP_STEPS,
                  "temperature": args.temperature}))
