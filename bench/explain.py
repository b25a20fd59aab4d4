"""Feature importance of a finished run's guidance channels (RLAR paper, Table 5).

For a run whose base declares *guidance channels* (:meth:`bench.method.Base.guidance_channels`:
named classifier inputs, each read by one weight column), load the run's ``config.json`` and
best checkpoint from MLflow, rebuild data and model, then for each channel zero the column
that reads it (nothing else), re-run inference on every evaluation set and record the change
in macro precision, recall and F1 against the intact model. The table (CSV and Markdown), a
figure and per-feature ``explain/<set>/delta_<metric>/<feature>`` metrics are logged to the run.

Only classifier weights change, so the encoder runs once per set and each ablation re-runs
the classification head on the cached bottleneck maps (13 ablations cost about one pass).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import DataLoader

from bench.data import PreparedData, SampleSet
from bench.errors import ConfigError
from bench.external import ExternalSpec
from bench.metrics import summarize
from bench.tracking import RunLogger, Workspace
from bench.trainer import Runtime, TrainConfig

METRICS = ("precision", "recall", "f1")


@contextmanager
def channel_disabled(weight: Tensor, column: int) -> Iterator[None]:
    """Zero ``weight[:, column]`` for the duration of the block, then restore it exactly."""
    with torch.no_grad():
        saved = weight[:, column].clone()
        weight[:, column] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            weight[:, column] = saved


def feature_importance(model: nn.Module, channels: dict[str, tuple[Tensor, int]],
                       evaluate: Callable[[], dict[str, dict[str, float]]]) -> pd.DataFrame:
    """Long table (set, feature, metric, baseline, ablated, delta) from ``evaluate()``, which
    returns ``{set: {metric: value}}`` for the model as it currently is."""
    baseline = evaluate()
    rows: list[dict[str, Any]] = []
    for feature, (weight, column) in channels.items():
        with channel_disabled(weight, column):
            ablated = evaluate()
        for eval_set, metrics in baseline.items():
            for metric in METRICS:
                base, new = metrics.get(metric, np.nan), ablated[eval_set].get(metric, np.nan)
                rows.append({"set": eval_set, "feature": feature, "metric": metric,
                             "baseline": base, "ablated": new, "delta": new - base})
    return pd.DataFrame(rows)


def wide(table: pd.DataFrame) -> pd.DataFrame:
    """One row per feature, one column per (set, Δmetric), in the order of the channels."""
    order = list(dict.fromkeys(table["feature"]))
    out = table.pivot_table(index="feature", columns=["set", "metric"], values="delta", sort=False)
    out = out.reindex(index=order, columns=[(s, m) for s in dict.fromkeys(table["set"]) for m in METRICS])
    out.columns = [f"{s} Δ{m}" for s, m in out.columns]
    return out


def markdown(frame: pd.DataFrame) -> str:
    """A Markdown table of ``wide(...)`` with signed four-decimal deltas."""
    head = ["feature", *frame.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for feature, values in frame.iterrows():
        lines.append("| " + " | ".join([str(feature), *(f"{v:+.4f}" for v in values)]) + " |")
    return "\n".join(lines) + "\n"


def importance_figure(table: pd.DataFrame) -> Figure:
    """One panel per evaluation set: horizontal bars of ΔPrecision / ΔRecall / ΔF1 per feature."""
    sets = list(dict.fromkeys(table["set"]))
    features = list(dict.fromkeys(table["feature"]))
    fig = Figure(figsize=(5.2 * len(sets), 0.32 * len(features) + 1.6))
    y = np.arange(len(features))
    height = 0.8 / len(METRICS)
    for i, eval_set in enumerate(sets):
        ax = fig.add_subplot(1, len(sets), i + 1)
        part = table[table["set"] == eval_set]
        for k, metric in enumerate(METRICS):
            values = part[part["metric"] == metric].set_index("feature").reindex(features)["delta"]
            ax.barh(y + (k - 1) * height, values.to_numpy(), height, label=f"Δ{metric}")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(y, features if i == 0 else [""] * len(features))
        ax.invert_yaxis()
        ax.set_title(f"{eval_set}: channel disabled")
        ax.set_xlabel("change vs. intact model")
        ax.grid(axis="x", alpha=0.3)
    fig.axes[-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def explain_run(ws: Workspace, run_id: str, runtime: Runtime | None = None,
                external: list[ExternalSpec] | None = None) -> pd.DataFrame:
    """Rebuild the run's data and model, ablate each guidance channel, log and return the long table.

    Evaluation sets: the run's ``val`` (and ``test``), plus ``external/<name>`` for each of
    ``external`` whose labels match the model's classes (roots are not part of a run's record,
    so external sets are named again here, as for ``bench run --external``).
    """
    from mlflow.exceptions import MlflowException

    from bench.cache import prepare
    from bench.external import prepare_externals, views
    from bench.method import resolve
    from bench.runner import RunSpec, evaluation_sets

    runtime = runtime or Runtime(progress=False)
    try:
        run = ws.client.get_run(run_id)
    except MlflowException as err:
        raise ConfigError(f"no run {run_id!r} in {ws.tracking_uri}") from err
    if run.info.status != "FINISHED":
        raise ConfigError(f"run {run_id} is {run.info.status}; feature importance needs a finished run")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            config = json.loads(Path(ws.client.download_artifacts(run_id, "config.json", tmp)).read_text())
            state = torch.load(ws.client.download_artifacts(run_id, "checkpoints/best.pt", tmp),
                               map_location="cpu", weights_only=True)
        except Exception as err:  # MLflow raises several types for a missing artifact
            raise ConfigError(f"run {run_id} lacks config.json or checkpoints/best.pt: {err}") from err
    method = resolve(config["method"])
    cfg = TrainConfig(**{**config["train"], "decoder_channels": tuple(config["train"]["decoder_channels"])})
    root = run.data.params.get("data.root")
    root = None if root in (None, "None", "") else root
    data = prepare(config["dataset"], root, ws.data_dir, image_size=cfg.image_size, n_folds=config["n_folds"],
                   split_seed=config["split_seed"], progress=runtime.progress)
    data = method.base.relabel(data)
    model = method.base.build_model(cfg.model_spec(len(data.class_names)))
    model.load_state_dict(state["model"])
    channels = method.base.guidance_channels(model)
    if not channels:
        raise ConfigError(f"run {run_id} trained {method.name}, whose base has no guidance channels to ablate")
    spec = RunSpec(method, data.name, root, int(config["fold"]), int(config["seed"]), config["n_folds"],
                   config["split_seed"], cfg)
    sets = {name: (data, rows) for name, rows in evaluation_sets(spec, data).items()}
    externals = prepare_externals(external or [], data, ws.data_dir, image_size=cfg.image_size, progress=runtime.progress)
    sets.update({f"external/{v.name}": (v.data, v.rows) for v in views(externals, method.base, data) if v.classify})
    device = runtime.torch_device()
    model.to(device).eval()
    evaluate = head_evaluator(model, sets, len(data.class_names), runtime, device)
    table = feature_importance(model, channels, evaluate)
    _log(RunLogger(ws, run_id), table)
    return table


def head_evaluator(model: nn.Module, sets: dict[str, tuple[PreparedData, np.ndarray]], num_classes: int,
                   runtime: Runtime, device: torch.device) -> Callable[[], dict[str, dict[str, float]]]:
    """Classification metrics per set, re-running only ``model.head`` on bottleneck maps computed once.

    An ablation changes classifier weights only, so the encoder's output is the same every
    time (the model's head receives the bottleneck map: :class:`bench.models.MultiTaskUNet`).
    """
    head = getattr(model, "head", None)
    if head is None:
        raise ConfigError(f"{type(model).__name__} has no classification head to ablate")
    cached: dict[str, tuple[list[Tensor], np.ndarray]] = {}
    with torch.no_grad():
        for name, (data, rows) in sets.items():
            loader = DataLoader(SampleSet(data, rows, {}, augment=False), batch_size=runtime.eval_batch_size, shuffle=False)
            maps, labels = [], []
            for items in loader:
                maps.append(model(items["image"].to(device)).features["bottleneck"])
                labels.append(items["label"].numpy())
            cached[name] = (maps, np.concatenate(labels) if labels else np.zeros(0, int))

    def evaluate() -> dict[str, dict[str, float]]:
        out = {}
        with torch.no_grad():
            for name, (maps, labels) in cached.items():
                probs = torch.cat([torch.softmax(head(z)[0].float(), dim=1) for z in maps]).cpu().numpy()
                table = pd.DataFrame({"label": labels, "pred": probs.argmax(axis=1)})
                table[[f"prob_{c}" for c in range(probs.shape[1])]] = probs
                out[name] = summarize(table, num_classes)
        return out

    return evaluate


def _log(log: RunLogger, table: pd.DataFrame) -> None:
    log.metrics({f"explain/{r.set}/delta_{r.metric}/{r.feature}": r.delta for r in table.itertuples()})
    log.figure(importance_figure(table), "explain/feature_importance.png")
    with tempfile.TemporaryDirectory() as tmp:
        csv, md = Path(tmp) / "feature_importance.csv", Path(tmp) / "feature_importance.md"
        table.to_csv(csv, index=False, float_format="%.6g")
        md.write_text(markdown(wide(table)))
        log.artifact(csv, "explain")
        log.artifact(md, "explain")
