"""
Inference benchmark: time to first token, time per output token, throughput, and how close decoding
gets to the memory-bandwidth limit (MBU) and to peak compute (MFU), for several batch sizes and
inference dtypes.

    python -m scripts.infer_bench                              # newest base checkpoint
    python -m scripts.infer_bench -i sft -g d20 --batch-sizes 1,8,32,128
    python -m scripts.infer_bench --depth 4 --device-type cpu  # a random-init model, no training
    python -m scripts.infer_bench --depth 20 --device-type cpu --batch-sizes 1,8 \
        --dtype float32,bfloat16,float16,int8                  # one table: dtype x batch

Each dtype gets the model afresh (same seed or checkpoint), converted by
engine.prepare_for_inference as the chat scripts convert it. It runs the Engine's path by hand so
every step can be timed: a batch-1 prefill of the prompt into a KV cache, that cache copied into B
rows, then one token per row per step (sample_next_token, stop tokens ignored so every row decodes
the full count). Decode steps are timed one by one after an 8-step warm-up; the median is TPOT. MBU
= (weight bytes + B x KV bytes read at mid-decode) / TPOT / peak bandwidth, where weight bytes are
every parameter except the embedding tables (only B rows of those are read per step), in the dtype
they are held in (int8: the int8 matrices and their bf16 scales; float16: 2 bytes per weight).
Peak bandwidth: the device's datasheet figure on CUDA; elsewhere the read bandwidth measured in
this run (a torch sum over 256 MB, best of 5). Decode MFU = B x decode FLOPs at mid-decode / TPOT /
peak FLOP/s. Prints a table, then one JSON line with every number (unknown peaks -> null). Leaves
out: multi-GPU, CUDA graphs, torch.compile, speculative decoding.
"""

import argparse
import json
import math
import statistics
import time

