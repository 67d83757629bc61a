"""
One call checks a GPU machine: are the fast paths right, and how fast is it? Run by bench/gpu_check.sh.

    bash bench/gpu_check.sh                       # < 8 minutes on one H100/H200 (--budget), compiles included
    OUT=/some/dir bash bench/gpu_check.sh         # also streams every row to $OUT/gpu_check.jsonl as it finishes
    python3 -m bench.gpu_check --skip-speed       # numerics only

Every row runs in its own process with its own timeout (a hang, an OOM or a crashed CUDA context costs that row
only), under an overall time budget: a row that would start past it is skipped with that reason. Each finished
row is printed and appended to $OUT/gpu_check.jsonl at once, with the row's full output in $OUT/logs/, so a run
that is cut short keeps what it measured. Rows run with TORCH_LOGS=recompiles,graph_breaks: each row says how many
recompiles and graph breaks torch.compile logged, and the first of them.

Numerics (each against a reference in fp32, on the GPU):
  attention  FA3, compiled flex (torch.compile(flex_attention) built here, outside any trace, with the model's block
             masks) and SDPA (its explicit masks) in bf16 vs attention_reference: forward and q/k/v grads for full
             causal, a sliding window, GQA and (FA3, SDPA) a query chunk appended to a longer key cache.
  fp8        nanochat.fp8's forward (e4m3) and backward (e5m2 grads) matmuls vs an fp32 matmul, next to bf16's error.
  optimizer  MuonAdamW's compiled step (as base_train runs it: Muon's orthogonalization in bf16) vs the eager step
             in fp32, over 3 steps with changing lr/momentum (0-D tensor hyperparameters, no recompiles).
Speed: bench/train.py, one config per process: d12 bf16 and fp8, d20 bf16 at device batch 16 (ms/step, tok/s, MFU,
peak memory); scripts/infer_bench.py on a random-init d20 (KV-cache decode: TTFT, TPOT, MBU); CORE scoring
examples/s (core_eval.evaluate_task on a d20 with synthetic 10-shot 4-choice items the length of HellaSwag's).
End to end: a tiny `base_train --fp8` (compiled) writes a checkpoint that `base_eval` reloads; the reload must
give the val bpb training measured last. Data and tokenizer are made in a temp dir (tiktoken only: no rustbpe, no
download).

Prints one table (check | status | value | detail), then one JSON line with every number. Status: ok, FAIL, or
skip with the reason (without a CUDA device every row is "skip: no CUDA device" and it still runs to completion).
Exits 1 when a row FAILs. Leaves out: multi-GPU collectives (run base_train under torchrun for those).
"""

import argparse
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

# set before torch loads, as base_train does; every row's process inherits it
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken
import torch

import nanochat.optim as optim
from nanochat.common import COMPUTE_DTYPE, atomic_write_text, synchronize
from nanochat.core_eval import evaluate_task
from nanochat.fp8 import Float8Matmul
from nanochat.attention import ATTENTION_IMPLS, attention_flex, attention_reference, load_fa3
from nanochat.gpt import GPT, config_for_depth
from nanochat.optim import MuonAdamW
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

# tolerances, as max |fast - reference| / max |reference| (attention) or relative Frobenius error (fp8, optimizer)
ATTN_FWD_TOL, ATTN_GRAD_TOL = 2e-2, 5e-2   # bf16 has an 8-bit mantissa: ~0.4% per rounding, accumulated over softmax
FP8_FWD_TOL, FP8_GRAD_TOL = 0.10, 0.15     # e4m3 (3 mantissa bits) ~3.6% rms per operand; e5m2 grads ~7%
OPT_ADAMW_TOL, OPT_MUON_TOL = 1e-3, 0.15   # AdamW is fp32 either way; Muon's Polar Express runs in bf16 (measured
                                           # on CPU, bf16 vs fp32 eager, widths 128/256: 4.9%/3.9%)

# -----------------------------------------------------------------------------
# Rows

rows = []

def add_row(check, status, value="", detail="", **numbers):
    rows.append({"check": check, "status": status, "value": value, "detail": detail, **numbers})
    print(f"  {check:<26} {status:<5} {value or detail}", flush=True)

# -----------------------------------------------------------------------------
# Numerics

def rel_max_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()

