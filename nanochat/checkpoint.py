"""
Checkpoints: save (atomically), find, load, and rebuild a model for downstream stages.

    from nanochat.checkpoint import load_model
    model, tokenizer, meta = load_model("base", device, phase="eval")  # newest step, largest d<N>
    model, tokenizer, meta = load_model("sft", device, model_tag="d20", step=700)

Layout: <base>/{base,mid,chatsft,chatrl}_checkpoints/<tag>/ holds, per step (zero-padded to 6
digits), model_SSSSSS.pt (rank 0), optim_SSSSSS_rankR.pt (one per rank, optional) and
meta_SSSSSS.json (rank 0). Every file is written to a temp name and renamed, and the meta file is
published LAST: a checkpoint without its meta does not exist as far as find_last_step is concerned,
so a crash in the middle of a save leaves the previous checkpoint as the newest complete one.

Integrity: meta records the sha256 of every file of the step and of its own content (meta_sha256),
and load_checkpoint verifies them, so a flipped bit or an edited field is an error naming the file,
not a model that silently computes something else. One run at a time per directory: see
lock_checkpoint_dir. The training scripts share how they start (start_or_resume), resume
(load_resume, loop_meta, restore_loop) and save (TrainingSaves) here.

Leaves out: loading checkpoints that save_checkpoint did not write (a meta without hashes is an
error).
"""

import argparse
import errno
import glob
import hashlib
import io
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist
from filelock import FileLock, Timeout

from nanochat.common import (get_base_dir, get_dist_info, atomic_path, atomic_write_text, print0,
                             is_dist, gather_across_ranks, read_json)
from nanochat.gpt import GPT, GPTConfig
from nanochat.hf.export import load_export
from nanochat.tokenizer import get_tokenizer

# the checkpoint directory under <base> of each stage, and the script that writes it
SOURCE_DIRS = dict(base="base_checkpoints", mid="mid_checkpoints", sft="chatsft_checkpoints",
                   rl="chatrl_checkpoints")
SOURCE_SCRIPTS = dict(base="scripts.base_train", mid="scripts.mid_train", sft="scripts.chat_sft",
                      rl="scripts.chat_rl")
# the names of what a save writes, temp files included
CHECKPOINT_FILE = r"(model_\d+\.pt|optim_\d+_rank\d+\.pt|meta_\d+\.json)(\.tmp\d+)?"

def _paths(checkpoint_dir, step, rank=0):
    names = f"model_{step:06d}.pt", f"optim_{step:06d}_rank{rank}.pt", f"meta_{step:06d}.json"
    return [os.path.join(checkpoint_dir, name) for name in names]

