"""Segmentation and classification metrics against numbers worked out by hand."""

import io
import math

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from bench.metrics import (
    classification_metrics,
    confusion,
    confusion_figure,
    segmentation_scores,
    summarize,
)


def rect(shape, r0, r1, c0, c1):
    """Mask with rows r0..r1-1 and columns c0..c1-1 set."""
    m = np.zeros(shape, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


# ------------------------------------------------------------------------------ segmentation
def test_dice_iou_overlapping_rectangles():
    a = rect((10, 10), 0, 4, 0, 4)  # 16 pixels
    b = rect((10, 10), 2, 6, 2, 6)  # 16 pixels; overlap rows 2-3 x cols 2-3 = 4 pixels
    s = segmentation_scores(a, b)
    assert s["dice"] == pytest.approx(2 * 4 / (16 + 16))  # 0.25
    assert s["iou"] == pytest.approx(4 / (16 + 16 - 4))  # 1/7
    # 0/1 integer masks give the same result
    assert segmentation_scores(a.astype(np.uint8), b.astype(int)) == s


def test_identical_masks():
    a = rect((8, 8), 1, 5, 2, 7)
    assert segmentation_scores(a, a) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0}


def test_empty_masks():
    empty = np.zeros((10, 20), dtype=bool)
    assert segmentation_scores(empty, empty) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0}
    one = rect((10, 20), 3, 5, 3, 5)
    for s in (segmentation_scores(one, empty), segmentation_scores(empty, one)):
        assert s["dice"] == 0.0 and s["iou"] == 0.0
        assert s["hd95"] == pytest.approx(math.sqrt(10**2 + 20**2))  # image diagonal in pixels
    # diagonal in mm: hypot(10 rows * 0.5, 20 cols * 2.0) = sqrt(25 + 1600)
    assert segmentation_scores(one, empty, spacing=(0.5, 2.0))["hd95"] == pytest.approx(math.sqrt(1625))


def test_hd95_of_shifted_squares_equals_shift():
    # 10x10 squares, B = A shifted 3 columns right. A's 36 boundary pixels to B's boundary:
    # left column (10 px) at 3; top/bottom rows cols 6,7 at 2,1 and cols 8-14 at 0;
    # right column rows 6..13 at min(row-5, 14-row, 3) -> four of them at 3.
    # So 14 of 36 distances are 3 = the max; the 95th percentile (position 0.95*35 = 33.25
    # in the sorted list, inside the last 14) is 3. B -> A is the mirror image.
    a = rect((20, 25), 5, 15, 5, 15)
    b = rect((20, 25), 5, 15, 8, 18)
    assert segmentation_scores(a, b)["hd95"] == pytest.approx(3.0)
    # the same shift along rows
    c = rect((25, 20), 8, 18, 5, 15)
    assert segmentation_scores(rect((25, 20), 5, 15, 5, 15), c)["hd95"] == pytest.approx(3.0)


def test_hd95_anisotropic_spacing():
    # spacing (row 0.5 mm, col 2 mm). Column shift of 3 px: the 10 left-column pixels are
    # 3 * 2.0 = 6 mm away; every other distance is smaller (top row cols 6,7: 4, 2 mm; right
    # column: min(0.5 * row offset, 6) <= 2.5 mm). 10 of 36 at 6 mm covers position 33.25 -> 6.
    a = rect((20, 25), 5, 15, 5, 15)
    b = rect((20, 25), 5, 15, 8, 18)
    assert segmentation_scores(a, b, spacing=(0.5, 2.0))["hd95"] == pytest.approx(6.0)
    # row shift of 3 px: the 10 top-row pixels are 3 * 0.5 = 1.5 mm away, nothing farther
    c, d = rect((25, 20), 5, 15, 5, 15), rect((25, 20), 8, 18, 5, 15)
    assert segmentation_scores(c, d, spacing=(0.5, 2.0))["hd95"] == pytest.approx(1.5)
    # a scalar spacing scales every distance
    assert segmentation_scores(a, b, spacing=0.7)["hd95"] == pytest.approx(2.1)


def test_single_pixel_masks():
    p = np.zeros((9, 9), dtype=bool)
    p[2, 2] = True
    q = np.zeros((9, 9), dtype=bool)
    q[5, 6] = True
    # disjoint: offsets (3, 4) -> distance 5 both ways
    assert segmentation_scores(p, q) == {"dice": 0.0, "iou": 0.0, "hd95": pytest.approx(5.0)}
    # pixel at the centre of a 3x3 square (rows/cols 1..3): overlap 1, areas 1 and 9
    sq = rect((9, 9), 1, 4, 1, 4)
    s = segmentation_scores(p, sq)
    assert s["dice"] == pytest.approx(2 * 1 / (1 + 9))  # 0.2
    assert s["iou"] == pytest.approx(1 / 9)
    # square boundary = its 8 outer pixels (the centre survives the erosion). pixel -> square: 1;
    # square -> pixel: 4 edge pixels at 1, 4 corners at sqrt(2); the 95th percentile of
    # [1,1,1,1,r2,r2,r2,r2] sits at position 6.65, between two sqrt(2) values.
    assert s["hd95"] == pytest.approx(math.sqrt(2))


