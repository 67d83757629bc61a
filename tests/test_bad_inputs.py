"""
Every bad input gets a clear error: one line naming the value and the fix, never a traceback from deep inside,
a silent reinterpretation (--num-iterations=0 meaning "derive"), or a wrong result reported as success.
One row per case; each row runs the real entry point (the script in-process, stopping at its argument checks, or
the library function the script calls) and checks the message.
"""

import argparse
import io
import runpy
import sys
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.checkpoint import save_checkpoint, load_checkpoint, find_last_step
from nanochat.dataloader import pretrain_loader
from nanochat.engine import use_calculator
from nanochat.gpt import GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_token_bytes
from scripts.chat_eval import validate_args
from conftest import seeded_gpt

def run_script(module, argv, monkeypatch, stdin=None):
    """Run `python -m module argv` in-process; -> (exit code or None, stdout + stderr)."""
    monkeypatch.setattr(sys, "argv", [module, *argv])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", stdin)
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    code = None
    try:
        runpy.run_module(module, run_name="__main__")
    except SystemExit as e:
        code = e.code
    finally:
        monkeypatch.setattr(sys, "stdout", sys.__stdout__)
        monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    text = out.getvalue() + err.getvalue()
    if isinstance(code, str):  # SystemExit("message") prints the message and exits 1
        text, code = text + code, 1
    return code, text

def save_chat_model(base, tokenizer, steps=(3, 5)):
    """A tiny SFT checkpoint d2 at each of steps (tokenizer saved alongside)."""
    tokenizer.save(str(base / "tokenizer"))
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                       n_embd=32, window_pattern="L")
    model = seeded_gpt(config)
    meta = {"model_config": dict(config.__dict__), "user_config": {}, "tokenizer_fingerprint": tokenizer.fingerprint()}
    for step in steps:
        save_checkpoint(str(base / "chatsft_checkpoints" / "d2"), step, model.state_dict(), None, meta)
    return base / "chatsft_checkpoints" / "d2"

def chat_eval_args(**changes):
    """chat_eval's defaults with some flags changed (validate_args is what its __main__ calls after parsing)."""
    defaults = dict(source="sft", task_name=None, temperature=0.0, max_new_tokens=512, num_samples=1, top_k=50,
                    batch_size=8, model_tag=None, step=None, max_problems=None, device_type="")
    return argparse.Namespace(**{**defaults, **changes})

# -----------------------------------------------------------------------------
# the rows: each returns the message the user sees, and the test checks it names the value and the fix

def base_train_row(flag, fix):
    def row(ctx):
        code, text = run_script("scripts.base_train", [flag], ctx.monkeypatch)
        assert code == 1, text
        return text
    return f"base_train {flag}", row, flag, fix

def chat_cli_nan_temperature(ctx):
    code, text = run_script("scripts.chat_cli", ["-t", "nan", "-p", "hi"], ctx.monkeypatch)  # refused before loading
    assert code == 1, text
    return text.strip().splitlines()[-1]

def chat_eval_flag(**changes):
    def row(ctx):
        with pytest.raises(SystemExit) as e:
            validate_args(chat_eval_args(**changes))
        return str(e.value.code)
    return row

def truncated_token_bytes(ctx):
    ctx.tokenizer.save(str(ctx.base / "tokenizer"))
    path = ctx.base / "tokenizer" / "token_bytes.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeError) as e:
        get_token_bytes()
    return str(e.value)

def corrupt_checkpoint_step(ctx):
    directory = save_chat_model(ctx.base, ctx.tokenizer)
    path = directory / "model_000003.pt"
    path.write_bytes(path.read_bytes()[:1000])
    code, text = run_script("scripts.chat_cli", ["-s", "3", "-p", "hi", "--device-type", "cpu"], ctx.monkeypatch)
    assert code == 1
    return text.strip().splitlines()[-1]

def meta_json_list(ctx):
    directory = save_chat_model(ctx.base, ctx.tokenizer)
    (directory / "meta_000005.json").write_text("[]")
    assert find_last_step(str(directory)) == 3  # the fallback to the previous step still works
    with pytest.raises(ValueError) as e:
        load_checkpoint(str(directory), 5, "cpu")
    return str(e.value)

