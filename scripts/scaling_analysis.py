"""
Scaling analysis of the sweeps run by runs/miniseries.sh and runs/scaling_laws.sh (karpathy/nanochat
did this part in a notebook): IsoFLOP curves, the compute-optimal tokens:params ratio and val bpb
against training compute.

    python -m scripts.scaling_analysis --add-run=TAG --csv=results.csv   # add a finished run's row
    python -m scripts.scaling_analysis --csv=a.csv [b.csv ...] [--out-dir=DIR]

--add-run fills every column from the run's own records (the final checkpoint's meta JSON and its
metric log <base>/logs/base_<tag>.jsonl), never from console text, and replaces the row if the tag
is already there. The analysis writes into --out-dir (default: the first CSV's folder) isoflop.png,
bpb_vs_flops.png and scaling.md.

IsoFLOP fit, per FLOP budget C (runs with --target-flops, at least 3 model sizes): val bpb against
log10 N (N = scaling params, transformer matrices + lm_head) fitted by a parabola; its vertex is the
compute-optimal N*(C). The tokens D*(C) at N* come from the budget's own runs (log D is linear in
log N at fixed C, D = C / FLOPs-per-token), so the optimal ratio is D*/N*. A vertex outside the
sizes that were run, or a curve without a minimum, is reported as such, not extrapolated. With 2+
budgets: N* ~ C^a and D* ~ C^b by a least-squares line in log-log. Leaves out: karpathy/nanochat's
notebook's alternative parameter conventions (total / non-embedding params).
"""

import argparse
import csv
import glob
import math
import os
import statistics

import numpy as np

from nanochat.checkpoint import SOURCE_DIRS, read_meta
from nanochat.common import get_base_dir, atomic_write_text
from nanochat.report import get_pyplot, read_metric_log, metric_log_path

PARAM_GROUPS = ["wte", "value_embeds", "lm_head", "transformer_matrices", "scalars"]
COLUMNS = ["model_tag", "depth", "model_dim", "num_params", "num_scaling_params", *PARAM_GROUPS,
           "flops_per_token", "num_iterations", "total_batch_size", "tokens_trained",
           "param_data_ratio", "target_flops", "total_flops", "val_bpb", "min_val_bpb",
           "core_score", "train_time_sec"]

# -----------------------------------------------------------------------------
# One row per finished run, from its own records

def run_row(tag, checkpoints_dir=None):
    """The CSV row of base run `tag` (under checkpoints_dir, default <base>/base_checkpoints): final
    checkpoint meta + metric log. Raises if the run has not finished."""
    checkpoints_dir = checkpoints_dir or os.path.join(get_base_dir(), SOURCE_DIRS["base"])
    run_dir = os.path.join(checkpoints_dir, tag)
    metas = sorted(glob.glob(os.path.join(run_dir, "meta_*.json")))
    if not metas:
        raise FileNotFoundError(f"no checkpoint meta in {run_dir}: train it (base_train "
                                f"--model-tag={tag}) or point --checkpoints-dir at the folder "
                                f"that holds {tag}/")
    meta = read_meta(metas[-1])
    if meta["step"] != meta["num_iterations"]:
        raise ValueError(f"run {tag} has not finished: newest checkpoint is step {meta['step']} of "
                         f"{meta['num_iterations']}; rerun it with --resume")
    log_path = metric_log_path("base", tag)
    records = read_metric_log(log_path) if os.path.exists(log_path) else []
    core = [r["core_metric"] for r in records if r.get("core_metric") is not None]
    counts = meta["param_counts"]
    tokens = meta["num_iterations"] * meta["total_batch_size"]
    return {"model_tag": tag, "depth": meta["model_config"]["n_layer"],
            "model_dim": meta["model_config"]["n_embd"], "num_params": counts["total"],
            **{k: meta[k] for k in ("num_scaling_params", "flops_per_token", "num_iterations",
                                    "total_batch_size")},
            **{k: counts.get(k, "") for k in PARAM_GROUPS}, "tokens_trained": tokens,
            "param_data_ratio": round(tokens / meta["num_scaling_params"], 4),
            "target_flops": meta["user_config"].get("target_flops", -1),
            "total_flops": meta["flops_per_token"] * tokens, "val_bpb": meta["val_bpb"],
            "min_val_bpb": meta["loop_state"]["min_val_bpb"],
            "core_score": core[-1] if core else "",
            "train_time_sec": round(meta["loop_state"]["total_training_time"], 2)}

def add_run(tag, csv_path, checkpoints_dir=None):
    rows = read_csv(csv_path) if os.path.exists(csv_path) else []
    rows = [r for r in rows if r["model_tag"] != tag]
    rows.append(run_row(tag, checkpoints_dir))
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    lines = [",".join(COLUMNS)]
    lines += [",".join("" if r.get(c) is None else str(r[c]) for c in COLUMNS) for r in rows]
    atomic_write_text(csv_path, "\n".join(lines) + "\n")
    print(f"{csv_path}: {tag} val bpb {rows[-1]['val_bpb']} ({len(rows)} runs)")

