"""Zero-shot evaluation on external datasets: ``bench run --external aimi=/data/aimi,ddti=/data/ddti``.

Every fold's best checkpoint is evaluated on every row of each external dataset (nothing of it
is trained on or selected on), prepared at the run's image size. Metrics are logged as
``external/<name>/<metric>``, predictions as ``predictions/external_<name>.csv``.

**Label spaces** are reconciled explicitly: classification metrics are computed only when the
external set has the training set's class names (e.g. ACR TR1-TR5 on both sides) and at least
one labelled image; otherwise the set is scored for segmentation only (its ``pred``/``prob_*``
columns are dropped and ``label`` set to -1 in the saved predictions). The decision and its
reason are printed before training and logged as the tag ``external.<name>.labels``.

An external image that is pixel-identical to an image of the training dataset is leakage and
stops the run before training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import params as P
from bench.cache import prepare
from bench.data import DATASETS, PreparedData
from bench.errors import ConfigError, DataError

SEGMENTATION_ONLY = "segmentation only"


@dataclass(frozen=True)
class ExternalSpec:
    spec: str  # dataset spec as for --dataset: "name" or "name:key=value,..."
    root: str | None = None

    @property
    def name(self) -> str:
        return P.split_spec(self.spec)[0]


@dataclass
class ExternalSet:
    name: str  # the adapter name: metrics go to external/<name>/...
    data: PreparedData

    @property
    def rows(self) -> np.ndarray:
        return np.arange(len(self.data.table))


@dataclass
class ExternalView:
    """An external set as one method sees it: its labels in the method's class space, or none."""

    name: str
    data: PreparedData
    classify: bool  # classification metrics too, or segmentation only
    labels: str  # the reconciliation, in words (tag external.<name>.labels)
    rows: np.ndarray


def views(externals: list[ExternalSet], base: Any, train: PreparedData) -> list[ExternalView]:
    """Relabel each external set as ``base`` relabels the training data, then reconcile."""
    out = []
    for ext in externals:
        try:
            data = base.relabel(ext.data)
        except DataError as err:
            out.append(ExternalView(ext.name, ext.data, False, f"{SEGMENTATION_ONLY}: {err}", ext.rows))
            continue
        classify, labels = reconcile(train, data)
        out.append(ExternalView(ext.name, data, classify, labels, ext.rows))
    return out


def parse_external(values: str | list[str] | tuple[str, ...]) -> list[ExternalSpec]:
    """``--external`` values -> specs. Items are comma-separated and take one of the forms

    ``NAME`` (no root), ``NAME=ROOT`` or ``NAME[:key=value,...][@ROOT]`` (dataset options as for
    ``--dataset``, the root last). The option may be repeated.
    """
    items: list[list[str]] = []
    for value in [values] if isinstance(values, str) else values:
        for part in filter(None, (p.strip() for p in value.split(","))):
            head = part.split("@", 1)[0]
            name, eq, _ = head.partition("=")
            if eq and ":" not in name and name in DATASETS:
                items.append([f"{name}@{part.split('=', 1)[1]}"])  # NAME=ROOT
            elif items and eq and ":" not in head and "@" not in items[-1][-1]:
                items[-1].append(part)  # one more key=value of the previous item's options
            else:
                items.append([part])
    specs = []
    for parts in items:
        spec, _, root = ",".join(parts).partition("@")
        specs.append(ExternalSpec(spec.strip(), root.strip() or None))
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--external names {', '.join(twice)} more than once; metrics are logged per dataset name")
    for s in specs:
        if s.root is None and DATASETS.get(s.name).info.needs_root:  # an unknown name fails here, listing the valid ones
            raise ConfigError(f"--external {s.name} needs its folder: {s.name}=/path/to/{s.name}")
        if s.root is not None and not Path(s.root).is_dir():
            raise ConfigError(f"--external {s.name}: root {s.root} is not a folder")
    return specs


def reconcile(train: PreparedData, external: PreparedData) -> tuple[bool, str]:
    """Whether the external set can be scored for classification, and why (or why not)."""
    ours, theirs = tuple(train.class_names), tuple(external.class_names)
    labelled = int((external.table["label"] >= 0).sum())
    if theirs != ours:
        return False, f"{SEGMENTATION_ONLY}: its classes ({'/'.join(theirs)}) are not the training classes ({'/'.join(ours)})"
    if labelled == 0:
        return False, f"{SEGMENTATION_ONLY}: no image has a class label"
    return True, f"segmentation + classification ({'/'.join(ours)}; {labelled} of {len(external.table)} images labelled)"


def check_overlap(train: PreparedData, external: PreparedData, name: str) -> None:
    """Raise if an external image is pixel-identical to an image of the training dataset."""
    shared = set(train.table["pixel_hash"]) & set(external.table["pixel_hash"])
    if shared:
        ids = external.table.loc[external.table["pixel_hash"].isin(shared), "sample_id"].astype(str).tolist()
        raise DataError(f"leakage: {len(ids)} image(s) of external set {name} are identical to images of the "
                        f"training dataset {train.name}: {', '.join(ids[:5])}")


def prepare_externals(specs: list[ExternalSpec], train: PreparedData, data_dir: Path, *, image_size: int,
                      progress: bool = True) -> list[ExternalSet]:
    """Load and cache (at ``image_size``) every external dataset and check it against the training data."""
    out = []
    for s in specs:
        data = prepare(s.spec, s.root, data_dir, image_size=image_size, n_folds=0, progress=progress, with_folds=False)
        check_overlap(train, data, s.name)
        out.append(ExternalSet(s.name, data))
    return out


def segmentation_only(predictions: pd.DataFrame) -> pd.DataFrame:
    """Drop the classifier's columns of a set whose labels do not match the model's classes."""
    table = predictions.drop(columns=[c for c in predictions if c == "pred" or c.startswith("prob_")])
    table["label"] = -1
    return table
