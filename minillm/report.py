"""Training reports: every run's metrics.jsonl as PNG line charts and a Markdown page, and bar charts with error bars.

    python -m minillm.report runs/demo/pretrain runs/demo/sft runs/demo/orpo [--out DIR]

For each run: training and validation loss, validation loss per language (pretraining), learning rate and
tokens/s against the step (ORPO runs also get their reward accuracy); with several runs, one more chart
overlays their training losses. The page (DIR/report.md; default RUN_DIR/report for one run, else
report/ in the runs' common directory) starts with a table of every run's final numbers and links the
charts. Plots need matplotlib (`pip install 'minillm[report]'`); without it the page is the table alone
and says how to get the plots. scripts/reproduce.py draws its bar charts with `bar_chart`.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from minillm.files import atomic_write, read_json_objects
from minillm.options import cli, parse_options

INSTALL_HINT = "Plots need matplotlib: `pip install 'minillm[report]'`."


def plots_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------- charts

def line_chart(path, title: str, series: dict, ylabel: str, xlabel: str = "step") -> bool:
    """One PNG: each entry of `series` ({label: (xs, ys)}) a line (a series of one point, a marker).
    Returns False (and draws nothing) without matplotlib or without data."""
    series = {k: v for k, v in series.items() if v[0]}
    if not plots_available() or not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label, marker="o" if len(xs) <= 30 else None, markersize=3)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def panel_chart(path, title: str, panels: dict[str, dict], ylabel: str, xlabel: str = "step") -> bool:
    """One PNG with a panel per entry of `panels` ({panel title: {label: (xs, ys)}}), each its own linear y-axis
    (quantities of different definitions never share one). Returns False without matplotlib or data."""
    panels = {t: {k: v for k, v in series.items() if v[0]} for t, series in panels.items()}
    panels = {t: series for t, series in panels.items() if series}
    if not plots_available() or not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1, 4), squeeze=False)
    colours = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(k for s in panels.values() for k in s))}
    for ax, (panel_title, series) in zip(axes.flat, panels.items()):
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, label=label, color=colours[label], marker="o" if len(xs) <= 30 else None, markersize=3)
        ax.set(title=panel_title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def loss_kind(records: list[dict]) -> str:
    """What a run's "loss" is, by the keys its stage writes: runs of different kinds are not comparable."""
    keys = set().union(*records) if records else set()
    if "or_loss" in keys:
        return "ORPO: NLL + lambda L_OR"
    if any(k.startswith("rewards/") for k in keys):
        return "DPO / IPO / KTO loss"
    if "stage" in keys or "response_tokens" in keys:
        return "SFT: NLL per response token"
    return "pretraining: NLL per token"


