"""Task (in)consistency between a classifier and binary / multi-class segmentations.

After Kang et al. 2022 (MedIA, "intra- and inter-task consistent learning"): a model may
predict, besides ``Output.seg`` and ``Output.cls``, these maps in ``Output.extras``:

* :data:`MULTICLASS_SEG` — ``B x (K+1) x H x W`` logits: channel 0 background, channel
  ``1 + k`` a nodule of class ``k`` (the paper's 3-class map for K = 2).
* :data:`BINARY_SEG` — ``B x 1 x H x W`` logits of a *separate* binary nodule segmentation
  (e.g. a first stage), as opposed to one read off the multi-class map.

The transforms below turn one kind of prediction into another (all differentiable, on
probabilities); the consistency losses and the inconsistency measures are built on them:

* :func:`multiclass_as_binary` — Seg3-as-Seg2 (§3.3.1): background kept, classes summed.
* :func:`multiclass_as_cls` — Seg-as-Cls (Algorithm 1, steps 1-4): per class, the mean
  probability over the pixels where that class is the most probable one, then a softmax
  over the K class entries.
* :func:`binary_as_multiclass` — Seg2-as-Seg3 (Algorithm 2, steps 1-9): the nodule
  probability is routed into the channel of the predicted class.

Per-sample inconsistency (Eq. 12, averaged over a set by :func:`bench.metrics.summarize`),
each defined only when the outputs it compares exist:

* ``inconsis_cls`` (multi-class map + classifier): 1 when the argmax of Seg-as-Cls differs
  from the predicted class, else 0; NaN when the multi-class label map (argmax over the
  K+1 channels) has no nodule pixel, where Seg-as-Cls says nothing.
* ``inconsis_seg2`` (binary map + multi-class map): ``1 - IoU`` of the binary mask (logit >
  0) and the merged multi-class mask (summed classes more probable than background).
* ``inconsis_seg3`` (all three): ``1 - IoU`` of the multi-class label map and the binary mask
  labelled with the predicted class, counted over (pixel, class) pairs: a nodule pixel
  agrees only when both maps give it the same class.

Both masks empty counts as IoU 1. A model with only a binary mask and a class has none of
these: its class-labelled mask is consistent by construction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from bench.models import Output

MULTICLASS_SEG = "seg_mc"
BINARY_SEG = "seg_binary"
SEG_AS_CLS_EPS = 1e-3  # Algorithm 1, step 3


def merged_logits(multiclass: Tensor) -> Tensor:
    """``B x 1`` nodule logits of a ``B x (K+1)`` multi-class map: log(sum of classes / background).

    ``sigmoid`` of it is the summed class probability, so ``> 0`` is the merged nodule mask.
    """
    return torch.logsumexp(multiclass[:, 1:], dim=1, keepdim=True) - multiclass[:, :1]


def as_two_channels(nodule: Tensor) -> Tensor:
    """``B x 1`` nodule probabilities -> ``B x 2`` (background, nodule)."""
    return torch.cat([1 - nodule, nodule], dim=1)


def multiclass_as_binary(prob: Tensor) -> Tensor:
    """Seg3-as-Seg2: ``B x (K+1)`` probabilities -> ``B x 2`` (background, sum of the classes)."""
    return torch.cat([prob[:, :1], prob[:, 1:].sum(dim=1, keepdim=True)], dim=1)


def multiclass_as_cls(prob: Tensor, locations: str = "max", eps: float = SEG_AS_CLS_EPS) -> Tensor:
    """Seg-as-Cls (Algorithm 1, steps 1-4): ``B x (K+1) x H x W`` probabilities -> ``B x K``.

    ``locations="max"``: each channel is averaged over the pixels where it is the maximum
    (ties count for every tied channel), ``sum / (count + eps)``; ``"all"``: over every pixel
    (the paper's ablation, Table 5). The background entry is dropped and the K class
    entries go through a softmax, as in the paper (so the result is never one-hot).
    """
    if locations == "max":
        is_max = (prob >= prob.amax(dim=1, keepdim=True)).to(prob.dtype)
        mean = (prob * is_max).sum(dim=(2, 3)) / (is_max.sum(dim=(2, 3)) + eps)
    elif locations == "all":
        mean = prob.mean(dim=(2, 3))
    else:
        raise ValueError(f"locations must be 'max' or 'all', got {locations!r}")
    return torch.softmax(mean[:, 1:], dim=1)


def binary_as_multiclass(nodule: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Seg2-as-Seg3 (Algorithm 2, steps 1-9): ``B x 1`` nodule probabilities and ``B`` class
    indices -> ``B x (K+1)``: background ``1 - p``, ``p`` in channel ``1 + label``, zeros elsewhere."""
    route = torch.nn.functional.one_hot(labels.long(), num_classes).to(nodule.dtype)[:, :, None, None]
    return torch.cat([1 - nodule, nodule * route], dim=1)


def _iou_inconsistency(inter: Tensor, size_a: Tensor, size_b: Tensor) -> Tensor:
    union = size_a + size_b - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
    return 1 - iou


@torch.no_grad()
def inconsistency(out: Output) -> dict[str, Tensor]:
    """Per-sample Eq. 12 measures (CPU float tensors of length B) that ``out`` allows; see the module docstring."""
    multiclass, binary, cls = out.extras.get(MULTICLASS_SEG), out.extras.get(BINARY_SEG), out.cls
    if multiclass is None:
        return {}
    logits = multiclass.float()
    label_map = logits.argmax(dim=1)  # 0 = background, 1 + k = class k
    result: dict[str, Tensor] = {}
    predicted = cls.float().argmax(dim=1) if cls is not None else None
    if predicted is not None:
        seg_class = multiclass_as_cls(torch.softmax(logits, dim=1)).argmax(dim=1)
        has_nodule = (label_map > 0).flatten(1).any(dim=1)
        differs = (seg_class != predicted).float()
        result["inconsis_cls"] = torch.where(has_nodule, differs, torch.full_like(differs, float("nan")))
    if binary is not None:
        a = (binary.float()[:, 0] > 0).flatten(1)
        b = (merged_logits(logits)[:, 0] > 0).flatten(1)
        result["inconsis_seg2"] = _iou_inconsistency((a & b).sum(1).float(), a.sum(1).float(), b.sum(1).float())
        if predicted is not None:
            routed = torch.where(binary.float()[:, 0] > 0, 1 + predicted[:, None, None], 0).flatten(1)
            seg3 = label_map.flatten(1)
            inter = ((seg3 == routed) & (seg3 > 0)).sum(1).float()
            result["inconsis_seg3"] = _iou_inconsistency(inter, (seg3 > 0).sum(1).float(), (routed > 0).sum(1).float())
    return {k: v.cpu() for k, v in result.items()}
