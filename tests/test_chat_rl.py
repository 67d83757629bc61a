"""
Tests of scripts/chat_rl.py on a tiny model (depth 3, width 64, context 64) and the tiny tokenizer, on CPU:
- the advantages and the loss of a hand-worked step (3 questions x 4 samples, known rewards and token counts);
- the training masks of hand-laid completions (prompt, forced calculator output and padding are not trained);
- a question whose samples all score the same contributes exactly zero gradient;
- the training loop learns: reward 1 for a fixed token ('!') in the reply rises from ~0 to ~1;
- an interrupted-then-resumed run is bit-identical (weights, sampled completions, rewards, pass@k);
- 2 gloo ranks equal 1 process on the same questions.
The tests replace the task (rl_tasks) with one a random tiny model can score on; everything else is the script's.
"""

import math
import os
import re
import sys

import pytest
import torch

from nanochat.checkpoint import save_checkpoint
from nanochat.gpt import GPTConfig
from tasks.common import Task
import scripts.chat_rl as chat_rl
from conftest import REPO, TORCHRUN, copy_dirs, died_before, run_script, seeded_gpt

RL = os.path.join("chatrl_checkpoints", "d2")

class ContainsTask(Task):
    """'Question i': a reply passes (reward 1) when it contains `target` (a random tiny model does so by chance)."""
    eval_type = "generative"

    def __init__(self, target, size, **kwargs):
        super().__init__(**kwargs)
        self.target, self.size = target, size

    def num_examples(self):
        return self.size

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"Question {index}"},
                             {"role": "assistant", "content": self.target}]}

    def evaluate(self, conversation, assistant_response):
        return self.target in assistant_response

def contains_tasks(target):
    return ContainsTask(target, size=64), ContainsTask(target, size=8, start=0)

def model_config(tokenizer):
    # 3 layers: with 2 the backout residual is the last layer's output, which the final norm makes backout_lambda's
    # gradient exactly 0 in theory, and Adam turns its rounding noise into full-size steps that differ between runs
    return GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=3, n_head=2, n_kv_head=2,
                     n_embd=64, window_pattern="L")

def make_sft_dir(path, tokenizer):
    """Tokenizer plus an 'sft' checkpoint d2 step 5: random init and one optimizer step on random tokens."""
    tokenizer.save(str(path / "tokenizer"))
    model = seeded_gpt(model_config(tokenizer))
    tokens = torch.randint(0, model.config.vocab_size, (2, 65))
    model(tokens[:, :-1], tokens[:, 1:].contiguous()).backward()
    model.setup_optimizer().step()
    meta = {"model_config": dict(model.config.__dict__), "user_config": {"depth": 2}}
    save_checkpoint(str(path / "chatsft_checkpoints" / "d2"), 5, model.state_dict(), None, meta)

def tiny_model(tokenizer):
    return seeded_gpt(model_config(tokenizer))

# -----------------------------------------------------------------------------
# The loss of a hand-worked step

def completion(num_trained, num_forced=0, token=40):
    """num_trained sampled tokens (mask 1), with num_forced forced calculator tokens (mask 0) after the first."""
    tokens = [token] * (num_trained + num_forced)
    mask = [1] + [0] * num_forced + [1] * (num_trained - 1)
    return tokens, mask

@pytest.mark.parametrize("device_batch_size, expected_over_ln_v", [(4, 1 / 8), (2, 1 / 20)])
def test_hand_worked_advantages_and_loss(tiny_tokenizer, device_batch_size, expected_over_ln_v):
    """
    With lm_head = 0 every logit is 0, so every trained token has logp = -ln V and the loss is ln V times
    sum_questions sum_passes sum_samples(advantage x trained tokens) / (trained tokens in pass x passes x questions).
    Rewards q1 [1,0,0,0], q2 [1,1,0,0], q3 [1,1,1,1] -> advantages [.75,-.25,-.25,-.25], [.5,.5,-.5,-.5], [0,0,0,0].
    Trained tokens q1 [4,1,2,1], q2 [2,3,1,2] (forced tokens in between do not count), q3 [3,3,3,3].
    One pass of 4:  q1 (3 - .25 - .5 - .25) / (8 x 1 x 3) = 1/12, q2 (1 + 1.5 - .5 - 1) / 24 = 1/24, q3 0 -> ln V / 8.
    Passes of 2:    q1 (3 - .25) / (5 x 2 x 3) + (-.5 - .25) / (3 x 6) = 1/20, q2 2.5/30 - 1.5/18 = 0 -> ln V / 20.
    """
    model = tiny_model(tiny_tokenizer)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    V = model.config.vocab_size
    prompt = tiny_tokenizer.render_for_completion({"messages": [{"role": "user", "content": "What is 2+2?"}]})
    rewards = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    completions = [[completion(4, 2), completion(1), completion(2, 3), completion(1)],
                   [completion(2), completion(3, 1), completion(1, 2), completion(2)],
                   [completion(3)] * 4]
    advantages = [chat_rl.group_advantages(r) for r in rewards]
    assert advantages[0].tolist() == [0.75, -0.25, -0.25, -0.25]
    assert advantages[1].tolist() == [0.5, 0.5, -0.5, -0.5]
    assert advantages[2].tolist() == [0.0] * 4
    groups = [(prompt, [c[i:i + device_batch_size] for i in range(0, 4, device_batch_size)], a)
              for c, a in zip(completions, advantages)]
    loss = chat_rl.policy_gradient_backward(model, groups, pad_id=tiny_tokenizer.encode_special("<|assistant_end|>"))
    assert math.isclose(loss, math.log(V) * expected_over_ln_v, rel_tol=1e-5), (loss, math.log(V) * expected_over_ln_v)
    assert model.lm_head.weight.grad.abs().sum() > 0  # it did train

