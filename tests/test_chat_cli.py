"""
chat_cli end to end: a tiny random model saved as an SFT (and a base) checkpoint, the CLI run with a scripted
conversation on stdin, and its streamed replies compared with what the Engine generates for the same tokens at
temperature 0. The main conversation runs as a real subprocess; the other modes run the script in-process
(runpy) because a fresh torch import costs seconds on a busy 2-core machine.
"""

import dataclasses
import io
import os
import runpy
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from conftest import calculator_chat_gpt
from nanochat.checkpoint import save_checkpoint
from nanochat.engine import Engine

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_TOKENS = 12

@pytest.fixture
def checkpoints(base_dir, tiny_tokenizer, random_chat_gpt):
    """The same tiny model saved as sft/d1 and base/d1, plus the tokenizer, under the test's NANOCHAT_BASE_DIR."""
    model = random_chat_gpt(tiny_tokenizer.get_vocab_size(), sequence_len=128)
    meta = {"model_config": dataclasses.asdict(model.config), "user_config": {}}
    for source_dir in ("chatsft_checkpoints", "base_checkpoints"):
        save_checkpoint(str(base_dir / source_dir / "d1"), 5, model.state_dict(), None, meta)
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    return model

def run_cli(args, stdin=""):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "scripts.chat_cli", "--device-type=cpu", "-t", "0", "-m", str(MAX_TOKENS), *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=120)

def run_cli_in_process(args, monkeypatch, capsys):
    """-> (exit code, stdout, stderr) of the script run in this process with an empty stdin."""
    monkeypatch.setattr(sys, "argv", ["chat_cli", "--device-type", "cpu", "-t", "0", "-m", str(MAX_TOKENS), *args])
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code = 0
    try:
        runpy.run_module("scripts.chat_cli", run_name="__main__")
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err

def reply_tokens(engine, prompt):
    seqs, _ = engine.generate_batch(prompt, max_tokens=MAX_TOKENS, temperature=0.0)
    return seqs[0][len(prompt):]

def test_interactive_conversation(checkpoints, tiny_tokenizer):
    tok = tiny_tokenizer
    engine = Engine(checkpoints, tok)
    bos, assistant_end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    turn = lambda text: [tok.encode_special("<|user_start|>"), *tok.encode(text), tok.encode_special("<|user_end|>"),
                         tok.encode_special("<|assistant_start|>")]
    # Turn 1; 'clear' resets to BOS, so turn 2 starts afresh; turn 3 carries turn 2 with its <|assistant_end|>, the
    # reply as text encoded again (as chat_web's page sends it back; a sampled reply need not be the text's encoding)
    prompt1 = [bos] + turn("hello")
    reply1 = reply_tokens(engine, prompt1)
    prompt2 = [bos] + turn("hi again")
    reply2 = reply_tokens(engine, prompt2)
    assert not set(reply1 + reply2) & set(tok.special_ids.values()), "a special token in the reply: pick another seed"
    prompt3 = prompt2 + tok.encode(tok.decode(reply2)) + [assistant_end] + turn("and more")
    reply3 = reply_tokens(engine, prompt3)
    assert len(reply1) >= 3, f"the random model ends its reply after {len(reply1)} tokens: too short to test streaming"
    assert reply3 != reply_tokens(engine, [bos] + turn("and more")), "turn 3 ignores the history: pick another seed"

    result = run_cli(["-i", "sft"], stdin="hello\nclear\nhi again\nand more\nquit\n")
    assert result.returncode == 0, result.stderr
    replies = result.stdout.split("Assistant: ")[1:]
    assert len(replies) == 3, result.stdout
    for reply, tokens in zip(replies, [reply1, reply2, reply3]):
        assert reply.startswith(tok.decode(tokens) + "\n"), (reply, tok.decode(tokens))
    assert "(conversation cleared)" in result.stdout

def test_single_prompt_then_exit(checkpoints, tiny_tokenizer, monkeypatch, capsys):
    tok = tiny_tokenizer
    prompt = [tok.get_bos_token_id(), tok.encode_special("<|user_start|>"), *tok.encode("hello"),
              tok.encode_special("<|user_end|>"), tok.encode_special("<|assistant_start|>")]
    expected = tok.decode(reply_tokens(Engine(checkpoints, tok), prompt))
    code, out, err = run_cli_in_process(["-i", "sft", "-p", "hello"], monkeypatch, capsys)  # -p must not read stdin
    assert code == 0, err
    assert out.split("Assistant: ")[1] == expected + "\n"

