"""Optuna tuning (bench.tune): search-space contract, a real small study with pruning,
resume after a killed worker, two workers on one storage, ``bench run --tuned``."""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
from bench.methods.vanilla import Vanilla
from click.testing import CliRunner
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from bench import params as P
from bench.cli import main
from bench.errors import ConfigError
from bench.method import METHODS, Combiner, Method, MethodInfo, resolve
from bench.params import param
from bench.results import runs_frame
from bench.tracking import Workspace, all_runs
from bench.trainer import Runtime, TrainConfig
from bench.tune import TUNE_EXPERIMENT, Budget, TunedParams, default_storage, open_storage, search_space, tune

DATASET = "synthetic:patients=24,images_per_patient=2,size=64"
TINY = TrainConfig(epochs=2, iters_per_epoch=2, batch_size=4, patience=0, image_size=64, encoder="tu-resnet10t",
                   decoder_channels=(32, 16, 16, 8, 8))
CLI_TINY = ["--dataset", DATASET, "--folds", "2", "--iters", "1", "--batch-size", "4", "--patience", "0",
            "--image-size", "64", "--encoder", "tu-resnet10t", "--no-progress", "--startup-trials", "2", "--warmup-epochs", "0"]


def _method(cls: type, name: str = "probe") -> Method:
    return Method(base=cls(), regularizers=[], combiner=Combiner(), name=name)


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


# --------------------------------------------------------------------------- the contract
def test_search_space_combines_components_and_shared_hyperparameters():
    space = search_space(resolve("vanilla"), TrainConfig())
    assert space.components == {"vanilla": {"w_cls": FloatDistribution(0.1, 10.0, log=True)}}
    assert set(space.shared) == {"lr", "weight_decay"}
    assert space.defaults == {"vanilla.w_cls": 1.0, "train.lr": 3e-4, "train.weight_decay": 1e-2}

    class Narrowed(Vanilla):  # a plugin narrowing lr and fixing weight decay
        info = MethodInfo("narrowed", "base", "mtl", "", "")
        shared_space = {"lr": FloatDistribution(1e-4, 1e-3, log=True), "weight_decay": None}

    space = search_space(_method(Narrowed), TrainConfig())
    assert space.shared == {"lr": FloatDistribution(1e-4, 1e-3, log=True)}
    assert space.describe() == {"narrowed.w_cls": "float [0.1, 10.0] log", "train.lr": "float [0.0001, 0.001] log"}


@pytest.mark.parametrize("name", METHODS.names())
def test_every_registered_method_has_a_well_formed_search_space(name):
    method = resolve(name)
    space = search_space(method, TrainConfig())
    for component, params in space.components.items():  # each suggestion is a parameter of its component
        assert set(params) <= set(P.as_dict(method.components()[component].params))
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    for component in method.components().values():  # a sampled value is in the parameter's declared range
        P.build(component.Params, component.search_space(trial), owner=component.info.name)
    assert {"train.lr", "train.weight_decay"} & set(space.defaults) or space.components


@dataclass(frozen=True)
class _Weights:
    w: float = param(1.0, "a weight", low=0.0)


def _base(space, shared=None) -> Method:  # noqa: ANN001 - test helper
    attrs = {"info": MethodInfo("bad", "base", "mtl", "", ""), "Params": _Weights, "search_space": classmethod(space)}
    if shared is not None:
        attrs["shared_space"] = shared
    return _method(type("Bad", (Vanilla,), attrs))


@pytest.mark.parametrize("space, shared, message", [
    (lambda cls, t: {}, {"lr": None, "weight_decay": None}, "nothing to tune for probe"),
    (lambda cls, t: {"v": t.suggest_float("v", 0.1, 1.0)}, None, "suggests 'v', which is not one of its parameters .w."),
    (lambda cls, t: {"w": t.suggest_float("w", 2.0, 1.0)}, None, "bad range for w"),
    (lambda cls, t: {"w": t.suggest_float("w", -1.0, 2.0)}, None, "reaches outside the parameter's range.*w=-1.0"),
    (lambda cls, t: {"w": t.suggest_float("w", 2.0, 5.0)}, None, "default w=1.0 .trial 0. lies outside float .2.0, 5.0."),
    (lambda cls, t: {"x": t.suggest_float("w", 0.5, 2.0)}, None, "must return exactly the parameters it suggests"),
    (lambda cls, t: t.suggest_float("w", 0.5, 2.0), None, "must return a dict"),
    (lambda cls, t: {"w": t.suggest_uniform("w", 0.5, 2.0)}, None, "malformed: AttributeError"),
    (lambda cls, t: {}, {"learning_rate": None}, "'learning_rate', which is not a trainer setting"),
    (lambda cls, t: {}, {"lr": (1e-4, 1e-3)}, "must be an optuna distribution or None"),
])
def test_malformed_search_space_is_a_clear_error(space, shared, message):  # noqa: ANN001
    with pytest.raises(ConfigError, match=message):
        search_space(_base(space, shared), TrainConfig())


