"""
chat_web end to end: a tiny random model saved as an SFT checkpoint, served by the real script on 127.0.0.1 (a free
port, an API key), called with the official `openai` client and plain HTTP. Greedy replies are compared with what the
Engine generates for the same tokens. The model never emits a stop token (their lm_head rows are zero, so their logit
is 0 while the argmax over 300+ random logits is positive), so every reply runs to max_tokens and a long one lasts
seconds: long enough to disconnect in the middle of it.
"""

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch

from conftest import CALCULATOR_REPLY, calculator_chat_gpt
from nanochat.checkpoint import save_checkpoint
from nanochat.engine import Engine, ReplyStream, TextStream

openai = pytest.importorskip("openai", reason="pip install -e '.[test]' installs the openai client")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key"

def start_server(base_dir, *extra, omp_threads="1"):
    log_path = base_dir / f"server{len(list(base_dir.glob('server*.log')))}.log"
    log = open(log_path, "w")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(NANOCHAT_BASE_DIR=str(base_dir), **({"OMP_NUM_THREADS": omp_threads} if omp_threads else {}))
    # fp32 weights: replies are compared token for token with Engine greedy on the fp32 test model
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--device-type", "cpu", "-p", "0",
                             "--dtype", "float32", *extra],
                            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        text = log_path.read_text()
        if "serving http://" in text:
            url = text.split("serving ")[1].split()[0].rstrip("/")
            return proc, url, log_path
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"chat_web did not start:\n{log_path.read_text()[-3000:]}")

@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_tokenizer, random_chat_gpt):
    """(url, model, tokenizer, log path) of chat_web serving the tiny model with --api-key."""
    base_dir = tmp_path_factory.mktemp("chat_web_base")
    model = random_chat_gpt(tiny_tokenizer.get_vocab_size(), sequence_len=2048)
    with torch.no_grad():  # stop tokens pinned at logit 0: replies seldom end early
        for stop in ("<|assistant_end|>", "<|bos|>"):
            model.lm_head.weight[tiny_tokenizer.encode_special(stop)] = 0.0
    meta = {"model_config": dataclasses.asdict(model.config), "user_config": {}}
    save_checkpoint(str(base_dir / "chatsft_checkpoints" / "d1"), 5, model.state_dict(), None, meta)
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    proc, url, log_path = start_server(base_dir, "--api-key", KEY, "--max-batch", "4")
    yield url, model, tiny_tokenizer, log_path
    proc.terminate()
    proc.wait(timeout=30)

def auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}

def shown_text(tok, tokens, tools):
    """
    What a person gets of a reply: each run of tokens between special tokens decoded on its own, the specials
    dropped. Runs inside a calculator call (after <|python_start|> or <|output_start|>, up to the next special) are
    kept on the page's route (tools=True) and left out of the OpenAI route's content (tools=False).
    """
    specials = set(tok.special_ids.values())
    opens = {tok.encode_special("<|python_start|>"), tok.encode_special("<|output_start|>")}
    text, run, inside = "", [], False
    for t in tokens + [tok.get_bos_token_id()]:
        if t not in specials:
            run.append(t)
            continue
        text += tok.decode(run) if tools or not inside else ""
        run, inside = [], t in opens
    return text

def engine_greedy_text(model, tok, user_text, max_tokens, tools=False):
    prompt = [tok.get_bos_token_id(), tok.encode_special("<|user_start|>"), *tok.encode(user_text),
              tok.encode_special("<|user_end|>"), tok.encode_special("<|assistant_start|>")]
    seqs, _ = Engine(model, tok).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    return shown_text(tok, seqs[0][len(prompt):], tools), len(prompt)

# -----------------------------------------------------------------------------
# The OpenAI route

