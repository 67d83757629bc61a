"""
Tests of the chat training loop shared by scripts/mid_train.py and scripts/chat_sft.py, on a tiny model (depth 2,
width 64, T 96), the tiny tokenizer and the embedded synthetic mixture (CPU):
- the step loss is the mean over the step's supervised tokens, also when a micro-batch has none (karpathy/nanochat's
  per-micro-batch mean gives NaN there), in the function the script uses and in a real run that meets such batches;
- an interrupted-then-resumed mid-training run is bit-identical to an uninterrupted one;
- 2 gloo ranks train the same model as 1 process with 2 accumulation steps;
- the base model's window pattern, sequence length and device batch flow into the mid and SFT checkpoints unless a
  flag overrides them; the learning rates are the stage recipe's (by hand: D2 in conftest.py), not the
  pretraining run's; SFT warm-starts from mid's momenta only with --load-optimizer=1;
- bad inputs (warm start without optimizer shards, resume with another configuration, ...) fail naming the fix.
The base checkpoint is written directly (one optimizer step on random tokens gives a real optimizer shard).
"""

import json
import math
import os
import re
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import GPTConfig
from nanochat.report import read_metric_log
from conftest import (D2, MID, MID_RUN_FLAGS, MID_RUN_STEPS, PRETRAIN_LRS, SFT, SOURCE_SETTINGS, TORCHRUN, by_group,
                      chat_model_config, checkpoint, copy_dirs, died_before, make_base_checkpoint_dir, run_script,
                      seeded_gpt)

def parse_log(stdout):
    """-> {step: debiased loss}, {step: supervised tokens}, {step: val bpb}, {step: chat metrics line}."""
    train = re.findall(r"^step (\d+) \(.*\| loss: (\S+) \|.*\| supervised tokens: ([\d,]+) \|", stdout, re.M)
    val = re.findall(r"^step (\d+) \| val bpb: (\S+)$", stdout, re.M)
    chat = re.findall(r"^step (\d+) \| (SynthIdentity: .*)$", stdout, re.M)
    return ({int(s): float(loss) for s, loss, _ in train}, {int(s): int(n.replace(",", "")) for s, _, n in train},
            {int(s): float(v) for s, v in val}, {int(s): line for s, line in chat})

# -----------------------------------------------------------------------------
# The loss normalization, in the functions the training loop calls

def test_step_loss_is_the_mean_over_supervised_tokens_even_with_an_empty_micro_batch(tiny_tokenizer):
    from scripts.chat_sft import count_supervised, token_weighted_loss
    model = seeded_gpt(GPTConfig(sequence_len=16, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                                 n_kv_head=2, n_embd=64, window_pattern="L"))
    V = model.config.vocab_size
    inputs = [torch.randint(0, V, (2, 16)) for _ in range(3)]
    targets = [torch.randint(0, V, (2, 16)) for _ in range(3)]
    targets[0][:, :11] = -1   # 10 supervised tokens
    targets[1][:] = -1        # none: a row of a cropped prompt, or user turns only
    targets[2][0, 1:] = -1    # 1 supervised token
    targets[2][1, :] = -1

    # karpathy/nanochat normalized each micro-batch by its own count: 0/0 = NaN poisons the whole step
    reference_micro_loss = F.cross_entropy(model(inputs[1]).view(-1, V), targets[1].view(-1), ignore_index=-1)
    assert torch.isnan(reference_micro_loss)

    num_supervised = count_supervised(targets)
    assert num_supervised.item() == 11
    step_loss = 0.0
    for x, y in zip(inputs, targets):
        loss = token_weighted_loss(model, x, y, num_supervised)
        assert torch.isfinite(loss), loss
        loss.backward()
        step_loss += loss.item()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())

    # the same as one batch holding all 11 supervised tokens, each weighing 1/11 (not 1/2 for the lone one)
    model.zero_grad(set_to_none=True)
    full = model(torch.cat(inputs), torch.cat(targets), loss_reduction="none")
    mean = full.sum() / 11
    mean.backward()
    assert math.isclose(step_loss, mean.item(), rel_tol=1e-6), (step_loss, mean.item())
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=f"gradient of {name} is not the token-weighted mean")

    # a step with no supervised token at all has zero gradients, and the optimizer step on them stays finite
    model.zero_grad(set_to_none=True)
    empty = [torch.full((2, 16), -1)]
    loss = token_weighted_loss(model, inputs[0], empty[0], count_supervised(empty))
    loss.backward()
    assert loss.item() == 0.0 and all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    model.setup_optimizer(weight_decay=0.0).step()
    assert all(torch.isfinite(p).all() for p in model.parameters())

