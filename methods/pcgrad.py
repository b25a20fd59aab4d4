"""PCGrad: Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020 (Alg. 1).

Each task gradient g_i is projected, in a random order, onto the normal plane of every other
task gradient g_j it conflicts with (g_i . g_j < 0), always against the ORIGINAL g_j; the
projected gradients are SUMMED. In weight form (computed from the Gramian G alone): w starts
at ones and each projection of p_i onto g_j subtracts (p_i . g_j) / ||g_j||^2 from w_j.

Convention: shared encoder only; heads get the plain gradient of their own loss (as LibMTL
and torchjd). The official TF code and Pytorch-PCGrad operate on all parameters (projections
leak into the heads) and Pytorch-PCGrad averages instead of summing on shared coordinates.

Why our own code and not ``torchjd.aggregation.PCGradWeighting``: torchjd draws the orders
with ``torch.randperm`` internally, so a fixed order (the three-task reference case) cannot be
injected. For two tasks the order is irrelevant and both agree (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from bench.gradients import GradientCombiner
from bench.method import MethodInfo, register


def pcgrad_weights(gramian: Tensor, orders: Sequence[Sequence[int]] | None = None,
                   generator: torch.Generator | None = None) -> Tensor:
    """Weights w with update = w J; ``orders[i]`` lists the tasks i is projected against, in order."""
    k = gramian.shape[0]
    total = torch.zeros(k, dtype=gramian.dtype, device=gramian.device)
    for i in range(k):
        if orders is not None:
            order = list(orders[i])
        else:
            others = torch.tensor([j for j in range(k) if j != i], dtype=torch.long)
            order = others[torch.randperm(len(others), generator=generator)].tolist() if len(others) > 1 else others.tolist()
        w = torch.zeros(k, dtype=gramian.dtype, device=gramian.device)
        w[i] = 1.0
        for j in order:
            dot = w @ gramian[:, j]  # p_i . g_j
            if dot < 0 and gramian[j, j] > 0:  # a zero g_j never conflicts
                w[j] = w[j] - dot / gramian[j, j]
        total += w
    return total


@register
class PCGrad(GradientCombiner):
    info = MethodInfo("pcgrad", "combiner", "gradient", "Yu et al., NeurIPS 2020 (PCGrad)",
                      "project conflicting task gradients onto each other's normal plane, then sum",
                      min_tasks=2)

    def weigh(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return pcgrad_weights(gramian)  # the global torch RNG (seeded, checkpointed) draws the orders

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {}  # PCGrad has no hyperparameter