def test_masks_hand_laid(tiny_tokenizer):
    """Rows prompt + completion padded with <|assistant_end|>; targets -1 at prompt, forced output and padding."""
    end = tiny_tokenizer.encode_special("<|assistant_end|>")
    out_start, out_end = (tiny_tokenizer.encode_special(f"<|output_{s}|>") for s in ("start", "end"))
    prompt = [1, 2, 3]
    completions = [([10, 11, out_start, 12, out_end, 13, end], [1, 1, 0, 0, 0, 1, 1]),  # a calculator result forced in
                   ([20, end], [1, 1]),                                              # short: padded
                   ([30, 31, 32], [1, 1, 1])]                                        # ran out of tokens: no stop token
    inputs, targets = chat_rl.make_batch(prompt, completions, pad_id=end)
    assert inputs.tolist() == [[1, 2, 3, 10, 11, out_start, 12, out_end, 13],
                               [1, 2, 3, 20, end, end, end, end, end],
                               [1, 2, 3, 30, 31, 32, end, end, end]]
    assert targets.tolist() == [[-1, -1, 10, 11, -1, -1, -1, 13, end],
                                [-1, -1, 20, end, -1, -1, -1, -1, -1],
                                [-1, -1, 30, 31, 32, -1, -1, -1, -1]]

class ScriptedEngine:
    """Engine.generate's interface replaying fixed token columns (mask 0 = forced calculator output)."""
    stop_tokens = {99, 98}

    def __init__(self, columns):
        self.columns = columns

    def generate(self, prompt, num_samples, seed, **sampling):
        for tokens, masks in self.columns:
            yield tokens[:num_samples], masks[:num_samples]

@pytest.mark.parametrize("train_stop_token", [0, 1])
def test_sampled_stop_token_is_trained_only_with_the_flag(train_stop_token):
    """Row 0 stops (99) after a forced token, row 1 stops at once (98), row 2 runs out of tokens; nothing after a
    row's stop token is kept. The stop token's mask is 0 (karpathy/nanochat) unless train_stop_token."""
    engine = ScriptedEngine([([10, 98, 30], [1, 1, 1]), ([11, 5, 31], [0, 1, 1]), ([99, 6, 32], [1, 1, 1])])
    passes = chat_rl.sample_completions(engine, [1], 3, 3, [0], train_stop_token=bool(train_stop_token),
                                        max_tokens=3)
    s = train_stop_token
    assert passes == [[([10, 11, 99], [1, 0, s]), ([98], [s]), ([30, 31, 32], [1, 1, 1])]]

