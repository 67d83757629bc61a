"""
Common utilities shared by every stage: the artifact root, device and dtype selection,
torchrun-aware distributed init, rank-0 printing, a no-op wandb stand-in, peak FLOPs and
an atomic HTTP download with retries.

Nothing here reads command-line flags; scripts pass what they parsed.
"""

import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import http.client
import urllib.error
from urllib.request import urlopen

import torch
import torch.distributed as dist
from filelock import FileLock

# -----------------------------------------------------------------------------
# Artifact root: data, tokenizer, checkpoints and reports live here, never in the repo.

def get_base_dir():
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.expanduser("~/.cache/nanochat")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir

# -----------------------------------------------------------------------------
# Distributed info (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE)

def get_dist_info():
    """Returns (ddp, rank, local_rank, world_size) from torchrun's environment."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return (True, *(int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")))
    return False, 0, 0, 1

def is_master():
    return get_dist_info()[1] == 0

def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)

# -----------------------------------------------------------------------------
# Device and compute dtype

def autodetect_device_type():
    return ("cuda" if torch.cuda.is_available() else
            "mps" if torch.backends.mps.is_available() else "cpu")

def _detect_compute_dtype():
    """Choose the activation dtype once, at import, and say why (the slow path is loud)."""
    env = os.environ.get("NANOCHAT_DTYPE")
    if env:
        # fp16's 5 exponent bits underflow small gradients unless a GradScaler scales the loss
        if env == "float16":
            raise ValueError("NANOCHAT_DTYPE=float16 is not supported: nothing scales the loss, so "
                             "fp16 gradients would underflow; use NANOCHAT_DTYPE=bfloat16 (CUDA "
                             "SM80+) or NANOCHAT_DTYPE=float32")
        choices = {"bfloat16": torch.bfloat16, "float32": torch.float32}
        if env not in choices:
            raise ValueError(f"NANOCHAT_DTYPE={env!r} is not one of {sorted(choices)}; unset it or "
                             f"pick one of those")
        return choices[env], f"set by NANOCHAT_DTYPE={env}"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if major >= 8:
            return torch.bfloat16, f"CUDA SM{major}{minor} supports bf16"
        return torch.float32, f"CUDA SM{major}{minor} < SM80 has no fast bf16"
    if torch.backends.mps.is_available():
        return torch.float32, "MPS computes in fp32 (bf16 not measured there)"
    # bf16 activations, fp32 master weights, as on GPU; speed and loss: docs/perf.md
    if feature := cpu_bf16_feature():
        return torch.bfloat16, (f"CPU has {feature}: bf16 trains 1.5-1.8x faster than fp32 "
                                "(docs/perf.md); NANOCHAT_DTYPE=float32 for fp32")
    return torch.float32, "CPU lacks AVX512-BF16/AMX: bf16 would be converted in software"

def cpu_bf16_feature():
    """'AMX' or 'AVX512-BF16' where the CPU multiplies bf16 natively (Sapphire Rapids+; Zen 4+,
    Cooper Lake+) and oneDNN uses it, else None."""
    return ("AMX" if torch.cpu._is_amx_tile_supported() else
            "AVX512-BF16" if torch.cpu._is_avx512_bf16_supported() else None)

COMPUTE_DTYPE, COMPUTE_DTYPE_REASON = _detect_compute_dtype()

# -----------------------------------------------------------------------------
# torch.compile: one decision for every training script (base, mid, SFT, RL)

_OPENMP_PROBE = '#include <omp.h>\nextern "C" int probe(void) { return omp_get_max_threads(); }\n'

def _cpu_compile_problem():
    """
    None when inductor can build CPU kernels here, else why not. Inductor compiles each CPU kernel
    into an OpenMP shared library with $CXX, else g++ (clang++ on macOS), so build a one-line one
    the same way (~0.1 s of CPU), its source read from stdin.
    """
    cxx = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler {cxx!r} on PATH for inductor (install g++ or set CXX)"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = subprocess.run([cxx, "-x", "c++", "-shared", "-fPIC", "-fopenmp", "-", "-o",
                                     f"{tmp}/probe.so"], input=_OPENMP_PROBE, capture_output=True,
                                    text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"the C++ compiler {cxx!r} did not run ({e})"
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        return f"the C++ compiler {cxx!r} cannot build an OpenMP library ({lines[0][:200]})"
    return None

def decide_compile(flag, device_type):
    """
    Whether a training script runs its model through torch.compile, and why, as (bool, one-line
    reason).
    flag: 1 on, 0 off, -1 auto. Auto is the env var NANOCHAT_COMPILE (0/1) when set, else on for
    CUDA and for CPU with a working C++ compiler, off for MPS. On CPU it pays mostly in memory and
    some speed (docs/perf.md "Compiling CPU training, and its memory"); the first step carries the
    compile time (~1 minute on 2 cores, cold cache).
    --compile=1 where the probe fails raises, naming the fix.
    """
    if flag not in (-1, 0, 1):
        raise ValueError(f"--compile={flag}: use 1 (on), 0 (off) or -1 (auto)")
    source, env = f"--compile={flag}", os.environ.get("NANOCHAT_COMPILE")
    if flag == -1 and env is not None:
        if env not in ("0", "1"):
            raise ValueError(f"NANOCHAT_COMPILE={env!r}: use 0 or 1, or unset it for auto")
        flag, source = int(env), f"NANOCHAT_COMPILE={env}"
    if flag == 0:
        return False, f"off: {source}"
    if device_type == "cpu" and (problem := _cpu_compile_problem()) is not None:
        if flag == 1:
            raise RuntimeError(f"{source} on CPU, but {problem}: fix that or pass --compile=0")
        return False, (f"off: {problem}; training uncompiled (slower, more memory), "
                       f"--compile=0 silences this")
    if flag == 1:
        return True, f"on: {source}"
    if device_type == "mps":
        return False, "off: MPS (inductor's Metal backend is partial); --compile=1 tries it"
    return True, "on: CUDA" if device_type == "cuda" else "on: CPU with a C++ compiler for inductor"

def compile_for_training(model):
    """
    torch.compile for a training loop (one shape per step: dynamic=False), keeping every activation
    backward needs (torch's default activation_memory_budget of 1.0): recomputing half of them on
    CPU saved little memory for more CPU time per step (docs/perf.md "Pretraining step").
    """
    return torch.compile(model, dynamic=False)

def process_group_backend(device_type):
    """
    The torch.distributed backend string for a run on `device_type`, one backend per tensor device.
    On CUDA, NCCL carries CUDA tensors (gradients, losses) and gloo the CPU ones: NCCL refuses CPU
    tensors, and a small counter built on the host and all-reduced (an epoch fraction, a score
    tally) would otherwise abort a multi-GPU run at that line. Object collectives
    (all_gather_object) pick the CPU backend when one is listed, so they pickle through gloo too.
    Elsewhere gloo alone, spelled the same per-device way so the 2-rank CPU tests parse the form
    CUDA runs use.
    """
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "cpu:gloo"

def compute_init(device_type=""):
    """
    Set up the device, seeds and (under torchrun) the process group. Returns (ddp, rank, local_rank,
    world_size, device). The group's backends come from process_group_backend; one process is the
    degenerate case (no group at all).
    """
    device_type = device_type or autodetect_device_type()
    assert device_type in ("cuda", "mps", "cpu"), f"device {device_type!r}: use cuda, mps or cpu"
    # autodetect names the one accelerator torch sees (a machine has CUDA or MPS, not both)
    if device_type not in ("cpu", autodetect_device_type()):
        raise RuntimeError(f"--device-type={device_type} was requested but torch sees no "
                           f"{device_type.upper()} device; use --device-type=cpu")

    torch.manual_seed(42)  # seeds every device, CUDA included
    if device_type == "cpu":
        # inductor's CPU embedding backward adds rows with atomics across threads, so one command
        # run twice gave two models; deterministic mode sorts instead, at no measured cost
        # (docs/perf.md, "Pretraining step"). The NaN fill of every torch.empty is not needed.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    cuda = device_type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    ddp, rank, local_rank, world_size = get_dist_info()
    device = torch.device("cuda", local_rank) if cuda else torch.device(device_type)
    if ddp:
        if cuda:  # before the group: NCCL initializes eagerly on the bound device_id
            torch.cuda.set_device(device)
        dist.init_process_group(backend=process_group_backend(device_type),
                                device_id=device if cuda else None)
        dist.barrier()  # on CUDA: on the bound device, so through NCCL
    print0(f"device: {device} | world size: {world_size} | compute dtype: {COMPUTE_DTYPE} "
           f"({COMPUTE_DTYPE_REASON})")
    return ddp, rank, local_rank, world_size, device

def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        # Wait for every rank first: a rank that tears down gloo while a peer is still writing its
        # checkpoint sees the peer's connection close, and gloo's background thread aborts the
        # process ("terminate called ...", seen in CI).
        dist.barrier()
        dist.destroy_process_group()

def synchronize(device):
    """Wait for the device's queued work, so wall-clock timings measure it (CUDA runs
    asynchronously; else a no-op)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)