def test_unopenable_storage_fails_before_anything_is_written(tmp_path):
    for url in ("nosuchdb://host/x", f"sqlite:///{tmp_path}/file/inside/a/file.db"):
        (tmp_path / "file").write_text("not a folder")
        with pytest.raises(ConfigError, match="cannot open Optuna storage"):
            open_storage(url)
    ws = tmp_path / "ws"
    result = CliRunner().invoke(main, ["tune", "--method", "vanilla", "--storage", "nosuchdb://host/x", "--workspace", str(ws),
                                       "--epochs", "2", *CLI_TINY])
    assert result.exit_code == 1 and "cannot open Optuna storage nosuchdb://host/x" in result.output
    assert not (ws / "mlflow.db").exists() and not (ws / "data").exists()
    result = CliRunner().invoke(main, ["tune", "--method", "vanilla", "--trials", "0", "--workspace", str(ws), "--epochs", "2", *CLI_TINY])
    assert result.exit_code == 1 and "--trials must be at least 1" in result.output


def test_interrupted_trial_is_queued_again_once():
    from bench.tune import _requeue_interrupted

    study = optuna.create_study(direction="maximize")
    dist = {"train.lr": FloatDistribution(1e-5, 1e-2, log=True)}
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params={"train.lr": 1e-3}, distributions=dist,
                                              user_attrs={"interrupted": True}))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params={"train.lr": 2e-3}, distributions=dist,
                                              user_attrs={"failure": "nan_loss"}))
    for _ in range(2):
        _requeue_interrupted(study)
    (waiting,) = study.get_trials(states=(TrialState.WAITING,))
    assert waiting.params == {"train.lr": 1e-3} and waiting.system_attrs["failed_trial"] == 0


# --------------------------------------------------------------------------- a real study
@pytest.fixture(scope="module")
def study_ws(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("tune"))
    result = tune("vanilla", DATASET, ws, n_folds=2, cfg=TINY, runtime=Runtime(progress=False),
                  budget=Budget(trials=6, startup_trials=2, warmup_epochs=0), echo=lambda s: None)
    return ws, result


def test_small_study_prunes_by_the_median_rule(study_ws):
    ws, result = study_ws
    study = optuna.load_study(study_name=result.study_name, storage=default_storage(ws))
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(6)) and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert trials[0].params == {"vanilla.w_cls": 1.0, "train.lr": 3e-4, "train.weight_decay": 1e-2}  # trial 0 = defaults
    assert trials[0].user_attrs["defaults"] is True
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "the median pruner pruned nothing"
    for t in pruned:  # independently: its last score is below the median of trials completed before it, at that epoch
        step = max(t.intermediate_values)
        assert step < TINY.epochs - 1
        earlier = [c.intermediate_values[step] for c in trials if c.state == TrialState.COMPLETE
                   and c.datetime_complete < t.datetime_complete and step in c.intermediate_values]
        assert len(earlier) >= 2 and t.intermediate_values[step] < np.median(earlier)
    for t in trials:
        if t.state == TrialState.COMPLETE:  # the objective is the best epoch's monitoring score
            assert sorted(t.intermediate_values) == list(range(TINY.epochs))
            assert t.value == pytest.approx(max(t.intermediate_values.values()))
    assert not any((ws.root / "tune").rglob("*.pt")), "a trial left a checkpoint behind"


