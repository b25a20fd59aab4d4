"""Segmentation metrics per image (then averaged) and classification metrics over a set.

Segmentation (:func:`segmentation_scores`, one 2-D binary mask pair):

* Dice ``2|A∩B| / (|A|+|B|)`` and IoU ``|A∩B| / |A∪B|``.
* HD95 as in MONAI's ``compute_hausdorff_distance(percentile=95)``: the larger of the two
  *directed* 95th percentiles (boundary of A to the nearest boundary pixel of B, and B to A),
  not the percentile of the pooled distances (MedPy's ``hd95``). Percentiles use numpy's
  linear interpolation. The boundary of a mask is the mask minus its binary erosion by the
  3x3 cross (4-connected structuring element, as in MONAI and MedPy), with everything
  outside the image counted as background, so a mask touching the image edge has a
  boundary there. Distances are Euclidean, in pixels, or in mm when ``spacing=(row, col)``.
* Empty masks: both empty -> dice 1, iou 1, hd95 0 (a perfect "no nodule"); exactly one
  empty -> dice 0, iou 0, hd95 = the image diagonal ``hypot(H*row_spacing, W*col_spacing)``,
  a finite worst case (no two pixels are that far apart) so that averages stay defined.

Classification (:func:`classification_metrics`): rows with ``y_true < 0`` (missing label)
are ignored. Macro averages (precision, recall, F1, and balanced accuracy, which equals
macro recall) run over the classes present in ``y_true`` only: a class absent from an
evaluation set has no true samples, so its recall is 0/0 and would drag the average by
an arbitrary convention. Precision of a class that is never predicted is 0
(``zero_division=0``). AUC is the unweighted mean over present classes of the one-vs-rest
ROC AUC of that class's raw probability column: each per-class AUC only ranks samples by
one column, so it is well defined without renormalising the probabilities over the present
classes; NaN with fewer than two present classes or without probabilities. Kappa is
Cohen's kappa with quadratic weights ``(i-j)^2`` over all ``num_classes`` class indices, so
the weights follow the ordinal TI-RADS distance even when some classes are absent; NaN
when undefined (e.g. truth and prediction are one and the same class everywhere).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import ndimage
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

NUM_CLASSES = 5  # TI-RADS TR1..TR5 -> class indices 0..4

SEG_KEYS = ("dice", "iou", "hd95")
CLS_KEYS = ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "auc", "kappa")

_CROSS = ndimage.generate_binary_structure(2, 1)  # 3x3 cross: 4-connected erosion


# ----------------------------------------------------------------------------- segmentation
def _as_mask(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D mask, got shape {a.shape}")
    if a.dtype != bool:
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must be boolean or contain only 0 and 1")
        a = a.astype(bool)
    return a


def _spacing(spacing: float | tuple[float, float]) -> tuple[float, float]:
    values = np.broadcast_to(np.asarray(spacing, dtype=float), (2,)) if np.ndim(spacing) == 0 else np.asarray(spacing, dtype=float)
    if values.shape != (2,) or not (np.isfinite(values).all() and (values > 0).all()):
        raise ValueError(f"spacing must be a positive number or a (row, col) pair, got {spacing!r}")
    return float(values[0]), float(values[1])


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def _hd95(a: np.ndarray, b: np.ndarray, sampling: tuple[float, float]) -> float:
    ba, bb = _boundary(a), _boundary(b)
    # distance of every pixel to the nearest boundary pixel of the other mask
    to_b = ndimage.distance_transform_edt(~bb, sampling=sampling)[ba]
    to_a = ndimage.distance_transform_edt(~ba, sampling=sampling)[bb]
    return float(max(np.percentile(to_b, 95), np.percentile(to_a, 95)))


def segmentation_scores(
    pred: np.ndarray, target: np.ndarray, spacing: float | tuple[float, float] = 1.0
) -> dict[str, float]:
    """Dice, IoU and HD95 of one 2-D binary mask pair (bool or 0/1 arrays of one shape).

    HD95 is MONAI's: max of the two directed 95th percentiles of boundary-to-boundary
    distances; boundary = mask minus its erosion by the 3x3 cross. Units: pixels, or mm
    with ``spacing`` (one number, or ``(row, col)``). Both masks empty -> dice 1, iou 1,
    hd95 0; exactly one empty -> dice 0, iou 0, hd95 = image diagonal in the same units.
    """
    a, b = _as_mask(pred, "pred"), _as_mask(target, "target")
    if a.shape != b.shape:
        raise ValueError(f"pred and target shapes differ: {a.shape} vs {b.shape}")
    sampling = _spacing(spacing)
    na, nb = int(a.sum()), int(b.sum())
    if na == 0 and nb == 0:
        return {"dice": 1.0, "iou": 1.0, "hd95": 0.0}
    if na == 0 or nb == 0:
        diagonal = math.hypot(a.shape[0] * sampling[0], a.shape[1] * sampling[1])
        return {"dice": 0.0, "iou": 0.0, "hd95": diagonal}
    inter = int(np.logical_and(a, b).sum())
    return {"dice": 2.0 * inter / (na + nb), "iou": inter / (na + nb - inter), "hd95": _hd95(a, b, sampling)}


# --------------------------------------------------------------------------- classification
def _labelled(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer truth and prediction of the labelled rows, and the boolean row selection."""
    t, p = np.asarray(y_true).astype(int).ravel(), np.asarray(y_pred).astype(int).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred lengths differ: {t.size} vs {p.size}")
    keep = t >= 0
    t, p = t[keep], p[keep]
    if (t >= num_classes).any() or ((p < 0) | (p >= num_classes)).any():
        raise ValueError(f"labels and predictions of labelled rows must lie in [0, {num_classes})")
    return t, p, keep


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """``num_classes x num_classes`` counts, rows = truth, columns = prediction; rows with
    ``y_true < 0`` are ignored."""
    t, p, _ = _labelled(y_true, y_pred, num_classes)
    return confusion_matrix(t, p, labels=np.arange(num_classes))


