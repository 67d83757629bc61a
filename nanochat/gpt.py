"""
The GPT model: the architecture of karpathy/nanochat master (https://github.com/karpathy/nanochat),
its KV cache, optimizer routing and FLOP accounting.

    from nanochat.gpt import GPT, GPTConfig
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=12, n_head=6, n_kv_head=6, n_embd=768))
    model.to_empty(device="cuda")   # __init__ allocates nothing
    model.init_weights()            # sets every value
    loss = model(idx, targets)      # or logits = model(idx); or model(idx, kv_cache=cache)

Per forward pass: token embedding -> RMSNorm -> smear (mix in the previous token) -> x0 := x -> per
layer x = resid_lambda*x + x0_lambda*x0 then a pre-norm block (attention with RoPE, QK-norm x1.2,
sliding window, value embeddings on alternating layers; ReLU^2 MLP) -> backout (subtract a fraction
of the mid-depth residual) -> RMSNorm -> lm_head -> fp32 -> softcap 15 -> cross-entropy
(ignore_index -1).

Where the ideas come from: rotary embeddings (https://arxiv.org/abs/2104.09864); ReLU^2 (Primer,
https://arxiv.org/abs/2109.08668); QK-norm and learned x0 residual scalars as in the modded-nanogpt
speedrun (https://github.com/KellerJordan/modded-nanogpt); value embeddings mixed
into v (ResFormer, https://arxiv.org/abs/2410.17897); logit softcapping (Gemma 2,
https://arxiv.org/abs/2408.00118). Attention itself (one exact implementation per device) lives in
nanochat/attention.py. Left out: dropout, biases, tied embeddings, training-time document masking.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.attention import attention, attention_rows
from nanochat.common import COMPUTE_DTYPE
from nanochat.optim import MuonAdamW

SMEAR_CHANNELS = 24      # smear gate reads the first 24 channels of the normalized embedding
VE_GATE_CHANNELS = 12    # value-embedding gate reads the first 12 channels of the attention input
ROPE_BASE = 100_000
QK_SCALE = 1.2           # after QK RMSNorm: sharper attention than the kernel's 1/sqrt(D) alone
SOFTCAP = 15.0
VOCAB_MULTIPLE = 64      # embedding/lm_head rows padded (tensor-core friendly); logits sliced back
SHORT_WINDOW_TILE = 128  # "S" window = T/4 rounded up to a multiple of this
ROPE_HEADROOM = 10       # cos/sin precomputed for 10x sequence_len positions (long generations)

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"

def config_for_depth(depth, aspect_ratio=64, head_dim=128, **fields):
    """The one complexity dial: width = depth x aspect_ratio rounded up to whole heads of head_dim;
    no GQA."""
    n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = n_embd // head_dim
    return GPTConfig(n_layer=depth, n_embd=n_embd, n_head=n_head, n_kv_head=n_head, **fields)

def validate_config(config):
    """Raise ValueError naming the bad field and the fix."""
    c = config
    if c.n_embd % c.n_head != 0:
        raise ValueError(f"n_embd={c.n_embd} is not divisible by n_head={c.n_head}; "
                         f"pick n_embd = n_head * head_dim")
    if c.n_kv_head <= 0 or c.n_head % c.n_kv_head != 0:
        raise ValueError(f"n_head={c.n_head} is not divisible by n_kv_head={c.n_kv_head}: "
                         f"GQA needs that")
    if (c.n_embd // c.n_head) % 2 != 0:
        raise ValueError(f"head_dim={c.n_embd // c.n_head} is odd; rotary embeddings rotate "
                         f"pairs of channels")
    if c.n_embd < SMEAR_CHANNELS:
        raise ValueError(f"n_embd={c.n_embd} < {SMEAR_CHANNELS}, the channels the smear gate "
                         f"reads: use a wider model")
    bad = sorted(set(c.window_pattern.upper()) - set("SL"))
    if not c.window_pattern or bad:
        raise ValueError(f"window_pattern={c.window_pattern!r} has characters {bad}; use "
                         f"only S (short window) and L (full context), e.g. 'SSSL' or 'L'")
    if c.n_layer < 1 or c.sequence_len < 1 or c.vocab_size < 1:
        raise ValueError(f"n_layer={c.n_layer}, sequence_len={c.sequence_len}, "
                         f"vocab_size={c.vocab_size}: need all > 0")

def compute_window_sizes(config):
    """Left window per layer: the pattern tiled over layers, the last layer forced to L (full
    context)."""
    T = config.sequence_len
    short = min(T, math.ceil(T / 4 / SHORT_WINDOW_TILE) * SHORT_WINDOW_TILE)  # 512 at T=2048
    pattern = config.window_pattern.upper()
    sizes = [short if pattern[i % len(pattern)] == "S" else T for i in range(config.n_layer)]
    return sizes[:-1] + [T]

def has_value_embedding(layer_idx, n_layer):
    """Alternating layers, always including the last one."""
    return layer_idx % 2 == (n_layer - 1) % 2

def norm(x):
    # functional RMSNorm without a learnable gain, in the activation dtype
    return F.rms_norm(x, (x.size(-1),))

class Linear(nn.Linear):
    """Bias-free linear keeping an fp32 master weight, cast to the input's dtype at use (no
    autocast anywhere)."""
    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))

def rotate_and_norm(x, cos, sin):
    """
    Rotary position embedding, then per-head RMSNorm scaled by QK_SCALE: x (B, T, heads, D).
    Non-interleaved halves: channel j pairs with j + D/2, so with x = [x1, x2], cos = [c, c] and
    sin = [s, -s] the result is [x1 c + x2 s, x2 c - x1 s] = x cos + roll(x, D/2) sin.
    """
    x = x * cos + torch.roll(x, x.size(-1) // 2, dims=-1) * sin
    return norm(x) * QK_SCALE

# -----------------------------------------------------------------------------
# Model

class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(self.n_head * self.head_dim, config.n_embd)
        has_ve = has_value_embedding(layer_idx, config.n_layer)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head) if has_ve else None
        self.c_qkv = None  # generating: c_q, c_k, c_v stacked (engine.prepare_for_inference)

    def forward(self, x, ve, cos_sin, window, kv_cache, pos0):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        cos, sin = cos_sin
        if self.c_qkv is None:
            q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
            q = rotate_and_norm(q.view(B, T, H, D), cos, sin)
            k = rotate_and_norm(k.view(B, T, Hkv, D), cos, sin)
        else:  # generating: one matrix, and q and k heads rotated and normed as one tensor
            qk, v = self.c_qkv(x).split([(H + Hkv) * D, Hkv * D], dim=-1)
            q, k = rotate_and_norm(qk.view(B, T, H + Hkv, D), cos, sin).split([H, Hkv], dim=2)
        v = v.view(B, T, Hkv, D)  # q, k, v: (B, T, heads, D)
        if ve is not None:
            # ResFormer value embedding, mixed per kv-head by an input-dependent gate in (0, 3)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, Hkv, D)
        if kv_cache is None:
            y = attention(q, k, v, window)
        elif isinstance(pos0, torch.Tensor):  # rows at their own positions
            k_cache, v_cache = kv_cache.get_layer_cache(self.layer_idx)
            y = attention_rows(q, k, v, k_cache, v_cache, pos0, kv_cache.row_positions, window)
        else:
            k_cache, v_cache = kv_cache.get_layer_cache(self.layer_idx)
            k_cache[:, pos0:pos0 + T], v_cache[:, pos0:pos0 + T] = k, v
            lo = max(0, pos0 - window)  # older keys are invisible to every new query
            y = attention(q, k_cache[:, lo:pos0 + T], v_cache[:, lo:pos0 + T], window)
        return self.c_proj(y.reshape(B, T, -1))

class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())

class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window, kv_cache, pos0):
        x = x + self.attn(norm(x), ve, cos_sin, window, kv_cache, pos0)
        return x + self.mlp(norm(x))

class GPT(nn.Module):
    def __init__(self, config):
        """Builds the structure only (runs on the meta device): values are set by init_weights()."""
        super().__init__()
        validate_config(config)
        self.config = config
        # Activations and KV cache run in this dtype: COMPUTE_DTYPE while training (fp32 master
        # weights cast at use); engine.prepare_for_inference holds the weights in the inference
        # dtype instead and sets it to match.
        self.compute_dtype = COMPUTE_DTYPE
        self.window_sizes = compute_window_sizes(config)
        L, C = config.n_layer, config.n_embd
        self.head_dim = C // config.n_head
        self.padded_vocab_size = math.ceil(config.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(self.padded_vocab_size, C),
                                          "h": nn.ModuleList([Block(config, i) for i in range(L)])})
        self.lm_head = Linear(C, self.padded_vocab_size)  # untied from wte
        ve_width = config.n_kv_head * self.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(self.padded_vocab_size, ve_width)
                                           for i in range(L) if has_value_embedding(i, L)})
        # Embedding tables are huge and only looked up: keep them in the compute dtype (bf16 or
        # fp32; common refuses fp16, which would lose too much)
        self.transformer.wte.to(dtype=COMPUTE_DTYPE)
        self.value_embeds.to(dtype=COMPUTE_DTYPE)
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.register_buffer("cos", None, persistent=False)  # set by set_rotary, not checkpointed
        self.register_buffer("sin", None, persistent=False)
        self.set_rotary(ROPE_HEADROOM * config.sequence_len)

    @torch.no_grad()
    def init_weights(self):
        """
        Every initial value, s = sqrt(3/n_embd) (uniform with std 1/sqrt(n_embd)): wte N(0, 0.8);
        lm_head N(0, 0.001); c_q, c_k, c_v U(-s, s); attention and MLP c_proj zeros; c_fc U(-0.4s,
        0.4s); value embeddings U(-s, s); VE gates and smear gate U(0, 0.02); resid_lambdas 1.15 ->
        1.05 and x0_lambdas 0.20 -> 0.05 linearly over layers; smear_lambda 0; backout_lambda 0.2.
        Also rebuilds the rotary tables (to_empty() leaves buffers uninitialized).
        """
        L, s = self.config.n_layer, math.sqrt(3.0 / self.config.n_embd)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        self.resid_lambdas.copy_(torch.linspace(1.15, 1.05, L))
        self.x0_lambdas.copy_(torch.linspace(0.20, 0.05, L))
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        self.smear_lambda.zero_()
        self.backout_lambda.fill_(0.2)
        self.set_rotary(ROPE_HEADROOM * self.config.sequence_len)

    def get_device(self):
        return self.transformer.wte.weight.device

    def set_rotary(self, n):
        """Rotary tables for positions 0..n-1, shaped (1, n, 1, head_dim) to broadcast over (B, T,
        H, D): cos = [c, c] and sin = [s, -s] (rotate_and_norm), computed afresh in fp32, held in
        the compute dtype."""
        f32 = dict(dtype=torch.float32, device=self.get_device())
        inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, self.head_dim, 2, **f32) / self.head_dim))
        freqs = torch.outer(torch.arange(n, **f32), inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        self.cos = torch.cat([cos, cos], dim=1).to(self.compute_dtype)[None, :, None, :]
        self.sin = torch.cat([sin, -sin], dim=1).to(self.compute_dtype)[None, :, None, :]

    def ensure_rotary_positions(self, num_positions):
        """
        Grow the rotary tables to cover num_positions (e.g. a 10-shot CORE prompt past 10 x
        sequence_len); positions already covered keep their exact values. Attention still uses the
        trained windows, so longer sequences are read with a sliding window at every layer, as FA3's
        window_size=(sequence_len, 0) does.
        """
        if num_positions > self.cos.size(1):
            self.set_rotary(num_positions)

    def softcap(self, logits):
        """The real vocabulary's logits (lm_head is padded), in fp32, squashed into
        (-SOFTCAP, SOFTCAP)."""
        return SOFTCAP * torch.tanh(logits[..., :self.config.vocab_size].float() / SOFTCAP)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """
        idx (B, T) token ids -> logits (B, T, vocab), fp32, softcapped. With targets (B, T) (-1 =
        not trained): the mean loss over trained tokens, or per token (B, T) with
        loss_reduction="none". With kv_cache the T tokens continue the cached ones (decoding) and
        the cache advances.
        """
        B, T = idx.shape
        pos0, cos_sin = self.positions(T, idx.device, kv_cache)

        # embed: (B, T) -> (B, T, C), normalized. Smear: x_t += smear_lambda *
        # sigmoid(gate(x_t[:24])) * x_{t-1}, with x_{t-1} the previous normalized embedding (from
        # the cache when decoding): cheap bigram-ish mixing, a no-op at init (lambda 0).
        x = norm(self.transformer.wte(idx).to(self.compute_dtype))
        gate = self.smear_gate(x[..., :SMEAR_CHANNELS])
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(gate)
        prev = x[:, :-1]
        if kv_cache is not None:
            if kv_cache.row_positions is not None or pos0 > 0:
                prev = torch.cat([kv_cache.prev_embedding.to(x.dtype), prev], dim=1)
            kv_cache.prev_embedding = x[:, -1:].clone()
        # the first token keeps its embedding unless the cache holds the one before it
        x = (x + gate * prev if prev.size(1) == T else
             torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * prev], dim=1))

        # blocks: (B, T, C) -> (B, T, C). Each layer first rescales the residual and mixes the
        # embedding x0 back in (learned per-layer lambdas); the value embeddings of a layer are
        # looked up from the same token ids.
        x0, backout = x, None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i], kv_cache, pos0)
            if i == self.config.n_layer // 2:
                backout = x
        # Backout: remove part of the mid-depth residual before the head (learned, init 0.2)
        x = norm(x - self.backout_lambda.to(x.dtype) * backout)
        if kv_cache is not None:
            kv_cache.advance(T)

        # head: (B, T, C) -> logits (B, T, vocab), or the loss against targets
        if targets is None:
            return self.logits(x, decoding=kv_cache is not None)
        losses = self.token_losses(x, targets)  # (B * T,), 0 where the target is -1
        if loss_reduction == "none":
            return losses.view(B, T)
        assert loss_reduction == "mean", f"loss_reduction={loss_reduction!r}: use 'mean' or 'none'"
        # mean over supervised tokens; 0 (not NaN) when a batch has none, so one empty micro-batch
        # cannot poison a step
        return losses.sum() / (targets != -1).sum().clamp(min=1)

    def positions(self, T, device, kv_cache):
        """
        Where the T new tokens sit: -> (pos0, (cos, sin)). pos0 is the shared start position (an
        int), or a (B, T) tensor of per-row positions when the cache holds rows of different lengths
        (a server decoding several requests together); cos/sin are the rotary angles at those
        positions.
        """
        last, row_positions = 0, None
        if kv_cache is not None:
            L, kv_heads, shape = self.config.n_layer, self.config.n_kv_head, kv_cache.k_cache.shape
            assert shape[0] == L and tuple(shape[3:]) == (kv_heads, self.head_dim), \
                f"KV cache shape {tuple(shape)} does not fit this model (layers {L}, kv heads " \
                f"{kv_heads}, head_dim {self.head_dim})"
            row_positions = kv_cache.row_positions  # None: every row at one shared position
            last = kv_cache.get_pos() if row_positions is None else max(row_positions)
            assert last + T <= shape[2], \
                f"KV cache full: position {last} + {T} new tokens > capacity {shape[2]}"
        assert last + T <= self.cos.size(1), f"sequence reaches position {last + T}, rotary " \
            f"tables cover {self.cos.size(1)}: ensure_rotary_positions"
        if row_positions is None:
            return last, (self.cos[:, last:last + T], self.sin[:, last:last + T])
        assert min(row_positions) > 0, \
            "rows at their own positions decode after a prefill: add prefilled rows"
        pos = torch.tensor(row_positions, device=device)[:, None] + torch.arange(T, device=device)
        return pos, (self.cos[0, pos], self.sin[0, pos])

    def logits(self, x, decoding=False):
        """(B, T, C) final hidden states -> softcapped logits (B, T, vocab)."""
        B, T, _ = x.shape
        if decoding and x.device.type == "cpu" and B * T <= 64 and isinstance(self.lm_head, Linear):
            # Decoding a few rows on CPU: W @ x^T hands the BLAS the long vocabulary side to split
            # (2x faster than x @ W^T at 8 rows; docs/perf.md "Engine.generate rows")
            W = self.lm_head.weight.to(x.dtype)
            return self.softcap((W @ x.view(B * T, -1).t()).t().view(B, T, -1))
        return self.softcap(self.lm_head(x))

    def token_losses(self, x, targets):
        """
        (B, T, C) final hidden states and (B, T) targets -> (B * T,) cross-entropy of the softcapped
        logits, 0 where the target is -1. The same math on every path; the two branches only save
        memory and time (docs/perf.md "Compiling CPU training, and its memory"):
        - under torch.compile inductor fuses softcap + cross-entropy into row-wise kernels itself;
          on CPU the head runs on 4 chunks of rows, whose buffers are reused where a whole
          (B*T, vocab) logits tensor and its gradient would be page-faulted in afresh every step
          (glibc unmaps freed blocks over 32 MiB);
        - eager, SoftcapCrossEntropy keeps only the raw logits and one logsumexp per row.
        """
        rows, row_targets = x.view(-1, x.size(-1)), targets.view(-1)
        if torch.compiler.is_compiling():
            chunks = 4 if x.device.type == "cpu" else 1
            pieces = zip(rows.chunk(chunks), row_targets.chunk(chunks))
            return torch.cat([F.cross_entropy(self.softcap(self.lm_head(r)), t, ignore_index=-1,
                                              reduction="none") for r, t in pieces])
        logits = self.lm_head(rows)[..., :self.config.vocab_size].float()
        return SoftcapCrossEntropy.apply(logits, row_targets)

    # -------------------------------------------------------------------------
    # Optimizer

    def setup_optimizer(self, unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02,
                        weight_decay=0.28, scalar_lr=0.5, lr_scale=1.0, lr_frac=1.0):
        """
        MuonAdamW: Muon for the block matrices, AdamW for embeddings, lm_head and scalars.
        AdamW lrs scale as sigma = (n_embd/768)^-0.5 (tuned at d768).
        lr_scale: base_train's batch-size factor sqrt(B / 2^19), on every lr but the smear/backout
        group's fixed 0.2 (karpathy/nanochat does not batch-scale that one). lr_frac: the chat
        stages' --init-lr-frac, on every lr. Each group gets "initial_lr" (schedules multiply it)
        and a "name" for logging. Muon groups start with momentum 0.95; base_train's schedule
        overwrites momentum and weight_decay each step.
        """
        sigma = (self.config.n_embd / 768) ** -0.5
        lm_head_lr, wte_lr = unembedding_lr * sigma * lr_scale, embedding_lr * sigma * lr_scale

        def adamw(name, params, lr, betas, wd):
            return dict(kind="adamw", name=name, params=list(params), lr=lr, betas=betas, eps=1e-10,
                        weight_decay=wd)

        smear_backout = [self.smear_gate.weight, self.smear_lambda, self.backout_lambda]
        groups = [
            adamw("lm_head", self.lm_head.parameters(), lm_head_lr, (0.8, 0.96), 0.01),
            adamw("wte", self.transformer.wte.parameters(), wte_lr, (0.8, 0.995), 0.001),
            adamw("value_embeds", self.value_embeds.parameters(), 0.5 * wte_lr, (0.8, 0.995), 0.01),
            adamw("resid_lambdas", [self.resid_lambdas], scalar_lr * 0.01 * lr_scale, (0.8, 0.95),
                  0.05),
            adamw("x0_lambdas", [self.x0_lambdas], scalar_lr * lr_scale, (0.96, 0.95), 0.0),
            adamw("smear_backout", smear_backout, 0.2, (0.8, 0.95), 0.0),
        ]
        matrices = list(self.transformer.h.parameters())  # every block matrix, VE gates included
        groups += [dict(kind="muon", name=f"muon{list(shape)}",
                        params=[p for p in matrices if p.shape == shape], lr=matrix_lr * lr_scale,
                        momentum=0.95, beta2=0.9, weight_decay=weight_decay, ns_steps=5)
                   for shape in sorted({tuple(p.shape) for p in matrices})]
        for g in groups:
            g["initial_lr"] = g["lr"] = g["lr"] * lr_frac
        grouped = [id(p) for g in groups for p in g["params"]]
        assert len(grouped) == len(set(grouped)), "a parameter is in two optimizer groups"
        assert set(grouped) == {id(p) for p in self.parameters()}, "parameters without a group: " \
            f"{[n for n, p in self.named_parameters() if id(p) not in set(grouped)]}"
        return MuonAdamW(groups)

    # -------------------------------------------------------------------------
    # Accounting: parameters by kind and FLOPs (scaling laws, MFU, infer_bench)

    def num_scaling_params(self):
        """Parameter counts by kind; scaling params (for the tokens:params ratio) =
        transformer_matrices + lm_head."""
        count = lambda module: sum(p.numel() for p in module.parameters())
        scalars = [self.resid_lambdas, self.x0_lambdas, self.smear_lambda, self.backout_lambda]
        counts = {"wte": count(self.transformer.wte), "value_embeds": count(self.value_embeds),
                  "lm_head": count(self.lm_head), "transformer_matrices": count(self.transformer.h),
                  "scalars": sum(p.numel() for p in scalars) + count(self.smear_gate)}
        counts["total"] = sum(counts.values())
        assert counts["total"] == count(self), f"{counts} misses some of {count(self)}"
        return counts

    def num_matmul_params(self):
        # any nn.Linear, so fp8-swapped layers (Float8Linear subclasses nn.Linear) still count
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    # Attention FLOPs: H * D = n_embd per query and key for QK^T and again for AV

    def estimate_flops(self):
        """Training FLOPs per token (fwd+bwd): 6 per matmul weight + 12*H*D*min(window, T) per
        layer for QK^T and AV."""
        T = self.config.sequence_len
        attn = sum(12 * self.config.n_embd * min(w, T) for w in self.window_sizes)
        return 6 * self.num_matmul_params() + attn

    def estimate_decode_flops(self, ctx):
        """FLOPs to decode one token, ctx keys in the cache counting its own: a layer of window w
        attends to min(ctx, w + 1) of them."""
        keys = sum(min(ctx, w + 1) for w in self.window_sizes)
        return 2 * self.num_matmul_params() + 4 * self.config.n_embd * keys

    def estimate_prefill_flops(self, n):
        """FLOPs to prefill n tokens: query t attends to min(t + 1, w + 1) keys."""
        # k = min(w + 1, n): the queries from k on see k keys each; the first k - 1 see 1, 2, ...
        ks = [min(w + 1, n) for w in self.window_sizes]
        keys = sum(k * (k + 1) // 2 + (n - k) * k for k in ks)
        return 2 * self.num_matmul_params() * n + 4 * self.config.n_embd * keys

    def kv_read_bytes(self, ctx):
        """KV-cache bytes one decode step reads at context length ctx (windows cap what each layer
        reads): keys and values of the kv heads at each position, in the compute dtype."""
        per_pos = 2 * self.config.n_kv_head * self.head_dim * self.compute_dtype.itemsize
        return sum(per_pos * min(ctx, w + 1) for w in self.window_sizes)

    def kv_bytes_per_token(self):
        return self.kv_read_bytes(1)  # one position, read by every layer

    # -------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive batch-1 streaming generation (the whole sequence again each step, no cache):
        Engine's yardstick."""
        assert isinstance(tokens, list), f"tokens is a {type(tokens).__name__}: pass a list of ints"
        device = self.get_device()
        rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if top_k is not None and top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = (torch.multinomial((logits / temperature).softmax(-1), 1, generator=rng)
                       if temperature > 0 else logits.argmax(dim=-1, keepdim=True))
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()

