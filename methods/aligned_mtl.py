"""Aligned-MTL: Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023.

Eigendecompose G = V diag(lambda) V^T (eigenvalues below a tolerance dropped), align the task
gradients to an orthogonal system with equal norms sqrt(lambda_min):
B = sqrt(lambda_min) V diag(lambda^-1/2) V^T, weights = B p. Computed by
``torchjd.aggregation.AlignedMTLWeighting`` (scale ``min``, as the paper). The preference
vector p is all ones as in LibMTL (= K x torchjd's default 1/K), so the update has the scale
of the summed loss. Heads get the plain gradient of their own loss (LibMTL/torchjd).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchjd.aggregation import AlignedMTLWeighting

from bench.gradients import GradientCombiner
from bench.method import MethodInfo, register
from bench.params import param


@dataclass(frozen=True)
class AlignedParams:
    scale: str = param("min", "eigenvalue used to scale the aligned system", choices=("min", "median", "rmse"))


def aligned_weights(gramian: Tensor, scale: str = "min") -> Tensor:
    ones = torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
    return AlignedMTLWeighting(pref_vector=ones, scale_mode=scale)(gramian)  # type: ignore[arg-type]


@register
class AlignedMTL(GradientCombiner):
    info = MethodInfo("aligned-mtl", "combiner", "gradient", "Senushkin et al., CVPR 2023 (Aligned-MTL)",
                      "align the task gradients to an orthogonal, equal-norm system", min_tasks=2)
    Params = AlignedParams

    def weigh(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return aligned_weights(gramian, self.params.scale)

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {"scale": trial.suggest_categorical("scale", ["min", "median", "rmse"])}
