"""
MuonAdamW: one optimizer for the whole model. Embeddings, lm_head and scalars take AdamW; every
matrix inside the transformer blocks takes Muon (MuonEq + Polar Express + Muon+ + NorMuon + cautious
weight decay), one group per distinct shape so a group's matrices stack into one (K, rows, cols)
tensor and update in a few batched kernels.

Param groups (built by GPT.setup_optimizer; extra keys such as "initial_lr" are kept untouched):
    {"kind": "adamw", "params": [...], "lr", "betas": (b1, b2), "eps", "weight_decay"}
    {"kind": "muon",  "params": [... all one 2-D shape], "lr", "momentum", "beta2", "weight_decay",
     "ns_steps"}
Schedules change group["lr"], group["momentum"], group["weight_decay"] between steps; step() reads
them every call.

Distributed (ZeRO-2-like, no DDP wrapper): under a multi-rank process group the optimizer averages
the gradients itself (see MuonAdamW). Optimizer state is sharded, so state_dict() is per rank: save
and load one shard per rank. Also here: how the learning rates and weight decay scale with the batch
size (batch_lr_scale and friends).

Where the ideas come from: Muon, momentum orthogonalized by a Newton-Schulz iteration (Keller
Jordan, https://kellerjordan.github.io/posts/muon/); its Polar Express coefficients
(https://arxiv.org/abs/2505.16932); NorMuon's per-row second moment
(https://arxiv.org/abs/2510.05491); AdamW (https://arxiv.org/abs/1711.05101); how the batch size
follows the data and weight decay the batch (Power Lines, https://arxiv.org/abs/2505.13738).

Leaves out: closures in step(), sparse gradients, params that are not 2-D in Muon groups.
"""

import math
import functools

import torch
import torch.distributed as dist

from nanochat.common import COMPUTE_DTYPE, is_dist

# -----------------------------------------------------------------------------
# Update rules as plain functions of tensors. Hyperparameters arrive as Python floats (eager) or as
# 0-D CPU tensors (compiled), and only arithmetic that accepts both is used, so one definition
# serves both paths.

# AdamW params with fewer elements than this are all-reduced whole; sharding them would cost more in
# latency than it saves in memory.
MIN_SHARD_NUMEL = 1024

# Polar Express (Amsel et al., arXiv 2505.16932): per-iteration (a, b, c) for num_iters=5, safety
# 2e-2, cushion 2.
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]

def adamw_step_fused(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd):
    """
    One AdamW step in place on p (any float dtype); moments and math are fp32, also for bf16 params:
    with wte's beta2 = 0.995 a step moves v by 0.005 x (g^2 - v), which bf16 rounds away once it is
    under half its spacing (v of a constant g = 1 then stalls at 0.61, tests/test_optim.py).
    """
    p32, g = p.float(), grad.float()  # p32 is p itself when p is fp32
    p32.mul_(1 - lr * wd)  # decoupled weight decay first (same order as torch.optim.AdamW)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.lerp_(g.square(), 1 - beta2)
    denom = (exp_avg_sq / (1 - beta2 ** step)).sqrt() + eps  # bias-corrected
    p32.sub_((lr / (1 - beta1 ** step)) * exp_avg / denom)
    p.copy_(p32)  # no-op when p is fp32; rounds back to bf16 embeddings otherwise

def polar_express(X, ns_steps=5):
    """
    Approximate the orthogonal polar factor U V^T of each matrix in X (..., rows, cols), i.e. push
    every singular value toward 1. The Frobenius normalization first puts all singular values below
    1, where the iteration converges.
    """
    n = len(POLAR_EXPRESS_COEFFS)
    assert 1 <= ns_steps <= n, f"ns_steps={ns_steps} must be in 1..{n}"
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    tall = X.size(-2) > X.size(-1)  # multiply on the small side: Gram matrix min(rows, cols) square
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        if tall:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    return X

def cautious_update_(p, update, lr, wd):
    """p <- p - lr*update - lr*wd*p*mask, decaying only
    where the update already pulls p toward zero."""
    p32 = p.float()
    mask = (update * p32) >= 0
    p.copy_(p32 - lr * update - lr * wd * p32 * mask)

