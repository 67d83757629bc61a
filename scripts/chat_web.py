"""
Serve a chat model over HTTP: a ChatGPT-like page in the browser and an OpenAI-compatible API.

    python -m scripts.chat_web                          # newest sft model, http://127.0.0.1:8000/
    python -m scripts.chat_web -i sft -g d20 -n 8       # one worker per GPU on 8 GPUs
    python -m scripts.chat_web --host 0.0.0.0 --api-key "$KEY"   # reachable from other machines

Endpoints: GET / (the UI, nanochat/ui.html), GET /health, GET /stats, POST /chat/completions (the
page's route: SSE lines `data: {"token": ..., "type": ..., "part": ..., "gpu": ...}` then `data:
{"done": true}`; type is text, python (a calculator call's code) or python_output (its result), part
numbers the reply's parts), POST /v1/chat/completions (OpenAI format, streamed or not: content is
the reply's text, calculator calls left out) and GET /v1/models. With --api-key every endpoint but /
and /health needs `Authorization: Bearer <key>`. Prompts are rendered by
tokenizer.render_for_completion: user and assistant alternate, the user speaks last, and a leading
`system` message (OpenAI route only) becomes the start of the first user message, as in training.

How it serves: one worker thread per device (one model replica each; one worker on CPU/MPS). Each
worker decodes every request it holds as one batch (engine.RowBatch: each row with its own prompt,
cache position, sampling and seed), so concurrent users share the device's steps instead of queueing
for it; a request joins between steps after its prefill, which gives its first token, and leaves
when it ends or its client disconnects. Requests go to the least loaded worker and wait there when
it already decodes --max-batch rows. Tokens reach the event loop through an asyncio queue, so
generation never blocks it; text is streamed in whole UTF-8 characters. On CPU torch runs on every
core but one (--threads).

Left out: CORS (the page is served from the same origin, so other websites cannot read the API from
a browser), n > 1, top_p, stop sequences, tools, logprobs (each answered with a 400 naming the
field), request logging of content.
"""

import argparse
import os

from nanochat.engine import add_dtype_flag

parser = argparse.ArgumentParser(description="Serve a chat model: web UI and OpenAI-compatible API")
parser.add_argument("-n", "--num-gpus", type=int, default=1, help="workers, one per GPU (CPU: 1)")
parser.add_argument("-i", "--source", default="sft", help="base|mid|sft|rl, or an export_hf folder")
parser.add_argument("-g", "--model-tag", default=None, help="e.g. d20 (default: the largest d<N>)")
parser.add_argument("-s", "--step", type=int, default=None, help="default: the newest")
parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default (0 = greedy)")
parser.add_argument("-k", "--top-k", type=int, default=50, help="default (0 = whole vocabulary)")
parser.add_argument("-m", "--max-tokens", type=int, default=512, help="default most per reply")
parser.add_argument("-p", "--port", type=int, default=8000, help="0 = any free port, printed")
parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 = the network)")
parser.add_argument("--device-type", default="", help="cuda|cpu|mps (empty = autodetect)")
parser.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY", ""),
                    help="require 'Authorization: Bearer <key>' (default: $NANOCHAT_API_KEY)")
parser.add_argument("--max-batch", type=int, default=8, help="requests one worker decodes at once")
parser.add_argument("--threads", type=int, default=0, help="CPU: torch threads "
                    "(0 = $OMP_NUM_THREADS if set, else every core but one, left to the HTTP side)")
add_dtype_flag(parser)
args = parser.parse_args()

import asyncio
import hmac
import json
import queue
import random
import socket
import threading
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from nanochat.checkpoint import SOURCE_DIRS, find_model_tag, load_model
from nanochat.common import autodetect_device_type, compute_init, get_base_dir
from nanochat.engine import Engine, ReplyStream, RowBatch, prepare_for_inference

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_TOTAL_CHARS = 32_000
MAX_TOKENS_LIMIT = 4_096
MAX_TOP_K = 200
MAX_BODY_BYTES = 1 << 20
UI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "nanochat", "ui.html")

device_type = args.device_type or autodetect_device_type()
if args.num_gpus < 1 or (device_type != "cuda" and args.num_gpus != 1):
    parser.error(f"--num-gpus={args.num_gpus}: use >= 1 on CUDA and 1 on {device_type}")
if device_type == "cuda" and args.num_gpus > torch.cuda.device_count():
    parser.error(f"--num-gpus={args.num_gpus} but torch sees {torch.cuda.device_count()} GPUs")
