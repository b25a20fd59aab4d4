"""GradNorm: Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing", ICML 2018.

Learned task weights w = K softmax(s) (they sum to K). Each step, with G_i = w_i ||g_i|| the
norm of the weighted task gradient on the shared parameters and r_i = (L_i / L_i(0)) / mean,
the weights minimise sum_i |G_i - mean(G) r_i^alpha| (target detached) by one Adam step on s;
the shared update is sum_i w_i g_i with the current weights.

We follow LibMTL's GradNorm (the paper gives no code): softmax parameterisation (s starts equal,
so w = 1), G over ALL shared parameters (the paper uses the last shared layer), L_i(0) = the
epoch-0 mean training loss with equal weights during epoch 0, alpha = 1.5 (paper). The weights
are learned by their own Adam (``lr``; LibMTL shares the network's optimizer). Heads get the plain
gradient of their own loss (LibMTL); the paper weights the whole loss. STATEFUL: s, its Adam
state and L(0) are checkpointed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bench.gradients import GradientCombiner, LearnedTaskVector
from bench.method import MethodInfo, register
from bench.params import param


@dataclass(frozen=True)
class GradNormParams:
    alpha: float = param(1.5, "restoring-force strength (paper: 1.5)", low=0.0)
    lr: float = param(1e-3, "Adam learning rate of the weight logits", low=0.0, low_open=True)


def gradnorm_objective(logits: Tensor, gramian: Tensor, losses: Tensor, initial: Tensor, alpha: float) -> Tensor:
    """sum_i |w_i ||g_i|| - mean(w ||g||) r_i^alpha| with w = K softmax(logits), target detached."""
    k = logits.shape[0]
    w = k * torch.softmax(logits, dim=0)
    norms = w * gramian.diagonal().clamp(min=0).sqrt()
    ratio = losses / initial
    ratio = ratio / ratio.mean()
    target = (norms.mean() * ratio**alpha).detach()
    return (norms - target).abs().sum()


@register
class GradNorm(GradientCombiner):
    info = MethodInfo("gradnorm", "combiner", "gradient", "Chen et al., ICML 2018 (GradNorm)",
                      "learn task weights that equalise the weighted gradient norms' training rates",
                      min_tasks=2)
    Params = GradNormParams

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.weights = LearnedTaskVector(dtype=torch.float64, lr=self.params.lr)  # the logits
        self.initial: dict[str, float] | None = None  # epoch-0 mean losses

    def weigh(self, gramian: Tensor, losses: Tensor) -> Tensor:
        logits = self.weights.ensure(gramian.shape[0])
        weights = gramian.shape[0] * torch.softmax(logits.detach(), dim=0)
        if self.initial is not None:  # equal weights during epoch 0, as LibMTL
            initial = torch.tensor([self.initial[n] for n in self.task_names], dtype=torch.float64)
            with torch.enable_grad():
                objective = gradnorm_objective(logits, gramian.cpu(), losses.cpu(), initial, self.params.alpha)
                (grad,) = torch.autograd.grad(objective, logits)
            self.weights.step(grad)
        return weights.to(gramian)

    def on_epoch_end(self, epoch: int, train_losses: Mapping[str, float]) -> None:
        if self.initial is None and self.task_names:
            self.initial = {n: max(float(train_losses[n]), 1e-12) for n in self.task_names}

    def state_dict(self) -> dict[str, Any]:
        return {"logits": self.weights.state_dict(), "initial": self.initial}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.initial = state.get("initial")
        self.weights.load_state_dict(state.get("logits") or {})

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {"alpha": trial.suggest_float("alpha", 0.5, 3.0)}
