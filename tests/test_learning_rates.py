"""
The learning rate each optimizer group starts at, per stage and depth, written out by hand from the recipes and
compared with the optimizer each script actually builds (base_train, mid_train, chat_sft, chat_rl with their
default flags). sigma = (width / 768)^-0.5 on the AdamW groups: sqrt(12) at d2 (width 64), sqrt(3) at d4 (256),
1 at d12 (768).
  base: lm_head 0.008 sigma, wte 0.3 sigma, value_embeds 0.5 x 0.3 sigma, resid_lambdas 0.01 x 0.5, x0_lambdas 0.5,
        Muon 0.02, each x the batch factor sqrt(B / 2^19) (d4 at the CPU demo's B = 4,096: 1/sqrt(128); d12 at
        2^19: 1); smear/backout 0.2, not batch-scaled
  mid:  lm_head 0.004 sigma, wte 0.2 sigma, value_embeds 0.1 sigma, resid_lambdas 0.005, x0_lambdas 0.5, Muon 0.02,
        smear/backout 0.2; every group x --init-lr-frac 1.0
  SFT:  mid's x 0.02, every group (smear/backout 0.004, not 0.2)
  RL:   mid's x 0.05, every group
The scripts run in this process until their optimizer is built (base_train: setup_optimizer; chat_sft/chat_rl:
the warm start and lr settings done, at their next call), the chat stages on a model on the meta device.
"""

import runpy
import sys

import pytest
import torch

import nanochat.checkpoint
from nanochat.gpt import GPT, config_for_depth
from conftest import NumberedTask, by_group, make_pretraining_dir

# {stage: {group: lr}}, by hand from the formulas above; "muon" stands for every Muon group (one per matrix shape)
D4 = {
    "base": dict(lm_head=0.001224744871, wte=0.04592793268, value_embeds=0.02296396634, resid_lambdas=0.0004419417382,
                 x0_lambdas=0.04419417382, smear_backout=0.2, muon=0.001767766953),
    "mid": dict(lm_head=0.006928203230, wte=0.3464101615, value_embeds=0.1732050808, resid_lambdas=0.005,
                x0_lambdas=0.5, smear_backout=0.2, muon=0.02),
    "sft": dict(lm_head=0.0001385640646, wte=0.006928203230, value_embeds=0.003464101615, resid_lambdas=0.0001,
                x0_lambdas=0.01, smear_backout=0.004, muon=0.0004),
    "rl": dict(lm_head=0.0003464101615, wte=0.01732050808, value_embeds=0.008660254038, resid_lambdas=0.00025,
               x0_lambdas=0.025, smear_backout=0.01, muon=0.001),
}
D12 = {
    "base": dict(lm_head=0.008, wte=0.3, value_embeds=0.15, resid_lambdas=0.005, x0_lambdas=0.5, smear_backout=0.2,
                 muon=0.02),
    "mid": dict(lm_head=0.004, wte=0.2, value_embeds=0.1, resid_lambdas=0.005, x0_lambdas=0.5, smear_backout=0.2,
                muon=0.02),
    "sft": dict(lm_head=0.00008, wte=0.004, value_embeds=0.002, resid_lambdas=0.0001, x0_lambdas=0.01,
                smear_backout=0.004, muon=0.0004),
    "rl": dict(lm_head=0.0002, wte=0.01, value_embeds=0.005, resid_lambdas=0.00025, x0_lambdas=0.025,
               smear_backout=0.01, muon=0.001),
}
# the CPU demo's shapes at d4, the speedrun's at d12
SHAPES = {4: dict(head_dim=64, max_seq_len=256, device_batch_size=16, total_batch_size=4096),
          12: dict(head_dim=128, max_seq_len=2048, device_batch_size=32, total_batch_size=524288)}
TABLES = {4: D4, 12: D12}

def group_lrs(optimizer):
    lrs = by_group({g["name"]: g["initial_lr"] for g in optimizer.param_groups})
    assert by_group({g["name"]: g["lr"] for g in optimizer.param_groups}) == lrs  # the first step's, before schedules
    return lrs

class Built(Exception):
    """Stops a script once its optimizer is set up."""