def rel_fro_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()

ATTN_CASES = [  # name, B, Tq, Tk, H, Hkv, D, window
    ("causal", 2, 1024, 1024, 8, 8, 128, 1023),
    ("window 256", 2, 1024, 1024, 8, 8, 128, 256),
    ("GQA 8/2", 2, 512, 512, 8, 2, 128, 511),
    ("chunk 64 of 512", 2, 64, 512, 8, 8, 128, 511),
    ("chunk, window 128", 2, 64, 512, 8, 8, 128, 128),
]

def flex_compiled(q, k, v, window):
    """attention_flex as the compiled model runs it: traced into a torch.compile graph, where the flex_attention call
    is compiled with it (uncompiled, attention_flex takes SDPA)."""
    global _flex
    if _flex is None:
        _flex = torch.compile(attention_flex, dynamic=False)
    return _flex(q, k, v, window)

_flex = None

def check_attention(device, impls, cases=ATTN_CASES):
    """Each implementation vs attention_reference run in fp32 on the same bf16 inputs: worst error over the cases."""
    for impl in impls:
        name = f"attention {impl}"
        if impl == "fa3" and load_fa3() is None:
            add_row(name, "skip", detail="FA3 unavailable (needs the `kernels` package: pip install -e '.[gpu]' or "
                    "the wheels from bench/gpu_wheels.sh, the kernel from the HF hub or its cache, a bf16 compute "
                    "dtype and a kernel build for this GPU)")
            continue
        fn = flex_compiled if impl == "flex compiled" else ATTENTION_IMPLS[impl]
        # flex runs training's square (T x T) attention; cache chunks go to SDPA in the model
        impl_cases = [c for c in cases if c[2] == c[3]] if impl == "flex compiled" else cases
        worst_fwd, worst_grad, failures = 0.0, 0.0, []
        for case, B, Tq, Tk, H, Hkv, D, window in impl_cases:
            g = torch.Generator(device="cpu").manual_seed(0)
            q, k, v, dy = (torch.randn(shape, generator=g).to(device, torch.bfloat16) for shape in
                           [(B, Tq, H, D), (B, Tk, Hkv, D), (B, Tk, Hkv, D), (B, Tq, H, D)])
            ref_in = [t.float().requires_grad_() for t in (q, k, v)]
            ref_out = attention_reference(*ref_in, window)
            ref_out.backward(dy.float())
            fast_in = [t.clone().requires_grad_() for t in (q, k, v)]
            out = fn(*fast_in, window)
            out.backward(dy)
            fwd = rel_max_err(out, ref_out)
            grad = max(rel_max_err(f.grad, r.grad) for f, r in zip(fast_in, ref_in))
            worst_fwd, worst_grad = max(worst_fwd, fwd), max(worst_grad, grad)
            if not (fwd <= ATTN_FWD_TOL and grad <= ATTN_GRAD_TOL):  # also catches NaN
                failures.append(f"{case}: fwd {fwd:.2e} grad {grad:.2e}")
        status = "FAIL" if failures else "ok"
        detail = "; ".join(failures) or f"{len(impl_cases)} cases: " + ", ".join(c[0] for c in impl_cases)
        add_row(name, status, f"fwd {worst_fwd:.1e} grad {worst_grad:.1e} (tol {ATTN_FWD_TOL:g}/{ATTN_GRAD_TOL:g})",
                detail, fwd_err=worst_fwd, grad_err=worst_grad)

