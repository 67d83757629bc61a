"""
Load test for chat_web: N concurrent streaming clients for S seconds against a server on 127.0.0.1, then it stops.

    python -m bench.serve                              # random demo-shaped model, 1 then 8 clients, 20 s each
    python -m bench.serve --model sft --clients 1,4,8  # the sft model in $NANOCHAT_BASE_DIR (runs/runcpu.sh trains one)
    python -m bench.serve --url http://127.0.0.1:8000 --api-key KEY   # a server you started yourself
    python -m bench.serve --soak 16 --seconds 300      # soak: 16 clients for 5 minutes, some misbehaving

Each client sends a chat request on the OpenAI route (stream, include_usage), reads it to the end and sends the next
until S seconds are up; requests already under way finish, so a run ends by itself. Per client count it prints
requests, errors, p50/p95 time to first token, and aggregate tokens/s (completion tokens of every request / wall
time), with the ratio to the first row; the last line is JSON with every number.
--model random (default) serves a random-weights model shaped like the CPU demo's (depth 4, width 256, 4 heads,
context 256, vocab 8,192) with a tokenizer trained here on synthetic text: speed depends on shape, not on weights.
--soak N instead runs N clients for --seconds where each request is, at random, well-formed (read to the end), cut
off mid-stream (the client closes the connection after the first tokens) or malformed (a body the server must refuse
with a 4xx). It reports requests served, errors (a well-formed request that failed, a malformed one answered with
anything but a 4xx), p50/p99 latency of the well-formed ones, and the server's RSS before, once the first fifth of the
time has filled every batch slot (the growth that counts is from there), and at the end; then checks that the server
still answers.
Left out: multi-GPU servers (point --url at one), non-streaming requests, prompt-length sweeps.
"""

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import requests
import torch

from nanochat.checkpoint import save_checkpoint
from nanochat.common import get_base_dir
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

parser = argparse.ArgumentParser(description="Load test chat_web with concurrent streaming clients")
parser.add_argument("--clients", type=str, default="1,8", help="comma-separated concurrent client counts, one run each")
parser.add_argument("--seconds", type=float, default=20.0, help="how long each run keeps sending new requests")
parser.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request")
parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the requests")
parser.add_argument("--model", default="random", help="random (demo-shaped, random weights) or base|mid|sft|rl")
parser.add_argument("--url", default="", help="bench a running server at this 127.0.0.1 URL instead of starting one")
parser.add_argument("--api-key", type=str, default="", help="API key of the --url server")
parser.add_argument("--device-type", type=str, default="cpu", help="device of the server this script starts")
parser.add_argument("--dtype", type=str, default="", help="its --dtype ('' = chat_web's default)")
parser.add_argument("--soak", type=int, default=0, help="soak test with this many clients (0 = the load test)")
parser.add_argument("--disconnect-share", type=float, default=0.2, help="soak: share of requests cut off mid-stream")
parser.add_argument("--malformed-share", type=float, default=0.1, help="soak: share of requests with a bad body")
args = parser.parse_args()
clients_list = [args.soak] if args.soak > 0 else [int(c) for c in args.clients.split(",")]
if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
    parser.error(f"--url {args.url}: this load test only runs against 127.0.0.1")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["What is the capital of France?", "Tell me a short story about a fox.", "How do I sort a list in Python?",
           "Why is the sky blue?", "Write a haiku about the sea.", "What is 12 times 7?", "Explain gravity simply.",
           "Spell the word 'strawberry'.", "Who are you?", "Give me three ideas for dinner."]

# -----------------------------------------------------------------------------
# A server to talk to

def write_random_demo_model(base_dir):
    """Random weights in the CPU demo's shape, saved as an sft checkpoint, and an 8,192-token tokenizer."""
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "an", "er", "in", "on", "st", "th", "qu", "ze"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 5))) for _ in range(30_000)]
    texts = [" ".join(rng.choice(words) for _ in range(200)) + ". " + " ".join(PROMPTS) for _ in range(1500)]
    tokenizer = Tokenizer.train_from_iterator(iter(texts), vocab_size=8192)
    tokenizer.save(os.path.join(base_dir, "tokenizer"))
    config = GPTConfig(sequence_len=256, vocab_size=tokenizer.get_vocab_size(), n_layer=4, n_head=4, n_kv_head=4,
                       n_embd=256, window_pattern="L")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    meta = {"model_config": dataclasses.asdict(config), "user_config": {"bench": "random weights"}}
    save_checkpoint(os.path.join(base_dir, "chatsft_checkpoints", "d4"), 0, model.state_dict(), None, meta)

