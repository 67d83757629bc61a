"""
Shared test fixtures: a tiny tokenizer trained in the test session, seeded and scripted tiny GPTs, an isolated
artifact root, and a local HTTP server on 127.0.0.1 that serves bytes the tests put in it (with scripted faults).
Then the helpers several test modules share (import them with `from conftest import ...`; fixtures need no import):
the scripts run in a subprocess or in this process, tiny base dirs, the chat stages' d2 source checkpoint and
reference mid-training run, and a small CORE eval bundle.
Run one file with `python -m pytest -q tests/<file>` (OMP_NUM_THREADS defaults to 1 here, see below).
"""

import json
import os
import random
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

# Tests compare against fp32 values worked by hand. Without this the CPU would compute in bf16
# wherever it has AVX512-BF16 or AMX (common.COMPUTE_DTYPE, chosen at import, hence before nanochat
# loads), so results would hang on the CI machine's CPU. The bf16 path's tests set
# NANOCHAT_DTYPE=bfloat16 for their subprocesses.
os.environ.setdefault("NANOCHAT_DTYPE", "float32")

from nanochat.checkpoint import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from tasks.common import Task

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

def pytest_collection_modifyitems(items):
    """The slow tests first: with two workers (runs/test.sh) the four-minute speedrun test then runs beside the rest
    of the suite instead of after it."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)

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

# -----------------------------------------------------------------------------
# Subprocess runners: the scripts as a user launches them (python -m, torchrun) or in this process, on a base dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

def run_script(cmd, base):
    """Run cmd on NANOCHAT_BASE_DIR=base and the local dataset; -> its stdout (it must succeed)."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_DATASET="local", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout

def base_train_in_process(monkeypatch, base, *flags):
    """scripts/base_train.py in this process: start-up errors raise here, with no subprocess to start."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_DATASET", "local")
    monkeypatch.setattr(sys, "argv", ["base_train", *flags])
    runpy.run_module("scripts.base_train", run_name="__main__")

def start_and_signal(cmd, base, pick_pid):
    """Start cmd; when step 0's val bpb is printed (training has begun) SIGTERM the process pick_pid(proc) names."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_DATASET="local", OMP_NUM_THREADS="1",
               PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    watchdog = threading.Timer(300, os.killpg, (proc.pid, signal.SIGKILL))  # a rank left behind would hang
    watchdog.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 00000 | val bpb"):
            os.kill(pick_pid(proc), signal.SIGTERM)
    watchdog.cancel()
    return proc.wait(), "".join(lines)

def copy_dirs(base, dest, *names):
    """A fresh base dir holding copies of base/<name> for each name (the DDP run starts from the same inputs)."""
    for name in names:
        shutil.copytree(base / name, dest / name)
    return dest

def died_before(base, dest, checkpoint_dir, step):
    """A copy of base without `step`'s checkpoint files: a run that died before saving that step."""
    shutil.copytree(base, dest)
    for f in os.listdir(dest / checkpoint_dir):
        if f"{step:06d}" in f:
            os.remove(dest / checkpoint_dir / f)
    return dest

# -----------------------------------------------------------------------------
# Tiny base dirs: what pretraining and checkpoint loading read from NANOCHAT_BASE_DIR

def make_pretraining_dir(path, tokenizer):
    """Tokenizer plus local-dataset shards (2 train, 1 val) of short documents, 20 docs per row group."""
    tokenizer.save(str(path / "tokenizer"))
    data_dir = path / "base_data_local"
    data_dir.mkdir(parents=True)
    words = "the cat sat on a mat while 12 dogs ran to the park , and then ! she said hello world".split()
    rng = random.Random(0)
    for index in (0, 1, 9):
        texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) for _ in range(200)]
        pq.write_table(pa.table({"text": texts}), str(data_dir / f"shard_{index:05d}.parquet"), row_group_size=20)