def muon_step_fused(grads, params, momentum_buffer, second_momentum_buffer, momentum, lr, wd, beta2,
                    ns_steps, red_dim):
    """
    One Muon step in place on params (K, rows, cols) from grads (K, rows, cols). lr is already the
    effective lr (shape multiplier applied). red_dim=-1: NorMuon statistics per row, -2: per column.
    """
    # Nesterov momentum, as lerps: buf = mu*buf + (1-mu)*g, then look ahead g = (1-mu)*g + mu*buf
    g = grads.float()
    momentum_buffer.lerp_(g, 1 - momentum)
    g = g.lerp(momentum_buffer, momentum)
    X = g.bfloat16() if COMPUTE_DTYPE == torch.bfloat16 else g
    # MuonEq: give every row the mean row norm ||X||_F/sqrt(rows), so no row dominates the
    # orthogonalization
    mean_row_norm = X.norm(dim=(-2, -1), keepdim=True) / math.sqrt(X.size(-2))
    X = X * (mean_row_norm / X.norm(dim=-1, keepdim=True).clamp_min(1e-7))
    X = polar_express(X, ns_steps)
    # Muon+: fix the Frobenius norm at sqrt(min(rows, cols)), the norm of an exact semi-orthogonal
    # matrix
    X = X.float()
    X = X * (math.sqrt(min(X.shape[-2:])) / X.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-7))
    # NorMuon: factored second moment per row (or column), scale by its rsqrt, then restore the
    # total norm
    red_size = X.size(red_dim)
    v_mean = X.square().mean(dim=red_dim, keepdim=True)
    second_momentum_buffer.lerp_(v_mean, 1 - beta2)
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    v_norm_new = ((v_mean * step_size.square()).sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    update = X * (step_size * (v_norm / v_norm_new.clamp_min(1e-10)))
    cautious_update_(params, update, lr, wd)

def muon_lr_multiplier(rows, cols):
    """Tall matrices (e.g. c_fc, 4d x d) get sqrt(rows/cols) more lr; wide and square ones get 1."""
    return math.sqrt(max(1.0, rows / cols))

@functools.cache
def _compiled(fn, backend="inductor"):
    """
    fn through torch.compile(fullgraph=True, dynamic=False): one static graph per argument signature
    (shape, dtype), i.e. per parameter shape; two model sizes in one process (bench.train) make
    more than the 8 graphs dynamo allows per function, and with fullgraph=True the 9th raises, so
    each new signature raises the limit, for this call only, to the number of signatures seen. A
    recompile loop on a signature already seen (a value baked into the graph) still meets the plain
    limit. (dynamic=True would trace one symbolic graph, with kernels nobody has timed on a GPU.)
    """
    compiled = torch.compile(fn, dynamic=False, fullgraph=True, backend=backend)
    seen = set()
    def step(*args):
        key = tuple((a.shape, a.stride(), a.dtype, a.requires_grad) if torch.is_tensor(a) else a
                    for a in args)
        if key in seen:
            return compiled(*args)
        seen.add(key)
        limit = max(torch._dynamo.config.recompile_limit, len(seen))
        with torch._dynamo.config.patch(recompile_limit=limit):
            return compiled(*args)
    return step

def _step_fn(fn, device):
    """Compiled on CUDA, whatever the model's --compile: there it fuses each elementwise chain into
    a few kernels. On CPU/MPS the first compile costs tens of seconds and the step is
    matmul/memory bound anyway."""
    return _compiled(fn) if device.type == "cuda" else fn

# The collectives were renamed in torch 2.13 (the old names warn); 2.11/2.12 only have the old ones.
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)

def _noop():
    pass

def _after(wait, then):
    """A finish() that waits for async work, then runs `then` (e.g. turns a SUM into an average)."""
    def finish():
        wait()
        then()
    return finish

def _run_step(fn, device, tensors, scalars, values, static=()):
    """fn(*tensors, *values, *static): eagerly with Python floats, or compiled with the values
    copied into the 0-D CPU tensors `scalars`, so new values (schedules) reuse the graph instead of
    recompiling."""
    step = _step_fn(fn, device)
    if step is not fn:
        for t, v in zip(scalars, values):
            t.fill_(v)
        values = scalars
    step(*tensors, *values, *static)

