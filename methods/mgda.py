"""MGDA: Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.

The min-norm point of the convex hull of the task gradients:
w* = argmin_{w in simplex} ||sum_i w_i g_i||^2, update = sum_i w*_i g_i (weights sum to 1).

Solver: ``torchjd.aggregation.MGDAWeighting`` (Frank-Wolfe from the uniform point with exact
line search): exact for two tasks, ~1e-3 for three or more, and exact 0/1 in dominated cases
where the official MinNormSolver returns 0.999/0.001. Optional gradient normalisation before
solving (not in the paper; the official sample config uses ``loss+``, LibMTL and torchjd
default to none): ``l2`` (unit gradients), ``loss`` (g_i / L_i), ``loss+`` (g_i / (L_i ||g_i||)).
As in the official code the weights are then applied to the RAW gradients.

Convention departure: the official code back-propagates sum_t w_t L_t, so its heads are
scaled by w_t; here heads get the plain gradient of their own loss (LibMTL/torchjd).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchjd.aggregation import MGDAWeighting

from bench.gradients import GradientCombiner
from bench.method import MethodInfo, register
from bench.params import param


@dataclass(frozen=True)
class MGDAParams:
    normalization: str = param("none", "gradient normalisation before the min-norm solve",
                               choices=("none", "l2", "loss", "loss+"))


def mgda_weights(gramian: Tensor, losses: Tensor | None = None, normalization: str = "none") -> Tensor:
    """Min-norm weights of the (optionally normalised) gradients, to be applied to the raw J."""
    scale = torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
    norms = gramian.diagonal().clamp(min=0).sqrt()
    if normalization in ("loss", "loss+"):
        assert losses is not None
        scale = scale * losses.to(gramian).clamp(min=1e-12)
    if normalization in ("l2", "loss+"):
        scale = scale * norms.clamp(min=1e-12)
    normed = gramian / (scale[:, None] * scale[None, :])
    return MGDAWeighting()(normed)  # official: solved on normalised, applied to raw gradients


@register
class MGDA(GradientCombiner):
    info = MethodInfo("mgda", "combiner", "gradient", "Sener & Koltun, NeurIPS 2018 (MGDA)",
                      "min-norm point of the convex hull of the task gradients", min_tasks=2)
    Params = MGDAParams

    def weigh(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return mgda_weights(gramian, losses, self.params.normalization)

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {"normalization": trial.suggest_categorical("normalization", ["none", "l2", "loss+"])}
