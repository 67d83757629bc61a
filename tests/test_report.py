"""
The report card: sections are written atomically, the summary picks up each stage's metrics, wall time, FLOPs and
cost (hand-worked), the plots are drawn and linked (and the report says how to get them without matplotlib); the
metric logs keep each step once across a resume and skip a torn last line with a warning.
"""

import os
import sys

import pytest

from nanochat.report import Report, MetricLog, read_metric_log, metric_log_path, CHANCE, SUMMARY_METRICS
from scripts.chat_eval import ALL_TASKS, chance_accuracy

def test_report_sections_and_summary(base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = Report(str(base_dir / "report"))
    report.reset()
    report.log("Base model evaluation", [{"Model": "d4", "CORE": 0.1234}, "", None])
    report.log("Chat evaluation sft", [{"ARC-Easy": 0.31, "ChatCORE": 0.05, "tokens": 123456}])
    out = report.generate()
    text = open(out).read()
    assert text.startswith("# nanochat training report")
    assert "- CORE: 0.1234" in text and "- tokens: 123,456" in text
    assert "| CORE | 0.1234 | - | - | - |" in text
    assert "| ARC-Easy | - | - | 0.3100 | - |" in text
    assert "| ChatCORE | - | - | 0.0500 | - |" in text
    assert "Total wall clock time: 0h0m" in text
    assert open(tmp_path / "report.md").read().replace(f"{base_dir / 'report'}/", "") == text  # links made absolute
    # no temp files left behind
    assert not [f for f in os.listdir(base_dir / "report") if ".tmp" in f]

# -----------------------------------------------------------------------------
# Metric logs

def test_metric_log_resume_keeps_each_step_once(base_dir):
    log = MetricLog("base", "d2")
    for step in range(5):
        log.log({"step": step, "loss": 5.0 - step})
    log.file.write('{"step": 5, "lo')  # the process died mid-line
    log.file.flush()
    log.close()
    with pytest.warns(UserWarning, match="truncated last line"):
        assert [r["step"] for r in read_metric_log(metric_log_path("base", "d2"))] == [0, 1, 2, 3, 4]
    with pytest.warns(UserWarning, match="truncated last line"):
        log = MetricLog("base", "d2", resume_step=3)  # resumed from the step-3 checkpoint: steps 3, 4 come again
    for step in range(3, 6):
        log.log({"step": step, "loss": float("nan") if step == 5 else 1.0})
    log.close()
    text = open(metric_log_path("base", "d2")).read()
    assert text.endswith("\n") and "NaN" not in text  # strict JSON: non-finite numbers become null
    records = read_metric_log(metric_log_path("base", "d2"))
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert [r["loss"] for r in records] == [5.0, 4.0, 3.0, 1.0, 1.0, None]
    MetricLog("base", "d2").close()  # a fresh run (no resume) starts the file over
    assert read_metric_log(metric_log_path("base", "d2")) == []

def test_metric_log_damaged_middle_line_is_an_error(tmp_path):
    path = tmp_path / "sft_d2.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, "loss": \n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not a JSON record"):
        read_metric_log(str(path))

# -----------------------------------------------------------------------------
# Summary extras and plots

def write_run(report_dir):
    """A hand-made run: 8 H100s from 00:00, base training done 01:30, base eval 02:00; metric logs for base and SFT."""
    os.makedirs(report_dir, exist_ok=True)
    sections = {"header": "# nanochat training report\n\n- GPUs: 8 x NVIDIA H100 80GB HBM3\n"
                          "- Hourly rate: $3.00/GPU/hour x 8 GPUs\n\nRun started: 2026-01-01 00:00:00\n",
                "base-model-training": "## Base model training\ntimestamp: 2026-01-01 01:30:00\n\n- Min val bpb: 0.8\n",
                "base-model-evaluation": "## Base model evaluation\ntimestamp: 2026-01-01 02:00:00\n\n- CORE: 0.2000\n",
                "chat-evaluation-sft": "## Chat evaluation sft\ntimestamp: 2026-01-01 02:00:00\n\n- ARC-Easy: 0.4000\n"
                                       "- GSM8K: 0.0500\n- ChatCORE: 0.1000\n"}
    for name, text in sections.items():
        with open(os.path.join(report_dir, name + ".md"), "w") as f:
            f.write(text)
    base = MetricLog("base", "d4")
    for step in range(11):
        base.log({"step": step, "flops": step * 1e14, "loss": 9.0 - 0.5 * step, "smooth_loss": 9.0 - 0.4 * step,
                  **({"val_bpb": 3.0 - 0.2 * step} if step % 5 == 0 else {})})
    base.close()
    sft = MetricLog("sft", "d4")
    for step in range(3):
        sft.log({"step": step, "flops": step * 1e14, "smooth_loss": 2.0 - 0.1 * step, "val_bpb": 1.0})
    sft.close()

def test_summary_has_stage_times_total_flops_and_cost(base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_run(str(base_dir / "report"))
    text = open(Report(str(base_dir / "report")).generate()).read()
    assert "| Base model training | 1h30m | 1.000e+15 |" in text  # 10 steps of 1e14 FLOPs
    assert "| Base model evaluation | 30m00s | - |" in text
    assert "Total training FLOPs: 1.200e+15" in text  # base 1e15 + SFT 2e14
    assert "Total wall clock time: 2h0m" in text
    assert "Estimated cost: $3.00/GPU/hour x 8 GPUs x 2.00 h = $48.00" in text

def test_report_plots_are_drawn_and_linked(base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report_dir = base_dir / "report"
    write_run(str(report_dir))
    text = open(Report(str(report_dir)).generate()).read()
    for name in ("base_training.png", "chat_training.png", "evals.png"):
        assert f"]({name})" in text
        with open(report_dir / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert "rl.png" not in text and not os.path.exists(report_dir / "rl.png")  # no RL log, no RL plot
    # the copy in the current directory points at the PNGs where they are
    assert f"]({report_dir / 'evals.png'})" in open(tmp_path / "report.md").read()
    Report(str(report_dir)).reset()  # a new run starts without the last run's plots
    assert not [f for f in os.listdir(report_dir) if f.endswith(".png")]

def test_report_without_matplotlib_says_how_to_get_plots(base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    write_run(str(base_dir / "report"))
    text = open(Report(str(base_dir / "report")).generate()).read()
    assert "No plots: matplotlib is not installed. `pip install matplotlib`" in text
    assert "| CORE | 0.2000 | - | - | - |" in text  # the rest of the report is all there
    assert not [f for f in os.listdir(base_dir / "report") if f.endswith(".png")]

def test_chance_levels_agree_with_chat_eval():
    for name in SUMMARY_METRICS:
        if name in ALL_TASKS:
            assert CHANCE.get(name, 0.0) == chance_accuracy(name), name
