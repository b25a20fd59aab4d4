"""MS-MTL: a two-stage network trained with intra- and inter-task consistency.

Kang et al. 2022, Medical Image Analysis 82:102443, "Thyroid nodule segmentation and
classification in ultrasound images through intra- and inter-task consistent learning" (§3).

* **Network** (§3.2, Eq. 1). Stage 1 is the harness's MTL U-Net: binary nodule
  segmentation (T2) and a classification head after the encoder (T1). Stage 2 is a second
  U-Net on the image concatenated with stage 1's segmentation logits (the features before
  its sigmoid, one channel: a 2-channel softmax carries the same information) that predicts
  a (K+1)-class map (T3): background and one channel per class. ``Output.seg`` is stage 2's
  merged nodule map (its final prediction, scored by the shared Dice/IoU/HD95);
  stage 1's binary logits and stage 2's map are in ``extras`` (:mod:`bench.consistency`).
* **Losses** (Eq. 9): Dice (T2) + (K+1)-class Dice (T3) + class-weighted cross-entropy (T1,
  the harness's TI-RADS loss where the paper has BCE), plus λ times the consistency terms,
  which are regularizers: ``intra`` is L_T2T3 (Eq. 4); ``inter`` is L_T1T3 (Algorithm 1,
  Eq. 6) and L_T1T2T3 (Algorithm 2, Eq. 7). λ = 0.3 each, as in the paper.
* **Variants** (Tables 2 and 4): ``msmtl``, ``msmtl+intra``, ``msmtl+inter``,
  ``msmtl+intra+inter``; ``inter:t1t2t3=0`` and ``inter:t1t3=0`` give the other rows of Table 4,
  ``inter:locations=all`` Table 5, ``inter:order=sc|cs`` Table 6. ``mtl-mc`` is the paper's
  one-stage MTL (a U-Net with a (K+1)-class head and the classifier), and ``mtl-mc+inter``
  its "MTL + Inter" row (L_T1T3 only: it has no separate binary map).
* **Classes**: K = 5 TI-RADS categories by default; ``classes=binary`` is the paper's
  benign/malignant (K = 2), from the dataset's ``pathology`` column (0 benign, 1 malignant)
  when it has one, else TR >= ``malignant_from`` (default TR4) counts as malignant.

Soft cross-entropy (Eq. 5) is computed, by default, as ``-sum y * log_softmax(p)`` on the
probability vectors: that is what reproduces the values of the paper's Fig. 3 (1.07 for the
consistent, 1.99 for the inconsistent rows); Eq. 5 as printed (``log p``) is ``sce=plain``.
Dice (Eq. 2) is per image and channel with +1 smoothing, averaged, like the harness's Dice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from bench.consistency import (
    BINARY_SEG,
    MULTICLASS_SEG,
    as_two_channels,
    binary_as_multiclass,
    merged_logits,
    multiclass_as_binary,
    multiclass_as_cls,
)
from bench.data import Batch, PreparedData
from bench.errors import ConfigError, DataError
from bench.losses import IGNORE, soft_dice_loss, weighted_ce
from bench.method import Base, Losses, MethodInfo, Regularizer, StepContext, register
from bench.models import ModelSpec, MultiTaskUNet, Output
from bench.params import param

PAPER = "Kang et al. 2022, MedIA (MS-MTL)"
BINARY_CLASSES = ("benign", "malignant")
PATHOLOGY = "pathology"  # optional index column: 0 benign, 1 malignant


# ----------------------------------------------------------------------------- losses
def dice_loss(pred: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """Per-sample ``1 - soft Dice`` of two ``B x C x H x W`` probability maps, averaged over
    the C channels (Eq. 2 per image and channel, +1 smoothing). Returns a length-B tensor."""
    inter = (pred * target).sum(dim=(2, 3))
    denom = pred.sum(dim=(2, 3)) + target.sum(dim=(2, 3))
    return (1 - (2 * inter + eps) / (denom + eps)).mean(dim=1)


def multiclass_dice_loss(logits: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
    """T3: Dice of the (K+1)-class softmax against the mask labelled with the sample's class.

    A sample without a class label (``IGNORE``) still teaches where the nodule is: it is
    scored on the merged map (background vs sum of the classes) instead.
    """
    prob = torch.softmax(logits.float(), dim=1)
    nodule = mask.float()
    full = dice_loss(prob, binary_as_multiclass(nodule, labels.clamp(min=0), prob.shape[1] - 1))
    merged = dice_loss(multiclass_as_binary(prob), as_two_channels(nodule))
    return torch.where(labels != IGNORE, full, merged).mean()


def soft_cross_entropy(target: Tensor, pred: Tensor, sce: str = "softmax") -> Tensor:
    """Eq. 5, ``-mean_n sum_k target * log(pred)`` on ``B x K`` probabilities. ``sce="softmax"``
    takes ``log_softmax(pred)`` (the paper's implementation, per Fig. 3); ``"plain"`` ``log(pred)``."""
    log_pred = torch.log_softmax(pred, dim=1) if sce == "softmax" else pred.clamp(min=1e-6).log()
    return -(target * log_pred).sum(dim=1).mean()


def intra_loss(prob_mc: Tensor, nodule: Tensor) -> Tensor:
    """L_T2T3 (Eq. 4): Dice between Seg3-as-Seg2 and the binary map (background, nodule)."""
    return dice_loss(multiclass_as_binary(prob_mc), as_two_channels(nodule)).mean()


def t1t3_loss(prob_mc: Tensor, cls_prob: Tensor, *, locations: str = "max", order: str = "both", sce: str = "softmax") -> Tensor:
    """L_T1T3 (Algorithm 1, Eq. 6): soft cross-entropy between Seg-as-Cls and the classifier,
    both orders summed (``order="sc"``: segmentation as target only; ``"cs"``: classifier only)."""
    seg_cls = multiclass_as_cls(prob_mc, locations)
    loss = cls_prob.new_zeros(())
    if order in ("both", "sc"):
        loss = loss + soft_cross_entropy(seg_cls, cls_prob, sce)
    if order in ("both", "cs"):
        loss = loss + soft_cross_entropy(cls_prob, seg_cls, sce)
    return loss


def t1t2t3_loss(prob_mc: Tensor, nodule: Tensor, cls_prob: Tensor) -> Tensor:
    """L_T1T2T3 (Algorithm 2, Eq. 7): Dice between Seg2-as-Seg3 (the binary map routed into the
    predicted class's channel; the argmax passes no gradient to the classifier) and the (K+1)-class map."""
    routed = binary_as_multiclass(nodule, cls_prob.argmax(dim=1), cls_prob.shape[1])
    return dice_loss(routed, prob_mc).mean()


# ----------------------------------------------------------------------------- models
class TwoStageUNet(nn.Module):
    """Stage 1: MTL U-Net (binary mask + classifier); stage 2: U-Net on image ⊕ stage-1 logits -> K+1 classes."""

    binary_stage = True  # a separate binary map for the consistency terms

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.stage1 = MultiTaskUNet(spec)
        self.stage2 = MultiTaskUNet(spec, seg_classes=spec.num_classes + 1, with_head=False,
                                    in_channels=spec.in_channels + 1)
        # stage 1's encoder maps are the model's named features (representation-level methods read them)
        self.layers, self.layer_channels = self.stage1.layers, self.stage1.layer_channels

    def forward(self, x: Tensor) -> Output:
        first = self.stage1(x)
        assert first.seg is not None
        multiclass = self.stage2(torch.cat([x, first.seg.to(x.dtype)], dim=1)).seg
        assert multiclass is not None
        return Output(seg=merged_logits(multiclass), cls=first.cls, embedding=first.embedding,
                      features=first.features, extras={BINARY_SEG: first.seg, MULTICLASS_SEG: multiclass})

    def shared_parameters(self) -> list[nn.Parameter]:
        """Stage 1's encoder, decoder and mask head: every task's loss reaches them."""
        head = set(map(id, self.stage1.head.parameters())) if self.stage1.head is not None else set()
        return [p for p in self.stage1.parameters() if p.requires_grad and id(p) not in head]

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {"cls": [p for p in self.stage1.task_parameters()["cls"]],
                "seg_mc": [p for p in self.stage2.parameters() if p.requires_grad]}


class MultiClassUNet(MultiTaskUNet):
    """One-stage MTL U-Net whose mask head has K+1 channels (Fig. 1a); ``seg`` is the merged map."""

    binary_stage = False

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec, seg_classes=spec.num_classes + 1)

    def forward(self, x: Tensor) -> Output:
        out = super().forward(x)
        assert out.seg is not None
        out.extras[MULTICLASS_SEG] = out.seg
        out.seg = merged_logits(out.seg)
        return out


