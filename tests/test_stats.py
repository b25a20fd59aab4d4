"""bench.stats against scipy / statsmodels / scikit-learn / hand-computed values on the same numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from bench import stats as S
from bench.metrics import classification_metrics


@pytest.fixture
def table() -> pd.DataFrame:
    """6 (fold, seed) blocks x 4 methods, method m3 clearly best."""
    rng = np.random.default_rng(7)
    values = rng.normal(0.7, 0.03, size=(6, 4)) + np.array([0.0, 0.01, 0.02, 0.08])
    index = pd.MultiIndex.from_product([[0, 1, 2], [0, 1]], names=["fold", "seed"])
    return pd.DataFrame(values, index=index, columns=["m0", "m1", "m2", "m3"])


def test_ranks_best_is_one_ties_average_and_lower_is_better_flips():
    t = pd.DataFrame([[0.9, 0.8, 0.8], [0.5, 0.6, 0.7]], columns=["a", "b", "c"])
    assert S.ranks(t, "dice").to_numpy().tolist() == [[1.0, 2.5, 2.5], [3.0, 2.0, 1.0]]
    assert S.ranks(t, "hd95").to_numpy().tolist() == [[3.0, 1.5, 1.5], [1.0, 2.0, 3.0]]
    assert S.mean_ranks(t, "dice").tolist() == [2.0, 2.25, 1.75]


def test_friedman_equals_scipy_and_iman_davenport_equals_anova_on_ranks(table):
    res = S.friedman(table)
    assert isinstance(res, S.Friedman)
    ref = stats.friedmanchisquare(*table.to_numpy().T)
    assert res.statistic == pytest.approx(ref.statistic) and res.pvalue == pytest.approx(ref.pvalue)
    # Iman–Davenport F is the two-way (blocks x methods) ANOVA F computed on the within-block ranks
    r = stats.rankdata(-table.to_numpy(), axis=1)
    n, k = r.shape
    grand = r.mean()
    ss_methods = n * ((r.mean(axis=0) - grand) ** 2).sum()
    ss_error = ((r - r.mean(axis=1, keepdims=True) - r.mean(axis=0, keepdims=True) + grand) ** 2).sum()
    f = (ss_methods / (k - 1)) / (ss_error / ((k - 1) * (n - 1)))
    assert res.iman_davenport_f == pytest.approx(f)
    assert res.iman_davenport_p == pytest.approx(stats.f.sf(f, k - 1, (k - 1) * (n - 1)))
    assert (res.k, res.n) == (4, 6)


def test_friedman_says_why_it_is_absent(table):
    assert "at least 3 methods, found 2" in S.friedman(table[["m0", "m1"]]).reason
    assert "at least 2 complete (fold, seed) blocks, found 1" in S.friedman(table.iloc[:1]).reason
    ties = pd.DataFrame(np.ones((3, 3)))
    assert "ties" in S.friedman(ties).reason


def test_pairwise_wilcoxon_holm_equals_scipy_plus_statsmodels(table):
    p = S.pairwise_wilcoxon(table)
    names = list(table.columns)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    raw = [stats.wilcoxon(table[a], table[b]).pvalue for a, b in pairs]
    adjusted = multipletests(raw, method="holm")[1]
    for (a, b), expected in zip(pairs, adjusted, strict=True):
        assert p.loc[a, b] == pytest.approx(expected) and p.loc[b, a] == pytest.approx(expected)
    assert np.diag(p.to_numpy()).tolist() == [1.0] * 4


def test_wilcoxon_vs_baseline_and_rank_biserial_effect():
    x = np.array([0.71, 0.74, 0.69, 0.80, 0.77, 0.73, 0.75])
    y = np.array([0.70, 0.70, 0.70, 0.70, 0.70, 0.75, 0.70])
    w, p, r = S.wilcoxon_vs(x, y)
    ref = stats.wilcoxon(x, y)
    assert (w, p) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue))
    n = len(x)
    r_plus = stats.wilcoxon(x, y, alternative="greater").statistic  # sum of ranks of positive differences
    assert r == pytest.approx(2 * r_plus / (n * (n + 1) / 2) - 1)
    assert S.wilcoxon_vs(y, y) == (0.0, 1.0, 0.0)
    assert S.rank_biserial(np.array([1.0, 2.0, 3.0])) == 1.0 and S.rank_biserial(np.array([-1.0, -2.0])) == -1.0


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 0.03, 0.06, 0.04 -> monotone 0.03, 0.06, 0.06
    assert S.holm([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])
    assert S.holm([]).size == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_metrics_equal_bench_metrics(seed):
    rng = np.random.default_rng(seed)
    t = rng.choice([0, 1, 2, 4], size=60)  # class 3 absent from the truth
    p = np.where(rng.random(60) < 0.6, t, rng.choice([0, 1, 3], size=60))  # class 4 never predicted wrongly, 3 only wrongly
    ref = classification_metrics(t, p, None, 5)
    cm = np.zeros((5, 5))
    np.add.at(cm, (t, p), 1)
    for metric in S.CONFUSION_METRICS:
        assert S.confusion_metric(metric, cm)[0] == pytest.approx(ref[metric]), metric


def _rows(values: np.ndarray, **extra: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"dice": values, **extra})


def test_bootstrap_is_reproducible_with_a_seed_and_estimates_the_difference():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0.6, 0.9, 40), rng.uniform(0.55, 0.85, 40)
    patients = np.repeat(np.arange(20), 2)
    one = S.bootstrap_difference("dice", _rows(a), _rows(b), patients, n_resamples=500, seed=11)
    two = S.bootstrap_difference("dice", _rows(a), _rows(b), patients, n_resamples=500, seed=11)
    other = S.bootstrap_difference("dice", _rows(a), _rows(b), patients, n_resamples=500, seed=12)
    assert one == two and one != other
    assert one.estimate == pytest.approx(a.mean() - b.mean())
    assert one.low < one.estimate < one.high and one.n_clusters == 20


def test_bootstrap_resamples_patients_not_rows():
    """Each patient's row duplicated: resampling patients gives exactly the same interval."""
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0.6, 0.9, 30), rng.uniform(0.6, 0.9, 30)
    single = S.bootstrap_difference("dice", _rows(a), _rows(b), np.arange(30), n_resamples=400, seed=5)
    double = S.bootstrap_difference("dice", _rows(np.repeat(a, 2)), _rows(np.repeat(b, 2)), np.repeat(np.arange(30), 2),
                                    n_resamples=400, seed=5)
    assert (single.low, single.high) == (pytest.approx(double.low), pytest.approx(double.high))