def file_sha256(path, chunk_size=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()

def meta_sha256(meta):
    """Hash of the meta's content without its own hash field,
    in a canonical JSON form (key order does not matter)."""
    content = {k: v for k, v in meta.items() if k != "meta_sha256"}
    canonical = json.dumps(json.loads(json.dumps(content)), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()

class _WriteAll(io.FileIO):
    """The file torch.save writes to: its zip writer turns a short write into "unexpected pos" and
    drops the OSError, so this keeps the error, and a full disk (ENOSPC, EFBIG, EDQUOT) is reported
    as one."""
    error = None

    def write(self, data):
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[super().write(view):]
        except OSError as e:
            self.error = e
            raise
        return len(data)

def _atomic_torch_save(obj, path):
    """torch.save through a temp file and a rename; returns the sha256 of the published file."""
    with atomic_path(path) as tmp:
        with _WriteAll(tmp, "wb") as f:  # unbuffered
            try:
                torch.save(obj, f)
            except RuntimeError as e:
                raise (f.error or e) from None
        return file_sha256(tmp)  # from the page cache: no second copy of the state in memory

def save_checkpoint(checkpoint_dir, step, model_state, optimizer_state, meta, rank=0):
    """
    Every rank calls this with its optimizer shard (or None); rank 0 also writes the model and,
    last, the meta, which records every rank's sha256 (one all_gather_object). Put
    Tokenizer.fingerprint() in meta as "tokenizer_fingerprint" so loading can refuse a different
    tokenizer.
    """
    os.makedirs(checkpoint_dir, exist_ok=True)
    # the temp files (<name>.tmp<pid>) of this rank's file names that a killed save left behind:
    # with the directory locked by this run, any not of this process is of a process that is gone
    names = rf"optim_\d+_rank{rank}\.pt" + (r"|model_\d+\.pt|meta_\d+\.json" if rank == 0 else "")
    orphans = sorted(n for n in os.listdir(checkpoint_dir) if re.fullmatch(rf"({names})\.tmp\d+", n)
                     and not n.endswith(f".tmp{os.getpid()}"))
    for name in orphans:
        os.remove(os.path.join(checkpoint_dir, name))
    if orphans:
        print(f"removed {len(orphans)} temp file(s) of an interrupted save in {checkpoint_dir}: "
              f"{', '.join(orphans)}", flush=True)
    model_path, optim_path, meta_path = _paths(checkpoint_dir, step, rank)
    if rank == 0 and os.path.exists(meta_path):
        os.remove(meta_path)  # re-saving a step: un-publish it until the new files are all in place
    states = {model_path: model_state if rank == 0 else None, optim_path: optimizer_state}
    hashes = {}
    try:
        for path, state in states.items():
            if state is not None:
                hashes[os.path.basename(path)] = _atomic_torch_save(state, path)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        for name in hashes:  # this step can never be complete now: give its space back
            os.remove(os.path.join(checkpoint_dir, name))
        raise OSError(e.errno, f"saving step {step} into {checkpoint_dir} failed: {e.strerror}. "
                      f"This rank's files need about {_nbytes(list(states.values())):,} bytes "
                      f"there and {shutil.disk_usage(checkpoint_dir).free:,} are free. Free space "
                      f"(or point NANOCHAT_BASE_DIR elsewhere), then rerun with --resume: the "
                      f"newest complete checkpoint is untouched") from None
    hashes = {name: sha for rank_hashes in gather_across_ranks(hashes)
              for name, sha in rank_hashes.items()}
    if rank == 0:
        shards = get_dist_info()[3] if optimizer_state is not None else 0  # one per rank
        meta = dict(meta, step=step, optim_shards=shards, sha256=hashes)
        meta["meta_sha256"] = meta_sha256(meta)
        atomic_write_text(meta_path, json.dumps(meta, indent=2))

def _nbytes(obj):
    """Bytes of the tensors in a (nested) state dict: about the size torch.save writes."""
    if isinstance(obj, (dict, list, tuple)):
        return sum(map(_nbytes, obj.values() if isinstance(obj, dict) else obj))
    return obj.nelement() * obj.element_size() if isinstance(obj, torch.Tensor) else 0

# -----------------------------------------------------------------------------
# One run per output directory

_held_locks = {}  # checkpoint_dir -> FileLock, held for the life of the process

def lock_checkpoint_dir(checkpoint_dir, model_tag=None):
    """
    Lock checkpoint_dir for the rest of this process (rank 0; the other ranks write under it): a
    second run on it fails here naming the holder. The OS drops the lock when the holder dies. The
    lock files sit beside the directory (<tag>.lock, <tag>.lock.json), so a run that fails at start
    leaves no empty tag for find_model_tag to pick.
    """
    checkpoint_dir = os.path.abspath(checkpoint_dir)
    # a script run twice in one process (tests) has the lock already
    if get_dist_info()[1] != 0 or checkpoint_dir in _held_locks:
        return
    os.makedirs(os.path.dirname(checkpoint_dir), exist_ok=True)
    owner_path = f"{checkpoint_dir}.lock.json"
    lock = FileLock(f"{checkpoint_dir}.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = "pid {pid} on host {host}, started {started}".format(**read_json(owner_path))
        except (OSError, ValueError, KeyError, TypeError):
            holder = f"a process that has not written {owner_path} yet"
        raise RuntimeError(f"{checkpoint_dir} is being written by another run ({holder}): wait for "
                           f"it to finish, stop it, or give this run its own directory with a "
                           f"different --model-tag (this run's: {model_tag})") from None
    started = time.strftime("%Y-%m-%dT%H:%M:%S")  # local time, ISO 8601 to the second
    atomic_write_text(owner_path, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                              "model_tag": model_tag, "started": started}))
    _held_locks[checkpoint_dir] = lock

# -----------------------------------------------------------------------------
# Finding and loading

def _steps_with_meta(checkpoint_dir):
    return sorted(int(m.group(1)) for f in glob.glob(os.path.join(checkpoint_dir, "meta_*.json"))
                  if (m := re.fullmatch(r"meta_(\d+)\.json", os.path.basename(f))))

def read_meta(meta_path):
    """The meta dict of a step; a file that is not a JSON object is an error naming it."""
    meta = read_json(meta_path)
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} holds a JSON {type(meta).__name__}, not the object a "
                         f"checkpoint meta is: restore it or delete this step's files")
    return meta