def _brute_hd95(a, b, sampling):
    """Independent HD95: boundary by explicit 4-neighbour test, distances by cdist."""

    def boundary_points(m):
        padded = np.pad(m, 1, constant_values=False)  # outside the image is background
        inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        return np.argwhere(m & ~inner) * np.asarray(sampling)

    d = cdist(boundary_points(a), boundary_points(b))
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


@pytest.mark.parametrize("seed", range(6))
def test_hd95_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(8, 20)), int(rng.integers(8, 20)))
    a, b = rng.random(shape) < 0.35, rng.random(shape) < 0.5
    a[0, 0] = b[-1, -1] = True  # never empty
    for sampling in ((1.0, 1.0), (0.6, 1.7)):
        assert segmentation_scores(a, b, spacing=sampling)["hd95"] == pytest.approx(_brute_hd95(a, b, sampling))


def test_bad_masks_rejected():
    with pytest.raises(ValueError):
        segmentation_scores(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError):
        segmentation_scores(np.full((4, 4), 0.5), np.zeros((4, 4)))
    with pytest.raises(ValueError):
        segmentation_scores(np.zeros((4, 4)), np.zeros((4, 4)), spacing=(1.0, 0.0))


# ---------------------------------------------------------------------------- classification
# 9 labelled rows + one missing label (-1), classes 0..2.
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, -1])
Y_PRED = np.array([0, 1, 0, 1, 0, 2, 2, 0, 2, 1])
# confusion (rows truth): [[2,1,0],[1,1,0],[1,0,3]]
# class 0: predicted 4x, 2 right -> P 1/2, R 2/3, F1 = 2*(1/3)/(7/6) = 4/7
# class 1: predicted 2x, 1 right -> P 1/2, R 1/2, F1 1/2
# class 2: predicted 3x, 3 right -> P 1,   R 3/4, F1 = 2*(3/4)/(7/4) = 6/7
# macro P = 2/3, macro R = (8+6+9)/36 = 23/36, macro F1 = (8+7+12)/42 = 9/14, accuracy 6/9
# quadratic kappa: w_ij = (i-j)^2; sum w*O = 1+1+4 = 6; row sums (3,2,4), col sums (4,2,3),
# E_ij = r_i c_j / 9 -> sum w*E = (6 + 36 + 8 + 6 + 64 + 8) / 9 = 128/9; kappa = 1 - 54/128 = 37/64
EXPECTED = {"accuracy": 2 / 3, "balanced_accuracy": 23 / 36, "precision": 2 / 3, "recall": 23 / 36,
            "f1": 9 / 14, "kappa": 37 / 64}


def _hand_kappa(t, p, k):
    o = np.zeros((k, k))
    np.add.at(o, (t, p), 1)
    e = np.outer(o.sum(1), o.sum(0)) / o.sum()
    w = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2
    return 1 - (w * o).sum() / (w * e).sum()


def test_classification_by_hand():
    m = classification_metrics(Y_TRUE, Y_PRED, None, num_classes=3)
    for key, value in EXPECTED.items():
        assert m[key] == pytest.approx(value), key
    assert math.isnan(m["auc"])  # no probabilities
    t, p = Y_TRUE[:-1], Y_PRED[:-1]
    assert m["kappa"] == pytest.approx(cohen_kappa_score(t, p, weights="quadratic"))
    assert m["kappa"] == pytest.approx(_hand_kappa(t, p, 3))


def test_missing_labels_ignored():
    keep = Y_TRUE >= 0
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=Y_TRUE.size)
    ref = classification_metrics(Y_TRUE[keep], Y_PRED[keep], probs[keep], 3)
    assert classification_metrics(Y_TRUE, Y_PRED, probs, 3) == ref
    # the unlabelled row's prediction and probabilities are irrelevant
    other, other_probs = Y_PRED.copy(), probs.copy()
    other[-1], other_probs[-1] = 2, (0.0, 0.0, 1.0)
    assert classification_metrics(Y_TRUE, other, other_probs, 3) == ref


