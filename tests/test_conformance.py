"""Conformance of EVERY registered method (spine and plugins alike) on a tiny model.

For each name in the registry: bases run alone, regularizers and combiners on top of the
default base. One real ``Trainer.step`` on a tiny U-Net and a real synthetic dataset (so that a
component's ``prepare`` runs) must give a finite gradient on every trainable parameter, the
same gradients again from the same seed, and a checkpoint taken after one step and two epoch
ends (model, optimizer, RNG and the method's ``state_dict``) must resume, in a fresh trainer,
to exactly the same second step.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from bench.cache import prepare
from bench.data import Batch, FoldData, SampleSet
from bench.method import METHODS, resolve
from bench.trainer import Runtime, TrainConfig, Trainer

METHODS.load()
DATASET = "synthetic:patients=20,images_per_patient=2,size=64"
TINY = TrainConfig(epochs=1, iters_per_epoch=1, batch_size=4, image_size=32, encoder="tu-resnet10t",
                   decoder_channels=(16, 8, 8, 8, 8), patience=0, augment=False)
CPU = Runtime(device="cpu", progress=False)
# Single-task classifiers default to big timm models; their own quick-test variants keep this file fast.
# Recipes that stack a combiner on a base with extra loss terms and on a regularizer.
COMBOS = ["clinical+nash-mtl", "rlar+pcgrad"]
QUICK = {"st-effnet": "st-effnet:arch=efficientnet_b0", "st-convnext": "st-convnext:arch=convnext_atto"}


@pytest.fixture(scope="session")
def fold(tmp_path_factory: pytest.TempPathFactory) -> FoldData:
    data = prepare(DATASET, None, tmp_path_factory.mktemp("conformance-data"), image_size=TINY.image_size, n_folds=2, progress=False)
    return data.fold(0)


def make_trainer(name: str, fold: FoldData, run_dir: Path) -> Trainer:
    return Trainer(resolve(QUICK.get(name, name)), fold, TINY, seed=0, run_dir=run_dir, runtime=CPU)


def fixed_batch(trainer: Trainer) -> Batch:
    rows = trainer.fold.train[:4]
    items = default_collate([SampleSet(trainer.fold.data, rows, trainer.extras, augment=False)[i] for i in range(len(rows))])
    return Batch.collate(items, trainer.device)


def grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad and p.grad is not None}


def end_epoch(trainer: Trainer, losses: dict[str, float], epoch: int) -> None:
    """What the trainer does after an epoch: stateful epoch-level methods update here."""
    for component in trainer.method.components().values():
        component.on_epoch_end(epoch, losses)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", METHODS.names() + COMBOS)
def test_step_is_finite_deterministic_and_resumes(name: str, fold: FoldData, tmp_path: Path) -> None:
    straight = make_trainer(name, fold, tmp_path / "a")
    batch = fixed_batch(straight)
    losses = straight.step(batch, 0)
    assert all(math.isfinite(v) for v in losses.values())
    first = grads(straight)
    trainable = {n for n, p in straight.model.named_parameters() if p.requires_grad}
    assert trainable - first.keys() == set(), f"{name}: parameters without a gradient"
    assert all(bool(torch.isfinite(g).all()) for g in first.values()), f"{name}: non-finite gradient"
    assert any(bool(g.abs().sum() > 0) for g in first.values())
    end_epoch(straight, losses, 0)  # two epoch ends, so that epoch-level state (DWA, GradNorm) is used
    end_epoch(straight, losses, 1)
    for component in straight.method.components().values():
        assert all(math.isfinite(v) for v in component.diagnostics().values())
    state = copy.deepcopy(straight.method.state_dict())
    straight.save()
    straight.step(batch, 1)
    second = grads(straight)

    again = make_trainer(name, fold, tmp_path / "b")  # the same seed from scratch: the same gradients
    again.step(fixed_batch(again), 0)
    assert_same(first, grads(again))

    resumed = make_trainer(name, fold, tmp_path / "a")  # a fresh process resuming from last.pt
    assert resumed.resume()
    assert_state_equal(resumed.method.state_dict(), state)
    resumed.step(batch, 1)
    assert_same(second, grads(resumed))


def assert_state_equal(a: object, b: object) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_state_equal(x, y)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b)
    else:
        assert a == b
