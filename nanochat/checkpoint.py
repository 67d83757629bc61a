"""
Checkpoints: save (atomically), find, load, and rebuild a model for downstream stages.

    from nanochat.checkpoint import load_model
    model, tokenizer, meta = load_model("base", device, phase="eval")            # newest step of the largest d<N>
    model, tokenizer, meta = load_model("sft", device, model_tag="d20", step=700)

Layout: <base>/{base,mid,chatsft,chatrl}_checkpoints/<tag>/ holds, per step (zero-padded to 6 digits),
model_SSSSSS.pt (rank 0), optim_SSSSSS_rankR.pt (one per rank, optional) and meta_SSSSSS.json (rank 0).
Every file is written to a temp name and renamed, and the meta file is published LAST: a checkpoint without its
meta does not exist as far as find_last_step is concerned, so a crash in the middle of a save leaves the previous
checkpoint as the newest complete one. meta records how many optimizer shards belong to the step, and
find_last_step also checks that the model and every shard load.

Leaves out: patching checkpoints from older code versions (missing window_pattern etc.): there are none here,
and guessing a missing window pattern silently changes the model, so it is an error instead.
"""

import glob
import json
import os
import pickle
import re

import torch

from nanochat.common import get_base_dir, get_dist_info, atomic_write_text, print0

SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
SOURCE_SCRIPTS = {"base": "scripts.base_train", "mid": "scripts.mid_train", "sft": "scripts.chat_sft", "rl": "scripts.chat_rl"}

def _paths(checkpoint_dir, step, rank=0):
    return (os.path.join(checkpoint_dir, f"model_{step:06d}.pt"),
            os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt"),
            os.path.join(checkpoint_dir, f"meta_{step:06d}.json"))

def _atomic_torch_save(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def save_checkpoint(checkpoint_dir, step, model_state, optimizer_state, meta, rank=0):
    """
    Every rank calls this with its optimizer shard (or None); rank 0 also writes the model and, last, the meta.
    Ranks do not wait for each other: a meta published before another rank's shard lands is simply not
    complete yet for find_last_step.
    """
    os.makedirs(checkpoint_dir, exist_ok=True)
    model_path, optim_path, meta_path = _paths(checkpoint_dir, step, rank)
    if rank == 0 and os.path.exists(meta_path):
        os.remove(meta_path)  # re-saving a step: un-publish it until the new files are all in place
    if rank == 0:
        _atomic_torch_save(model_state, model_path)
    if optimizer_state is not None:
        _atomic_torch_save(optimizer_state, optim_path)
    if rank == 0:
        world_size = get_dist_info()[3]
        meta = dict(meta, step=step, optim_shards=world_size if optimizer_state is not None else 0)
        atomic_write_text(meta_path, json.dumps(meta, indent=2))

def _steps_with_meta(checkpoint_dir):
    steps = [int(m.group(1)) for f in glob.glob(os.path.join(checkpoint_dir, "meta_*.json"))
             if (m := re.fullmatch(r"meta_(\d+)\.json", os.path.basename(f)))]
    return sorted(steps)

def _is_complete(checkpoint_dir, step):
    """The meta parses, and the model and every optimizer shard it names load (mmap: no tensor data is read)."""
    model_path, _, meta_path = _paths(checkpoint_dir, step)
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        paths = [model_path] + [_paths(checkpoint_dir, step, r)[1] for r in range(meta.get("optim_shards", 0))]
        for path in paths:
            torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # missing, truncated or corrupt file, bad JSON
        print0(f"checkpoint step {step} in {checkpoint_dir} is incomplete, skipping it: {e}")
        return False
    return True

def find_last_step(checkpoint_dir):
    """The newest step whose meta exists and whose files load."""
    for step in reversed(_steps_with_meta(checkpoint_dir)):
        if _is_complete(checkpoint_dir, step):
            return step
    raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir} "
                            f"(steps with meta: {_steps_with_meta(checkpoint_dir) or 'none'})")