def test_absent_classes_excluded_from_macro():
    # with 5 classes, TR4/TR5 (3, 4) never occur: every metric equals the 3-class one,
    # (kappa too: weights use class indices, and classes 3, 4 add only empty rows/columns)
    m = classification_metrics(Y_TRUE, Y_PRED, None, num_classes=5)
    for key, value in EXPECTED.items():
        assert m[key] == pytest.approx(value), key
    # a prediction of an absent class counts as wrong but adds no class to the average:
    # truth [0,0,1,1], pred [0,4,1,1] -> class 0: P 1, R 1/2; class 1: P 1, R 1 -> P 1, R 3/4
    m = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 4, 1, 1]), None, 5)
    assert m["precision"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(0.75)


def test_auc_one_vs_rest_by_hand():
    t = np.array([0, 0, 1, 2])
    probs = np.array([[0.6, 0.2, 0.2], [0.3, 0.4, 0.3], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    # class 0: positives (.6, .3) vs negatives (.5, .1): 3 of 4 pairs ordered -> 3/4
    # class 1: positive .3 vs (.2, .4, .2): 2 of 3 -> 2/3
    # class 2: positive .7 above all negatives -> 1;   mean = (9 + 8 + 12) / 36 = 29/36
    m = classification_metrics(t, probs.argmax(1), probs, num_classes=3)
    assert m["auc"] == pytest.approx(29 / 36)
    assert m["auc"] == pytest.approx(roc_auc_score(t, probs, multi_class="ovr", average="macro"))
    # 5 classes with TR4/TR5 absent: their columns are not used
    wide = np.hstack([probs, np.full((4, 2), 0.05)])
    assert classification_metrics(t, probs.argmax(1), wide, num_classes=5)["auc"] == pytest.approx(29 / 36)


def test_auc_nan_with_one_class():
    t = np.array([2, 2, 2, -1])
    probs = np.full((4, 5), 0.2)
    m = classification_metrics(t, np.array([2, 2, 1, 0]), probs)
    assert math.isnan(m["auc"])
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_no_labelled_rows_all_nan():
    m = classification_metrics(np.array([-1, -1]), np.array([0, 1]), None)
    assert all(math.isnan(v) for v in m.values())


def test_confusion_counts():
    cm = confusion(Y_TRUE, Y_PRED, num_classes=3)
    assert cm.tolist() == [[2, 1, 0], [1, 1, 0], [1, 0, 3]]
    assert confusion(Y_TRUE, Y_PRED).shape == (5, 5)
    with pytest.raises(ValueError):
        confusion(np.array([0, 1]), np.array([0, 5]))


# ------------------------------------------------------------------------------- summarize
def test_summarize_table():
    t = pd.DataFrame({
        "sample_id": ["a", "b", "c", "d"],
        "patient_id": ["p", "p", "q", "r"],
        "label": [0, 1, -1, 2],
        "pred": [0, 2, 1, 2],
        "prob_0": [0.7, 0.1, 0.2, 0.1], "prob_1": [0.2, 0.3, 0.5, 0.2], "prob_2": [0.1, 0.6, 0.3, 0.7],
        "dice": [0.8, np.nan, 0.6, 1.0],
        "iou": [0.6, np.nan, 0.4, 1.0],
        "hd95": [2.0, np.nan, 4.0, 0.0],
    })
    s = summarize(t, num_classes=3)
    # segmentation over rows a, c, d: dice (0.8+0.6+1)/3, iou (0.6+0.4+1)/3, hd95 (2+4+0)/3
    assert s["dice"] == pytest.approx(0.8) and s["iou"] == pytest.approx(2 / 3) and s["hd95"] == pytest.approx(2.0)
    assert s["n_seg"] == 3
    # classification over labelled rows a, b, d: truth (0,1,2), pred (0,2,2) -> accuracy 2/3;
    # class 0: P 1 R 1; class 1: never predicted -> P 0, R 0; class 2: P 1/2 R 1
    assert s["n_cls"] == 3
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["precision"] == pytest.approx(0.5)
    assert s["recall"] == pytest.approx(2 / 3)
    # AUC on rows a, b, d: class 0: .7 over (.1, .1); class 1: .3 over (.2, .2); class 2: .7 over
    # (.1, .6) -> every class 1, mean 1 (row c's probabilities are not used)
    assert s["auc"] == pytest.approx(1.0)


def test_summarize_without_outputs():
    base = pd.DataFrame({"sample_id": ["a", "b"], "patient_id": ["p", "q"], "label": [0, 1]})
    assert summarize(base) == {"n_seg": 0.0, "n_cls": 0.0}
    # no classifier (pred -1) and unscored masks (NaN): nothing but the counts
    t = base.assign(pred=-1, dice=np.nan, iou=np.nan, hd95=np.nan)
    assert summarize(t) == {"n_seg": 0.0, "n_cls": 0.0}
    # segmentation only
    s = summarize(base.assign(dice=[0.5, 1.0], iou=[0.25, 1.0], hd95=[3.0, 0.0]))
    assert s == {"dice": 0.75, "iou": 0.625, "hd95": 1.5, "n_seg": 2.0, "n_cls": 0.0}
    # classification without probabilities: auc NaN
    s = summarize(base.assign(pred=[0, 0]))
    assert s["accuracy"] == 0.5 and math.isnan(s["auc"]) and "dice" not in s


def test_confusion_figure_renders():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    cm = np.array([[3, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 2, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 2, 5]])
    fig = confusion_figure(cm)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"
    with pytest.raises(ValueError):
        confusion_figure(cm, ("a", "b"))
