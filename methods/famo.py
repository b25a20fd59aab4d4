"""FAMO: Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023.

Logits w (start 0), z = softmax(w), lower bounds b = 0. The model is trained on
sum_i (z_i / c) log(L_i - b_i + 1e-8) with c = sum_j z_j / (L_j - b_j + 1e-8) detached, i.e. the
convex combination sum_i [(z_i / D_i) / sum_j (z_j / D_j)] grad L_i (heads weighted too, as in
the paper). After the optimizer step the task losses are recomputed on the same batch
(``Combiner.after_step``) and w takes one Adam step (lr ``w_lr``, weight decay ``gamma``) along
z_i (delta_i - z . delta), delta_i = log D_i - log D'_i. Cost: one backward and one extra
no-grad forward per step.

Defaults: w_lr = 0.025 and gamma = 1e-3 as the FAMO repo's NYUv2 script, LibMTL and torchjd
(the official famo.py default is gamma = 0.01 with clipping of the shared gradient to norm 1;
in the repo's scripts that clipping is a no-op, so none here). Written here (not torchjd's
``scalarization.FAMO``) to checkpoint the logits' Adam state through public APIs; the two
agree on the reference example (tested). STATEFUL: w and its Adam state are checkpointed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bench.gradients import LearnedTaskVector, LossWeighting
from bench.method import Losses, MethodInfo, StepContext, register
from bench.params import param

EPS = 1e-8


@dataclass(frozen=True)
class FAMOParams:
    w_lr: float = param(0.025, "Adam learning rate of the task logits", low=0.0, low_open=True)
    gamma: float = param(1e-3, "weight decay of the task logits", low=0.0)


def famo_objective(losses: Tensor, logits: Tensor, min_losses: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
    """The scalar to back-propagate and the effective (convex) weights of the task gradients."""
    z = torch.softmax(logits.detach(), dim=0).to(losses)
    shifted = losses - min_losses + EPS
    c = (z / shifted.detach()).sum()
    weights = (z / shifted.detach()) / c
    return ((z / c) * torch.log(shifted)).sum(), weights


def famo_logit_grad(logits: Tensor, before: Tensor, after: Tensor, min_losses: Tensor | float = 0.0) -> Tensor:
    """Softmax Jacobian^T delta, delta_i = log D_i(before) - log D_i(after)."""
    z = torch.softmax(logits.detach(), dim=0)
    delta = torch.log(before - min_losses + EPS) - torch.log(after - min_losses + EPS)
    delta = delta.to(z)
    return z * (delta - (z * delta).sum())


@register
class FAMO(LossWeighting):
    info = MethodInfo("famo", "combiner", "loss-weighting", "Liu et al., NeurIPS 2023 (FAMO)",
                      "balance the tasks' log-loss decrease rates with O(1) extra cost", min_tasks=2)
    Params = FAMOParams

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.weights = LearnedTaskVector(lr=self.params.w_lr, weight_decay=self.params.gamma)  # the logits
        self._before: Tensor | None = None

    @property
    def logits(self) -> Tensor | None:
        return self.weights.value

    def backward(self, losses: Losses, model: nn.Module, step: StepContext) -> None:
        names = self.task_names = list(losses.tasks)
        logits = self.weights.ensure(len(names))
        values = torch.stack([losses.tasks[n].float() for n in names])
        objective, weights = famo_objective(values, logits.to(values.device))
        self.record_weights(names, weights)
        self._before = values.detach().cpu()
        step.scale(objective + sum(losses.extra.values())).backward()

    def after_step(self, recompute: Callable[[], dict[str, Tensor]]) -> None:
        if self._before is None:
            return
        assert self.logits is not None
        after = recompute()
        values = torch.stack([after[n].detach().float().cpu() for n in self.task_names])
        self.weights.step(famo_logit_grad(self.logits, self._before, values))
        self._before = None

    def state_dict(self) -> dict[str, Any]:
        return self.weights.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.weights.load_state_dict(state)

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {"w_lr": trial.suggest_float("w_lr", 1e-3, 0.1, log=True),
                "gamma": trial.suggest_float("gamma", 1e-5, 1e-2, log=True)}
