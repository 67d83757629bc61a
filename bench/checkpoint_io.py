"""
What checksumming costs a checkpoint: time to save and load a state dict of a given size, and the extra time of the
sha256 that save_checkpoint records and load_checkpoint verifies (nanochat/checkpoint.py file_sha256).

    python -m bench.checkpoint_io                  # 256 MiB of fp32 tensors
    python -m bench.checkpoint_io --mib 2048

Prints a table, then the numbers as JSON on the last line. The file is written under $TMPDIR and deleted.
Leaves out: multi-rank saves (each rank hashes its own shard, in parallel with the others).
"""

import argparse
import json
import os
import tempfile
import time

import torch

from nanochat.checkpoint import file_sha256

parser = argparse.ArgumentParser(description="Checkpoint save/load time with and without sha256")
parser.add_argument("--mib", type=int, default=256, help="state dict size in MiB (fp32 tensors of 16 MiB)")
parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per measurement")
args = parser.parse_args()

state = {f"w{i}": torch.randn(4 * 1024 * 1024) for i in range(max(1, args.mib // 16))}  # 16 MiB each
size_mib = sum(t.numel() * t.element_size() for t in state.values()) / 2 ** 20

def best(fn):
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)

with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "model.pt")
    results = {
        "save_s": best(lambda: torch.save(state, path)),
        "sha256_s": best(lambda: file_sha256(path)),
        "load_s": best(lambda: torch.load(path, map_location="cpu", weights_only=True)),
    }
results["size_mib"] = size_mib
results["sha256_mib_per_s"] = size_mib / results["sha256_s"]
results["save_overhead_pct"] = 100 * results["sha256_s"] / results["save_s"]
results["load_overhead_pct"] = 100 * results["sha256_s"] / results["load_s"]

print("size (MiB) | save (s) | load (s) | sha256 (s) |  MiB/s |  +save |  +load")
print(f"{size_mib:>10.0f} | {results['save_s']:>8.3f} | {results['load_s']:>8.3f} | {results['sha256_s']:>10.3f} | "
      f"{results['sha256_mib_per_s']:>6.0f} | {results['save_overhead_pct']:>5.0f}% | "
      f"{results['load_overhead_pct']:>5.0f}%")
print(json.dumps(results))