def find_last_step(checkpoint_dir):
    """The newest step whose meta parses and whose model and every optimizer shard it names load
    (mmap: no tensor data is read)."""
    steps = _steps_with_meta(checkpoint_dir)
    for step in reversed(steps):
        model_path, _, meta_path = _paths(checkpoint_dir, step)
        try:
            shards = range(read_meta(meta_path).get("optim_shards", 0))
            for path in [model_path] + [_paths(checkpoint_dir, step, r)[1] for r in shards]:
                torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            return step
        except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError,
                TypeError) as e:
            print0(f"checkpoint step {step} in {checkpoint_dir} is incomplete, skipping it: {e}")
    raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir} "
                            f"(steps with meta: {steps or 'none'})")

def _model_tags(checkpoints_dir):
    names = os.listdir(checkpoints_dir) if os.path.isdir(checkpoints_dir) else []
    return [t for t in names if os.path.isdir(os.path.join(checkpoints_dir, t))]

def find_model_tag(checkpoints_dir):
    """The largest d<N> tag, else the most recently modified directory."""
    tags = _model_tags(checkpoints_dir)
    if not tags:
        raise FileNotFoundError(f"no model tags (subdirectories) in {checkpoints_dir}")
    if depth_tags := [t for t in tags if re.fullmatch(r"d\d+", t)]:
        return max(depth_tags, key=lambda t: int(t[1:]))
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))

def _fallback(step):
    return f"delete step {step}'s files (*_{step:06d}*) to fall back to the previous checkpoint"

def _verified(path, meta, step, device):
    """torch.load of a file whose sha256 matches the one its meta recorded at save time."""
    name, recorded = os.path.basename(path), meta["sha256"]
    if name not in recorded:
        raise RuntimeError(f"{path} is not among the files recorded in meta_{step:06d}.json "
                           f"({sorted(recorded)}): it does not belong to this checkpoint; delete "
                           f"it or restore the original")
    if (actual := file_sha256(path)) != recorded[name]:
        raise RuntimeError(f"{path} is corrupt: its sha256 {actual[:16]}... differs from "
                           f"{recorded[name][:16]}... recorded when step {step} was saved. "
                           f"Restore the file, or {_fallback(step)}")
    return torch.load(path, map_location=device, weights_only=True)

def load_meta(checkpoint_dir, step):
    """The meta of a step, checked against its own recorded
    hash (an edited field is an error, not another model)."""
    meta_path = _paths(checkpoint_dir, step)[2]
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir} "
                                f"(steps with meta: {_steps_with_meta(checkpoint_dir) or 'none'})")
    try:
        meta = read_meta(meta_path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}): restore it, "
                         f"or {_fallback(step)}") from None
    if "sha256" not in meta or meta.get("meta_sha256") != meta_sha256(meta):
        raise ValueError(f"{meta_path} was edited after it was saved (its content no longer "
                         f"matches meta_sha256, or the hashes are gone): a changed field such as "
                         f"model_config.sequence_len would run the model outside what it was "
                         f"trained for. Restore the file, or {_fallback(step)}")
    return meta

def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """-> (model_state, optimizer_state or None, meta),
    every file verified against the sha256 in meta."""
    meta = load_meta(checkpoint_dir, step)
    model_state = _verified(_paths(checkpoint_dir, step)[0], meta, step, device)
    if not load_optimizer:
        return model_state, None, meta
    return model_state, load_optimizer_shard(checkpoint_dir, step, device, rank, meta), meta

