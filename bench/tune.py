"""Hyperparameter tuning with Optuna: the same budget and the same trainer for every method.

One *study* per (method, dataset, fold, training setup). A trial resolves the method with
the suggested parameters, trains it with the one :class:`~bench.trainer.Trainer` on the
fold's training rows, reports the per-epoch monitoring score (the held-back part of the
training folds, never the fold's held-out rows) to the median pruner and returns the best
monitoring score. Trial 0 is the method's defaults (the papers' values).

**Search-space contract.** A component suggests its own parameters in
``search_space(cls, trial)``, each under its field name, and returns ``{field: value}``;
the ``trial`` it receives stores them as ``<component>.<field>``, so components never
collide. The trainer's shared hyperparameters (:data:`SHARED_SPACE`, ``train.<field>``)
are tuned for every method in the same ranges; a component may narrow or widen one by
mapping the field to another Optuna distribution in its ``shared_space``, or keep it
fixed by mapping it to ``None``. Both are checked before the first trial.

**Storage.** Any SQLAlchemy URL Optuna's ``RDBStorage`` accepts; by default
``sqlite:///<workspace>/optuna.db``. A heartbeat marks trials whose process died as
failed and re-queues them with the same parameters; a re-queued or interrupted trial
resumes from its last checkpoint. ``--trials N`` is the study's budget, shared by every
worker on the storage.

**MLflow.** Experiment ``thyrobench-tune``: one parent run per study (``kind=study``),
one nested run per trial (``kind=trial``) with its parameters, per-epoch metrics and
Optuna state; the leaderboard never reads this experiment.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from bench import params as P
from bench.errors import ConfigError, NonFiniteLossError
from bench.method import Method, resolve
from bench.tracking import RunLogger, Workspace, code_version, find_run
from bench.trainer import Runtime, TrainConfig, Trainer

if TYPE_CHECKING:
    from bench.runner import RunSpec

TUNE_EXPERIMENT = "thyrobench-tune"
STUDY_ATTR = "thyrobench"  # study user attribute holding what the study tunes

#: The trainer's hyperparameters every method tunes, in the same ranges (fairness).
SHARED_SPACE: dict[str, BaseDistribution] = {
    "lr": FloatDistribution(1e-5, 1e-2, log=True),
    "weight_decay": FloatDistribution(1e-5, 1e-1, log=True),
}

_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


@contextmanager
def _stable() -> Iterator[None]:
    """Silence Optuna's ExperimentalWarning for the heartbeat API (stable in use since 2.9)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


# --------------------------------------------------------------------------- search space
class _Suggestions:
    """What a component's ``search_space`` receives: ``suggest_*`` stored as ``<prefix><name>``."""

    def __init__(self, trial: Any, prefix: str) -> None:
        self._trial, self._prefix = trial, prefix
        self.names: list[str] = []

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float:
        self.names.append(name)
        return self._trial.suggest_float(self._prefix + name, low, high, step=step, log=log)

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        self.names.append(name)
        return self._trial.suggest_int(self._prefix + name, low, high, step=step, log=log)

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        self.names.append(name)
        return self._trial.suggest_categorical(self._prefix + name, choices)


