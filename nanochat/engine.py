"""
Fast sampling from a GPT with a KV cache, plus the calculator tool the chat model may call.

    engine = Engine(model, tokenizer)
    for token_column, mask_column in engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8, top_k=50):
        ...                                   # one token per sample per step, streamed
    sequences, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)

How: the prompt is prefilled once at batch 1 into a cache sized to the prompt; that cache is copied into every
row of a decode cache (prompt + max_tokens positions), and each step feeds one token per row. Each row samples
independently from its own logits with one seeded torch.Generator, so a seed reproduces a whole batch.
A row stops at <|assistant_end|> or <|bos|>; the loop stops when every row has stopped or after max_tokens.

Tool use: when a row writes <|python_start|> expr <|python_end|>, the expression goes to `use_calculator`, and its
result is forced into that row as <|output_start|> str(result) <|output_end|> (mask 0: the model did not choose
those tokens, so RL must not train on them). Only arithmetic and str.count are supported; it is a calculator,
not a Python interpreter (nanochat/execution.py is the sandbox for full programs).

Left out: batching different prompts together (rows share one prompt and one cache position), speculative
decoding, paged caches, and sampling beyond temperature/top-k.
"""

import ast
from collections import deque

import torch
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE
from nanochat.gpt import KVCache

# -----------------------------------------------------------------------------
# Calculator tool

# Both kinds of admitted expression run in time bounded by their length, so no timer is needed: arithmetic has
# no ** (9**9**9 never finishes), and the string methods below never make a string longer than its input.
_STRING_METHODS = {"count", "lower", "upper", "casefold", "strip", "lstrip", "rstrip"}
_FORBIDDEN = ["__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input", "globals", "locals",
              "vars", "dir", "getattr", "setattr", "delattr", "hasattr"]
_ARITHMETIC_CHARS = set("0123456789*+-/.() ")
# Unlike the arithmetic case, commas are kept here: in 'a,b'.count(',') they are data.
_STRING_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ,")
_ARITHMETIC_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv,
                     ast.UAdd, ast.USub)
MAX_EXPRESSION_CHARS = 256  # products of <=256 digits stay far below int->str's 4300-digit limit

