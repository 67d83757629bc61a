"""
The report card: every stage logs a markdown section, `generate` stitches them into report.md with a
summary (headline metrics per stage, wall time and training FLOPs per stage, the cost: hourly rate x
GPUs x hours) and plots.

    python -m nanochat.report reset      # new run: header with git, hardware, software, code size
    python -m nanochat.report generate   # write <base>/report/report.md + PNGs, copy to ./report.md

Sections live in <base>/report/<slug>.md, one per stage, each written atomically; only rank 0
writes. Metric logs: training scripts append one JSON line per step to
<base>/logs/<stage>_<tag>.jsonl (MetricLog below); the plots are drawn from the logs written since
the last `reset` (needs matplotlib: `pip install -e '.[report]'`). Leaves out: interactive plots
(wandb does those when installed).
"""

import os
import re
import sys
import json
import math
import glob
import pathlib
import warnings
import socket
import datetime
import platform
import subprocess

import torch

from nanochat.common import get_base_dir, get_dist_info, atomic_write_text

# Section order of a full run; a missing section is skipped with a note.
EXPECTED_SECTIONS = ["Tokenizer training", "Tokenizer evaluation", "Base model training",
                     "Base model loss", "Base model evaluation", "Midtraining",
                     "Chat evaluation mid", "Chat SFT", "Chat evaluation sft", "Chat RL",
                     "Chat evaluation rl"]
# Accuracy of random guessing per summary metric: 4-way multiple choice, else 0 (generative tasks;
# CORE and ChatCORE are centered so that 0 is chance). Must agree with scripts/chat_eval.py
# ALL_TASKS (a test holds them together).
CHANCE = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "SynthMC": 0.25}
# Rows of the summary table and the section that holds each (by source column).
SUMMARY_METRICS = ["CORE", "ARC-Challenge", "ARC-Easy", "GSM8K", "HumanEval", "MMLU", "SpellingBee",
                   "ChatCORE", "SynthIdentity", "SynthMath", "SynthSpelling", "SynthMC",
                   "ChatCORE-synthetic"]
EVAL_COLUMNS = {"Base model evaluation": "BASE", "Chat evaluation mid": "MID",
                "Chat evaluation sft": "SFT", "Chat evaluation rl": "RL"}
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
    now = f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}"
    lines = ["# nanochat training report", "", f"Generated: {now}", ""]
    if branch := _run(["git", "rev-parse", "--abbrev-ref", "HEAD"]):
        dirty = "dirty" if _run(["git", "status", "--porcelain"]) else "clean"
        lines += ["## Environment", "", "### Git", f"- Branch: {branch}",
                  f"- Commit: {_run(['git', 'rev-parse', '--short', 'HEAD'])} ({dirty})",
                  f"- Message: {_run(['git', 'log', '-1', '--pretty=%s'])[:80]}", ""]
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    lines += ["### Hardware",
              f"- Platform: {platform.system()} {platform.machine()} ({socket.gethostname()})",
              f"- CPUs: {os.cpu_count()} logical", f"- RAM: {ram / 1024**3:.1f} GB"]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        vram = sum(torch.cuda.get_device_properties(i).total_memory for i in range(len(names)))
        rate = next((r for key, r in HOURLY_RATES if key in names[0].lower()), 2.00)
        lines += [f"- GPUs: {len(names)} x {names[0]}", f"- VRAM: {vram / 1024**3:.1f} GB total",
                  f"- CUDA: {torch.version.cuda}",
                  f"- Hourly rate: ${rate:.2f}/GPU/hour x {len(names)} GPUs"]
    else:
        lines += ["- GPUs: none"]
    lines += ["", "### Software", f"- Python: {sys.version.split()[0]}",
              f"- PyTorch: {torch.__version__}", "", bloat_markdown(), "",
              f"Run started: {now}", "", "---", ""]
    return "\n".join(lines)

