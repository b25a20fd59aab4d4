"""Clinical guidance: the head, the guidance loss, z-scoring per fold, recipes, and `bench explain`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from bench.datasets.radiomics import RadiomicsSettings, dataset_radiomics, standardize
from bench.methods.clinical import TARGETS, VALID, Clinical, guidance_loss
from click.testing import CliRunner

from bench.cache import prepare
from bench.cli import main
from bench.data import Batch, FoldData
from bench.errors import ConfigError
from bench.explain import channel_disabled, explain_run
from bench.method import METHODS, StepContext, recipes, resolve
from bench.models import ModelSpec
from bench.runner import run_grid
from bench.tracking import Workspace, all_runs
from bench.trainer import Runtime, TrainConfig, Trainer

SPEC = ModelSpec("tu-resnet10t", 5, 1, (16, 8, 8, 8, 8))
DATASET = "synthetic:patients=20,images_per_patient=2,size=64"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return Clinical().build_model(SPEC).eval()


def test_ablation_zeroes_exactly_one_classifier_column_and_restores_it(model):
    channels = Clinical().guidance_channels(model)
    assert list(channels) == list(Clinical().features) and len(channels) == 13
    x = torch.randn(3, 1, 64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = model(x)
        bottleneck = out.features["bottleneck"]  # the encoder is untouched (checked below): re-run the head only
    for j, (name, (weight, column)) in enumerate(channels.items()):
        assert column == j
        with channel_disabled(weight, column):
            during = model.state_dict()
            changed = [k for k in before if not torch.equal(before[k], during[k])]
            assert changed == ["head.classifier.weight"], name
            diff = before["head.classifier.weight"] != during["head.classifier.weight"]
            assert diff[:, j].all() and not diff[:, np.arange(diff.shape[1]) != j].any()
            with torch.no_grad():
                ablated, _ = model.head(bottleneck)
        # the logits lose exactly that channel's contribution
        expected = out.cls - out.embedding[:, j : j + 1] * before["head.classifier.weight"][:, j]
        torch.testing.assert_close(ablated, expected, rtol=1e-5, atol=1e-5)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_guidance_loss_is_the_mse_of_the_defined_entries_only():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0], [1.0, 100.0]])
    valid = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss = guidance_loss(pred, target, valid)
    assert loss.item() == pytest.approx((1 + 4 + 4) / 3)
    loss.backward()
    assert pred.grad[1, 1] == 0 and pred.grad[0, 0] == pytest.approx(2 * 1 / 3)
    none = guidance_loss(pred, target, torch.zeros(2, 2))
    assert none.item() == 0 and none.requires_grad


def test_guidance_is_an_extra_term_training_encoder_and_head_not_decoder():
    base = Clinical()
    model = base.build_model(SPEC).train()
    batch_extras = {TARGETS: torch.randn(2, 13), VALID: torch.ones(2, 13)}
    batch = Batch(torch.randn(2, 1, 64, 64), torch.zeros(2, 1, 64, 64), torch.tensor([0, 3]), torch.tensor([0, 1]),
                  batch_extras)
    losses = base.losses(model(batch.image), batch, StepContext(0, 0, torch.ones(5)))
    assert set(losses.tasks) == {"seg", "cls"} and set(losses.extra) == {"clin"}
    losses.extra["clin"].backward()
    assert model.head.project.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.decoder.parameters())
    assert model.head.classifier.weight.grad is None  # the classifier is trained by the CE, not the guidance


@pytest.fixture(scope="module")
def fold(tmp_path_factory: pytest.TempPathFactory) -> FoldData:
    return prepare(DATASET, None, tmp_path_factory.mktemp("clinical-data"), image_size=64, n_folds=2, progress=False).fold(1)


def test_targets_are_z_scored_with_the_training_rows_of_the_fold(fold):
    data = fold.data
    got = Clinical().prepare(fold)
    radiomics = dataset_radiomics(data, RadiomicsSettings())
    values, valid = radiomics.select(Clinical().features)
    expected = standardize(values, valid, fold.train)
    np.testing.assert_array_equal(got[TARGETS], expected.z)
    z_train = got[TARGETS][fold.train]
    np.testing.assert_allclose(z_train.mean(axis=0), 0, atol=1e-4)  # synthetic masks are all valid
    everywhere = standardize(values, valid, np.flatnonzero(data.table["fold"].to_numpy() >= 0))
    assert not np.allclose(everywhere.mean, expected.mean)  # the held-out rows would move the statistics


def test_guidance_trains_under_a_regularizer_and_a_gradient_combiner(fold, tmp_path):
    """One real step of clinical + each role's first registered component: the guidance term is there and finite."""
    METHODS.load()
    picks = {}
    for name in METHODS.names():
        info = METHODS.get(name).info
        if info.role in ("regularizer", "combiner") and (not info.bases or "clinical" in info.bases):
            picks.setdefault(info.role, name)
    cfg = TrainConfig(epochs=1, iters_per_epoch=1, batch_size=4, image_size=64, encoder="tu-resnet10t",
                      decoder_channels=(16, 8, 8, 8, 8), patience=0, augment=False)
    for name in picks.values():
        trainer = Trainer(resolve(f"clinical+{name}"), fold, cfg, seed=0, run_dir=tmp_path / name,
                          runtime=Runtime(device="cpu", progress=False))
        batch = next(iter(trainer._batches(0)))
        losses = trainer.step(batch, 0)
        assert "clin" in losses and math.isfinite(losses["clin"]) and losses["clin"] > 0, name
        head = trainer.model.head
        assert bool(torch.isfinite(head.project.weight.grad).all()) and head.project.weight.grad.abs().sum() > 0


