"""Vanilla multi-task learning: shared encoder, Dice + class-weighted cross-entropy.

The baseline of the RLAR paper (§3.4): a U-Net whose encoder is shared by the
segmentation decoder and a light TI-RADS head at the bottleneck, trained on
``w_seg * Dice + w_cls * wCE`` with class weights from the training fold's frequencies.
Other bases (clinical guidance, …) build on :class:`MultiTaskBase`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from bench.data import Batch
from bench.losses import soft_dice_loss, weighted_ce
from bench.method import Base, Losses, MethodInfo, StepContext, register
from bench.models import ModelSpec, MultiTaskUNet, Output
from bench.params import param


@dataclass(frozen=True)
class TaskWeights:
    w_seg: float = param(1.0, "weight of the Dice loss", low=0.0)
    w_cls: float = param(1.0, "weight of the weighted cross-entropy", low=0.0)


class MultiTaskBase(Base):
    """Shared-encoder U-Net + bottleneck head; Dice for the mask, weighted CE for TI-RADS."""

    Params = TaskWeights

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {"w_cls": trial.suggest_float("w_cls", 0.1, 10.0, log=True)}

    def build_model(self, spec: ModelSpec) -> nn.Module:
        return MultiTaskUNet(spec)

    def losses(self, out: Output, batch: Batch, step: StepContext) -> Losses:
        assert out.seg is not None and out.cls is not None
        return Losses(tasks={
            "seg": self.params.w_seg * soft_dice_loss(out.seg, batch.mask),
            "cls": self.params.w_cls * weighted_ce(out.cls, batch.label, step.class_weights),
        })


@register
class Vanilla(MultiTaskBase):
    info = MethodInfo(
        name="vanilla",
        role="base",
        family="mtl",
        paper="RLAR paper §3.4 (vanilla multitask baseline)",
        summary="shared-encoder U-Net, Dice + class-weighted CE, head at the bottleneck",
        default=True,
    )
