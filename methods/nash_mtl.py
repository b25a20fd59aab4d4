"""Nash-MTL: Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022.

Find alpha > 0 with alpha_i (G alpha)_i = 1 for every task (the Nash bargaining solution);
update = sum_i alpha_i g_i, so that ||update||^2 = K and g_i . update = 1 / alpha_i.

Solver as in the official code (AvivNavon/nash-mtl; LibMTL and torchjd use the same): G is
divided by its Frobenius norm, then up to ``optim_niter`` convex-concave steps, each a cvxpy
problem solved by ECOS (100 iterations, warm start): minimise sum(G alpha) plus the
linearisation at the previous alpha of sum_i [log alpha_i + log (G alpha)_i], subject to
alpha_i (G alpha)_i >= 1. Stop when alpha moves less than 1e-6 or ||G alpha - 1/alpha|| < 1e-3.
STATEFUL: alpha starts at ones and is warm-started from the previous step; with
``update_weights_every`` > 1 it is reused for that many steps. When ECOS fails or gives no
solution alpha keeps its previous value, as in the reference code, and the failure is counted
(``fallbacks``). The shared update is clipped to norm ``max_norm`` (official: clip_grad_norm_
of the shared parameters after the backward; torchjd rescales alpha the same way).

Why our own code: torchjd's ``NashMTL`` hides solver failures (it silently keeps alpha),
which the harness must count. Convention departure: the official code back-propagates
sum alpha_i L_i, so its heads are scaled by alpha; here heads get their own plain gradient.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cvxpy as cp
import numpy as np
import torch
from torch import Tensor

from bench.gradients import GradientCombiner
from bench.method import MethodInfo, register
from bench.params import param


@dataclass(frozen=True)
class NashParams:
    max_norm: float = param(1.0, "clip the shared update to this norm (0: no clipping)", low=0.0)
    update_weights_every: int = param(1, "solve for alpha every this many steps", low=1)
    optim_niter: int = param(20, "convex-concave iterations per solve", low=1)


class NashSolver:
    """The bargaining solution, warm-started from the previous call (cvxpy + ECOS)."""

    def __init__(self, n_tasks: int, optim_niter: int = 20) -> None:
        self.k, self.optim_niter = n_tasks, optim_niter
        self.alpha = np.ones(n_tasks)
        self.failures = 0  # solves where ECOS raised or returned no solution
        self._var = cp.Variable(n_tasks, nonneg=True)
        self._prev = cp.Parameter(n_tasks, value=np.ones(n_tasks))
        self._gram = cp.Parameter((n_tasks, n_tasks), value=np.eye(n_tasks))
        self._scale = cp.Parameter((1,), value=np.ones(1))
        g_alpha = self._gram @ self._var
        g_prev = self._gram @ self._prev
        slope = 1.0 / self._prev + (1.0 / g_prev) @ self._gram  # gradient of sum log a_i + log (G a)_i
        linear = slope @ (self._var - self._prev)
        constraints = [-cp.log(self._var[i] * self._scale) - cp.log(g_alpha[i]) <= 0 for i in range(n_tasks)]
        self._problem = cp.Problem(cp.Minimize(cp.sum(g_alpha) + linear / self._scale), constraints)

    def __call__(self, gramian: np.ndarray) -> np.ndarray:
        norm = float(np.linalg.norm(gramian))
        if not np.isfinite(norm) or norm == 0.0:
            self.failures += 1
            return self.alpha
        self._scale.value = np.array([norm])
        self._gram.value = gramian / norm
        alpha = self.alpha.copy()
        for _ in range(self.optim_niter):
            self._var.value, self._prev.value = alpha, alpha
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # cvxpy: "problem is not DPP" on every solve
                    self._problem.solve(solver=cp.ECOS, warm_start=True, max_iters=100)
            except Exception:  # noqa: BLE001 - the reference code catches every solver error too
                self._var.value = self._prev.value
                self.failures += 1
            new = self._var.value
            if new is None or not np.all(np.isfinite(new)):
                self.failures += 1
                break
            residual = np.linalg.norm(self._gram.value @ new - 1.0 / (new + 1e-10))
            if residual < 1e-3 or np.linalg.norm(new - self._prev.value) < 1e-6:
                alpha = new
                break
            alpha = new
        self.alpha = np.asarray(alpha, dtype=float)
        return self.alpha


def nash_weights(gramian: Tensor, solver: NashSolver, max_norm: float = 1.0) -> Tensor:
    """alpha from the solver, scaled down so that ||alpha J|| <= max_norm (0: no clipping)."""
    alpha = torch.as_tensor(solver(gramian.detach().cpu().double().numpy()), dtype=gramian.dtype, device=gramian.device)
    if max_norm > 0:
        norm = float((alpha @ gramian @ alpha).clamp(min=0).sqrt())
        if norm > max_norm:
            alpha = alpha * (max_norm / norm)
    return alpha


@register
class NashMTL(GradientCombiner):
    info = MethodInfo("nash-mtl", "combiner", "gradient", "Navon et al., ICML 2022 (Nash-MTL)",
                      "Nash bargaining solution over the task gradients (stateful, cvxpy/ECOS)", min_tasks=2)
    Params = NashParams

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.solver: NashSolver | None = None
        self.steps = 0
        self._alpha: Tensor | None = None  # the last (unclipped) alpha, reused between solves

    def weigh(self, gramian: Tensor, losses: Tensor) -> Tensor:
        if self.solver is None:
            self.solver = NashSolver(gramian.shape[0], self.params.optim_niter)
        if self._alpha is None or self.steps % self.params.update_weights_every == 0:
            before = self.solver.failures
            nash_weights(gramian, self.solver, max_norm=0.0)
            if self.solver.failures > before:
                self.note_fallback("the Nash-MTL solver failed; alpha keeps its previous value")
            self._alpha = torch.as_tensor(self.solver.alpha)
        self.steps += 1
        alpha = self._alpha.to(gramian)
        if self.params.max_norm > 0:
            norm = float((alpha @ gramian @ alpha).clamp(min=0).sqrt())
            if norm > self.params.max_norm:
                alpha = alpha * (self.params.max_norm / norm)
        return alpha

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": None if self.solver is None else self.solver.alpha.tolist(), "steps": self.steps,
                "last": None if self._alpha is None else self._alpha.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state or state.get("alpha") is None:
            return
        self.solver = NashSolver(len(state["alpha"]), self.params.optim_niter)
        self.solver.alpha = np.asarray(state["alpha"], dtype=float)
        self.steps = int(state["steps"])
        self._alpha = None if state.get("last") is None else torch.tensor(state["last"], dtype=torch.float64)

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {"max_norm": trial.suggest_float("max_norm", 0.1, 10.0, log=True)}
