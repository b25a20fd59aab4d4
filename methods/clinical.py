"""Clinically guided multi-task learning: radiomics distillation (RLAR paper §2.1–2.2, eqs. 2–3).

The classification embedding e = [e_clin ; e_deep] (global average pool of the bottleneck,
then one linear projection) reserves 13 channels, e_clin, that are regressed onto the
image's radiomics target r (:mod:`bench.datasets.radiomics`, z-scored with the training
fold's statistics): L_clin = mean over the defined entries of (e_clin - r)^2. e_deep (ReLU)
holds the complementary deep features; the classifier is one linear layer reading both, so
the weight column that reads channel j is exactly what the feature-importance analysis
(Table 5, ``bench explain``) zeroes. Radiomics are computed once per dataset, before the
first training step, and never at inference.

Choices of this harness (the paper does not give them; logged as parameters):

* ``lambda_clin`` = 1.0, ``deep_dim`` = 128; no activation on e_clin (it regresses z-scores);
* the 13th feature is the GLCM joint entropy (Table 5) unless ``texture_13th=glcm_imc1``
  (the paper's text);
* L_clin goes in ``Losses.extra``, not ``Losses.tasks``: the tasks stay the benchmark's two
  (mask, TI-RADS), so a gradient combiner (PCGrad, CAGrad, …) aggregates exactly what it
  aggregates for ``vanilla`` and the guidance gradient is added as a plain sum, as in the
  paper's eq. (7); a representation regularizer such as RLAR probes the segmentation and
  classification losses only (the paper: "both segmentation and classification losses").
* samples whose target is undefined (empty or tiny mask; a non-finite feature) contribute
  nothing to L_clin for those entries.

Composes with any regularizer or combiner by recipe: ``clinical+rlar``, ``clinical+pcgrad``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from bench.datasets.radiomics import TEXTURE_13TH, RadiomicsSettings, dataset_radiomics, standardize, target_features
from bench.methods.vanilla import MultiTaskBase, TaskWeights
from torch import Tensor, nn

from bench.data import Batch, FoldData
from bench.errors import ConfigError, DataError
from bench.method import Losses, MethodInfo, StepContext, register
from bench.models import ModelSpec, MultiTaskUNet, Output
from bench.params import param

TARGETS, VALID = "radiomics", "radiomics_valid"  # batch.extras keys


@dataclass(frozen=True)
class ClinicalParams(TaskWeights):
    lambda_clin: float = param(1.0, "weight of the radiomics-guidance MSE (paper: not given)", low=0.0)
    deep_dim: int = param(128, "channels of the deep part of the embedding", low=1)
    texture_13th: str = param("glcm_joint_entropy", "13th target: GLCM joint entropy (Table 5) or IMC1 (text)",
                              choices=TEXTURE_13TH)
    bin_width: float = param(8.0, "pyradiomics fixed bin width, grey levels of the 8-bit image", low=0.0, low_open=True)
    dropout: float = param(0.2, "dropout before the classifier", low=0.0, high=1.0, high_open=True)


class ClinicalHead(nn.Module):
    """Pool -> linear projection to [e_clin (n_clin) ; ReLU(e_deep) (deep_dim)] -> dropout -> linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, n_clin: int, deep_dim: int, dropout: float) -> None:
        super().__init__()
        self.n_clin = n_clin
        self.project = nn.Linear(in_channels, n_clin + deep_dim)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(n_clin + deep_dim, num_classes)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        e = self.project(z.mean(dim=(2, 3)))
        embedding = torch.cat([e[:, : self.n_clin], F.relu(e[:, self.n_clin :])], dim=1)
        return self.classifier(self.drop(embedding)), embedding


def guidance_loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Mean squared error over the defined entries; 0 (in the graph) when none is defined."""
    valid = valid.to(pred.dtype)
    se = (pred.float() - target.float()) ** 2 * valid
    return se.sum() / valid.sum().clamp(min=1.0)


@register
class Clinical(MultiTaskBase):
    info = MethodInfo(
        name="clinical",
        role="base",
        family="mtl",
        paper="RLAR paper §2.1-2.2 (clinically guided multitask, radiomics distillation)",
        summary="vanilla MTL whose TI-RADS embedding has 13 channels regressed onto radiomics targets",
    )
    Params = ClinicalParams

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {**super().search_space(trial), "lambda_clin": trial.suggest_float("lambda_clin", 0.01, 10.0, log=True)}

    @property
    def features(self) -> tuple[str, ...]:
        return target_features(self.params.texture_13th)

    def build_model(self, spec: ModelSpec) -> nn.Module:
        model = MultiTaskUNet(spec, with_head=False)
        in_channels = model.layer_channels["bottleneck"]
        p = self.params
        model.head = ClinicalHead(in_channels, spec.num_classes, len(self.features), p.deep_dim, p.dropout)
        return model

    def configure(self, model: nn.Module) -> None:
        if not isinstance(getattr(model, "head", None), ClinicalHead):
            raise ConfigError(f"{self.info.name}: the model has no clinical head ({type(model).__name__})")

    def prepare(self, fold: FoldData) -> dict[str, np.ndarray]:
        """Targets for every row, z-scored with the statistics of ``fold.train`` only."""
        radiomics = dataset_radiomics(fold.data, RadiomicsSettings(bin_width=self.params.bin_width))
        values, valid = radiomics.select(self.features)
        if not valid[fold.train].any():
            raise DataError(f"dataset {fold.data.name}, fold {fold.fold}: no training image has a mask usable for "
                            f"radiomics targets (see {radiomics.path})")
        std = standardize(values, valid, fold.train)
        return {TARGETS: std.z, VALID: std.valid.astype(np.float32)}

    def losses(self, out: Output, batch: Batch, step: StepContext) -> Losses:
        losses = super().losses(out, batch, step)
        assert out.embedding is not None
        pred = out.embedding[:, : len(self.features)]
        losses.extra["clin"] = self.params.lambda_clin * guidance_loss(pred, batch.extras[TARGETS], batch.extras[VALID])
        return losses

    def guidance_channels(self, model: nn.Module) -> dict[str, tuple[Tensor, int]]:
        """Feature name -> (classifier weight, the column that reads that guidance channel)."""
        head = model.head
        assert isinstance(head, ClinicalHead)
        return {name: (head.classifier.weight, j) for j, name in enumerate(self.features)}