def bar_chart(path, title: str, panels: list[tuple[str, list[str], list[float], list[float]]]) -> bool:
    """One PNG with a panel per (panel title, bar labels, means, error-bar half-lengths): bars with error
    bars, e.g. the mean and standard deviation over seeds of each variant. NaN means are left out.
    Returns False without matplotlib."""
    if not plots_available() or not panels:
        return False
    plt = _pyplot()
    cols = min(len(panels), 2)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    for ax, (panel_title, labels, means, errors) in zip(axes.flat, panels):
        xs = range(len(labels))
        heights = [0.0 if math.isnan(m) else m for m in means]
        errs = [0.0 if math.isnan(e) else e for e in errors]
        ax.bar(xs, heights, yerr=errs, capsize=5, color=[f"C{i}" for i in xs], alpha=0.85)
        for x, m, e in zip(xs, means, errs):
            if not math.isnan(m):  # the value above its error bar, where the cap does not cover it
                ax.annotate(f"{m:.3g}", (x, m + e if m >= 0 else m - e), textcoords="offset points",
                            xytext=(0, 3 if m >= 0 else -11), ha="center", fontsize=8)
        ax.margins(y=0.12)
        ax.set_xticks(list(xs), labels, rotation=15 if max(map(len, labels)) > 12 else 0, fontsize=8)
        ax.set_title(panel_title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- one run

def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl (not the directory of a training run)")
    return [record for _, record in read_json_objects(path)]


def series(records: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the records that carry a finite number under `key`."""
    pairs = [(r["step"], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and "step" in r]
    return [s for s, _ in pairs], [v for _, v in pairs]


def language_keys(records: list[dict]) -> list[str]:
    """val_loss_et, val_loss_en, ...: the per-language (per-source) validation losses a run logged."""
    return sorted({k for r in records for k in r if k.startswith("val_loss_")})


def run_charts(label: str, records: list[dict], out_dir: Path) -> list[tuple[str, str]]:
    """The run's PNGs in out_dir as (title, file name); none without matplotlib."""
    slug = re.sub(r"[^\w.-]", "_", label)
    charts = [
        ("loss", f"{label}: training and validation loss", {"training": series(records, "loss"),
                                                            "validation": series(records, "val_loss")}, "loss (nats/token)"),
        ("val_loss_by_language", f"{label}: validation loss per language",
         {k.removeprefix("val_loss_"): series(records, k) for k in language_keys(records)}, "loss (nats/token)"),
        ("lr", f"{label}: learning rate", {"lr": series(records, "lr")}, "learning rate"),
        ("tokens_per_s", f"{label}: throughput", {"tokens/s": series(records, "tokens_per_s")}, "tokens/s"),
        ("reward_accuracy", f"{label}: ORPO reward accuracy", {"training": series(records, "reward_accuracy"),
                                                              "validation": series(records, "val_reward_accuracy")},
         "share of pairs"),
    ]
    out = []
    for name, title, data, ylabel in charts:
        file = f"{slug}_{name}.png"
        if line_chart(out_dir / file, title, data, ylabel):
            out.append((title, file))
    return out


def run_summary(records: list[dict]) -> dict:
    """The numbers a run ends with: steps, last training loss, best validation loss and its step, mean
    tokens/s, and the last validation loss per language."""
    steps, losses = series(records, "loss")
    val_steps, vals = series(records, "val_loss")
    best = min(range(len(vals)), key=vals.__getitem__) if vals else None
    tps = series(records, "tokens_per_s")[1]
    return {"steps": max((r.get("step", 0) for r in records), default=0),
            "loss": losses[-1] if losses else None,
            "best_val_loss": vals[best] if best is not None else None,
            "best_val_step": val_steps[best] if best is not None else None,
            "tokens_per_s": statistics.median(tps) if tps else None,
            "val_loss_by_language": {k.removeprefix("val_loss_"): series(records, k)[1][-1]
                                     for k in language_keys(records)}}


# ----------------------------------------------------------------------------- the page

def run_labels(run_dirs: list[Path]) -> list[str]:
    """Short unique names: each run's path relative to the runs' common directory."""
    paths = [p.resolve() for p in run_dirs]
    if len(paths) == 1:
        return [paths[0].name]
    common = Path(os.path.commonpath(paths))
    return [str(p.relative_to(common)) or p.name for p in paths]


def fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run_report(run_dirs, out_dir=None) -> Path:
    """Charts and report.md for the runs; returns the page's path."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("no run directories given")
    if out_dir is None:
        out_dir = run_dirs[0] / "report" if len(run_dirs) == 1 else \
            Path(os.path.commonpath([d.resolve() for d in run_dirs])) / "report"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels, records = run_labels(run_dirs), [read_metrics(d) for d in run_dirs]
    lines = ["# Training report", "", "| run | steps | last loss | best val_loss (step) | tokens/s (median) | "
             "last val_loss per language |", "|---|---|---|---|---|---|"]
    for label, recs in zip(labels, records):
        s = run_summary(recs)
        best = f"{fmt(s['best_val_loss'])} ({s['best_val_step']})" if s["best_val_loss"] is not None else "-"
        langs = ", ".join(f"{k} {v:.4f}" for k, v in s["val_loss_by_language"].items()) or "-"
        tps = "-" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:.0f}"
        lines.append(f"| {label} | {s['steps']} | {fmt(s['loss'])} | {best} | {tps} | {langs} |")
    lines.append("")
    if not plots_available():
        lines += [INSTALL_HINT, ""]
    else:
        by_kind: dict[str, dict] = {}  # one panel per loss definition
        for label, recs in zip(labels, records):
            by_kind.setdefault(loss_kind(recs), {})[label] = series(recs, "loss")
        if len(run_dirs) > 1 and panel_chart(out_dir / "all_runs_loss.png", "training loss of every run, by kind",
                                             by_kind, "loss (nats)"):
            lines += ["![training loss of every run](all_runs_loss.png)", ""]
        for label, recs in zip(labels, records):
            lines += [f"## {label}", ""] + [f"![{title}]({file})" for title, file in run_charts(label, recs, out_dir)]
            lines.append("")
    page = out_dir / "report.md"
    atomic_write(page, "\n".join(lines))
    return page


@dataclass(kw_only=True)
class ReportOptions:
    runs: list[str] = field(default_factory=list)  # run directories (each holding metrics.jsonl); may also come first, without the flag
    out: str = ""  # directory for report.md and the PNGs; '' = RUN_DIR/report (one run) or report/ in the runs' common directory

    def check(self):
        if not self.runs:
            raise ValueError("give at least one run directory: python -m minillm.report RUN_DIR [RUN_DIR ...]")


@cli
def main(argv=None):
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    positional = 0
    while positional < len(argv) and not argv[positional].startswith("-"):
        positional += 1
    if positional:  # `python -m minillm.report A B --out X` is `--runs A B --out X`
        argv = ["--runs", *argv[:positional], *argv[positional:]]
    opts = parse_options(ReportOptions, argv, prog="python -m minillm.report", description=__doc__.split("\n\n")[0])
    page = run_report(opts.runs, opts.out or None)
    print(f"report: {page}" + ("" if plots_available() else f" (text only; {INSTALL_HINT})"))
    return page


if __name__ == "__main__":
    main()