def val_of_empty_strings(ctx):
    class Model:
        def __call__(self, x, y, loss_reduction="none"):
            return torch.ones(y.shape)
    bos = 9  # a special token: 0 bytes, as every target of a val set of empty documents is BOS
    token_bytes = torch.tensor([1] * 9 + [0])
    with pytest.raises(ValueError) as e:
        evaluate_bpb(Model(), iter([(torch.full((2, 4), bos), torch.full((2, 4), bos))] * 2), 2, token_bytes)
    return str(e.value)

def calculator_tuple(ctx):
    assert use_calculator("1,000 + 1") == 1001 and use_calculator("(1,2)") is None and use_calculator("1,2 + 3") is None
    return "use_calculator('(1,2)') -> None (refused), was 12"

def non_utf8_stdin(ctx):
    save_chat_model(ctx.base, ctx.tokenizer)
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9\nquit\n"), encoding="utf-8", errors="strict")
    code, text = run_script("scripts.chat_cli", ["--device-type=cpu", "-t0", "-m2"], ctx.monkeypatch, stdin=stdin)
    assert code is None, text  # the session goes on to the next line ("quit") and ends normally
    return next(line for line in text.splitlines() if "not valid" in line)

def empty_val_shard(ctx):
    data_dir = ctx.base / "base_data_local"
    data_dir.mkdir()
    pq.write_table(pa.table({"text": ["some training text"] * 20}), str(data_dir / "shard_00000.parquet"))
    pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), str(data_dir / "shard_00009.parquet"))
    with pytest.raises(ValueError) as e:
        next(pretrain_loader(ctx.tokenizer, 2, 16, "val", dataset="local"))
    return str(e.value)

def tok_train_doc_cap_zero(ctx):
    code, text = run_script("scripts.tok_train", ["--doc-cap=0"], ctx.monkeypatch)
    assert code == 1
    return text.strip().splitlines()[-1]

ROWS = [
    # (row, action, the value it must name, the fix it must name)
    base_train_row("--num-iterations=0", "or -1 to derive"),
    base_train_row("--total-batch-size=-5", "or -1 to derive"),
    base_train_row("--device-batch-size=0", ">= 1 rows"),
    base_train_row("--device-batch-size=-8", ">= 1 rows"),
    base_train_row("--aspect-ratio=0", ">= 1"),
    ("chat_cli -t nan", chat_cli_nan_temperature, "got nan", "finite number >= 0"),
    ("chat_eval -b 0", chat_eval_flag(batch_size=0), "-b/--batch-size=0", ">= 1"),
    ("chat_eval -m 0", chat_eval_flag(max_new_tokens=0), "-m/--max-new-tokens=0", ">= 1"),
    ("truncated token_bytes.pt", truncated_token_bytes, "token_bytes.pt is corrupt", "python -m scripts.tok_train"),
    ("chat_cli -s N of a corrupt checkpoint", corrupt_checkpoint_step, "model_000003.pt is corrupt",
     "delete step 3's files"),
    ("meta that is a JSON list", meta_json_list, "meta_000005.json holds a JSON list", "delete this step's files"),
    ("val shard of empty strings", val_of_empty_strings, "no text bytes", "re-download the val shard"),
    ("calculator (1,2)", calculator_tuple, "(1,2)", "refused"),
    ("non-UTF-8 stdin in chat_cli", non_utf8_stdin, "not valid utf-8 text", "set your terminal to UTF-8"),
    ("empty val shard", empty_val_shard, "shard_00009.parquet", "python -m nanochat.dataset --dataset local --force"),
    ("tok_train --doc-cap=0", tok_train_doc_cap_zero, "--doc-cap=0", "crop every document to nothing"),
]

@pytest.mark.parametrize("row, action, value, fix", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_gets_one_clear_line(row, action, value, fix, base_dir, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATASET", "local")
    message = action(SimpleNamespace(base=base_dir, tokenizer=tiny_tokenizer, monkeypatch=monkeypatch))
    assert "\n" not in message.strip(), f"{row}: more than one line: {message!r}"
    assert value in message and fix in message, f"{row}: {message!r} should name {value!r} and {fix!r}"