# -----------------------------------------------------------------------------
# End-to-end runs of the scripts

def test_run_meets_micro_batches_without_supervised_tokens_and_stays_finite(mid_reference_run, tiny_tokenizer):
    """At T=96 a long multiple-choice prompt is cropped before its answer: such rows have no supervised token."""
    from nanochat.dataloader import chat_loader
    from scripts.chat_sft import build_mixture
    base, stdout = mid_reference_run
    train_task, _, _ = build_mixture("mid", "synthetic")
    loaders = [chat_loader(train_task, tiny_tokenizer, 1, 96, rank=a, world_size=2) for a in range(2)]
    per_micro_batch = [[int((next(loader)[1] >= 0).sum()) for loader in loaders] for _ in range(MID_RUN_STEPS)]
    assert any(0 in counts and sum(counts) > 0 for counts in per_micro_batch), per_micro_batch  # one empty of two

    train, supervised, val, _ = parse_log(stdout)
    assert supervised == {step + 1: sum(counts) for step, counts in enumerate(per_micro_batch)}
    assert sorted(train) == list(range(1, MID_RUN_STEPS + 1)) and all(math.isfinite(v) for v in train.values()), train
    assert sorted(val) == [0, 4, 8] and all(math.isfinite(v) for v in val.values()), val
    state, meta = checkpoint(base, MID, MID_RUN_STEPS)
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    assert math.isfinite(meta["loop_state"]["smooth_loss"])

def test_mid_checkpoint_carries_window_pattern_and_inherited_settings(mid_reference_run, tiny_tokenizer, monkeypatch):
    from nanochat.checkpoint import load_model
    base, stdout = mid_reference_run
    _, meta = checkpoint(base, MID, MID_RUN_STEPS)
    assert meta["model_config"] == dict(chat_model_config(tiny_tokenizer).__dict__)  # window_pattern "SL" included
    assert {k: meta[k] for k in SOURCE_SETTINGS} == SOURCE_SETTINGS
    assert meta["source"] == "base" and meta["source_step"] == 10 and meta["optim_shards"] == 1
    assert "T 96 | batch 192 tokens = 1 x 96 x 1 GPUs x 2 |" in stdout
    assert "matrix_lr 0.02 (mid recipe)" in stdout and "device_batch_size 1 (base checkpoint)" in stdout
    assert by_group(meta["initial_lrs"]) == pytest.approx(D2["mid"], rel=1e-9)  # not the pretraining lrs
    assert meta["pretrain_config"]["matrix_lr"] == PRETRAIN_LRS["matrix_lr"]  # kept for SFT to inherit in turn
    # the warmdown (last 20%) follows --num-iterations, not the epoch this short run never finishes
    lrms = {int(s): float(m) for s, m in re.findall(r"^step (\d+) \(.*\| lrm: (\S+) \|", stdout, re.M)}
    # step 8 trains at progress 7/8
    assert lrms == {**{s: 1.0 for s in range(1, MID_RUN_STEPS)}, MID_RUN_STEPS: 0.625}, lrms
    # chat metrics at every --chat-eval-every and at the end, also saved
    _, _, _, chat = parse_log(stdout)
    assert sorted(chat) == [4, 8]
    assert sorted(meta["metrics"]) == ["ChatCORE-synthetic", "SynthIdentity", "SynthMC", "SynthMath", "SynthSpelling"]
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    model, _, _ = load_model("mid", "cpu", model_tag="d2")  # what chat_eval / chat_cli / SFT rebuild
    assert model.config.window_pattern == "SL"

