"""
bench/gpu_check.sh as the GPU machine runs it (only `python3` on PATH, no rustbpe, wheels in a folder) on a machine
without CUDA: runs to completion, every row a "no CUDA device" skip, rows streamed to $OUT. The row runner (own
process, timeout that kills what the row started, torch.compile log findings) and the overall budget on fake rows;
the numeric checks at toy sizes on CPU (a broken attention path must FAIL them); the tiktoken-only tokenizer; and
the end-to-end base_train -> checkpoint -> base_eval row on CPU (without --fp8, which needs SM89+).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import bench.gpu_check as gc  # noqa: E402

ROWS = ["attention fa3", "attention flex compiled", "attention sdpa", "fp8 matmul vs fp32",
        "optimizer compiled vs fp32", "e2e base_train fp8 -> base_eval", "train d12 bf16", "train d12 fp8",
        "train d20 bf16", "infer_bench d20", "CORE examples/s d20"]

def fake_wheel(folder, name, version="0.1"):
    """A pure-Python wheel holding module `name` (`import name` prints nothing, defines WHO)."""
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}.py", f"WHO = {name!r}\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"{name}.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return path

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_check_sh_runs_as_on_the_gpu_machine(tmp_path):
    # PATH holds a `python3` and no `python` (the GPU image's layout); rustbpe cannot be imported
    bin_dir, block, wheels = tmp_path / "bin", tmp_path / "block", tmp_path / "wheels"
    for d in (bin_dir, block, wheels):
        d.mkdir()
    os.symlink(sys.executable, bin_dir / "python3")
    (block / "rustbpe.py").write_text("raise ImportError('no rustbpe on this machine')\n")
    fake_wheel(wheels, "gpucheck_probe")   # missing here: installed into a temp dir on PYTHONPATH
    fake_wheel(wheels, "numpy", "0.0.1")   # present here: the machine's own copy must win
    path = f"{bin_dir}:/usr/bin:/bin"
    assert shutil.which("python", path=path) is None, "this test needs a PATH without `python`"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "PYTHONPATH", "TORCH_LOGS")}
    env.update(PATH=path, PYTHONPATH=str(block), OUT=str(tmp_path / "out"), WHEELS=str(wheels))
    result = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_check.sh")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    installed = [line for line in lines if line.startswith("gpu_check: installed from")]
    assert len(installed) == 1 and "gpucheck_probe-0.1-py3-none-any.whl" in installed[0], lines[:3]
    assert "numpy" not in installed[0]
    target = installed[0].split(" into ")[1].split(":")[0]
    assert os.listdir(target) and os.path.exists(os.path.join(target, "gpucheck_probe.py"))
    assert not any(name.startswith("numpy") for name in os.listdir(target))
    for name in ROWS:  # each row printed its skip reason as it went
        assert any(line.split() == ["", *name.split(), "skip", "no", "CUDA", "device"][1:] for line in lines), name
    record = json.loads(lines[-1])
    assert [r["check"] for r in record["rows"]] == ROWS
    assert all(r["status"] == "skip" and r["detail"] == "no CUDA device" for r in record["rows"])
    assert "11 checks: 0 ok, 0 FAIL, 11 skipped" in result.stdout
    out = tmp_path / "out"
    assert [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()] == record["rows"]
    assert json.loads((out / "gpu_check.json").read_text()) == record
    assert "no CUDA device" in (out / "gpu_check.txt").read_text()

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_check_sh_goes_on_when_wheels_do_not_install(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "gpucheck_broken-0.1-py3-none-any.whl").write_bytes(b"not a zip file")
    env = dict(os.environ, OUT=str(tmp_path / "out"), WHEELS=str(wheels))
    result = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_check.sh"), "--skip-speed"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"gpu_check: could not install the wheels in {wheels} (pip's error above); going on" in result.stdout
    assert "5 checks: 0 ok, 0 FAIL, 5 skipped" in result.stdout

ROW_SCRIPT = """if True:
    import json, sys, torch
    @torch.compile(backend="eager", dynamic=False)
    def f(x):
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1
    f(torch.ones(3)); f(torch.ones(4))  # one graph break, one recompile on the new shape
    print("progress line")
    print(json.dumps({"status": "ok", "value": "42 things/s", "detail": "fake row", "things": 42}))
