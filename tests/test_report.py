"""The report card: sections are written atomically and the summary table picks up each stage's metrics."""

import os

import pytest

from nanochat.report import Report, MetricLog, read_metric_log, metric_log_path

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
    assert open(tmp_path / "report.md").read() == text
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