def start_server(base_dir, source, max_batch):
    log_path = os.path.join(base_dir, "chat_web.log")
    env = dict(os.environ, NANOCHAT_BASE_DIR=base_dir)
    cmd = [sys.executable, "-m", "scripts.chat_web", "-i", source, "-p", "0", "--device-type", args.device_type,
           "--max-batch", str(max_batch), *(["--dtype", args.dtype] if args.dtype else [])]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        text = open(log_path).read()
        if "serving http://" in text:
            return proc, text.split("serving ")[1].split()[0].rstrip("/")
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"chat_web did not start; its log:\n{open(log_path).read()[-3000:]}")

# -----------------------------------------------------------------------------
# Clients

def one_request(url, headers, rng):
    """-> (ttft seconds, completion tokens) of one streamed request; raises on any error."""
    body = {"model": "nanochat", "messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": args.max_tokens, "temperature": args.temperature}
    t0 = time.perf_counter()
    ttft, tokens = None, None
    with requests.post(url + "/v1/chat/completions", json=body, headers=headers, stream=True, timeout=300) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        for line in r.iter_lines(decode_unicode=True):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event["choices"] and event["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    if tokens is None:
        raise RuntimeError("the stream ended without a usage chunk")
    return ttft if ttft is not None else time.perf_counter() - t0, tokens

def start_clients(n, request, record):
    """n threads, each calling request(rng) back to back until --seconds are up and handing each result to record()
    under one lock; an exception is counted and shown, never fatal: errors are one of the numbers.
    -> (threads, errors)."""
    errors, lock = [], threading.Lock()
    stop_at = time.perf_counter() + args.seconds

    def client(i):
        rng = random.Random(i)
        while time.perf_counter() < stop_at:
            try:
                result = request(rng)
                with lock:
                    record(result)
            except Exception as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, errors

def run_clients(url, headers, n):
    ttfts, tokens = [], []
    t0 = time.perf_counter()
    threads, errors = start_clients(n, lambda rng: one_request(url, headers, rng),
                                    lambda r: (ttfts.append(r[0]), tokens.append(r[1])))
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(ttfts, n=20) if len(ttfts) >= 2 else [float("nan")] * 19
    return {"clients": n, "requests": len(ttfts), "errors": len(errors), "first_error": errors[0] if errors else None,
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None, "ttft_p95_s": q[18],
            "completion_tokens": sum(tokens), "wall_s": wall, "tok_per_s": sum(tokens) / wall}

# -----------------------------------------------------------------------------
# Soak: the same clients, misbehaving some of the time

MALFORMED = [b"{not json", b'{"messages": "hello"}', b'{"messages": []}', b"[]", b"",
             b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}',
             b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
             b'{"messages": [{"role": "wizard", "content": "hi"}]}', b"\xff\xfe" * 1000]

def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

def soak_request(url, headers, rng):
    """-> ("ok", latency s) | ("cut", None) | ("refused", None); raises when the server misbehaves."""
    roll = rng.random()
    if roll < args.malformed_share:
        r = requests.post(url + "/v1/chat/completions", data=rng.choice(MALFORMED), timeout=60,
                          headers={**headers, "Content-Type": "application/json"})
        if not 400 <= r.status_code < 500:
            raise RuntimeError(f"a malformed body got HTTP {r.status_code}: {r.text[:200]}")
        return "refused", None
    if roll < args.malformed_share + args.disconnect_share:
        body = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "stream": True,
                "max_tokens": args.max_tokens}
        with requests.post(url + "/v1/chat/completions", json=body, headers=headers, stream=True, timeout=300) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            for _ in zip(range(rng.randint(1, 4)), r.iter_lines()):
                pass  # leaving the block closes the connection mid-stream
        return "cut", None
    t0 = time.perf_counter()
    one_request(url, headers, rng)
    return "ok", time.perf_counter() - t0