def test_bootstrap_matches_scipy_percentile_bootstrap_for_one_sample_per_patient():
    rng = np.random.default_rng(5)
    a = rng.normal(0.8, 0.05, 200)
    b = a - rng.normal(0.02, 0.03, 200)
    ours = S.bootstrap_difference("dice", _rows(a), _rows(b), np.arange(200), n_resamples=4000, seed=0)
    ref = stats.bootstrap((a - b,), np.mean, n_resamples=4000, method="percentile", rng=np.random.default_rng(1))
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=0.1 * width)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=0.1 * width)


def test_bootstrap_of_macro_f1_pairs_the_same_samples():
    rng = np.random.default_rng(6)
    label = rng.integers(0, 5, 80)
    good = np.where(rng.random(80) < 0.8, label, rng.integers(0, 5, 80))
    bad = np.where(rng.random(80) < 0.4, label, rng.integers(0, 5, 80))
    a, b = pd.DataFrame({"label": label, "pred": good}), pd.DataFrame({"label": label, "pred": bad})
    res = S.bootstrap_difference("f1", a, b, np.arange(80) // 2, n_resamples=300, seed=0, num_classes=5)
    expected = classification_metrics(label, good, None, 5)["f1"] - classification_metrics(label, bad, None, 5)["f1"]
    assert res.estimate == pytest.approx(expected)
    assert 0 < res.low < res.estimate < res.high
    assert isinstance(S.bootstrap_difference("auc", a, b, np.arange(80), n_resamples=10), S.Skipped)
    assert "no per-sample dice" in S.bootstrap_difference("dice", a, b, np.arange(80)).reason


def test_delta_m_by_hand_with_hd95_sign_flipped():
    refs = {"dice": 0.80, "iou": 0.70, "hd95": 10.0, "f1": 0.50, "precision": 0.50, "recall": 0.40}
    values = {"dice": 0.84, "iou": 0.70, "hd95": 12.0, "f1": 0.55, "precision": 0.45, "recall": 0.40}
    seg = (0.04 / 0.80 + 0.0 - 2.0 / 10.0) / 3  # hd95 went up: worse
    cls = (-0.05 / 0.50 + 0.0 + 0.05 / 0.50) / 3
    dm, tasks = S.delta_m(values, refs)
    assert dm == pytest.approx(100 * (seg + cls) / 2) and tasks == ["seg", "cls"]
    only_seg, tasks = S.delta_m(values, {k: refs[k] for k in ("dice", "iou", "hd95")})
    assert only_seg == pytest.approx(100 * seg) and tasks == ["seg"]
    assert np.isnan(S.delta_m(values, {})[0])


def test_nemenyi_equals_scikit_posthocs_and_demsar_critical_difference(table):
    import scikit_posthocs as sp

    res = S.nemenyi(table)
    ref = sp.posthoc_nemenyi_friedman(table.to_numpy())
    assert np.allclose(res.pvalues.to_numpy(), ref.to_numpy()) and list(res.pvalues.columns) == list(table.columns)
    # Demšar 2006, Table 5(a): q_0.05 = 2.569 for k = 4 -> CD = 2.569 * sqrt(4 * 5 / (6 * 6))
    assert res.critical_difference == pytest.approx(2.569 * np.sqrt(20 / 36), abs=1e-3)
    assert isinstance(S.nemenyi(table[["m0", "m1"]]), S.Skipped)
