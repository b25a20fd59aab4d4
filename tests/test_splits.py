"""Patient-grouped stratified folds, the leakage check and the class check."""

import numpy as np
import pandas as pd
import pytest

from bench.errors import DataError
from bench.splits import check_classes, check_leakage, make_folds, monitor_rows


def table(n_patients=30, per_patient=3, seed=0, test_patients=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients + test_patients):
        label = int(rng.integers(0, 5))
        for i in range(per_patient):
            rows.append({"sample_id": f"p{p}_{i}", "patient_id": f"p{p}", "label": label,
                         "split": "test" if p >= n_patients else "train", "pixel_hash": f"h{p}_{i}"})
    return pd.DataFrame(rows)


def test_folds_group_patients_and_are_seeded():
    t = table()
    folds = make_folds(t, 3, seed=1)
    assert set(folds) == {0, 1, 2}
    assert (t.assign(f=folds).groupby("patient_id")["f"].nunique() == 1).all()
    assert np.array_equal(folds, make_folds(t, 3, seed=1))
    assert not np.array_equal(folds, make_folds(t, 3, seed=2))


def test_folds_are_stratified():
    t = table(n_patients=60)
    folds = make_folds(t, 3, seed=0)
    share = pd.crosstab(folds, t["label"], normalize="index")
    assert (share.max() - share.min()).max() < 0.2  # each class about equally common in every fold


def test_non_training_rows_get_no_fold():
    t = table(test_patients=5)
    folds = make_folds(t, 3, seed=0)
    assert (folds[t["split"] == "test"] == -1).all()
    assert (folds[t["split"] == "train"] >= 0).all()


def test_leakage_patient_in_two_folds():
    t = table()
    folds = make_folds(t, 3, seed=0)
    folds[0] = (folds[0] + 1) % 3  # move one image of patient p0 to another fold
    with pytest.raises(DataError, match="patients in more than one fold: p0"):
        check_leakage(t, folds)


def test_leakage_duplicate_images_across_folds():
    t = table()
    folds = make_folds(t, 3, seed=0)
    other = t.index[folds != folds[0]][0]
    t.loc[other, "pixel_hash"] = t.loc[0, "pixel_hash"]
    with pytest.raises(DataError, match="identical images in different folds"):
        check_leakage(t, folds)


def test_leakage_test_patient_in_training():
    t = table(test_patients=2)
    folds = make_folds(t, 3, seed=0)
    t.loc[t.index[-1], "patient_id"] = "p0"
    with pytest.raises(DataError, match="both the training split and another split"):
        check_leakage(t, folds)


def test_missing_class_in_a_fold_is_an_error():
    t = table()
    t.loc[t["patient_id"] == "p0", "label"] = 4
    t.loc[(t["label"] == 4) & (t["patient_id"] != "p0"), "label"] = 3  # only one TR5 patient left
    folds = make_folds(t, 3, seed=0)
    with pytest.raises(DataError, match="has no sample of TR5"):
        check_classes(t, folds, ["TR1", "TR2", "TR3", "TR4", "TR5"])


def test_too_few_patients():
    with pytest.raises(DataError, match="fewer than the 5 folds"):
        make_folds(table(n_patients=3), 5, seed=0)


def test_monitor_rows_are_whole_patients_inside_training_rows():
    t = table(n_patients=40)
    rows = np.arange(60)
    held = monitor_rows(t, rows, 0.1, seed=0)
    assert set(held) <= set(rows)
    patients = set(t.loc[held, "patient_id"])
    assert set(t.loc[rows].index[t.loc[rows, "patient_id"].isin(patients)]) == set(held)
    assert 0 < len(held) < len(rows) / 3