def test_resume_is_bit_identical(mid_reference_run, tmp_path):
    base, stdout = mid_reference_run
    resumed = died_before(base, tmp_path / "resumed", MID, MID_RUN_STEPS)  # resumes from step 4
    resumed_stdout = run_script([sys.executable, "-m", "scripts.mid_train", *MID_RUN_FLAGS, "--resume"], resumed)
    assert f"resuming from {resumed / MID} step 4" in resumed_stdout
    train, supervised, val, chat = parse_log(stdout)
    train_r, supervised_r, val_r, chat_r = parse_log(resumed_stdout)
    assert sorted(train_r) == [5, 6, 7, 8]
    assert {s: train[s] for s in train_r} == train_r and {s: supervised[s] for s in supervised_r} == supervised_r
    assert val_r[8] == val[8] and chat_r[8] == chat[8]
    reference, reference_meta = checkpoint(base, MID, MID_RUN_STEPS)
    result, result_meta = checkpoint(resumed, MID, MID_RUN_STEPS)
    assert all(torch.equal(reference[k], result[k]) for k in reference), "resumed weights differ from uninterrupted"
    for key in ("dataloader_state_dict", "val_bpb", "metrics"):
        assert result_meta[key] == reference_meta[key], key
    for key in ("progress", "min_val_bpb", "smooth_loss"):  # total_time is wall clock
        assert result_meta["loop_state"][key] == reference_meta["loop_state"][key], key
    # metric log <base>/logs/mid_d2.jsonl: steps 4+ logged again, each step once, the same numbers
    wall_clock = ("dt", "tok_per_sec", "mfu", "time")
    reference_log, resumed_log = (read_metric_log(b / "logs" / "mid_d2.jsonl") for b in (base, resumed))
    assert [r["step"] for r in resumed_log] == list(range(MID_RUN_STEPS + 1))
    assert [{k: v for k, v in r.items() if k not in wall_clock} for r in resumed_log] == \
           [{k: v for k, v in r.items() if k not in wall_clock} for r in reference_log]
    assert [r["step"] for r in reference_log if "val_bpb" in r] == [0, 4, 8] and "SynthMath" in reference_log[8]

def test_two_ranks_equal_one_rank_with_accumulation(mid_reference_run, tmp_path):
    base, stdout = mid_reference_run
    ddp = copy_dirs(base, tmp_path / "ddp", "tokenizer", "base_checkpoints")
    ddp_stdout = run_script([*TORCHRUN, "-m", "scripts.mid_train", "--", *MID_RUN_FLAGS], ddp)
    assert "world size: 2" in ddp_stdout and "batch 192 tokens = 1 x 96 x 2 GPUs x 1 |" in ddp_stdout
    train, supervised, val, chat = parse_log(stdout)
    train_d, supervised_d, val_d, chat_d = parse_log(ddp_stdout)
    assert supervised_d == supervised  # same data: one stream per (rank, micro-step)
    assert train_d.keys() == train.keys() and all(abs(train_d[s] - train[s]) < 1e-5 for s in train), (train, train_d)
    assert val_d.keys() == val.keys() and all(abs(val_d[s] - val[s]) < 1e-5 for s in val), (val, val_d)
    assert chat_d == chat
    reference, _ = checkpoint(base, MID, MID_RUN_STEPS)
    result, meta = checkpoint(ddp, MID, MID_RUN_STEPS)
    for k in reference:
        torch.testing.assert_close(result[k], reference[k], atol=1e-5, rtol=1e-4, msg=k)
    assert meta["world_size"] == 2 and meta["optim_shards"] == 2 and len(meta["dataloader_state_dict"]["streams"]) == 2