def test_base_model_completion_mode(checkpoints, tiny_tokenizer, monkeypatch, capsys):
    tok = tiny_tokenizer
    prompt = [tok.get_bos_token_id(), *tok.encode("The quick brown")]
    expected = tok.decode(reply_tokens(Engine(checkpoints, tok), prompt))
    code, out, err = run_cli_in_process(["-i", "base", "-p", "The quick brown"], monkeypatch, capsys)
    assert code == 0, err
    assert "completion mode" in out
    assert out.endswith("\n" + expected + "\n"), out

def test_unknown_source_or_tag_is_a_clean_error(checkpoints, monkeypatch, capsys):
    # a clean exit(1) with the message on stderr, not an exception escaping with a traceback
    code, _, err = run_cli_in_process(["-i", "sft", "-g", "d99", "-p", "hello"], monkeypatch, capsys)
    assert code == 1 and "no model tag 'd99'" in err and "d1" in err, err
    code, _, err = run_cli_in_process(["-i", "rl", "-p", "hello"], monkeypatch, capsys)
    assert code == 1 and "no rl checkpoints" in err, err

def test_flag_the_engine_rejects_is_a_clean_error(checkpoints, monkeypatch, capsys):
    code, _, err = run_cli_in_process(["-i", "sft", "-k", "0", "-p", "hello"], monkeypatch, capsys)
    assert code == 1 and "top_k must be >= 1" in err and "Traceback" not in err, err
    # a -p with nothing to send (blank, or a loop command) is a usage error, not a silent exit 0
    for prompt in ["   ", "clear"]:
        code, _, err = run_cli_in_process(["-i", "sft", "-p", prompt], monkeypatch, capsys)
        assert code == 2 and "give a message to send" in err, err

def test_calculator_call_in_a_terminal(base_dir, tiny_tokenizer, tmp_path):
    # chat_cli in a real terminal (tmux): the question's answer uses the calculator, shown as a line of its own
    if shutil.which("tmux") is None:
        pytest.skip("no tmux: apt-get install -y tmux")
    model = calculator_chat_gpt(tiny_tokenizer)
    meta = {"model_config": dataclasses.asdict(model.config), "user_config": {}}
    save_checkpoint(str(base_dir / "chatsft_checkpoints" / "d1"), 5, model.state_dict(), None, meta)
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    tmux = ["tmux", "-S", str(tmp_path / "tmux.sock")]  # a server of this test's own
    command = (f"cd {shlex.quote(REPO_ROOT)} && NANOCHAT_BASE_DIR={shlex.quote(str(base_dir))} OMP_NUM_THREADS=1 "
               f"{shlex.quote(sys.executable)} -m scripts.chat_cli --device-type cpu -t 0; sleep 60")
    subprocess.run(tmux + ["new-session", "-d", "-x", "100", "-y", "30", command], check=True)
    screen = lambda: subprocess.run(tmux + ["capture-pane", "-p"], capture_output=True, text=True).stdout
    try:
        wait_until(lambda: "User:" in screen(), screen)  # the pane drops trailing spaces
        subprocess.run(tmux + ["send-keys", "What is 12*30?", "Enter"], check=True)
        wait_until(lambda: screen().count("User:") == 2, screen)
        lines = [line.rstrip() for line in screen().splitlines()]
    finally:
        subprocess.run(tmux + ["kill-server"])
    at = lines.index("User: What is 12*30?")
    assert lines[at + 2: at + 5] == ["Assistant: Computing:", "[calculator] 12*30 = 360", "Easy!"], lines
    assert "<|" not in "\n".join(lines)

def wait_until(condition, screen, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out; the terminal shows:\n{screen()}"
        time.sleep(0.2)

def test_refused_calculator_call_is_marked(base_dir, tiny_tokenizer, monkeypatch, capsys):
    model = calculator_chat_gpt(tiny_tokenizer, "2^9")  # ^ is no calculator operator: no result comes back
    meta = {"model_config": dataclasses.asdict(model.config), "user_config": {}}
    save_checkpoint(str(base_dir / "chatsft_checkpoints" / "d1"), 5, model.state_dict(), None, meta)
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    code, out, err = run_cli_in_process(["-i", "sft", "-m", "40", "-p", "What is 2^9?"], monkeypatch, capsys)
    assert code == 0, err
    assert out.split("Assistant: ")[1] == "Computing:\n[calculator] 2^9 (no result)\nEasy!\n", out
