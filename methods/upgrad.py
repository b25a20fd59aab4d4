"""UPGrad: Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (torchjd).

Project every task gradient onto the dual cone {x : J x >= 0} (one small QP per task:
min v^T G v s.t. v >= e_i) and average the projections (preference 1/K). Computed by
``torchjd.aggregation.UPGradWeighting`` (its reference implementation: G normalised by its
trace, 1e-4 ridge, quadprog), which is ~1e-3 from the exact QP; for two conflicting tasks the
exact UPGrad equals PCGrad / 2. Heads get the plain gradient of their own loss (torchjd).
"""

from __future__ import annotations

from torch import Tensor
from torchjd.aggregation import UPGradWeighting

from bench.gradients import GradientCombiner
from bench.method import MethodInfo, register


def upgrad_weights(gramian: Tensor) -> Tensor:
    return UPGradWeighting()(gramian)


@register
class UPGrad(GradientCombiner):
    info = MethodInfo("upgrad", "combiner", "gradient", "Quinton & Rey, 2024 (UPGrad, torchjd)",
                      "average of the task gradients projected onto the dual cone", min_tasks=2)

    def weigh(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return upgrad_weights(gramian)
