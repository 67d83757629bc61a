"""
Fast sampling from a GPT with a KV cache, plus the calculator tool the chat model may call.

    prepare_for_inference(model, "")   # weights held once in the device's dtype (bf16/fp16/...)
    engine = Engine(model, tokenizer)
    for tokens, masks in engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8):
        ...                            # one token per sample per step, streamed
    sequences, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)

How: the prompt is prefilled once at batch 1 into a cache sized to the prompt; that cache is copied
into every row of a decode cache (prompt + max_tokens positions), and each step feeds one token per
row. Each row samples independently from its own logits with one seeded torch.Generator, so a seed
reproduces a whole batch. A row stops at <|assistant_end|> or <|bos|>; the loop stops when every row
has stopped or after max_tokens.

Tool use: when a row writes <|python_start|> expr <|python_end|>, the expression goes to
`use_calculator`, and its result is forced into that row as <|output_start|> str(result)
<|output_end|> (mask 0: the model did not choose those tokens, so RL must not train on them). Only
arithmetic and str.count are supported; it is a calculator, not a Python interpreter
(nanochat/execution.py is the sandbox for full programs).

Left out: speculative decoding, paged caches (each row of a batch reserves the whole context), and
sampling beyond temperature/top-k.
"""

import ast
import re
from collections import deque

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.attention import load_fa3
from nanochat.common import COMPUTE_DTYPE, COMPUTE_DTYPE_REASON, cpu_bf16_feature, print0
from nanochat.gpt import KVCache, Linear, kv_zeros

# -----------------------------------------------------------------------------
# Calculator tool

# Both kinds of admitted expression run in time bounded by their length, so no timer is needed:
# arithmetic has no ** (9**9**9 never finishes), and the string methods below never make a string
# longer than its input.
_STRING_METHODS = {"count", "lower", "upper", "casefold", "strip", "lstrip", "rstrip"}
_FORBIDDEN = ["__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input",
              "globals", "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr"]
_ARITHMETIC_CHARS = set("0123456789*+-/.() ")
# Unlike the arithmetic case, commas are kept here: in 'a,b'.count(',') they are data.
_STRING_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ,")
_ARITHMETIC_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Add, ast.Sub, ast.Mult, ast.Div,
                     ast.FloorDiv, ast.UAdd, ast.USub)
MAX_EXPRESSION_CHARS = 256  # products of <=256 digits stay far below int->str's 4300-digit limit

def _is_string_method_chain(node):
    """str-literal(.method(str-or-int literals))* with methods from _STRING_METHODS only."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    is_literal = lambda a: isinstance(a, ast.Constant) and isinstance(a.value, (str, int))
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and not node.keywords and node.func.attr in _STRING_METHODS
            and _is_string_method_chain(node.func.value) and all(map(is_literal, node.args)))

def _is_arithmetic(tree):
    is_number = lambda node: isinstance(node, ast.Constant) and type(node.value) in (int, float)
    return all(isinstance(node, _ARITHMETIC_NODES) or is_number(node) for node in ast.walk(tree))

def use_calculator(expr):
    """
    Evaluate a tool call; returns the number, or None when the expression is not allowed or fails.
    Allowed: arithmetic on numbers with + - * / // ( ) (commas in numbers like 1,000 are dropped; **
    is refused), or a str.count(...) call on a string literal such as 'strawberry'.count('r')
    (optionally after .lower() etc.). Safe to call from any thread: no signals, and every admitted
    expression is cheap by construction. The expression is parsed and checked node by node before it
    is evaluated with no builtins.
    """
    expr = expr.strip()
    # 1,000 -> 1000, but (1,2) stays a tuple and is refused
    arithmetic = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", expr)
    if arithmetic and set(arithmetic) <= _ARITHMETIC_CHARS:
        expr = arithmetic
    elif not (set(expr) <= _STRING_CHARS and ".count(" in expr
              and not any(w in expr.lower() for w in _FORBIDDEN)):
        return None
    if len(expr) > MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, RecursionError):
        return None
    is_count = (isinstance(tree.body, ast.Call) and _is_string_method_chain(tree.body)
                and tree.body.func.attr == "count")
    if not (_is_arithmetic(tree) or is_count):
        return None
    try:
        return eval(compile(tree, "<calculator>", "eval"), {"__builtins__": {}}, {})
    except (ArithmeticError, TypeError, ValueError):  # 1/0, overflow, 'abc'.count(1), 'abc'.count()
        return None

# -----------------------------------------------------------------------------
# Inference weights: held once in the dtype the device does best

# --dtype -> the dtype activations and KV cache are held in (the weights too, but for float16's
# fp16 and int8's int8)
INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                    "float16": torch.float32, "int8": torch.bfloat16}

def has_fbgemm():
    """FBGEMM, the x86 CPU library behind torch's fp16-weight kernels (not on ARM builds)."""
    return "fbgemm" in torch.backends.quantized.supported_engines