def stop_after_optimizer(monkeypatch, module=None, next_call=None):
    """Record every optimizer GPT.setup_optimizer builds; stop the script at its next call of module.next_call, or
    right away without one. -> the list the optimizers go to."""
    built, setup = [], GPT.setup_optimizer

    def recording(self, *args, **kwargs):
        built.append(setup(self, *args, **kwargs))
        if next_call is None:
            raise Built()
        return built[-1]
    def stop(*args, **kwargs):
        raise Built()
    monkeypatch.setattr(GPT, "setup_optimizer", recording)
    if next_call is not None:
        monkeypatch.setattr(module, next_call, stop)
    return built

def meta_model_source(monkeypatch, module, depth, tokenizer):
    """load_model (which module's load_source calls) hands back a depth-`depth` model on the meta device with a
    source meta of SHAPES[depth]."""
    shape = SHAPES[depth]
    config = config_for_depth(depth, head_dim=shape["head_dim"], sequence_len=shape["max_seq_len"],
                              vocab_size=tokenizer.get_vocab_size(), window_pattern="L")
    with torch.device("meta"):
        model = GPT(config)
    meta = {"step": 1, "model_config": dict(config.__dict__), "user_config": {"depth": depth},
            **{k: v for k, v in shape.items() if k != "head_dim"}}
    monkeypatch.setattr(nanochat.checkpoint, "load_model", lambda *args, **kwargs: (model, tokenizer, meta))

@pytest.mark.parametrize("depth", [4, 12])
def test_base_train_lrs(depth, tmp_path, monkeypatch, tiny_tokenizer):
    make_pretraining_dir(tmp_path, tiny_tokenizer)
    shape = SHAPES[depth]
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_DATASET", "local")
    monkeypatch.setattr(sys, "argv", ["base_train", f"--depth={depth}", "--window-pattern=L", "--compile=0",
                                      "--num-iterations=1", *[f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]])
    built = stop_after_optimizer(monkeypatch)
    with pytest.raises(Built):
        runpy.run_module("scripts.base_train", run_name="__main__")
    assert group_lrs(built[0]) == pytest.approx(TABLES[depth]["base"], rel=1e-9)

# the batch each chat stage takes from the source's rows: mid 524,288 tokens whatever the source's batch (4,096 at d4),
# SFT one row per conversation of its 32, at most the source's device batch per micro-batch
BATCH = {("mid", 4): "batch 524,288 tokens = 16 x 256 x 1 GPUs x 128 |",
         ("mid", 12): "batch 524,288 tokens = 32 x 2048 x 1 GPUs x 8 |",
         ("sft", 4): "batch 8,192 tokens = 16 x 256 x 1 GPUs x 2 |",
         ("sft", 12): "batch 65,536 tokens = 32 x 2048 x 1 GPUs x 1 |"}

@pytest.mark.parametrize("depth", [4, 12])
@pytest.mark.parametrize("stage", ["mid", "sft"])
def test_chat_stage_lrs_and_batch(stage, depth, tmp_path, monkeypatch, tiny_tokenizer, capsys):
    import scripts.chat_sft as chat_sft
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setattr(chat_sft, "build_mixture", lambda stage, mixture: (NumberedTask(40), NumberedTask(8), []))
    meta_model_source(monkeypatch, chat_sft, depth, tiny_tokenizer)
    built = stop_after_optimizer(monkeypatch, chat_sft, "decide_compile")
    monkeypatch.setattr(sys, "argv", [stage, f"--model-tag=d{depth}", "--compile=0"])
    with pytest.raises(Built):
        chat_sft.main(stage)
    assert group_lrs(built[0]) == pytest.approx(TABLES[depth][stage], rel=1e-9)
    assert BATCH[stage, depth] in capsys.readouterr().out
    assert built[0].state_dict()["state"] == {}  # fresh momenta: a warm start fails here, the source saved no shard

@pytest.mark.parametrize("depth", [4, 12])
def test_chat_rl_lrs(depth, tmp_path, monkeypatch, tiny_tokenizer):
    import scripts.chat_rl as chat_rl
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    meta_model_source(monkeypatch, chat_rl, depth, tiny_tokenizer)
    built = stop_after_optimizer(monkeypatch, chat_rl, "init_wandb")
    monkeypatch.setattr(sys, "argv", ["chat_rl", f"--model-tag=d{depth}", "--task=synthetic-math"])
    with pytest.raises(Built):
        chat_rl.main()
    assert group_lrs(built[0]) == pytest.approx(TABLES[depth]["rl"], rel=1e-9)
