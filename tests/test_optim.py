"""
MuonAdamW on CPU: AdamW against torch.optim.AdamW, Muon against hand-worked facts (orthogonality, the lr shape
multiplier, cautious weight decay), determinism, convergence, state_dict round trips, and the sharded distributed
step on 2 gloo processes against 1 process stepping with the averaged gradients.
"""

import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.optim import MuonAdamW, polar_express, cautious_update_, muon_lr_multiplier, POLAR_EXPRESS_COEFFS

# Shapes chosen to hit every path: small AdamW params, one 0-D (all-reduced), a large one (sharded along dim 0),
# a wide and a tall Muon group whose sizes K=3 and K=5 do not divide by 2 ranks (zero-padded chunks).
SHAPES = {"small": [(4,), ()], "large": [(64, 32)], "wide": [(16, 32)] * 3, "tall": [(32, 16)] * 5}

# where the wide and tall Muon matrices sit in all_params / make_grads order
MUON_OFFSET = {"wide": len(SHAPES["small"] + SHAPES["large"]),
               "tall": len(SHAPES["small"] + SHAPES["large"] + SHAPES["wide"])}

def make_params(seed=0, large_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    params = {k: [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes] for k, shapes in SHAPES.items()}
    params["large"] = [torch.nn.Parameter(p.detach().to(large_dtype)) for p in params["large"]]
    return params

def make_optimizer(params, muon_lr=0.02, muon_wd=0.1, adamw_wd=0.01, eps=1e-10):
    return MuonAdamW([
        {"kind": "adamw", "params": params["small"] + params["large"], "lr": 0.01, "betas": (0.8, 0.95),
         "eps": eps, "weight_decay": adamw_wd, "initial_lr": 0.01},
        *({"kind": "muon", "params": params[k], "lr": muon_lr, "momentum": 0.95, "beta2": 0.9,
           "weight_decay": muon_wd, "ns_steps": 5, "initial_lr": muon_lr} for k in ("wide", "tall")),
    ])

def all_params(params):
    return [p for k in SHAPES for p in params[k]]

def make_grads(params, step, rank=0):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in all_params(params)]

def set_grads(params, grads):
    for p, grad in zip(all_params(params), grads):
        p.grad = grad.clone()

def snapshot(params):
    return [p.detach().clone() for p in all_params(params)]

def run_steps(params, opt, steps, rank=0, start=0):
    for step in range(start, start + steps):
        set_grads(params, make_grads(params, step, rank))
        opt.step()

# -----------------------------------------------------------------------------
# AdamW

def test_adamw_matches_torch_reference():
    ours, ref = make_params(), make_params()
    adamw = ours["small"] + ours["large"]
    opt = MuonAdamW([{"kind": "adamw", "params": adamw, "lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-8,
                      "weight_decay": 0.1}])
    ref_params = ref["small"] + ref["large"]
    ref_opt = torch.optim.AdamW(ref_params, lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        for p, q in zip(adamw, ref_params):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(adamw, ref_params):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5)

def test_bf16_params_keep_fp32_adamw_moments_that_track_the_gradient_scale():
    """
    A bf16 param's second moment is fp32, so it follows the gradient scale. By hand (beta2 = 0.995, wte's): 1000
    steps of g = 1 give v = 1 - 0.995^1000 = 0.993346; 300 more of g = 1.5 give 2.25 - 1.256654 x 0.995^300 =
    1.970656. Kept in bf16 (karpathy/nanochat: moments in the param's dtype) the same lerps stall at 0.609 and 1.469.
    """
    p = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    opt = MuonAdamW([{"kind": "adamw", "params": [p], "lr": 0.0, "betas": (0.8, 0.995), "eps": 1e-10,
                      "weight_decay": 0.0}])
    v16 = torch.zeros(8, dtype=torch.bfloat16)
    for step, g in enumerate([1.0] * 1000 + [1.5] * 300, start=1):  # exact in bf16
        p.grad = torch.full_like(p, g)
        opt.step()
        v16.lerp_(torch.full_like(v16, g * g), 1 - 0.995)
        if step == 1000:
            assert opt.state[p]["exp_avg_sq"].tolist() == pytest.approx([0.993346] * 8, rel=1e-5)
            assert v16.tolist() == [0.609375] * 8
    assert opt.state[p]["exp_avg_sq"].dtype == opt.state[p]["exp_avg"].dtype == torch.float32
    assert opt.state[p]["exp_avg_sq"].tolist() == pytest.approx([1.970656] * 8, rel=1e-5)
    assert v16.tolist() == [1.46875] * 8