# ----------------------------------------------------------------------------- labels
def binary_labels(table: pd.DataFrame, dataset: str, source: str, malignant_from: int) -> np.ndarray:
    """Benign 0 / malignant 1 / missing -1 per row: from ``pathology`` or from TI-RADS >= threshold.

    ``source="auto"`` uses the pathology column when the dataset has one with any value
    (rows without one are then unlabelled, not filled from TI-RADS), else TI-RADS.
    """
    has_pathology = PATHOLOGY in table and table[PATHOLOGY].notna().any()
    if source == "pathology" or (source == "auto" and has_pathology):
        if not has_pathology:
            raise DataError(f"dataset {dataset}: binary classes from pathology need a '{PATHOLOGY}' column "
                            "(0 benign, 1 malignant) in the index; it has none (use binary_from=tirads)")
        raw = table[PATHOLOGY]
        values = pd.to_numeric(raw, errors="coerce")
        bad = raw.notna() & ~values.isin((0, 1))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"dataset {dataset}: sample {table['sample_id'].iloc[i]} has {PATHOLOGY}={raw.iloc[i]!r}; "
                            "expected 0 (benign) or 1 (malignant)")
        return values.fillna(IGNORE).astype(int).to_numpy()
    tirads = pd.to_numeric(table["tirads"], errors="coerce")
    if tirads.isna().all():
        raise DataError(f"dataset {dataset}: binary classes need a '{PATHOLOGY}' column or TI-RADS labels; it has neither")
    return np.where(tirads.isna(), IGNORE, (tirads >= malignant_from).astype(int)).astype(int)