def check_fp8(device, M=4096, K=1536, N=6144):
    """Float8Matmul (x bf16 (M, K) @ w fp32 (N, K).T) vs the fp32 matmul, forward and both grads; bf16's beside."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(M, K, generator=g).to(device, torch.bfloat16)
    w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(device)
    dy = torch.randn(M, N, generator=g).to(device, torch.bfloat16)
    x32, w32 = x.float().requires_grad_(), w.clone().requires_grad_()
    y32 = x32 @ w32.t()
    y32.backward(dy.float())
    x8, w8 = x.clone().requires_grad_(), w.clone().requires_grad_()
    y8 = Float8Matmul.apply(x8, w8)
    y8.backward(dy)
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    yb = xb @ wb.to(torch.bfloat16).t()  # what the bf16 Linear computes
    yb.backward(dy)
    errors = lambda y, x_, w_: {"fwd": rel_fro_err(y, y32), "grad_x": rel_fro_err(x_.grad, x32.grad),
                                "grad_w": rel_fro_err(w_.grad, w32.grad)}
    errs, bf16 = errors(y8, x8, w8), errors(yb, xb, wb)
    ok = errs["fwd"] <= FP8_FWD_TOL and max(errs["grad_x"], errs["grad_w"]) <= FP8_GRAD_TOL
    value = ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f" (tol {FP8_FWD_TOL:g}/{FP8_GRAD_TOL:g})"
    add_row("fp8 matmul vs fp32", "ok" if ok else "FAIL", value,
            f"({M}x{K}) @ ({K}x{N}); bf16's errors: " + ", ".join(f"{k} {v:.1e}" for k, v in bf16.items()),
            fp8_err=errs, bf16_err=bf16)

def optimizer_params(device, d=768, V=32768, L=2):
    """A d12-shaped slice of the model: every Muon shape family, the big AdamW tables and the scalars."""
    g = torch.Generator(device="cpu").manual_seed(0)
    make = lambda *shape: torch.nn.Parameter((torch.randn(*shape, generator=g) * 0.02).to(device))
    adamw = lambda params, lr: dict(kind="adamw", params=params, lr=lr, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    muon = lambda params: dict(kind="muon", params=params, lr=0.02, momentum=0.95, beta2=0.95, weight_decay=0.2,
                               ns_steps=5)
    groups = [adamw([make(V, d), make(V, d)], 0.01), adamw([make(L), make(L)], 0.5),  # made in this order: same draws
              muon([make(d, d) for _ in range(4 * L)]), muon([make(4 * d, d) for _ in range(L)]),
              muon([make(d, 4 * d) for _ in range(L)])]
    grads = [[torch.randn(p.shape, generator=g).to(device) for p in group["params"]] for group in groups]
    return groups, grads

def run_optimizer(device, d, V, steps=3):
    """Updates after `steps` steps, the schedules changing lr and momentum every step (as base_train does)."""
    groups, grads = optimizer_params(device, d, V)
    initial = [[p.detach().clone() for p in group["params"]] for group in groups]
    opt = MuonAdamW(groups)
    for step in range(steps):
        for group, group_grads in zip(opt.param_groups, grads):
            group["lr"] *= 0.9
            if group["kind"] == "muon":
                group["momentum"] = 0.85 + 0.05 * step
            for p, grad in zip(group["params"], group_grads):
                p.grad = grad * (1 + step)
        opt.step()
    return [(group["kind"], [p.detach() - p0 for p, p0 in zip(group["params"], group_initial)])
            for group, group_initial in zip(opt.param_groups, initial)]

def check_optimizer(device, d=768, V=32768):
    """Compiled step as base_train runs it vs the eager step with every op in fp32: relative error of the updates."""
    compiled = run_optimizer(device, d, V)  # optim compiles its CUDA steps (optim._step_fn) with the process's dtype
    saved = optim._step_fn, optim.COMPUTE_DTYPE
    optim._step_fn, optim.COMPUTE_DTYPE = (lambda fn, device: fn), torch.float32  # eager steps read these at call time
    try:
        reference = run_optimizer(device, d, V)
    finally:
        optim._step_fn, optim.COMPUTE_DTYPE = saved
    errs = {"adamw": 0.0, "muon": 0.0}
    for (kind, deltas), (_, ref_deltas) in zip(compiled, reference):
        for delta, ref_delta in zip(deltas, ref_deltas):
            errs[kind] = max(errs[kind], rel_fro_err(delta, ref_delta))
    ok = errs["adamw"] <= OPT_ADAMW_TOL and errs["muon"] <= OPT_MUON_TOL
    add_row("optimizer compiled vs fp32", "ok" if ok else "FAIL",
            f"adamw {errs['adamw']:.1e}, muon {errs['muon']:.1e} (tol {OPT_ADAMW_TOL:g}/{OPT_MUON_TOL:g})",
            f"3 steps, width {d}, vocab {V}; compiled={device.type == 'cuda'}, "
            f"Muon orthogonalization dtype {str(optim.COMPUTE_DTYPE).removeprefix('torch.')}", update_err=errs)

# -----------------------------------------------------------------------------
# CORE speed and the end-to-end run, on a tokenizer built from tiktoken alone

CORE_WORDS = """the a of to and in is was for on that with as it by at from he she they this an be are or which one
people man woman water room table ball car dog house road hand door window paper phone music game""".split()

def words_tokenizer(words):
    """Byte-level BPE whose merges spell out each word, bare and with its leading space (every prefix is a token, so
    each word encodes to one token as common words do with a 32K vocab). tiktoken alone: no trainer, no download."""
    ranks = {bytes([i]): i for i in range(256)}
    for word in words:
        for piece in (word.encode(), b" " + word.encode()):
            for n in range(2, len(piece) + 1):
                ranks.setdefault(piece[:n], len(ranks))
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="gpu-check-words", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                            special_tokens=specials)
    return Tokenizer(enc, "<|bos|>")

def synthetic_core_task(n, seed=0):
    """n HellaSwag-shaped items (a ~60-word context, 4 endings of ~25 words), scored 10-shot like CORE's HellaSwag."""
    rng = random.Random(seed)
    text = lambda n: " ".join(rng.choice(CORE_WORDS) for _ in range(n))
    data = [{"query": text(60), "choices": [text(25) for _ in range(4)], "gold": rng.randrange(4)} for _ in range(n)]
    task = {"label": "synthetic-hellaswag", "task_type": "multiple_choice", "num_fewshot": 10,
            "continuation_delimiter": " "}
    return task, data