if not (0 <= args.temperature <= 2 and 0 <= args.top_k <= MAX_TOP_K
        and 1 <= args.max_tokens <= MAX_TOKENS_LIMIT and args.max_batch >= 1 and args.threads >= 0):
    parser.error(f"need 0 <= -t <= 2, 0 <= -k <= {MAX_TOP_K}, 1 <= -m <= {MAX_TOKENS_LIMIT}, "
                 f"--max-batch >= 1 and --threads >= 0")
if device_type == "cpu" and (args.threads or "OMP_NUM_THREADS" not in os.environ):
    # The event loop and the clients' sockets need CPU time too: with every core running a torch
    # thread, each step's OpenMP threads wait at their barriers for whichever one was descheduled
    # (docs/perf.md, "Serving")
    torch.set_num_threads(args.threads or max(1, torch.get_num_threads() - 1))

# -----------------------------------------------------------------------------
# Request validation: every rule answers HTTP 400 with an OpenAI-style error naming the field

class APIError(Exception):
    def __init__(self, message, param=None, status=400, kind="invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": None}}

def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)  # a bool is an int to Python, not to JSON

def check_range(body, name, lo, hi, integer, default):
    value = body.get(name)
    if value is None:
        return default
    if not (is_int(value) or (not integer and isinstance(value, float))) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        got = json.dumps(value)[:50]
        raise APIError(f"{name} must be {kind} from {lo} to {hi}, got {got}", name)
    return value

def message_content(content, i, role, openai):
    """
    A message's content: a string, or a list of parts. OpenAI route: {"type": "text", "text": ...}
    parts, joined. Web route: an assistant reply as the page keeps it, text and tool parts
    ("python", "python_output"), kept as parts so that the prompt holds the tool call as the model
    wrote it.
    """
    field = f"messages[{i}].content"
    kinds = (("text",) if openai else
             ("text", "python", "python_output") if role == "assistant" else ())
    if isinstance(content, list) and kinds:
        if not all(isinstance(p, dict) and p.get("type") in kinds and isinstance(p.get("text"), str)
                   for p in content):
            types = " | ".join(map(json.dumps, kinds))
            note = " (images, audio and files are not supported)" if openai else ""
            raise APIError(f'{field} parts must be {{"type": {types}, "text": "..."}}{note}', field)
        parts = [{"type": p["type"], "text": p["text"]} for p in content]
        content = "".join(p["text"] for p in parts) if openai else parts
    elif not isinstance(content, str):
        raise APIError(f"{field} must be a string", field)
    chars = len(content) if isinstance(content, str) else sum(len(p["text"]) for p in content)
    if not chars and isinstance(content, str):  # a reply's parts may be empty: it said nothing
        raise APIError(f"{field} is empty", field)
    if chars > MAX_MESSAGE_CHARS:
        raise APIError(f"{field} has {chars} characters; the limit is {MAX_MESSAGE_CHARS}", field)
    return content, chars

# OpenAI fields we cannot honour: a value other than the neutral one is refused, never silently
# ignored.
UNSUPPORTED = {"n": 1, "top_p": 1, "tools": None, "tool_choice": None, "functions": None,
               "function_call": None, "logprobs": False, "top_logprobs": None, "stop": None,
               "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "audio": None,
               "response_format": {"type": "text"}, "modalities": None, "prediction": None}
IGNORED = {"model", "user", "store", "metadata", "parallel_tool_calls", "service_tier",
           "reasoning_effort"}
WEB_FIELDS = {"messages", "temperature", "top_k", "max_tokens", "seed"}
OPENAI_FIELDS = WEB_FIELDS | {"max_completion_tokens", "stream", "stream_options"}