def is_dist():
    """True when a multi-rank process group is up (collectives are needed)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

def rank_and_world():  # from the process group: callers may set one up without torchrun
    return (dist.get_rank(), dist.get_world_size()) if is_dist() else (0, 1)

def gather_across_ranks(obj):
    """[rank 0's obj, rank 1's, ...]: one all_gather_object, or [obj] in one process."""
    if not is_dist():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered

def reduce_across_ranks(tensor, op="SUM"):
    """All-reduce in place with dist.ReduceOp.<op> (a no-op in one process) -> the tensor."""
    if is_dist():  # ReduceOp looked up only here: torch built without distributed lacks it
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor

# -----------------------------------------------------------------------------
# wandb: only when installed and the run is not "dummy"

class DummyWandb:
    """Same log/finish interface as a wandb run, does nothing."""
    def log(self, *args, **kwargs):
        pass
    finish = log

def init_wandb(project, run, config, master):
    if run == "dummy" or not master:
        return DummyWandb()
    try:
        import wandb
    except ImportError:
        print0(f"wandb is not installed, so --run={run} is not logged; `pip install wandb` or use "
               f"--run=dummy")
        return DummyWandb()
    return wandb.init(project=project, name=run, config=config)

# -----------------------------------------------------------------------------
# Peak dense bf16 FLOP/s by device name (most specific first); unknown -> inf so MFU reads 0.

_PEAK_FLOPS = [
    ("gb200", 2.5e15), ("grace blackwell", 2.5e15), ("b200", 2.25e15), ("b100", 1.8e15),
    ("h200 nvl", 836e12), ("h200 pcie", 836e12), ("h200", 989e12), ("h100 nvl", 835e12),
    ("h100 pcie", 756e12), ("h100", 989e12), ("h800 nvl", 989e12), ("h800", 756e12),
    ("a100", 312e12), ("a800", 312e12), ("a40", 149.7e12), ("a30", 165e12), ("l40s", 362e12),
    ("l4", 121e12), ("mi355", 2.5e15), ("mi325", 1.3074e15), ("mi300x", 1.3074e15),
    ("mi300a", 980.6e12), ("mi250x", 383e12), ("mi250", 362.1e12),
    ("5090", 209.5e12), ("4090", 165.2e12), ("3090", 71e12)]

def get_peak_flops(device):
    """Peak dense bf16 FLOP/s of one device; float('inf') when unknown (CPU, MPS, unlisted GPUs)."""
    if torch.device(device).type != "cuda":
        return float("inf")
    name = torch.cuda.get_device_name(device).lower()
    return next((flops for key, flops in _PEAK_FLOPS if key in name), float("inf"))

# -----------------------------------------------------------------------------
# Downloads: stream to a temp file, rename on success; retry with exponential backoff.

def download_url(url, path, attempts=5, timeout=30, backoff=2.0, chunk_size=1 << 20, verify=None):
    """
    Download url to path atomically. Returns True on success, False after `attempts` failures. A
    partial file never appears at `path`: bytes go to `path.tmp` and are renamed at the end, after
    the size matches Content-Length and verify(tmp_path) (optional; raises ValueError or OSError on
    a bad file) accepts it. Waits backoff**attempt seconds between tries (2, 4, 8, 16 by default).
    With NANOCHAT_OFFLINE=1 nothing is fetched (returns False at once): the offline demo sets it.
    """
    if os.path.exists(path):
        return True
    if os.environ.get("NANOCHAT_OFFLINE") == "1":
        print(f"NANOCHAT_OFFLINE=1: not downloading {url}", flush=True)
        return False
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for attempt in range(1, attempts + 1):
        try:
            with atomic_path(path) as tmp_path:
                with urlopen(url, timeout=timeout) as response, open(tmp_path, "wb") as f:
                    shutil.copyfileobj(response, f, chunk_size)
                    written, expected = f.tell(), response.headers.get("Content-Length")
                if expected is not None and written != int(expected):
                    raise IOError(f"got {written} of {expected} bytes")
                if verify is not None:
                    verify(tmp_path)
            return True
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            print(f"download of {url} failed (attempt {attempt}/{attempts}): {e}", flush=True)
            if attempt < attempts:
                time.sleep(backoff ** attempt)
    return False

def download_file_with_lock(url, path, postprocess=None):
    """One process downloads (others wait on a file lock); optional postprocess(path) runs once."""
    if os.path.exists(path):
        return path
    with FileLock(path + ".lock"):
        if not os.path.exists(path):
            if not download_url(url, path):
                raise RuntimeError(f"could not download {url} to {path}; check the network, or "
                                   f"place the file there by hand")
            if postprocess is not None:
                postprocess(path)
    return path

def check_flags(rules):
    """
    rules: (flag, value, ok, requirement) tuples. The first value that is not ok ends the program
    with one line naming the flag, the value and what it must be, instead of a traceback later or a
    silent reinterpretation (-5 as "auto").
    """
    for flag, value, ok, requirement in rules:
        if not ok:
            raise SystemExit(f"error: {flag}={value} is invalid: it must be {requirement}")

def grad_accum_steps_for(total_batch_size, device_batch_size, seq_len, world_size):
    """Forward/backward passes per optimizer step: the total batch must split into whole rows x
    seq_len x GPUs."""
    per_pass = device_batch_size * seq_len * world_size
    if total_batch_size % per_pass != 0:
        raise ValueError(f"total batch {total_batch_size:,} tokens is not divisible by "
                         f"device_batch_size x seq_len x GPUs = {device_batch_size} x {seq_len} x "
                         f"{world_size} = {per_pass:,}: pick --total-batch-size as a multiple of "
                         f"{per_pass:,} or change --device-batch-size")
    return total_batch_size // per_pass

def collect_garbage(step, start_step, every=5000):
    """After each step. Python's GC walks every live object (~500 ms at scale): after the first step
    freeze what exists and turn automatic collection off; collect every `every` steps (evals and
    loaders make garbage)."""
    if step == start_step + 1:
        gc.collect()
        gc.freeze()
        gc.disable()
    elif step % every == 0:
        gc.collect()

@contextlib.contextmanager
def atomic_path(path):
    """A temp path beside `path` (<path>.tmp<pid>) for the block to write: renamed to `path` when
    the block succeeds, removed when it fails, so a crash never leaves half a file at `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)

def atomic_write_text(path, text):
    """Write a text file via a temp file and rename (atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