def find_model_tag(checkpoints_dir):
    """The largest d<N> tag, else the most recently modified directory."""
    tags = [t for t in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, t))] \
        if os.path.isdir(checkpoints_dir) else []
    if not tags:
        raise FileNotFoundError(f"no model tags (subdirectories) in {checkpoints_dir}")
    depth_tags = [t for t in tags if re.fullmatch(r"d\d+", t)]
    if depth_tags:
        return max(depth_tags, key=lambda t: int(t[1:]))
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))

def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """-> (model_state, optimizer_state or None, meta)."""
    model_path, optim_path, meta_path = _paths(checkpoint_dir, step, rank)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir} "
                                f"(steps with meta: {_steps_with_meta(checkpoint_dir) or 'none'})")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    model_state = torch.load(model_path, map_location=device, weights_only=True)
    optimizer_state = load_optimizer_shard(checkpoint_dir, step, device, rank, meta) if load_optimizer else None
    return model_state, optimizer_state, meta

def load_optimizer_shard(checkpoint_dir, step, device, rank=0, meta=None):
    """This rank's optimizer state of a step, without reading the model (SFT's warm start needs only this)."""
    _, optim_path, meta_path = _paths(checkpoint_dir, step, rank)
    if not os.path.exists(optim_path):
        if meta is None:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        raise FileNotFoundError(f"{optim_path} is missing: step {step} has {meta.get('optim_shards', 0)} optimizer "
                                f"shards and rank {rank} needs its own (resume with the same number of GPUs)")
    return torch.load(optim_path, map_location=device, weights_only=True)

def build_model(checkpoint_dir, step, device, phase):
    """Rebuild the GPT of a checkpoint: -> (model, meta). The model config (incl. window_pattern) comes from meta."""
    from nanochat.gpt import GPT, GPTConfig
    assert phase in ("train", "eval"), f"phase must be 'train' or 'eval', got {phase!r}"
    device = torch.device(device)
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device)
    config = meta["model_config"]
    if "window_pattern" not in config:
        raise ValueError(f"checkpoint {checkpoint_dir} step {step} has no window_pattern in its model_config; "
                         f"it was not written by this code")
    # torch.compile wraps parameter names in _orig_mod.; CPU/MPS compute in fp32, so bf16 tensors are upcast
    model_state = {k.removeprefix("_orig_mod."): v for k, v in model_state.items()}
    if device.type in ("cpu", "mps"):
        model_state = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in model_state.items()}
    with torch.device("meta"):
        model = GPT(GPTConfig(**config))
    model.to_empty(device=device)
    model.init_weights()  # buffers that are not in the state dict (rotary tables) get their values here
    model.load_state_dict(model_state, strict=True, assign=True)
    model.train() if phase == "train" else model.eval()
    return model, meta

def load_model(source, device, phase="eval", model_tag=None, step=None):
    """-> (model, tokenizer, meta) from <base>/<source dir>/<tag>/ at `step` (default: newest complete)."""
    from nanochat.tokenizer import get_tokenizer
    if source not in SOURCE_DIRS:
        raise ValueError(f"unknown checkpoint source {source!r}: use one of {sorted(SOURCE_DIRS)}")
    checkpoints_dir = os.path.join(get_base_dir(), SOURCE_DIRS[source])
    if not os.path.isdir(checkpoints_dir) or not os.listdir(checkpoints_dir):
        raise FileNotFoundError(f"no {source} checkpoints in {checkpoints_dir}: train one with "
                                f"`python -m {SOURCE_SCRIPTS[source]}`")
    if model_tag is None:
        model_tag = find_model_tag(checkpoints_dir)
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"no model tag {model_tag!r} in {checkpoints_dir}; "
                                f"available: {sorted(os.listdir(checkpoints_dir))}")
    if step is None:
        step = find_last_step(checkpoint_dir)
    model, meta = build_model(checkpoint_dir, step, device, phase)
    tokenizer = get_tokenizer()
    vocab = meta["model_config"]["vocab_size"]
    assert tokenizer.get_vocab_size() == vocab, (f"tokenizer vocab {tokenizer.get_vocab_size()} != model vocab {vocab}: "
                                                 f"the tokenizer in {get_base_dir()}/tokenizer is not the one this model was trained with")
    print0(f"loaded {source} model {model_tag} step {step} from {checkpoint_dir}")
    return model, tokenizer, meta