def default_inference_dtype(device):
    """-> (name, reason): bf16 where the hardware multiplies it natively, else fp16 weights on x86
    CPUs (FBGEMM), else fp32."""
    if device.type == "cuda":  # the process's compute dtype: SM80+ bf16 unless NANOCHAT_DTYPE says
        return ("bfloat16" if COMPUTE_DTYPE == torch.bfloat16 else "float32"), COMPUTE_DTYPE_REASON
    if device.type == "cpu":
        if feature := cpu_bf16_feature():
            return "bfloat16", (f"CPU has {feature}: half the bytes of fp32 per decoded token; "
                                f"--dtype float16 decodes one chat faster, prefills slower")
        if has_fbgemm():
            return "float16", ("CPU lacks AVX512-BF16/AMX: fp16 weights through FBGEMM (half "
                               "fp32's bytes per decoded token), fp32 arithmetic")
        return "float32", ("CPU lacks AVX512-BF16/AMX and FBGEMM: bf16 would be converted in "
                           "software (try --dtype bfloat16)")
    return "float32", f"{device.type}: fp32 as in training (bf16 unmeasured; try --dtype bfloat16)"

def add_dtype_flag(parser):
    """--dtype for the scripts that load a model to generate (chat_cli, chat_web, chat_eval)."""
    parser.add_argument("--dtype", default="", choices=["", *INFERENCE_DTYPES],
                        help="weights: '' = bf16 where native, else float16 on x86 CPUs, else "
                             "fp32; float16 and int8: CPU only")

# Rows up to which _weight_int8pack_mm beats dequantizing to bf16 first: the dequantized copy costs
# the same at any row count, the kernel grows with rows (half of d20's matrices, 2-core EPYC: 131 ms
# at 8 rows vs ~260 ms).
INT8_KERNEL_MAX_ROWS = 16

class Int8Linear(nn.Module):
    """
    Weight-only int8 twin of gpt.Linear for CPU generation: one scale per output channel (symmetric,
    max |w_row| / 127), multiplied by torch's own kernel _weight_int8pack_mm (bf16 activations in
    and out). Decode is bound by reading the weights, and this reads 1 byte per weight where bf16
    reads 2.
    """
    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        # scales rounded to bf16 (the kernel's dtype) before quantizing, so q * scale is the weight
        # the kernel uses
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-30).to(torch.bfloat16)
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)

    def forward(self, x):
        rows = x.reshape(-1, x.size(-1)).contiguous()
        if rows.size(0) > INT8_KERNEL_MAX_ROWS:  # compute-bound prefill: dequantizing costs little
            return F.linear(x, self.weight.to(x.dtype) * self.scales[:, None])
        return torch._weight_int8pack_mm(rows, self.weight, self.scales).view(*x.shape[:-1], -1)