def test_recipes_pair_every_multi_task_base_with_every_regularizer_and_combiner():
    combos = recipes()
    METHODS.load()
    classes = [METHODS.get(n) for n in METHODS.names()]
    for other in (c for c in classes if c.info.role in ("regularizer", "combiner")):
        assert (f"clinical+{other.info.name}" in combos) == (not other.info.bases or "clinical" in other.info.bases)
        for base in (c for c in classes if c.info.role == "base" and len(c.tasks) < other.info.min_tasks):
            assert f"{base.info.name}+{other.info.name}" not in combos
    for recipe in (r for r in combos if r.startswith("clinical+")):
        method = resolve(recipe)
        assert isinstance(method.base, Clinical) and method.name == recipe


def test_explain_logs_table_figure_and_deltas_to_the_run(tmp_path):
    ws = Workspace(tmp_path / "ws")
    cfg = TrainConfig(epochs=1, iters_per_epoch=1, batch_size=4, image_size=64, encoder="tu-resnet10t",
                      decoder_channels=(16, 8, 8, 8, 8), patience=0)
    (outcome,) = run_grid(["clinical"], DATASET, ws, n_folds=2, folds=[0], cfg=cfg,
                          runtime=Runtime(device="cpu", progress=False), echo=lambda s: None)
    external = "synthetic:patients=6,images_per_patient=1,size=64,seed=7"  # zero-shot set, as AIMI in Table 5
    printed = CliRunner().invoke(main, ["explain", "--run-id", outcome.run_id, "--device", "cpu", "--external", external,
                                        "--workspace", str(ws.root)], catch_exceptions=False)
    assert printed.exit_code == 0, printed.output
    header = "| feature | val Δprecision | val Δrecall | val Δf1 | external/synthetic Δprecision |"
    assert printed.stdout.splitlines()[0].startswith(header[:-2])  # stdout: the adapters' progress goes to stderr
    assert len(printed.stdout.splitlines()) == 2 + 13
    table = explain_run(ws, outcome.run_id, Runtime(device="cpu", progress=False))  # again, without the external set
    assert sorted(table["feature"].unique()) == sorted(Clinical().features)
    assert set(table["metric"]) == {"precision", "recall", "f1"} and set(table["set"]) == {"val"}
    # the intact model reproduces the run's own evaluation
    for metric in ("precision", "recall", "f1"):
        baseline = table[table["metric"] == metric]["baseline"].unique()
        assert len(baseline) == 1 and baseline[0] == pytest.approx(outcome.metrics[f"val/{metric}"], abs=1e-9)
    assert np.allclose(table["delta"], table["ablated"] - table["baseline"])
    run = ws.client.get_run(outcome.run_id)
    logged = {k: v for k, v in run.data.metrics.items() if k.startswith("explain/")}
    assert len(logged) == 13 * 3 * 2  # val and external/synthetic
    assert math.isfinite(logged["explain/val/delta_f1/circularity"])
    files = {Path(a.path).name for a in ws.client.list_artifacts(outcome.run_id, "explain")}
    assert files == {"feature_importance.csv", "feature_importance.md", "feature_importance.png"}
    assert len([r for r in all_runs(ws)]) == 1  # logged into that run, no new one
    with pytest.raises(ConfigError, match="no run 'nope'"):
        explain_run(ws, "nope")