# -----------------------------------------------------------------------------
# Muon

@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_polar_express_singular_values_near_one(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    X = polar_express(G)
    sv = torch.linalg.svdvals(X)
    assert 0.7 < sv.min() and sv.max() < 1.3, f"singular values span [{sv.min():.3f}, {sv.max():.3f}]"
    # and it is the polar factor U V^T of G, not just any near-orthogonal matrix
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    rel = (X - U @ Vh).norm() / (U @ Vh).norm()
    assert rel < 0.15, f"relative distance to U V^T is {rel:.3f}"
    # the wide (X X^T) and tall (X^T X) branches compute the same map
    torch.testing.assert_close(polar_express(G.T), X.T, atol=1e-5, rtol=1e-4)

def reference_muon(p, grads, lr, mu, beta2, wd):
    """Muon for one matrix at a time, textbook form (no stacking, no lerps, no batching): Nesterov momentum, MuonEq
    row/matrix normalisation, Polar Express, Muon+ rescale, NorMuon, cautious weight decay. lr, mu and wd are
    numbers, or lists with one value per step (the schedules base_train sets between steps)."""
    rows, cols = p.shape
    buf, v = torch.zeros_like(p), None
    per_step = [x if isinstance(x, list) else [x] * len(grads) for x in (lr, mu, wd)]
    for g, lr, mu, wd in zip(grads, *per_step):
        buf = mu * buf + (1 - mu) * g
        u = (1 - mu) * g + mu * buf  # Nesterov
        u = u / u.norm(dim=1, keepdim=True) * (u.norm() / math.sqrt(rows))  # MuonEq
        u = u / (u.norm() * 1.01 + 1e-6)
        t = u if rows <= cols else u.T  # iterate on the wide orientation
        for a, b, c in POLAR_EXPRESS_COEFFS:
            A = t @ t.T
            t = a * t + (b * A + c * A @ A) @ t
        u = t if rows <= cols else t.T
        u = u * math.sqrt(min(rows, cols)) / u.norm()  # Muon+
        stat = (u ** 2).mean(dim=1 if rows >= cols else 0, keepdim=True)  # NorMuon
        v = (1 - beta2) * stat if v is None else beta2 * v + (1 - beta2) * stat
        s = u / v.sqrt()
        s = s * u.norm() / s.norm()
        lr_eff = lr * math.sqrt(max(1, rows / cols))
        p = p - lr_eff * s - lr_eff * wd * p * (s * p >= 0)
    return p

def test_muon_matches_per_matrix_reference():
    params = make_params()
    start = {k: [p.detach().clone() for p in params[k]] for k in ("wide", "tall")}
    opt = make_optimizer(params)
    grads = [make_grads(params, step) for step in range(3)]
    for g in grads:
        set_grads(params, g)
        opt.step()
    for k in ("wide", "tall"):
        for i, p in enumerate(params[k]):
            expected = reference_muon(start[k][i], [g[MUON_OFFSET[k] + i] for g in grads], lr=0.02, mu=0.95, beta2=0.9,
                                      wd=0.1)
            torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-4, msg=f"{k}[{i}]")

@pytest.mark.parametrize("tensor_hyperparams", [False, True])
def test_lr_momentum_and_weight_decay_schedules_change_each_step(monkeypatch, tensor_hyperparams):
    """base_train and chat_sft set lr, Muon momentum and weight decay on the groups before every step; each step must
    use that step's values. tensor_hyperparams: the CUDA path, which feeds them as 0-D tensors refilled each step
    (so a compiled step does not recompile), here run eagerly."""
    import functools
    import nanochat.optim
    if tensor_hyperparams:
        monkeypatch.setattr(nanochat.optim, "_step_fn", lambda fn, device: functools.partial(fn))
    lrs, mus, wds = [0.02, 0.01, 0.005], [0.85, 0.9, 0.95], [0.3, 0.1, 0.0]
    params, ref = make_params(), make_params()
    start = {k: [p.detach().clone() for p in params[k]] for k in ("wide", "tall")}
    opt = make_optimizer(params)
    ref_opt = torch.optim.AdamW(ref["small"] + ref["large"], lr=0.01, betas=(0.8, 0.95), eps=1e-10)
    grads = [make_grads(params, step) for step in range(3)]
    for g, lr, mu, wd in zip(grads, lrs, mus, wds):
        for group in [*opt.param_groups, *ref_opt.param_groups]:
            group["lr"], group["weight_decay"] = lr, wd
            if group.get("kind") == "muon":
                group["momentum"] = mu
        set_grads(params, g)
        for p, grad in zip(ref["small"] + ref["large"], g):
            p.grad = grad.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(params["small"] + params["large"], ref["small"] + ref["large"]):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5)
    for k in ("wide", "tall"):
        for i, p in enumerate(params[k]):
            grads_k = [g[MUON_OFFSET[k] + i] for g in grads]
            expected = reference_muon(start[k][i], grads_k, lr=lrs, mu=mus, beta2=0.9, wd=wds)
            torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-4, msg=f"{k}[{i}]")