def test_openai_client_stream_and_non_stream_equal_engine_greedy(served):
    url, model, tok, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
    expected, prompt_len = engine_greedy_text(model, tok, "Hello there, café 🙂", 24)
    messages = [{"role": "user", "content": "Hello there, café 🙂"}]
    reply = client.chat.completions.create(model="nanochat", messages=messages, temperature=0, max_tokens=24)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_len, 24)
    stream = client.chat.completions.create(model="nanochat", messages=messages, temperature=0, stream=True,
                                            max_completion_tokens=24, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == expected
    assert all("\ufffd" not in p for p in pieces if p) or "\ufffd" in expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24
    # a system message is the start of the first user turn
    with_system = client.chat.completions.create(model="nanochat", temperature=0, max_tokens=8, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    merged = client.chat.completions.create(model="nanochat", temperature=0, max_tokens=8,
                                            messages=[{"role": "user", "content": "Be brief.\n\nHi"}])
    assert with_system.choices[0].message.content == merged.choices[0].message.content
    # a seed reproduces a sampled reply; another seed gives another (24 draws over 300+ tokens: equal by chance never)
    sampled = [client.chat.completions.create(model="nanochat", messages=messages, temperature=1, max_tokens=24, seed=s,
                                              extra_body={"top_k": 0}).choices[0].message.content for s in (5, 5, 6)]
    assert sampled[0] == sampled[1] != sampled[2]

def test_cpu_server_leaves_a_core_to_the_http_side(served):
    # Unless OMP_NUM_THREADS or --threads says otherwise: torch's default (every core) minus one, at least 1
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cores = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                               capture_output=True, text=True, check=True).stdout)
    base_dir = served[3].parent
    assert "per worker, 1 CPU threads" in served[3].read_text()  # OMP_NUM_THREADS=1
    for extra, expected in (((), max(1, cores - 1)), (("--threads", "3"), 3)):
        proc, url, log_path = start_server(base_dir, "--api-key", KEY, *extra, omp_threads=None)
        proc.terminate()
        proc.wait(timeout=30)
        assert f"per worker, {expected} CPU threads" in log_path.read_text()