class _Probe:
    """A stand-in trial that records the distributions a search space asks for and returns the defaults."""

    def __init__(self, owner: str, params: Any) -> None:
        self.owner, self.params = owner, params
        self.fields = {f.name: f for f in dataclasses.fields(params)}
        self.space: dict[str, BaseDistribution] = {}

    def _record(self, name: str, make: Callable[[], BaseDistribution]) -> Any:
        if name not in self.fields:
            valid = ", ".join(self.fields) or "none"
            raise ConfigError(f"search space of {self.owner} suggests {name!r}, which is not one of its parameters ({valid})")
        try:
            dist = make()
        except (ValueError, TypeError) as err:
            raise ConfigError(f"search space of {self.owner}: bad range for {name}: {err}") from None
        f, default = self.fields[name], getattr(self.params, name)
        ends = dist.choices if isinstance(dist, CategoricalDistribution) else (dist.low, dist.high)  # type: ignore[attr-defined]
        for value in ends:
            try:
                P.check(self.owner, f, value)
            except P.ParamError as err:
                raise ConfigError(f"search space of {self.owner} reaches outside the parameter's range: {err}") from None
        if not _contains(dist, default):
            raise ConfigError(f"search space of {self.owner}: the default {name}={default!r} (trial 0) lies outside {_describe(dist)}")
        self.space[name] = dist
        return default

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float:
        return self._record(name, lambda: FloatDistribution(low, high, log=log, step=step))

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        return self._record(name, lambda: IntDistribution(low, high, log=log, step=step))

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self._record(name, lambda: CategoricalDistribution(tuple(choices)))


def _contains(dist: BaseDistribution, value: Any) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return dist.low <= value <= dist.high  # type: ignore[attr-defined,no-any-return]


def _describe(dist: BaseDistribution) -> str:
    if isinstance(dist, CategoricalDistribution):
        return "one of " + ", ".join(map(str, dist.choices))
    kind = "int" if isinstance(dist, IntDistribution) else "float"
    return f"{kind} [{dist.low}, {dist.high}]" + (" log" if dist.log else "")  # type: ignore[attr-defined]