def load_optimizer_shard(checkpoint_dir, step, device, rank=0, meta=None):
    """This rank's optimizer state of a step, without
    reading the model (SFT's warm start needs only this)."""
    optim_path = _paths(checkpoint_dir, step, rank)[1]
    meta = meta or load_meta(checkpoint_dir, step)
    if not os.path.exists(optim_path):
        raise FileNotFoundError(f"{optim_path} is missing: step {step} has "
                                f"{meta.get('optim_shards', 0)} optimizer shards and rank {rank} "
                                f"needs its own (resume with the same number of GPUs)")
    return _verified(optim_path, meta, step, device)

def model_from_state(config, state, device, phase):
    """The GPT of a model_config dict holding a state
    dict (from a checkpoint or an export), on device."""
    assert phase in ("train", "eval"), f"phase must be 'train' or 'eval', got {phase!r}"
    if device.type in ("cpu", "mps"):  # upcast; load_state_dict casts back where the model has bf16
        state = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in state.items()}
    with torch.device("meta"):
        model = GPT(GPTConfig(**config))
    model.to_empty(device=device)
    model.init_weights()  # buffers not in the state dict (rotary tables) get their values here
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
    model.train() if phase == "train" else model.eval()
    return model

def load_model(source, device, phase="eval", model_tag=None, step=None):
    """
    -> (model, tokenizer, meta) from <base>/<source dir>/<tag>/ at `step` (default: newest
    complete), or from a directory written by `python -m scripts.export_hf` (e.g. downloaded from
    the Hugging Face Hub) when source is one. The model config (incl. window_pattern) comes from
    meta.
    """
    if os.path.isdir(source) and os.path.exists(os.path.join(source, "config.json")):
        print0(f"loading exported model from {source}")
        return load_export(source, device, phase)
    if source not in SOURCE_DIRS:
        raise ValueError(f"unknown checkpoint source {source!r}: use one of {sorted(SOURCE_DIRS)}, "
                         f"or a directory written by scripts.export_hf")
    checkpoints_dir = os.path.join(get_base_dir(), SOURCE_DIRS[source])
    tags = _model_tags(checkpoints_dir)
    if not tags:
        raise FileNotFoundError(f"no {source} checkpoints in {checkpoints_dir}: train one with "
                                f"`python -m {SOURCE_SCRIPTS[source]}`")
    model_tag = model_tag or find_model_tag(checkpoints_dir)
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"no model tag {model_tag!r} in {checkpoints_dir}; "
                                f"available: {sorted(tags)}")
    step = find_last_step(checkpoint_dir) if step is None else step
    device = torch.device(device)
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device)
    model = model_from_state(meta["model_config"], model_state, device, phase)
    tokenizer = get_tokenizer()
    vocab = meta["model_config"]["vocab_size"]
    assert tokenizer.get_vocab_size() == vocab, (f"tokenizer vocab {tokenizer.get_vocab_size()} != "
                                                 f"model vocab {vocab}: {get_base_dir()}/tokenizer "
                                                 f"is not this model's tokenizer")
    check_tokenizer(meta, tokenizer, f"{source} {model_tag} step {step}")
    print0(f"loaded {source} model {model_tag} step {step} from {checkpoint_dir}")
    return model, tokenizer, meta

def load_source(args, device, output):
    """
    The model a chat stage continues (--source, --model-tag, --model-step): -> (model, tokenizer,
    meta, model tag, output dir). The output dir, <base>/<output's dir>/<the same tag>, is locked
    for this run (lock_checkpoint_dir): a second run on it fails here, before any data is read.
    """
    source_dir = os.path.join(get_base_dir(), SOURCE_DIRS[args.source])
    model_tag = args.model_tag
    if not model_tag and os.path.isdir(source_dir):  # else load_model names what is missing
        model_tag = find_model_tag(source_dir)
    model, tokenizer, meta = load_model(args.source, device, "train", model_tag, args.model_step)
    output_dir = os.path.join(get_base_dir(), SOURCE_DIRS[output], model_tag)
    lock_checkpoint_dir(output_dir, model_tag)
    return model, tokenizer, meta, model_tag, output_dir

def check_tokenizer(meta, tokenizer, what):
    """The tokenizer must be the one the checkpoint was trained
    with: same vocab size is not enough (other merges)."""
    # None in a meta written by hand (tests, bench.serve): only the vocab size checks
    recorded = meta.get("tokenizer_fingerprint")
    if recorded is not None and recorded != tokenizer.fingerprint():
        raise ValueError(f"the tokenizer in {get_base_dir()}/tokenizer (fingerprint "
                         f"{tokenizer.fingerprint()[:16]}...) is not the one {what} was "
                         f"trained with ({recorded[:16]}...): restore that tokenizer, or "
                         f"point NANOCHAT_BASE_DIR at the directory the model was trained in")