def test_every_trial_is_a_nested_mlflow_run(study_ws):
    ws, result = study_ws
    study = optuna.load_study(study_name=result.study_name, storage=default_storage(ws))
    runs = all_runs(ws, TUNE_EXPERIMENT)
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "study"]
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == str(study.best_trial.number)
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    children = {int(r.data.tags["optuna.trial_number"]): r for r in runs if r.data.tags.get("kind") == "trial"}
    assert sorted(children) == [t.number for t in study.trials]
    for t in study.trials:
        run = children[t.number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["optuna.state"] == t.state.name
        assert run.info.status == {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}[t.state]
        assert float(run.data.params["train.lr"]) == pytest.approx(t.params["train.lr"])
        history = ws.client.get_metric_history(run.info.run_id, "monitor/score")
        assert {m.step: m.value for m in history} == pytest.approx(t.intermediate_values)
    assert runs_frame(ws).empty  # tuning runs are not benchmark results


def test_run_tuned_uses_and_records_the_best_trial(study_ws):
    from bench.runner import run_grid

    ws, result = study_ws
    study = optuna.load_study(study_name=result.study_name, storage=default_storage(ws))
    best = study.best_trial
    tuned = TunedParams(default_storage(ws))
    cfg = dataclasses.replace(TINY, epochs=1)
    outcomes = run_grid(["vanilla"], DATASET, ws, n_folds=2, folds=[1], cfg=cfg, runtime=Runtime(progress=False),
                        adapt=tuned.adapt, echo=lambda s: None)
    (outcome,) = outcomes
    spec = outcome.spec
    assert spec.method.base.params.w_cls == best.params["vanilla.w_cls"] and spec.train.lr == best.params["train.lr"]
    assert spec.train.epochs == 1  # the run's own setting; only tuned values change
    untuned = dataclasses.replace(spec, method=resolve("vanilla"), train=cfg, tuned=())
    assert spec.config_hash() != untuned.config_hash()
    run = ws.client.get_run(outcome.run_id)
    assert run.data.tags["tuned.study"] == result.study_name and run.data.tags["tuned.trial"] == str(best.number)
    assert run.data.params["tuned.storage"] == default_storage(ws) and run.info.status == "FINISHED"
    assert run.data.tags["method"] == spec.method.name + " [tuned]"  # its own results row, never averaged with untuned runs
    with pytest.raises(ConfigError, match="no study for st-unet"):
        tuned.best("st-unet", spec.dataset, 0, cfg, 2, 0)


# --------------------------------------------------------------------------- processes
def _bench_tune(ws: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from bench.cli import main; main()", "tune", "--method", "vanilla", "--workspace", str(ws),
           *CLI_TINY, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ws.parent, env=env)


def _trial_rows(db: Path) -> list[tuple[int, str, int]]:
    """(number, state, reported epochs) straight from the storage, without Optuna."""
    try:
        with sqlite3.connect(db, timeout=30) as con:
            return con.execute("select number, state, (select count(*) from trial_intermediate_values v "
                               "where v.trial_id = t.trial_id) from trials t order by number").fetchall()
    except sqlite3.OperationalError:
        return []


def test_killed_worker_study_resumes(tmp_path):
    ws = tmp_path / "ws"
    first = _bench_tune(ws, "--trials", "3", "--heartbeat", "1", "--epochs", "3")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill it in the middle of a trial, after one finished
        rows = _trial_rows(ws / "optuna.db")
        if any(s == "COMPLETE" for _, s, _ in rows) and any(s == "RUNNING" and n > 0 for _, s, n in rows):
            break
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.communicate()
    storage = default_storage(Workspace(ws))
    (name,) = optuna.get_all_study_names(storage)
    before = {t.number: t for t in optuna.load_study(study_name=name, storage=storage).trials}
    (killed,) = [t for t in before.values() if t.state == TrialState.RUNNING]
    time.sleep(2.5)  # past the grace period (2 heartbeats)
    second = _bench_tune(ws, "--trials", "3", "--heartbeat", "1", "--epochs", "3")
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    assert f"trial {killed.number:>3} stale" in out
    study = optuna.load_study(study_name=name, storage=storage)
    trials = {t.number: t for t in study.trials}
    for n, t in before.items():  # the trials finished before the kill are kept as they were
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            assert trials[n].state == t.state and trials[n].value == t.value
    assert trials[killed.number].state == TrialState.FAIL
    (retry,) = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.params == killed.params and retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    for step, value in killed.intermediate_values.items():  # resumed: the epochs reported before the kill are kept
        assert retry.intermediate_values[step] == value
    assert len(_finished(study)) == 3 and not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    runs = {r.data.tags["optuna.trial_number"]: r for r in all_runs(Workspace(ws), TUNE_EXPERIMENT) if r.data.tags.get("kind") == "trial"}
    assert runs[str(killed.number)].info.status == "FAILED" and runs[str(killed.number)].data.tags["failure"] == "heartbeat_stale"
    assert runs[str(retry.number)].data.tags["optuna.retry_of"] == str(killed.number)
    assert not any(r.info.status == "RUNNING" for r in all_runs(Workspace(ws), TUNE_EXPERIMENT))


def test_two_workers_share_one_storage(tmp_path):
    ws = tmp_path / "ws"
    workers = [_bench_tune(ws, "--trials", "6", "--epochs", "2") for _ in range(2)]
    outs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outs
    storage = default_storage(Workspace(ws))
    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).trials
    # the budget is the study's: 6, or 7 when both workers start their last trial at the same moment
    assert 6 <= len(trials) <= 7 and [t.number for t in trials] == list(range(len(trials)))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)  # none lost
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == len(params)  # none doubled (the queued defaults were taken once)
    assert sum(bool(t.user_attrs.get("defaults")) for t in trials) == 1
    runs = [r for r in all_runs(Workspace(ws), TUNE_EXPERIMENT) if r.data.tags.get("kind") == "trial"]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs) == [t.number for t in trials]
    assert len({r.data.tags["worker"] for r in runs}) == 2, "one worker did all the trials"
    assert len([r for r in all_runs(Workspace(ws), TUNE_EXPERIMENT) if r.data.tags.get("kind") == "study"]) == 1
