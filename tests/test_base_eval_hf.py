"""
base_eval --hf-path: CORE and bpb of a Hugging Face causal LM, on models built here (no hub access).
A tiny random GPT-2 with a 48-position context: its CORE equals a slow per-prompt scoring written out below (BOS,
left crop to 48 tokens, mean cross-entropy / exact match); a nanochat checkpoint exported by scripts.export_hf:
its CORE and bpb through --hf-path equal the native evaluation of the same checkpoint.
"""

import os
import random
import runpy
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer as BPETokenizer, decoders, models, pre_tokenizers, trainers

from nanochat import core_eval
from nanochat.checkpoint import save_checkpoint
from nanochat.core_eval import continuation_spans, evaluate_core, render_prompts, sample_fewshot
from nanochat.dataloader import pretrain_loader
from nanochat.dataset import get_data_dir
from nanochat.gpt import GPTConfig
from nanochat.hf.causal_lm import load_hf_model
from nanochat.loss_eval import evaluate_bpb
from conftest import LM_DATA, MC_DATA, SCHEMA_DATA, TINY_CORPUS, seeded_gpt, write_bundle

GPT2_POSITIONS = 48  # shorter than most prompts of the fixture bundle: cropping is exercised

def run_script(module, argv):
    old = sys.argv
    sys.argv = [module] + argv
    try:
        runpy.run_module(module, run_name="__main__")
    finally:
        sys.argv = old

def only_csv(base_dir, suffix):
    """The one CSV base_eval wrote, named after the model path ("/" -> "-")."""
    paths = list((base_dir / "base_eval").glob("*.csv"))
    assert len(paths) == 1 and paths[0].name.endswith(suffix), paths
    return paths[0]

def read_core_csv(path):
    """{label: (accuracy, centered)} and the CORE value of a base_eval CSV."""
    lines = path.read_text().splitlines()
    assert lines[0] == "Task, Accuracy, Centered" and lines[-1].startswith("CORE, , ")
    rows = {label: (float(acc), float(centered)) for label, acc, centered in (l.split(", ") for l in lines[1:-1])}
    return rows, float(lines[-1].split(", ")[2])

@pytest.fixture
def gpt2_dir(tmp_path):
    """A random 2-layer GPT-2 and a byte-level BPE tokenizer (BOS <|endoftext|>, as GPT-2's), saved by transformers."""
    texts = TINY_CORPUS + [str(row) for row in MC_DATA + SCHEMA_DATA + LM_DATA]
    bpe = BPETokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                                     eos_token="<|endoftext|>")
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=GPT2_POSITIONS, n_embd=32, n_layer=2,
                                     n_head=2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    out = tmp_path / "tiny-gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

def slow_core_accuracies(hf, tokenizer, bundle, max_len):
    """Each prompt scored alone, unpadded: <|endoftext|> + its tokens, cropped on the left to max_len; multiple choice
    and schema pick the lowest mean cross-entropy, language modeling needs every greedy token right."""
    bos = tokenizer.bos_token_id
    tasks, _ = core_eval.load_core_config(str(bundle))
    accuracies, num_cropped = {}, 0
    for task in tasks:
        data = core_eval.load_task_data(os.path.join(bundle, "eval_data", task["dataset_uri"]), task["task_type"])
        random.Random(1337).shuffle(data)
        correct = scored = 0
        for idx, item in enumerate(data):
            prompts = render_prompts(task["task_type"], item, task["continuation_delimiter"],
                                     sample_fewshot(data, idx, task["num_fewshot"]))
            tokens = [[bos] + tokenizer.encode(p, add_special_tokens=False) for p in prompts]
            losses, hits = [], []
            for seq, (start, end) in zip(*continuation_spans(task["task_type"], tokens)):
                cut = max(0, len(seq) - max_len)
                num_cropped += cut > 0
                seq, start, end = seq[cut:], start - cut, end - cut
                if start < 1:
                    break  # its scored tokens do not fit: the example is left out
                with torch.no_grad():
                    logits = hf(torch.tensor([seq])).logits[0, start - 1:end - 1]
                targets = torch.tensor(seq[start:end])
                losses.append(F.cross_entropy(logits, targets).item())
                hits.append(bool((logits.argmax(-1) == targets).all()))
            else:
                scored += 1
                if task["task_type"] == "language_modeling":
                    correct += hits[0]
                else:
                    correct += losses.index(min(losses)) == item["gold"]
        accuracies[task["label"]] = correct / scored
    assert num_cropped > 10, num_cropped  # the crop really happened
    return accuracies