class PackedLinear(nn.Module):
    """
    gpt.Linear for bf16 generation on CPU: the weight reordered once into oneDNN's blocked layout
    and multiplied by oneDNN (torch.ops.mkldnn, the ops torch.compile's CPU weight freezing emits):
    F.linear on the plain bf16 weight is far from the bandwidth (a d20 decode step's matrices,
    2-core EPYC: 85 ms packed vs 164 ms plain).
    """
    def __init__(self, linear):
        super().__init__()
        weight = linear.weight.detach().to(torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # laid out for 1 row: decode
        self.weight = nn.Parameter(packed, requires_grad=False)

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")

class Fp16Linear(nn.Module):
    """
    gpt.Linear with fp16 weights for CPU generation, multiplied by FBGEMM (torch's fp16 dynamic-
    quantization kernels: fp32 activations in and out, fp32 arithmetic). Two bytes per weight as
    in bf16, read faster one row at a time than oneDNN's bf16 kernel reads them; from ~8 rows on
    its fp32 arithmetic loses to bf16 dot products (docs/perf.md, "Decode on CPU").
    """
    def __init__(self, linear):
        super().__init__()
        self.packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float(), None)
        self.nbytes = 2 * linear.weight.numel()  # the packed weights are not a tensor

    def forward(self, x):
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)

def uses_onednn_bf16(device):
    mkldnn = torch.backends.mkldnn.is_available()
    return device.type == "cpu" and mkldnn and torch.ops.mkldnn._is_mkldnn_bf16_supported()

def _stack_qkv(model):
    """
    c_q, c_k and c_v read the same input: stacked into one matrix (attn.c_qkv) they are one matmul
    per layer instead of three, which a bandwidth-bound decode step feels
    (docs/perf.md, "Decode on CPU").
    """
    for attn in [block.attn for block in model.transformer.h]:
        weight = torch.cat([attn.c_q.weight, attn.c_k.weight, attn.c_v.weight]).detach()
        with torch.device("meta"):
            attn.c_qkv = Linear(weight.size(1), weight.size(0))
        attn.c_qkv.weight = nn.Parameter(weight, requires_grad=False)
        del attn.c_q, attn.c_k, attn.c_v

