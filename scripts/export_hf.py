"""
Export a trained nanochat to a Hugging Face model directory, loadable by transformers and by
nanochat itself.

    python -m scripts.export_hf -i sft -o out/nanochat-d20    # newest sft checkpoint, largest d<N>
    python -m scripts.export_hf -i base -g d12 -s 5000 -o out/base --dtype bfloat16 --check
    hf upload USER/nanochat-d20 out/nanochat-d20                # share it (huggingface_hub CLI)

Then: AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True),
AutoTokenizer.from_pretrained(DIR), or `python -m scripts.chat_cli -i DIR`. What the directory
holds: nanochat/hf/export.py. --check reloads the export both ways (nanochat's load_model and, when
installed, transformers) and compares the weights with the checkpoint bit for bit and the logits of
one prompt with nanochat's. Leaves out: pushing to the Hub (use the huggingface_hub CLI), sharded
weight files.
"""

import argparse
import os
import sys

parser = argparse.ArgumentParser(description="Export a checkpoint to the Hugging Face format")
parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"])
parser.add_argument("-g", "--model-tag", default=None, help="e.g. d20 (default: the largest d<N>)")
parser.add_argument("-s", "--step", type=int, default=None, help="default: the newest")
parser.add_argument("-o", "--output", required=True, help="directory (created; its files replaced)")
parser.add_argument("--dtype", default="", choices=["", "float32", "bfloat16"],
                    help="cast every weight to this dtype ('' = keep the checkpoint's dtypes)")
parser.add_argument("--check", action="store_true", help="reload it, compare weights and logits")
args = parser.parse_args()

import torch

from nanochat.checkpoint import (SOURCE_DIRS, SOURCE_SCRIPTS, check_tokenizer, find_last_step,
                                 find_model_tag, load_checkpoint)
from nanochat.common import get_base_dir
from nanochat.engine import prepare_for_inference
from nanochat.hf.export import export_model, load_export
from nanochat.tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
# Find and read the checkpoint (every file verified against its recorded sha256)

checkpoints_dir = os.path.join(get_base_dir(), SOURCE_DIRS[args.source])
try:
    model_tag = args.model_tag or find_model_tag(checkpoints_dir)
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    step = args.step if args.step is not None else find_last_step(checkpoint_dir)
    state, _, meta = load_checkpoint(checkpoint_dir, step, "cpu")
    tokenizer = get_tokenizer()
    check_tokenizer(meta, tokenizer, f"{args.source} {model_tag} step {step}")
except (FileNotFoundError, ValueError, RuntimeError) as e:
    print(f"error: {e} (train one with `python -m {SOURCE_SCRIPTS[args.source]}`)", file=sys.stderr)
    sys.exit(1)
report_path = os.path.join(get_base_dir(), "report", "report.md")
report_text = open(report_path, encoding="utf-8").read() if os.path.exists(report_path) else None

# -----------------------------------------------------------------------------
# Export

dtype = {"": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
export_model(state, meta, tokenizer, args.output, source=args.source, dtype=dtype,
             report_text=report_text)
# safetensors creates its file 0600 whatever the umask: give it the mode every other file got
mode = os.stat(os.path.join(args.output, "config.json")).st_mode
os.chmod(os.path.join(args.output, "model.safetensors"), mode)
size = sum(os.path.getsize(os.path.join(args.output, f)) for f in os.listdir(args.output))
print(f"exported {args.source} {model_tag} step {step} to {args.output} ({size / 2**20:.1f} MiB): "
      f"{', '.join(sorted(os.listdir(args.output)))}")

# -----------------------------------------------------------------------------
# Check: weights bit for bit (after the requested cast), logits of one prompt

if args.check:
    model, tok, _ = load_export(args.output, "cpu")
    cast = lambda v: v.to(dtype) if dtype is not None and v.is_floating_point() else v
    expected = {k.removeprefix("_orig_mod."): cast(v) for k, v in state.items()}
    loaded = model.state_dict()
    bad = [k for k, v in expected.items()
           if not torch.equal(loaded[k], v.float() if v.dtype == torch.bfloat16 else v)]
    assert not bad and tok.fingerprint() == tokenizer.fingerprint(), f"export differs: {bad}"
    print(f"check: nanochat reload ok ({len(expected)} tensors bit-identical, same tokenizer)")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("check: transformers is not installed, skipped the transformers reload "
              "(pip install -e '.[hf]')")
        sys.exit(0)
    hf_model = AutoModelForCausalLM.from_pretrained(args.output, trust_remote_code=True,
                                                    dtype=torch.float32).eval()
    # fp32 to fp32: the default compute dtype is bf16 on some CPUs
    prepare_for_inference(model, "float32")
    ids = torch.tensor([tokenizer.encode("The capital of France is", prepend="<|bos|>")])
    with torch.no_grad():
        diff = (hf_model(ids).logits - model(ids)).abs().max().item()
    print(f"check: transformers reload ok, max abs logit diff vs nanochat {diff:.2e} (fp32, CPU)")
    assert diff <= 1e-4, f"transformers logits differ from nanochat's by {diff}"
