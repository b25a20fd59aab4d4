"""Rep-MTL (Wang, Li, Xu, ICCV 2025, arXiv 2507.21049): regularising representation saliencies.

The saliency of task t is ``S_t = dL_t/dZ`` (B x C x H x W), the gradient of its
batch-mean loss with respect to the shared representation Z, kept in the graph
(``create_graph=True``) so both regularisers train the heads and the encoder. On top of the
base's task losses (equal weighting) it adds

* **task-specific saliency regulation** (Eqs. 4–6): at every location i = (b, h, w), the
  channel-mean saliencies' magnitudes are turned into a distribution over tasks
  ``P_it = |mean_c S_t| / sum_k |mean_c S_k|``; ``L_tsr`` is the mean entropy of P
  (natural log): each location is pushed to serve one task;
* **cross-task saliency alignment** (Eqs. 7–9): per sample, task affinities
  ``M_t[b] = S_t[b] S_t[b]^T`` (C x C) and the anchor ``A_b A_b^T`` with ``A_b`` the spatial
  means of the saliencies stacked over tasks (C x T); flattened and L2-normalised, each
  (anchor, task affinity) pair of one sample is a positive and the anchors of the other
  samples are the negatives: ``L_csa = mean_{b,t} -log[exp(cos(a_b, m_bt)/tau) / D_b]``.

Total: ``sum_t L_t + lambda_tsr L_tsr + lambda_csa L_csa`` (Eq. 10).

Harness choices, each a logged parameter where it is one (no official code exists; see
``shared/reference/methods.md`` §3):

* Z is the **bottleneck** (the only map both heads of a skip-connected U-Net consume;
  the skips keep their normal gradients). With the average-pooled classification head,
  ``S_cls`` is spatially constant per channel — expected.
* ``tau`` (temperature) is not stated in the paper: default 0.1.
* ``positive_in_denominator``: Eq. 9 as printed sums only the negatives in ``D_b`` (so the
  loss can be negative; default); ``true`` gives the standard InfoNCE form.
* Eq. 9 has no sum over tasks: it is averaged over the B x T positives.
* The paper's epsilons are unstated: 0/0 in P is 0 and ``0 log 0 = 0``. All saliencies are
  first divided by their (detached) largest magnitude, which leaves both terms — and their
  gradients — unchanged but keeps tiny gradients clear of the epsilons.
* The paper trains with a logarithmic loss transform on top of EW; here the base's losses
  are used as they are, so Rep-MTL differs from ``vanilla`` only by its regularisers.
* Needs a batch of two or more (the negatives are the other samples): checked before training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from bench.methods._representation import pick_layers, representation_gradients, require_features
from torch import Tensor, nn

from bench.data import Batch
from bench.errors import ConfigError
from bench.method import EpochMeans, Losses, MethodInfo, Regularizer, register
from bench.models import Output
from bench.params import param

LAYER = "bottleneck"
EPS = 1e-12


@dataclass(frozen=True)
class RepMTLParams:
    lambda_tsr: float = param(0.9, "weight of task-specific saliency regulation (entropy)", low=0.0)
    lambda_csa: float = param(0.9, "weight of cross-task saliency alignment (contrastive)", low=0.0)
    tau: float = param(0.1, "contrastive temperature (not stated in the paper)", low=0.0, low_open=True)
    positive_in_denominator: bool = param(False, "add the positive to Eq. 9's denominator (standard InfoNCE); "
                                                 "false = as printed")


def saliency_entropy(saliency: Tensor) -> Tensor:
    """``L_tsr`` from saliencies stacked as T x B x C x H x W."""
    magnitude = saliency.mean(dim=2).abs()  # T x B x H x W: channel-mean, signed, then |.|
    p = magnitude / magnitude.sum(0, keepdim=True).clamp_min(EPS)
    return -(p * torch.log(p.clamp_min(EPS))).sum(0).mean()


def saliency_alignment(saliency: Tensor, tau: float, positive_in_denominator: bool) -> Tensor:
    """``L_csa`` from saliencies stacked as T x B x C x H x W (needs B >= 2)."""
    n_tasks, batch = saliency.shape[:2]
    flat = saliency.flatten(3)  # T x B x C x HW
    affinity = flat @ flat.transpose(-1, -2)  # T x B x C x C
    anchor = flat.mean(-1).permute(1, 2, 0)  # B x C x T
    anchor = F.normalize((anchor @ anchor.transpose(-1, -2)).flatten(1), dim=1, eps=EPS)  # B x C*C
    tasks = F.normalize(affinity.flatten(2), dim=2, eps=EPS)  # T x B x C*C
    positive = (tasks * anchor).sum(-1) / tau  # T x B
    negative = (anchor @ anchor.T / tau).masked_fill(torch.eye(batch, dtype=torch.bool, device=anchor.device), -torch.inf)
    negatives = negative.expand(n_tasks, batch, batch)
    if positive_in_denominator:
        negatives = torch.cat([positive.unsqueeze(-1), negatives], dim=-1)
    return (torch.logsumexp(negatives, dim=-1) - positive).mean()


@register
class RepMTL(Regularizer):
    info = MethodInfo("rep-mtl", "regularizer", "representation", "Wang, Li & Xu, ICCV 2025 (Rep-MTL)",
                      "saliency entropy + cross-task saliency alignment on the bottleneck's task gradients",
                      min_tasks=2)
    Params = RepMTLParams

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self._means = EpochMeans()  # summed on the device, read once per epoch: no per-step sync

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {"lambda_tsr": trial.suggest_float("lambda_tsr", 0.7, 1.5),
                "lambda_csa": trial.suggest_float("lambda_csa", 0.7, 1.5)}

    def configure(self, model: nn.Module) -> None:
        pick_layers(model, LAYER, self.info.name)

    def check_config(self, cfg: Any) -> None:
        self._check_batch(cfg.batch_size)

    def _check_batch(self, size: int) -> None:
        if size < 2:
            raise ConfigError(f"{self.info.name}: the cross-task saliency alignment contrasts each sample with the "
                              f"others in its batch, so it needs a batch size of 2 or more (got {size}; --batch-size)")

    def penalty(self, out: Output, losses: Losses, batch: Batch, model: nn.Module) -> dict[str, Tensor]:
        (z,) = require_features(out.features, pick_layers(model, LAYER, self.info.name), self.info.name)
        self._check_batch(z.shape[0])
        saliency = torch.stack([representation_gradients(loss, [z])[0].float() for loss in losses.tasks.values()])
        saliency = saliency / saliency.detach().abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
        with torch.autocast(z.device.type, enabled=False):  # float32 matmuls and cosines under mixed precision
            tsr = saliency_entropy(saliency)
            csa = saliency_alignment(saliency, self.params.tau, self.params.positive_in_denominator)
        self._means.add({"tsr": tsr, "csa": csa})
        return {f"{self.info.name}.tsr": self.params.lambda_tsr * tsr,
                f"{self.info.name}.csa": self.params.lambda_csa * csa}

    def diagnostics(self) -> dict[str, float]:
        """Epoch means of the unweighted L_tsr and L_csa."""
        return self._means.pop()