def bloat_markdown():
    files = [f for f in _run(["git", "ls-files"]).splitlines()
             if f.endswith((".py", ".md", ".rs", ".html", ".toml", ".sh")) and os.path.isfile(f)]
    texts = [pathlib.Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    chars, lines = sum(map(len, texts)), sum(text.count("\n") for text in texts)
    return "\n".join(["### Bloat", f"- Characters: {chars:,}", f"- Lines: {lines:,}",
                      f"- Files: {len(files)}", f"- Tokens (approx): {chars // 4:,}"])

class Report:
    def __init__(self, report_dir):
        self.report_dir = report_dir
        os.makedirs(report_dir, exist_ok=True)

    def log(self, section, data):
        """One section: strings verbatim, dicts as '- key: value' lines, falsy items skipped."""
        lines = [f"## {section}", f"timestamp: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}", ""]
        for item in filter(None, data):
            lines += [item] if isinstance(item, str) else [f"- {k}: {_format_value(v)}"
                                                           for k, v in item.items()]
        path = os.path.join(self.report_dir, slugify(section) + ".md")
        atomic_write_text(path, "\n".join(lines) + "\n\n")

    def reset(self):
        for name in os.listdir(self.report_dir):
            if name.endswith((".md", ".png")):  # a plot of the last run must not outlive it
                os.remove(os.path.join(self.report_dir, name))
        atomic_write_text(os.path.join(self.report_dir, "header.md"), header_markdown())
        print(f"Report reset: {self.report_dir}")

    def generate(self):
        header_path = pathlib.Path(self.report_dir, "header.md")
        header = header_path.read_text("utf-8") if header_path.exists() else ""
        parts = [header] if header else []
        start = re.search(r"^Run started: (.+)$", header, re.MULTILINE)
        run_start = previous = _parse_time(start.group(1)) if start else None
        metrics = {}  # (metric, column) -> value
        stage_times = []  # (section, wall time since the previous section, seconds)
        for section in EXPECTED_SECTIONS:
            path = pathlib.Path(self.report_dir, slugify(section) + ".md")
            if not path.exists():
                print(f"Report: no section '{section}' yet, skipped")
                continue
            parts.append(text := path.read_text("utf-8"))
            for metric in SUMMARY_METRICS if section in EVAL_COLUMNS else []:
                if m := re.search(rf"^- {re.escape(metric)}: (-?[0-9.]+)$", text, re.MULTILINE):
                    metrics[(metric, EVAL_COLUMNS[section])] = m.group(1)
            if stamp := re.search(r"^timestamp: (.+)$", text, re.MULTILINE):
                when = _parse_time(stamp.group(1))
                if previous is not None:
                    stage_times.append((section, (when - previous).total_seconds()))
                previous = when
        summary = ["## Summary", "", bloat_markdown(), "", "| Metric | BASE | MID | SFT | RL |",
                   "|---|---|---|---|---|"]
        for metric in SUMMARY_METRICS:
            row = [metrics.get((metric, c), "-") for c in ("BASE", "MID", "SFT", "RL")]
            if metric in ALWAYS_SHOWN or row != ["-"] * 4:
                summary.append(f"| {metric} | " + " | ".join(row) + " |")
        logs = {stage: load_metric_logs(stage, run_start) for stage in ("base", "mid", "sft", "rl")}
        summary += [""] + cost_markdown(header, run_start, previous, stage_times, logs)
        summary += ["", "## Plots", ""] + plot_markdown(self.report_dir, logs, metrics)
        report = "\n".join(parts + summary) + "\n"
        out_path = os.path.join(self.report_dir, "report.md")
        atomic_write_text(out_path, report)
        # the copy in the current directory links the PNGs where they are
        link = lambda m: f"]({os.path.join(os.path.abspath(self.report_dir), m.group(1))})"
        atomic_write_text("report.md", re.sub(r"\]\(([a-z_]+\.png)\)", link, report))
        print(f"Report written to {out_path} (copied to ./report.md)")
        return out_path

# -----------------------------------------------------------------------------
# Metric logs: one JSON line per logged step, <base>/logs/<stage>_<tag>.jsonl (what the plots and
# sweeps read)

def metric_log_path(stage, tag):
    return os.path.join(get_base_dir(), "logs", f"{stage}_{tag}.jsonl")

def read_metric_log(path):
    """-> the records of a metric log, in order. Only newline-terminated lines count: text after the
    last newline is a line torn by a crash mid-write, skipped with a warning. A damaged line
    anywhere else raises, naming it."""
    with open(path, encoding="utf-8") as f:
        *lines, torn = f.read().split("\n")
    if torn:
        warnings.warn(f"{path}: ignoring a truncated last line (a crash mid-write): {torn[:80]!r}")
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number} is not a JSON record ({e}): fix or delete that "
                             f"line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path} line {number} has no integer 'step': {line[:80]!r}")
        records.append(record)
    return records

class MetricLog:
    """
    Appends one JSON line per logged step to <base>/logs/<stage>_<tag>.jsonl; only rank 0 writes.
    Each line goes out in one write followed by flush + fsync, so a crash leaves every earlier line
    whole (at worst a torn last line, which read_metric_log skips). A fresh run starts the file
    over; a run resumed at step S keeps the lines before S and logs S onwards again, so each step
    appears once.
    Convention: the record of step S describes the model after S optimizer updates (its val bpb, and
    its loss on the batch that update S+1 then trains on); "flops" is the training compute spent to
    reach it.
    """
    def __init__(self, stage, tag, resume_step=None):
        self.path = metric_log_path(stage, tag)
        self.file = None
        if get_dist_info()[1] != 0:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        resumed = resume_step is not None and os.path.exists(self.path)
        kept = [r for r in read_metric_log(self.path) if r["step"] < resume_step] if resumed else []
        # also drops a torn line
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a", encoding="utf-8")

    def log(self, record):
        assert isinstance(record.get("step"), int), f"a metric record needs an int 'step': {record}"
        if self.file is None:
            return
        # strict JSON (no NaN/Infinity), so jq and pandas read it too: non-finite floats become null
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                  for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None

