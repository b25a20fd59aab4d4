"""Statistics for comparing methods on one dataset and evaluation set.

Blocks are (fold, seed) pairs: every method is trained on the same folds with the same
seeds, so a block pairs one run of each method. Conventions (see the README):

* **Ranks** within each block (1 = best, ties share the average rank; ``hd95`` and other
  lower-is-better metrics ranked ascending), then the mean over blocks.
* **Friedman** (scipy ``friedmanchisquare``) as the omnibus test over methods and blocks,
  with the Iman–Davenport F correction alongside. Blocks share training data, so both are
  approximate; they need at least 3 methods and 2 complete blocks.
* **Nemenyi** (scikit-posthocs) and its critical difference, the classic Demšar (2006)
  reading, reported next to the diagram.
* **Pairwise Wilcoxon signed-rank with Holm** over all pairs (scikit-posthocs
  ``posthoc_wilcoxon``): the significance matrix of the critical-difference diagram
  (Benavoli et al. 2016: mean-rank post-hocs such as Nemenyi depend on the other methods).
* **Against a baseline**: Wilcoxon signed-rank over blocks per method and metric, Holm over
  all of those comparisons (statsmodels ``multipletests``), the matched-pairs rank-biserial
  correlation as the effect size, and a patient-cluster bootstrap CI of the difference
  computed from the per-sample predictions (:func:`bootstrap_difference`).
* **Δm%** (Maninis et al. 2019; LibMTL ``count_improvement``): per task the mean over its
  metrics of the signed relative change against the single-task reference, sign-flipped for
  lower-is-better metrics, then the mean over tasks, in percent.

A test that cannot be computed returns :class:`Skipped` with the reason, never raises.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scikit_posthocs as sp
from scipy import stats
from statsmodels.stats.multitest import multipletests

LOWER_IS_BETTER = frozenset({"hd95"})
TASK_METRICS: dict[str, tuple[str, ...]] = {  # the metrics Δm% averages per task (the papers' table columns)
    "seg": ("dice", "iou", "hd95"),
    "cls": ("precision", "recall", "f1"),
}
PER_CASE = frozenset({"dice", "iou", "hd95"})  # a mean of per-sample values
CONFUSION_METRICS = frozenset({"accuracy", "balanced_accuracy", "precision", "recall", "f1", "kappa"})


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER or metric.startswith("inconsis")


@dataclass(frozen=True)
class Skipped:
    """A statistic that was not computed, and why (shown on the leaderboard instead)."""

    reason: str


@dataclass(frozen=True)
class Friedman:
    statistic: float
    pvalue: float
    iman_davenport_f: float
    iman_davenport_p: float
    k: int  # methods
    n: int  # blocks


# ------------------------------------------------------------------------------- ranks
def ranks(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rank of each method (column) within each block (row); 1 = best, ties averaged."""
    values = table.to_numpy(dtype=float)
    signed = values if lower_is_better(metric) else -values
    return pd.DataFrame(stats.rankdata(signed, axis=1), index=table.index, columns=table.columns)


def mean_ranks(table: pd.DataFrame, metric: str) -> pd.Series:
    return ranks(table, metric).mean(axis=0)


# ---------------------------------------------------------------------------- friedman
def friedman(table: pd.DataFrame) -> Friedman | Skipped:
    """Friedman chi-square over blocks (rows) x methods (columns), plus Iman–Davenport F."""
    n, k = table.shape
    if k < 3:
        return Skipped(f"needs at least 3 methods, found {k}" + (" (for 2, see the tests against the baseline)" if k == 2 else ""))
    if n < 2:
        return Skipped(f"needs at least 2 complete (fold, seed) blocks, found {n}")
    with np.errstate(divide="ignore", invalid="ignore"):
        res = stats.friedmanchisquare(*table.to_numpy(dtype=float).T)
    chi2 = float(res.statistic)
    if not np.isfinite(chi2):
        return Skipped("every method ties in every block")
    denom = n * (k - 1) - chi2
    f = (n - 1) * chi2 / denom if denom > 0 else float("inf")
    p_f = float(stats.f.sf(f, k - 1, (k - 1) * (n - 1))) if np.isfinite(f) else 0.0
    return Friedman(chi2, float(res.pvalue), float(f), p_f, k, n)


@dataclass(frozen=True)
class Nemenyi:
    """The classic Demšar (2006) post-hoc, shown for reference next to the Wilcoxon–Holm diagram."""

    pvalues: pd.DataFrame
    critical_difference: float  # mean ranks further apart than this differ at ``alpha``
    alpha: float