# -----------------------------------------------------------------------------
# Starting and resuming: a fresh run never replaces another's checkpoints; a resumed run makes the
# same steps, bit for bit, as one that was never stopped

def _checked(convert, ok, requirement):
    """An argparse type: convert, then refuse what is not ok naming the requirement."""
    def parse(text):
        if not ok(convert(text)):
            raise argparse.ArgumentTypeError(f"{text}: {requirement}")
        return convert(text)
    return parse

def add_checkpoint_flags(parser):
    """The flags the training scripts share for resuming and not losing work."""
    add = parser.add_argument
    add("--resume", action="store_true",
        help="continue from the newest complete checkpoint of the output directory (or start anew)")
    add("--resume-override", action="store_true",
        help="resume even though LR/schedule flags differ from the checkpoint's, with the new ones")
    add("--overwrite", action="store_true", help="delete this run's output checkpoints and start "
        "from scratch (without it, or --resume, a directory holding checkpoints is an error)")
    add("--save-every", type=int, default=-1, help="save every N steps (-1 = only at the end)")
    minutes = _checked(float, lambda v: v > 0 or v == -1, "use > 0 minutes, or -1 for none")
    # 30 min: a save costs well under 2% of the interval (the table in docs/reliability.md)
    add("--save-every-minutes", type=minutes, default=30, help="also checkpoint every N minutes of "
        "wall time, to resume from after a crash (-1 = never)")
    add("--keep-periodic", default=2, help="keep the newest N of those time-based checkpoints",
        type=_checked(int, lambda v: v >= 1, "keep at least 1 (a crash resumes from the newest)"))

def start_or_resume(checkpoint_dir, resume, overwrite, fresh_start, step=None):
    """
    -> the step to resume from (`step` if given, else with resume the newest complete one), or
    None: the run starts fresh_start. A run without --resume into a directory holding checkpoints
    would silently replace a finished run's model: refuse, naming the way to continue it (--resume)
    and the one way to replace it (--overwrite, which deletes them now).
    """
    resume = resume or step is not None
    if resume and overwrite:
        raise ValueError("--resume continues the checkpoints in the output "
                         "directory and --overwrite deletes them: pass one of them")
    steps = _steps_with_meta(checkpoint_dir)
    if steps and not resume and not overwrite:
        raise FileExistsError(f"{checkpoint_dir} holds the checkpoints of an earlier run (last "
                              f"step {steps[-1]}): add --resume to continue it, or --overwrite to "
                              f"delete them and start from scratch (or use another --model-tag)")
    if steps and overwrite and get_dist_info()[1] == 0:  # rank 0 deletes, and prints
        for name in [n for n in os.listdir(checkpoint_dir) if re.fullmatch(CHECKPOINT_FILE, n)]:
            os.remove(os.path.join(checkpoint_dir, name))
        print0(f"--overwrite: deleted the checkpoints in {checkpoint_dir} (steps {steps})")
    if not resume or step is not None:
        return step
    try:
        return find_last_step(checkpoint_dir)
    except FileNotFoundError:
        print0(f"--resume: no complete checkpoint in {checkpoint_dir}, starting {fresh_start}")

def load_resume(checkpoint_dir, step, device, rank, derived, user_config, flags=(), override=False):
    """
    -> (model_state, optimizer_state, meta) of the step a run resumes from. derived: what must
    match between the checkpoint and the run (model shape, batch, horizon, GPUs...); flags: the
    ones that must too unless --resume-override (check_resume_flags).
    """
    model_state, optimizer_state, meta = load_checkpoint(checkpoint_dir, step, device, True, rank)
    mismatches = [f"{k}: checkpoint {meta.get(k)} vs now {v}"
                  for k, v in derived.items() if meta.get(k) != v]
    if mismatches:
        raise ValueError(f"cannot resume {checkpoint_dir} step {step} with a different "
                         f"configuration: {'; '.join(mismatches)}. Use the original run's flags "
                         f"(its user_config: {json.dumps(meta.get('user_config'))}) "
                         f"or a new --model-tag")
    check_resume_flags(meta["user_config"], user_config, flags, override)
    return model_state, optimizer_state, meta