def _swap_matrices(model, module_class):
    """The block matrices and lm_head -> module_class(linear); the tiny gates stay plain."""
    for block in model.transformer.h:
        for parent, name in [(block.attn, "c_qkv"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                             (block.mlp, "c_proj")]:
            setattr(parent, name, module_class(getattr(parent, name)))
    model.lm_head = module_class(model.lm_head)

def prepare_for_inference(model, dtype=""):
    """
    Make a loaded GPT ready to generate, in place: weights held once in the inference dtype,
    activations and KV cache in the same dtype (float16: in fp32), no autograd. Training keeps fp32
    master weights and casts them at every forward, so a bf16 decode step there reads 4 bytes per
    weight and writes and reads 2 more; here it reads 2 (int8: 1). dtype: a key of
    INFERENCE_DTYPES, or '' for the device's default. Prints which and why; -> its name.
    """
    device = model.get_device()
    dtype, reason = default_inference_dtype(device) if dtype == "" else (dtype, "set by --dtype")
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of {list(INFERENCE_DTYPES)} or leave it out")
    if dtype in ("int8", "float16") and device.type != "cpu":
        raise ValueError(f"--dtype {dtype} runs on CPU only; on {device.type} use --dtype bfloat16")
    if dtype == "float16" and not has_fbgemm():
        raise ValueError("--dtype float16 needs FBGEMM (x86 CPUs), which this torch build lacks; "
                         "use --dtype bfloat16 or float32")
    if dtype == "float32" and device.type == "cuda" and load_fa3() is not None:
        raise ValueError("--dtype float32: this GPU's attention (FA3) runs bf16 only; use --dtype "
                         "bfloat16, or NANOCHAT_DTYPE=float32 for fp32 throughout (flex/SDPA)")
    model.eval().requires_grad_(False)
    model.compute_dtype = INFERENCE_DTYPES[dtype]
    _stack_qkv(model)
    if dtype == "int8":  # quantized from the weights as loaded, before they are rounded to bf16
        _swap_matrices(model, Int8Linear)
    model.to(model.compute_dtype)  # casts floating-point tensors only: int8 weights stay int8
    # recomputed rather than cast: fp32 tables from fp32 math even where training held them in bf16
    model.set_rotary(model.cos.size(1))
    if dtype == "bfloat16" and uses_onednn_bf16(device):
        _swap_matrices(model, PackedLinear)
    if dtype == "float16":  # the embedding tables, only looked up, in fp16 too
        _swap_matrices(model, Fp16Linear)
        model.transformer.wte.half()
        model.value_embeds.half()
    print0(f"inference dtype: {dtype} ({reason})")
    return dtype

# -----------------------------------------------------------------------------
# Sampling

def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """
    logits (B, V) -> token ids (B, 1). temperature 0 = argmax; top_k None = full vocabulary.
    Sampling inverts each row's CDF at one uniform draw: torch.multinomial's distribution from one
    random number per row instead of one per vocabulary entry (docs/perf.md, "Engine.generate
    rows"). A token of probability 0 has an empty CDF step, so it is never picked.
    """
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    indices = None
    if top_k is not None and top_k < logits.size(-1):
        logits, indices = torch.topk(logits, top_k, dim=-1)
    cdf = F.softmax(logits.float() / temperature, dim=-1).cumsum(dim=-1)
    u = torch.rand(cdf.size(0), 1, generator=rng, device=cdf.device) * cdf[:, -1:]
    choice = (cdf[:, :-1] <= u).sum(dim=-1, keepdim=True)  # the first V-1 steps at or below u
    return choice if indices is None else indices.gather(1, choice)

def check_sampling(temperature, top_k):
    """Raise ValueError naming a bad sampling setting; CLIs call it before loading a model to fail
    fast."""
    if not 0 <= temperature < float("inf"):  # also refuses nan, which argparse's float accepts
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got "
                         f"{temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, or None for the full vocabulary; got {top_k}")

# -----------------------------------------------------------------------------
# Engine

def new_kv_cache(model, batch_size, seq_len):
    """An empty KV cache shaped for model, on its device, in its compute dtype."""
    c = model.config
    return KVCache(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer,
                   model.get_device(), model.compute_dtype)

class RowState:
    """Per-sample decoding state: the tool-call state machine and tokens queued to be forced in."""
    def __init__(self):
        self.forced_tokens, self.python_tokens = deque(), []
        self.in_python_block = self.completed = False

