"""
Time MuonAdamW.step() on the parameter shapes of a GPT of a given depth, per group and in total.

Launch: python -m bench.optim --depth 4 --vocab-size 8192
Prints a table (one row per group, then the whole optimizer) and a JSON line last.
Leaves out: the model itself (grads are random), multi-rank runs, and torch.compile on CPU (the optimizer runs
eager there).
"""

import argparse
import json
import time

import torch

from nanochat.common import synchronize
from nanochat.gpt import config_for_depth
from nanochat.optim import MuonAdamW

parser = argparse.ArgumentParser(description="time MuonAdamW.step() on GPT-shaped params")
parser.add_argument("--depth", type=int, default=4, help="transformer depth; width and heads as base_train sizes them")
parser.add_argument("--vocab-size", type=int, default=8192, help="rows of wte, lm_head and value embeddings")
parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (state allocation, compile on CUDA)")
parser.add_argument("--device", type=str, default="cpu", help="cpu or cuda")
args = parser.parse_args()

# -----------------------------------------------------------------------------
# GPT-shaped params as base_train sizes them (config_for_depth), value embeddings on half the layers

config = config_for_depth(args.depth, vocab_size=args.vocab_size)
d, heads, L, V = config.n_embd, config.n_head, config.n_layer, config.vocab_size
device = torch.device(args.device)
def make(shape, count=1):
    return [torch.nn.Parameter(torch.randn(shape, device=device) * 0.02) for _ in range(count)]

adamw = {"wte": make((V, d)), "lm_head": make((V, d)), "value_embeds": make((V, d), L // 2),
         "scalars": make((L,), 2) + make((1,), 2) + make((1, 24))}
muon = {f"{d}x{d} (q,k,v,proj)": make((d, d), 4 * L), f"{4 * d}x{d} (c_fc)": make((4 * d, d), L),
        f"{d}x{4 * d} (mlp proj)": make((d, 4 * d), L), f"{heads}x12 (ve gate)": make((heads, 12), L // 2)}

def adamw_group(params):
    return {"kind": "adamw", "params": params, "lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.01}

def muon_group(params):
    return {"kind": "muon", "params": params, "lr": 0.02, "momentum": 0.95, "beta2": 0.9, "weight_decay": 0.1,
            "ns_steps": 5}

def time_step(groups):
    opt = MuonAdamW(groups)
    params = [p for g in opt.param_groups for p in g["params"]]
    times = []
    for i in range(args.warmup + args.steps):
        for p in params:
            p.grad = torch.randn_like(p)
        synchronize(device)
        t0 = time.perf_counter()
        opt.step()
        synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3, sum(p.numel() for p in params)

# -----------------------------------------------------------------------------

rows = []
for name, params in adamw.items():
    ms, n = time_step([adamw_group(params)])
    rows.append(("adamw", name, len(params), n, ms))
for name, params in muon.items():
    ms, n = time_step([muon_group(params)])
    rows.append(("muon", name, len(params), n, ms))
ms, n = time_step([adamw_group(p) for p in adamw.values()] + [muon_group(p) for p in muon.values()])
rows.append(("all", "whole optimizer", sum(r[2] for r in rows), n, ms))

print(f"depth {args.depth}, d {d}, vocab {V}, device {args.device}, torch threads {torch.get_num_threads()}")
print(f"{'kind':<6} {'group':<24} {'K':>4} {'params':>12} {'ms/step':>9} {'ns/param':>9}")
for kind, name, k, n, ms in rows:
    print(f"{kind:<6} {name:<24} {k:>4} {n:>12,} {ms:>9.2f} {ms * 1e6 / n:>9.2f}")
print(json.dumps({"depth": args.depth, "d": d, "vocab_size": V, "device": args.device,
                  "groups": [{"kind": kind, "group": name, "K": k, "params": n, "ms_per_step": round(ms, 3)}
                             for kind, name, k, n, ms in rows]}))