def test_models_and_api_key(served):
    url, *_ = served
    listed = openai.OpenAI(base_url=url + "/v1", api_key=KEY).models.list()
    assert [m.id for m in listed.data] == ["nanochat-sft-d1"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong").models.list()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({}, auth("wrong"), {"Authorization": KEY}):
        for method, path, kw in (("post", "/v1/chat/completions", {"json": body}), ("post", "/chat/completions",
                                 {"json": body}), ("get", "/v1/models", {}), ("get", "/stats", {})):
            r = getattr(requests, method)(url + path, headers=headers, timeout=30, **kw)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
    assert requests.get(url + "/health", timeout=30).json()["status"] == "ok"
    page = requests.get(url + "/", timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()

USER = [{"role": "user", "content": "hi"}]

@pytest.mark.parametrize("route,body,param", [
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": USER * 501}, "messages"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 8001}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 8000}] * 5}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": USER + [{"role": "system", "content": "late"}]}, "messages[1].role"),
    ("/v1/chat/completions", {"messages": ["hi"]}, "messages[0]"),
    ("/v1/chat/completions", {"messages": USER, "temperature": 2.5}, "temperature"),
    ("/v1/chat/completions", {"messages": USER, "temperature": -0.1}, "temperature"),
    ("/v1/chat/completions", {"messages": USER, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"messages": USER, "top_k": 201}, "top_k"),
    ("/v1/chat/completions", {"messages": USER, "top_k": -1}, "top_k"),
    ("/v1/chat/completions", {"messages": USER, "top_k": 1.5}, "top_k"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 4097}, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": 4097}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": USER, "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": USER, "top_p": 0.9}, "top_p"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", {"messages": USER, "stop": ["\n"]}, "stop"),
    ("/v1/chat/completions", {"messages": USER, "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"messages": USER, "seed": "abc"}, "seed"),
    ("/v1/chat/completions", {"messages": USER, "frobnicate": 1}, "frobnicate"),
    ("/chat/completions", {"messages": [{"role": "system", "content": "hi"}]}, "messages[0].role"),
    ("/chat/completions", {"messages": USER, "temperature": 3}, "temperature"),
    ("/chat/completions", {"messages": USER, "top_k": 500}, "top_k"),
    ("/chat/completions", {"messages": USER, "max_tokens": 5000}, "max_tokens"),
    # the training chat format: user and assistant alternate and the user speaks last
    ("/chat/completions", {"messages": USER * 2}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}] + USER}, "messages"),
    ("/v1/chat/completions", {"messages": USER + [{"role": "assistant", "content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "hi"}]}, "messages"),
    # a reply's parts come back on the web route only, and only for the assistant
    ("/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
     "messages[0].content"),
    ("/chat/completions", {"messages": USER + [{"role": "assistant", "content": [{"type": "image", "text": "x"}]}]
                           + USER}, "messages[1].content"),
    ("/v1/chat/completions", {"messages": USER + [{"role": "assistant", "content": [{"type": "python", "text": "1"}]}]
                              + USER}, "messages[1].content"),
])
def test_validation_answers_400_naming_the_field(served, route, body, param):
    url, *_ = served
    r = requests.post(url + route, json=body, headers=auth(), timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text

def test_malformed_bodies_get_4xx_and_server_keeps_serving(served):
    url, *_ = served
    for data in (b"{not json", b"\xff\xfe\x00garbage", b"[" * 100_000, b"null", b'"a string"', b"[1, 2]",
                 json.dumps({"messages": USER, "temperature": float("nan")}).encode()):
        headers = dict(auth(), **{"Content-Type": "application/json"})
        r = requests.post(url + "/v1/chat/completions", data=data, headers=headers, timeout=30)
        assert r.status_code == 400, (data[:20], r.status_code, r.text)
        assert "error" in r.json()
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode()
    assert requests.post(url + "/v1/chat/completions", data=big, headers=auth(), timeout=30).status_code == 413
    # too long for the model's context (2048 tokens): a 400 naming messages, not a crash
    long = [{"role": role, "content": "word " * 1600} for role in ("user", "assistant", "user")]
    r = requests.post(url + "/v1/chat/completions", json={"messages": long}, headers=auth(), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert requests.get(url + "/health", timeout=30).json()["ready"] is True

# -----------------------------------------------------------------------------
# The UI's route, disconnects, batching

def sse_events(response):
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            yield json.loads(line[len("data: "):])

def web_reply(url, text, max_tokens):
    body = {"messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": max_tokens}
    with requests.post(url + "/chat/completions", headers=auth(), stream=True, timeout=60, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    assert events[-1] == {"done": True} and all(e["gpu"] == 0 for e in events[:-1])
    return "".join(e["token"] for e in events[:-1])

def test_web_route_streams_engine_greedy_and_concurrent_requests_batch(served):
    url, model, tok, log_path = served
    prompts = ["one", "a second, longer prompt", "third", "the fourth prompt here"]
    expected = [engine_greedy_text(model, tok, p, 40, tools=True)[0] for p in prompts]
    assert web_reply(url, prompts[0], 40) == expected[0]
    # four at once on one worker (--max-batch 4): decoded together, each still its own greedy reply
    results = [None] * 4
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, web_reply(url, prompts[i], 40)))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == expected

def test_disconnect_mid_stream_frees_the_worker(served):
    url, model, tok, log_path = served
    before = log_path.read_text().count("cancelled")
    body = {"messages": [{"role": "user", "content": "tell me everything"}], "temperature": 0, "max_tokens": 4000}
    with requests.post(url + "/chat/completions", headers=auth(), json=body, stream=True, timeout=60) as r:
        first = next(sse_events(r))
        assert "token" in first
    # the server notices the closed connection, drops the row (about 2,000 tokens early) and says so
    deadline = time.time() + 30
    while time.time() < deadline and log_path.read_text().count("cancelled") == before:
        time.sleep(0.1)
    assert log_path.read_text().count("cancelled") == before + 1, log_path.read_text()[-2000:]
    stats = requests.get(url + "/stats", headers=auth(), timeout=30).json()
    assert stats["busy_workers"] == 0 and stats["workers"][0]["requests"] == 0
    assert web_reply(url, "one", 5) == engine_greedy_text(model, tok, "one", 5, tools=True)[0]

def test_text_stream_emits_whole_characters(tiny_tokenizer):
    # token ids 0-255 are the single bytes, so each multi-byte character below spans 2-4 tokens
    text = "naïve 你好 🙂🚀 done"
    stream = TextStream(tiny_tokenizer)
    pieces = [stream.push(b) for b in text.encode()] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "🙂" in pieces and "你" in pieces  # released whole, at the byte that completes them

# -----------------------------------------------------------------------------
# Calculator calls: conftest's scripted model answers anything with
# "Computing:<|python_start|>12*30<|python_end|>" + the Engine's forced "<|output_start|>360<|output_end|>" + " Easy!"

def test_reply_stream_turns_tool_tokens_into_parts_that_render_back(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "What is 12*30?"}]})
    model = calculator_chat_gpt(tok)
    reply = Engine(model, tok).generate_batch(prompt, max_tokens=64, temperature=0)[0][0][len(prompt):]
    stream = ReplyStream(tok)
    events = [e for t in reply for e in stream.push(t)] + stream.flush()
    assert stream.parts == CALCULATOR_REPLY
    assert [i for i, text in events if text == ""] == [1, 2]  # each tool part announced before its first character
    assert ["".join(text for i, text in events if i == k) for k in range(4)] == [p["text"] for p in CALCULATOR_REPLY]
    # the parts are render_conversation's assistant content: rendered back they are the very tokens generated
    rendered, _ = tok.render_conversation({"messages": [{"role": "user", "content": "What is 12*30?"},
                                                        {"role": "assistant", "content": stream.parts}]})
    assert rendered == prompt + reply + [tok.encode_special("<|assistant_end|>")]
    # other special tokens never become text; a character split across tokens comes out whole
    stream = ReplyStream(tok)
    tokens = [*"é".encode(), tok.encode_special("<|user_start|>"), *"ü!".encode()]  # é and ü: 2 byte-tokens each
    events = [e for t in tokens for e in stream.push(t)] + stream.flush()
    assert events == [(0, "é"), (1, "ü"), (1, "!")]
    assert stream.parts == [{"type": "text", "text": "é"}, {"type": "text", "text": "ü!"}]