def save_tiny_gpt(base_dir, tiny_tokenizer, source_dir="base_checkpoints", tag="d2", step=7, bf16=False):
    """A d2 GPT saved as checkpoint <source_dir>/<tag> `step`, its meta as base_train writes it (max_seq_len,
    tokenizer fingerprint)."""
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    config = GPTConfig(sequence_len=32, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                       n_embd=64, window_pattern="SL")
    model = seeded_gpt(config, perturb=0.01)  # every parameter non-trivial, so a wrong load shows
    state = {k: (v.bfloat16() if bf16 else v) for k, v in model.state_dict().items()}
    meta = {"model_config": config.__dict__, "user_config": {"max_seq_len": 32},
            "tokenizer_fingerprint": tiny_tokenizer.fingerprint()}
    save_checkpoint(str(base_dir / source_dir / tag), step, state, None, meta)
    return model

# -----------------------------------------------------------------------------
# Chat stages (scripts/chat_sft.py's loop for mid and SFT): a d2 base checkpoint, one reference mid run, the lrs

# the source run's settings: mid/SFT inherit B=1 rows of T=96; 192 tokens per step (2 accumulation steps) is a flag
SOURCE_SETTINGS = {"max_seq_len": 96, "device_batch_size": 1, "total_batch_size": 192}
# not the recipe's: they must not leak in
PRETRAIN_LRS = {"embedding_lr": 0.25, "unembedding_lr": 0.005, "matrix_lr": 0.03}
MID = os.path.join("mid_checkpoints", "d2")
SFT = os.path.join("chatsft_checkpoints", "d2")
MID_RUN_STEPS = 8
MID_RUN_FLAGS = ["--mixture=synthetic", f"--num-iterations={MID_RUN_STEPS}", "--save-every=4", "--eval-every=4",
                 "--eval-tokens=576", "--chat-eval-every=4", "--chat-eval-max-problems=2", "--total-batch-size=192"]

def chat_model_config(tokenizer):
    return GPTConfig(sequence_len=96, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                     n_embd=64, window_pattern="SL")

def make_base_checkpoint_dir(path, tokenizer, with_optimizer=True):
    """Tokenizer plus base checkpoint d2 step 10 carrying the meta fields chat_sft reads."""
    tokenizer.save(str(path / "tokenizer"))
    config = chat_model_config(tokenizer)
    model = seeded_gpt(config)
    optimizer = model.setup_optimizer(**PRETRAIN_LRS)
    tokens = torch.randint(0, config.vocab_size, (1, 97))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    optimizer.step()  # momentum buffers exist: a real shard to warm-start from
    meta = {"model_config": dict(config.__dict__), "user_config": {**PRETRAIN_LRS, "depth": 2}, **SOURCE_SETTINGS}
    save_checkpoint(str(path / "base_checkpoints" / "d2"), 10, model.state_dict(),
                    optimizer.state_dict() if with_optimizer else None, meta)

def checkpoint(base, directory, step):
    """-> (state dict, meta) of checkpoint `step` in base/directory."""
    with open(os.path.join(base, directory, f"meta_{step:06d}.json")) as f:
        meta = json.load(f)
    return torch.load(os.path.join(base, directory, f"model_{step:06d}.pt"), weights_only=True), meta

@pytest.fixture(scope="module")
def mid_reference_run(tmp_path_factory, tiny_tokenizer):
    """mid_train, one process, 2 accumulation steps, checkpoints at steps 4 and 8, val bpb and chat metrics at 0/4/8."""
    base = tmp_path_factory.mktemp("reference")
    make_base_checkpoint_dir(base, tiny_tokenizer)
    stdout = run_script([sys.executable, "-m", "scripts.mid_train", *MID_RUN_FLAGS], base)
    return base, stdout

class NumberedTask(Task):
    """Conversation i: the user names item i and the assistant repeats it (lengths vary with digits and filler)."""
    def __init__(self, size, **kwargs):
        super().__init__(**kwargs)
        self.size = size

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.size

    def get_example(self, index):
        filler = " and so on" * (index % 5)
        return {"messages": [{"role": "user", "content": f"item {index}{filler}"},
                             {"role": "assistant", "content": f"ok {index}"}]}

