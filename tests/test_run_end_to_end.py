"""`bench run` end to end on a tiny synthetic set: what MLflow holds, idempotence, resume after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from bench.cli import main
from bench.method import resolve
from bench.runner import RunSpec, run_grid
from bench.tracking import Workspace, all_runs
from bench.trainer import Runtime, TrainConfig

DATASET = "synthetic:patients=20,images_per_patient=2,size=64"
TINY = TrainConfig(epochs=2, iters_per_epoch=2, batch_size=4, image_size=64, encoder="tu-resnet10t",
                   decoder_channels=(16, 8, 8, 8, 8), patience=0)
QUIET = Runtime(progress=False)


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ws")
    cli("run", "--quick", "--methods", "vanilla,st-unet", "--dataset", DATASET, "--folds", "2", "--epochs", "2",
        "--iters", "2", "--no-progress", "--workspace", str(root))
    return root


def test_one_finished_run_per_method_fold_seed_with_tags_params_metrics(workspace):
    runs = all_runs(Workspace(workspace))
    assert sorted((r.data.tags["method"], r.data.tags["fold"], r.data.tags["seed"]) for r in runs) == [
        ("st-unet", "0", "0"), ("st-unet", "1", "0"), ("vanilla", "0", "0"), ("vanilla", "1", "0")]
    for run in runs:
        tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
        assert run.info.status == "FINISHED"
        assert tags["dataset"] == "synthetic:images_per_patient=2,patients=20,size=64"  # canonical: keys sorted
        assert len(tags["config_hash"]) == 16 and tags["code_version"]
        assert params["train.image_size"] == "64" and params["train.encoder"] == "tu-resnet10t"
        assert 0.0 <= metrics["val/dice"] <= 1.0 and metrics["val/hd95"] >= 0.0
        assert metrics["epochs_trained"] == 2.0 and metrics["best_epoch"] in (0.0, 1.0)
        if tags["method"] == "vanilla":
            assert params["method.vanilla.w_cls"] == "1.0"
            assert {"val/f1", "val/auc", "val/kappa", "val/balanced_accuracy"} <= set(metrics)
        else:
            assert "val/f1" not in metrics  # a segmenter has no classification metrics


def test_per_epoch_metrics_and_artifacts(workspace):
    ws = Workspace(workspace)
    run = next(r for r in all_runs(ws) if r.data.tags["method"] == "vanilla" and r.data.tags["fold"] == "1")
    history = ws.client.get_metric_history(run.info.run_id, "monitor/score")
    assert [m.step for m in history] == [0, 1]
    local = Path(ws.client.download_artifacts(run.info.run_id, "", str(workspace / "dl")))
    files = {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
    assert {"config.json", "checkpoints/best.pt", "predictions/val.csv", "figures/confusion_val.png",
            "figures/training_curves.png", "metrics/confusion_val.json"} <= files
    config = json.loads((local / "config.json").read_text())
    assert config["method"] == "vanilla" and config["fold"] == 1 and config["train"]["iters_per_epoch"] == 2
    predictions = pd.read_csv(local / "predictions/val.csv")
    assert {"sample_id", "patient_id", "fold", "seed", "label", "pred", "prob_0", "dice", "iou", "hd95"} <= set(predictions)
    assert predictions["fold"].eq(1).all()
    # the logged per-sample Dice averages to the logged val/dice
    assert predictions["dice"].mean() == pytest.approx(run.data.metrics["val/dice"], abs=1e-5)
    # every held-out patient of fold 1, and only those
    folds = next((workspace / "data").glob("synthetic-*/folds-k2-s0.csv"))
    held = pd.read_csv(folds, dtype={"sample_id": str}).query("fold == 1")["sample_id"]
    assert sorted(predictions["sample_id"]) == sorted(held)
    best = torch.load(local / "checkpoints/best.pt", weights_only=True)
    assert best["epoch"] == run.data.metrics["best_epoch"]


def test_rerun_skips_finished_runs_and_results_table(workspace):
    before = {r.info.run_id for r in all_runs(Workspace(workspace))}
    out = cli("run", "--quick", "--methods", "vanilla", "--dataset", DATASET, "--folds", "2", "--epochs", "2",
              "--iters", "2", "--no-progress", "--workspace", str(workspace))
    assert {r.info.run_id for r in all_runs(Workspace(workspace))} == before
    assert out.count("skip") == 2
    table = cli("results", "--workspace", str(workspace))
    row = next(line for line in table.splitlines() if " vanilla " in line)
    assert row.rstrip().endswith(" 2")  # n = 2 folds x 1 seed
    assert "±" in row
    assert not list((workspace / "runs").rglob("*.pt"))  # finished runs leave no checkpoints behind


def test_config_hash_ignores_fold_and_seed_but_not_what_changes_the_result():
    def spec(method="vanilla", fold=0, seed=0, cfg=TINY):
        return RunSpec(resolve(method), DATASET, None, fold, seed, 2, 0, cfg)

    base = spec().config_hash()
    assert spec(fold=1, seed=3).config_hash() == base
    assert spec("vanilla:w_cls=1.0").config_hash() == base  # a default spelled out is the same method
    assert spec("vanilla:w_cls=2").config_hash() != base
    assert spec(cfg=TrainConfig(**{**TINY.__dict__, "lr": 1e-3})).config_hash() != base
    assert spec(cfg=TrainConfig(**{**TINY.__dict__, "select_on": "heldout"})).config_hash() != base
    assert spec("st-unet").config_hash() != base


class Kill(Exception):
    """Stands in for the process being killed after an epoch's checkpoint."""


def test_a_killed_run_resumes_where_it_stopped_and_matches_an_uninterrupted_one(tmp_path):
    cfg = TrainConfig(**{**TINY.__dict__, "epochs": 3})

    def grid(root: Path, callbacks=()):
        return run_grid(["vanilla"], DATASET, Workspace(root), n_folds=2, folds=[0], cfg=cfg, runtime=QUIET,
                        extra_callbacks=list(callbacks), echo=lambda s: None)

    whole = grid(tmp_path / "whole")[0]

    def kill_after_second_epoch(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt  # what Ctrl-C or a kill looks like to the runner

    ws = Workspace(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        grid(ws.root, [kill_after_second_epoch])
    [run] = all_runs(ws)
    assert run.info.status == "KILLED"
    assert list((ws.root / "runs").rglob("last.pt"))  # the checkpoint of the first epoch survives

    resumed = grid(ws.root)[0]
    [run] = all_runs(ws)  # the same MLflow run, resumed, not a second one
    assert resumed.run_id == run.info.run_id and run.info.status == "FINISHED"
    steps = [m.step for m in ws.client.get_metric_history(run.info.run_id, "monitor/score")]
    assert sorted(set(steps)) == [0, 1, 2]
    # resuming restores model, optimizer, RNG and data order exactly: the same result as no kill
    [reference] = all_runs(Workspace(tmp_path / "whole"))
    assert whole.status == "finished"
    for key in ("val/dice", "val/f1", "val/auc", "val/hd95", "monitor/score", "best_epoch"):
        assert run.data.metrics[key] == pytest.approx(reference.data.metrics[key], abs=1e-6), key
