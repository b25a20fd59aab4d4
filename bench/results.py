"""``bench results``: mean ± std over folds and seeds, per method, straight from MLflow."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.tracking import Workspace, all_runs

METRICS = ("dice", "iou", "hd95", "f1", "precision", "recall", "accuracy", "balanced_accuracy", "auc", "kappa",
           "inconsis_cls", "inconsis_seg2", "inconsis_seg3")  # the last three where a method's outputs allow them


def runs_frame(ws: Workspace) -> pd.DataFrame:
    """One row per run: status, the run tags and every final metric."""
    rows = []
    for run in all_runs(ws):
        tags = run.data.tags
        if "method" not in tags or tags.get("kind") in ("study", "trial"):  # tuning runs (bench.tune) are not results
            continue
        rows.append({"run_id": run.info.run_id, "status": run.info.status,
                     **{k: tags.get(k) for k in ("method", "dataset", "fold", "seed", "config_hash", "family")},
                     **run.data.metrics})
    return pd.DataFrame(rows)


def summary(ws: Workspace, dataset: str | None = None, eval_set: str = "val") -> pd.DataFrame:
    """Mean and std per (dataset, method) of ``<eval_set>/<metric>`` over FINISHED runs."""
    frame = runs_frame(ws)
    if frame.empty:
        return frame
    frame = frame[frame["status"] == "FINISHED"]
    if dataset:
        frame = frame[frame["dataset"] == dataset]
    cols = [f"{eval_set}/{m}" for m in METRICS if f"{eval_set}/{m}" in frame]
    if frame.empty or not cols:
        return pd.DataFrame()
    grouped = frame.groupby(["dataset", "method"], sort=True)
    out = grouped[cols].agg(["mean", "std"])
    out[("n", "")] = grouped.size()
    return out


def results_table(ws: Workspace, dataset: str | None = None, eval_set: str = "val") -> str:
    table = summary(ws, dataset, eval_set)
    if table.empty:
        return f"no finished runs with {eval_set}/ metrics in {ws.root}"
    cells = pd.DataFrame(index=table.index)
    for col in dict.fromkeys(c for c, _ in table.columns if c != "n"):
        mean, std = table[(col, "mean")], table[(col, "std")]
        name = col.rsplit("/", 1)[1]  # external/<set>/dice -> dice
        digits = 2 if name == "hd95" else 3
        cells[name] = [_fmt(m, s, digits) for m, s in zip(mean, std, strict=True)]
    cells["n"] = table[("n", "")].astype(int)
    return f"{eval_set} metrics, mean ± std over folds x seeds\n" + cells.reset_index().to_string(index=False)


def _fmt(mean: float, std: float, digits: int) -> str:
    if not np.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if np.isfinite(std) else f"{mean:.{digits}f}"