# -----------------------------------------------------------------------------
# Batch-size scaling: the learning rates and weight decay were tuned at d12 with 2^19-token batches

REFERENCE_BATCH_TOKENS = 2 ** 19

def batch_size_for(num_scaling_params, reference_scaling_params):
    """Power Lines, B_opt ~ D^0.383 with D = ratio x scaling params; relative to d12's 2^19 the
    ratio cancels, so B follows the model size, rounded to a power of two: d8 2^18, d10-d16 2^19,
    d18-d26 2^20, d32+ 2^21."""
    ratio = num_scaling_params / reference_scaling_params
    return 2 ** round(math.log2(REFERENCE_BATCH_TOKENS * ratio ** 0.383))

def batch_lr_scale(total_batch_size):
    """Each learning rate scales with sqrt(B / 2^19), the square-root rule for Adam-like methods."""
    return (total_batch_size / REFERENCE_BATCH_TOKENS) ** 0.5

def scaled_weight_decay(weight_decay, total_batch_size, num_scaling_params,
                        reference_scaling_params):
    """T_epoch rule (arXiv 2405.13698): lambda ~ sqrt(B / 2^19) x D_ref / D, D_ref = d12's tokens
    at the same data:param ratio, so the ratio cancels: D_ref / D = reference / this model's
    scaling params."""
    scale = batch_lr_scale(total_batch_size)
    return weight_decay * scale * reference_scaling_params / num_scaling_params

# -----------------------------------------------------------------------------