def check_resume_flags(saved_config, config, flags, override):
    """
    Resuming must continue the same trajectory: a different LR, schedule or seed would make the
    resumed run differ from one that was never stopped. Raises naming the flags, unless override
    (--resume-override) says it is meant; then prints them, and the caller must use the new values
    (not the ones restored with the optimizer state).
    flags: argparse dest names. -> ['--flag: checkpoint X vs now Y', ...] for those that differ.
    """
    changed = [f"--{k.replace('_', '-')}: checkpoint {saved_config.get(k)} vs now {config.get(k)}"
               for k in flags if k in saved_config and saved_config.get(k) != config.get(k)]
    if changed and not override:
        raise ValueError(f"resuming with flags that change the training trajectory: "
                         f"{'; '.join(changed)}. Pass the checkpoint's values, or add "
                         f"--resume-override to continue with the new ones")
    if changed:
        print0("--resume-override: continuing with new values for " + "; ".join(changed))
    return changed

def load_optimizer_state(optimizer, optimizer_state):
    """Restore the momenta, but keep this run's initial_lr per
    group (load_state_dict brings back the saved ones)."""
    initial_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(optimizer_state)
    for group, lr in zip(optimizer.param_groups, initial_lrs):
        group["initial_lr"] = lr

def loop_meta(stream_states, **loop_state):
    """The meta entries a loop resumes from: every rank's data loader states, gathered in rank order
    (rank r's streams follow rank r-1's, as restore_loop slices them), and the loop's own variables
    (inf saved as null: strict JSON)."""
    streams = [s for rank_streams in gather_across_ranks(stream_states) for s in rank_streams]
    return {"dataloader_state_dict": {"streams": streams},
            "loop_state": {k: None if v == float("inf") else v for k, v in loop_state.items()}}

def restore_loop(meta, rank, num_local_streams):
    """-> (this rank's data loader states, the loop variables) saved by loop_meta (null back to
    inf). As many streams as this run's: load_resume checked the batch."""
    streams = meta["dataloader_state_dict"]["streams"]
    loop_state = {k: float("inf") if v is None else v for k, v in meta["loop_state"].items()}
    return streams[rank * num_local_streams:(rank + 1) * num_local_streams], loop_state

# -----------------------------------------------------------------------------
# Saving during training: at the end, every --save-every steps, every --save-every-minutes (the
# newest --keep-periodic kept), and when SIGTERM/SIGINT stops the run after a step

def prune_periodic(checkpoint_dir, keep):
    """
    Delete time-based checkpoints (meta "periodic": true) beyond the newest `keep` (rank 0; call
    after a save). The final checkpoint and --save-every ones are never periodic, so what later
    stages and the report load stays.
    """
    if get_dist_info()[1] != 0 or keep < 1:
        return
    periodic = [s for s in _steps_with_meta(checkpoint_dir)
                if read_meta(_paths(checkpoint_dir, s)[2]).get("periodic")]
    for step in periodic[:-keep]:
        os.remove(_paths(checkpoint_dir, step)[2])  # meta first: the step stops existing first
        for path in glob.glob(os.path.join(checkpoint_dir, f"*_{step:06d}*.pt")):
            os.remove(path)

_stop = {"signum": 0, "time": 0.0}  # the first SIGTERM/SIGINT received, and when

def handle_stop_signals():
    """
    SIGTERM (schedulers, spot reclaims) and SIGINT (Ctrl-C) ask the training loop to stop after this
    step and save (stop_or_save_due reads it). A second signal exits at once (a save publishes its
    meta last, so the newest complete checkpoint is whole), unless it comes within 2 s: a launcher
    in the terminal's process group forwards the Ctrl-C its workers already got.
    """
    def handler(signum, frame):
        name = signal.Signals(signum).name
        if not _stop["signum"]:
            _stop.update(signum=signum, time=time.time())
            print(f"{name}: finishing this step, then saving and exiting "
                  f"(send it again to exit at once)", flush=True)
        elif time.time() - _stop["time"] >= 2:
            print(f"{name} again: exiting now; the newest complete checkpoint is intact",
                  flush=True)
            os._exit(128 + signum)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)