class Engine:

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.stop_tokens = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}

    def _advance_row(self, row, sampled):
        """The token a row takes this step (a queued forced token replaces the sample) ->
        (token, mask)."""
        forced = len(row.forced_tokens) > 0
        token = row.forced_tokens.popleft() if forced else sampled
        if token in self.stop_tokens:
            row.completed = True
        elif token == self.python_start:
            row.in_python_block, row.python_tokens = True, []
        elif token == self.python_end and row.in_python_block:
            row.in_python_block = False
            result = use_calculator(self.tokenizer.decode(row.python_tokens))
            if result is not None:
                row.forced_tokens += [self.output_start, *self.tokenizer.encode(str(result)),
                                      self.output_end]
        elif row.in_python_block:
            row.python_tokens.append(token)
        return token, 0 if forced else 1

    def _check_args(self, tokens, num_samples, max_tokens, temperature, top_k):
        """Raise ValueError naming the problem; returns the number of tokens to generate."""
        context, vocab_size = self.model.config.sequence_len, self.model.config.vocab_size
        if len(tokens) == 0:
            raise ValueError("the prompt is empty: start it with the <|bos|> token")
        if not all(isinstance(t, int) and 0 <= t < vocab_size for t in tokens):
            raise ValueError(f"prompt tokens must be ints in [0, {vocab_size}), got {tokens[:16]}")
        if len(tokens) >= context:
            raise ValueError(f"the prompt has {len(tokens)} tokens but the model's context "
                             f"is {context}: shorten it to at most {context - 1} tokens")
        max_tokens = context - len(tokens) if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= context - len(tokens):
            raise ValueError(f"max_tokens={max_tokens} with a {len(tokens)}-token prompt: context "
                             f"{context} allows 1 <= max_tokens <= {context - len(tokens)}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        check_sampling(temperature, top_k)
        return max_tokens

    def _prefill(self, tokens):
        """The prompt through the model at batch 1 -> (its last position's logits, its cache)."""
        cache = new_kv_cache(self.model, 1, len(tokens))
        ids = torch.tensor([tokens], dtype=torch.long, device=self.model.get_device())
        return self.model(ids, kv_cache=cache)[:, -1, :], cache

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None,
                 seed=42):
        """
        Stream samples: yields (token_column, mask_column), one entry per sample each step. mask 1 =
        sampled by the model, 0 = forced tool output. A stopped row keeps receiving (meaningless)
        tokens until every row has stopped; callers drop a row's tokens after its
        <|assistant_end|>/<|bos|>. max_tokens None = fill the model's context.
        """
        max_tokens = self._check_args(tokens, num_samples, max_tokens, temperature, top_k)
        device = self.model.get_device()
        rng = torch.Generator(device=device).manual_seed(seed)

        # Prefill once at batch 1, then copy that cache into every row of the decode cache.
        logits, prefill_cache = self._prefill(tokens)
        logits = logits.expand(num_samples, -1)  # each row still samples its own first token
        decode_cache = new_kv_cache(self.model, num_samples, len(tokens) + max_tokens)
        decode_cache.prefill(prefill_cache)
        del prefill_cache

        rows = [RowState() for _ in range(num_samples)]
        for step in range(max_tokens):
            sampled = sample_next_token(logits, rng, temperature, top_k)[:, 0].tolist()
            token_column, mask_column = map(list, zip(*map(self._advance_row, rows, sampled)))
            yield token_column, mask_column
            if step == max_tokens - 1 or all(row.completed for row in rows):
                break
            ids = torch.tensor(token_column, dtype=torch.long, device=device).unsqueeze(1)
            logits = self.model(ids, kv_cache=decode_cache)[:, -1, :]

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Returns (sequences, masks): per sample the prompt plus its generated tokens, stop token
        excluded, and a mask (0 for the prompt and forced tool output, 1 for sampled tokens)."""
        sequences = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for token_column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(token_column, mask_column)):
                done[i] = done[i] or token in self.stop_tokens
                if not done[i]:
                    sequences[i].append(token)
                    masks[i].append(mask)
        return sequences, masks

# -----------------------------------------------------------------------------
# Different requests decoded together (chat_web): each row has its own prompt, position,
# sampling and seed

class RowCache(KVCache):
    """
    A decode cache whose rows are independent requests at their own positions (row_positions, on the
    host, so the model needs no device sync to size its attention). k_cache/v_cache are views of the
    first batch_size rows of a store that doubles when full and keeps its peak size; a joining row
    copies its prefilled prefix into the next free row, a leaving one is replaced by the last row:
    one row copied, not the whole cache (docs/perf.md, "Serving").
    """
    def __init__(self, model, capacity):
        c, device, dtype = model.config, model.get_device(), model.compute_dtype
        super().__init__(0, c.n_kv_head, capacity, c.n_embd // c.n_head, c.n_layer, device, dtype)
        self.store = self.k_cache, self.v_cache  # (layers, rows allocated, positions, heads, dim)
        self.row_positions = []
        self.prev_embedding = torch.zeros(0, 1, c.n_embd, device=device, dtype=dtype)

    def _use_rows(self, n):
        self.batch_size = n
        self.k_cache, self.v_cache = (t[:, :n] for t in self.store)

    def add_row(self, prefilled):
        n, B = prefilled.get_pos(), self.batch_size
        assert prefilled.batch_size == 1 and 0 < n <= self.max_seq_len, \
            f"need a prefilled batch-1 cache of <= {self.max_seq_len} tokens"
        if B == self.store[0].size(1):  # full: double (torch.cat would lose kv_zeros' layout)
            shape = (self.num_layers, max(1, 2 * B), *self.k_cache.shape[2:])
            grown = [kv_zeros(shape, t.device, t.dtype) for t in self.store]
            for new, old in zip(grown, self.store):
                new[:, :B] = old
            self.store = tuple(grown)
        for t, p in zip(self.store, (prefilled.k_cache, prefilled.v_cache)):
            t[:, B, :n] = p[:, 0, :n]  # positions past n keep a former row's values: masked
        prev = prefilled.prev_embedding.to(self.prev_embedding.dtype)
        self.prev_embedding = torch.cat([self.prev_embedding, prev])
        self.row_positions.append(n)
        self._use_rows(B + 1)

    def remove_rows(self, drop):
        """Drop rows by index, each replaced by the then-last row -> order: the former index of
        each row that stays, in its new place."""
        order = list(range(self.batch_size))
        for i in sorted(drop, reverse=True):
            last = order.pop()
            if i < len(order):  # move the last row into the hole, up to its own length
                n = self.row_positions[last]
                for t in self.store:
                    t[:, i, :n] = t[:, len(order), :n]
                order[i] = last
        self.prev_embedding = self.prev_embedding[order]
        self.row_positions = [self.row_positions[i] for i in order]
        self._use_rows(len(order))
        return order

    def advance(self, n):
        self.row_positions = [p + n for p in self.row_positions]

class Request(RowState):
    """One row of a RowBatch: its sampling settings, its own seeded generator, where it stands."""
    def __init__(self, max_tokens, temperature, top_k, seed, device):
        super().__init__()
        self.max_tokens, self.temperature, self.top_k = max_tokens, temperature, top_k
        self.rng = torch.Generator(device=device).manual_seed(seed)
        self.generated = 0

class RowBatch:
    """
    Decode many requests as one batch. add() prefills a request at batch 1 and samples its first
    token: -> (request, token, mask, finish), finish None, "stop" (the token is <|assistant_end|> or
    <|bos|>) or "length" (max_tokens reached); a request its first token finishes does not join.
    step() gives every row its next token: -> a list of those. Both hand tokens out before they go
    through the model (the next step() feeds them), so a server streams each a forward sooner.
    Finished rows leave; cancel(*requests) drops rows at once. Each row samples from its own logits
    with its own generator, so a seeded request gives the same tokens alone or next to others (up to
    float rounding, which batch shape can change).
    """
    def __init__(self, engine):
        self.engine, self.model = engine, engine.model
        self.cache = RowCache(self.model, self.model.config.sequence_len)
        self.rows, self.pending = [], []  # pending: each row's last token, not yet fed in

    def __len__(self):
        return len(self.rows)

    @torch.inference_mode()
    def add(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        # the cache holds the whole context, and _check_args fits prompt + max_tokens in it
        max_tokens = self.engine._check_args(tokens, 1, max_tokens, temperature, top_k)
        request = Request(max_tokens, temperature, top_k, seed, self.model.get_device())
        logits, prefill_cache = self.engine._prefill(tokens)
        first = self._sample([request], logits)[0]
        if first[3] is None:
            self.cache.add_row(prefill_cache)
            self.rows.append(request)
            self.pending.append(first[1])
        return first

    @torch.inference_mode()
    def cancel(self, *requests):
        order = self.cache.remove_rows([i for i, r in enumerate(self.rows) if r in requests])
        self.rows = [self.rows[i] for i in order]
        self.pending = [self.pending[i] for i in order]

    @torch.inference_mode()
    def step(self):
        if not self.rows:
            return []
        ids = torch.tensor(self.pending, dtype=torch.long, device=self.model.get_device())
        out = self._sample(self.rows, self.model(ids[:, None], kv_cache=self.cache)[:, -1, :])
        self.pending = [token for _, token, _, _ in out]
        if finished := [request for request, *_, finish in out if finish]:
            self.cancel(*finished)
        return out

    def _sample(self, requests, logits):
        sampled = [sample_next_token(logits[i:i + 1], r.rng, r.temperature, r.top_k)
                   for i, r in enumerate(requests)]
        out = []
        for request, token in zip(requests, torch.cat(sampled).view(-1).tolist()):  # one sync
            token, mask = self.engine._advance_row(request, token)
            request.generated += 1
            out_of_tokens = request.generated >= request.max_tokens
            finish = "stop" if request.completed else "length" if out_of_tokens else None
            out.append((request, token, mask, finish))
        return out

class TextStream:
    """
    Tokens in, text out in whole characters. A character can span several tokens (byte-level BPE),
    so text is held back while the decoded tail is an incomplete UTF-8 sequence (decode() shows it
    as U+FFFD) and released once it completes; flush() releases what is left. Released pieces join
    to exactly tokenizer.decode(all tokens): every release ends on a character boundary, where UTF-8
    decoding restarts cleanly.
    """
    def __init__(self, tokenizer):
        self.tokenizer, self.pending = tokenizer, []

    def push(self, token):
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self):
        text, self.pending = self.tokenizer.decode(self.pending) if self.pending else "", []
        return text

class ReplyStream:
    """
    An assistant reply's tokens in, its parts out as they grow: the parts render_conversation takes
    back ({"type": "text" | "python" | "python_output", "text": ...}), so a tool call is shown, and
    re-rendered, as what it is. The tool's special tokens only open and close parts; no special
    token ever becomes text (stop tokens are the caller's to drop). push(token) and flush() ->
    [(part index, new text)]; a tool part announces itself at once with "" so a UI can open its
    block before the code arrives.
    """
    def __init__(self, tokenizer):
        special = tokenizer.encode_special
        self.opens = {special("<|python_start|>"): "python",
                      special("<|output_start|>"): "python_output"}
        self.specials = set(tokenizer.special_ids.values())
        self.text = TextStream(tokenizer)
        self.parts, self.open = [], False  # open: the last part takes the next text token

    def push(self, token):
        if token not in self.specials:
            if not self.open:
                self.parts.append({"type": "text", "text": ""})
                self.open = True
            return self._add(self.text.push(token))
        events = self.flush()
        # a closing (or stray) special ends the part; text after it opens a new one
        self.open = token in self.opens
        if self.open:
            self.parts.append({"type": self.opens[token], "text": ""})
            events.append((len(self.parts) - 1, ""))
        return events

    def flush(self):
        return self._add(self.text.flush())

    def _add(self, text):
        if not text:
            return []
        self.parts[-1]["text"] += text
        return [(len(self.parts) - 1, text)]

# -----------------------------------------------------------------------------
# Greedy completions of fixed prompts: how base_train and base_eval show what a base model knows

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is",
                  "If 5*x + 3 = 13, then x is"]

def greedy_completions(engine, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens=16):
    """-> list of prompt + greedy continuation texts (up to max_tokens, fewer where the context is
    shorter)."""
    texts = []
    for prompt in prompts:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        budget = min(max_tokens, engine.model.config.sequence_len - len(tokens))
        if budget > 0:
            tokens = engine.generate_batch(tokens, max_tokens=budget, temperature=0)[0][0]
        texts.append(tokenizer.decode(tokens[1:]))
    return texts