def test_core_of_a_tiny_gpt2_equals_slow_per_prompt_scoring(gpt2_dir, base_dir):
    bundle = write_bundle(base_dir)
    run_script("scripts.base_eval", ["--hf-path", str(gpt2_dir), "--eval", "core", "--device-type", "cpu",
                                     "--device-batch-size", "2"])
    rows, core = read_core_csv(only_csv(base_dir, "tiny-gpt2.csv"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    expected = slow_core_accuracies(hf, tokenizer, bundle, GPT2_POSITIONS)
    assert {label: acc for label, (acc, _) in rows.items()} == pytest.approx(expected, abs=1e-6)
    baselines = {"mc_task": 0.25, "schema_task": 0.5, "lm_task": 0.0}
    for label, (acc, centered) in rows.items():
        assert centered == pytest.approx((acc - baselines[label]) / (1 - baselines[label]), abs=1e-6)
    assert core == pytest.approx(sum(c for _, c in rows.values()) / 3, abs=1e-6)

def test_token_bytes_of_a_byte_level_tokenizer_sum_to_the_text_bytes(gpt2_dir):
    _, tokenizer = load_hf_model(str(gpt2_dir), torch.device("cpu"))
    token_bytes = tokenizer.token_bytes()
    assert token_bytes[tokenizer.get_bos_token_id()] == 0  # <|endoftext|> stands for no text
    for text in TINY_CORPUS[:7] + ["<|endoftext|> is text here", "émoji🙂 中文"]:
        ids = tokenizer.encode(text, prepend=tokenizer.get_bos_token_id())
        assert ids[0] == tokenizer.get_bos_token_id() and tokenizer.get_bos_token_id() not in ids[1:]
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8")), text

# -----------------------------------------------------------------------------
# A nanochat checkpoint exported by scripts.export_hf: --hf-path equals the native evaluation

SEQ_LEN = 256  # longer than every prompt of the fixture bundle: no crop, as the native evaluation

def test_exported_checkpoint_scores_as_the_native_one(base_dir, tiny_tokenizer, monkeypatch, capsys):
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    config = GPTConfig(sequence_len=SEQ_LEN, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                       n_kv_head=2, n_embd=32)
    model = seeded_gpt(config, perturb=0.05).eval()
    meta = {"model_config": config.__dict__, "user_config": {}, "tokenizer_fingerprint": tiny_tokenizer.fingerprint()}
    save_checkpoint(str(base_dir / "base_checkpoints" / "d2"), 7, model.state_dict(), None, meta)
    out = base_dir / "export"
    run_script("scripts.export_hf", ["-i", "base", "-o", str(out)])
    write_bundle(base_dir)
    rng = random.Random(0)
    monkeypatch.setenv("NANOCHAT_DATASET", "local")
    os.makedirs(get_data_dir("local"))
    for shard in (0, 9):  # 0 = train, 9 = the local dataset's val shard
        texts = [" ".join(rng.choice(TINY_CORPUS).split()[:rng.randint(3, 30)]) for _ in range(60)]
        pq.write_table(pa.table({"text": texts}), os.path.join(get_data_dir("local"), f"shard_{shard:05d}.parquet"))
    capsys.readouterr()
    run_script("scripts.base_eval", ["--hf-path", str(out), "--device-type", "cpu", "--device-batch-size", "2",
                                     "--split-tokens", str(2 * 2 * SEQ_LEN)])
    printed = capsys.readouterr().out
    rows, core = read_core_csv(only_csv(base_dir, "-export.csv"))

    native = evaluate_core(model, tiny_tokenizer, "cpu")
    assert native["skipped"] == {"mc_task": 0, "schema_task": 0, "lm_task": 0}
    assert {label: acc for label, (acc, _) in rows.items()} == pytest.approx(native["results"], abs=1e-6)
    assert core == pytest.approx(native["core_metric"], abs=1e-6)
    for split in ("train", "val"):
        loader = pretrain_loader(tiny_tokenizer, 2, SEQ_LEN, split)
        bpb = evaluate_bpb(model, loader, 2, tiny_tokenizer.token_bytes())
        assert f"{split} bpb: {bpb:.6f}" in printed, (split, bpb, printed)
    # and the script's own native path prints the same bpb and writes the same CORE lines
    torch.save(tiny_tokenizer.token_bytes(), base_dir / "tokenizer" / "token_bytes.pt")
    run_script("scripts.base_eval", ["--device-type", "cpu", "--device-batch-size", "2", "--eval", "core,bpb",
                                     "--split-tokens", str(2 * 2 * SEQ_LEN)])
    native_printed = capsys.readouterr().out
    bpb_lines = lambda text: [line for line in text.splitlines() if " bpb: " in line]
    assert bpb_lines(native_printed) == bpb_lines(printed) and len(bpb_lines(printed)) == 2
    assert read_core_csv(base_dir / "base_eval" / "base_model_000007.csv") == (rows, core)

@pytest.mark.parametrize("argv, named", [(["--eval", "core,sample"], "use --eval=core,bpb"),
                                         (["--model-tag", "d12"], "--hf-path names the model on its own")])
def test_hf_path_refuses_what_only_a_nanochat_checkpoint_has(base_dir, capsys, argv, named):
    with pytest.raises(SystemExit) as e:
        run_script("scripts.base_eval", ["--hf-path", str(base_dir / "nowhere"), *argv])
    assert e.value.code == 2 and named in capsys.readouterr().err