def test_first_muon_update_is_near_semi_orthogonal():
    params = make_params()
    opt = make_optimizer(params, muon_wd=0.0)  # no decay: the param change is -lr_eff * update
    before = {k: [p.detach().clone() for p in params[k]] for k in ("wide", "tall")}
    run_steps(params, opt, 1)
    for k, group in (("wide", opt.param_groups[1]), ("tall", opt.param_groups[2])):
        rows, cols = params[k][0].shape
        lr_eff = group["lr"] * muon_lr_multiplier(rows, cols)
        buf = opt.state[params[k][0]]["second_momentum_buffer"]
        for i, (p, p0) in enumerate(zip(params[k], before[k])):
            update = (p0 - p.detach()) / lr_eff
            # undo NorMuon's per-row/column scale (up to a global factor) to see the orthogonalized matrix
            X = update * buf[i].sqrt()
            sv = torch.linalg.svdvals(X)
            assert sv.max() / sv.min() < 1.5, f"{k}[{i}]: singular value max/min {sv.max() / sv.min():.3f}"

def test_muon_lr_shape_multiplier():
    # After Muon+ and NorMuon's norm-preserving rescale the update has Frobenius norm sqrt(min(rows, cols)),
    # so with no weight decay each matrix moves by exactly lr * sqrt(max(1, rows/cols)) * sqrt(min(rows, cols)).
    assert muon_lr_multiplier(32, 16) == math.sqrt(2) and muon_lr_multiplier(16, 32) == 1.0
    params = make_params()
    opt = make_optimizer(params, muon_lr=0.01, muon_wd=0.0)
    before = {k: [p.detach().clone() for p in params[k]] for k in ("wide", "tall")}
    run_steps(params, opt, 1)
    expected = {"wide": 0.01 * 1.0 * 4.0, "tall": 0.01 * math.sqrt(2) * 4.0}
    for k in ("wide", "tall"):
        for p, p0 in zip(params[k], before[k]):
            assert math.isclose((p.detach() - p0).norm().item(), expected[k], rel_tol=1e-4)

def test_cautious_weight_decay_hand_worked():
    p = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    update = torch.tensor([[0.5, 0.5], [-1.0, 1.0]])
    # update*p >= 0 only at (0,0) and (1,1): decay there, plain step elsewhere
    cautious_update_(p, update, lr=0.1, wd=0.5)
    expected = torch.tensor([[1 - 0.05 - 0.05, -2 - 0.05], [3 + 0.1, 4 - 0.1 - 0.2]])
    torch.testing.assert_close(p, expected)

def test_cautious_weight_decay_in_optimizer():
    # same grads with and without weight decay: the difference is lr_eff*wd*p0 exactly where update*p0 >= 0
    runs = {}
    for wd in (0.0, 0.5):
        params = make_params()
        opt = make_optimizer(params, muon_wd=wd)
        p0 = params["tall"][0].detach().clone()
        run_steps(params, opt, 1)
        runs[wd] = params["tall"][0].detach().clone()
    lr_eff = 0.02 * math.sqrt(2)
    update = (p0 - runs[0.0]) / lr_eff
    mask = update * p0 >= 0
    assert 0 < mask.sum() < mask.numel(), "the example should decay some entries and spare others"
    torch.testing.assert_close(runs[0.0] - runs[0.5], lr_eff * 0.5 * p0 * mask, atol=1e-6, rtol=1e-5)

# -----------------------------------------------------------------------------
# Whole optimizer

def test_bitwise_determinism():
    results = []
    for _ in range(2):
        params = make_params()
        opt = make_optimizer(params)
        run_steps(params, opt, 5)
        results.append(snapshot(params))
    for a, b in zip(*results):
        assert torch.equal(a, b)