def parse_chat_request(body, openai):
    """Validated settings from a request body; raises APIError naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    known = OPENAI_FIELDS | set(UNSUPPORTED) | IGNORED if openai else WEB_FIELDS
    for name, value in body.items():
        if name not in known:
            raise APIError(f"Unrecognized request argument supplied: {name}", name)
        if name in UNSUPPORTED and value not in (None, UNSUPPORTED[name]):
            raise APIError(f"{name}={json.dumps(value)[:50]} is not supported by this server", name)
    if not isinstance(body.get("model", ""), str):  # the web route refused the field above
        raise APIError("model must be a string", "model")

    messages = body.get("messages")
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise APIError(f"messages must be a list of 1 to {MAX_MESSAGES} messages", "messages")
    roles = ("system", "user", "assistant") if openai else ("user", "assistant")
    parsed, total = [], 0
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(f"{at} must be an object with role and content", at)
        if m.get("role") not in roles:
            got = json.dumps(m.get("role"))[:50]
            raise APIError(f"{at}.role must be one of {', '.join(roles)}; got {got}", f"{at}.role")
        if m["role"] == "system" and i != 0:
            raise APIError(f"{at}: a system message must be the first message", f"{at}.role")
        content, chars = message_content(m.get("content"), i, m["role"], openai)
        parsed.append({"role": m["role"], "content": content})
        total += chars
    if total > MAX_TOTAL_CHARS:
        raise APIError(f"the messages have {total} characters in all; "
                       f"the limit is {MAX_TOTAL_CHARS}", "messages")
    if parsed[-1]["role"] != "user":
        raise APIError("the last message must be the user's: "
                       "the reply is the assistant's next turn", "messages")

    max_tokens = check_range(body, "max_tokens", 1, MAX_TOKENS_LIMIT, True, None)
    max_new = check_range(body, "max_completion_tokens", 1, MAX_TOKENS_LIMIT, True, max_tokens)
    if None not in (max_tokens, max_new) and max_tokens != max_new:
        raise APIError("max_tokens and max_completion_tokens differ: send one of them",
                       "max_completion_tokens")
    stream = body.get("stream", False)  # the web route always streams: it accepts no such field
    if not isinstance(stream, bool):
        raise APIError("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    include_usage = options.get("include_usage", False) if isinstance(options, dict) else None
    if not isinstance(include_usage, bool):
        raise APIError('stream_options must be like {"include_usage": true}', "stream_options")
    seed = body.get("seed")
    if seed is not None and not is_int(seed):
        raise APIError("seed must be an integer", "seed")
    return dict(messages=parsed, stream=stream, include_usage=include_usage,
                temperature=float(check_range(body, "temperature", 0, 2, False, args.temperature)),
                top_k=check_range(body, "top_k", 0, MAX_TOP_K, True, args.top_k) or None,  # 0: all
                max_tokens=max_new or args.max_tokens,
                seed=random.randrange(2**31) if seed is None else seed % 2**63)

async def read_json(request):
    """The body as JSON, read in pieces: an oversized body is refused without buffering it whole."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise APIError(f"the request body has {length} bytes; the limit is {MAX_BODY_BYTES}",
                       status=413)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            raise APIError(f"the request body is over the {MAX_BODY_BYTES}-byte limit", status=413)
    try:
        return json.loads(bytes(data))
    except (ValueError, RecursionError) as e:  # bad UTF-8: ValueError; deep nesting: RecursionError
        raise APIError(f"the request body is not valid JSON: {str(e)[:200]}")

# -----------------------------------------------------------------------------
# Workers: one thread per device, each decoding all of its requests as one batch

class Job:
    """One request as a worker sees it; results go back to the event loop (deliver) as
    (token, finish) or ("error", text)."""
    def __init__(self, tokens, settings):
        self.tokens, self.row = tokens, None
        self.sampling = {k: settings[k] for k in ("max_tokens", "temperature", "top_k", "seed")}
        self.loop, self.results = asyncio.get_running_loop(), asyncio.Queue()
        self.cancelled = threading.Event()

def deliver(delivered):
    for job, item in delivered:
        job.results.put_nowait(item)

class Worker(threading.Thread):
    def __init__(self, gpu_id, device, engine):
        super().__init__(daemon=True, name=f"worker-{gpu_id}")
        self.gpu_id, self.device, self.engine = gpu_id, device, engine
        self.waiting, self.wake = queue.Queue(), threading.Event()
        # jobs: those with a row in the batch (worker thread only); load: requests assigned and not
        # finished (event loop thread only)
        self.jobs, self.load = [], 0

    def fail(self, jobs, stage, e, message=None):
        """Say loudly what failed; its requests end with an error naming the exception's type."""
        name = type(e).__name__
        print(f"worker {self.gpu_id}: {stage} failed: {name}: {e}", flush=True)
        error = ("error", message or f"generation failed: {name}")
        jobs[0].loop.call_soon_threadsafe(deliver, [(job, error) for job in jobs])

    def run(self):
        batch = RowBatch(self.engine)
        while True:
            if not self.jobs and self.waiting.empty():
                self.wake.wait()
            self.wake.clear()
            gone = [j for j in self.jobs if j.cancelled.is_set()]  # clients gone: free their rows
            if gone:
                batch.cancel(*(j.row for j in gone))
                self.jobs = [j for j in self.jobs if j not in gone]
            while len(self.jobs) < args.max_batch and not self.waiting.empty():
                job = self.waiting.get()
                try:
                    if not job.cancelled.is_set():
                        job.row, token, _, finish = batch.add(job.tokens, **job.sampling)
                        job.loop.call_soon_threadsafe(deliver, [(job, (token, finish))])
                        if finish is None:
                            self.jobs.append(job)
                except Exception as e:  # a bad setting (ValueError) or prefill: fail the request
                    self.fail([job], "prefill", e, str(e) if isinstance(e, ValueError) else None)
            if not self.jobs:
                continue
            try:
                results = batch.step()
            except Exception as e:  # fail the requests in flight loudly, serve the next ones
                self.fail(self.jobs, "decode step", e)
                self.jobs, batch = [], RowBatch(self.engine)
                continue
            by_row = {id(job.row): job for job in self.jobs}
            delivered = [(by_row[id(row)], (token, finish)) for row, token, _, finish in results]
            # one wake-up of the event loop per step, not one per row
            self.jobs[0].loop.call_soon_threadsafe(deliver, delivered)
            self.jobs = [job for job, (_, finish) in delivered if finish is None]

