"""Run a grid of (method, fold, seed) on one dataset and record each run in MLflow.

Idempotent: a FINISHED run with the same tags (method, dataset, fold, seed, config hash)
is skipped; an unfinished one (RUNNING after a kill, or KILLED) resumes from its
``last.pt``. All methods are resolved and checked against the model before the first run
starts, so a typo or an out-of-range parameter fails fast.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import __version__
from bench import params as P
from bench.cache import prepare
from bench.data import PreparedData
from bench.errors import ConfigError, NonFiniteLossError
from bench.external import ExternalSet, ExternalSpec, prepare_externals, segmentation_only, views
from bench.figures import training_curves
from bench.method import Method, resolve
from bench.metrics import confusion, confusion_figure, summarize
from bench.tracking import RunLogger, Workspace, code_version, find_run
from bench.trainer import EpochCallback, Runtime, TrainConfig, Trainer, predict


@dataclass(frozen=True)
class RunSpec:
    method: Method = field(compare=False)
    dataset: str
    data_root: str | None
    fold: int
    seed: int
    n_folds: int
    split_seed: int
    train: TrainConfig
    external: tuple[str, ...] = ()  # canonical specs of the external evaluation sets
    tuned: tuple[tuple[str, str], ...] = ()  # where tuned parameters came from: (study|trial|storage|value, text)

    def config(self) -> dict[str, Any]:
        """Everything that determines the result except fold and seed (those are tags)."""
        config = {
            "method": self.method.name,
            "method_params": self.method.params(),
            "dataset": self.dataset,
            "n_folds": self.n_folds,
            "split_seed": self.split_seed,
            "train": dataclasses.asdict(self.train),
        }
        if self.external:  # only when given, so runs without external sets keep their hash
            config["external"] = sorted(self.external)
        if self.tuned:  # the study and trial, not the storage's location
            config["tuned"] = {k: v for k, v in self.tuned if k in ("study", "trial")}
        return config

    def config_hash(self) -> str:
        text = json.dumps(self.config(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        """The results row: a tuned method is a row of its own, never averaged with untuned runs."""
        return self.method.name + (" [tuned]" if self.tuned else "")

    def tags(self) -> dict[str, str]:
        return {"method": self.label, "dataset": self.dataset, "fold": str(self.fold),
                "seed": str(self.seed), "config_hash": self.config_hash()}

    def run_dir(self, ws: Workspace) -> Path:
        slug = self.method.name.replace("/", "_").replace(":", "_")
        return ws.runs_dir / self.dataset.replace(":", "_") / slug / self.config_hash() / f"fold{self.fold}_seed{self.seed}"


@dataclass
class Outcome:
    spec: RunSpec
    status: str  # finished, skipped, failed
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""


def resolve_methods(specs: list[str], cfg: TrainConfig, num_classes: int) -> list[Method]:
    """Resolve every method and let its components check a model, before any training."""
    methods = [resolve(s) for s in specs]
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"a method is listed twice: {', '.join(names)}")
    for method in methods:
        model = method.base.build_model(cfg.model_spec(num_classes))
        for component in method.components().values():
            component.configure(model)
            component.check_config(cfg)
    return methods


def run_grid(
    methods: list[str],
    dataset: str,
    ws: Workspace,
    *,
    data_root: str | None = None,
    n_folds: int = 3,
    folds: list[int] | None = None,
    seeds: list[int] = [0],  # noqa: B006 - read only
    split_seed: int = 0,
    cfg: TrainConfig = TrainConfig(),  # noqa: B008 - frozen, never mutated
    runtime: Runtime = Runtime(),  # noqa: B008 - frozen, never mutated
    retry_failed: bool = False,
    extra_callbacks: list[EpochCallback] | None = None,
    echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    external: list[ExternalSpec] | None = None,
    adapt: Callable[[RunSpec], RunSpec] | None = None,
) -> list[Outcome]:
    """``adapt`` may replace each planned run (e.g. with tuned parameters); all are planned before any trains."""
    for spec in methods:  # names and parameters first: a typo fails before any data is read
        resolve(spec)
    data = prepare(dataset, data_root, ws.data_dir, image_size=cfg.image_size, n_folds=n_folds,
                   split_seed=split_seed, progress=runtime.progress)
    resolved = resolve_methods(methods, cfg, len(data.class_names))
    for method in resolved:  # a base whose class labels are missing fails before any training
        method.base.relabel(data)
    externals = prepare_externals(external or [], data, ws.data_dir, image_size=cfg.image_size, progress=runtime.progress)
    _echo_label_spaces(externals, resolved, data, echo)
    exp_id = ws.experiment_id()
    assert exp_id is not None
    specs = [RunSpec(method, data.name, data_root, fold, seed, n_folds, split_seed, cfg, tuple(e.data.name for e in externals))
             for method in resolved for fold in (folds if folds is not None else range(n_folds)) for seed in seeds]
    specs = [adapt(spec) for spec in specs] if adapt else specs
    return [execute(spec, data, ws, exp_id, runtime, retry_failed, extra_callbacks or [], echo, externals) for spec in specs]


def _echo_label_spaces(externals: list[ExternalSet], methods: list[Method], data: PreparedData,
                       echo: Callable[[str], None]) -> None:
    """Say, before training, how each external set's labels meet each method's classes."""
    decisions: dict[tuple[str, str], list[str]] = {}
    for method in methods:
        for view in views(externals, method.base, method.base.relabel(data)):
            decisions.setdefault((view.name, view.labels), []).append(method.name)
    for (name, labels), names in decisions.items():
        who = "" if len(names) == len(methods) else f" [{', '.join(names)}]"
        echo(f"external {name}{who}: {labels}")


def execute(
    spec: RunSpec,
    data: PreparedData,
    ws: Workspace,
    exp_id: str,
    runtime: Runtime,
    retry_failed: bool,
    callbacks: list[EpochCallback],
    echo: Callable[[str], None],
    externals: list[ExternalSet] | None = None,
) -> Outcome:
    data = spec.method.base.relabel(data)  # the classes this base predicts (default: TI-RADS)
    label = f"{spec.method.name} | {spec.dataset} | fold {spec.fold} | seed {spec.seed}"
    existing = find_run(ws, exp_id, spec.tags())
    if existing is not None and existing.info.status == "FINISHED":
        echo(f"skip   {label}: finished run {existing.info.run_id} has the same config")
        return Outcome(spec, "skipped", existing.info.run_id)
    if existing is not None and existing.info.status == "FAILED" and not retry_failed:
        echo(f"skip   {label}: run {existing.info.run_id} FAILED before ({existing.data.tags.get('failure', '?')}); --retry-failed reruns it")
        return Outcome(spec, "skipped", existing.info.run_id, message="failed before")
    run_dir = spec.run_dir(ws)
    fold = data.fold(spec.fold, monitor_fraction=spec.train.monitor_fraction, select_on=spec.train.select_on)
    with _exclusive(run_dir):
        if existing is not None and (run_dir / "last.pt").exists():
            run_id = existing.info.run_id
            ws.client.update_run(run_id, "RUNNING")
            echo(f"resume {label}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
            run_id = _new_run(ws, exp_id, spec)
            echo(f"run    {label}")
        log = RunLogger(ws, run_id)
        try:
            trainer = Trainer(spec.method, fold, spec.train, seed=spec.seed, run_dir=run_dir, runtime=runtime,
                              callbacks=[lambda epoch, rec: log.metrics(rec, step=epoch), *callbacks],
                              meta={"run_id": run_id, "config_hash": spec.config_hash()})
            result = trainer.fit()
            trainer.load_best()
            metrics = _evaluate(trainer, spec, data, log, result.best_epoch, externals or [])
            log.figure(training_curves(result.history), "figures/training_curves.png")
            log.artifact(result.best_path, "checkpoints")
        except NonFiniteLossError as err:
            log.tags({"failure": "nan_loss", "failure_message": str(err)[:5000]})
            log.finish("FAILED")
            echo(f"FAILED {label}: {err}")
            return Outcome(spec, "failed", run_id, message=str(err))
        except KeyboardInterrupt:
            log.finish("KILLED")
            raise
        except BaseException as err:
            log.tags({"failure": type(err).__name__, "failure_message": str(err)[:5000]})
            log.finish("FAILED")
            raise
        log.finish()
    shutil.rmtree(run_dir, ignore_errors=True)
    return Outcome(spec, "finished", run_id, metrics)


def _new_run(ws: Workspace, exp_id: str, spec: RunSpec) -> str:
    tags = {**spec.tags(), "code_version": code_version(), "harness_version": __version__,
            "family": spec.method.family, "encoder": spec.train.encoder, "torch": torch.__version__,
            "mlflow.runName": f"{spec.label}|{spec.dataset}|f{spec.fold}|s{spec.seed}",
            **{f"tuned.{k}": v for k, v in spec.tuned}}
    run = ws.client.create_run(exp_id, tags=tags)
    log = RunLogger(ws, run.info.run_id)
    flat = {**{f"method.{k}": v for k, v in spec.method.params().items()},
            **{f"train.{k}": v for k, v in dataclasses.asdict(spec.train).items()},
            "data.n_folds": spec.n_folds, "data.split_seed": spec.split_seed, "data.root": spec.data_root,
            **({"data.external": ",".join(spec.external)} if spec.external else {}),
            **{f"tuned.{k}": v for k, v in spec.tuned}}
    log.params(flat)
    log.json({**spec.config(), "fold": spec.fold, "seed": spec.seed}, "config.json")
    return str(run.info.run_id)


def evaluation_sets(spec: RunSpec, data: PreparedData) -> dict[str, np.ndarray]:
    """``val`` is the fold's held-out part; ``test`` the dataset's official test split, if any."""
    sets = {"val": data.fold(spec.fold).heldout}
    test = data.rows("test")
    if len(test):
        sets["test"] = test
    return sets


def _evaluate(trainer: Trainer, spec: RunSpec, data: PreparedData, log: RunLogger, best_epoch: int,
              externals: list[ExternalSet] = []) -> dict[str, float]:  # noqa: B006 - read only
    final: dict[str, float] = {"best_epoch": float(best_epoch), "epochs_trained": float(trainer.epoch)}
    # (metric prefix, file name, data, rows, classification scored?)
    sets = [(name, name, data, rows, True) for name, rows in evaluation_sets(spec, data).items()]
    for view in views(externals, spec.method.base, data):
        sets.append((f"external/{view.name}", f"external_{view.name}", view.data, view.rows, view.classify))
        log.tags({f"external.{view.name}.labels": view.labels})
    for prefix, name, eval_data, rows, classify in sets:
        table = predict(trainer.model, spec.method, eval_data, rows, trainer.runtime, trainer.device, trainer.autocast)
        table.insert(2, "fold", spec.fold)
        table.insert(3, "seed", spec.seed)
        if not classify:
            table = segmentation_only(table)
        metrics = summarize(table, len(data.class_names))
        final.update({f"{prefix}/{k}": v for k, v in metrics.items()})
        _log_table(log, table, f"predictions/{name}.csv")
        if "pred" in table:
            cm = confusion(table["label"].to_numpy(), table["pred"].to_numpy(), len(data.class_names))
            log.figure(confusion_figure(cm, data.class_names), f"figures/confusion_{name}.png")
            log.json(cm.tolist(), f"metrics/confusion_{name}.json")
    log.metrics(final)
    return final


def _log_table(log: RunLogger, table: Any, name: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(name).name
        table.to_csv(path, index=False, float_format="%.6g")
        log.artifact(path, str(Path(name).parent))


@contextmanager
def _exclusive(run_dir: Path) -> Iterator[None]:
    """Hold a lock so two processes never train the same run at once."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir.parent / f".{run_dir.name}.lock"
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another process is training {run_dir}") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def seeds_from(text: str) -> list[int]:
    """``"3"`` -> [0, 1, 2]; ``"0,5,7"`` -> [0, 5, 7]."""
    parts = [p for p in text.split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise P.ParamError(f"--seeds takes a count or a comma list of integers, got {text!r}") from None
    return list(range(values[0])) if len(values) == 1 else values
