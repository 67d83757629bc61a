"""
One call checks a GPU machine: are the fast paths right, and how fast is it? Run by bench/gpu_check.sh.

    bash bench/gpu_check.sh                       # ~5-7 minutes on one H100/H200
    OUT=/some/dir bash bench/gpu_check.sh         # also writes gpu_check.json and gpu_check.txt there
    python -m bench.gpu_check --skip-speed        # numerics only (~1 minute)

Numerics (each against a reference in fp32, on the GPU):
  attention  FA3, flex and SDPA in bf16 vs attention_reference: forward and q/k/v grads for full causal,
             a sliding window, GQA and a query chunk appended to a longer key cache (decode alignment).
  fp8        nanochat.fp8's forward (e4m3) and backward (e5m2 grads) matmuls vs an fp32 matmul, next to bf16's error.
  optimizer  MuonAdamW's compiled step (as base_train runs it: Muon's orthogonalization in bf16) vs the eager step
             in fp32, over 3 steps with changing lr/momentum (0-D tensor hyperparameters, no recompiles).
Speed (each in its own process, reusing the repo's benchmarks): bench/train.py d12 and d20 full optimizer steps,
compiled bf16 and compiled --fp8 (ms/step, tok/s, MFU); scripts/infer_bench.py on a random-init d20 (TTFT, TPOT,
MBU); CORE scoring examples/s (core_eval.evaluate_task on a d20 with synthetic 10-shot 4-choice items the length of
HellaSwag's, so no eval bundle or tokenizer download is needed).

Prints one table (check | status | value | detail), then one JSON line with every number. Status: ok, FAIL, or
skip with the reason (without a CUDA device every row is "skip: no CUDA device" and it still runs to completion).
Exits 1 when a row FAILs. Leaves out: multi-GPU collectives (run base_train under torchrun for those).
"""

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time

import torch

import nanochat.optim as optim
from nanochat.common import COMPUTE_DTYPE, atomic_write_text, synchronize
from nanochat.core_eval import evaluate_task
from nanochat.fp8 import Float8Matmul
from nanochat.attention import ATTENTION_IMPLS, attention_reference, load_fa3
from nanochat.gpt import GPT, config_for_depth
from nanochat.optim import MuonAdamW
from nanochat.tokenizer import Tokenizer

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

def check_attention(device, impls, cases=ATTN_CASES):
    """Each implementation vs attention_reference run in fp32 on the same bf16 inputs: worst error over the cases."""
    for impl in impls:
        name = f"attention {impl}"
        if impl == "fa3" and load_fa3() is None:
            add_row(name, "skip", detail="FA3 unavailable (needs the `kernels` package: pip install -e '.[gpu]', "
                    "a bf16 compute dtype and a kernel build for this GPU)")
            continue
        worst_fwd, worst_grad, failures = 0.0, 0.0, []
        for case, B, Tq, Tk, H, Hkv, D, window in cases:
            g = torch.Generator(device="cpu").manual_seed(0)
            q, k, v, dy = (torch.randn(shape, generator=g).to(device, torch.bfloat16) for shape in
                           [(B, Tq, H, D), (B, Tk, Hkv, D), (B, Tk, Hkv, D), (B, Tq, H, D)])
            ref_in = [t.float().requires_grad_() for t in (q, k, v)]
            ref_out = attention_reference(*ref_in, window)
            ref_out.backward(dy.float())
            fast_in = [t.clone().requires_grad_() for t in (q, k, v)]
            out = ATTENTION_IMPLS[impl](*fast_in, window)
            out.backward(dy)
            fwd = rel_max_err(out, ref_out)
            grad = max(rel_max_err(f.grad, r.grad) for f, r in zip(fast_in, ref_in))
            worst_fwd, worst_grad = max(worst_fwd, fwd), max(worst_grad, grad)
            if not (fwd <= ATTN_FWD_TOL and grad <= ATTN_GRAD_TOL):  # also catches NaN
                failures.append(f"{case}: fwd {fwd:.2e} grad {grad:.2e}")
        status = "FAIL" if failures else "ok"
        detail = "; ".join(failures) or f"{len(cases)} cases: " + ", ".join(c[0] for c in cases)
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
# Speed: the repo's benchmarks in their own processes; their last stdout line is JSON

def run_json(cmd, timeout):
    """(parsed last stdout line, None) or (None, why it failed)."""
    t0 = time.time()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout}s: {' '.join(cmd)}"
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        return None, f"exit {result.returncode} after {time.time() - t0:.0f}s: {' '.join(cmd)}: " + " | ".join(tail)
    try:
        return json.loads(lines[-1]), None
    except json.JSONDecodeError:
        return None, f"no JSON on the last line of {' '.join(cmd)}: {lines[-1][:200]}"

def check_train_speed(device, fp8, timeout, steps, configs=("d12", "d20"), compile=1):
    label = "fp8" if fp8 else "bf16"
    if fp8:
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            for config in configs:
                add_row(f"train {config} {label}", "skip", detail=f"fp8 needs SM89+, this GPU is SM{major}{minor}")
            return
    cmd = [sys.executable, "-m", "bench.train", f"--configs={','.join(configs)}", f"--compile={compile}",
           f"--steps={steps}", "--warmup=3", "--loader-batches=0", f"--device-type={device.type}"]
    cmd += ["--fp8"] if fp8 else []
    out, err = run_json(cmd, timeout)
    if out is None:
        for config in configs:
            add_row(f"train {config} {label}", "FAIL", detail=err)
        return
    for r in out["train"]:
        mfu = f"{r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        ok = math.isfinite(r["loss"])
        add_row(f"train {r['config']} {label}", "ok" if ok else "FAIL",
                f"{r['ms_per_step']:.0f} ms/step, {r['tok_per_sec']:,.0f} tok/s, MFU {mfu}",
                f"B {r['B']} x T {r['T']}, attention {r['attn']}, window {r['window']}, compiled {r['compile']}, "
                f"loss {r['loss']:.3f}, peak {r.get('peak_mem_mib', 0) / 1024:.1f} GiB",
                **{k: r[k] for k in ("ms_per_step", "tok_per_sec", "mfu")})