# -----------------------------------------------------------------------------
# Load one replica per device

devices = [compute_init(device_type)[4]]  # cuda:0 on CUDA; --num-gpus adds the others
devices += [torch.device("cuda", i) for i in range(1, args.num_gpus)]
if os.path.isdir(args.source):  # a directory written by scripts.export_hf (e.g. from the Hub)
    model_tag = os.path.basename(os.path.normpath(args.source))
    MODEL_ID = f"nanochat-{model_tag}"
else:
    checkpoints_dir = os.path.join(get_base_dir(), SOURCE_DIRS.get(args.source, "?"))
    model_tag = args.model_tag or find_model_tag(checkpoints_dir)
    MODEL_ID = f"nanochat-{args.source}-{model_tag}"
workers = []
for gpu_id, device in enumerate(devices):
    model, tokenizer, _ = load_model(args.source, device, model_tag=model_tag, step=args.step)
    prepare_for_inference(model, args.dtype)
    workers.append(Worker(gpu_id, device, Engine(model, tokenizer)))
CREATED = int(time.time())
CONTEXT = model.config.sequence_len

async def generate(settings):
    """
    Async generator of (pieces, finish, prompt_tokens, completion_tokens, gpu_id): pieces are the
    reply's new text as [(part index, part type, text)] (engine.ReplyStream: text, python,
    python_output); finish is None until the end.
    """
    try:
        tokens = tokenizer.render_for_completion({"messages": settings["messages"]})
    except ValueError as e:  # roles out of the training format's order, e.g. two user turns
        raise APIError(str(e), "messages")
    if len(tokens) >= CONTEXT:
        raise APIError(f"the conversation is {len(tokens)} tokens but the model's context "
                       f"is {CONTEXT}: start a new conversation or shorten it", "messages")
    settings = dict(settings, max_tokens=min(settings["max_tokens"], CONTEXT - len(tokens)))
    worker = min(workers, key=lambda w: w.load)
    job = Job(tokens, settings)
    worker.load += 1
    worker.waiting.put(job)
    worker.wake.set()
    t0, count, finish, stream = time.time(), 0, None, ReplyStream(tokenizer)
    try:
        while finish is None:
            token, finish = await job.results.get()
            if token == "error":
                raise APIError(finish, status=500, kind="server_error")
            events = []
            if finish != "stop":  # the stop token ends the reply and is not part of it
                count += 1
                events = stream.push(token)
            if finish is not None:
                events += stream.flush()
            if events or finish is not None:
                pieces = [(i, stream.parts[i]["type"], text) for i, text in events]
                yield pieces, finish, len(tokens), count, worker.gpu_id
    finally:
        job.cancelled.set()  # a no-op for a finished row; frees the row of a client that went away
        worker.wake.set()
        worker.load -= 1
        print(f"[{worker.gpu_id}] {len(tokens)} prompt tokens -> {count} tokens, "
              f"{finish or 'cancelled'}, {time.time() - t0:.2f}s", flush=True)

# -----------------------------------------------------------------------------
# HTTP

app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None)

@app.exception_handler(APIError)
async def api_error_handler(request, e):
    return JSONResponse(e.body, e.status)

@app.exception_handler(Exception)
async def unexpected_error_handler(request, e):  # say what happened instead of a bare 500 page
    print(f"error on {request.url.path}: {type(e).__name__}: {e}", flush=True)
    error = APIError(f"internal error: {type(e).__name__}", kind="server_error")
    return JSONResponse(error.body, 500)