def test_equal_rewards_give_zero_gradient(tiny_tokenizer):
    model = tiny_model(tiny_tokenizer)
    pad = tiny_tokenizer.encode_special("<|assistant_end|>")
    prompt = [tiny_tokenizer.get_bos_token_id(), 50, 51]
    samples = [completion(3, token=60), completion(5, token=61), completion(2, 1, token=62), completion(4, token=63)]
    for rewards in ([1, 1, 1, 1], [0, 0, 0, 0]):
        advantages = chat_rl.group_advantages(rewards)
        assert advantages.tolist() == [0.0] * 4
        # through the loss itself (the training loop skips such questions): every gradient is exactly zero
        inputs, targets = chat_rl.make_batch(prompt, samples, pad)
        model.zero_grad(set_to_none=True)
        chat_rl.pass_loss(model, inputs, targets, advantages, normalizer=1).backward()
        assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    # beside a question that does teach something, it changes nothing but the count of questions (the normalizer)
    mixed = (prompt, [samples], chat_rl.group_advantages([1, 0, 0, 1]))
    equal = (prompt, [samples], chat_rl.group_advantages([1, 1, 1, 1]))
    model.zero_grad(set_to_none=True)
    chat_rl.policy_gradient_backward(model, [mixed, equal], pad)
    both = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    chat_rl.policy_gradient_backward(model, [mixed], pad)
    for g, p in zip(both, model.parameters()):
        torch.testing.assert_close(g, p.grad / 2, rtol=0, atol=0)
    # a rank whose questions all score the same still hands the optimizer a (zero) gradient for every parameter
    model.zero_grad(set_to_none=True)
    chat_rl.policy_gradient_backward(model, [equal], pad)
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.parameters())

def test_synthetic_math_reward_is_the_answer_check():
    """--task=synthetic-math: reward 1.0 exactly when the completion's '#### N' is the reference answer."""
    train, test = chat_rl.rl_tasks("synthetic-math")
    conversation = test[0]
    answer = conversation["messages"][-1]["content"][-1]["text"].split("#### ")[1]
    assert train.reward(conversation, f"Let me compute: <|python_start|>x<|python_end|>\n\n#### {answer}") == 1.0
    assert train.reward(conversation, f"#### {int(answer) + 1}") == 0.0
    assert train.reward(conversation, answer) == 0.0  # no '#### ' marker: no answer
    assert len(train) == 8000 and len(test) == 200

# -----------------------------------------------------------------------------
# The training loop

def parse_log(stdout):
    """-> {step: (reward, loss, samples digest)}, {step: pass@k text}."""
    train = re.findall(r"^step (\d+)/\d+ \| reward: (\S+) \| loss: (\S+) \|.*\| samples (\w+)$", stdout, re.M)
    evals = re.findall(r"^step (\d+) \| (\d+ test problems \| .*)$", stdout, re.M)
    return ({int(s): (float(r), float(l), d) for s, r, l, d in train}, {int(s): text for s, text in evals})

