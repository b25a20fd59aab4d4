"""Leaderboard figures (matplotlib object API, Agg; byte-identical when regenerated)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scikit_posthocs as sp
from bench.leaderboard.analysis import PRIMARY, Section
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bench import stats as S

PNG_METADATA = {"Software": None}  # no matplotlib version in the file: same bytes every time
DPI = 100
CURVE_MONITOR = ("score", *PRIMARY)  # monitor/* keys drawn next to every train/* loss
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, metadata=PNG_METADATA)
    return path


def method_colors(methods: list[str]) -> dict[str, str]:
    return {m: COLORS[i % len(COLORS)] for i, m in enumerate(methods)}


def cd_diagram(section: Section, metric: str) -> Figure | S.Skipped:
    """Critical-difference diagram: mean ranks, bars joining methods that Wilcoxon–Holm does not separate."""
    pairwise = section.pairwise.get(metric)
    if pairwise is None:
        return S.Skipped(f"{metric} is not a primary metric")
    if isinstance(pairwise, S.Skipped):
        return pairwise
    if len(pairwise) < 3:
        return S.Skipped(f"needs at least 3 methods with {metric}, found {len(pairwise)}: see the comparison with the baseline")
    ranks = section.mean_ranks[metric]
    fig = Figure(figsize=(7.0, 0.6 + 0.32 * len(ranks)))
    ax = fig.add_subplot(1, 1, 1)
    colors = method_colors(section.methods)
    sp.critical_difference_diagram(ranks, pairwise, ax=ax, alpha=0.05, color_palette={m: colors[m] for m in ranks.index},
                                   label_fmt_left="{label} ({rank:.2f})", label_fmt_right="({rank:.2f}) {label}")
    ax.set_title(f"{metric}: mean rank over (fold, seed) blocks; bars = no Holm-significant Wilcoxon difference",
                 fontsize=8, pad=22)
    fig.subplots_adjust(left=0.25, right=0.75, top=0.72, bottom=0.05)
    return fig


def box_strip(section: Section, metrics: list[str]) -> Figure:
    """Per metric, each method's run values (fold x seed): box plot and the points themselves."""
    metrics = [m for m in metrics if m in section.metrics]
    n = len(metrics)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    height = 0.45 * len(section.methods) + 1.2
    fig = Figure(figsize=(4.2 * cols, height * rows))
    colors = method_colors(section.methods)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        data = section.runs[section.runs["metric"] == metric]
        present = [m for m in section.methods if (data["method"] == m).any()]
        values = [data.loc[data["method"] == m, "value"].to_numpy() for m in present]
        positions = np.arange(len(present))
        ax.boxplot(values, positions=positions, orientation="horizontal", widths=0.5, showfliers=False,
                   medianprops={"color": "black"})
        jitter = np.random.default_rng(0)
        for pos, method, vals in zip(positions, present, values, strict=True):
            ax.scatter(vals, pos + jitter.uniform(-0.15, 0.15, len(vals)), s=14, color=colors[method], zorder=3)
        ax.set_yticks(positions, present, fontsize=8)
        ax.invert_yaxis()
        better = "lower is better" if S.lower_is_better(metric) else "higher is better"
        ax.set_title(f"{metric} ({better})", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def training_curves(curves: pd.DataFrame, methods: list[str]) -> Figure | S.Skipped:
    """Per logged key (train losses, monitor metrics), the mean over runs per epoch, one line per method."""
    if curves.empty:
        return S.Skipped("no per-epoch metrics (train/*, monitor/*) were logged")
    keys = sorted((k for k in curves["key"].unique() if k.startswith("train/") or k.rpartition("/")[2] in CURVE_MONITOR),
                  key=lambda k: (not k.startswith("train/"), k))
    cols = min(len(keys), 4)
    rows = (len(keys) + cols - 1) // cols
    fig = Figure(figsize=(3.6 * cols, 2.6 * rows + 0.4))
    colors = method_colors(methods)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        data = curves[curves["key"] == key]
        for method in methods:
            mean = data[data["method"] == method].groupby("step")["value"].mean()
            if len(mean):
                ax.plot(mean.index + 1, mean.to_numpy(), marker="o", markersize=3, color=colors[method], label=method)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    legend = {label: h for ax in fig.axes for h, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(len(legend), 5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig
