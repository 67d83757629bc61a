"""
The report card: every stage logs a markdown section, `generate` stitches them into report.md
with a summary table of the headline metrics.

    python -m nanochat.report reset      # start a new run: header with git, hardware, software, code size
    python -m nanochat.report generate   # write <base>/report/report.md and copy it to ./report.md

Sections live in <base>/report/<slug>.md, one per stage, each written atomically; only rank 0 writes.
Leaves out: cost estimates beyond the hourly rate, plots.
"""

import os
import re
import sys
import json
import math
import shutil
import warnings
import socket
import datetime
import platform
import subprocess

import torch

from nanochat.common import get_base_dir, get_dist_info, atomic_write_text

# Section order of a full run; a missing section is skipped with a note.
EXPECTED_SECTIONS = [
    "Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model loss",
    "Base model evaluation", "Midtraining", "Chat evaluation mid", "Chat SFT", "Chat evaluation sft",
    "Chat RL", "Chat evaluation rl",
]
# Rows of the summary table and the section that holds each (by source column).
SUMMARY_METRICS = ["CORE", "ARC-Challenge", "ARC-Easy", "GSM8K", "HumanEval", "MMLU", "SpellingBee", "ChatCORE",
                   "SynthIdentity", "SynthMath", "SynthSpelling", "SynthMC", "ChatCORE-synthetic"]
ALWAYS_SHOWN = ("CORE", "ChatCORE")  # other rows only when some stage measured them
HOURLY_RATES = [("h100", 3.00), ("a100", 1.79), ("v100", 0.55)]  # $/GPU/hour, else 2.00

def slugify(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")

def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""

def _format_value(value):
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)

def header_markdown():
    now = datetime.datetime.now()
    lines = ["# nanochat training report", "", f"Generated: {now:%Y-%m-%d %H:%M:%S}", ""]
    branch = _run(["git", "rev-parse", "--abbrev-ref", "HEAD"])
    if branch:
        dirty = "dirty" if _run(["git", "status", "--porcelain"]) else "clean"
        message = _run(["git", "log", "-1", "--pretty=%s"])[:80]
        lines += ["## Environment", "", "### Git", f"- Branch: {branch}",
                  f"- Commit: {_run(['git', 'rev-parse', '--short', 'HEAD'])} ({dirty})", f"- Message: {message}", ""]
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3 if hasattr(os, "sysconf") else 0
    lines += ["### Hardware", f"- Platform: {platform.system()} {platform.machine()} ({socket.gethostname()})",
              f"- CPUs: {os.cpu_count()} logical", f"- RAM: {ram_gb:.1f} GB"]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        vram = sum(torch.cuda.get_device_properties(i).total_memory for i in range(len(names))) / 1024**3
        rate = next((r for key, r in HOURLY_RATES if key in names[0].lower()), 2.00) * len(names)
        lines += [f"- GPUs: {len(names)} x {names[0]}", f"- VRAM: {vram:.1f} GB total",
                  f"- CUDA: {torch.version.cuda}", f"- Hourly rate: ${rate:.2f}/hour"]
    else:
        lines += ["- GPUs: none"]
    lines += ["", "### Software", f"- Python: {sys.version.split()[0]}", f"- PyTorch: {torch.__version__}", ""]
    lines += [bloat_markdown(), "", f"Run started: {now:%Y-%m-%d %H:%M:%S}", "", "---", ""]
    return "\n".join(lines)

def bloat_markdown():
    files = [f for f in _run(["git", "ls-files"]).splitlines()
             if f.endswith((".py", ".md", ".rs", ".html", ".toml", ".sh")) and os.path.isfile(f)]
    chars = lines = 0
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        chars += len(text)
        lines += text.count("\n")
    return "\n".join(["### Bloat", f"- Characters: {chars:,}", f"- Lines: {lines:,}", f"- Files: {len(files)}",
                      f"- Tokens (approx): {chars // 4:,}"])