def _is_string_method_chain(node):
    """str-literal(.method(str-or-int literals))* with methods from _STRING_METHODS only."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and not node.keywords
            and node.func.attr in _STRING_METHODS and _is_string_method_chain(node.func.value)
            and all(isinstance(a, ast.Constant) and isinstance(a.value, (str, int)) for a in node.args))

def _is_arithmetic(tree):
    return all(isinstance(node, _ARITHMETIC_NODES) or (isinstance(node, ast.Constant) and type(node.value) in (int, float))
               for node in ast.walk(tree))

def use_calculator(expr):
    """
    Evaluate a tool call; returns the number, or None when the expression is not allowed or fails.
    Allowed: arithmetic on numbers with + - * / // ( ) (commas in numbers like 1,000 are dropped; ** is refused),
    or a str.count(...) call on a string literal such as 'strawberry'.count('r') (optionally after .lower() etc.).
    Safe to call from any thread: no signals, and every admitted expression is cheap by construction.
    The expression is parsed and checked node by node before it is evaluated with no builtins.
    """
    expr = expr.strip()
    arithmetic = expr.replace(",", "")
    if arithmetic and set(arithmetic) <= _ARITHMETIC_CHARS:
        expr = arithmetic
    elif not (set(expr) <= _STRING_CHARS and ".count(" in expr and not any(w in expr.lower() for w in _FORBIDDEN)):
        return None
    if len(expr) > MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, RecursionError):
        return None
    is_count = isinstance(tree.body, ast.Call) and _is_string_method_chain(tree.body) and tree.body.func.attr == "count"
    if not (_is_arithmetic(tree) or is_count):
        return None
    try:
        return eval(compile(tree, "<calculator>", "eval"), {"__builtins__": {}}, {})
    except (ArithmeticError, TypeError, ValueError):  # 1/0, float overflow, 'abc'.count(1), 'abc'.count()
        return None

# -----------------------------------------------------------------------------
# Sampling

def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """logits (B, V) -> token ids (B, 1). temperature 0 = argmax; top_k None = full vocabulary."""
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None:
        values, indices = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        probs = F.softmax(values / temperature, dim=-1)
        return indices.gather(1, torch.multinomial(probs, num_samples=1, generator=rng))
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)

# -----------------------------------------------------------------------------
# Engine

class RowState:
    """Per-sample decoding state: the tool-call state machine and tokens queued to be forced in."""
    def __init__(self):
        self.forced_tokens = deque()
        self.in_python_block = False
        self.python_tokens = []
        self.completed = False

class Engine:

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def _check_args(self, tokens, num_samples, max_tokens, temperature, top_k):
        """Raise ValueError naming the problem; returns the number of tokens to generate."""
        context, vocab_size = self.model.config.sequence_len, self.model.config.vocab_size
        if len(tokens) == 0:
            raise ValueError("the prompt is empty: start it with the <|bos|> token")
        if not all(isinstance(t, int) and 0 <= t < vocab_size for t in tokens):
            raise ValueError(f"prompt tokens must be ints in [0, {vocab_size}), got {tokens[:16]}...")
        if len(tokens) >= context:
            raise ValueError(f"the prompt has {len(tokens)} tokens but the model's context is {context}: "
                             f"shorten it to at most {context - 1} tokens")
        if max_tokens is None:
            max_tokens = context - len(tokens)
        if max_tokens < 1 or len(tokens) + max_tokens > context:
            raise ValueError(f"max_tokens={max_tokens} with a {len(tokens)}-token prompt does not fit the model's "
                             f"context of {context}: use 1 <= max_tokens <= {context - len(tokens)}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, or None for the full vocabulary; got {top_k}")
        return max_tokens

    def _new_cache(self, batch_size, seq_len):
        config = self.model.config
        return KVCache(batch_size=batch_size, num_heads=config.n_kv_head, seq_len=seq_len,
                       head_dim=config.n_embd // config.n_head, num_layers=config.n_layer,
                       device=self.model.get_device(), dtype=COMPUTE_DTYPE)

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """
        Stream samples: yields (token_column, mask_column), one entry per sample each step.
        mask 1 = sampled by the model, 0 = forced tool output. A stopped row keeps receiving (meaningless)
        tokens until every row has stopped; callers drop a row's tokens after its <|assistant_end|>/<|bos|>.
        max_tokens None = fill the model's context.
        """
        max_tokens = self._check_args(tokens, num_samples, max_tokens, temperature, top_k)
        device = self.model.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        special = self.tokenizer.encode_special
        python_start, python_end = special("<|python_start|>"), special("<|python_end|>")
        output_start, output_end = special("<|output_start|>"), special("<|output_end|>")
        stop_tokens = {special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()}

        # Prefill once at batch 1, then copy that cache into every row of the decode cache.
        prefill_cache = self._new_cache(batch_size=1, seq_len=len(tokens))
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = self.model(ids, kv_cache=prefill_cache)[:, -1, :]
        logits = logits.expand(num_samples, -1)  # each row still samples its own first token
        decode_cache = self._new_cache(batch_size=num_samples, seq_len=len(tokens) + max_tokens)
        decode_cache.prefill(prefill_cache)
        del prefill_cache

        rows = [RowState() for _ in range(num_samples)]
        for step in range(max_tokens):
            sampled = sample_next_token(logits, rng, temperature, top_k)[:, 0].tolist()
            token_column, mask_column = [], []
            for row, token in zip(rows, sampled):
                forced = len(row.forced_tokens) > 0
                if forced:
                    token = row.forced_tokens.popleft()
                token_column.append(token)
                mask_column.append(0 if forced else 1)
                if token in stop_tokens:
                    row.completed = True
                elif token == python_start:
                    row.in_python_block, row.python_tokens = True, []
                elif token == python_end and row.in_python_block:
                    row.in_python_block = False
                    result = use_calculator(self.tokenizer.decode(row.python_tokens))
                    if result is not None:
                        row.forced_tokens.extend([output_start, *self.tokenizer.encode(str(result)), output_end])
                elif row.in_python_block:
                    row.python_tokens.append(token)
            yield token_column, mask_column
            if step == max_tokens - 1 or all(row.completed for row in rows):
                break
            ids = torch.tensor(token_column, dtype=torch.long, device=device).unsqueeze(1)
            logits = self.model(ids, kv_cache=decode_cache)[:, -1, :]

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """
        Returns (sequences, masks): per sample the prompt plus its generated tokens, stop token excluded,
        and a mask (0 for the prompt and forced tool output, 1 for sampled tokens).
        """
        sequences = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        stop_tokens = {self.tokenizer.encode_special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()}
        done = [False] * num_samples
        for token_column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(token_column, mask_column)):
                if done[i]:
                    continue
                if token in stop_tokens:
                    done[i] = True
                else:
                    sequences[i].append(token)
                    masks[i].append(mask)
        return sequences, masks

# -----------------------------------------------------------------------------
# Greedy completions of fixed prompts: how base_train and base_eval show what a base model knows

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
                  "The opposite of hot is", "The planets of the solar system are:", "My favorite color is",
                  "If 5*x + 3 = 13, then x is"]

def greedy_completions(engine, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens=16):
    """-> list of prompt + greedy continuation texts (up to max_tokens, fewer where the context is shorter)."""
    bos = tokenizer.get_bos_token_id()
    texts = []
    for prompt in prompts:
        tokens = tokenizer.encode(prompt, prepend=bos)
        budget = min(max_tokens, engine.model.config.sequence_len - len(tokens))
        sequence = tokens
        if budget > 0:
            sequence = engine.generate_batch(tokens, num_samples=1, max_tokens=budget, temperature=0)[0][0]
        texts.append(tokenizer.decode(sequence[1:]))
    return texts