# -----------------------------------------------------------------------------
# Summary extras and plots (PNGs beside report.md, drawn from the metric logs and the eval sections)

LOG_STAGES = {"Base model training": "base", "Midtraining": "mid", "Chat SFT": "sft",
              "Chat RL": "rl"}
STAGE_COLORS = {"BASE": "tab:blue", "MID": "tab:orange", "SFT": "tab:green", "RL": "tab:red"}

def _parse_time(text):
    return datetime.datetime.strptime(text.strip(), "%Y-%m-%d %H:%M:%S")

def _duration(seconds):
    mins = int(seconds // 60)
    return f"{mins // 60}h{mins % 60}m" if mins >= 60 else f"{mins}m{int(seconds % 60):02d}s"

def load_metric_logs(stage, since=None):
    """{tag: records} of <base>/logs/<stage>_<tag>.jsonl, only the files written since `since`."""
    return {os.path.basename(path)[len(stage) + 1:-len(".jsonl")]: read_metric_log(path)
            for path in sorted(glob.glob(metric_log_path(stage, "*")))
            if since is None or os.path.getmtime(path) >= since.timestamp()}

def _total_flops(records):
    return max((r["flops"] for r in records if r.get("flops") is not None), default=0)

def cost_markdown(header, run_start, run_end, stage_times, logs):
    """Wall time and training FLOPs per stage, the total FLOPs and the cost: rate x GPUs x hours."""
    lines = ["| Stage | Wall time (since the previous section) | Training FLOPs |", "|---|---|---|"]
    for section, seconds in stage_times:
        flops = sum(_total_flops(r) for r in logs.get(LOG_STAGES.get(section), {}).values())
        lines.append(f"| {section} | {_duration(seconds)} | {f'{flops:.3e}' if flops else '-'} |")
    total_flops = sum(_total_flops(r) for stage in logs.values() for r in stage.values())
    total = f"{total_flops:.3e}" if total_flops else "- (no metric logs)"
    lines += ["", f"Total training FLOPs: {total}"]
    if run_start is None or run_end is None:
        return lines + ["Total wall clock time: - (no header or no section: run `python -m "
                        "nanochat.report reset`)"]
    seconds = (run_end - run_start).total_seconds()
    lines.append(f"Total wall clock time: {int(seconds // 3600)}h{int(seconds % 3600 // 60)}m")
    rate = re.search(r"^- Hourly rate: \$([0-9.]+)/GPU/hour x (\d+) GPUs$", header, re.MULTILINE)
    if not rate:
        return lines + ["Estimated cost: - (no GPU in the header's hardware list)"]
    per_gpu, gpus = float(rate.group(1)), int(rate.group(2))
    return lines + [f"Estimated cost: ${per_gpu:.2f}/GPU/hour x {gpus} GPUs x "
                    f"{seconds / 3600:.2f} h = ${per_gpu * gpus * seconds / 3600:,.2f}"]

def get_pyplot():
    """pyplot on the Agg backend (files only, no display), or None without matplotlib."""
    try:  # an optional dependency: the report is complete without its plots
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt

def _series(records, key, x="step"):
    """(x values, values of key) of the records that hold key; against FLOPs from step 1 on (step 0
    spent 0 FLOPs: off a log axis)."""
    points = [(r.get(x), r[key]) for r in records
              if r.get(key) is not None and (x == "step" or r["step"] >= 1)]
    return [p[0] for p in points], [p[1] for p in points]

def _plot_base(plt, logs):
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for i, (tag, records) in enumerate(sorted(logs.items())):
        axes[0, 0].plot(*_series(records, "loss"), color=f"C{i}", alpha=0.25, linewidth=0.8,
                        label=f"{tag} per step")
        for col, x in enumerate(["step", "flops"]):
            axes[0, col].plot(*_series(records, "smooth_loss", x), color=f"C{i}",
                              label=f"{tag} EMA (0.9)")
            axes[1, col].plot(*_series(records, "val_bpb", x), "o-", color=f"C{i}",
                              label=f"{tag} val")
    for row, ylabel in enumerate(["train loss (nats/token)", "val bpb (bits/byte)"]):
        axes[row, 0].set(xlabel="step", ylabel=ylabel)
        axes[row, 1].set(xlabel="training FLOPs (log scale)", ylabel=ylabel, xscale="log")
        axes[row, 1].xaxis.set_minor_formatter(plt.NullFormatter())  # labels on decades only
    fig.suptitle("Base model training: loss and val bpb by step and by compute")
    return fig, axes.flat

def _plot_chat(plt, logs):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for stage, stage_logs in logs.items():
        for tag, records in sorted(stage_logs.items()):
            color = STAGE_COLORS[stage.upper()]
            axes[0].plot(*_series(records, "smooth_loss"), color=color,
                         label=f"{stage} {tag} train (EMA 0.9)")
            axes[1].plot(*_series(records, "val_bpb"), "o-", color=color,
                         label=f"{stage} {tag} val")
    axes[0].set(xlabel="step (of that stage)", ylabel="train loss (nats/supervised token)")
    axes[1].set(xlabel="step (of that stage)", ylabel="val bpb (bits/byte, assistant tokens)")
    fig.suptitle("Mid-training and SFT: loss by step")
    return fig, axes

def _plot_rl(plt, logs):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (tag, records) in enumerate(sorted(logs.items())):
        axes[0].plot(*_series(records, "reward"), color=f"C{i}", label=f"{tag} mean reward")
        for j, key in enumerate(sorted({k for r in records for k in r if k.startswith("pass@")},
                                       key=lambda k: int(k[5:]) if k[5:].isdigit() else 0)):
            axes[1].plot(*_series(records, key), "o-", color=f"C{i + j}", label=f"{tag} {key}")
    axes[0].set(xlabel="step", ylabel="mean reward per sample")
    axes[1].set(xlabel="step", ylabel="pass@k (fraction of problems)")
    fig.suptitle("Reinforcement learning: reward and pass@k by step")
    return fig, axes

def _plot_evals(plt, metrics):
    names = [m for m in SUMMARY_METRICS if any(key[0] == m for key in metrics)]
    columns = [c for c in ("BASE", "MID", "SFT", "RL") if any(key[1] == c for key in metrics)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names) + 2), 4.5))
    width = 0.8 / len(columns)
    for j, column in enumerate(columns):
        xs = [i - 0.4 + width * (j + 0.5) for i, m in enumerate(names) if (m, column) in metrics]
        values = [float(metrics[(m, column)]) for m in names if (m, column) in metrics]
        bars = ax.bar(xs, values, width, color=STAGE_COLORS[column], label=column)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    for i, name in enumerate(names):
        ax.hlines(CHANCE.get(name, 0.0), i - 0.45, i + 0.45, colors="black", linestyles="--",
                  zorder=3, label="chance" if i == 0 else None)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set(ylabel="accuracy (CORE, ChatCORE: centered, 0 = chance)",
           title="Evaluations by stage against chance")
    ax.axhline(0, color="gray", linewidth=0.5)
    return fig, [ax]

