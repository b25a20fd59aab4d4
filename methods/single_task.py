"""Single-task baselines: a U-Net segmenter and timm TI-RADS classifiers.

The RLAR paper's Table 1 compares multi-task models with EfficientNet-B7 and ConvNeXt
trained on TI-RADS alone; ``st-unet`` is the same U-Net as ``vanilla`` without the
classification head. Together they are the reference for Δm%.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from bench.data import Batch
from bench.losses import soft_dice_loss, weighted_ce
from bench.method import Base, Losses, MethodInfo, StepContext, register
from bench.models import ModelSpec, MultiTaskUNet, Output, TimmClassifier
from bench.params import NoParams, param


@register
class SegmentationOnly(Base):
    info = MethodInfo("st-unet", "base", "single-task", "Ronneberger et al. 2015 (U-Net)",
                      "single-task segmentation: the vanilla U-Net without the classification head")
    Params = NoParams
    tasks = ("seg",)

    def build_model(self, spec: ModelSpec) -> nn.Module:
        return MultiTaskUNet(spec, with_head=False)

    def losses(self, out: Output, batch: Batch, step: StepContext) -> Losses:
        assert out.seg is not None
        return Losses(tasks={"seg": soft_dice_loss(out.seg, batch.mask)})


class ClassifierOnly(Base):
    """A timm classifier trained with class-weighted CE; the image is its only input."""

    tasks = ("cls",)

    def build_model(self, spec: ModelSpec) -> nn.Module:
        return TimmClassifier(self.params.arch, spec)

    def losses(self, out: Output, batch: Batch, step: StepContext) -> Losses:
        assert out.cls is not None
        return Losses(tasks={"cls": weighted_ce(out.cls, batch.label, step.class_weights)})


@dataclass(frozen=True)
class EffNetParams:
    arch: str = param("efficientnet_b7", "timm model name (efficientnet_b0 for quick tests)")


@dataclass(frozen=True)
class ConvNeXtParams:
    arch: str = param("convnext_tiny", "timm model name (convnext_atto for quick tests)")


@register
class EfficientNet(ClassifierOnly):
    info = MethodInfo("st-effnet", "base", "single-task", "Tan & Le 2019 (EfficientNet); RLAR paper Table 1",
                      "single-task TI-RADS classifier, EfficientNet-B7 from timm")
    Params = EffNetParams


@register
class ConvNeXt(ClassifierOnly):
    info = MethodInfo("st-convnext", "base", "single-task", "Liu et al. 2022 (ConvNeXt); RLAR paper Table 1",
                      "single-task TI-RADS classifier, ConvNeXt from timm")
    Params = ConvNeXtParams
