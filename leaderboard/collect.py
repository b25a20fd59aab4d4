"""MLflow runs -> a tidy frame of final metrics, per-sample predictions and epoch curves.

Only the recorded runs are read. A run enters the leaderboard when it is FINISHED, carries
the tags ``method, dataset, fold, seed``, is not a tuning trial (tag ``kind=trial``) and is
the newest such run of its (method, dataset, fold, seed) — an older one (e.g. before a
config change) would otherwise be averaged in twice. Every other run is listed in
:attr:`Runs.excluded` with the reason.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import ConfigError
from bench.tracking import Workspace, all_runs

REQUIRED_TAGS = ("method", "dataset", "fold", "seed")
TUNING_KINDS = ("trial", "study")  # Optuna runs (bench.tune): never on the leaderboard
CURVE_PREFIXES = ("train/", "monitor/")
_SET_KEY = re.compile(r"^(val|test|external/[^/]+)/(.+)$")
_COUNTS = frozenset({"n_seg", "n_cls"})
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@dataclass
class Runs:
    """The runs a leaderboard is built from."""

    metrics: pd.DataFrame  # tidy: run_id, method, family, dataset, fold, seed, eval_set, metric, value
    excluded: pd.DataFrame  # run_id, method, dataset, fold, seed, status, reason
    ws: Workspace | None = field(default=None, repr=False)

    def run_ids(self) -> list[str]:
        return sorted(self.metrics["run_id"].unique())

    def predictions(self, run_id: str, eval_set: str) -> pd.DataFrame | None:
        """The run's per-sample predictions on ``eval_set`` (None when it has none)."""
        return _predictions(self.ws, run_id, eval_set) if self.ws is not None else None

    def curves(self) -> pd.DataFrame:
        """Per-epoch history of ``train/*`` and ``monitor/*``: run_id, method, dataset, key, step, value."""
        if self.ws is None:
            return pd.DataFrame(columns=["run_id", "method", "dataset", "key", "step", "value"])
        runs = self.metrics.drop_duplicates("run_id").set_index("run_id")
        rows = []
        for run_id in self.run_ids():
            for key in sorted(_history_keys(self.ws, run_id)):
                for m in self.ws.client.get_metric_history(run_id, key):
                    rows.append((run_id, runs.at[run_id, "method"], runs.at[run_id, "dataset"], key, int(m.step), float(m.value)))
        frame = pd.DataFrame(rows, columns=["run_id", "method", "dataset", "key", "step", "value"])
        # a resumed run may log an epoch twice: keep the last value per step
        return frame.drop_duplicates(["run_id", "key", "step"], keep="last").sort_values(["dataset", "method", "key", "run_id", "step"],
                                                                                         ignore_index=True)


def collect(ws: Workspace) -> Runs:
    """Read every run of the workspace; raise a :class:`ConfigError` when none is usable."""
    ws.require()
    runs = all_runs(ws)
    if not runs:
        raise ConfigError(f"no runs in the workspace {ws.root} ({ws.tracking_uri}): run `bench run` first")
    rows: list[dict[str, Any]] = []
    excluded: list[dict[str, Any]] = []
    newest: dict[tuple[str, ...], str] = {}  # (method, dataset, fold, seed) -> the newest FINISHED run
    for run in sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)):
        tags = run.data.tags
        if run.info.status == "FINISHED" and tags.get("kind") not in TUNING_KINDS:
            newest[tuple(tags.get(k, "") for k in REQUIRED_TAGS)] = run.info.run_id
    for run in sorted(runs, key=lambda r: r.info.run_id):
        tags = run.data.tags
        info = {"run_id": run.info.run_id, **{k: tags.get(k, "") for k in REQUIRED_TAGS}, "status": run.info.status}
        missing = [k for k in REQUIRED_TAGS if not tags.get(k)]
        if tags.get("kind") in TUNING_KINDS:
            excluded.append({**info, "reason": f"tuning {tags['kind']} (tag kind={tags['kind']})"})
        elif missing:
            excluded.append({**info, "reason": "missing tag(s) " + ", ".join(missing)})
        elif run.info.status != "FINISHED":
            excluded.append({**info, "reason": f"status {run.info.status}, not FINISHED"})
        elif (latest := newest[tuple(tags[k] for k in REQUIRED_TAGS)]) != run.info.run_id:
            excluded.append({**info, "reason": f"superseded by the newer run {latest[:12]} of the same method, dataset, fold and seed"})
        else:
            try:
                fold, seed = int(tags["fold"]), int(tags["seed"])
            except ValueError:
                excluded.append({**info, "reason": f"fold/seed tags are not integers ({tags['fold']!r}, {tags['seed']!r})"})
                continue
            base = {"run_id": run.info.run_id, "method": tags["method"], "family": tags.get("family", ""),
                    "dataset": tags["dataset"], "fold": fold, "seed": seed}
            for key, value in run.data.metrics.items():
                match = _SET_KEY.match(key)
                if match and match.group(2) not in _COUNTS:
                    rows.append({**base, "eval_set": match.group(1), "metric": match.group(2), "value": float(value)})
    columns = ["run_id", "method", "family", "dataset", "fold", "seed", "eval_set", "metric", "value"]
    metrics = pd.DataFrame(rows, columns=columns)
    excluded_frame = pd.DataFrame(excluded, columns=["run_id", *REQUIRED_TAGS, "status", "reason"])
    if metrics.empty:
        why = "; ".join(f"{r['run_id'][:8]}: {r['reason']}" for r in excluded[:10])
        raise ConfigError(f"no usable runs in {ws.root}: the leaderboard needs FINISHED runs tagged "
                          f"{', '.join(REQUIRED_TAGS)} with val/, test/ or external/<name>/ metrics"
                          + (f" ({len(excluded)} left out: {why})" if excluded else ""))
    metrics = metrics.sort_values(["dataset", "eval_set", "method", "fold", "seed", "metric", "run_id"], ignore_index=True)
    return Runs(metrics, excluded_frame, ws)


def _history_keys(ws: Workspace, run_id: str) -> list[str]:
    run = ws.client.get_run(run_id)
    return [k for k in run.data.metrics if k.startswith(CURVE_PREFIXES) and k.rpartition("/")[2] not in _COUNTS]


@cache
def _predictions(ws: Workspace, run_id: str, eval_set: str) -> pd.DataFrame | None:
    """``predictions/val.csv``, ``predictions/test.csv``, ``predictions/external_<name>.csv``."""
    names = dict.fromkeys([eval_set.replace("/", "_"), eval_set])
    frame = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            try:
                path = ws.client.download_artifacts(run_id, f"predictions/{name}.csv", tmp)
            except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
                continue
            frame = pd.read_csv(Path(path), dtype={"sample_id": str, "patient_id": str})
            break
    if frame is None:
        return None
    if "sample_id" not in frame or "patient_id" not in frame:
        return None
    return frame.replace([np.inf, -np.inf], np.nan)