def read_csv(csv_path):
    """Rows as dicts of the strings in the file (other rows are rewritten exactly as they were)."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))

def read_rows(csv_path):
    """Rows as dicts; numeric columns as floats (empty = None)."""
    rows = read_csv(csv_path)
    needed = {"model_tag", "num_scaling_params", "tokens_trained", "total_flops", "val_bpb"}
    missing = needed - set(rows[0] if rows else COLUMNS)
    if missing:
        raise ValueError(f"{csv_path} lacks columns {sorted(missing)}: write it with --add-run")
    def number(row, column):
        try:
            return float(row[column]) if row[column] != "" else None
        except ValueError:
            raise ValueError(f"{csv_path}: {row['model_tag']} has {column}={row[column]!r}, not a "
                             f"number: rewrite its row with --add-run={row['model_tag']}") from None
    return [{k: v if k == "model_tag" else number(r, k) for k, v in r.items()} for r in rows]

# -----------------------------------------------------------------------------
# Fits

def budget_runs(rows, budget):
    """The runs of one FLOP budget (-1: the runs without one) that have a val bpb."""
    return [r for r in rows if (r.get("target_flops") or -1) == budget and r["val_bpb"] is not None]

def isoflop_fit(rows):
    """Per budget: {budget: dict(n_opt, d_opt, ratio, bpb_opt, coeffs, inside)} from the parabola
    in log10 N, or dict(reason=...) when there is no minimum to report. Budgets need 3+ sizes with
    a val bpb."""
    fits = {}
    for budget in sorted({r["target_flops"] for r in rows if (r.get("target_flops") or -1) > 0}):
        runs = sorted(budget_runs(rows, budget), key=lambda r: r["num_scaling_params"])
        if len({r["num_scaling_params"] for r in runs}) < 3:
            fits[budget] = {"reason": f"{len(runs)} model sizes; a parabola needs 3"}
            continue
        log_n = np.log10([r["num_scaling_params"] for r in runs])
        a, b, c = np.polyfit(log_n, [r["val_bpb"] for r in runs], 2)
        if a <= 0:
            fits[budget] = {"reason": "val bpb has no minimum over these sizes (fit bends down)",
                            "coeffs": (a, b, c)}
            continue
        x_opt = -b / (2 * a)
        slope, intercept = np.polyfit(log_n, np.log10([r["tokens_trained"] for r in runs]), 1)
        n_opt, d_opt = 10 ** x_opt, 10 ** (slope * x_opt + intercept)
        fits[budget] = {"n_opt": n_opt, "d_opt": d_opt, "ratio": d_opt / n_opt,
                        "bpb_opt": c - b * b / (4 * a), "coeffs": (a, b, c),
                        "inside": bool(log_n[0] <= x_opt <= log_n[-1])}
    return fits

# -----------------------------------------------------------------------------
# Plots and table

def plot(rows, fits, out_dir, plt):
    budgets = sorted(fits)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, budget in enumerate(budgets):
        runs = budget_runs(rows, budget)
        scatter(ax, runs, "num_scaling_params", f"C{i}", f"C = {budget:.3g} FLOPs")
        fit, ns = fits[budget], [r["num_scaling_params"] for r in runs]
        if "coeffs" in fit:
            xs = np.linspace(math.log10(min(ns)) - 0.1, math.log10(max(ns)) + 0.1, 100)
            ax.plot(10 ** xs, np.polyval(fit["coeffs"], xs), f"C{i}--", linewidth=1)
        if "n_opt" in fit:
            where = "" if fit["inside"] else " (outside sweep)"
            ax.plot(fit["n_opt"], fit["bpb_opt"], "*", color=f"C{i}", markersize=14,
                    markeredgecolor="black", label=f"  fitted min: N* = {fit['n_opt']:.3g}{where}")
    paths = [save(fig, ax, os.path.join(out_dir, "isoflop.png"), plt,
                  "scaling parameters N (transformer matrices + lm_head, log scale)",
                  "IsoFLOP curves: val bpb vs model size at fixed compute")] if budgets else []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, group in enumerate(sorted({r.get("target_flops") or -1 for r in rows})):
        label = f"budget {group:.3g}" if group > 0 else "compute-optimal ratio (miniseries)"
        scatter(ax, budget_runs(rows, group), "total_flops", f"C{i}", label)
    minima = sorted((budget, fit["bpb_opt"]) for budget, fit in fits.items() if "bpb_opt" in fit)
    if minima:
        ax.plot(*zip(*minima), "k*--", markersize=10, linewidth=1, label="IsoFLOP minima (fitted)")
    paths.append(save(fig, ax, os.path.join(out_dir, "bpb_vs_flops.png"), plt,
                      "training FLOPs (log scale)", "Val bpb vs training compute"))
    return paths

def scatter(ax, runs, x, color, label):
    """Final val bpb of runs against column x, each point labelled with its depth."""
    ax.scatter([r[x] for r in runs], [r["val_bpb"] for r in runs], color=color, label=label)
    for r in runs:
        ax.annotate(f"d{r['depth']:.0f}", (r[x], r["val_bpb"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")

def save(fig, ax, path, plt, xlabel, title):
    ax.set(xscale="log", xlabel=xlabel, ylabel="final val bpb (bits/byte)", title=title)
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # labels on decades only: no overlapping text
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp", format="png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp", path)
    return path

def markdown(rows, fits, csv_paths):
    lines = [f"# Scaling analysis of {', '.join(csv_paths)}", "",
             "| tag | depth | scaling params | tokens | tokens:params | budget | FLOPs | val bpb "
             "| CORE | train s |", "|---" * 10 + "|"]
    for r in sorted(rows, key=lambda r: (r.get("target_flops") or -1, r["num_scaling_params"])):
        budget = f"{r['target_flops']:.3g}" if (r.get("target_flops") or -1) > 0 else "-"
        core = f"{r['core_score']:.4f}" if r.get("core_score") is not None else "-"
        lines.append(f"| {r['model_tag']} | {r['depth']:.0f} | "
                     f"{r['num_scaling_params']:,.0f} | {r['tokens_trained']:,.0f} "
                     f"| {r['tokens_trained'] / r['num_scaling_params']:.2f} | "
                     f"{budget} | {r['total_flops']:.3e} | {r['val_bpb']:.4f} | "
                     f"{core} | {r.get('train_time_sec') or 0:.0f} |")
    if fits:
        lines += ["", "## IsoFLOP minima (parabola in log10 N)", "",
                  "| budget C | N* (scaling params) | D* (tokens) | D*/N* | val bpb at N* "
                  "| N* inside the sweep |", "|---" * 6 + "|"]
        for budget, fit in sorted(fits.items()):
            if "n_opt" in fit:
                lines.append(f"| {budget:.3g} | {fit['n_opt']:,.0f} | {fit['d_opt']:,.0f} "
                             f"| {fit['ratio']:.2f} | {fit['bpb_opt']:.4f} | "
                             f"{'yes' if fit['inside'] else 'no: extrapolated'} |")
            else:
                lines.append(f"| {budget:.3g} | - | - | - | - | {fit['reason']} |")
        good = {b: f for b, f in fits.items() if "n_opt" in f and f["inside"]}
        if good:
            ratio = statistics.geometric_mean(f["ratio"] for f in good.values())
            lines += ["", f"Optimal tokens:params ratio (geometric mean over {len(good)} budget(s) "
                          f"with a minimum inside the sweep): {ratio:.2f}"]
        if len(good) >= 2:  # N* ~ C^a, D* ~ C^b: least-squares lines in log-log
            log_c = np.log10(list(good))
            a, b = (np.polyfit(log_c, np.log10([f[k] for f in good.values()]), 1)[0]
                    for k in ("n_opt", "d_opt"))
            lines.append(f"Scaling of the optimum: N* ~ C^{a:.3f}, D* ~ C^{b:.3f} "
                         f"(Chinchilla: both ~0.5)")
    return "\n".join(lines) + "\n"

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Sweep results: record a run, or analyse the CSVs")
    parser.add_argument("--csv", nargs="+", required=True,
                        help="results CSV(s) (--add-run: the one to append to)")
    parser.add_argument("--add-run", default=None, help="finished base run to add to --csv")
    parser.add_argument("--out-dir", default=None,
                        help="folder for the PNGs and scaling.md (default: the first CSV's)")
    parser.add_argument("--checkpoints-dir", default=None, help="where --add-run finds <tag>/ "
                        "(default: $NANOCHAT_BASE_DIR/base_checkpoints)")
    args = parser.parse_args()
    if args.add_run:
        assert len(args.csv) == 1, f"--add-run appends to one CSV, got {args.csv}"
        add_run(args.add_run, args.csv[0], args.checkpoints_dir)
    else:
        rows = [r for path in args.csv for r in read_rows(path)]
        if not rows:
            raise SystemExit(f"no runs in {args.csv}: run runs/miniseries.sh or "
                             f"runs/scaling_laws.sh first")
        out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.csv[0]))
        os.makedirs(out_dir, exist_ok=True)
        fits = isoflop_fit(rows)
        table = markdown(rows, fits, args.csv)
        plt = get_pyplot()
        if plt is None:
            table += "\nNo plots: matplotlib is not installed (`pip install -e '.[report]'`).\n"
        else:
            names = [os.path.basename(p) for p in plot(rows, fits, out_dir, plt)]
            table += "\n" + "\n".join(f"![{name}]({name})" for name in names) + "\n"
        atomic_write_text(os.path.join(out_dir, "scaling.md"), table)
        print(table)
        print(f"wrote {out_dir}/scaling.md")