# ----------------------------------------------------------------------------- bases
@dataclass(frozen=True)
class LabelParams:
    classes: str = param("tirads", "classes of the classifier and the (K+1)-class map: the dataset's (TI-RADS, "
                         "K=5) or the paper's benign/malignant (K=2)", choices=("tirads", "binary"))
    binary_from: str = param("auto", "source of benign/malignant: the 'pathology' column, TI-RADS, or auto "
                             "(pathology when the dataset has it)", choices=("auto", "pathology", "tirads"))
    malignant_from: int = param(4, "with binary classes from TI-RADS, TR >= this is malignant", low=2, high=5)


@dataclass(frozen=True)
class MultiClassParams(LabelParams):
    w_seg_mc: float = param(1.0, "weight of the (K+1)-class Dice loss (T3)", low=0.0)
    w_cls: float = param(1.0, "weight of the class-weighted cross-entropy (T1)", low=0.0)


@dataclass(frozen=True)
class TwoStageParams(MultiClassParams):
    w_seg: float = param(1.0, "weight of the stage-1 binary Dice loss (T2)", low=0.0)


class MultiClassBase(Base):
    """What both bases share: classes, relabelling, the T3 and T1 losses."""

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {"w_cls": trial.suggest_float("w_cls", 0.1, 10.0, log=True)}

    def relabel(self, data: PreparedData) -> PreparedData:
        table = data.table
        if self.params.classes == "binary":
            labels = binary_labels(table, data.name, self.params.binary_from, self.params.malignant_from)
            names = BINARY_CLASSES
        else:
            labels, names = table["label"].to_numpy(), data.class_names
        train = table["split"].to_numpy() == "train"
        scope = train if train.any() else np.ones_like(train)  # an external (test-only) set: any row
        if not (labels[scope] >= 0).any():
            raise DataError(f"dataset {data.name}: {self.info.name} needs class labels for its (K+1)-class map, "
                            f"but no {'training ' if train.any() else ''}image has a {self.params.classes} label"
                            + (" (classes=binary uses a 'pathology' column)" if self.params.classes == "tirads" else ""))
        if np.array_equal(labels, table["label"].to_numpy()) and names == data.class_names:
            return data
        table = table.copy()
        table["label"] = labels
        return dataclasses.replace(data, table=table, class_names=names)

    def class_losses(self, out: Output, batch: Batch, step: StepContext) -> dict[str, Tensor]:
        assert out.cls is not None
        return {"seg_mc": self.params.w_seg_mc * multiclass_dice_loss(out.extras[MULTICLASS_SEG], batch.mask, batch.label),
                "cls": self.params.w_cls * weighted_ce(out.cls, batch.label, step.class_weights)}

    @staticmethod
    def spec_for(spec: ModelSpec, classes: str) -> ModelSpec:
        return dataclasses.replace(spec, num_classes=len(BINARY_CLASSES)) if classes == "binary" else spec


@register
class MSMTL(MultiClassBase):
    info = MethodInfo("msmtl", "base", "two-stage", PAPER + " §3.2",
                      "two-stage MS-MTL: MTL U-Net (mask + class) then a (K+1)-class U-Net; add +intra/+inter")
    Params = TwoStageParams
    tasks = ("seg", "seg_mc", "cls")

    def build_model(self, spec: ModelSpec) -> nn.Module:
        return TwoStageUNet(self.spec_for(spec, self.params.classes))

    def losses(self, out: Output, batch: Batch, step: StepContext) -> Losses:
        seg = self.params.w_seg * soft_dice_loss(out.extras[BINARY_SEG], batch.mask)
        return Losses(tasks={"seg": seg, **self.class_losses(out, batch, step)})