def nemenyi(table: pd.DataFrame, alpha: float = 0.05) -> Nemenyi | Skipped:
    """scikit-posthocs ``posthoc_nemenyi_friedman`` and CD = q_alpha * sqrt(k (k + 1) / (6 n))."""
    n, k = table.shape
    if k < 3 or n < 2:
        return Skipped(f"needs at least 3 methods and 2 complete blocks, found {k} and {n}")
    p = sp.posthoc_nemenyi_friedman(table.to_numpy(dtype=float))
    p.index = p.columns = table.columns
    q = stats.studentized_range.ppf(1 - alpha, k, np.inf) / np.sqrt(2.0)
    return Nemenyi(p, float(q * np.sqrt(k * (k + 1) / (6.0 * n))), alpha)


def pairwise_wilcoxon(table: pd.DataFrame) -> pd.DataFrame | Skipped:
    """Holm-adjusted p-values of Wilcoxon signed-rank tests between all pairs of methods."""
    n, k = table.shape
    if k < 2:
        return Skipped(f"needs at least 2 methods, found {k}")
    if n < 2:
        return Skipped(f"needs at least 2 complete (fold, seed) blocks, found {n}")
    long = table.melt(var_name="method", value_name="value")  # column by column: pairs stay in block order
    with warnings.catch_warnings():  # two methods with identical values: scipy divides 0 by 0, p is NaN -> 1
        warnings.simplefilter("ignore", RuntimeWarning)
        p = sp.posthoc_wilcoxon(long, val_col="value", group_col="method", p_adjust="holm")
    return p.reindex(index=table.columns, columns=table.columns).fillna(1.0)