def _suggest(trial: Any, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    raise ConfigError(f"unsupported distribution {dist!r} for {name}")


@dataclass(frozen=True)
class Suggestion:
    """One trial's values: typed overrides per component and shared trainer settings."""

    overrides: dict[str, dict[str, Any]]
    train: dict[str, Any]


@dataclass(frozen=True)
class SearchSpace:
    """A method's whole search space, checked; ``defaults`` is trial 0 in Optuna's parameter names."""

    components: dict[str, dict[str, BaseDistribution]]
    shared: dict[str, BaseDistribution]
    defaults: dict[str, Any]

    def describe(self) -> dict[str, str]:
        flat = {f"{c}.{n}": d for c, space in self.components.items() for n, d in space.items()}
        flat.update({f"train.{n}": d for n, d in self.shared.items()})
        return {k: _describe(d) for k, d in flat.items()}

    def suggest(self, trial: Any, method: Method) -> Suggestion:
        overrides = {}
        for name, component in method.components().items():
            view = _Suggestions(trial, f"{name}.")
            overrides[name] = dict(type(component).search_space(view))
        train = {n: _suggest(trial, f"train.{n}", d) for n, d in self.shared.items()}
        return Suggestion(overrides, train)


def search_space(method: Method, cfg: TrainConfig) -> SearchSpace:
    """Probe and check every component's search space and the shared one; raise :class:`ConfigError` if malformed or empty."""
    components: dict[str, dict[str, BaseDistribution]] = {}
    defaults: dict[str, Any] = {}
    for name, component in method.components().items():
        owner = f"method {name}"
        probe = _Probe(owner, component.params)
        try:
            values = type(component).search_space(probe)  # type: ignore[arg-type]
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(f"search space of {owner} is malformed: {type(err).__name__}: {err}") from None
        if not isinstance(values, Mapping):
            raise ConfigError(f"search space of {owner} must return a dict of parameter values, got {type(values).__name__}")
        if set(values) != set(probe.space):
            raise ConfigError(f"search space of {owner} must return exactly the parameters it suggests, each under its own "
                              f"name: suggested {sorted(probe.space)}, returned {sorted(values)}")
        components[name] = probe.space
        defaults.update({f"{name}.{k}": getattr(component.params, k) for k in probe.space})
    shared = _shared_space(method)
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, dist in shared.items():
        value = getattr(cfg, name)
        if not _contains(dist, value):
            raise ConfigError(f"shared search space: the starting value {name}={value!r} lies outside {_describe(dist)}")
        defaults[f"train.{name}"] = value
    assert set(shared) <= train_fields
    if not defaults:
        raise ConfigError(f"nothing to tune for {method.name}: its components declare no search space and the "
                          "shared hyperparameters are fixed")
    return SearchSpace(components, shared, defaults)


def _shared_space(method: Method) -> dict[str, BaseDistribution]:
    """:data:`SHARED_SPACE` with each component's ``shared_space`` applied in recipe order."""
    space: dict[str, BaseDistribution | None] = dict(SHARED_SPACE)
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, component in method.components().items():
        for key, dist in getattr(type(component), "shared_space", {}).items():
            if key not in train_fields:
                raise ConfigError(f"method {name}: shared_space names {key!r}, which is not a trainer setting "
                                  f"({', '.join(sorted(train_fields))})")
            if dist is not None and not isinstance(dist, BaseDistribution):
                raise ConfigError(f"method {name}: shared_space[{key!r}] must be an optuna distribution or None, got {dist!r}")
            space[key] = dist
    return {k: v for k, v in space.items() if v is not None}


# --------------------------------------------------------------------------- storage and sampler
def default_storage(ws: Workspace) -> str:
    return f"sqlite:///{ws.root / 'optuna.db'}"


def masked(url: str) -> str:
    """The storage URL without its password, for logs and MLflow tags."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def open_storage(url: str, *, heartbeat: int | None = 60, grace: int | None = None, stale: Callable[..., None] | None = None) -> RDBStorage:
    """Open (creating the tables if needed) an Optuna RDB storage; a clear error if it cannot be opened.

    SQLite transactions start with ``BEGIN IMMEDIATE`` so that two workers never both take
    the same queued trial (SQLite ignores ``SELECT … FOR UPDATE``; optuna/optuna#4002).
    """
    sqlite = url.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
    try:
        if sqlite and url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        with _stable():
            storage = RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=grace,
                                 heartbeat_stale_trial_callback=stale)
        if sqlite:
            _immediate_transactions(storage.engine)
        storage.get_all_studies()
    except Exception as err:
        raise ConfigError(f"cannot open Optuna storage {masked(url)}: {type(err).__name__}: {err}") from None
    return storage


def _immediate_transactions(engine: Any) -> None:
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners were attached


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """TPE seeded with ``seed + trial number``: one worker is reproducible, and parallel
    workers never draw the same random candidates (as one seed shared by all would)."""

    def __init__(self, seed: int, n_startup_trials: int) -> None:
        self.seed, self.n_startup_trials = seed, n_startup_trials
        self._tpe = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._tpe = optuna.samplers.TPESampler(seed=self.seed + trial.number, n_startup_trials=self.n_startup_trials)
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, name: str, dist: BaseDistribution) -> Any:
        return self._tpe.sample_independent(study, trial, name, dist)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self._tpe.after_trial(study, trial, state, values)


# --------------------------------------------------------------------------- MLflow
class TrialTracker:
    """Our MLflow link (``optuna_integration.MLflowCallback`` is deprecated): a parent run per
    study and a nested run per trial, opened when the trial starts (per-epoch metrics) and
    closed by this object used as an Optuna study callback (state, value)."""

    STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}

    def __init__(self, ws: Workspace, exp_id: str, parent_id: str, tags: Mapping[str, str],
                 echo: Callable[[str], None]) -> None:
        self.ws, self.exp_id, self.parent_id, self.tags, self.echo = ws, exp_id, parent_id, dict(tags), echo

    def open(self, trial: optuna.Trial, method: Method, cfg: TrainConfig) -> RunLogger:
        retry_of = retried_number(trial)
        tags = {**self.tags, "kind": "trial", "mlflow.parentRunId": self.parent_id, "optuna.trial_number": str(trial.number),
                "optuna.state": "RUNNING", "mlflow.runName": f"trial {trial.number}", "code_version": code_version(),
                "worker": f"{socket.gethostname()}:{os.getpid()}"}
        if retry_of is not None:
            tags["optuna.retry_of"] = str(retry_of)
        run = self.ws.client.create_run(self.exp_id, tags=tags)
        log = RunLogger(self.ws, run.info.run_id)
        log.params({**{f"method.{k}": v for k, v in method.params().items()},
                    **{f"train.{k}": v for k, v in dataclasses.asdict(cfg).items()},
                    **{f"optuna.{k}": v for k, v in trial.params.items()}})
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        return log

    def close(self, run_id: str, status: str, state: str, **tags: str) -> None:
        log = RunLogger(self.ws, run_id)
        log.tags({"optuna.state": state, **tags})
        log.finish(status)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna study callback, after each finished trial."""
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id is None or trial.state not in self.STATUS:
            return
        log = RunLogger(self.ws, run_id)
        extra: dict[str, str] = {}
        if trial.value is not None:
            log.metrics({"objective": trial.value})
        if trial.state == TrialState.PRUNED:
            extra["pruned_at_epoch"] = str(max(trial.intermediate_values, default=-1) + 1)
        if "failure" in trial.user_attrs:
            extra["failure"] = str(trial.user_attrs["failure"])
        self.close(run_id, self.STATUS[trial.state], trial.state.name, **extra)
        shown = f"{trial.value:.4f}" if trial.value is not None else trial.user_attrs.get("failure", "")
        where = f" at epoch {extra['pruned_at_epoch']}" if "pruned_at_epoch" in extra else ""
        self.echo(f"trial {trial.number:>3} {trial.state.name.lower()}{where} {shown}  {_short(trial.params)}")
        self.summarize(study)

    def stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Heartbeat-stale trial (its process died): close its run, then queue a retry."""
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id is not None:
            self.close(run_id, "FAILED", "FAIL", failure="heartbeat_stale")
        self.echo(f"trial {trial.number:>3} stale (its worker died): queued again with the same parameters")
        retry(study, trial)

    def summarize(self, study: optuna.Study, status: str | None = None) -> None:
        """Best value and parameters so far on the study run."""
        log = RunLogger(self.ws, self.parent_id)
        counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
                  for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        log.metrics({f"trials_{k}": float(v) for k, v in counts.items()})
        if counts["complete"]:
            best = study.best_trial
            log.metrics({"best_value": float(best.value or 0.0)})
            log.tags({"best_trial": best.number, **{f"best.{k}": v for k, v in best.params.items()}})
        if status is not None:
            log.finish(status)


def retried_number(trial: optuna.Trial) -> int | None:
    """The number of the killed trial this one repeats, or None."""
    (frozen,) = [t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number]
    with _stable():
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)


def retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a copy of a killed trial (same parameters, its reported epochs kept)."""
    with _stable():
        RetryHeartbeatStaleTrialCallback(max_retry=3, inherit_intermediate_values=True)(study, trial)


def _short(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# --------------------------------------------------------------------------- the study
def study_identity(spec: RunSpec) -> dict[str, Any]:
    """What a study tunes: the run's configuration (as hashed for runs), its fold and seed."""
    identity = {**spec.config(), "fold": spec.fold, "seed": spec.seed}
    text = json.dumps(identity, sort_keys=True, default=str)
    return {**identity, "config_hash": hashlib.sha256(text.encode()).hexdigest()[:8]}


@dataclass(frozen=True)
class Budget:
    trials: int = 20  # the study's total, shared by all workers
    timeout: float | None = None  # seconds for this worker; a running trial finishes
    startup_trials: int = 5  # random TPE samples, and trials before the pruner acts
    warmup_epochs: int | None = None  # epochs before a trial can be pruned; None: a third of the epochs


@dataclass
class TuneResult:
    study_name: str
    storage: str
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, Any]
    counts: dict[str, int]


def tune(
    method_spec: str,
    dataset: str,
    ws: Workspace,
    *,
    data_root: str | None = None,
    fold: int = 0,
    seed: int = 0,
    n_folds: int = 3,
    split_seed: int = 0,
    cfg: TrainConfig = TrainConfig(),  # noqa: B008 - frozen
    runtime: Runtime = Runtime(),  # noqa: B008 - frozen
    budget: Budget = Budget(),
    storage: str | None = None,
    study_name: str | None = None,
    heartbeat: int = 60,
    grace: int | None = None,
    echo: Callable[[str], None] = print,
) -> TuneResult:
    """Run (or continue) the study of one method until it holds ``budget.trials`` trials."""
    from bench.cache import prepare
    from bench.runner import RunSpec, resolve_methods

    if budget.trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {budget.trials}")
    if budget.startup_trials < 0 or (budget.warmup_epochs or 0) < 0 or (budget.timeout is not None and budget.timeout <= 0):
        raise ConfigError(f"--startup-trials and --warmup-epochs must be >= 0 and --timeout > 0, got {budget}")
    method = resolve(method_spec)
    space = search_space(method, cfg)  # a malformed or empty space fails here, before anything is written
    url = storage or default_storage(ws)
    tracker: TrialTracker | None = None

    def on_stale(study: optuna.Study, trial: FrozenTrial) -> None:
        if tracker is not None:
            tracker.stale(study, trial)
        else:
            retry(study, trial)

    if not 0 <= fold < n_folds:
        raise ConfigError(f"--fold {fold} does not exist; folds are 0..{n_folds - 1}")
    warmup = budget.warmup_epochs if budget.warmup_epochs is not None else cfg.epochs // 3
    sampler = TrialSeededTPE(seed, budget.startup_trials)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=budget.startup_trials, n_warmup_steps=warmup)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    # first-time set-up of the stores and the data cache, by one process of this machine at a time
    # (SQLite files created by two processes at once break on their schema migrations)
    with _locked(ws.root / ".tune.lock"):
        rdb = open_storage(url, heartbeat=heartbeat, grace=grace, stale=on_stale)
        data = prepare(dataset, data_root, ws.data_dir, image_size=cfg.image_size, n_folds=n_folds,
                       split_seed=split_seed, progress=runtime.progress)
        (method,) = resolve_methods([method.name], cfg, len(data.class_names))
        spec = RunSpec(method, data.name, data_root, fold, seed, n_folds, split_seed, cfg)
        identity = study_identity(spec)
        name = study_name or f"{method.name}/{data.name}/f{fold}/{identity['config_hash']}"
        study = optuna.create_study(storage=rdb, study_name=name, direction="maximize", sampler=sampler,
                                    pruner=pruner, load_if_exists=True)
        _claim(study, identity, space, url)
        exp_id = ws.experiment_id(TUNE_EXPERIMENT)
        assert exp_id is not None
        tags = {"optuna.study": name, "optuna.storage": masked(url), "method": method.name, "dataset": data.name,
                "fold": str(fold), "seed": str(seed), "family": method.family}
        parent = find_run(ws, exp_id, {"kind": "study", "optuna.study": name})
        if parent is None:
            parent_id = _new_study_run(ws, exp_id, tags, spec, identity, space, budget)
        else:
            parent_id = parent.info.run_id
            ws.client.update_run(parent_id, "RUNNING")
        tracker = TrialTracker(ws, exp_id, parent_id, tags, echo)
        _requeue_interrupted(study)

    fold_data = data.fold(fold, monitor_fraction=cfg.monitor_fraction, select_on="inner")
    run_root = ws.root / "tune" / _slug(name)
    echo(f"study {name} on {masked(url)}: {_used(study)}/{budget.trials} trials so far")

    def objective(trial: optuna.Trial) -> float:
        assert tracker is not None
        suggestion = space.suggest(trial, method)
        trial.set_user_attr("overrides", suggestion.overrides)
        trial.set_user_attr("train", suggestion.train)
        trial_method = resolve(method.name, overrides=suggestion.overrides)
        trial_cfg = dataclasses.replace(cfg, **suggestion.train)
        key = retried_number(trial)
        run_dir = run_root / f"trial{trial.number if key is None else key}"
        log = tracker.open(trial, trial_method, trial_cfg)

        def report(epoch: int, record: dict[str, float]) -> None:
            log.metrics(record, step=epoch)
            score = record["monitor/score"]
            trial.report(score, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch + 1}: monitoring score {score:.4f} below the median")

        keep = False
        try:
            trainer = Trainer(trial_method, fold_data, trial_cfg, seed=seed, run_dir=run_dir, runtime=runtime,
                              callbacks=[report], meta={"study": name, "trial": trial.number})
            if trainer.resume():  # a retried trial: replay its logged epochs on the new run
                for epoch, record in enumerate(trainer.history):
                    log.metrics(record, step=epoch)
            return trainer.fit().best_score
        except NonFiniteLossError as err:
            trial.set_user_attr("failure", "nan_loss")
            trial.set_user_attr("failure_message", str(err)[:1000])
            raise
        except KeyboardInterrupt:
            keep = True  # the retry resumes from the checkpoint
            trial.set_user_attr("interrupted", True)
            tracker.close(log.run_id, "KILLED", "FAIL", failure="interrupted")
            raise
        except optuna.TrialPruned:
            raise
        except Exception as err:
            tracker.close(log.run_id, "FAILED", "FAIL", failure=type(err).__name__, failure_message=str(err)[:5000])
            raise
        finally:
            if not keep:
                shutil.rmtree(run_dir, ignore_errors=True)

    deadline = time.monotonic() + budget.timeout if budget.timeout else None
    interrupted = False
    try:
        while True:
            with _stable():
                optuna.storages.fail_stale_trials(study)  # reap trials of dead workers before counting
            if _used(study) >= budget.trials or (deadline is not None and time.monotonic() >= deadline):
                break
            study.optimize(objective, n_trials=1, catch=(NonFiniteLossError,), callbacks=[tracker])
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        complete = _used(study) >= budget.trials and not study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
        busy = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        tracker.summarize(study, "FINISHED" if complete else ("KILLED" if interrupted and not busy else None))
    return _result(study, url)


def _used(study: optuna.Study) -> int:
    """Trials that count against the budget: finished, running or queued, and those failed by their parameters (NaN loss)."""
    failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.user_attrs.get("failure") == "nan_loss"]
    return len(study.get_trials(deepcopy=False, states=_COUNTED)) + len(failed)


