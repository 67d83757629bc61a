"""
The torch.compile decision every training script takes (common.decide_compile), and the default path it picks on
a CPU with a C++ compiler: a compiled training step must train exactly like the eager one, and repeat bit for bit.
"""

import os
import subprocess
import sys

import pytest
import torch

from nanochat.common import decide_compile, compile_for_training
from nanochat.gpt import GPT, GPTConfig
from conftest import REPO

def test_flag_and_env(monkeypatch):
    monkeypatch.delenv("NANOCHAT_COMPILE", raising=False)
    assert decide_compile(0, "cpu") == (False, "off: --compile=0")
    assert decide_compile(-1, "cuda") == (True, "on: CUDA")
    assert decide_compile(1, "cuda") == (True, "on: --compile=1")
    use, reason = decide_compile(-1, "mps")
    assert not use and "--compile=1" in reason
    monkeypatch.setenv("NANOCHAT_COMPILE", "0")
    assert decide_compile(-1, "cuda") == (False, "off: NANOCHAT_COMPILE=0")
    assert decide_compile(1, "cuda") == (True, "on: --compile=1")  # an explicit flag beats the env var
    monkeypatch.setenv("NANOCHAT_COMPILE", "yes")
    with pytest.raises(ValueError, match="NANOCHAT_COMPILE='yes'"):
        decide_compile(-1, "cpu")
    with pytest.raises(ValueError, match="--compile=2"):
        decide_compile(2, "cpu")

def test_cpu_without_a_working_compiler(monkeypatch):
    monkeypatch.delenv("NANOCHAT_COMPILE", raising=False)
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    use, reason = decide_compile(-1, "cpu")
    assert not use and "no C++ compiler '/nonexistent/g++'" in reason and "--compile=0" in reason
    monkeypatch.setenv("CXX", "false")  # found, but builds nothing (exit status 1)
    use, reason = decide_compile(-1, "cpu")
    assert not use and "cannot build an OpenMP library" in reason and "\n" not in reason
    with pytest.raises(RuntimeError, match="pass --compile=0"):
        decide_compile(1, "cpu")
    assert decide_compile(-1, "cuda") == (True, "on: CUDA")  # CUDA kernels do not go through CXX

def test_default_cpu_path_compiles_and_trains_like_eager(monkeypatch):
    """
    What base_train/chat_sft do by default on this machine: decide (no flag, no env var), then compile_for_training
    (on CPU: the loss head in chunks of rows, every activation saved for backward). A training step through the
    compiled model gives the eager loss and gradients (fused kernels reorder float sums: differences seen ~1e-7;
    compared before any optimizer step, since Adam's g/sqrt(v) turns noise in near-zero gradients into full-size
    updates).
    """
    monkeypatch.delenv("NANOCHAT_COMPILE", raising=False)
    use, reason = decide_compile(-1, "cpu")
    assert use, f"the default CPU path should compile here but: {reason}"
    torch._dynamo.reset()
    config = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():  # init leaves the projections at zero: perturb them so every gradient path is non-trivial
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p.dtype))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)
    y[0, :3] = -1  # ignored targets go through the compiled loss too
    results = []
    for train_model in (model, compile_for_training(model)):
        loss = train_model(x, y)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert compiled_loss == pytest.approx(eager_loss, abs=1e-5)
    for name, grad in eager_grads.items():
        assert grad.abs().max() > 0, f"{name} has no gradient: the comparison would prove nothing"
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)

def test_compiled_cpu_training_is_bit_reproducible(monkeypatch):
    """
    compute_init("cpu") makes compiled training repeat bit for bit. Without it inductor's CPU embedding backward adds
    rows with atomics across threads, in an order that varies: of ten compiled backward passes over an embedding
    whose rows are hit many times (8 token ids, 2 threads), 5-9 differed from the first (measured), and the demo's
    base_train run twice parted at step ~24. With it: one gradient, bit for bit.
    """
    monkeypatch.delenv("NANOCHAT_COMPILE", raising=False)
    use, reason = decide_compile(-1, "cpu")
    assert use, f"the default CPU path should compile here but: {reason}"
    script = """
import torch
from nanochat.common import compute_init
compute_init("cpu")
emb = torch.nn.Embedding(8192, 256)
step = torch.compile(lambda idx, up: (emb(idx) * up).sum(), dynamic=False)
g = torch.Generator().manual_seed(0)
idx, up = torch.randint(0, 8, (16, 256), generator=g), torch.randn(16, 256, 256, generator=g)
grads = []
for _ in range(10):
    emb.weight.grad = None
    step(idx, up).backward()
    grads.append(emb.weight.grad.clone())
print(sum(not torch.equal(grads[0], grad) for grad in grads[1:]), "of 9 repeats differ")
"""
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=REPO)  # one thread cannot race
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "0 of 9 repeats differ", out.stdout