def run_soak(url, headers, n):
    outcomes, latencies = {"ok": 0, "cut": 0, "refused": 0}, []

    def record(result):
        outcome, latency = result
        outcomes[outcome] += 1
        if latency is not None:
            latencies.append(latency)

    rss = lambda: rss_mib(proc.pid) if proc is not None else None
    rss_start = rss()
    threads, errors = start_clients(n, lambda rng: soak_request(url, headers, rng), record)
    time.sleep(args.seconds / 5)
    rss_warm = rss()
    for t in threads:
        t.join()
    rss_end = rss()
    one_request(url, headers, random.Random(0))  # still serving
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {"clients": n, "served": outcomes["ok"], "cut_mid_stream": outcomes["cut"], "refused": outcomes["refused"],
            "errors": len(errors), "first_error": errors[0] if errors else None,
            "latency_p50_s": q[49], "latency_p99_s": q[98], "rss_start_mib": rss_start, "rss_warm_mib": rss_warm,
            "rss_end_mib": rss_end}

# -----------------------------------------------------------------------------
# Run

proc, tmp = None, None
if args.url:
    url = args.url.rstrip("/")
else:
    if args.model == "random":
        tmp = tempfile.TemporaryDirectory(prefix="nanochat_bench_serve_")
        base_dir = tmp.name
        print("writing a random demo-shaped model (depth 4, width 256, context 256, vocab 8,192)...", flush=True)
        write_random_demo_model(base_dir)
        source = "sft"
    else:
        base_dir, source = get_base_dir(), args.model
    proc, url = start_server(base_dir, source, max(clients_list))
headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
try:
    one_request(url, headers, random.Random(0))  # warm-up: first-call allocations, lazy imports
    if args.soak > 0:
        r = run_soak(url, headers, args.soak)
        growth = "-" if r["rss_warm_mib"] is None else f"{100 * (r['rss_end_mib'] / r['rss_warm_mib'] - 1):+.1f}%"
        print(f"\nchat_web soak: {args.soak} clients for {args.seconds:g} s, max_tokens {args.max_tokens}, "
              f"{args.disconnect_share:.0%} cut off mid-stream, {args.malformed_share:.0%} malformed, "
              f"model {args.model}")
        print(f"served {r['served']} | cut off {r['cut_mid_stream']} | refused {r['refused']} | errors {r['errors']} | "
              f"latency p50 {r['latency_p50_s']:.2f} s p99 {r['latency_p99_s']:.2f} s | server RSS "
              f"{r['rss_start_mib'] or 0:.0f} -> {r['rss_warm_mib'] or 0:.0f} -> {r['rss_end_mib'] or 0:.0f} MiB "
              f"({growth} after the first fifth)")
        if r["first_error"]:
            print(f"first error: {r['first_error']}")
        print(json.dumps(dict(url=url, model=args.model, seconds=args.seconds, soak=r)))
        sys.exit(1 if r["errors"] else 0)
    results = []
    for n in clients_list:
        results.append(run_clients(url, headers, n))
        r = results[-1]
        print(f"  {n} clients: {r['requests']} requests, {r['tok_per_s']:.0f} tok/s, {r['errors']} errors", flush=True)
finally:
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=30)
    if tmp is not None:
        tmp.cleanup()

fmt = lambda x, scale=1e3: "-" if x is None or x != x else f"{x * scale:.0f}"
print(f"\nchat_web load test: {args.seconds:g} s per run, max_tokens {args.max_tokens}, "
      f"temperature {args.temperature}, model {args.model}")
print(" clients  requests  errors  TTFT p50 ms  TTFT p95 ms    tok/s  x first")
for r in results:
    print(f"{r['clients']:>8} {r['requests']:>9} {r['errors']:>7} {fmt(r['ttft_p50_s']):>12} "
          f"{fmt(r['ttft_p95_s']):>12} {r['tok_per_s']:>8.0f} {r['tok_per_s'] / results[0]['tok_per_s']:>7.2f}x")
    if r["first_error"]:
        print(f"         first error: {r['first_error']}")
print(json.dumps(dict(url=url, model=args.model, seconds=args.seconds, max_tokens=args.max_tokens, runs=results)))