def _auc(t: np.ndarray, probs: np.ndarray | None, present: np.ndarray) -> float:
    if probs is None or present.size < 2:
        return float("nan")
    # each present class has negatives here (the other present classes)
    return float(np.mean([roc_auc_score(t == c, probs[:, c]) for c in present]))


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray | None, num_classes: int = NUM_CLASSES
) -> dict[str, float]:
    """accuracy, balanced_accuracy, macro precision/recall/f1, one-vs-rest macro auc and
    quadratic-weighted kappa of one set.

    Rows with ``y_true < 0`` are ignored; macro averages (and AUC) run over the classes present
    in ``y_true``; precision of a never-predicted class is 0; AUC uses each class's raw
    probability column (``probs`` is N x num_classes) and is NaN with < 2 present classes or
    no ``probs``; kappa weights are ``(i-j)^2`` over all class indices. No labelled row -> all NaN.
    """
    t, p, keep = _labelled(y_true, y_pred, num_classes)
    if t.size == 0:
        return dict.fromkeys(CLS_KEYS, float("nan"))
    if probs is not None:
        probs = np.asarray(probs, dtype=float)
        if probs.shape != (keep.size, num_classes):
            raise ValueError(f"probs must have shape ({keep.size}, {num_classes}), got {probs.shape}")
        probs = probs[keep]
    present = np.unique(t)
    macro = {"labels": present, "average": "macro", "zero_division": 0}
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # predictions of absent classes (balanced accuracy) and undefined kappa only warn
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        balanced = balanced_accuracy_score(t, p)
        kappa = cohen_kappa_score(t, p, labels=np.arange(num_classes), weights="quadratic")
    return {
        "accuracy": float(accuracy_score(t, p)),
        "balanced_accuracy": float(balanced),
        "precision": float(precision_score(t, p, **macro)),
        "recall": float(recall_score(t, p, **macro)),
        "f1": float(f1_score(t, p, **macro)),
        "auc": _auc(t, probs, present),
        "kappa": float(kappa),
    }