def check_core_speed(device, n=256, depth=20):
    """CORE scoring examples/s of a random-init model (d20: width 1280; bf16, eager, as base_eval runs it)."""
    task, data = synthetic_core_task(n)
    tokenizer = words_tokenizer(CORE_WORDS)
    with torch.device("meta"):
        model = GPT(config_for_depth(depth, sequence_len=2048, vocab_size=32768))
    model.to_empty(device=device)
    model.init_weights()
    model.eval()
    with torch.no_grad():
        evaluate_task(model, tokenizer, data[:16], task, device)  # warm-up: kernels, allocator
        synchronize(device)
        t0 = time.time()
        evaluate_task(model, tokenizer, data, task, device)
        synchronize(device)
    dt = time.time() - t0
    lengths = [len(t) for t in tokenizer.encode([d["query"] for d in data[:8]])]
    add_row(f"CORE examples/s d{depth}", "ok", f"{n / dt:,.1f} examples/s",
            f"{n} synthetic 10-shot 4-choice items (~{sum(lengths) / len(lengths) * 11:.0f} tokens a prompt), "
            f"random-init d{depth}, eager", examples_per_s=n / dt)

E2E_ROW = "e2e base_train fp8 -> base_eval"
E2E_TRAIN = ["--depth=2", "--aspect-ratio=64", "--head-dim=64", "--max-seq-len=256", "--window-pattern=SL",
             "--device-batch-size=8", "--total-batch-size=2048", "--num-iterations=20", "--warmup-steps=2",
             "--eval-every=10", "--eval-tokens=4096", "--core-metric-every=-1", "--sample-every=-1",
             "--model-tag=e2e"]  # width 128: the smallest at which worth_fp8 converts the block linears
E2E_EVAL = ["--model-tag=e2e", "--eval=bpb,sample", "--device-batch-size=8", "--split-tokens=4096"]
E2E_RELOAD_TOL = 0.01  # relative: the same weights, data and eager bf16 forward on both sides

def make_e2e_base_dir(base):
    """A tokenizer and local-dataset shards (train 0 and 1, val 9) of word-salad documents under `base`."""
    words_tokenizer(CORE_WORDS).save(os.path.join(base, "tokenizer"))
    data_dir = os.path.join(base, "base_data_local")
    os.makedirs(data_dir)
    rng = random.Random(0)
    for index in (0, 1, 9):
        texts = [" ".join(rng.choice(CORE_WORDS) for _ in range(rng.randint(20, 300))) for _ in range(400)]
        pq.write_table(pa.table({"text": texts}), os.path.join(data_dir, f"shard_{index:05d}.parquet"),
                       row_group_size=50)