"""

def test_run_row_reads_json_compile_logs_and_failures(tmp_path):
    logs = tmp_path / "logs"
    row = gc.run_row("fake row", [sys.executable, "-c", ROW_SCRIPT], lambda out: out, timeout=120, log_dir=logs)
    assert (row["check"], row["status"], row["value"], row["things"]) == ("fake row", "ok", "42 things/s", 42)
    # the new shape recompiles f and the frame resumed after the break; the break is hit again in the recompile
    assert (row["recompiles"], row["graph_breaks"]) == (2, 2)
    assert "torch.compile: 2 recompiles, 2 graph breaks: Graph break in user code at <string>:6" in row["detail"]
    assert "Recompiling function f in <string>:3 | - 0/0: tensor 'x' size mismatch at index 0. expected 3, actual 4" \
        in row["detail"]
    assert "progress line" in (logs / "fake_row.txt").read_text()
    crash = gc.run_row("crash", [sys.executable, "-c", "raise SystemExit('CUDA error: out of memory')"],
                       lambda out: out, timeout=60)
    assert crash["status"] == "FAIL" and crash["detail"].startswith("exit 1: ")
    assert crash["detail"].endswith("CUDA error: out of memory")
    no_json = gc.run_row("no json", [sys.executable, "-c", "print('done')"], lambda out: out, timeout=60)
    assert no_json["status"] == "FAIL" and "no row JSON" in no_json["detail"]

def test_run_row_timeout_kills_what_the_row_started(tmp_path):
    pid_file = tmp_path / "pid"
    script = (f"import subprocess, time; p = subprocess.Popen(['sleep', '300']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(300)")
    t0 = time.time()
    row = gc.run_row("hang", [sys.executable, "-c", script], lambda out: out, timeout=3)
    assert time.time() - t0 < 30
    assert row["status"] == "FAIL" and row["detail"].startswith("timed out after 3s") and "started" in row["detail"]
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # killed with the row's process group (and reaped by init)
        try:
            with open(f"/proc/{grandchild}/stat") as f:
                if f.read().split(") ")[1][0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the row's child {grandchild} is still running")

def fake_cuda(monkeypatch, name, capability):
    """gpu_check sees a bf16 CUDA device of this name and compute capability, and a reachable hub."""
    monkeypatch.setattr(gc.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gc.torch.cuda, "get_device_name", lambda device: name)
    monkeypatch.setattr(gc.torch.cuda, "get_device_capability", lambda device: capability)
    monkeypatch.setattr(gc, "COMPUTE_DTYPE", torch.bfloat16)
    monkeypatch.setattr(gc, "hub_reachable", lambda: True)

def test_budget_streams_finished_rows_and_skips_the_rest(tmp_path, monkeypatch, capsys):
    # a fake CUDA machine whose every row takes >= 0.6 s: with the start cutoff 0.5 s into a 10 s budget,
    # the first row runs and every later one is skipped for the budget
    fake_cuda(monkeypatch, "fake GPU", (9, 0))
    monkeypatch.setattr(gc, "MIN_ROW_S", 9.5)
    row = "import json, time; time.sleep(0.6); print(json.dumps({'status': 'ok', 'value': 'fast', 'detail': ''}))"
    monkeypatch.setattr(gc, "row_plan", lambda name, args: ([sys.executable, "-c", row], lambda out: out))
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--budget=10"])
    with pytest.raises(SystemExit) as exit_info:
        gc.main()
    assert exit_info.value.code == 0
    streamed = [json.loads(line) for line in (tmp_path / "out" / "gpu_check.jsonl").read_text().splitlines()]
    assert [r["check"] for r in streamed] == ROWS
    assert streamed[0]["status"] == "ok" and streamed[0]["value"] == "fast" and streamed[0]["seconds"] >= 0.6
    assert all(r["status"] == "skip" and r["detail"] == "the overall budget (--budget=10s) is spent"
               for r in streamed[1:])
    assert "11 checks: 1 ok, 0 FAIL, 10 skipped" in capsys.readouterr().out

def test_speed_rows_read_the_benchmarks_json():
    # the GPU rows' parsers on what bench.train and infer_bench print today (tiny CPU runs of the same flags)
    train_cmd, parse = gc.row_plan("train d12 bf16", argparse.Namespace(train_steps=1))
    train_cmd = [a for a in train_cmd if not a.startswith(("--configs", "--device-type", "--compile", "--warmup"))]
    tiny = ["--configs=cpu", "--compile=0", "--warmup=1", "--device-batch-size=2"]
    row = gc.run_row("train d12 bf16", train_cmd + tiny, parse, timeout=300)
    assert row["status"] == "ok", row
    assert row["B"] == 2 and row["value"].endswith("tok/s, MFU -, peak 0.0 GiB") and row["tok_per_sec"] > 0
    infer_cmd, parse = gc.row_plan("infer_bench d20", None)
    infer_cmd = [a for a in infer_cmd if not a.startswith(("--depth", "--device-type", "--decode-tokens"))]
    tiny = ["--depth=2", "--head-dim=64", "--vocab-size=512", "--max-seq-len=256", "--decode-tokens=4"]
    row = gc.run_row("infer_bench d20", infer_cmd + tiny + ["--device-type=cpu"], parse, timeout=300)
    assert row["status"] == "ok", row
    assert [d["batch_size"] for d in row["decode"]] == [1, 32] and row["value"].startswith("TTFT ")

def test_words_tokenizer_needs_only_tiktoken(tmp_path):
    tok = gc.words_tokenizer(gc.CORE_WORDS)
    for word in gc.CORE_WORDS:  # each word is one token, with its leading space or without
        assert len(tok.encode(word)) == 1 and len(tok.encode(" " + word)) == 1, word
    text = "the dog ran, Zürich 42!"
    assert tok.decode(tok.encode(text)) == text
    tok.save(str(tmp_path / "tok"))  # ranks are contiguous: the on-disk form round-trips
    loaded = gc.Tokenizer.from_directory(str(tmp_path / "tok"))
    assert loaded.encode(text) == tok.encode(text) and loaded.get_bos_token_id() == tok.get_bos_token_id()

def test_e2e_row_on_cpu(monkeypatch):
    # as gpu_check runs it (`--row`, its own process): on CPU base_train refuses --fp8, and the row says why
    row = gc.run_row(gc.E2E_ROW, *gc.row_plan(gc.E2E_ROW, None), timeout=120)
    assert row["status"] == "FAIL" and row["detail"].startswith("scripts.base_train exit 1: ")
    assert "fp8 training needs a CUDA GPU of compute capability >= 8.9" in row["detail"]
    # without --fp8 (SM89+) the same train -> checkpoint -> reload path runs here, eager, in fp32
    monkeypatch.setattr(gc, "rows", [])
    monkeypatch.setenv("NANOCHAT_COMPILE", "0")
    gc.check_e2e(torch.device("cpu"), train_flags=())
    row = gc.rows[-1]
    assert row["status"] == "ok", row
    assert row["val_bpb"][-1] < row["val_bpb"][0] and row["reloaded_val_bpb"] == pytest.approx(row["val_bpb"][-1])

TINY_CASES = [  # name, B, Tq, Tk, H, Hkv, D, window
    ("causal", 1, 64, 64, 2, 2, 32, 63),
    ("window 16", 1, 64, 64, 2, 2, 32, 16),
    ("GQA 4/2", 1, 32, 32, 4, 2, 32, 31),
    ("chunk 8 of 64", 1, 8, 64, 2, 2, 32, 63),
]

def test_numeric_checks_pass_on_cpu_and_catch_a_broken_path(monkeypatch):
    import nanochat.attention as attention
    monkeypatch.setattr(gc, "rows", [])
    cpu = torch.device("cpu")
    gc.check_attention(cpu, ["sdpa"], cases=TINY_CASES)  # flex has no backward on CPU (torch 2.13)
    gc.check_fp8(cpu, M=128, K=128, N=256)
    assert [(r["check"], r["status"]) for r in gc.rows] == [
        ("attention sdpa", "ok"), ("fp8 matmul vs fp32", "ok")]
    assert 0 < gc.rows[0]["fwd_err"] < gc.ATTN_FWD_TOL  # bf16 rounding shows, far below the bar
    assert 0.01 < gc.rows[1]["fp8_err"]["fwd"] < gc.FP8_FWD_TOL  # e4m3 error is visibly larger than bf16's
    assert gc.rows[1]["bf16_err"]["fwd"] < gc.rows[1]["fp8_err"]["fwd"] / 5
    # a path that ignores the sliding window (full causal instead) must fail the window case
    full_causal = lambda q, k, v, window: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    monkeypatch.setitem(attention.ATTENTION_IMPLS, "sdpa", full_causal)
    gc.check_attention(cpu, ["sdpa"], cases=TINY_CASES[:2])
    assert gc.rows[-1]["status"] == "FAIL" and "window 16" in gc.rows[-1]["detail"]

def test_fp8_rows_skip_before_sm89(tmp_path, monkeypatch, capsys):
    fake_cuda(monkeypatch, "fake A100", (8, 0))
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--budget=0"])  # every other row: skipped for the budget
    with pytest.raises(SystemExit):
        gc.main()
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fp8 = {r["check"]: r["detail"] for r in record["rows"] if "fp8" in r["check"]}
    assert fp8 == {name: "fp8 needs SM89+, this GPU is SM80" for name in
                   ("fp8 matmul vs fp32", "e2e base_train fp8 -> base_eval", "train d12 fp8")}
    assert all("budget" in r["detail"] for r in record["rows"] if "fp8" not in r["check"])