@pytest.fixture(scope="module")
def tool_served(tmp_path_factory, tiny_tokenizer):
    """(url, tokenizer) of chat_web serving the scripted calculator model (no API key)."""
    base_dir = tmp_path_factory.mktemp("chat_web_tool_base")
    model = calculator_chat_gpt(tiny_tokenizer)
    meta = {"model_config": dataclasses.asdict(model.config), "user_config": {}}
    save_checkpoint(str(base_dir / "chatsft_checkpoints" / "d1"), 5, model.state_dict(), None, meta)
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    proc, url, _ = start_server(base_dir)
    yield url, tiny_tokenizer
    proc.terminate()
    proc.wait(timeout=30)

def test_tool_call_on_both_routes(tool_served):
    url, tok = tool_served
    question = {"messages": [{"role": "user", "content": "What is 12*30?"}], "temperature": 0}
    # the page's route: every piece typed and numbered by part, no special token in any of them
    with requests.post(url + "/chat/completions", json=question, stream=True, timeout=60) as r:
        events = list(sse_events(r))
    assert events[-1] == {"done": True} and "<|" not in json.dumps(events)
    parts = {}
    for e in events[:-1]:
        parts.setdefault(e["part"], {"type": e["type"], "text": ""})["text"] += e["token"]
    assert [parts[i] for i in sorted(parts)] == CALCULATOR_REPLY
    # the reply sent back as its parts (what the page does) is rendered as the tool call it was: accepted, and the
    # model (which ignores the prompt) answers the same again
    history = {"messages": question["messages"] + [{"role": "assistant", "content": CALCULATOR_REPLY},
                                                   {"role": "user", "content": "and again?"}], "temperature": 0}
    with requests.post(url + "/chat/completions", json=history, stream=True, timeout=60) as r:
        assert r.status_code == 200, r.text
        assert "".join(e.get("token", "") for e in sse_events(r)) == "Computing:12*30360 Easy!"
    history["messages"][1]["content"] = []  # a reply that said nothing does not block the conversation
    with requests.post(url + "/chat/completions", json=history, stream=True, timeout=60) as r:
        assert r.status_code == 200, r.text
    # the OpenAI route: the reply's text only, streamed or not (OpenAI's tool_calls would ask the client to run it)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    reply = client.chat.completions.create(model="nanochat", **question)
    assert reply.choices[0].message.content == "Computing: Easy!" and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 26  # 9 text, 6 call, 5 forced result, 6 text
    chunks = client.chat.completions.create(model="nanochat", stream=True, **question)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Computing: Easy!"