def check_e2e(device, train_flags=("--fp8",)):
    """base_train --fp8 (compiled) -> checkpoint -> base_eval reload: the reloaded model's val bpb is training's."""
    with tempfile.TemporaryDirectory(prefix="nanochat_gpu_check_") as base:
        make_e2e_base_dir(base)
        env = dict(os.environ, NANOCHAT_BASE_DIR=base, NANOCHAT_DATASET="local", NANOCHAT_OFFLINE="1")
        outputs = []
        for script, flags in (("scripts.base_train", E2E_TRAIN + list(train_flags)), ("scripts.base_eval", E2E_EVAL)):
            cmd = [sys.executable, "-m", script, f"--device-type={device.type}"] + flags
            result = subprocess.run(cmd, env=env, capture_output=True, text=True)
            print(result.stdout, flush=True)  # into this row's log; stderr carries its torch.compile findings
            print(result.stderr, file=sys.stderr, flush=True)
            if result.returncode != 0:
                add_row(E2E_ROW, "FAIL", detail=f"{script} exit {result.returncode}: "
                        + (output_tail(result.stderr) or output_tail(result.stdout)))
                return
            outputs.append(result.stdout)
    train_bpb = [float(x) for x in re.findall(r"^step \d+ \| val bpb: ([\d.]+)", outputs[0], re.M)]
    eval_bpb = [float(x) for x in re.findall(r"^val bpb: ([\d.]+)", outputs[1], re.M)]
    if len(train_bpb) < 2 or not eval_bpb:
        add_row(E2E_ROW, "FAIL", detail=f"val bpb lines not found (train {train_bpb}, eval {eval_bpb})")
        return
    first, last, reloaded = train_bpb[0], train_bpb[-1], eval_bpb[-1]
    reload_err = abs(reloaded - last) / last
    learned = last < first
    ok = math.isfinite(last) and learned and reload_err <= E2E_RELOAD_TOL
    add_row(E2E_ROW, "ok" if ok else "FAIL", f"val bpb {first:.3f} -> {last:.3f}, reloaded {reloaded:.3f}",
            f"d2 width 128, T 256, 20 steps {' '.join(train_flags)}; reload differs by {reload_err:.1e} (tol "
            f"{E2E_RELOAD_TOL:g})" + ("" if learned else "; val bpb did not go down"),
            val_bpb=train_bpb, reloaded_val_bpb=reloaded)

# -----------------------------------------------------------------------------
# Each row in its own process: `--row NAME` runs one of these and prints the row as JSON on its last line

ROW_FUNCS = {
    "attention fa3": lambda device: check_attention(device, ["fa3"]),
    "attention flex compiled": lambda device: check_attention(device, ["flex compiled"]),
    "attention sdpa": lambda device: check_attention(device, ["sdpa"]),
    "fp8 matmul vs fp32": check_fp8,
    "optimizer compiled vs fp32": check_optimizer,
    "CORE examples/s d20": check_core_speed,
    E2E_ROW: check_e2e,
}
NUMERIC_ROWS = ["attention fa3", "attention flex compiled", "attention sdpa", "fp8 matmul vs fp32",
                "optimizer compiled vs fp32"]
# the end-to-end row first: whether a speedrun's train -> checkpoint -> eval path works matters more than any speed
SPEED_ROWS = [E2E_ROW, "train d12 bf16", "train d12 fp8", "train d20 bf16", "infer_bench d20", "CORE examples/s d20"]
# seconds per row: guesses (no GPU has run this code yet), about twice the compile + run time expected on an H100
ROW_TIMEOUT = {"attention fa3": 90, "attention flex compiled": 150, "optimizer compiled vs fp32": 150,
               "train d12 bf16": 180, "train d12 fp8": 180, "train d20 bf16": 210, E2E_ROW: 240,
               "infer_bench d20": 150, "CORE examples/s d20": 120}
MIN_ROW_S = 30  # a row is not started with less of the overall budget left: it would only time out

def train_row(r, label):
    mfu = f"{r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    peak = r.get("peak_mem_mib", 0) / 1024
    return {"status": "ok" if math.isfinite(r["loss"]) else "FAIL",
            "value": f"{r['ms_per_step']:.0f} ms/step, {r['tok_per_sec']:,.0f} tok/s, MFU {mfu}, peak {peak:.1f} GiB",
            "detail": f"B {r['B']} x T {r['T']}, attention {r['attn']}, window {r['window']}, compiled {r['compile']}, "
                      f"{label}, loss {r['loss']:.3f}, first step {r['first_step_s']:.0f}s",
            **{k: r[k] for k in ("ms_per_step", "tok_per_sec", "mfu", "B", "first_step_s")}, "peak_gib": peak}