def check_key(request):
    header = request.headers.get("authorization", "")
    if args.api_key and not hmac.compare_digest(header.encode(), f"Bearer {args.api_key}".encode()):
        raise APIError("missing or wrong API key: send 'Authorization: Bearer <key>'", status=401,
                       kind="authentication_error")

def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

@app.get("/")
async def root():
    with open(UI_PATH, encoding="utf-8") as f:
        return HTMLResponse(f.read())

def available_workers():
    return sum(w.load < args.max_batch for w in workers)

@app.get("/health")
async def health():
    return {"status": "ok", "ready": all(w.is_alive() for w in workers), "num_gpus": len(workers),
            "available_workers": available_workers()}

@app.get("/stats")
async def stats(request: Request):
    check_key(request)
    return {"total_workers": len(workers), "available_workers": available_workers(),
            "busy_workers": sum(w.load > 0 for w in workers), "max_batch": args.max_batch,
            "workers": [{"gpu_id": w.gpu_id, "device": str(w.device), "requests": w.load}
                        for w in workers]}

@app.get("/v1/models")
async def models(request: Request):
    check_key(request)
    return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": CREATED,
                                        "owned_by": "nanochat", "context_length": CONTEXT}]}

async def start_chat(request, openai):
    """Check and parse a chat request, then run its generation to the first item, so that errors
    before any token (e.g. too long, a failed prefill) become a plain error response, not an error
    inside a stream. -> (settings, the generation's items)"""
    check_key(request)
    settings = parse_chat_request(await read_json(request), openai)
    gen = generate(settings)
    first = await gen.__anext__()
    async def rest():
        try:
            yield first
            async for item in gen:
                yield item
        finally:  # closed early (client gone): end the generation now, not at garbage collection
            await gen.aclose()
    return settings, rest()

@app.post("/chat/completions")
async def chat_completions(request: Request):
    _, items = await start_chat(request, openai=False)

    async def events():
        try:
            async for pieces, _, _, _, gpu_id in items:
                for part, kind, text in pieces:
                    yield sse({"token": text, "type": kind, "part": part, "gpu": gpu_id})
            yield sse({"done": True})
        except APIError as e:
            yield sse({"error": e.message})
        finally:
            await items.aclose()
    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

def text_of(pieces):
    """The OpenAI route's content: the reply's text parts only. A calculator call and its result are
    steps the model took, not text it said, and OpenAI's tool_calls would ask the client to run a
    tool that already ran."""
    return "".join(text for _, kind, text in pieces if kind == "text")

@app.post("/v1/chat/completions")
async def openai_chat_completions(request: Request):
    settings, items = await start_chat(request, openai=True)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": MODEL_ID}
    usage = lambda p, c: {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    if not settings["stream"]:
        parts = []
        async for pieces, finish, prompt_tokens, completion_tokens, _ in items:
            parts.append(text_of(pieces))
        message = {"role": "assistant", "content": "".join(parts)}
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        return {**head, "object": "chat.completion", "choices": [choice],
                "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(delta, finish=None):
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {**head, "object": "chat.completion.chunk", "choices": [choice]}

    async def events():
        yield sse(chunk({"role": "assistant", "content": ""}))
        try:
            async for pieces, finish, prompt_tokens, completion_tokens, _ in items:
                if text_of(pieces):
                    yield sse(chunk({"content": text_of(pieces)}))
            yield sse(chunk({}, finish))  # the last item carries the finish reason
            if settings["include_usage"]:
                tokens = usage(prompt_tokens, completion_tokens)
                yield sse(dict(chunk({}), choices=[], usage=tokens))
        except APIError as e:
            yield sse(e.body)
        finally:
            await items.aclose()
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

# -----------------------------------------------------------------------------
# Serve

if __name__ == "__main__":
    for worker in workers:
        worker.start()
    # Bind the socket here so that --port 0 can print the port it got before uvicorn takes over.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)  # connections made before uvicorn accepts wait in this backlog
    host, port = sock.getsockname()[:2]
    threads = f", {torch.get_num_threads()} CPU threads" if device_type == "cpu" else ""
    print(f"nanochat {MODEL_ID} on {len(workers)} worker(s) ({', '.join(map(str, devices))}), up "
          f"to {args.max_batch} requests decoded together per worker{threads}", flush=True)
    key_note = "  (API key required)" if args.api_key else ""
    print(f"serving http://{host}:{port}/{key_note}", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
    uvicorn.Server(config).run(sockets=[sock])