def test_reward_for_a_fixed_token_rises_from_zero_to_one(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    """
    Reward 1 when the 4-token reply contains 'q' (a token such as 'q' or ' quick'). The untrained model does so in ~4%
    of its samples (measured: 5 of 128). The first step's 32 samples must score <= 0.1 and the last 4 steps' 128
    samples >= 0.9: a policy still at a success rate <= 0.1 scores >= 0.9 on 128 samples with probability < 1e-90
    (binomial tail), so this cannot pass by luck. Seeded, it passes the same way every time (measured: 0.03 at step 1,
    0.84 at step 6).
    """
    make_sft_dir(tmp_path, tiny_tokenizer)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setattr(chat_rl, "rl_tasks", lambda name: contains_tasks("q"))
    monkeypatch.setattr(sys, "argv", ["chat_rl", "--num-iterations=20", "--examples-per-step=4", "--num-samples=8",
                                      "--max-new-tokens=4", "--init-lr-frac=1.0", "--eval-every=-1",
                                      "--eval-examples=8", "--num-samples-eval=2", "--save-every=-1",
                                      "--train-stop-token=1"])
    sample, stop_flags = chat_rl.sample_completions, set()

    def spy(*args, **kwargs):
        stop_flags.add(args[5] if len(args) > 5 else kwargs.get("train_stop_token", False))
        return sample(*args, **kwargs)
    monkeypatch.setattr(chat_rl, "sample_completions", spy)
    chat_rl.main()
    assert stop_flags == {True, False}  # training samples get --train-stop-token=1; pass@k's ignore masks
    train, evals = parse_log(capsys.readouterr().out)
    rewards = [train[s][0] for s in sorted(train)]
    assert len(rewards) == 20
    assert rewards[0] <= 0.1 and sum(rewards[-4:]) / 4 >= 0.9, rewards
    pass_at_1 = {s: float(re.search(r"pass@1: (\S+)", text).group(1)) for s, text in evals.items()}
    assert pass_at_1[0] <= 0.25 and pass_at_1[20] == 1.0, pass_at_1  # on questions it never trained on

# chat_rl in a subprocess (python or torchrun's ranks) on ContainsTask: no monkeypatch reaches it there, so the
# wrapper imports this module for contains_tasks and swaps it in before main()
WRAPPER = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
import scripts.chat_rl as chat_rl
from test_chat_rl import contains_tasks
chat_rl.rl_tasks = lambda name: contains_tasks("e")
chat_rl.main()
"""
FLAGS = ["--task=synthetic-math", "--num-iterations=4", "--examples-per-step=4", "--num-samples=4",
         "--device-batch-size=2", "--max-new-tokens=6", "--init-lr-frac=0.5", "--eval-every=2", "--eval-examples=4",
         "--num-samples-eval=2", "--save-every=2"]

def run(base, launcher, extra_flags=()):
    wrapper = base / "rl_wrapper.py"
    wrapper.write_text(WRAPPER.format(repo=REPO, tests=os.path.join(REPO, "tests")))
    return run_script([*launcher, str(wrapper), *FLAGS, *extra_flags], base)

@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_tokenizer):
    """4 steps, 4 questions x 4 samples in passes of 2, checkpoints at 2 and 4, pass@1..2 at 0, 2, 4."""
    base = tmp_path_factory.mktemp("rl_reference")
    make_sft_dir(base, tiny_tokenizer)
    return base, run(base, [sys.executable])

def load_step(base, step):
    return torch.load(base / RL / f"model_{step:06d}.pt", weights_only=True)

def test_reference_run_trains_and_saves(reference_run):
    import json
    base, stdout = reference_run
    train, evals = parse_log(stdout)
    assert sorted(train) == [1, 2, 3, 4] and sorted(evals) == [0, 2, 4]
    assert sum(0 < reward < 1 and loss != 0 for reward, loss, _ in train.values()) >= 3, train  # it has things to learn
    assert len({digest for _, _, digest in train.values()}) == 4  # fresh samples every step
    with open(base / RL / "meta_000004.json") as f:
        meta = json.load(f)
    assert meta["optim_shards"] == 1 and meta["source"] == "sft" and meta["source_step"] == 5
    assert meta["model_config"]["window_pattern"] == "L" and sorted(meta["loop_state"]["history"]) == ["0", "2", "4"]
    start = torch.load(base / "chatsft_checkpoints" / "d2" / "model_000005.pt", weights_only=True)
    assert any(not torch.equal(start[k], v) for k, v in load_step(base, 4).items())

def test_resume_is_bit_identical(reference_run, tmp_path):
    base, stdout = reference_run
    resumed = died_before(base, tmp_path / "resumed", RL, 4)  # resumes from step 2
    resumed_stdout = run(resumed, [sys.executable], ["--resume"])
    assert f"resuming from {resumed / RL} step 2" in resumed_stdout
    train, evals = parse_log(stdout)
    train_r, evals_r = parse_log(resumed_stdout)
    assert sorted(train_r) == [3, 4]
    assert {s: train[s] for s in train_r} == train_r  # rewards, losses and every sampled token (digest)
    assert evals_r[4] == evals[4]
    reference, result = load_step(base, 4), load_step(resumed, 4)
    assert all(torch.equal(reference[k], result[k]) for k in reference), "resumed weights differ from uninterrupted"

def test_two_ranks_equal_one_process(reference_run, tmp_path):
    base, stdout = reference_run
    ddp = copy_dirs(base, tmp_path / "ddp", "tokenizer", "chatsft_checkpoints")
    ddp_stdout = run(ddp, TORCHRUN)
    assert "world size: 2" in ddp_stdout and "(2/rank)" in ddp_stdout
    train, evals = parse_log(stdout)
    train_d, evals_d = parse_log(ddp_stdout)
    assert train_d.keys() == train.keys()
    for s in train:  # same questions and seeds: the same samples and rewards; the loss up to float summation order
        assert train_d[s][0] == train[s][0] and train_d[s][2] == train[s][2], (s, train[s], train_d[s])
        assert abs(train_d[s][1] - train[s][1]) < 1e-5, (s, train[s], train_d[s])
    assert evals_d == evals
    # The weights agree to rounding, except where a gradient is itself rounding noise: RL gradients are sums of
    # +-advantage terms that can cancel, and Adam's g / sqrt(v) turns such noise into a full-size step whose sign
    # depends on the summation order, which differs between 1 and 2 ranks. Seen: a few elements of value_embeds.
    reference, result = load_step(base, 4), load_step(ddp, 4)
    differ = {k: int((~torch.isclose(result[k], reference[k], atol=1e-5, rtol=1e-4)).sum()) for k in reference}
    total = sum(t.numel() for t in reference.values())
    print(f"weights beyond rounding: {sum(differ.values())} of {total}", {k: n for k, n in differ.items() if n})
    assert sum(differ.values()) <= 1e-3 * total, differ