def test_sft_from_mid_inherits_unless_overridden(mid_reference_run, tiny_tokenizer):
    """Flags override what they name, nothing else. 32 conversations per step, one per row: 16 micro-batches of 2."""
    base, _ = mid_reference_run
    stdout = run_script([sys.executable, "-m", "scripts.chat_sft", "--mixture=synthetic", "--num-iterations=2",
                         "--device-batch-size=2", "--matrix-lr=0.05", "--eval-every=2", "--eval-tokens=192",
                         "--chat-eval-every=0"], base)
    assert ("Chat SFT: mid d2 step 8 -> chatsft_checkpoints | T 96 | batch 3,072 tokens = 2 x 96 x 1 GPUs x 16 |"
            in stdout)
    assert "matrix_lr 0.05 (flag) | init_lr_frac 0.02 (sft recipe)" in stdout and "device_batch_size 2 (flag)" in stdout
    train, _, val, _ = parse_log(stdout)
    assert sorted(train) == [1, 2] and all(math.isfinite(v) for v in [*train.values(), *val.values()])
    _, meta = checkpoint(base, SFT, 2)
    assert meta["model_config"]["window_pattern"] == "SL"
    assert meta["model_config"] == dict(chat_model_config(tiny_tokenizer).__dict__)
    assert meta["source"] == "mid" and meta["source_step"] == MID_RUN_STEPS
    assert (meta["max_seq_len"], meta["device_batch_size"], meta["total_batch_size"]) == (96, 2, 3072)
    assert by_group(meta["initial_lrs"]) == pytest.approx({**D2["sft"], "muon": 0.001}, rel=1e-9)  # 0.05 x 0.02
    assert meta["pretrain_config"] == {**PRETRAIN_LRS, "depth": 2}  # the base run's flags, carried through mid

def test_sft_first_step_runs_on_the_mid_momenta_with_fresh_lrs(mid_reference_run, tiny_tokenizer, monkeypatch,
                                                               tmp_path):
    """--load-optimizer=1: SFT's first optimizer step sees the mid shard's moments and step counts, group by group,
    with SFT's own learning rates (mid's were 50x larger) and no Muon weight decay."""
    import copy
    from nanochat.checkpoint import load_optimizer_shard
    from nanochat.optim import MuonAdamW
    base, _ = mid_reference_run
    shutil.copytree(base, tmp_path / "base")
    saved = load_optimizer_shard(os.path.join(base, MID), MID_RUN_STEPS, "cpu")

    class FirstStep(Exception):
        pass

    def capture_first_step(self):  # the state the first step would update, then stop the run
        raise FirstStep(copy.deepcopy(self.state_dict()))
    monkeypatch.setattr(MuonAdamW, "step", capture_first_step)
    with pytest.raises(FirstStep) as stopped:
        run_in_process(monkeypatch, tmp_path / "base", "sft", "--mixture=synthetic", "--num-iterations=2",
                       "--device-batch-size=2", "--eval-every=-1", "--chat-eval-every=0", "--overwrite",
                       "--load-optimizer=1")
    seen = stopped.value.args[0]
    assert seen["state"].keys() == saved["state"].keys() and len(saved["state"]) > 0
    for idx, buffers in saved["state"].items():
        assert seen["state"][idx].keys() == buffers.keys(), idx
        for k, v in buffers.items():
            torch.testing.assert_close(seen["state"][idx][k], v, rtol=0, atol=0, msg=f"state {idx} {k}")
    assert [g["name"] for g in seen["param_groups"]] == [g["name"] for g in saved["param_groups"]]
    assert [g["params"] for g in seen["param_groups"]] == [g["params"] for g in saved["param_groups"]]
    for key in ("initial_lr", "lr"):  # lr: step 0 of a linear decay over all steps
        assert by_group({g["name"]: g[key] for g in seen["param_groups"]}) == pytest.approx(D2["sft"], rel=1e-9)
    assert by_group({g["name"]: g["initial_lr"] for g in saved["param_groups"]}) == pytest.approx(D2["mid"], rel=1e-9)
    for g, s in zip(seen["param_groups"], saved["param_groups"]):
        if g["kind"] == "muon":
            assert (g["weight_decay"], g["momentum"]) == (0.0, 0.95), g["name"]
        else:
            assert (g["betas"], g["eps"], g["weight_decay"]) == (s["betas"], s["eps"], s["weight_decay"]), g["name"]

# -----------------------------------------------------------------------------
# Start-up errors (in-process: they fail before any training)

def run_in_process(monkeypatch, base, stage, *flags):
    from scripts.chat_sft import main
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setattr(sys, "argv", [stage, *flags])
    main(stage)