def test_compiled_step_path_matches_eager(monkeypatch):
    # On CUDA the update rules run through torch.compile(fullgraph=True) with hyperparameters as 0-D CPU tensors, a
    # path CPU never takes. Trace it here (aot_eager: dynamo + autograd functionalization, no codegen) over changing
    # lr/momentum/wd: a graph break, a Python-side value baked into the graph or a lost in-place update fails this.
    import nanochat.optim as optim
    results = []
    for step_fn in (optim._step_fn, lambda fn, device: optim._compiled(fn, "aot_eager")):
        monkeypatch.setattr(optim, "_step_fn", step_fn)
        params = make_params(large_dtype=torch.bfloat16)
        opt = make_optimizer(params)
        for step in range(4):
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * (1 - 0.2 * step)
                if group["kind"] == "muon":
                    group["momentum"], group["weight_decay"] = 0.85 + 0.03 * step, 0.1 / (step + 1)
            run_steps(params, opt, 1, start=step)
        results.append(snapshot(params))
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=f"param {i} {tuple(a.shape)}: compiled step differs")

def test_compiled_steps_survive_more_shapes_than_dynamos_recompile_limit(monkeypatch):
    # Each parameter shape is one static graph of the compiled step; dynamo's default allows 8 per function and
    # fullgraph=True raises on the 9th (FailOnRecompileLimitHit), which two model sizes in one process reach. 10 AdamW
    # and 9 Muon shapes through the real compile wrapper (eager backend: dynamo's guards and limits, no codegen) must
    # step like the uncompiled rules.
    import nanochat.optim as optim
    assert torch._dynamo.config.recompile_limit == 8  # the default this test is sized against
    torch._dynamo.reset()  # graphs other tests compiled count toward the same per-function limit
    def build():
        g = torch.Generator().manual_seed(0)
        adamw = [torch.nn.Parameter(torch.randn(n, 3, generator=g)) for n in range(1, 11)]
        muon = [[torch.nn.Parameter(torch.randn(rows, 6, generator=g)) for _ in range(2)] for rows in range(2, 11)]
        opt = MuonAdamW([{"kind": "adamw", "params": adamw, "lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-10,
                          "weight_decay": 0.01},
                         *({"kind": "muon", "params": ps, "lr": 0.02, "momentum": 0.95, "beta2": 0.9,
                            "weight_decay": 0.1, "ns_steps": 5} for ps in muon)])
        return adamw + [p for ps in muon for p in ps], opt
    results = []
    for step_fn in (optim._step_fn, lambda fn, device: optim._compiled(fn, "eager")):
        monkeypatch.setattr(optim, "_step_fn", step_fn)
        params, opt = build()
        for step in range(2):
            g = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        results.append([p.detach().clone() for p in params])
    torch._dynamo.reset()
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"param {i} {tuple(a.shape)}: compiled step differs")

def test_convergence_toward_targets():
    params = make_params(seed=0)
    targets = snapshot(make_params(seed=1))
    opt = make_optimizer(params, muon_lr=0.1, muon_wd=0.0, adamw_wd=0.0)
    for group in opt.param_groups[:1]:
        group["lr"] = 0.1
    start = [(p.detach() - t).norm() for p, t in zip(all_params(params), targets)]
    for _ in range(50):
        for p, t in zip(all_params(params), targets):
            p.grad = p.detach() - t  # gradient of 0.5*||p - t||^2
        opt.step()
    for i, (p, t) in enumerate(zip(all_params(params), targets)):
        end = (p.detach() - t).norm()
        assert end < 0.5 * start[i], f"param {i} {tuple(p.shape)}: distance {start[i]:.3f} -> {end:.3f}"

def test_state_dict_round_trip(tmp_path):
    # bf16 "embedding": torch would cast its moments to bf16 on load; ours must come back fp32 and bit-identical
    params = make_params(large_dtype=torch.bfloat16)
    opt = make_optimizer(params)
    run_steps(params, opt, 3)
    torch.save(opt.state_dict(), tmp_path / "optim.pt")
    resumed_from = snapshot(params)
    run_steps(params, opt, 2, start=3)

    params2 = make_params(large_dtype=torch.bfloat16)
    with torch.no_grad():
        for p, saved in zip(all_params(params2), resumed_from):
            p.copy_(saved)
    opt2 = make_optimizer(params2, muon_lr=0.5)  # a wrong lr that the loaded param groups must overwrite
    opt2.load_state_dict(torch.load(tmp_path / "optim.pt"))
    assert opt2.state[params2["large"][0]]["exp_avg"].dtype == torch.float32
    assert opt2.param_groups[1]["lr"] == 0.02 and opt2.param_groups[1]["initial_lr"] == 0.02
    run_steps(params2, opt2, 2, start=3)
    for a, b in zip(snapshot(params), snapshot(params2)):
        assert torch.equal(a, b)

