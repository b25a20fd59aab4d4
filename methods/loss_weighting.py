"""Loss weighting from loss values alone: uncertainty weighting (UW) and DWA.

* UW: Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
  Geometry and Semantics", CVPR 2018. L = sum_i 0.5 exp(-s_i) L_i + 0.5 s_i with s_i = log
  sigma_i^2 learned, s = 0 at the start (paper, torchjd ``UW``; LibMTL starts at -0.5). The same
  form for the classification and the segmentation loss (as LibMTL and torchjd). Departure: s is
  learned by its own Adam (``lr``, no weight decay) instead of the network's optimizer.
* DWA: Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019.
  Weights K softmax(r / T), r_i = Lbar_i(e-1) / Lbar_i(e-2) from epoch-mean training losses,
  T = 2; weights 1 for the first two epochs (paper, LibMTL, torchjd ``DWA``).

Both weight the whole loss, heads included (as in the papers). STATEFUL: UW's s and its Adam
state, DWA's last two epoch-mean losses are checkpointed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bench.gradients import LearnedTaskVector, LossWeighting
from bench.method import Losses, MethodInfo, StepContext, register
from bench.params import param


@dataclass(frozen=True)
class UWParams:
    lr: float = param(3e-4, "Adam learning rate of the log-variances", low=0.0, low_open=True)
    init: float = param(0.0, "initial log-variance s (LibMTL: -0.5)")


def uw_loss(losses: Tensor, log_vars: Tensor) -> Tensor:
    return (0.5 * torch.exp(-log_vars) * losses + 0.5 * log_vars).sum()


@register
class UncertaintyWeighting(LossWeighting):
    info = MethodInfo("uw", "combiner", "loss-weighting", "Kendall et al., CVPR 2018 (uncertainty weighting)",
                      "weight each loss by a learned homoscedastic uncertainty", min_tasks=2)
    Params = UWParams

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.weights = LearnedTaskVector(init=self.params.init, lr=self.params.lr)  # the log-variances s

    @property
    def log_vars(self) -> Tensor | None:
        return self.weights.value

    def backward(self, losses: Losses, model: nn.Module, step: StepContext) -> None:
        names = self.task_names = list(losses.tasks)
        log_vars = self.weights.ensure(len(names))
        values = torch.stack([losses.tasks[n].float() for n in names])
        weights = 0.5 * torch.exp(-log_vars.detach().to(values.device))
        self.record_weights(names, weights)
        total = (weights * values).sum() + sum(losses.extra.values())
        step.scale(total).backward()
        with torch.enable_grad():  # d/ds of the UW objective, from the detached losses
            (grad,) = torch.autograd.grad(uw_loss(values.detach().cpu(), log_vars), log_vars)
        self.weights.step(grad)

    def state_dict(self) -> dict[str, Any]:
        return self.weights.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.weights.load_state_dict(state)

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {"lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True)}


@dataclass(frozen=True)
class DWAParams:
    temperature: float = param(2.0, "softmax temperature T (paper: 2)", low=0.0, low_open=True)


def dwa_weights(previous: Sequence[float], before: Sequence[float], temperature: float) -> list[float]:
    """K softmax(r / T) with r_i = previous_i / before_i (epoch e-1 over epoch e-2)."""
    ratios = [p / max(b, 1e-12) for p, b in zip(previous, before, strict=True)]
    exps = [math.exp(r / temperature) for r in ratios]
    return [len(exps) * e / sum(exps) for e in exps]


@register
class DWA(LossWeighting):
    info = MethodInfo("dwa", "combiner", "loss-weighting", "Liu et al., CVPR 2019 (Dynamic Weight Average)",
                      "weight each loss by its recent rate of decrease (epoch level)", min_tasks=2)
    Params = DWAParams

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.history: list[dict[str, float]] = []  # the last two epoch-mean task losses, oldest first

    def current_weights(self, names: Sequence[str]) -> list[float]:
        if len(self.history) < 2:
            return [1.0] * len(names)
        before, previous = self.history
        return dwa_weights([previous[n] for n in names], [before[n] for n in names], self.params.temperature)

    def backward(self, losses: Losses, model: nn.Module, step: StepContext) -> None:
        names = self.task_names = list(losses.tasks)
        weights = self.current_weights(names)
        self.record_weights(names, torch.tensor(weights))
        total = sum(w * losses.tasks[n] for w, n in zip(weights, names, strict=True)) + sum(losses.extra.values())
        step.scale(total).backward()  # type: ignore[union-attr]

    def on_epoch_end(self, epoch: int, train_losses: Mapping[str, float]) -> None:
        if self.task_names:
            self.history = [*self.history, {n: float(train_losses[n]) for n in self.task_names}][-2:]

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "task_names": self.task_names}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = list(state.get("history", []))
        self.task_names = list(state.get("task_names", []))

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {"temperature": trial.suggest_float("temperature", 0.5, 5.0, log=True)}
