"""RLAR: representation-level adversarial regularization (the RLAR paper, §2.3, Eqs. 4–7).

For each task t, ``g_t = dL_t/dz`` is the gradient of its loss with respect to the shared
representation z at a chosen encoder layer, per sample; ``delta_t = g_t / (||g_t|| + eps)``
(norm over the flattened C x H x W map) is the normalised adversarial (FGSM-like, L2)
direction. The penalty is ``lambda_rlar`` times the mean over samples and task pairs of
``|cos(delta_i, delta_j)|``. ``g_t`` is computed with ``create_graph=True``, so the penalty
trains the encoder and the heads.

Choices of this harness (the paper's equations were lost in extraction; see
``shared/reference/rlar.md``):

* **Layer** — one registered name per variant, each a leaderboard row: ``rlar``
  (bottleneck, the paper's default: the deepest encoder map, the classification head's
  input), ``rlar@last`` (the stage just above it), ``rlar@mid`` (the middle stage) and
  ``rlar@mean``: the mean of the per-layer penalties over the three deepest stages (their
  shapes differ, so "mean direction" is read as the mean of the penalties).
* **Gradient at a layer** — the *total* derivative: perturbing z changes every quantity
  computed from it. At ``mid``/``last`` the segmentation gradient therefore flows through
  the decoder's skip connection at that scale and through the deeper encoder stages, and the
  classification gradient through the deeper stages (the head reads only the bottleneck, so
  a head-only partial derivative would be zero there). At the bottleneck both are head-only.
* **Tasks** — every pair of the base's task losses (``Losses.tasks``: the weighted Dice and
  weighted CE); guidance terms (``Losses.extra``, e.g. clinical guidance) are not tasks.
  The task weights do not matter (the directions are normalised). A sample without a
  TI-RADS label has no classification direction and contributes ``|cos| = 0``.
* **Cost** — one ``autograd.grad`` per task from its loss to the chosen maps only (for
  ``mean`` all three maps in the same call), then the trainer's single backward
  differentiates through those graphs: at the bottleneck this is a double backward through
  the heads, not a second pass through the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any, ClassVar

import torch
from bench.methods._representation import pick_layers, representation_gradients, require_features
from torch import Tensor, nn

from bench.data import Batch
from bench.errors import ConfigError
from bench.method import EpochMeans, Losses, MethodInfo, Regularizer, register
from bench.models import Output
from bench.params import param

PAPER = "RLAR paper §2.3 (representation-level adversarial regularization)"


@dataclass(frozen=True)
class RLARParams:
    lambda_rlar: float = param(0.1, "weight of the penalty (the paper does not print its value)", low=0.0)
    eps: float = param(1e-12, "added to the per-sample gradient norm: delta = g / (||g|| + eps)", low=0.0, low_open=True)


def adversarial_directions(grad: Tensor, eps: float) -> Tensor:
    """Per-sample L2-normalised gradients, flattened: B x (C*H*W), in float32."""
    flat = grad.float().flatten(1)
    return flat / (flat.norm(dim=1, keepdim=True) + eps)


def pair_cosines(directions: list[Tensor]) -> Tensor:
    """``cos(delta_i, delta_j)`` for every task pair and sample: (pairs x B)."""
    return torch.stack([(directions[i] * directions[j]).sum(1) for i, j in combinations(range(len(directions)), 2)])


class RLAR(Regularizer):
    """RLAR at one encoder layer (``layer``), or the mean over the three deepest (``"mean"``)."""

    info = MethodInfo("rlar", "regularizer", "representation", PAPER,
                      "penalises |cos| between the tasks' adversarial directions at the bottleneck", min_tasks=2)
    Params = RLARParams
    layer: ClassVar[str] = "bottleneck"

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self._means = EpochMeans()  # summed on the device, read once per epoch: no per-step sync

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {"lambda_rlar": trial.suggest_float("lambda_rlar", 1e-3, 1.0, log=True)}

    def layers_of(self, model: nn.Module) -> tuple[str, ...]:
        """The feature names this variant regularises on ``model``."""
        return pick_layers(model, self.layer, self.info.name)

    def configure(self, model: nn.Module) -> None:
        self.layers_of(model)

    def penalty(self, out: Output, losses: Losses, batch: Batch, model: nn.Module) -> dict[str, Tensor]:
        names = self.layers_of(model)
        if len(losses.tasks) < 2:
            raise ConfigError(f"{self.info.name} needs two task losses, got {', '.join(losses.tasks) or 'none'}")
        feats = require_features(out.features, names, self.info.name)
        grads = [representation_gradients(loss, feats) for loss in losses.tasks.values()]  # task x layer
        per_layer = []
        for k, name in enumerate(names):
            with torch.autocast(feats[k].device.type, enabled=False):  # float32 under mixed precision
                cos = pair_cosines([adversarial_directions(g[k], self.params.eps) for g in grads])
            per_layer.append(cos.abs().mean())
            self._log(f"abs_cos/{name}" if len(names) > 1 else "abs_cos", per_layer[-1])
            self._log(f"cos/{name}" if len(names) > 1 else "cos", cos.mean())
        value = self.params.lambda_rlar * torch.stack(per_layer).mean()
        if len(names) > 1:
            self._log("abs_cos", torch.stack(per_layer).mean())
        self._log("penalty", value)
        return {self.info.name: value}

    def _log(self, key: str, value: Tensor) -> None:
        self._means.add({key: value})

    def diagnostics(self) -> dict[str, float]:
        """Epoch means of the penalty, of |cos| (per layer for ``mean``) and of the signed cos."""
        return self._means.pop()


def _variant(layer: str, summary: str) -> type[RLAR]:
    info = MethodInfo(f"rlar@{layer}", "regularizer", "representation", PAPER + ", layer ablation (Tables 3-4)",
                      summary, min_tasks=2)
    attrs = {"info": info, "layer": layer, "__doc__": summary, "__module__": __name__}
    return register(type(f"RLAR_{layer}", (RLAR,), attrs))


register(RLAR)
RLARLast = _variant("last", "RLAR at the encoder stage just above the bottleneck")
RLARMid = _variant("mid", "RLAR at the middle encoder stage (stride 8 on a 5-stage encoder)")
RLARMean = _variant("mean", "RLAR: mean of the penalties at the three deepest encoder stages")