class MuonAdamW(torch.optim.Optimizer):
    """
    AdamW and Muon param groups in one optimizer; see the module docstring for the group keys.
    step() runs in three phases so communication overlaps compute: (1) launch every gradient
    reduction at once: small AdamW params are all-reduced whole, large ones reduce-scattered along
    dim 0, a Muon group's stacked (K, rows, cols) grads reduce-scattered in chunks of ceil(K/W)
    matrices; (2) per group, wait for its reduction and update only the slice this rank owns (so
    each rank orthogonalizes 1/W of the matrices); (3) all-gather the updated slices to every rank.
    """

    def __init__(self, param_groups):
        # Decided once: who we are, and whether the backend has reduce_scatter and AVG natively.
        # NCCL has both; gloo only gained them in recent torch, so it takes the fallbacks
        # (all_reduce SUM, then slice and divide; list all_gather), which give the same numbers.
        # Tests flip native_collectives to cover both on gloo. A CUDA run's group is
        # "cpu:gloo,cuda:nccl" (common.process_group_backend): CUDA grads go through NCCL.
        self.world_size = dist.get_world_size() if is_dist() else 1
        self.rank = dist.get_rank() if is_dist() else 0
        self.native_collectives = is_dist() and "nccl" in str(dist.get_backend())
        super().__init__(param_groups, defaults={})
        # 0-D CPU tensors that carry hyperparameters into compiled steps (see _run_step)
        self._adamw_t = [torch.tensor(0.0) for _ in range(6)]  # step, lr, beta1, beta2, eps, wd
        self._muon_t = [torch.tensor(0.0) for _ in range(4)]  # momentum, lr, wd, beta2

    def add_param_group(self, group):
        required = {"adamw": ("params", "lr", "betas", "eps", "weight_decay"),
                    "muon": ("params", "lr", "momentum", "beta2", "weight_decay", "ns_steps")}
        kind = group.get("kind")
        if kind not in required:
            raise ValueError(f'param group kind={kind!r}: a group needs "kind": "adamw" or "muon"')
        missing = [k for k in required[kind] if k not in group]
        if missing:
            raise ValueError(f"{kind} param group is missing {missing}; "
                             f"required keys: {list(required[kind])}")
        super().add_param_group(group)
        if kind == "muon":
            shapes = sorted({tuple(p.shape) for p in group["params"]})
            assert len(shapes) == 1 and len(shapes[0]) == 2, \
                f"a muon group needs 2-D params of one shape, got {shapes}"
        else:
            for p in group["params"]:
                assert p.numel() < MIN_SHARD_NUMEL or p.shape[0] % self.world_size == 0, (
                    f"AdamW param of shape {tuple(p.shape)} is sharded along dim 0 across "
                    f"{self.world_size} ranks, so dim 0 must be divisible by the world size: pad "
                    f"it (e.g. vocab to a multiple of 64)")

    # ---- collectives: each starts async work, returns (result, finish) or finish; finish() waits

    def _all_reduce_avg(self, x):
        """Average x across ranks in place. Returns (x, finish)."""
        if self.world_size == 1:
            return x, _noop
        if self.native_collectives:
            return x, dist.all_reduce(x, op=dist.ReduceOp.AVG, async_op=True).wait
        work = dist.all_reduce(x, op=dist.ReduceOp.SUM, async_op=True)
        return x, _after(work.wait, lambda: x.div_(self.world_size))

    def _reduce_scatter_avg(self, x):
        """Average x across ranks and keep this rank's 1/W
        slice along dim 0. Returns (slice, finish)."""
        W = self.world_size
        if W == 1:
            return x, _noop
        n = x.size(0) // W
        if self.native_collectives:
            out = torch.empty_like(x[:n])
            return out, _reduce_scatter_single(out, x, op=dist.ReduceOp.AVG, async_op=True).wait
        # in place: x is a grad or a scratch stack
        work = dist.all_reduce(x, op=dist.ReduceOp.SUM, async_op=True)
        out = x[self.rank * n:(self.rank + 1) * n]
        return out, _after(work.wait, lambda: out.div_(W))

    def _all_gather(self, out, x):
        """Fill out (W*n, ...) with every rank's x (n, ...)
        in rank order; x may be this rank's slice of out."""
        if self.native_collectives:
            return _all_gather_single(out, x, async_op=True).wait
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        work = dist.all_gather(parts, x, async_op=True)
        return _after(work.wait, lambda: torch.cat(parts, out=out))  # parts never alias out

    # ---- sharding: what this rank owns

    def _adamw_sharded(self, p):
        return self.world_size > 1 and p.numel() >= MIN_SHARD_NUMEL

    def _muon_chunk(self, group):
        # ceil(K/W) matrices per rank, the last ones zero-padded
        return -(-len(group["params"]) // self.world_size)

    def _expected_state_shapes(self, group, p):
        if group["kind"] == "adamw":  # a shard is p.chunk(W)[rank] (dim 0 divides by W)
            owned = tuple(p.chunk(self.world_size)[0].shape if self._adamw_sharded(p) else p.shape)
            return {"exp_avg": owned, "exp_avg_sq": owned}
        chunk, (rows, cols) = self._muon_chunk(group), p.shape
        return {"momentum_buffer": (chunk, rows, cols),
                "second_momentum_buffer": (chunk, rows, 1) if rows >= cols else (chunk, 1, cols)}

    # ---- the step: launch all reductions, per group wait/update/launch a gather, wait for gathers

    @torch.no_grad()
    def step(self):
        reduced = [self._launch_adamw_reduce(g) if g["kind"] == "adamw" else
                   self._launch_muon_reduce(g) for g in self.param_groups]
        gathers = []
        for group, pending in zip(self.param_groups, reduced):
            if group["kind"] == "adamw":
                gathers += self._adamw_update(group, pending)
            elif pending is not None:
                gathers.append(self._muon_update(group, *pending))
        for finish in gathers:
            finish()

    def _launch_adamw_reduce(self, group):
        """(param, its averaged grad or this rank's shard of it, finish) per param with a grad."""
        return [(p, *(self._reduce_scatter_avg(p.grad) if self._adamw_sharded(p)
                      else self._all_reduce_avg(p.grad)))
                for p in group["params"] if p.grad is not None]

    def _adamw_update(self, group, pending):
        """Update each param (or this rank's shard of it) -> the finish() of each shard's
        all-gather."""
        gathers = []
        for p, grad, finish in pending:
            finish()
            sharded = self._adamw_sharded(p)
            # dim 0 divides by W (add_param_group)
            p_owned = p.chunk(self.world_size)[self.rank] if sharded else p
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p_owned, dtype=torch.float32),
                             exp_avg_sq=torch.zeros_like(p_owned, dtype=torch.float32))
            state["step"] += 1
            tensors = (p_owned, grad, state["exp_avg"], state["exp_avg_sq"])
            values = (state["step"], group["lr"], *group["betas"], group["eps"],
                      group["weight_decay"])
            _run_step(adamw_step_fused, p.device, tensors, self._adamw_t, values)
            if sharded:
                gathers.append(self._all_gather(p, p_owned))
        return gathers

    def _launch_muon_reduce(self, group):
        params = group["params"]
        missing = [i for i, p in enumerate(params) if p.grad is None]
        if len(missing) == len(params):
            return None
        # the ranks must agree on which matrices take part: a partial group is an error, not a skip
        assert not missing, f"muon group of shape {tuple(params[0].shape)}: params {missing} " \
                            f"have no grad but others do"
        padded = self._muon_chunk(group) * self.world_size
        stacked = params[0].grad.new_zeros((padded, *params[0].shape))
        torch.stack([p.grad for p in params], out=stacked[:len(params)])
        return self._reduce_scatter_avg(stacked)

    def _muon_update(self, group, grads, finish):
        finish()
        params, chunk = group["params"], self._muon_chunk(group)
        rows, cols = params[0].shape
        lo, hi = self.rank * chunk, min((self.rank + 1) * chunk, len(params))
        owned = params[0].new_zeros((chunk, rows, cols))
        if hi > lo:
            torch.stack(params[lo:hi], out=owned[:hi - lo])
        state = self.state[params[0]]  # one state per group, kept on its first param
        if not state:  # momentum_buffer and second_momentum_buffer
            state.update({k: torch.zeros(shape, dtype=torch.float32, device=owned.device)
                          for k, shape in self._expected_state_shapes(group, params[0]).items()})
        values = (group["momentum"], group["lr"] * muon_lr_multiplier(rows, cols),
                  group["weight_decay"], group["beta2"])
        tensors = (grads, owned, state["momentum_buffer"], state["second_momentum_buffer"])
        _run_step(muon_step_fused, owned.device, tensors, self._muon_t, values,
                  static=(group["ns_steps"], -1 if rows >= cols else -2))
        stacked, gathered = owned, _noop  # one rank: owned holds every matrix
        if self.world_size > 1:
            stacked = owned.new_empty((chunk * self.world_size, rows, cols))
            gathered = self._all_gather(stacked, owned)
        matrices = list(stacked[:len(params)].unbind(0))
        return _after(gathered, lambda: torch._foreach_copy_(params, matrices))

    # ---- per-rank state dicts

    def load_state_dict(self, state_dict):
        saved_kinds = [g.get("kind") for g in state_dict["param_groups"]]
        kinds = [g["kind"] for g in self.param_groups]
        if saved_kinds != kinds:
            raise ValueError(f"saved optimizer has groups {saved_kinds} but this one has {kinds}: "
                             "build the model and optimizer as the run that saved it did")
        super().load_state_dict(state_dict)
        # torch casts every floating state tensor to its param's dtype; our moments stay fp32 even
        # for bf16 params (bf16 cannot hold a 0.5% EMA increment), so put them back as saved
        params = [(g, p) for g in self.param_groups for p in g["params"]]
        for idx, saved in state_dict["state"].items():
            group, p = params[idx]
            state = self.state[p]
            state.update({k: v.to(device=p.device, copy=True) for k, v in saved.items()
                          if torch.is_tensor(v)})
            for k, shape in self._expected_state_shapes(group, p).items():
                if k in state and tuple(state[k].shape) != shape:
                    raise ValueError(
                        f"optimizer state {k} for a param of shape {tuple(p.shape)} has "
                        f"shape {tuple(state[k].shape)}, expected {shape} on rank "
                        f"{self.rank} of {self.world_size}: state is sharded per rank, so "
                        f"load the shard this rank saved, with the same number of ranks")