def test_warm_start_without_optimizer_shards_names_the_flag(monkeypatch, tmp_path, tiny_tokenizer):
    make_base_checkpoint_dir(tmp_path, tiny_tokenizer, with_optimizer=False)
    with pytest.raises(ValueError, match=r"--load-optimizer=1 needs the source's optimizer state, but .* saved none: "
                                         r"pass --load-optimizer=0"):
        run_in_process(monkeypatch, tmp_path, "mid", "--mixture=synthetic", "--load-optimizer=1",
                       "--total-batch-size=192")

@pytest.mark.parametrize("flag, named", [("--total-batch-size=96", "total_batch_size: checkpoint 192 vs now 96"),
                                         ("--max-seq-len=64", "max_seq_len: checkpoint 96 vs now 64"),
                                         ("--num-iterations=9", "num_iterations: checkpoint 8 vs now 9")])
def test_resume_with_a_different_config_fails(monkeypatch, mid_reference_run, flag, named):
    base, _ = mid_reference_run
    flags = [f for f in MID_RUN_FLAGS if not f.startswith(flag.split("=")[0])] + [flag, "--resume"]
    with pytest.raises(ValueError, match=f"cannot resume .* different configuration: .*{named}.*--model-tag"):
        run_in_process(monkeypatch, base, "mid", *flags)

@pytest.mark.parametrize("flag, message", [
    ("--max-seq-len=128", r"--max-seq-len=128 exceeds the model's context 96"),
    ("--total-batch-size=100",
     r"not divisible by device_batch_size x seq_len x GPUs = 1 x 96 x 1 = 96.*--total-batch-size"),
])
def test_bad_flags_fail_naming_the_fix(monkeypatch, mid_reference_run, flag, message):
    base, _ = mid_reference_run
    with pytest.raises(ValueError, match=message):
        run_in_process(monkeypatch, base, "mid", "--mixture=synthetic", flag, "--model-tag=d2")

def test_unpacked_step_larger_than_its_rows_names_the_fix(monkeypatch, mid_reference_run):
    """32 conversations, one per row, over 2 streams of 1 row (192 tokens = 2 x 96) would train 2 a step."""
    base, _ = mid_reference_run
    with pytest.raises(ValueError, match=r"--examples-per-step=32, one conversation per row, needs 16 rows per "
                                         r"micro-batch, which has 1: raise --total-batch-size to 3072 or pass --pack=1"):
        run_in_process(monkeypatch, base, "mid", "--mixture=synthetic", "--model-tag=d2", "--examples-per-step=32",
                       "--pack=0", "--total-batch-size=192")

def test_run_without_val_eval_writes_strict_json_and_resumes(tmp_path, tiny_tokenizer):
    """--eval-every=-1 leaves min val bpb at infinity: the meta stores null (strict JSON) and resume reads it back."""
    base = tmp_path / "noeval"
    base.mkdir()
    make_base_checkpoint_dir(base, tiny_tokenizer)
    flags = ["--mixture=synthetic", "--num-iterations=2", "--save-every=1", "--eval-every=-1", "--chat-eval-every=0",
             "--total-batch-size=192"]
    run_script([sys.executable, "-m", "scripts.mid_train", *flags], base)
    def strict_meta(step):
        with open(base / MID / f"meta_{step:06d}.json") as f:
            return json.loads(f.read(),
                              parse_constant=lambda c: pytest.fail(f"meta step {step} holds {c}: not strict JSON"))
    assert strict_meta(2)["loop_state"]["min_val_bpb"] is None and strict_meta(2)["val_bpb"] is None
    reference = torch.load(base / MID / "model_000002.pt", weights_only=True)
    base = died_before(base, tmp_path / "resumed", MID, 2)
    stdout = run_script([sys.executable, "-m", "scripts.mid_train", *flags, "--resume"], base)
    assert f"resuming from {base / MID} step 1" in stdout
    assert strict_meta(2)["loop_state"]["min_val_bpb"] is None
    result = torch.load(base / MID / "model_000002.pt", weights_only=True)
    assert all(torch.equal(reference[k], result[k]) for k in reference)