# {stage: {group: lr}} at d2 (width 64: sigma = sqrt(12) on the AdamW groups), by hand from the recipes written out
# in test_learning_rates.py; "muon" stands for every Muon group (one per matrix shape)
D2 = {
    "mid": dict(lm_head=0.01385640646, wte=0.6928203230, value_embeds=0.3464101615, resid_lambdas=0.005,
                x0_lambdas=0.5, smear_backout=0.2, muon=0.02),
    "sft": dict(lm_head=0.0002771281292, wte=0.01385640646, value_embeds=0.006928203230, resid_lambdas=0.0001,
                x0_lambdas=0.01, smear_backout=0.004, muon=0.0004),
}

def by_group(initial_lrs):
    """{group name: lr} with the Muon groups (one per matrix shape, all at one lr) folded into "muon"."""
    muon = {lr for name, lr in initial_lrs.items() if name.startswith("muon")}
    assert len(muon) == 1, initial_lrs
    return {**{name: lr for name, lr in initial_lrs.items() if not name.startswith("muon")}, "muon": muon.pop()}

# -----------------------------------------------------------------------------
# A small CORE bundle: 8 multiple-choice (1-shot, "\nAnswer: "), 4 schema (0-shot), 6 language-modeling (2-shot)

CORE_YAML = """\
icl_tasks:
- label: mc_task
  dataset_uri: reasoning/mc_task.jsonl
  num_fewshot: [1]
  icl_task_type: multiple_choice
  continuation_delimiter: "\\nAnswer: "
- label: schema_task
  dataset_uri: language_understanding/schema_task.jsonl
  num_fewshot: [0]
  icl_task_type: schema
- label: lm_task
  dataset_uri: language_understanding/lm_task.jsonl
  num_fewshot: [2]
  icl_task_type: language_modeling
"""

META_CSV = """\
Eval Task,Task Category,Task Type,#shots,Random baseline,Centered Metric?
mc_task,reasoning,multiple choice,1,25,yes
schema_task,language understanding,schema,0,50,yes
lm_task,language understanding,language modeling,2,0,yes
unused_task,world knowledge,language modeling,0,0,yes
"""

# one token each in the tiny tokenizer, so a uniform model ties exactly (no rounding in the mean) and picks choice 0
WORDS = ["dog", "fox", "quick", "brown"]
MC_DATA = [{"query": f"Question {i}: which word is number {i % 4}?", "choices": WORDS, "gold": i % 4} for i in range(8)]
SCHEMA_DATA = [
    {"context_options": ["The trophy did not fit in the suitcase because the trophy",
                         "The trophy did not fit in the suitcase because the suitcase"],
     "continuation": "was too big.", "gold": 0},
    {"context_options": ["The fox jumped over the dog because the fox",
                         "The fox jumped over the dog because the dog"], "continuation": "was lazy.", "gold": 1},
    {"context_options": ["Hello said the man to the boy since the man",
                         "Hello said the man to the boy since the boy"], "continuation": "was kind.", "gold": 0},
    {"context_options": ["Paris is bigger than Rome so Paris",
                         "Paris is bigger than Rome so Rome"], "continuation": "is small.", "gold": 1},
]
LM_DATA = [
    {"context": "The opposite of hot is ", "continuation": "cold"},
    {"context": "The capital of France is", "continuation": "Paris"},
    {"context": "2 + 3 =", "continuation": "5"},
    {"context": "The quick brown fox jumps over the lazy", "continuation": "dog and the cat"},
    {"context": "Hello", "continuation": "world"},
    {"context": "Einstein published four", "continuation": "papers"},
]

def write_bundle(root):
    """Write the fixture bundle at root/eval_bundle/ (the layout the published zip unpacks to)."""
    bundle = root / "eval_bundle"
    for sub, name, rows in [("reasoning", "mc_task", MC_DATA), ("language_understanding", "schema_task", SCHEMA_DATA),
                            ("language_understanding", "lm_task", LM_DATA)]:
        d = bundle / "eval_data" / sub
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (bundle / "core.yaml").write_text(CORE_YAML)
    (bundle / "eval_meta_data.csv").write_text(META_CSV)
    return bundle