class Report:
    def __init__(self, report_dir):
        self.report_dir = report_dir
        os.makedirs(report_dir, exist_ok=True)

    def log(self, section, data):
        """Write one section: strings verbatim, dicts as '- key: value' lines; falsy items skipped."""
        lines = [f"## {section}", f"timestamp: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}", ""]
        for item in data:
            if not item:
                continue
            if isinstance(item, str):
                lines.append(item)
            else:
                lines += [f"- {k}: {_format_value(v)}" for k, v in item.items()]
        path = os.path.join(self.report_dir, slugify(section) + ".md")
        atomic_write_text(path, "\n".join(lines) + "\n\n")
        return path

    def reset(self):
        for name in os.listdir(self.report_dir):
            if name.endswith(".md"):
                os.remove(os.path.join(self.report_dir, name))
        atomic_write_text(os.path.join(self.report_dir, "header.md"), header_markdown())
        print(f"Report reset: {self.report_dir}")

    def generate(self):
        header_path = os.path.join(self.report_dir, "header.md")
        parts = [open(header_path, encoding="utf-8").read()] if os.path.exists(header_path) else []
        metrics = {}  # (metric, column) -> value
        last_time = None
        for section in EXPECTED_SECTIONS:
            path = os.path.join(self.report_dir, slugify(section) + ".md")
            if not os.path.exists(path):
                print(f"Report: no section '{section}' yet, skipped")
                continue
            text = open(path, encoding="utf-8").read()
            parts.append(text)
            column = {"Base model evaluation": "BASE", "Chat evaluation mid": "MID",
                      "Chat evaluation sft": "SFT", "Chat evaluation rl": "RL"}.get(section)
            if column:
                for metric in SUMMARY_METRICS:
                    m = re.search(rf"^- {re.escape(metric)}: (-?[0-9.]+)$", text, re.MULTILINE)
                    if m:
                        metrics[(metric, column)] = m.group(1)
            stamp = re.search(r"^timestamp: (.+)$", text, re.MULTILINE)
            if stamp and section not in ("Chat RL", "Chat evaluation rl"):
                last_time = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")
        summary = ["## Summary", "", bloat_markdown(), "", "| Metric | BASE | MID | SFT | RL |",
                   "|---|---|---|---|---|"]
        for metric in SUMMARY_METRICS:
            row = [metrics.get((metric, c), "-") for c in ("BASE", "MID", "SFT", "RL")]
            if metric not in ALWAYS_SHOWN and row == ["-"] * 4:
                continue
            summary.append(f"| {metric} | " + " | ".join(row) + " |")
        if parts and last_time:
            start = re.search(r"^Run started: (.+)$", parts[0], re.MULTILINE)
            if start:
                minutes = int((last_time - datetime.datetime.strptime(start.group(1), "%Y-%m-%d %H:%M:%S")).total_seconds() // 60)
                summary += ["", f"Total wall clock time: {minutes // 60}h{minutes % 60}m"]
        report = "\n".join(parts + summary) + "\n"
        out_path = os.path.join(self.report_dir, "report.md")
        atomic_write_text(out_path, report)
        shutil.copyfile(out_path, "report.md")
        print(f"Report written to {out_path} (copied to ./report.md)")
        return out_path

# -----------------------------------------------------------------------------
# Metric logs: one JSON line per logged step, <base>/logs/<stage>_<tag>.jsonl (what the plots and sweeps read)

def metric_log_path(stage, tag):
    return os.path.join(get_base_dir(), "logs", f"{stage}_{tag}.jsonl")

def read_metric_log(path):
    """
    -> the records of a metric log, in order. Only newline-terminated lines count: text after the last newline is
    a line torn by a crash mid-write, skipped with a warning. A damaged line anywhere else raises, naming it.
    """
    with open(path, encoding="utf-8") as f:
        *lines, torn = f.read().split("\n")
    if torn:
        warnings.warn(f"{path}: ignoring a truncated last line (the run stopped mid-write): {torn[:80]!r}")
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number} is not a JSON record ({e}): fix or delete that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path} line {number} has no integer 'step': {line[:80]!r}")
        records.append(record)
    return records

class MetricLog:
    """
    Appends one JSON line per logged step to <base>/logs/<stage>_<tag>.jsonl; only rank 0 writes.
    Each line goes out in one write followed by flush + fsync, so a crash leaves every earlier line whole (at worst
    a torn last line, which read_metric_log skips). A fresh run starts the file over; a run resumed at step S keeps
    the lines before S and logs S onwards again, so each step appears once.
    Convention: the record of step S describes the model after S optimizer updates (its val bpb, and its loss on
    the batch that update S+1 then trains on); "flops" is the training compute spent to reach it.
    """
    def __init__(self, stage, tag, resume_step=None):
        self.path = metric_log_path(stage, tag)
        self.file = None
        if get_dist_info()[1] != 0:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            kept = [r for r in read_metric_log(self.path) if r["step"] < resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))  # also drops a torn line
        self.file = open(self.path, "a", encoding="utf-8")

    def log(self, record):
        assert isinstance(record.get("step"), int), f"a metric record needs an integer 'step', got {record}"
        if self.file is None:
            return
        # strict JSON (no NaN/Infinity), so jq and pandas read it too: a non-finite number is written as null
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None

# -----------------------------------------------------------------------------

class DummyReport:
    def log(self, *args, **kwargs):
        pass
    def reset(self, *args, **kwargs):
        pass

def get_report():
    """Rank 0 gets the real report; other ranks a no-op one."""
    if get_dist_info()[1] == 0:
        return Report(os.path.join(get_base_dir(), "report"))
    return DummyReport()

if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "generate"
    if command not in ("reset", "generate"):
        sys.exit(f"unknown command {command!r}: use `python -m nanochat.report reset` or `... generate`")
    getattr(get_report(), command)()
