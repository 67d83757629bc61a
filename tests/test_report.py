"""The report card: sections are written atomically and the summary table picks up each stage's metrics."""

import os

from nanochat.report import Report

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