# -----------------------------------------------------------------------------
# The eager loss (GPT.token_losses without torch.compile)

LOSS_CHUNK_ELEMENTS = 1 << 22  # logits per chunk of SoftcapCrossEntropy: 16 MiB of fp32 at a time

class SoftcapCrossEntropy(torch.autograd.Function):
    """
    Per-row cross-entropy of SOFTCAP * tanh(logits / SOFTCAP) against targets (-1 = ignored: loss
    and gradient 0), the same numbers as F.cross_entropy on the softcapped logits, in chunks of
    rows, keeping only the raw logits and one logsumexp per row for backward, where eager autograd
    on the plain formula would hold four (rows, vocab) fp32 tensors at once (docs/perf.md "Compiling
    CPU training, and its memory").
    """
    @staticmethod
    def forward(ctx, logits, targets):
        n, chunk = logits.size(0), max(1, LOSS_CHUNK_ELEMENTS // logits.size(1))
        index = targets.clamp(min=0).unsqueeze(1)
        lse = torch.empty(n, dtype=logits.dtype, device=logits.device)
        losses = torch.empty_like(lse)
        for i in range(0, n, chunk):
            z = SOFTCAP * torch.tanh(logits[i:i + chunk] / SOFTCAP)
            lse[i:i + chunk] = torch.logsumexp(z, dim=-1)
            losses[i:i + chunk] = lse[i:i + chunk] - z.gather(1, index[i:i + chunk]).squeeze(1)
        losses.masked_fill_(targets == -1, 0.0)
        ctx.save_for_backward(logits, targets, lse)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        # d loss / d z = softmax(z) - onehot(target); d z / d logits = 1 - tanh^2
        logits, targets, lse = ctx.saved_tensors
        n, chunk = logits.size(0), max(1, LOSS_CHUNK_ELEMENTS // logits.size(1))
        index = targets.clamp(min=0).unsqueeze(1)
        scale = (grad_losses * (targets != -1)).unsqueeze(1)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        minus_one = torch.full((min(chunk, n), 1), -1.0, dtype=logits.dtype, device=logits.device)
        for i in range(0, n, chunk):
            t = torch.tanh(logits[i:i + chunk] / SOFTCAP)
            g = torch.exp(SOFTCAP * t - lse[i:i + chunk].unsqueeze(1))
            g.scatter_add_(1, index[i:i + chunk], minus_one[:g.size(0)])
            grad[i:i + chunk] = g.mul_(scale[i:i + chunk]).mul_(1 - t * t)
        return grad, None

# -----------------------------------------------------------------------------
# KV cache for inference

def kv_zeros(shape, device, dtype):
    """
    Zeros of shape (layers, batch, positions, heads, head_dim). On CPU this shape is a view of
    memory laid out heads before positions: a decode step then multiplies each head's cached keys
    as one contiguous matrix, where the positions-first layout makes CPU matmul copy them first
    (docs/perf.md, "Decode on CPU").
    """
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, device=device, dtype=dtype)
    L, B, T, H, D = shape
    return torch.zeros(L, B, H, T, D, device=device, dtype=dtype).transpose(2, 3)

class KVCache:
    """
    Pre-allocated keys/values (num_layers, batch, seq_len, num_heads, head_dim) in the compute
    dtype, one shared position (cache_seqlens, int32 per row, all equal) and the smear's previous
    normalized embedding (batch, 1, n_embd). The model writes each layer's new keys/values in place;
    the position advances once per forward.
    row_positions: None here; a subclass whose rows sit at their own positions (engine.RowCache)
    lists them on the host.
    """
    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device,
                 dtype=COMPUTE_DTYPE):
        self.batch_size, self.num_heads, self.max_seq_len = batch_size, num_heads, seq_len
        self.head_dim, self.num_layers = head_dim, num_layers
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.k_cache, self.v_cache = kv_zeros(shape, device, dtype), kv_zeros(shape, device, dtype)
        self.cache_seqlens = torch.zeros(batch_size, device=device, dtype=torch.int32)
        self.prev_embedding = self.row_positions = None

    def reset(self):
        self.cache_seqlens.zero_()
        self.prev_embedding = None

    def get_pos(self):
        return int(self.cache_seqlens[0].item())

    def get_layer_cache(self, layer_idx):
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, n):
        self.cache_seqlens += n

    def prefill(self, other):
        """Copy a batch-1 cache's filled prefix (and its smear state) into every row of this one."""
        pos = other.get_pos()
        assert other.batch_size == 1, f"prefill needs a batch-1 cache, got batch {other.batch_size}"
        layout = lambda c: (c.num_layers, c.num_heads, c.head_dim)
        assert layout(other) == layout(self), \
            f"cache layouts differ: {tuple(other.k_cache.shape)} vs {tuple(self.k_cache.shape)}"
        assert pos <= self.max_seq_len, \
            f"prefix of {pos} tokens does not fit a cache of {self.max_seq_len}"
        self.k_cache[:, :, :pos] = other.k_cache[:, :, :pos]
        self.v_cache[:, :, :pos] = other.v_cache[:, :, :pos]
        self.cache_seqlens.fill_(pos)
        pe = other.prev_embedding
        self.prev_embedding = None if pe is None else pe.expand(self.batch_size, -1, -1).clone()
