"""Figures logged with every run (matplotlib object API: no global pyplot state)."""

from __future__ import annotations

from collections import defaultdict

from matplotlib.figure import Figure


def training_curves(history: list[dict[str, float]]) -> Figure:
    """One panel per metric group (``train``, ``monitor``, ``diag/<component>``), epochs on x."""
    groups: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for epoch, record in enumerate(history):
        for key, value in record.items():
            group, _, name = key.rpartition("/")
            groups[group or "other"][name].append((epoch + 1, value))
    n = max(len(groups), 1)
    fig = Figure(figsize=(5 * min(n, 3), 3.2 * ((n + 2) // 3)))
    for i, (group, series) in enumerate(sorted(groups.items())):
        ax = fig.add_subplot((n + 2) // 3, min(n, 3), i + 1)
        for name, points in sorted(series.items()):
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
        ax.set_title(group)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