def infer_row(out):
    p = out["prefill"]
    parts = [f"TTFT {p['ttft_s'] * 1e3:.0f} ms"]
    for r in out["decode"]:
        mbu = f", MBU {r['mbu']:.0%}" if r["mbu"] is not None else ""
        parts.append(f"B{r['batch_size']} TPOT {r['tpot_s'] * 1e3:.1f} ms{mbu}")
    return {"status": "ok", "value": ", ".join(parts),
            "detail": f"random-init d20, KV-cache decode, {out['decode_tokens']} timed steps",
            "prefill": p, "decode": out["decode"]}

def row_plan(name, args):
    """(command, parse: its last stdout line's JSON -> row fields)."""
    if name.startswith("train "):
        _, config, label = name.split()
        cmd = [sys.executable, "-m", "bench.train", f"--configs={config}", "--compile=1", f"--steps={args.train_steps}",
               "--warmup=3", "--loader-batches=0", "--device-type=cuda"] + (["--fp8"] if label == "fp8" else [])
        return cmd, lambda out: train_row(out["train"][0], label)
    if name == "infer_bench d20":
        cmd = [sys.executable, "-m", "scripts.infer_bench", "--depth=20", "--batch-sizes=1,32", "--decode-tokens=64",
               "--engine-samples=", "--device-type=cuda"]
        return cmd, infer_row
    return [sys.executable, "-m", "bench.gpu_check", "--row", name], lambda out: out

def output_tail(text, n=3):
    """The last n lines that are not torch.compile log lines, joined: on stderr, usually the error."""
    return " | ".join([line for line in text.splitlines() if line.strip() and "[__recompiles]" not in line
                       and "[__graph_breaks]" not in line][-n:])

def compile_findings(log):
    """(recompiles, graph breaks, first few messages) from a TORCH_LOGS=recompiles,graph_breaks log."""
    messages = [line.split("[__recompiles] ", 1)[-1].split("[__graph_breaks] ", 1)[-1].strip()
                for line in log.splitlines() if "[__recompiles] " in line or "[__graph_breaks] " in line]
    recompiles = sum(m.startswith("Recompiling function") for m in messages)
    breaks = sum(m.startswith("Graph break") for m in messages)
    first = [m for m in messages if m.startswith(("Recompiling function", "- ", "Graph break", "Graph Break Reason"))]
    return recompiles, breaks, first[:4]

def run_row(name, cmd, parse, timeout, log_dir=None):
    """Run one row's process (its own session, so a timeout kills whatever it started too); a row dict back."""
    t0 = time.time()
    env = dict(os.environ)
    env.setdefault("TORCH_LOGS", "recompiles,graph_breaks")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        why = None if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a process that left the row's group still holds its pipes
            proc.wait()
            stdout, stderr = "", "(output lost: a process outside the row's process group kept its pipes open)"
        why = f"timed out after {timeout:.0f}s"
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
        atomic_write_text(os.path.join(log_dir, f"{slug}.txt"), f"$ {' '.join(cmd)}\n{stdout}\n--- stderr\n{stderr}")
    lines = stdout.strip().splitlines()
    fields = None
    if why is None:
        try:
            fields = parse(json.loads(lines[-1]))
        except (IndexError, json.JSONDecodeError, KeyError, TypeError) as e:
            why = f"no row JSON on its last stdout line ({type(e).__name__}: {e})"
    if fields is None:
        tail = output_tail(stderr) or output_tail(stdout)  # a traceback goes to stderr
        fields = {"status": "FAIL", "value": "", "detail": f"{why}: {' '.join(cmd[2:])}: {tail}"[:800]}
    recompiles, breaks, first = compile_findings(stderr)
    row = {"check": name, **{k: v for k, v in fields.items() if k != "check"}, "recompiles": recompiles,
           "graph_breaks": breaks, "seconds": round(time.time() - t0, 1)}
    if recompiles or breaks:
        found = f"; torch.compile: {recompiles} recompiles, {breaks} graph breaks: " + " | ".join(first)
        row["detail"] += found[:600]
    return row