# -------------------------------------------------------------------------------- summary
def summarize(predictions: pd.DataFrame, num_classes: int = NUM_CLASSES) -> dict[str, float]:
    """Metrics of one evaluation set from its per-sample prediction table.

    Columns used: ``label`` (-1 = missing), ``pred`` (optional; -1/NaN = no classifier),
    ``prob_0..prob_{K-1}`` (optional, all or none), ``dice, iou, hd95`` (optional, NaN =
    not scored). Segmentation: means over the rows where every present segmentation
    column is finite, reported when there is at least one such row. Classification
    (:func:`classification_metrics` over the labelled rows) when ``pred`` exists and a
    labelled row has ``pred >= 0``. ``n_seg`` and ``n_cls`` count the rows used (0 if none).
    Any other numeric column (a method's per-sample metrics, e.g. ``inconsis_cls``) is
    reported as the mean of its finite values, and left out when it has none.
    """
    out: dict[str, float] = {}
    seg_cols = [k for k in SEG_KEYS if k in predictions]
    n_seg = 0
    if seg_cols:
        values = predictions[seg_cols].to_numpy(dtype=float)
        rows = np.isfinite(values).all(axis=1)
        n_seg = int(rows.sum())
        if n_seg:
            out.update({k: float(v) for k, v in zip(seg_cols, values[rows].mean(axis=0), strict=True)})
    n_cls = 0
    if "pred" in predictions:
        label = predictions["label"].fillna(-1).to_numpy().astype(int)
        pred = predictions["pred"].fillna(-1).to_numpy().astype(int)
        if (pred[label >= 0] >= 0).any():
            prob_cols = [f"prob_{c}" for c in range(num_classes)]
            probs = predictions[prob_cols].to_numpy(dtype=float) if all(c in predictions for c in prob_cols) else None
            out.update(classification_metrics(label, pred, probs, num_classes))
            n_cls = int((label >= 0).sum())
    out["n_seg"] = float(n_seg)
    out["n_cls"] = float(n_cls)
    for col in _extra_columns(predictions):  # per-sample extras (e.g. inconsistency): mean of finite values
        values = pd.to_numeric(predictions[col], errors="coerce").to_numpy(dtype=float)
        if np.isfinite(values).any():
            out[col] = float(values[np.isfinite(values)].mean())
    return out


NON_METRIC_COLUMNS = ("sample_id", "patient_id", "label", "pred", "fold", "seed")


def _extra_columns(predictions: pd.DataFrame) -> list[str]:
    """Numeric prediction-table columns that are neither identifiers, labels, probabilities
    nor the segmentation scores summarised above: per-sample metrics added by a method."""
    skip = {*NON_METRIC_COLUMNS, *SEG_KEYS}
    return [c for c in predictions.columns if c not in skip and not str(c).startswith("prob_")
            and pd.api.types.is_numeric_dtype(predictions[c]) and not pd.api.types.is_bool_dtype(predictions[c])]


# -------------------------------------------------------------------------------- figure
def confusion_figure(cm: np.ndarray, class_names: Sequence[str] = ("TR1", "TR2", "TR3", "TR4", "TR5")) -> Figure:
    """Confusion matrix: cells coloured by the row-normalised fraction (recall per true class;
    empty rows stay 0), annotated with the counts. Object API only, safe under Agg."""
    cm = np.asarray(cm)
    k = len(class_names)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {k} class names")
    totals = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, totals, out=np.zeros(cm.shape, dtype=float), where=totals > 0)
    fig = Figure(figsize=(1.0 + 0.75 * k, 0.6 + 0.75 * k))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=9,
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), labels=list(class_names))
    ax.set_yticks(range(k), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fig.tight_layout()
    return fig