# ---------------------------------------------------------------------- vs a baseline
def rank_biserial(diff: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation (R+ - R-) / (R+ + R-) of nonzero differences."""
    d = np.asarray(diff, dtype=float)
    d = d[d != 0]
    if d.size == 0:
        return 0.0
    r = stats.rankdata(np.abs(d))
    return float((r[d > 0].sum() - r[d < 0].sum()) / r.sum())


def wilcoxon_vs(values: np.ndarray, baseline: np.ndarray) -> tuple[float, float, float]:
    """(W statistic, two-sided p, rank-biserial effect) of paired ``values - baseline``."""
    diff = np.asarray(values, dtype=float) - np.asarray(baseline, dtype=float)
    if not np.any(diff):
        return 0.0, 1.0, 0.0
    res = stats.wilcoxon(values, baseline, zero_method="wilcox")
    return float(res.statistic), float(res.pvalue), rank_biserial(diff)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    p = np.asarray(pvalues, dtype=float)
    if p.size == 0:
        return p
    return np.asarray(multipletests(p, method="holm")[1])


# ------------------------------------------------------------------------- bootstrap
@dataclass(frozen=True)
class Interval:
    estimate: float  # statistic on the original rows
    low: float
    high: float
    n_clusters: int
    n_resamples: int


def bootstrap_difference(
    metric: str,
    method_rows: pd.DataFrame,
    baseline_rows: pd.DataFrame,
    clusters: np.ndarray,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    num_classes: int | None = None,
) -> Interval | Skipped:
    """Percentile CI of ``metric(method) - metric(baseline)`` by a paired cluster bootstrap.

    Row ``i`` of both frames is the same sample in the same (fold, seed) run; ``clusters``
    (patient ids) say which rows are resampled together: each resample draws patients with
    replacement and keeps all their rows for both methods. Per-case metrics (Dice, IoU,
    HD95) are row means; the confusion-matrix metrics are computed on the pooled rows of
    all runs (macro over the classes present, as :mod:`bench.metrics`).
    """
    if len(method_rows) != len(baseline_rows) or len(clusters) != len(method_rows):
        raise ValueError("method rows, baseline rows and clusters must be aligned (same length)")
    stat = _paired_statistic(metric, method_rows, baseline_rows, num_classes)
    if isinstance(stat, Skipped):
        return stat
    keep, features, reduce = stat
    codes = np.unique(np.asarray(clusters)[keep], return_inverse=True)[1]
    n_clusters = int(codes.max()) + 1 if codes.size else 0
    if n_clusters < 2:
        return Skipped(f"needs at least 2 patients with paired {metric} values, found {n_clusters}")
    per_cluster = np.zeros((n_clusters, features.shape[1]))
    np.add.at(per_cluster, codes, features)  # a resample only needs each patient's sums
    estimate = float(reduce(per_cluster.sum(axis=0, keepdims=True))[0])
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, n_resamples, 500):
        size = min(500, n_resamples - start)
        counts = rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=size)
        draws.append(reduce(counts @ per_cluster))
    values = np.concatenate(draws)
    values = values[np.isfinite(values)]
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return Interval(estimate, float(low), float(high), n_clusters, n_resamples)


Reduce = Callable[[np.ndarray], np.ndarray]


def _paired_statistic(
    metric: str, a: pd.DataFrame, b: pd.DataFrame, num_classes: int | None
) -> tuple[np.ndarray, np.ndarray, Reduce] | Skipped:
    """(rows kept, additive per-row features, features summed over a resample -> the difference)."""
    if metric in PER_CASE:
        if metric not in a or metric not in b:
            return Skipped(f"no per-sample {metric} in the predictions")
        x, y = a[metric].to_numpy(dtype=float), b[metric].to_numpy(dtype=float)
        keep = np.isfinite(x) & np.isfinite(y)
        features = np.stack([x[keep] - y[keep], np.ones(int(keep.sum()))], axis=1)
        return keep, features, lambda f: f[:, 0] / f[:, 1]
    if metric in CONFUSION_METRICS:
        if "pred" not in a or "pred" not in b:
            return Skipped("no per-sample class predictions")
        label = a["label"].to_numpy(dtype=float)
        pa, pb = a["pred"].to_numpy(dtype=float), b["pred"].to_numpy(dtype=float)
        keep = (label >= 0) & (pa >= 0) & (pb >= 0)
        t, pa, pb = label[keep].astype(int), pa[keep].astype(int), pb[keep].astype(int)
        k = num_classes or int(max(t.max(initial=0), pa.max(initial=0), pb.max(initial=0))) + 1
        cells = np.zeros((t.size, 2 * k * k))  # one-hot confusion cell of each row, for a then for b
        cells[np.arange(t.size), t * k + pa] = 1.0
        cells[np.arange(t.size), k * k + t * k + pb] = 1.0

        def reduce(f: np.ndarray) -> np.ndarray:
            cm = f.reshape(-1, 2, k, k)
            return confusion_metric(metric, cm[:, 0]) - confusion_metric(metric, cm[:, 1])

        return keep, cells, reduce
    return Skipped(f"no paired bootstrap for {metric} (only per-case and confusion-matrix metrics)")


def confusion_metric(metric: str, cm: np.ndarray) -> np.ndarray:
    """A classification metric from (batched) confusion matrices, rows = truth.

    Macro averages run over the classes present in the truth; precision of a class never
    predicted is 0; kappa has quadratic weights over all classes — as :mod:`bench.metrics`.
    """
    cm = np.asarray(cm, dtype=float)
    cm = cm[None] if cm.ndim == 2 else cm
    k = cm.shape[-1]
    support, predicted, tp = cm.sum(axis=2), cm.sum(axis=1), np.diagonal(cm, axis1=1, axis2=2)
    total = cm.sum(axis=(1, 2))
    present = support > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(present, tp / support, 0.0)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
        n_present = present.sum(axis=1)
        macro = {name: (v * present).sum(axis=1) / n_present for name, v in
                 (("precision", precision), ("recall", recall), ("f1", f1))}
        if metric in macro:
            return macro[metric]
        if metric == "balanced_accuracy":
            return macro["recall"]
        if metric == "accuracy":
            return tp.sum(axis=1) / total
        if metric == "kappa":
            i, j = np.indices((k, k))
            weights = (i - j) ** 2.0
            expected = support[:, :, None] * predicted[:, None, :] / total[:, None, None]
            return 1.0 - (cm * weights).sum(axis=(1, 2)) / (expected * weights).sum(axis=(1, 2))
    raise ValueError(f"not a confusion-matrix metric: {metric!r}")


# ------------------------------------------------------------------------------ Δm%
def delta_m(
    values: Mapping[str, float], references: Mapping[str, float], tasks: Mapping[str, Sequence[str]] = TASK_METRICS
) -> tuple[float, list[str]]:
    """Δm% of one method and the tasks it covers.

    For each task whose metrics have both a value and a single-task reference, the mean over
    those metrics of ``±(M - M_ref) / M_ref`` (minus for lower-is-better), then the mean over
    such tasks, times 100. NaN and no tasks when nothing can be compared.
    """
    per_task = []
    covered = []
    for task, metrics in tasks.items():
        terms = []
        for m in metrics:
            v, ref = values.get(m), references.get(m)
            if v is None or ref is None or not (np.isfinite(v) and np.isfinite(ref)) or ref == 0:
                continue
            sign = -1.0 if lower_is_better(m) else 1.0
            terms.append(sign * (v - ref) / abs(ref))
        if terms:
            per_task.append(float(np.mean(terms)))
            covered.append(task)
    return (100.0 * float(np.mean(per_task)) if per_task else float("nan")), covered
