"""CAGrad: Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021.

With g0 the mean task gradient, solve the dual over the simplex
    w* = argmin_w  g_w . g0 + c ||g0|| ||g_w||,   g_w = sum_i w_i g_i,
and move along d = g0 + (c ||g0|| / ||g_w*||) g_w*, i.e. task weights 1/K + lambda w*.

We follow the official code (Cranial-XIX/CAGrad, nyuv2/cityscapes utils): the same objective
with its 1e-8 epsilons, SLSQP from the uniform point for K >= 3 (for K = 2 the same convex
problem in one variable, solved by bounded Brent, as in the official toy.py), ``rescale=1``
(d / (1 + c^2), used in all official runs) and the final x K "to match the sum loss". The
official run scripts use c = 0.4.

Scale relative to the other libraries (tested): official = torchjd ``CAGrad(c)`` x K / (1 + c^2)
= LibMTL (rescale=1) x K. Why not torchjd's solver: at a Pareto-stationary point (||g_w*|| ~ 0,
e.g. a zero task gradient) torchjd returns a zero update while the official code returns
g0 / (1 + c^2) x K; we keep the official behaviour. A solver that does not converge is counted
in the ``fallbacks`` diagnostic; its last iterate is used (projected onto the simplex) as the
official code does, or the uniform point if that is not finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize, minimize_scalar
from torch import Tensor

from bench.gradients import GradientCombiner
from bench.method import MethodInfo, register
from bench.params import param


@dataclass(frozen=True)
class CAGradParams:
    c: float = param(0.4, "conflict-aversion radius (official run scripts: 0.4)", low=0.0, high=1.0, high_open=True)
    rescale: int = param(1, "0: d; 1: d/(1+c^2) (official); 2: d/(1+c)", choices=(0, 1, 2))
    sum_scale: bool = param(True, "multiply by the number of tasks to match the summed loss (official)")


def cagrad_weights(gramian: Tensor, c: float, rescale: int = 1, sum_scale: bool = True) -> tuple[Tensor, bool]:
    """Task weights of the CAGrad update (update = w J) and whether the dual solver converged."""
    g = gramian.detach().cpu().double().numpy()
    k = g.shape[0]
    g0_norm = float(np.sqrt(g.mean() + 1e-8))
    radius = c * g0_norm + 1e-8
    mean_dir = g.mean(axis=1)  # (G 1/K)_i = g_i . g0

    def objective(w: np.ndarray) -> float:
        return float(w @ mean_dir + radius * np.sqrt(w @ g @ w + 1e-8))

    if k == 2:
        res = minimize_scalar(lambda t: objective(np.array([t, 1.0 - t])), bounds=(0.0, 1.0), method="bounded",
                              options={"xatol": 1e-12})
        w, ok = np.array([res.x, 1.0 - res.x]), bool(res.success)
    else:
        start = np.full(k, 1.0 / k)
        res = minimize(objective, start, bounds=[(0.0, 1.0)] * k,
                       constraints={"type": "eq", "fun": lambda w: 1.0 - w.sum()})
        w, ok = res.x, bool(res.success)
    if not np.all(np.isfinite(w)):
        w, ok = np.full(k, 1.0 / k), False
    w = np.clip(w, 0.0, None)
    w = w / w.sum() if w.sum() > 0 else np.full(k, 1.0 / k)
    lam = radius / (np.sqrt(max(w @ g @ w, 0.0)) + 1e-8)
    weights = np.full(k, 1.0 / k) + lam * w
    weights = weights / {0: 1.0, 1: 1.0 + c**2, 2: 1.0 + c}[rescale]
    if sum_scale:
        weights = weights * k
    return torch.as_tensor(weights, dtype=gramian.dtype, device=gramian.device), ok


@register
class CAGrad(GradientCombiner):
    info = MethodInfo("cagrad", "combiner", "gradient", "Liu et al., NeurIPS 2021 (CAGrad)",
                      "maximise the worst task improvement within a ball around the mean gradient",
                      min_tasks=2)
    Params = CAGradParams

    def weigh(self, gramian: Tensor, losses: Tensor) -> Tensor:
        weights, ok = cagrad_weights(gramian, self.params.c, self.params.rescale, self.params.sum_scale)
        if not ok:
            self.note_fallback("the CAGrad dual solver did not converge; using its last iterate")
        return weights

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {"c": trial.suggest_float("c", 0.1, 0.9)}
