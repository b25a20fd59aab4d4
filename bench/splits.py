"""Patient-grouped, TI-RADS-stratified folds and the leakage check run on every build."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from bench.errors import DataError


def strata(table: pd.DataFrame) -> np.ndarray:
    """Stratification label: the TI-RADS class, with unlabelled samples as a stratum of their own."""
    return table["label"].to_numpy() + 1


def make_folds(table: pd.DataFrame, n_folds: int, seed: int) -> np.ndarray:
    """Fold number for every row of the training split (-1 elsewhere)."""
    folds = np.full(len(table), -1, dtype=int)
    train = np.flatnonzero(table["split"].to_numpy() == "train")
    patients = table["patient_id"].iloc[train].nunique()
    if n_folds < 2:
        raise DataError(f"--folds must be at least 2, got {n_folds}")
    if patients < n_folds:
        raise DataError(f"the training split has {patients} patients, fewer than the {n_folds} folds asked for")
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    sub = table.iloc[train]
    for k, (_, held) in enumerate(sgkf.split(np.zeros(len(sub)), strata(sub), sub["patient_id"].to_numpy())):
        folds[train[held]] = k
    return folds


def check_leakage(table: pd.DataFrame, folds: np.ndarray) -> None:
    """Raise if a patient or an identical image crosses folds, or the test split leaks into training."""
    train = folds >= 0
    per_patient = pd.Series(folds[train]).groupby(table["patient_id"].to_numpy()[train]).nunique()
    crossing = per_patient[per_patient > 1]
    if len(crossing):
        raise DataError(f"leakage: patients in more than one fold: {', '.join(map(str, crossing.index[:10]))}")
    other = table["split"].to_numpy() != "train"
    shared = set(table["patient_id"][train]) & set(table["patient_id"][other])
    if shared:
        raise DataError(f"leakage: patients in both the training split and another split: {sorted(shared)[:10]}")
    if "pixel_hash" in table:
        group = np.where(train, folds, -2)  # every non-training row counts as one more group
        frame = pd.DataFrame({"hash": table["pixel_hash"].to_numpy(), "group": group, "id": table["sample_id"]})
        spread = frame.groupby("hash")["group"].nunique()
        for h in spread[spread > 1].index[:1]:
            ids = frame.loc[frame["hash"] == h, "id"].tolist()
            raise DataError(
                f"leakage: identical images in different folds/splits: {', '.join(ids)}; "
                "the dataset adapter must give them one patient_id"
            )


def check_classes(table: pd.DataFrame, folds: np.ndarray, class_names: list[str]) -> None:
    """Every TI-RADS class present in the training split must appear in every fold."""
    labels = table["label"].to_numpy()
    train = (folds >= 0) & (labels >= 0)
    present = sorted(set(labels[train]))
    for k in sorted(set(folds[folds >= 0])):
        missing = [c for c in present if not np.any(labels[train & (folds == k)] == c)]
        if missing:
            counts = table[train].groupby("label")["patient_id"].nunique()
            per_class = ", ".join(f"{class_names[c]}: {counts.get(c, 0)} patients" for c in present)
            raise DataError(
                f"fold {k} has no sample of {', '.join(class_names[c] for c in missing)}; "
                f"use fewer folds or more data ({per_class})"
            )


def monitor_rows(table: pd.DataFrame, rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A patient-grouped, stratified part of ``rows`` held back for checkpoint selection."""
    sub = table.iloc[rows]
    groups = sub["patient_id"].to_numpy()
    n_patients = len(set(groups))
    if n_patients < 2:
        raise DataError("the training part of a fold has fewer than 2 patients; cannot hold back a monitoring set")
    largest_class = int(np.bincount(strata(sub)).max())  # sklearn needs a class with n_splits members
    n_splits = int(min(max(2, round(1 / fraction)), n_patients, largest_class))
    if n_splits < 2:  # one sample per class: stratifying is moot, hold back one random patient
        patient = np.random.default_rng(seed).choice(sorted(set(groups)))
        return rows[groups == patient]
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # rare classes are expected; the split stays grouped
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        _, held = next(sgkf.split(np.zeros(len(sub)), strata(sub), groups))
    return rows[held]
