"""
A nanochat GPT as a transformers model, written next to its weights by `python -m
scripts.export_hf`, so that

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    out = model.generate(ids, max_new_tokens=64)          # KV cache: transformers' DynamicCache

computes what nanochat computes. Plain PyTorch, one forward, same parameter names as nanochat's GPT
(the export is a copy of its state dict). Per forward pass: token embedding -> RMSNorm -> smear (mix
in the previous token) -> x0 := x -> per layer x = resid_lambda*x + x0_lambda*x0, then a pre-norm
block (attention with RoPE, QK-norm x1.2, a per-layer sliding window, value embeddings on
alternating layers; ReLU^2 MLP) -> backout (subtract a fraction of the mid-depth residual) ->
RMSNorm -> lm_head -> fp32 -> softcap 15.

Leaves out: padded batches (rows of one batch must have the same length), beam search and assisted
decoding (the smear's previous-token state rides on the cache and is neither reordered nor cropped),
training-time niceties (the weights come from the export, so _init_weights does nothing).
"""

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_nanochat import NanoChatConfig

SMEAR_CHANNELS = 24      # smear gate reads the first 24 channels of the normalized embedding
VE_GATE_CHANNELS = 12    # value-embedding gate reads the first 12 channels of the attention input
ROPE_BASE = 100_000
QK_SCALE = 1.2           # after QK RMSNorm: sharper attention than 1/sqrt(D) alone
SOFTCAP = 15.0
SHORT_WINDOW_TILE = 128  # "S" window = T/4 rounded up to a multiple of this
# the output's cache field is `cache` from transformers 5.24, `past_key_values` before
CACHE_FIELD = ("cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__
               else "past_key_values")


def window_sizes(config):
    """Left window per layer: the pattern tiled over layers, the last layer at full context."""
    T, pattern = config.sequence_len, config.window_pattern.upper()
    short = min(T, math.ceil(T / 4 / SHORT_WINDOW_TILE) * SHORT_WINDOW_TILE)
    sizes = [short if pattern[i % len(pattern)] == "S" else T for i in range(config.n_layer - 1)]
    return sizes + [T]


def has_value_embedding(layer_idx, n_layer):
    return layer_idx % 2 == (n_layer - 1) % 2  # alternating layers, always including the last one


def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # RMSNorm without a learnable gain


def rotary(pos0, T, head_dim, device, dtype):
    """cos/sin (1, T, 1, head_dim/2) for positions pos0..pos0+T-1, computed in fp32 then cast."""
    channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (ROPE_BASE ** (channels / head_dim))
    freqs = torch.outer(torch.arange(pos0, pos0 + T, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos().to(dtype)[None, :, None, :], freqs.sin().to(dtype)[None, :, None, :]


def apply_rotary(x, cos, sin):
    d = x.size(-1) // 2  # non-interleaved halves: channel j pairs with channel j + D/2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def attention(q, k, v, window):
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D), queries aligned to the end of the keys; query i sees
    key j iff 0 <= pos_i - j <= window."""
    Tq, Tk = q.size(2), k.size(2)
    sdpa = functools.partial(F.scaled_dot_product_attention, enable_gqa=q.size(1) != k.size(1))
    if Tq == 1:  # decode: the last window+1 keys are exactly the visible ones
        return sdpa(q, k[:, :, -(window + 1):], v[:, :, -(window + 1):])
    if Tq == Tk and window >= Tk - 1:
        return sdpa(q, k, v, is_causal=True)
    dist = torch.arange(Tk - Tq, Tk, device=q.device)[:, None] - torch.arange(Tk, device=q.device)
    return sdpa(q, k, v, attn_mask=(dist >= 0) & (dist <= window))


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, config.n_embd // config.n_head
        q_dim, kv_dim = config.n_head * self.head_dim, config.n_kv_head * self.head_dim
        self.c_q = nn.Linear(config.n_embd, q_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_proj = nn.Linear(q_dim, config.n_embd, bias=False)
        has_ve = has_value_embedding(layer_idx, config.n_layer)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, config.n_kv_head, bias=False) if has_ve else None

    def forward(self, x, ve, cos, sin, window, cache):
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, -1, self.head_dim) for proj in (self.c_q, self.c_k, self.c_v))
        if ve is not None:  # value embedding mixed in per kv-head, input-dependent gate in (0, 3)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view_as(v)
        q, k = (norm(apply_rotary(t, cos, sin)) * QK_SCALE for t in (q, k))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        return self.c_proj(attention(q, k, v, window).transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, cache):
        x = x + self.attn(norm(x), ve, cos, sin, window, cache)
        return x + self.mlp(norm(x))


class NanoChatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoChatConfig
    base_model_prefix = "nanochat"
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        L, C, V = config.n_layer, config.n_embd, config.padded_vocab_size
        kv_dim = config.n_kv_head * (C // config.n_head)
        self.window_sizes = window_sizes(config)
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(V, C),
                                          "h": nn.ModuleList([Block(config, i) for i in range(L)])})
        self.lm_head = nn.Linear(C, V, bias=False)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim)
                                           for i in range(L) if has_value_embedding(i, L)})
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.post_init()

    def _init_weights(self, module):
        pass  # every value comes from model.safetensors

    def get_input_embeddings(self):
        return self.transformer.wte

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, cache=None, past_key_values=None,
                use_cache=None, labels=None, logits_to_keep=0, **kwargs):
        cache = cache if cache is not None else past_key_values  # see CACHE_FIELD
        B, T = input_ids.shape
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("this model does not support padded batches (attention_mask "
                             "has zeros): run prompts of different lengths one at a time")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        cache = cache if use_cache else None
        pos0 = cache.get_seq_length() if cache is not None else 0
        x = norm(self.transformer.wte(input_ids))
        cos, sin = rotary(pos0, T, self.config.n_embd // self.config.n_head, x.device, x.dtype)

        # Smear: x_t += smear_lambda * sigmoid(gate(x_t[:24])) * x_{t-1}, x_{t-1} the previous
        # normalized embedding (kept on the cache between calls when decoding)
        gate = torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        gate = self.smear_lambda.to(x.dtype) * gate
        prev = x[:, :-1]
        if cache is not None:
            if pos0 > 0:
                prev = torch.cat([cache.nanochat_prev_embedding.to(x.dtype), prev], dim=1)
            cache.nanochat_prev_embedding = x[:, -1:].clone()
        if prev.size(1) == T:  # every token has its previous one (from the cache for the first)
            x = x + gate * prev
        else:  # the first token has none: it stays as is
            x = torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * prev], dim=1)

        x0, backout = x, None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            has_ve = str(i) in self.value_embeds
            ve = self.value_embeds[str(i)](input_ids).to(x.dtype) if has_ve else None
            x = block(x, ve, cos, sin, self.window_sizes[i], cache)
            if i == self.config.n_layer // 2:
                backout = x
        x = norm(x - self.backout_lambda.to(x.dtype) * backout)  # remove part of mid-depth residual
        # the last logits_to_keep positions, all of them for 0 (x[:, -0:] is x)
        logits = self.lm_head(x[:, -logits_to_keep:])[..., :self.config.vocab_size].float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        loss = None
        # as in transformers: labels = inputs, shifted here; -100 (cross_entropy's default) ignored
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
