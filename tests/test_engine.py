"""
Engine (KV-cached sampling with tool use) and its calculator.

The reference for the cache is the obvious thing: re-run the whole sequence through the model at every step and
take the argmax. A tiny random GPT (sliding windows shorter than the sequence, smear and backout switched on, GQA)
must give exactly those tokens. Sampling and the tool state machine are checked with mock models whose logits
are written by hand, and a byte-level mock tokenizer, so nothing here depends on a trained tokenizer.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from nanochat.engine import Engine, RowBatch, sample_next_token, use_calculator
from nanochat.gpt import GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS
from conftest import seeded_gpt

# -----------------------------------------------------------------------------
# Mocks

class ByteTokenizer:
    """ids 0..255 are bytes, 256..264 the nine special tokens in their usual order."""
    def __init__(self):
        self.special = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}

    def get_vocab_size(self):
        return 256 + len(self.special)

    def get_bos_token_id(self):
        return self.special["<|bos|>"]

    def encode_special(self, name):
        return self.special[name]

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

TOK = ByteTokenizer()
V = TOK.get_vocab_size()
S = TOK.special

class MockModel:
    """Logits at each position are logits_fn(token at that position): a bigram table, uniform, anything."""
    compute_dtype = torch.float32  # the dtype of the KV cache the Engine allocates for it

    def __init__(self, logits_fn, sequence_len=64):
        self.logits_fn = logits_fn
        self.config = GPTConfig(sequence_len=sequence_len, vocab_size=V, n_layer=1, n_head=1, n_kv_head=1, n_embd=24)

    def get_device(self):
        return torch.device("cpu")

    def __call__(self, idx, kv_cache=None):
        B, T = idx.shape
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.logits_fn(idx.reshape(-1)).view(B, T, V)

def uniform_model(**kw):
    return MockModel(lambda ids: torch.zeros(len(ids), V), **kw)

def bigram_model(next_token, **kw):
    """Deterministic under greedy decoding: after token a comes next_token[a] (default: byte 'x')."""
    table = torch.zeros(V, V)
    table[:, ord("x")] = 1.0
    for a, b in next_token.items():
        table[a] = 0.0
        table[a, b] = 10.0
    return MockModel(lambda ids: table[ids], **kw)

PROMPT = [S["<|bos|>"], S["<|user_start|>"], *TOK.encode("hi"), S["<|user_end|>"], S["<|assistant_start|>"]]

def tiny_gpt():
    """A random GPT whose every part matters: random weights everywhere (init zeros the projections), smear and
    backout on, 2 query heads sharing 1 kv head, windows 128/128/256 so a ~190-token sequence outgrows the short
    ones."""
    model = seeded_gpt(GPTConfig(sequence_len=256, vocab_size=V, n_layer=3, n_head=2, n_kv_head=1, n_embd=32,
                                 window_pattern="SSL"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "wte" not in name and "value_embeds" not in name:
                p.normal_(0.0, p.size(1) ** -0.5)   # unit-scale activations: logits spread over several units
        model.smear_lambda.fill_(0.7)
        model.backout_lambda.fill_(0.3)
    assert model.window_sizes == [128, 128, 256], model.window_sizes
    return model.eval()

@torch.no_grad()
def greedy_by_recompute(model, tokens, max_tokens, stop_tokens):
    """The reference: no cache, the full sequence through the model for every new token."""
    tokens, out = list(tokens), []
    for _ in range(max_tokens):
        next_token = int(model(torch.tensor([tokens]))[0, -1].argmax())
        if next_token in stop_tokens:
            break
        tokens.append(next_token)
        out.append(next_token)
    return out

# -----------------------------------------------------------------------------
# KV cache against full recompute

def test_greedy_with_cache_equals_full_recompute():
    model = tiny_gpt()
    engine = Engine(model, TOK)
    prompt = [S["<|bos|>"]] + torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    stops = {S["<|assistant_end|>"], S["<|bos|>"]}
    expected = greedy_by_recompute(model, prompt, 40, stops)
    assert len(expected) >= 20, f"the random model stopped after {len(expected)} tokens: too short to test the windows"
    sequences, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=40, temperature=0.0)
    for seq, mask in zip(sequences, masks):
        assert seq[:len(prompt)] == prompt
        assert seq[len(prompt):] == expected
        assert mask == [0] * len(prompt) + [1] * len(expected)

def run_rows(batch, joins, steps):
    """Step a RowBatch, adding joins[step] = [(name, tokens, kwargs)] before that step -> {name: (tokens, finish)}."""
    names, out = {}, {}
    for step in range(steps):
        firsts = []
        for name, tokens, kwargs in joins.get(step, []):
            firsts.append(batch.add(tokens, **kwargs))
            names[id(firsts[-1][0])] = name
            out[name] = ([], None)
        for request, token, _, finish in firsts + batch.step():
            out[names[id(request)]][0].append(token)
            out[names[id(request)]] = (out[names[id(request)]][0], finish)
    return out

def test_row_batch_rows_at_own_positions_equal_full_recompute():
    # Rows with different prompts (150, 20 and 90 tokens: the long one outgrows the 128-token windows) join at
    # different steps; each must decode exactly what re-running its own sequence without a cache gives. c sits
    # between a and b and leaves first: b moves into its row of the cache, which grew from 1 to 2 to 4 rows.
    model = tiny_gpt()
    engine = Engine(model, TOK)
    g = torch.Generator().manual_seed(1)
    prompts = {name: [S["<|bos|>"]] + torch.randint(0, 256, (n - 1,), generator=g).tolist()
               for name, n in (("a", 150), ("b", 20), ("c", 90))}
    stops = {S["<|assistant_end|>"], S["<|bos|>"]}
    greedy = dict(max_tokens=30, temperature=0.0)
    joins = {0: [("a", prompts["a"], greedy)],
             3: [("c", prompts["c"], dict(greedy, max_tokens=5)), ("b", prompts["b"], greedy)]}
    out = run_rows(RowBatch(engine), joins, steps=40)
    for name, prompt in prompts.items():
        expected = greedy_by_recompute(model, prompt, 5 if name == "c" else 30, stops)
        tokens, finish = out[name]
        body = tokens[:-1] if finish == "stop" else tokens
        assert body == expected, f"row {name}"
        assert finish == ("stop" if len(expected) < len(tokens) or tokens[-1] in stops else "length")
    assert out["c"][1] == "length" and len(out["c"][0]) == 5

def test_row_batch_hands_out_tokens_before_feeding_them():
    # A server streams what add() and step() return: the forward of those tokens waits for the next step(), so
    # every token, a new request's first one included, reaches its client a forward sooner.
    model = tiny_gpt()
    decode_rows = []
    count_decode = lambda module, args: decode_rows.append(args[0].size(0)) if args[0].size(1) == 1 else None
    model.register_forward_pre_hook(count_decode)  # (B, 1) ids: a decode forward of B rows
    batch = RowBatch(Engine(model, TOK))
    first, token, _, finish = batch.add(PROMPT, max_tokens=10, temperature=0.0)  # sampled from the prefill
    second, *_ = batch.add(PROMPT[:3], max_tokens=10, temperature=0.0)
    assert isinstance(token, int) and finish is None and len(batch) == 2 and decode_rows == []
    assert [r for r, *_ in batch.step()] == [first, second] and decode_rows == [2]  # both first tokens, one forward
    batch.cancel(first)
    assert [r for r, *_ in batch.step()] == [second] and decode_rows == [2, 1]
    # a request its first token finishes never joins
    assert batch.add(PROMPT, max_tokens=1, temperature=0.0)[3] == "length" and len(batch) == 1

def test_cpu_cache_keeps_each_heads_keys_contiguous_as_rows_join_and_leave():
    # A decode step multiplies each head's cached keys as one matrix: (B, H, T, D) views whose
    # (T, D) blocks are contiguous, or CPU matmul copies every layer's keys first, every step.
    model = seeded_gpt(GPTConfig(sequence_len=64, vocab_size=V, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    batch = RowBatch(Engine(model, TOK))
    requests = [batch.add(prompt, max_tokens=4, temperature=0.0)[0] for prompt in (PROMPT, PROMPT[:3], PROMPT)]
    batch.cancel(requests[1])
    batch.step()
    for cache in (batch.cache.k_cache, batch.cache.v_cache):
        heads = cache[0].transpose(1, 2)  # (B, H, T, D)
        assert heads.size(0) == 2 and heads.stride(-1) == 1 and heads.stride(-2) == heads.size(-1)

def test_row_batch_seeded_row_same_alone_or_batched_and_cancel():
    engine = Engine(tiny_gpt(), TOK)
    sampled = dict(max_tokens=12, temperature=1.0, top_k=20, seed=7)
    alone = run_rows(RowBatch(engine), {0: [("s", PROMPT, sampled)]}, steps=12)["s"]
    other = [S["<|bos|>"]] + TOK.encode("a longer, different prompt")
    batch = RowBatch(engine)
    together = run_rows(batch, {0: [("o", other, dict(sampled, seed=1))], 2: [("s", PROMPT, sampled)]}, steps=14)["s"]
    assert together == alone
    # a cancelled row leaves at once; the others go on
    first = batch.add(other, max_tokens=20, temperature=0.0)[0]
    second = batch.add(PROMPT, max_tokens=20, temperature=0.0)[0]
    batch.step()
    batch.cancel(first)
    assert len(batch) == 1 and [r for r, *_ in batch.step()] == [second]
    # several at once (a server whose clients left together): they leave in one call, the rest go on
    third, fourth = (batch.add(PROMPT, max_tokens=20, temperature=0.0)[0] for _ in range(2))
    batch.cancel(second, fourth)
    assert len(batch) == 1 and [r for r, *_ in batch.step()] == [third]

def test_temperature_zero_ignores_seed_and_fixed_seed_reproduces():
    engine = Engine(tiny_gpt(), TOK)
    greedy = [engine.generate_batch(PROMPT, num_samples=2, max_tokens=12, temperature=0.0, seed=s)[0] for s in (1, 2)]
    assert greedy[0] == greedy[1]
    sample = lambda: engine.generate_batch(PROMPT, num_samples=3, max_tokens=12, temperature=1.0, top_k=20, seed=7)[0]
    sampled = [sample(), sample()]
    assert sampled[0] == sampled[1]

# -----------------------------------------------------------------------------
# Sampling

def test_multi_sample_first_tokens_sampled_independently():
    # A broadcast first token would make all 16 equal. Under uniform logits over 265 tokens, 16 independent
    # draws are all equal with probability 265**-15 (about 1e-36): a false failure never happens.
    engine = Engine(uniform_model(), TOK)
    first_column, _ = next(engine.generate(PROMPT, num_samples=16, max_tokens=4, temperature=1.0, seed=0))
    assert len(first_column) == 16
    assert len(set(first_column)) > 1, first_column

def test_different_seeds_differ():
    # 8 tokens in each of 4 rows under uniform logits: equal for two seeds with probability 265**-32.
    engine = Engine(uniform_model(), TOK)
    runs = [engine.generate_batch(PROMPT, num_samples=4, max_tokens=8, temperature=1.0, seed=s)[0] for s in (1, 2)]
    assert runs[0] != runs[1]

def test_sampling_frequencies_follow_the_softmax():
    # 40,000 draws from softmax(logits / 0.5) over 6 tokens (one of probability 0): every frequency within 5 standard
    # errors (a false failure ~1e-6 per token), the zero-probability token never drawn, top-k renormalizes over the k.
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")]]).expand(8, -1)
    rng = torch.Generator().manual_seed(0)
    for top_k, keep in [(None, 6), (3, 3)]:
        draws = torch.cat([sample_next_token(logits, rng, temperature=0.5, top_k=top_k) for _ in range(5000)]).view(-1)
        p = torch.zeros(6)
        p[:keep] = torch.softmax(logits[0, :keep] / 0.5, dim=-1)
        freq = torch.bincount(draws, minlength=6) / draws.numel()
        assert (freq - p).abs().max() <= 5 * (p * (1 - p) / draws.numel()).sqrt().max(), (top_k, freq, p)
        assert freq[keep:].sum() == 0

def test_top_k_keeps_only_the_k_best():
    favourites = [ord("a"), ord("b"), ord("c")]
    logits = torch.zeros(V)
    logits[favourites] = torch.tensor([5.0, 4.0, 3.0])
    engine = Engine(MockModel(lambda ids: logits.expand(len(ids), V)), TOK)
    seqs, _ = engine.generate_batch(PROMPT, num_samples=16, max_tokens=8, temperature=1.0, top_k=3, seed=0)
    assert {t for s in seqs for t in s[len(PROMPT):]} <= set(favourites)
    # Without top-k the other 262 tokens hold 54% of the mass: 128 draws all among the three happen with p ~ 1e-43.
    seqs, _ = engine.generate_batch(PROMPT, num_samples=16, max_tokens=8, temperature=1.0, seed=0)
    assert not {t for s in seqs for t in s[len(PROMPT):]} <= set(favourites)

# -----------------------------------------------------------------------------
# Stopping

def test_max_tokens_honoured():
    engine = Engine(bigram_model({}), TOK)  # always 'x', never a stop token
    steps = list(engine.generate(PROMPT, num_samples=3, max_tokens=5, temperature=0.0))
    assert len(steps) == 5
    seqs, masks = engine.generate_batch(PROMPT, num_samples=3, max_tokens=5, temperature=0.0)
    assert seqs == [PROMPT + [ord("x")] * 5] * 3
    # max_tokens=None fills the context exactly
    seqs, _ = engine.generate_batch(PROMPT, max_tokens=None, temperature=0.0)
    assert len(seqs[0]) == engine.model.config.sequence_len

@pytest.mark.parametrize("stop", ["<|assistant_end|>", "<|bos|>"])
def test_stops_on_stop_token(stop):
    text = [ord(c) for c in "ok"]
    engine = Engine(bigram_model({S["<|assistant_start|>"]: text[0], text[0]: text[1], text[1]: S[stop]}), TOK)
    steps = list(engine.generate(PROMPT, num_samples=2, max_tokens=20, temperature=0.0))
    assert [col[0] for col, _ in steps] == text + [S[stop]]  # the stop token is yielded, then generation ends
    seqs, masks = engine.generate_batch(PROMPT, num_samples=2, max_tokens=20, temperature=0.0)
    assert seqs == [PROMPT + text] * 2
    assert masks == [[0] * len(PROMPT) + [1, 1]] * 2

# -----------------------------------------------------------------------------
# Tool use

def test_calculator_output_forced_with_mask_zero():
    ps, pe, os_, oe = S["<|python_start|>"], S["<|python_end|>"], S["<|output_start|>"], S["<|output_end|>"]
    two, plus, three, five, bang = ord("2"), ord("+"), ord("3"), ord("5"), ord("!")
    # The model writes <|python_start|>2+3<|python_end|>; whatever it would write next is overridden by the tool's
    # output; after <|output_end|> it says "!" and ends its turn.
    engine = Engine(bigram_model({S["<|assistant_start|>"]: ps, ps: two, two: plus, plus: three, three: pe,
                                  oe: bang, bang: S["<|assistant_end|>"]}), TOK)
    seqs, masks = engine.generate_batch(PROMPT, num_samples=2, max_tokens=30, temperature=0.0)
    generated = [ps, two, plus, three, pe, os_, five, oe, bang]
    assert seqs == [PROMPT + generated] * 2
    assert masks == [[0] * len(PROMPT) + [1, 1, 1, 1, 1, 0, 0, 0, 1]] * 2

def test_failed_tool_call_forces_nothing():
    ps, pe = S["<|python_start|>"], S["<|python_end|>"]
    one, slash, zero = ord("1"), ord("/"), ord("0")
    # 1/0 has no value, so nothing is forced: after <|python_end|> the model goes on with its own 'x's.
    engine = Engine(bigram_model({S["<|assistant_start|>"]: ps, ps: one, one: slash, slash: zero, zero: pe}), TOK)
    seqs, masks = engine.generate_batch(PROMPT, max_tokens=8, temperature=0.0)
    assert seqs[0][len(PROMPT):] == [ps, one, slash, zero, pe, ord("x"), ord("x"), ord("x")]
    assert masks[0][len(PROMPT):] == [1] * 8

def test_calculator_values_and_refusals_from_worker_threads():
    good = {"2+3": 5, "1,000 * 3": 3000, "10/4": 2.5, "7//2": 3, "-(3 - 5)": 2,
            "'strawberry'.count('r')": 3, "'Mississippi'.lower().count('s')": 4, "'a,b,c'.count(',')": 2}
    bad = ["2**10", "9**9**9", "1/0", "__import__('os').system('echo hi')", "open('/etc/passwd').read().count('r')",
           "'a'.center(999999999).count('a')", "().__class__.__bases__", "exit()", "(lambda: 1)()", "x.count(1)",
           "'ab'.count('a') + 1", "'ab'.count(1)", "'ab'.count()", "()", "1e9", "", "9" * 300]
    # SIGALRM-based timeouts raise "signal only works in main thread" here; this calculator has none.
    with ThreadPoolExecutor(max_workers=2) as pool:
        good_results = list(pool.map(use_calculator, good))
        bad_results = list(pool.map(use_calculator, bad))
    assert good_results == list(good.values())
    assert bad_results == [None] * len(bad), dict(zip(bad, bad_results))

# -----------------------------------------------------------------------------
# Argument checks

def test_bad_arguments_raise_clear_errors():
    engine = Engine(uniform_model(sequence_len=64), TOK)
    with pytest.raises(ValueError, match="context"):
        engine.generate_batch([S["<|bos|>"]] * 64, max_tokens=1)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.generate_batch(PROMPT, max_tokens=64)
    for temperature in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            engine.generate_batch(PROMPT, max_tokens=4, temperature=temperature)
    with pytest.raises(ValueError, match="top_k"):
        engine.generate_batch(PROMPT, max_tokens=4, top_k=0)
    with pytest.raises(ValueError, match="empty"):
        engine.generate_batch([], max_tokens=4)