# -----------------------------------------------------------------------------
# The page in a real browser (headless Debian Chromium through Selenium and the system chromedriver)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BROWSER_MISSING = not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER))

@pytest.fixture
def browser(tmp_path):
    if BROWSER_MISSING:
        pytest.skip("no browser: apt-get install -y chromium chromium-driver (runs/test.sh does this as root)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -e '.[test]' installs selenium")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1100,900",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()

def wait_for(driver, script, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {script}")

def test_browser_chat_regenerate_edit_and_untrusted_output(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    url, model, tok, _ = served
    d = browser
    d.get(url + "/")
    d.execute_script("sessionStorage.setItem('nanochat-api-key', arguments[0]);", KEY)
    # count requests, record how the reply grows (streaming shows many lengths), and catch any alert()
    d.execute_script("""
        window.posts = 0; window.lengths = new Set(); window.alerted = 0;
        window.alert = () => { window.alerted++; };
        const realFetch = window.fetch;
        window.fetch = (...a) => { if (String(a[0]).includes('completions')) window.posts++; return realFetch(...a); };
        new MutationObserver(() => { const r = document.querySelector('.message.assistant');
            if (r) window.lengths.add(r.textContent.length); })
            .observe(document.body, {subtree: true, childList: true, characterData: true});
    """)
    wait_for(d, "return document.getElementById('banner').className !== 'show' && document.readyState === 'complete'")
    box = d.find_element(By.ID, "input")
    box.send_keys("/temperature 0", Keys.ENTER)
    box.send_keys("/maxtokens 96", Keys.ENTER)
    box.send_keys("/topk 500", Keys.ENTER)
    notes = [n.text for n in d.find_elements(By.CSS_SELECTOR, ".message.note")]
    assert notes[:2] == ["temperature set to 0", "maxtokens set to 96"] and "from 1 to 200" in notes[2]
    idle = "return !state.busy && state.messages.length === 2 && state.messages[1].content.length > 0"

    # send: a streamed reply equal to the greedy reply for the same conversation
    box.send_keys("hello", Keys.ENTER)
    wait_for(d, idle)
    first = d.execute_script("return state.messages[1].content")
    assert first == engine_greedy_text(model, tok, "hello", 96)[0]
    assert d.execute_script("return window.lengths.size") > 5, "the reply appeared at once, not streamed"
    assert d.execute_script("return window.posts") == 1

    # click the reply: regenerated (a second request), same text at temperature 0
    d.execute_script("window.lengths.clear()")
    d.find_element(By.CSS_SELECTOR, ".message.assistant").click()
    wait_for(d, "return window.posts === 2 && " + idle[len("return "):])
    assert d.execute_script("return state.messages[1].content") == first
    assert d.execute_script("return window.lengths.size") > 5

    # click the user message: back in the box to edit; the conversation is cut there
    d.find_element(By.CSS_SELECTOR, ".message.user").click()
    assert box.get_attribute("value") == "hello"
    assert d.execute_script("return state.messages.length") == 0
    box.send_keys(" again", Keys.ENTER)
    wait_for(d, "return window.posts === 3 && " + idle[len("return "):])
    assert d.execute_script("return state.messages[0].content") == "hello again"
    assert d.execute_script("return state.messages[1].content") == engine_greedy_text(model, tok, "hello again", 96)[0]

    # a reply full of HTML is shown as text: the page serves the next reply from this stream instead of the model
    hostile = ["Look: <img src=x onerror=alert(1)> and <scr",
               "ipt>alert(2)</script>\n\n```html\n<script>alert(3)</script>\n",
               "```\n**bold** and `<b>code</b>`\n- <iframe src=javascript:alert(4)>"]
    d.execute_script("""
        const pieces = arguments[0], enc = new TextEncoder(), realFetch = window.fetch;
        window.fetch = (...a) => {
            if (!String(a[0]).includes('/chat/completions')) return realFetch(...a);
            const body = new ReadableStream({ start(c) {
                for (const p of pieces)
                    c.enqueue(enc.encode('data: ' + JSON.stringify({token: p, type: 'text', part: 0}) + '\\n\\n'));
                c.enqueue(enc.encode('data: {"done": true}\\n\\n')); c.close(); } });
            return Promise.resolve(new Response(body, {status: 200, headers: {'Content-Type': 'text/event-stream'}}));
        };""", hostile)
    box.send_keys("show me html", Keys.ENTER)
    wait_for(d, "return !state.busy && state.messages.length === 4")
    reply = d.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
    text = reply.get_attribute("textContent")
    for literal in ("<img src=x onerror=alert(1)>", "<script>alert(2)</script>", "<script>alert(3)</script>",
                    "<b>code</b>", "<iframe src=javascript:alert(4)>"):
        assert literal in text
    assert d.execute_script("return document.querySelectorAll('#messages :is(img, script, iframe, b)').length") == 0
    assert reply.find_element(By.CSS_SELECTOR, "pre code").get_attribute("textContent") == "<script>alert(3)</script>"
    assert reply.find_element(By.CSS_SELECTOR, "strong").text == "bold"
    time.sleep(0.5)  # give a broken image's onerror time to fire, were it an element
    assert d.execute_script("return window.alerted") == 0
    d.save_screenshot(str(tmp_path / "chat_web.png"))
    assert (tmp_path / "chat_web.png").stat().st_size > 10_000

def test_browser_shows_a_tool_call_as_a_block_as_it_streams(tool_served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    url, tok = tool_served
    d = browser
    d.get(url + "/")
    wait_for(d, "return document.readyState === 'complete'")
    box = d.find_element(By.ID, "input")
    box.send_keys("/temperature 0", Keys.ENTER)
    box.send_keys("What is 12*30?", Keys.ENTER)
    wait_for(d, "return !state.busy && state.messages.length === 2")
    reply = d.find_element(By.CSS_SELECTOR, ".message.assistant")
    blocks = reply.find_elements(By.CSS_SELECTOR, ".tool")
    assert [b.text for b in blocks] == ["CALCULATOR12*30 = 360"]  # the label is shown in capitals by CSS
    assert blocks[0].find_element(By.CSS_SELECTOR, "code").text == "12*30"
    assert reply.text.split("\n") == ["Computing:", "CALCULATOR12*30 = 360", "Easy!"]
    assert "<|" not in d.find_element(By.TAG_NAME, "body").get_attribute("textContent")
    assert d.execute_script("return state.messages[1].content") == "Computing: Easy!"
    d.save_screenshot("/tmp/chat_web_tool_call.png")
    assert os.path.getsize("/tmp/chat_web_tool_call.png") > 10_000

    # The next question: the reply goes back as its parts. The server's answer is replayed to the page one SSE
    # event every 40 ms, so that each step of the stream is drawn (a local server sends them all in one chunk).
    d.execute_script("""
        window.bodies = []; window.seen = [];
        const realFetch = window.fetch, enc = new TextEncoder(), sleep = (ms) => new Promise((r) => setTimeout(r, ms));
        window.fetch = async (...a) => {
            if (!String(a[0]).includes('/chat/completions')) return realFetch(...a);
            window.bodies.push(JSON.parse(a[1].body));
            const lines = (await (await realFetch(...a)).text()).split('\\n\\n').filter((l) => l);
            const body = new ReadableStream({ async start(c) {
                for (const l of lines) { await sleep(40); c.enqueue(enc.encode(l + '\\n\\n')); } c.close(); } });
            return new Response(body, {status: 200, headers: {'Content-Type': 'text/event-stream'}});
        };
        new MutationObserver(() => { const all = document.querySelectorAll('.message.assistant');
            if (all.length === 2) window.seen.push(all[1].innerText.replace(/\\n+/g, '\\n')); })
            .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    """)
    box.send_keys("and again?", Keys.ENTER)
    wait_for(d, "return !state.busy && state.messages.length === 4")
    sent = d.execute_script("return window.bodies[0].messages")
    assert sent[1] == {"role": "assistant", "content": CALCULATOR_REPLY}, sent
    seen = list(dict.fromkeys(d.execute_script("return window.seen")))  # each drawn state once, in order
    # drawn as it came: the block opens with its code before the result arrives, the text after it comes last
    assert "Computing:\nCALCULATOR12*30" in seen, seen
    assert "Computing:\nCALCULATOR12*30 = 360" in seen, seen
    assert seen[-1] == "Computing:\nCALCULATOR12*30 = 360\nEasy!", seen
    assert not any("<|" in s or "no result" in s for s in seen), seen

    # A call the calculator refuses (2^9): what the server streams for it (ReplyStream over the real Engine's reply)
    # is served to the page, which marks the call as having no result instead of waiting for one
    model = calculator_chat_gpt(tok, "2^9")
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "What is 2^9?"}]})
    stream = ReplyStream(tok)
    events = [e for t in Engine(model, tok).generate_batch(prompt, temperature=0)[0][0][len(prompt):]
              for e in stream.push(t)] + stream.flush()
    lines = [f"data: {json.dumps({'token': text, 'type': stream.parts[i]['type'], 'part': i})}\n\n"
             for i, text in events] + ['data: {"done": true}\n\n']
    d.execute_script("""
        const lines = arguments[0], enc = new TextEncoder();
        window.fetch = async () => new Response(new ReadableStream({ start(c) {
            for (const l of lines) c.enqueue(enc.encode(l)); c.close(); } }), {status: 200});""", lines)
    box.send_keys("What is 2^9?", Keys.ENTER)
    wait_for(d, "return !state.busy && state.messages.length === 6")
    reply = d.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
    assert reply.text.split("\n") == ["Computing:", "CALCULATOR2^9 (no result)", "Easy!"]
    d.save_screenshot("/tmp/chat_web_tool_call_refused.png")

    # a failed request: the question comes back into the box, so that sending it again keeps user and assistant
    # turns alternating (the server refuses two user messages in a row)
    d.execute_script("""window.fetch = async () => new Response(
        JSON.stringify({error: {message: 'scripted failure'}}), {status: 500});""")
    box.send_keys("one more", Keys.ENTER)
    wait_for(d, "return !state.busy && document.querySelector('.message.note.error')")
    assert d.execute_script("return state.messages.length") == 6
    assert box.get_attribute("value") == "one more"
    assert "scripted failure" in d.find_element(By.CSS_SELECTOR, ".message.note.error").text