def test_bad_param_groups_are_rejected():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="missing"):
        MuonAdamW([{"kind": "muon", "params": [p], "lr": 0.02}])
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([{"params": [p], "lr": 0.02}])
    with pytest.raises(AssertionError, match="one shape"):
        MuonAdamW([{"kind": "muon", "params": [p, torch.nn.Parameter(torch.zeros(4, 8))], "lr": 0.02,
                    "momentum": 0.95, "beta2": 0.9, "weight_decay": 0.0, "ns_steps": 5}])

# -----------------------------------------------------------------------------
# Distributed: 2 gloo ranks with different grads == 1 process with the averaged grads.
# Adam and Muon are nearly blind to the gradient's scale, so a SUM where an average belongs would pass unseen;
# a large AdamW eps (DIST_EPS, comparable to sqrt(v)) makes the scale visible.

DIST_EPS = 0.1

# gloo gained reduce_scatter and AVG in torch 2.13 (when reduce_scatter_single appeared); NCCL's native path
# can then be exercised on CPU too. Older torch tests only the fallback that gloo runs in production.
MODES = ["fallback", "native"] if hasattr(dist, "reduce_scatter_single") else ["fallback"]

def _dist_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = {}
        for mode in MODES:
            params = make_params()
            opt = make_optimizer(params, eps=DIST_EPS)
            opt.native_collectives = mode == "native"
            run_steps(params, opt, 2, rank=rank)
            shard = copy.deepcopy(opt.state_dict())
            resumed_from = snapshot(params)
            run_steps(params, opt, 1, rank=rank, start=2)
            # resume this rank's shard into a fresh optimizer: the next step must be identical
            params2 = make_params()
            with torch.no_grad():
                for p, saved in zip(all_params(params2), resumed_from):
                    p.copy_(saved)
            opt2 = make_optimizer(params2, eps=DIST_EPS)
            opt2.native_collectives = mode == "native"
            opt2.load_state_dict(shard)
            run_steps(params2, opt2, 1, rank=rank, start=2)
            results[mode] = {"final": snapshot(params), "resumed": snapshot(params2), "shard": shard}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()

@pytest.mark.parametrize("world_size", [2, 4])
def test_distributed_matches_single_process_with_averaged_grads(tmp_path, world_size):
    # 4 ranks: the wide group's K=3 leaves rank 3 nothing but padding, the tall group's K=5 gives rank 2 one real
    # matrix and one padded slot and rank 3 none (chunk ceil(5/4) = 2); 8 GPUs split d12's 12 layers the same way.
    W = world_size
    mp.spawn(_dist_worker, args=(W, str(tmp_path / "init"), str(tmp_path)), nprocs=W)

    # reference: one process, grads averaged over the ranks' grads
    params = make_params()
    opt = make_optimizer(params, eps=DIST_EPS)
    for step in range(3):
        per_rank = [make_grads(params, step, r) for r in range(W)]
        set_grads(params, [sum(gs) / W for gs in zip(*per_rank)])
        opt.step()
    reference = snapshot(params)

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(W)]
    for mode in MODES:
        for r, res in enumerate(ranks):
            for i, (a, b) in enumerate(zip(res[mode]["final"], reference)):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{mode} rank {r} param {i}")
            for a, b in zip(res[mode]["final"], res[mode]["resumed"]):
                assert torch.equal(a, b), f"{mode} rank {r}: resuming its state shard changed the next step"
            # the shard holds this rank's part only: 1/W of the large param, ceil(K/W) Muon matrices
            # (state is keyed by param index: small 0-1, large 2, wide 3-5 (group state on 3), tall 6-10 (on 6))
            state = res[mode]["shard"]["state"]
            assert state[0]["exp_avg"].shape == (4,) and state[1]["exp_avg"].shape == ()
            assert state[2]["exp_avg"].shape == (64 // W, 32)
            assert state[3]["momentum_buffer"].shape == (-(-3 // W), 16, 32)
            assert state[3]["second_momentum_buffer"].shape == (-(-3 // W), 1, 32)
            assert state[6]["momentum_buffer"].shape == (-(-5 // W), 32, 16)
            assert state[6]["second_momentum_buffer"].shape == (-(-5 // W), 32, 1)
        # ranks hold different state shards (different grads chunks) but identical params
        shards = [ranks[r][mode]["shard"]["state"][2]["exp_avg"] for r in (0, 1)]
        assert not torch.equal(*shards)

    # a rank's shard does not fit a different world size, and says so
    single = make_optimizer(make_params(), eps=DIST_EPS)
    with pytest.raises(ValueError, match="sharded per rank"):
        single.load_state_dict(ranks[0][MODES[0]]["shard"])