def check_infer_speed(device, timeout, depth=20, batch_sizes="1,32", decode_tokens=64):
    name = f"infer_bench d{depth}"
    cmd = [sys.executable, "-m", "scripts.infer_bench", "--depth", str(depth), "--batch-sizes", batch_sizes,
           "--decode-tokens", str(decode_tokens), "--device-type", device.type]
    out, err = run_json(cmd, timeout)
    if out is None:
        add_row(name, "FAIL", detail=err)
        return
    p = out["prefill"]
    parts = [f"TTFT {p['ttft_s'] * 1e3:.0f} ms"]
    for r in out["decode"]:
        mbu = f", MBU {r['mbu']:.0%}" if r["mbu"] is not None else ""
        parts.append(f"B{r['batch_size']} TPOT {r['tpot_s'] * 1e3:.1f} ms{mbu}")
    add_row(name, "ok", ", ".join(parts), f"random-init d{depth}, {decode_tokens} timed decode steps",
            prefill=p, decode=out["decode"])

CORE_WORDS = """the a of to and in is was for on that with as it by at from he she they this an be are or which one
people man woman water room table ball car dog house road hand door window paper phone music game""".split()

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
    # a small BPE on the same words: most become one or two tokens, as real words do with a 32K vocab
    tokenizer = Tokenizer.train_from_iterator(iter([" ".join(CORE_WORDS)] * 8), vocab_size=256 + 96 + 9)
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
    del model

# -----------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description="Check a GPU machine: numerics of the fast paths, then speed")
    parser.add_argument("--skip-speed", action="store_true", help="numerics only")
    parser.add_argument("--train-steps", type=int, default=10, help="timed steps per bench/train.py config")
    parser.add_argument("--timeout", type=int, default=180, help="seconds allowed to each benchmark process")
    args = parser.parse_args()

    t_start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"gpu_check: torch {torch.__version__}, device {device} ({card}), compute dtype {COMPUTE_DTYPE}", flush=True)
    # (row names, function adding those rows)
    checks = [(["attention fa3"], lambda: check_attention(device, ["fa3"])),
              (["attention flex"], lambda: check_attention(device, ["flex"])),
              (["attention sdpa"], lambda: check_attention(device, ["sdpa"])),
              (["fp8 matmul vs fp32"], lambda: check_fp8(device)),
              (["optimizer compiled vs fp32"], lambda: check_optimizer(device))]
    if not args.skip_speed:
        train = lambda fp8: check_train_speed(device, fp8, args.timeout, args.train_steps)
        checks += [(["train d12 bf16", "train d20 bf16"], lambda: train(False)),
                   (["train d12 fp8", "train d20 fp8"], lambda: train(True)),
                   (["infer_bench d20"], lambda: check_infer_speed(device, args.timeout)),
                   (["CORE examples/s d20"], lambda: check_core_speed(device))]
    reason = "no CUDA device" if device.type != "cuda" else None
    if reason is None and COMPUTE_DTYPE != torch.bfloat16:
        reason = f"compute dtype is {COMPUTE_DTYPE}, not bf16 (unset NANOCHAT_DTYPE; SM80+ needed)"
    for names, fn in checks:
        if reason is not None:
            for name in names:
                add_row(name, "skip", detail=reason)
            continue
        t0 = time.time()
        n = len(rows)
        try:
            fn()
        except Exception as e:  # one broken path must not hide the others: report it as this check's failure
            add_row(names[0], "FAIL", detail=f"{type(e).__name__}: {e}"[:500])
        for r in rows[n:]:
            r["seconds"] = round(time.time() - t0, 1)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    width = max(len(r["check"]) for r in rows)
    lines = [f"{'check':<{width}}  {'status':<6}  value", "-" * (width + 60)]
    for r in rows:
        lines.append(f"{r['check']:<{width}}  {r['status']:<6}  {r['value'] or r['detail']}")
        if r["value"] and r["detail"]:
            lines.append(f"{'':<{width}}  {'':<6}  {r['detail']}")
    failed = [r["check"] for r in rows if r["status"] == "FAIL"]
    lines.append(f"{len(rows)} checks: {sum(r['status'] == 'ok' for r in rows)} ok, {len(failed)} FAIL, "
                 f"{sum(r['status'] == 'skip' for r in rows)} skipped, {time.time() - t_start:.0f}s")
    table = "\n".join(lines)
    record = {"device": str(device), "card": card, "torch": torch.__version__, "compute_dtype": str(COMPUTE_DTYPE),
              "seconds": round(time.time() - t_start, 1), "rows": rows}
    print("\n" + table)
    print(json.dumps(record))
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        for name, text in (("gpu_check.txt", table + "\n"), ("gpu_check.json", json.dumps(record, indent=1) + "\n")):
            atomic_write_text(os.path.join(out_dir, name), text)
    sys.exit(1 if failed else 0)

if __name__ == "__main__":
    main()
