"""
Shared test fixtures: a tiny tokenizer trained in the test session, an isolated artifact root,
and a local HTTP server on 127.0.0.1 that serves bytes the tests put in it (with scripted faults).
Run one file with `python -m pytest -q tests/<file>` (OMP_NUM_THREADS defaults to 1 here, see below).
"""

import os
import socket
import threading
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

# Keep torch from oversubscribing the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Training scripts compile by default on CPU too; for a tiny model the compile (tens of seconds on 2 cores) would
# dwarf the test. tests/test_compile.py unsets this to cover the default (compiled) path.
os.environ.setdefault("NANOCHAT_COMPILE", "0")

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world! How are you doing today? I'm fine, thanks. We'll see; they've gone.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Numbers: 1 12 123 1234 12345, prices $3.50 and 2024-06-01.",
    "Café naïve résumé — señor Müller. 你好，世界！ こんにちは 안녕하세요 🙂🚀",
    "User: what is 2+2? Assistant: 2+2 is 4. The answer is #### 4",
    "In 1905 Einstein published four papers. The speed of light is about 299792458 m/s.",
] * 20

@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer with 256 bytes + 64 merges + 9 specials, trained on TINY_CORPUS."""
    return Tokenizer.train_from_iterator(iter(TINY_CORPUS), vocab_size=256 + 64 + 9)

def seeded_gpt(config, perturb=0.0, seed=0):
    """GPT(config) initialized under torch.manual_seed(seed); perturb > 0 then adds perturb * N(0, 1) to every
    parameter (init zeroes the projections and shrinks lm_head, which would hide their paths)."""
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * perturb)
    return model

@pytest.fixture(scope="session")
def random_chat_gpt():
    """(vocab_size, sequence_len) -> a 2-layer GPT with random matrices (after init every reply ignores the prompt)."""
    def build(vocab_size, sequence_len):
        model = seeded_gpt(GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=2,
                                     n_kv_head=2, n_embd=32))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 and "wte" not in name and "value_embeds" not in name:
                    p.normal_(0.0, p.size(1) ** -0.5)
        return model.eval()
    return build

def scripted_chat_gpt(tokenizer, runs, sequence_len=256):
    """
    A GPT whose greedy reply to any chat prompt follows `runs`: lists of token ids, each token followed by the next
    one in its run (a run may end where the Engine forces tokens in, e.g. the calculator's result, and another
    start at the last forced token). It is a bigram model: after init_weights the blocks add nothing (their output
    projections are zero), so the logits depend on the current token only; each scripted token gets its own
    embedding axis, which lm_head maps to the token after it. A token can be followed one way only.
    """
    follower = {}
    for run in runs:
        for a, b in zip(run, run[1:]):
            assert follower.setdefault(a, b) == b, f"a bigram model cannot follow token {a} by {follower[a]} and {b}"
    config = GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2,
                       n_kv_head=2, n_embd=max(32, len(follower)))
    model = seeded_gpt(config)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        for axis, (a, b) in enumerate(follower.items()):
            model.transformer.wte.weight[a] = torch.nn.functional.one_hot(torch.tensor(axis), config.n_embd)
            model.lm_head.weight[b, axis] = 1.0  # logit sqrt(n_embd) after the final RMSNorm, every other logit 0
    return model.eval()

CALCULATOR_REPLY = [{"type": "text", "text": "Computing:"}, {"type": "python", "text": "12*30"},
                    {"type": "python_output", "text": "360"}, {"type": "text", "text": " Easy!"}]

def calculator_chat_gpt(tokenizer, expression="12*30"):
    """
    A scripted_chat_gpt whose greedy reply to anything is "Computing:", a calculator call of `expression`, " Easy!":
    CALCULATOR_REPLY for 12*30, where the Engine forces <|output_start|>360<|output_end|> in after the call (the
    model goes on from <|output_end|>); for an expression the calculator refuses (2^9) it goes on from the call.
    """
    S, enc = tokenizer.encode_special, tokenizer.encode
    after = [*enc(" Easy!"), S("<|assistant_end|>")]
    return scripted_chat_gpt(tokenizer, [
        [S("<|assistant_start|>"), *enc("Computing:"), S("<|python_start|>"), *enc(expression), S("<|python_end|>"),
         *after], [S("<|output_end|>"), *after]])

@pytest.fixture
def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on: the rendezvous of a 2-process gloo test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """An isolated NANOCHAT_BASE_DIR for one test."""
    d = tmp_path / "nanochat_base"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    return d

class LocalServer:
    """
    Serves `routes[path] = bytes`. `faults[path]` is a list consumed one request at a time:
    "500" answers HTTP 500, "cut" sends headers for the full length then half the body and closes.
    `hits[path]` counts requests.
    """
    def __init__(self):
        self.routes, self.faults, self.hits = {}, {}, {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                server.hits[path] = server.hits.get(path, 0) + 1
                fault = server.faults.get(path, []).pop(0) if server.faults.get(path) else None
                if fault == "500":
                    self.send_error(500, "scripted failure")
                    return
                if path not in server.routes:
                    self.send_error(404, "not found")
                    return
                body = server.routes[path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fault == "cut":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

@pytest.fixture
def http_server():
    server = LocalServer()
    yield server
    server.close()
