"""The paired patient bootstrap of bench.stats on a ThyroidXL-sized evaluation set (9,541 images x 3
seeds, 3,275 patients, 2,000 resamples). Run with `make bench`; the normal suite runs a small one once."""

import numpy as np
import pandas as pd
import pytest

from bench import stats as S


@pytest.mark.parametrize("metric", ["dice", "f1"])
def test_bootstrap_speed(benchmark, metric):
    n, patients = (28_623, 3_275) if benchmark.enabled else (600, 100)
    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, n)
    a = pd.DataFrame({"dice": rng.random(n), "label": label, "pred": rng.integers(0, 5, n)})
    b = pd.DataFrame({"dice": rng.random(n), "label": label, "pred": rng.integers(0, 5, n)})
    clusters = rng.integers(0, patients, n)

    def run() -> S.Interval:
        return S.bootstrap_difference(metric, a, b, clusters, n_resamples=2000, seed=0, num_classes=5)

    res = benchmark.pedantic(run, rounds=3)  # disabled (the normal suite): one untimed call
    assert res.low < res.estimate < res.high
