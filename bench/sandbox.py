"""
Time one execute_code call (nanochat/execution.py) with and without bubblewrap isolation: HumanEval and RL run
thousands of these, so the isolation's cost per call is what matters.

Launch: python -m bench.sandbox --calls 20
Prints a table (one row per program and mode: median and 90th-percentile ms per call, calls/s with --workers
threads) and a JSON line last. Rows: "python floor" is the bare `python -I -c pass` start the sandbox pays in any
mode; "no isolation" is the fallback without bwrap (the sandbox as it was before isolation); "isolated" adds the
namespaces. Leaves out: the one-time probe of bwrap (printed once, above the table).
"""

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from nanochat import execution

parser = argparse.ArgumentParser(description="time execute_code per call, isolated vs not")
parser.add_argument("--calls", type=int, default=20, help="timed calls per row (median and p90 reported)")
parser.add_argument("--workers", type=int, default=2, help="threads for calls/s (parallel HumanEval grading)")
args = parser.parse_args()
assert args.calls >= 2 and args.workers >= 1, f"--calls >= 2 and --workers >= 1, got {args.calls}, {args.workers}"

PROGRAMS = {
    "print": "print(1 + 1)\n",
    # the shape of a HumanEval program: a solution, the dataset's check(), a call
    "humaneval-like": (
        "from typing import List\n\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n\n"
        "def check(candidate):\n"
        "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3)\n"
        "    assert not candidate([1.0, 2.0, 3.0], 0.5)\n\n"
        "check(has_close_elements)\n"),
}

# -----------------------------------------------------------------------------

t0 = time.perf_counter()
bwrap, problem = execution._probe_isolation()
print(f"bwrap: {bwrap or 'unusable: ' + problem} (probe {1e3 * (time.perf_counter() - t0):.0f} ms, once per process)")

def run(code, path):
    execution._isolation = lambda: path
    result = execution.execute_code(code)
    assert result.success, result

execution._banner_shown = True  # the "no isolation" rows are meant: no banner
calls = {("python -I -c pass", "python floor"): lambda: subprocess.run([sys.executable, "-I", "-c", "pass"])}
for mode, path in [("no isolation", None)] + ([("isolated", bwrap)] if bwrap else []):
    for name, code in PROGRAMS.items():
        calls[(name, mode)] = lambda code=code, path=path: run(code, path)

# Rows take turns call by call, so a shared machine's changing load weighs on all of them alike.
times = {row: [] for row in calls}
for _ in range(args.calls):
    for row, fn in calls.items():
        t = time.perf_counter()
        fn()
        times[row].append(1e3 * (time.perf_counter() - t))
rows = []
with ThreadPoolExecutor(args.workers) as pool:
    for (name, mode), fn in calls.items():
        t = time.perf_counter()
        list(pool.map(lambda _: fn(), range(args.calls)))
        rate = args.calls / (time.perf_counter() - t)
        ordered = sorted(times[(name, mode)])
        rows.append((name, mode, ordered[len(ordered) // 2], ordered[int(0.9 * (len(ordered) - 1))], rate))

print(f"{'program':<18} {'mode':<13} {'median ms':>10} {'p90 ms':>8} {f'calls/s x{args.workers}':>12}")
for name, mode, median, p90, rate in rows:
    print(f"{name:<18} {mode:<13} {median:>10.1f} {p90:>8.1f} {rate:>12.2f}")
print(json.dumps({"bwrap": bwrap, "calls": args.calls, "workers": args.workers,
                  "rows": [{"program": n, "mode": m, "median_ms": round(a, 1), "p90_ms": round(b, 1),
                            "calls_per_s": round(r, 2)} for n, m, a, b, r in rows]}))
