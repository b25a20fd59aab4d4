"""IMTL-G: Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021 (gradient part).

Closed form: with D the rows g_1 - g_i and U the rows u_1 - u_i (u = unit gradients),
alpha_{2..K} = g_1 U^T (D U^T)^-1, alpha_1 = 1 - sum; the update sum alpha_i g_i has the same
projection on every unit gradient u_i. Computed by ``torchjd.aggregation.IMTLGWeighting`` (a
pseudo-inverse form, identical when G has full rank and defined when it does not).

Departures: the paper's full IMTL also learns loss scales (IMTL-L) and applies IMTL-G to the
representation gradients for speed; this is IMTL-G on the shared-parameter gradients alone
(as torchjd's IMTLG). Heads get the plain gradient of their own loss (LibMTL/torchjd).
"""

from __future__ import annotations

from torch import Tensor
from torchjd.aggregation import IMTLGWeighting

from bench.gradients import GradientCombiner
from bench.method import MethodInfo, register


def imtl_weights(gramian: Tensor) -> Tensor:
    return IMTLGWeighting()(gramian)


@register
class IMTL(GradientCombiner):
    info = MethodInfo("imtl", "combiner", "gradient", "Liu et al., ICLR 2021 (IMTL-G)",
                      "update with equal projections on every task's unit gradient", min_tasks=2)

    def weigh(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return imtl_weights(gramian)