def hub_reachable(timeout=3):
    """Can the FA3 kernel be fetched? Without network, kernels' download would hang every row until its timeout."""
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False

# -----------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description="Check a GPU machine: numerics of the fast paths, then speed")
    parser.add_argument("--skip-speed", action="store_true", help="numerics only")
    parser.add_argument("--train-steps", type=int, default=10, help="timed steps per bench/train.py row")
    parser.add_argument("--budget", type=int, default=450, help="seconds for all rows together (the rest skip)")
    parser.add_argument("--row", type=str, default="", choices=["", *ROW_FUNCS],
                        help="run this one row in this process (what each row's own process runs)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.row:
        ROW_FUNCS[args.row](device)
        print(json.dumps(rows[-1]))
        return

    t_start = time.time()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"gpu_check: torch {torch.__version__}, device {device} ({card}), compute dtype {COMPUTE_DTYPE}, "
          f"budget {args.budget}s", flush=True)
    reason = "no CUDA device" if device.type != "cuda" else None
    if reason is None and COMPUTE_DTYPE != torch.bfloat16:
        reason = f"compute dtype is {COMPUTE_DTYPE}, not bf16 (unset NANOCHAT_DTYPE; SM80+ needed)"
    if reason is None and "HF_HUB_OFFLINE" not in os.environ and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # the rows inherit it: a cached FA3 kernel still loads, nothing is fetched
        print("gpu_check: huggingface.co is unreachable: HF_HUB_OFFLINE=1 (FA3 only from the local HF cache)")
    out_dir = os.environ.get("OUT")
    stream = os.path.join(out_dir, "gpu_check.jsonl") if out_dir else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        open(stream, "w").close()
    results = []
    for name in NUMERIC_ROWS + ([] if args.skip_speed else SPEED_ROWS):
        left = args.budget - (time.time() - t_start)
        if reason is not None:
            row = {"check": name, "status": "skip", "value": "", "detail": reason}
        elif "fp8" in name and torch.cuda.get_device_capability(device) < (8, 9):
            sm = "".join(map(str, torch.cuda.get_device_capability(device)))
            row = {"check": name, "status": "skip", "value": "", "detail": f"fp8 needs SM89+, this GPU is SM{sm}"}
        elif left < MIN_ROW_S:
            row = {"check": name, "status": "skip", "value": "",
                   "detail": f"the overall budget (--budget={args.budget}s) is spent"}
        else:
            cmd, parse = row_plan(name, args)
            row = run_row(name, cmd, parse, min(ROW_TIMEOUT.get(name, 90), left),
                          os.path.join(out_dir, "logs") if out_dir else None)
        results.append(row)
        print(f"  {name:<32} {row['status']:<5} {row['value'] or row['detail']}", flush=True)
        if stream:
            with open(stream, "a") as f:
                f.write(json.dumps(row) + "\n")  # now, not at the end: a run cut short keeps what finished

    width = max(len(r["check"]) for r in results)
    lines = [f"{'check':<{width}}  {'status':<6}  value", "-" * (width + 60)]
    for r in results:
        lines.append(f"{r['check']:<{width}}  {r['status']:<6}  {r['value'] or r['detail']}")
        if r["value"] and r["detail"]:
            lines.append(f"{'':<{width}}  {'':<6}  {r['detail']}")
    failed = [r["check"] for r in results if r["status"] == "FAIL"]
    lines.append(f"{len(results)} checks: {sum(r['status'] == 'ok' for r in results)} ok, {len(failed)} FAIL, "
                 f"{sum(r['status'] == 'skip' for r in results)} skipped, {time.time() - t_start:.0f}s")
    table = "\n".join(lines)
    record = {"device": str(device), "card": card, "torch": torch.__version__, "compute_dtype": str(COMPUTE_DTYPE),
              "seconds": round(time.time() - t_start, 1), "rows": results}
    print("\n" + table)
    print(json.dumps(record))
    if out_dir:
        for name, text in (("gpu_check.txt", table + "\n"), ("gpu_check.json", json.dumps(record, indent=1) + "\n")):
            atomic_write_text(os.path.join(out_dir, name), text)
    sys.exit(1 if failed else 0)

if __name__ == "__main__":
    main()