def _claim(study: optuna.Study, identity: dict[str, Any], space: SearchSpace, url: str) -> None:
    """Record what a new study tunes and queue trial 0; refuse a study made for another setup."""
    attrs = study.user_attrs.get(STUDY_ATTR)
    if attrs is None:
        study.set_user_attr(STUDY_ATTR, identity)
        study.set_user_attr("search_space", space.describe())
    elif attrs.get("config_hash") != identity["config_hash"]:
        diff = sorted(k for k in identity if attrs.get(k) != identity[k])
        raise ConfigError(f"study {study.study_name!r} in {masked(url)} was created for another setup "
                          f"(differs in: {', '.join(diff)}); pass another --study name")
    if not study.trials:
        study.enqueue_trial(space.defaults, user_attrs={"defaults": True}, skip_if_exists=True)


def _requeue_interrupted(study: optuna.Study) -> None:
    """Trials stopped by Ctrl-C are queued again once (same parameters; they resume from their checkpoint)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials} | {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried:
            retry(study, t)


def _new_study_run(ws: Workspace, exp_id: str, tags: Mapping[str, str], spec: RunSpec, identity: dict[str, Any],
                   space: SearchSpace, budget: Budget) -> str:
    run = ws.client.create_run(exp_id, tags={**tags, "kind": "study", "mlflow.runName": f"study {tags['optuna.study']}",
                                             "code_version": code_version()})
    log = RunLogger(ws, run.info.run_id)
    log.params({**{f"train.{k}": v for k, v in dataclasses.asdict(spec.train).items()},
                "data.n_folds": spec.n_folds, "data.split_seed": spec.split_seed, "data.root": spec.data_root,
                **{f"space.{k}": v for k, v in space.describe().items()}})
    log.json({**identity, "search_space": space.describe(), "defaults": space.defaults,
              "budget": dataclasses.asdict(budget)}, "study.json")
    return str(run.info.run_id)


def _result(study: optuna.Study, url: str) -> TuneResult:
    counts = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = study.best_trial if done else None
    return TuneResult(study.study_name, masked(url), best.number if best else None, best.value if best else None,
                      dict(best.params) if best else {}, {k: v for k, v in counts.items() if v})


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- bench run --tuned
@dataclass(frozen=True)
class Tuned:
    """The best trial of a study, ready for a benchmark run."""

    overrides: dict[str, dict[str, Any]]
    train: dict[str, Any]
    source: dict[str, str]  # study, trial, storage, value


class TunedParams:
    """Looks up, per (method, dataset, fold), the best trial of the matching study in a storage."""

    def __init__(self, url: str, studies: list[str] | None = None) -> None:
        self.url = url
        self.storage = open_storage(url, heartbeat=None)  # reading only
        self.studies = [s for s in self.storage.get_all_studies() if STUDY_ATTR in s.user_attrs]
        if studies:
            unknown = sorted(set(studies) - {s.study_name for s in self.studies})
            if unknown:
                raise ConfigError(f"no thyrobench study named {', '.join(unknown)} in {masked(url)}")
            self.studies = [s for s in self.studies if s.study_name in studies]

    def best(self, method: str, dataset: str, fold: int, cfg: TrainConfig, n_folds: int, split_seed: int) -> Tuned:
        found = [s for s in self.studies if s.user_attrs[STUDY_ATTR]["method"] == method
                 and s.user_attrs[STUDY_ATTR]["dataset"] == dataset]
        if not found:
            raise ConfigError(f"no study for {method} on {dataset} in {masked(self.url)}: run `bench tune --method {method}` first")
        run_train = dataclasses.asdict(cfg)

        def rank(s: Any) -> tuple[bool, bool, bool]:
            a = s.user_attrs[STUDY_ATTR]
            tuned = {k.removeprefix("train.") for k in s.user_attrs.get("search_space", {}) if k.startswith("train.")}
            same_setup = all(a["train"].get(k) == _jsonable(v) for k, v in run_train.items() if k not in tuned)
            return (a["fold"] == fold, a["n_folds"] == n_folds and a["split_seed"] == split_seed, same_setup)

        top = max(map(rank, found))
        candidates = [s for s in found if rank(s) == top]
        if len(candidates) > 1:
            raise ConfigError(f"several studies fit {method} on {dataset}, fold {fold}: "
                              f"{', '.join(s.study_name for s in candidates)}; choose with --study NAME")
        chosen = candidates[0]
        study = optuna.load_study(study_name=chosen.study_name, storage=self.storage)
        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            raise ConfigError(f"study {chosen.study_name!r} has no completed trial yet")
        best = study.best_trial
        overrides = {c: {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
                     for c, values in best.user_attrs["overrides"].items()}
        source = {"study": chosen.study_name, "trial": str(best.number), "storage": masked(self.url),
                  "value": f"{best.value:.6g}"}
        return Tuned(overrides, dict(best.user_attrs["train"]), source)

    def adapt(self, spec: RunSpec) -> RunSpec:
        """The planned run with the best trial's parameters, and where they came from (``bench run --tuned``)."""
        tuned = self.best(spec.method.name, spec.dataset, spec.fold, spec.train, spec.n_folds, spec.split_seed)
        method = resolve(spec.method.name, overrides=tuned.overrides)
        return dataclasses.replace(spec, method=method, train=dataclasses.replace(spec.train, **tuned.train),
                                   tuned=tuple(tuned.source.items()))