parser = argparse.ArgumentParser(description="Benchmark KV-cached inference")
add = parser.add_argument
add("-i", "--source", default="base", help="base|mid|sft|rl checkpoint (ignored with --depth)")
add("-g", "--model-tag", default=None, help="model tag, e.g. d20 (default: the largest d<N>)")
add("-s", "--step", type=int, default=None, help="checkpoint step (default: newest complete)")
add("--depth", type=int, default=-1, help="random-init model of this depth (-1 = load one)")
add("--max-seq-len", type=int, default=2048, help="context of the --depth model")
add("--vocab-size", type=int, default=32768, help="vocab of the --depth model (CPU demo: 8192)")
add("--head-dim", type=int, default=128, help="head width of the --depth model (CPU demo: 64)")
add("--dtype", default="", help="float32|bfloat16|float16|int8, comma list ('' = the default)")
add("--prompt-tokens", type=int, default=-1, help="prompt length (-1 = 2048 on CUDA, else 128)")
add("--decode-tokens", type=int, default=-1, help="timed decode steps (-1 = 256 on CUDA, else 16)")
add("--batch-sizes", default="", help="rows decoded at once ('' = 1,8,32,128 on CUDA, else 1,4)")
add("-t", "--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
add("--device-type", default="", help="cuda|cpu|mps (empty = autodetect)")
add("--engine-samples", default="1,8", help="Engine.generate rows: sample counts ('' = skip)")
add("--engine-prompt-tokens", type=int, default=64, help="prompt length of the Engine rows")
add("--engine-tokens", type=int, default=128, help="tokens per sample in the Engine.generate rows")
add("--engine-temperature", type=float, default=1.0, help="their temperature (Engine's default)")
add("--engine-top-k", type=int, default=-1, help="their top-k (-1 = all, Engine's default)")
args = parser.parse_args()

from types import SimpleNamespace

import torch

from nanochat.checkpoint import load_model
from nanochat.common import compute_init, get_peak_flops, synchronize
from nanochat.engine import (INFERENCE_DTYPES, Engine, Fp16Linear, new_kv_cache,
                             prepare_for_inference, sample_next_token)
from nanochat.gpt import GPT, config_for_depth

WARMUP_STEPS = 8
# Peak HBM bandwidth in bytes/s by device name, most specific first.
_PEAK_BANDWIDTH = [
    ("gb200", 8.0e12), ("b200", 8.0e12), ("b100", 8.0e12), ("h200", 4.8e12),
    ("h100 nvl", 3.9e12), ("h100 pcie", 2.0e12), ("h100", 3.35e12), ("h800", 3.35e12),
    ("a100", 2.0e12), ("a800", 2.0e12), ("mi300x", 5.3e12), ("mi325", 6.0e12),
    ("l40s", 0.864e12), ("l4", 0.3e12), ("5090", 1.79e12), ("4090", 1.01e12), ("3090", 0.936e12),
]

def timed(fn, *fn_args):
    """-> (fn(*fn_args), seconds), the device synchronized before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn(*fn_args)
    synchronize(device)
    return out, time.perf_counter() - t0

def measure_read_bandwidth(nbytes=256 << 20, repeats=5):
    """Bytes/s of a torch sum over nbytes of fp32, best of `repeats`: what a decode step streaming
    weights can hope for here (a shared machine only ever adds time, so the best run is the closest
    to the idle figure)."""
    x = torch.ones(nbytes // 4, device=device)
    x.sum()
    return nbytes / min(timed(x.sum)[1] for _ in range(repeats))

# -----------------------------------------------------------------------------
# Setup

_, _, _, _, device = compute_init(args.device_type)
on_cuda = device.type == "cuda"
prompt_tokens = args.prompt_tokens if args.prompt_tokens > 0 else (2048 if on_cuda else 128)
decode_tokens = args.decode_tokens if args.decode_tokens > 0 else (256 if on_cuda else 16)
default_batch_sizes = "1,8,32,128" if on_cuda else "1,4"
batch_sizes = [int(b) for b in (args.batch_sizes or default_batch_sizes).split(",")]
assert min(batch_sizes) >= 1, f"--batch-sizes must be positive integers, got {args.batch_sizes!r}"
dtypes = args.dtype.split(",")
if not set(dtypes) <= {"", *INFERENCE_DTYPES} or (len(dtypes) > 1 and "" in dtypes):
    parser.error(f"--dtype {args.dtype!r}: list dtypes from {list(INFERENCE_DTYPES)}, "
                 f"or leave it out for the default")

read_bandwidth = measure_read_bandwidth()
gpu_name = torch.cuda.get_device_name(device) if on_cuda else ""  # "" matches no datasheet entry
peak_bw = next((bw for key, bw in _PEAK_BANDWIDTH if key in gpu_name.lower()), None)
bandwidth_source = "datasheet" if peak_bw else "measured: torch sum over 256 MB, best of 5"
peak_bw = peak_bw or read_bandwidth
peak_flops = get_peak_flops(device)
peak_flops = None if math.isinf(peak_flops) else peak_flops
print(f"device: {gpu_name or device} | read bandwidth {read_bandwidth / 1e9:.1f} GB/s measured | "
      f"MBU against {peak_bw / 1e9:.1f} GB/s ({bandwidth_source})")

def fresh_model():
    """-> (model, name): the same weights for every dtype (seed 0 for --depth)."""
    if args.depth > 0:  # sized as base_train sizes it
        with torch.device("meta"):
            model = GPT(config_for_depth(args.depth, head_dim=args.head_dim,
                                         sequence_len=args.max_seq_len, vocab_size=args.vocab_size))
        model.to_empty(device=device)
        torch.manual_seed(0)
        model.init_weights()
        return model, f"random d{args.depth}"
    model, _, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag,
                                step=args.step)
    return model, f"{args.source} step {meta['step']}"

def ratio(numerator, denominator):
    return numerator / denominator if denominator else None

# -----------------------------------------------------------------------------
# Measurements, one dtype at a time

def bench_dtype(dtype):
    model, model_name = fresh_model()
    config = model.config
    # A random prompt clamped to the context: the cost of a forward does not depend on which tokens
    # go in, and --depth needs no tokenizer.
    n_prompt = min(prompt_tokens, config.sequence_len - WARMUP_STEPS - decode_tokens)
    assert n_prompt >= 1, (f"--decode-tokens {decode_tokens} + {WARMUP_STEPS} warm-up "
                           f"leave no room for a prompt in context {config.sequence_len}")
    random_ids = lambda n: torch.randint(0, config.vocab_size, (n,),
                                         generator=torch.Generator().manual_seed(0))
    prompt = random_ids(n_prompt)[None].to(device)
    mid_ctx = n_prompt + WARMUP_STEPS + decode_tokens // 2
    # FLOPs from the shapes, counted before int8 or float16 swaps nn.Linear modules out
    decode_flops = model.estimate_decode_flops(mid_ctx)
    prefill_flops = model.estimate_prefill_flops(n_prompt)
    dtype = prepare_for_inference(model, dtype)  # '' -> the device's default, by name

    params = list(model.parameters())
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)
    bytes_by_dtype = {str(d): nbytes(p for p in params if p.dtype == d)
                      for d in dict.fromkeys(p.dtype for p in params)}
    # FBGEMM's packed fp16 matrices are not parameters: counted beside the fp16 embedding tables
    fp16_bytes = sum(m.nbytes for m in model.modules() if isinstance(m, Fp16Linear))
    if fp16_bytes:
        bytes_by_dtype["torch.float16"] += fp16_bytes
    embeddings = {*model.transformer.wte.parameters(), *model.value_embeds.parameters()}
    weight_bytes = nbytes(p for p in params if p not in embeddings) + fp16_bytes
    kv_read, kv_per_token = model.kv_read_bytes(mid_ctx), model.kv_bytes_per_token()
    vram = torch.cuda.get_device_properties(device).total_memory if on_cuda else None
    card = {"model": model_name, "dtype": dtype,
            **{k: getattr(config, k) for k in ("n_layer", "n_embd", "n_head", "sequence_len")},
            "window_sizes": model.window_sizes, "compute_dtype": str(model.compute_dtype),
            "params": sum(p.numel() for p in params) + fp16_bytes // 2,
            "param_bytes_by_dtype": bytes_by_dtype,
            "weight_bytes_read_per_step": weight_bytes, "kv_bytes_per_token": kv_per_token,
            "kv_read_bytes_per_row_at_mid_ctx": kv_read, "mid_ctx": mid_ctx,
            "peak_bandwidth": peak_bw, "peak_flops": peak_flops, "vram_bytes": vram,
            "batch1_decode_ceiling_tok_per_s": peak_bw / (weight_bytes + kv_read),
            "max_full_context_rows": (vram - weight_bytes) // (kv_per_token * config.sequence_len)
                                     if vram else None}
    for k, v in card.items():
        print(f"  {k:36s} {v}")

    rng = torch.Generator(device=device).manual_seed(42)

    @torch.inference_mode()
    def prefill(batch_size):
        """Batch-1 prefill, copied into a batch_size decode cache; the first tokens sampled:
        -> (cache, tokens)."""
        cache1 = new_kv_cache(model, 1, n_prompt)
        logits = model(prompt, kv_cache=cache1)[:, -1, :].expand(batch_size, -1)
        cache = new_kv_cache(model, batch_size, n_prompt + WARMUP_STEPS + decode_tokens)
        cache.prefill(cache1)
        return cache, sample_next_token(logits, rng, args.temperature)

    @torch.inference_mode()
    def decode_step(cache, tokens):
        return sample_next_token(model(tokens, kv_cache=cache)[:, -1, :], rng, args.temperature)

    prefill(1)  # warm-up: allocator, kernel selection, compiled attention paths
    _, ttft = timed(prefill, 1)
    prefill_result = {"dtype": dtype, "prompt_tokens": n_prompt, "ttft_s": ttft,
                      "tok_per_s": n_prompt / ttft, "mfu": ratio(prefill_flops / ttft, peak_flops)}

    decode_results = []
    for batch_size in batch_sizes:
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        (cache, tokens), ttft = timed(prefill, batch_size)
        for _ in range(WARMUP_STEPS):
            tokens = decode_step(cache, tokens)
        step_times = []
        for _ in range(decode_tokens):
            tokens, dt = timed(decode_step, cache, tokens)
            step_times.append(dt)
        tpot = statistics.median(step_times)
        bytes_per_s = (weight_bytes + batch_size * kv_read) / tpot  # achieved
        decode_results.append({
            "model": model_name, "dtype": dtype, "batch_size": batch_size, "ttft_s": ttft,
            "tpot_s": tpot, "tok_per_s": batch_size * len(step_times) / sum(step_times),
            "bytes_per_s": bytes_per_s, "mbu": ratio(bytes_per_s, peak_bw),
            "mfu": ratio(batch_size * decode_flops / tpot, peak_flops),
            "peak_vram_bytes": torch.cuda.max_memory_allocated(device) if on_cuda else None})
        del cache

    # Engine.generate end to end, as chat_eval and RL call it: one prompt, B samples, every step's
    # sampling, per-row tool state machine and host sync included. Its special tokens all map past
    # the vocabulary, so no row stops early or calls the tool.
    engine_results = []
    past_vocab = lambda *_: config.vocab_size
    engine = Engine(model, SimpleNamespace(encode_special=past_vocab, get_bos_token_id=past_vocab))
    engine_tokens = min(args.engine_tokens, config.sequence_len // 2)
    n_engine_prompt = min(args.engine_prompt_tokens, config.sequence_len - engine_tokens)
    engine_prompt = random_ids(n_engine_prompt).tolist()
    sampling = dict(temperature=args.engine_temperature,
                    top_k=None if args.engine_top_k == -1 else args.engine_top_k)
    for samples in [int(b) for b in args.engine_samples.split(",") if b]:
        run = lambda n: sum(len(column) for column, _ in engine.generate(
            engine_prompt, num_samples=samples, max_tokens=n, **sampling))
        run(WARMUP_STEPS)
        timings = [timed(run, engine_tokens) for _ in range(3)]  # best of 3, as for the bandwidth
        tokens, seconds = timings[0][0], min(s for _, s in timings)
        engine_results.append({"dtype": dtype, "samples": samples, "prompt_tokens": n_engine_prompt,
                               "tokens": tokens, **sampling, "tok_per_s": tokens / seconds})
    return {"dtype": dtype, "card": card, "prefill": prefill_result, "decode": decode_results,
            "engine": engine_results}

# the previous dtype's model is freed before the next one is built
runs = [bench_dtype(dtype) for dtype in dtypes]
decode_rows = [row for run in runs for row in run["decode"]]
engine_rows = [row for run in runs for row in run["engine"]]

# -----------------------------------------------------------------------------
# Report

fmt = lambda x, spec: "-" if x is None else format(x, spec)
print("\nprefill (batch 1, one prompt):")
for r in runs:
    p = r["prefill"]
    print(f"  {r['card']['model']} {r['dtype']:>8}: {p['prompt_tokens']} tokens, TTFT "
          f"{p['ttft_s'] * 1e3:.1f} ms | {p['tok_per_s']:,.0f} tok/s | MFU {fmt(p['mfu'], '.1%')}")
print(f"decode ({decode_tokens} timed steps after {WARMUP_STEPS} warm-up, context "
      f"{runs[0]['prefill']['prompt_tokens']}+; MBU against {peak_bw / 1e9:.1f} GB/s, "
      f"{bandwidth_source}):")
print(f"{'model':>14} {'dtype':>8} {'batch':>6} {'TTFT ms':>9} {'TPOT ms':>9} "
      f"{'tok/s':>10} {'GB/s':>8} {'MBU':>7} {'MFU':>7} {'peak VRAM GB':>13}")
for r in decode_rows:
    vram_gb = None if r["peak_vram_bytes"] is None else r["peak_vram_bytes"] / 1e9
    print(f"{r['model']:>14} {r['dtype']:>8} {r['batch_size']:>6} {r['ttft_s'] * 1e3:>9.1f} "
          f"{r['tpot_s'] * 1e3:>9.2f} {r['tok_per_s']:>10,.1f} {r['bytes_per_s'] / 1e9:>8.1f} "
          f"{fmt(r['mbu'], '.1%'):>7} {fmt(r['mfu'], '.1%'):>7} {fmt(vram_gb, '.2f'):>13}")
for r in engine_rows:
    print(f"Engine.generate {r['dtype']}: one {r['prompt_tokens']}-token prompt, "
          f"{r['samples']} samples x {r['tokens'] // r['samples']} tokens "
          f"(T={r['temperature']}, top-k {r['top_k']}): {r['tok_per_s']:,.1f} tok/s aggregate")
# card and prefill are the first dtype's (with one dtype, its only ones); cards and prefills list
# every dtype's
print(json.dumps({"device": str(device), "read_bandwidth": read_bandwidth,
                  "bandwidth_source": bandwidth_source, "card": runs[0]["card"],
                  "prefill": runs[0]["prefill"], "cards": [run["card"] for run in runs],
                  "prefills": [run["prefill"] for run in runs], "decode": decode_rows,
                  "engine": engine_rows, "decode_tokens": decode_tokens,
                  "warmup_steps": WARMUP_STEPS, "temperature": args.temperature}))
