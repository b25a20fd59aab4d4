"""The workspace and its MLflow store.

A workspace is one folder (``--workspace``, ``$BENCH_WORKSPACE``, default
``./bench-workspace``) holding ``mlflow.db`` (SQLite backend), ``artifacts/`` (the
experiments' artifact roots), ``runs/`` (checkpoints of unfinished runs) and ``data/``
(dataset caches). ``$BENCH_TRACKING_URI`` points tracking at any other MLflow store
(a shared server, PostgreSQL) while checkpoints and caches stay in the workspace.

One MLflow run per (method, dataset, fold, seed), tagged with those four plus
``config_hash`` and ``code_version``; a FINISHED run with the same tags is never re-run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from bench.errors import ConfigError

ENV_WORKSPACE = "BENCH_WORKSPACE"
ENV_TRACKING_URI = "BENCH_TRACKING_URI"
EXPERIMENT = "thyrobench"
RUN_KEYS = ("method", "dataset", "fold", "seed", "config_hash")

for _name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class Workspace:
    def __init__(self, path: str | Path | None = None, tracking_uri: str | None = None) -> None:
        self.root = Path(path or os.environ.get(ENV_WORKSPACE) or "bench-workspace").resolve()
        self._uri = tracking_uri or os.environ.get(ENV_TRACKING_URI)

    @property
    def tracking_uri(self) -> str:
        return self._uri or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @cached_property
    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        self.root.mkdir(parents=True, exist_ok=True)
        return MlflowClient(tracking_uri=self.tracking_uri)

    def experiment_id(self, name: str = EXPERIMENT, create: bool = True) -> str | None:
        """Get or create (with its artifact root inside the workspace) the named experiment."""
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        if not create:
            return None
        location = (self.root / "artifacts" / name).as_uri() if self._uri is None else None
        return str(self.client.create_experiment(name, artifact_location=location))

    def exists(self) -> bool:
        return self._uri is not None or (self.root / "mlflow.db").exists()

    def require(self) -> None:
        if not self.exists():
            raise ConfigError(f"no workspace at {self.root} (no mlflow.db): run `bench run` first or pass --workspace")


def find_run(ws: Workspace, exp_id: str, tags: Mapping[str, str]) -> Any | None:
    """The newest run carrying exactly these tag values, or None."""
    query = " and ".join(f"tags.`{k}` = '{_quote(v)}'" for k, v in tags.items())
    runs = ws.client.search_runs([exp_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def all_runs(ws: Workspace, experiment: str = EXPERIMENT) -> list[Any]:
    exp_id = ws.experiment_id(experiment, create=False)
    if exp_id is None:
        return []
    runs: list[Any] = []
    token = None
    while True:
        page = ws.client.search_runs([exp_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def mlflow_key(name: str) -> str:
    """A metric/param name MLflow accepts: other characters (the ``@`` of ``rlar@mid``) become ``_``."""
    return re.sub(r"[^\w./ :-]", "_", name)


def _quote(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


class RunLogger:
    """Thin, batched writes to one MLflow run."""

    def __init__(self, ws: Workspace, run_id: str) -> None:
        self.ws, self.run_id = ws, run_id

    def params(self, values: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(mlflow_key(k), _param_text(v)) for k, v in sorted(values.items())]
        for i in range(0, len(items), 100):
            self.ws.client.log_batch(self.run_id, params=items[i : i + 100])

    def metrics(self, values: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(mlflow_key(k), float(v), now, step) for k, v in values.items() if v is not None and math.isfinite(v)]
        for i in range(0, len(items), 1000):
            self.ws.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def tags(self, values: Mapping[str, Any]) -> None:
        for k, v in values.items():
            self.ws.client.set_tag(self.run_id, k, str(v))

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self.ws.client.log_artifact(self.run_id, str(path), folder)

    def json(self, obj: Any, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / Path(name).name
            target.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
            self.artifact(target, str(Path(name).parent) if Path(name).parent != Path(".") else None)

    def figure(self, fig: Any, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / Path(name).name
            fig.savefig(target, dpi=120, bbox_inches="tight")
            self.artifact(target, str(Path(name).parent))

    def finish(self, status: str = "FINISHED") -> None:
        self.ws.client.set_terminated(self.run_id, status)


def _param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:6000]


def code_version() -> str:
    """Git commit of the harness (``+dirty`` when modified), else the package version."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        from importlib.metadata import version

        return "thyrobench-" + version("thyrobench")