def stop_or_save_due(last_save_time, save_every_minutes):
    """
    Every rank, after each step: -> (stop signal number or 0, whether a periodic save is due), the
    same on every rank (a MAX all_reduce), so all ranks stop and save at the same step even when the
    signal reached one. On the CPU where the group has gloo; a NCCL-only group takes CUDA tensors
    only.
    """
    due = save_every_minutes > 0 and time.time() - last_save_time >= 60 * save_every_minutes
    flags = torch.tensor([_stop["signum"], int(due)], dtype=torch.int64)
    if is_dist():
        if "gloo" not in str(dist.get_backend()):
            flags = flags.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return int(flags[0]), bool(flags[1])

def resume_command(module):
    """The command that continues this run: its own flags, with
    --resume instead of --overwrite/--resume-from-step."""
    argv = sys.argv[1:]
    dropped = {i + 1 for i, arg in enumerate(argv) if arg == "--resume-from-step"}  # its value
    flags = [arg for i, arg in enumerate(argv) if i not in dropped and arg.split("=")[0] not in
             ("--", "--resume", "--overwrite", "--resume-from-step")]
    env = [f"{k}={shlex.quote(os.environ[k])}"
           for k in ("NANOCHAT_BASE_DIR", "NANOCHAT_DATASET") if k in os.environ]
    nproc = os.environ.get("LOCAL_WORLD_SIZE", "?")
    launcher = (["torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", module, "--"]
                if is_dist() else ["python", "-m", module])
    return " ".join(env + [shlex.join(launcher + flags + ["--resume"])])

class TrainingSaves:
    """
    When and how a training loop saves (every rank calls it): the last step and every --save-every
    steps are kept; --save-every-minutes saves are "periodic" (prune_periodic keeps the newest
    --keep-periodic); a SIGTERM/SIGINT makes the loop skip the evaluations due (the resumed run does
    them first), save and exit. A script without add_checkpoint_flags (chat_rl) saves only at
    --save-every steps and the end, and leaves the signals alone.

        saves = TrainingSaves(checkpoint_dir, "scripts.base_train", args, start_step)
        while True:  # ... evaluations unless saves.stopping(last_step)
            if saves.due(step, last_step):
                saves.save(step, model, optimizer, meta)  # exits after a stop's save
            ...  # one step
            saves.poll()
    """
    def __init__(self, checkpoint_dir, module, args, start_step):
        self.dir, self.module, self.args, self.start_step = checkpoint_dir, module, args, start_step
        self.signals = hasattr(args, "save_every_minutes")
        self.signum, self.periodic_due, self.last_save_time = 0, False, time.time()
        if self.signals:
            handle_stop_signals()  # from here on SIGTERM/SIGINT stop after the current step

    def stopping(self, last_step):
        return bool(self.signum) and not last_step

    def due(self, step, last_step):
        self.kept = last_step or (self.args.save_every > 0 and step % self.args.save_every == 0)
        self.stop = self.stopping(last_step)
        return step > self.start_step and (self.kept or self.periodic_due or self.stop)

    def save(self, step, model, optimizer, meta):
        t0, rank = time.time(), get_dist_info()[1]
        save_checkpoint(self.dir, step, model.state_dict(), optimizer.state_dict(),
                        dict(meta, periodic=not self.kept), rank=rank)
        print0(f"saved checkpoint {self.dir} step {step} in {time.time() - t0:.2f}s")
        prune_periodic(self.dir, getattr(self.args, "keep_periodic", 0))
        self.last_save_time = time.time()
        if self.stop:
            # wait for every rank's files: an early exit would make torchrun kill rank 0 while it
            # publishes the meta; then exit 128 + the signal number like a killed process
            if is_dist():
                dist.barrier()
            print0(f"stopped by {signal.Signals(self.signum).name} at step {step}; checkpoint in "
                   f"{self.dir}. Resume with:\n{resume_command(self.module)}")
            sys.exit(128 + self.signum)

    def poll(self):
        """After each step, every rank (a collective): a stop signal, a periodic save due."""
        if self.signals:
            self.signum, self.periodic_due = stop_or_save_due(self.last_save_time,
                                                              self.args.save_every_minutes)