@register
class MultiClassMTL(MultiClassBase):
    info = MethodInfo("mtl-mc", "base", "mtl", PAPER + " Fig. 1a",
                      "one-stage MTL U-Net with a (K+1)-class mask head and the classifier (the paper's MTL)")
    Params = MultiClassParams
    tasks = ("seg", "cls")

    def build_model(self, spec: ModelSpec) -> nn.Module:
        return MultiClassUNet(self.spec_for(spec, self.params.classes))

    def losses(self, out: Output, batch: Batch, step: StepContext) -> Losses:
        parts = self.class_losses(out, batch, step)
        return Losses(tasks={"seg": parts["seg_mc"], "cls": parts["cls"]})


# ----------------------------------------------------------------------------- regularizers
def _require(model: nn.Module, name: str, *, binary: bool) -> None:
    if not isinstance(model, (TwoStageUNet, MultiClassUNet)):
        raise ConfigError(f"{name} needs a model with a (K+1)-class segmentation and a classifier "
                          f"(base msmtl or mtl-mc), not {type(model).__name__}")
    if binary and not model.binary_stage:
        raise ConfigError(f"{name} needs a separate binary segmentation besides the (K+1)-class one "
                          f"(base msmtl), not {type(model).__name__}")


@dataclass(frozen=True)
class IntraParams:
    lam: float = param(0.3, "weight λ of the consistency term (Eq. 9)", low=0.0)


@dataclass(frozen=True)
class InterParams:
    lam: float = param(0.3, "weight λ of the consistency terms (Eq. 9)", low=0.0)
    t1t3: bool = param(True, "use L_T1T3: classifier vs Seg-as-Cls (Algorithm 1)")
    t1t2t3: bool = param(True, "use L_T1T2T3: (K+1)-class map vs binary map routed by the class (Algorithm 2); "
                         "only with a binary stage")
    locations: str = param("max", "Seg-as-Cls averages over max-probability or all locations (Table 5)",
                           choices=("max", "all"))
    order: str = param("both", "soft-CE orders of L_T1T3: both, sc (segmentation as target) or cs (Table 6)",
                       choices=("both", "sc", "cs"))
    sce: str = param("softmax", "soft CE on log_softmax of the probabilities (reproduces Fig. 3) or plain log (Eq. 5)",
                     choices=("softmax", "plain"))


class ConsistencyTerm(Regularizer):
    """λ-weighted consistency terms; Optuna searches λ on a log scale around the paper's 0.3."""

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {"lam": trial.suggest_float("lam", 0.03, 3.0, log=True)}


@register
class IntraConsistency(ConsistencyTerm):
    info = MethodInfo("intra", "regularizer", "consistency", PAPER + " Eq. 4",
                      "intra-task consistency L_T2T3: Dice of the merged (K+1)-class map vs the binary map",
                      bases=("msmtl",))
    Params = IntraParams

    def configure(self, model: nn.Module) -> None:
        _require(model, self.info.name, binary=True)

    def penalty(self, out: Output, losses: Losses, batch: Batch, model: nn.Module) -> dict[str, Tensor]:
        prob_mc = torch.softmax(out.extras[MULTICLASS_SEG].float(), dim=1)
        nodule = torch.sigmoid(out.extras[BINARY_SEG].float())
        return {"intra": self.params.lam * intra_loss(prob_mc, nodule)}


@register
class InterConsistency(ConsistencyTerm):
    info = MethodInfo("inter", "regularizer", "consistency", PAPER + " Algorithms 1-2, Eqs. 6-7",
                      "inter-task consistency: L_T1T3 (classifier vs Seg-as-Cls) and, on msmtl, L_T1T2T3",
                      bases=("msmtl", "mtl-mc"))
    Params = InterParams

    def configure(self, model: nn.Module) -> None:
        _require(model, self.info.name, binary=False)
        self.use_t1t2t3 = self.params.t1t2t3 and bool(model.binary_stage)
        if not (self.params.t1t3 or self.use_t1t2t3):
            raise ConfigError(f"inter: no term left (t1t3=0 and t1t2t3 {'=0' if model.binary_stage else 'needs base msmtl'})")

    def penalty(self, out: Output, losses: Losses, batch: Batch, model: nn.Module) -> dict[str, Tensor]:
        assert out.cls is not None
        prob_mc = torch.softmax(out.extras[MULTICLASS_SEG].float(), dim=1)
        cls_prob = torch.softmax(out.cls.float(), dim=1)
        terms: dict[str, Tensor] = {}
        if self.params.t1t3:
            terms["inter_t1t3"] = self.params.lam * t1t3_loss(prob_mc, cls_prob, locations=self.params.locations,
                                                              order=self.params.order, sce=self.params.sce)
        if getattr(self, "use_t1t2t3", self.params.t1t2t3 and BINARY_SEG in out.extras):
            nodule = torch.sigmoid(out.extras[BINARY_SEG].float())
            terms["inter_t1t2t3"] = self.params.lam * t1t2t3_loss(prob_mc, nodule, cls_prob)
        return terms
