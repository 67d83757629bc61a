"""
scripts/scaling_analysis.py on hand-made sweeps with a known answer: val bpb a parabola in log10 N with its minimum at
N0 per budget, tokens D = C / (6 N). The fit must find N0 (and D*/N* = C / (6 N0^2)) within 1 %, the exponent of
N* ~ C^a, and say so plainly when the minimum lies outside the sizes that were run.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from scripts.scaling_analysis import COLUMNS, read_rows, isoflop_fit, markdown, plot
from nanochat.report import get_pyplot

def write_sweep(path, optima, log_sizes=(7.0, 7.5, 8.0, 8.5, 9.0)):
    """optima {budget: log10 N0}; one row per (budget, size)."""
    lines = [",".join(COLUMNS)]
    for budget, log_n0 in optima.items():
        for depth, log_n in enumerate(log_sizes, start=4):
            n = 10 ** log_n
            row = {"model_tag": f"s_{budget:g}_d{depth}", "depth": depth, "num_scaling_params": n,
                   "tokens_trained": budget / (6 * n), "target_flops": budget, "total_flops": budget,
                   "val_bpb": 0.8 + 0.05 * (log_n - log_n0) ** 2}
            lines.append(",".join(str(row.get(c, "")) for c in COLUMNS))
    path.write_text("\n".join(lines) + "\n")
    return str(path)

def test_isoflop_fit_recovers_the_known_minimum(tmp_path):
    rows = read_rows(write_sweep(tmp_path / "results.csv", {1e18: 8.2, 1e19: 8.7}))
    fits = isoflop_fit(rows)
    for budget, log_n0 in ((1e18, 8.2), (1e19, 8.7)):
        n0 = 10 ** log_n0
        assert fits[budget]["n_opt"] == pytest.approx(n0, rel=0.01)
        assert fits[budget]["ratio"] == pytest.approx(budget / (6 * n0 ** 2), rel=0.01)
        assert fits[budget]["bpb_opt"] == pytest.approx(0.8, rel=0.01) and fits[budget]["inside"]
    text = markdown(rows, fits, ["results.csv"])
    assert "N* ~ C^0.500" in text  # the optimum moved by half a decade per decade of compute
    ratio = math.sqrt(1e18 / (6 * 10 ** 16.4) * 1e19 / (6 * 10 ** 17.4))  # geometric mean of the two D*/N*
    assert f"geometric mean over 2 budget(s) with a minimum inside the sweep): {ratio:.2f}" in text

def test_minimum_outside_the_sweep_or_missing_is_reported_not_hidden(tmp_path):
    rows = read_rows(write_sweep(tmp_path / "results.csv", {1e18: 9.6}))  # still falling at the largest size
    fits = isoflop_fit(rows)
    assert not fits[1e18]["inside"] and "no: extrapolated" in markdown(rows, fits, ["results.csv"])
    rows = read_rows(write_sweep(tmp_path / "two.csv", {1e18: 8.0}, log_sizes=(7.0, 8.0)))
    assert "a parabola needs 3" in isoflop_fit(rows)[1e18]["reason"]

def test_plots_are_written(tmp_path):
    rows = read_rows(write_sweep(tmp_path / "results.csv", {1e18: 8.2, 1e19: 8.7}))
    paths = plot(rows, isoflop_fit(rows), str(tmp_path), get_pyplot())
    assert [os.path.basename(p) for p in paths] == ["isoflop.png", "bpb_vs_flops.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

def test_add_run_reads_a_finished_run_from_any_checkpoints_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))  # no metric log there: core_score stays empty
    meta = {"step": 5, "num_iterations": 5, "total_batch_size": 1000, "num_scaling_params": 2000,
            "flops_per_token": 12000, "val_bpb": 1.5, "model_config": {"n_layer": 2, "n_embd": 128},
            "param_counts": {"total": 3000, "wte": 500}, "user_config": {"target_flops": 6e7},
            "loop_state": {"min_val_bpb": 1.4, "total_training_time": 9.5}}
    (tmp_path / "elsewhere" / "d2").mkdir(parents=True)
    (tmp_path / "elsewhere" / "d2" / "meta_000005.json").write_text(json.dumps(meta))
    csv_path = tmp_path / "results.csv"
    cmd = [sys.executable, "-m", "scripts.scaling_analysis", "--add-run=d2", f"--csv={csv_path}"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    missing = subprocess.run(cmd, capture_output=True, text=True, cwd=repo)
    assert missing.returncode != 0 and "--checkpoints-dir" in missing.stderr
    subprocess.run(cmd + [f"--checkpoints-dir={tmp_path / 'elsewhere'}"], check=True, cwd=repo)
    [row] = read_rows(str(csv_path))
    assert (row["model_tag"], row["tokens_trained"], row["param_data_ratio"], row["min_val_bpb"]) == ("d2", 5000, 2.5, 1.4)