def plot_markdown(report_dir, logs, metrics):
    """Draw every plot there is data for into report_dir; -> the markdown lines linking them."""
    plt = get_pyplot()
    if plt is None:
        return ["No plots: matplotlib is not installed. `pip install matplotlib` (or `pip "
                "install -e '.[report]'`), then run `python -m nanochat.report generate` again."]
    chat_logs = {stage: logs[stage] for stage in ("mid", "sft") if logs[stage]}
    plots = [("base_training.png", "Base model training", _plot_base, logs["base"]),
             ("chat_training.png", "Mid-training and SFT", _plot_chat, chat_logs),
             ("rl.png", "Reinforcement learning", _plot_rl, logs["rl"]),
             ("evals.png", "Evaluations by stage", _plot_evals, metrics)]
    lines = []
    for filename, title, draw, data in plots:
        if not data:
            continue
        fig, axes = draw(plt, data)
        for ax in axes:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(report_dir, filename)
        fig.savefig(path + ".tmp", format="png", dpi=100)
        plt.close(fig)
        os.replace(path + ".tmp", path)
        lines += [f"![{title}]({filename})", ""]
    return lines or ["No plots: no metric logs from this run in <base>/logs and no evaluation "
                     "sections yet."]

# -----------------------------------------------------------------------------

class DummyReport:
    def log(self, *args, **kwargs):
        pass
    reset = log

def get_report():
    """Rank 0 gets the real report; other ranks a no-op one."""
    rank = get_dist_info()[1]
    return Report(os.path.join(get_base_dir(), "report")) if rank == 0 else DummyReport()

if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "generate"
    if command not in ("reset", "generate"):
        sys.exit(f"unknown command {command!r}: use `python -m nanochat.report reset|generate`")
    getattr(get_report(), command)()
