"""The data contract: dataset adapters, the index table, folds, and batches.

An adapter turns a folder (or file) into an **index table**, one row per image, with at
least the columns :data:`INDEX_COLUMNS`; it also knows how to read one image and its mask.
Everything after the index — resizing, caching, folds, batches — is shared (see
:mod:`bench.cache`), so every method sees the same pixels and the same folds.
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from bench import params as P
from bench.errors import DataError
from bench.losses import IGNORE, class_weights
from bench.registry import Registry
from bench.splits import monitor_rows

INDEX_COLUMNS = ("sample_id", "patient_id", "image", "mask", "tirads", "source", "split")
SPLITS = ("train", "test")
CLASS_NAMES = ("TR1", "TR2", "TR3", "TR4", "TR5")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    summary: str
    source: str  # paper or URL
    needs_root: bool = True


class DatasetAdapter(abc.ABC):
    """Reads one dataset layout. Subclasses implement :meth:`build_index`; the default
    readers open ``row.image`` / ``row.mask`` as greyscale image files."""

    info: ClassVar[DatasetInfo]
    Params: ClassVar[type] = P.NoParams
    version: ClassVar[str] = "1"  # bump when build_index's output changes
    class_names: ClassVar[tuple[str, ...]] = CLASS_NAMES

    def __init__(self, root: Path | None, params: Any, workdir: Path) -> None:
        if self.info.needs_root and root is None:
            raise DataError(f"dataset {self.info.name!r} needs --data-root pointing at its folder")
        if root is not None and not Path(root).exists():
            raise DataError(f"dataset {self.info.name!r}: --data-root {root} does not exist")
        self.root = Path(root).resolve() if root is not None else None
        self.params = params
        self.workdir = workdir

    @abc.abstractmethod
    def build_index(self) -> pd.DataFrame:
        """One row per image with :data:`INDEX_COLUMNS` (``tirads`` 1..5 or missing)."""

    def load_image(self, row: pd.Series) -> np.ndarray:
        return read_grey(Path(row["image"]))

    def load_mask(self, row: pd.Series) -> np.ndarray:
        if not isinstance(row["mask"], str) or not row["mask"]:
            raise DataError(f"sample {row['sample_id']}: no mask file in the index")
        return read_grey(Path(row["mask"])) > 127

    @classmethod
    def fingerprint(cls, params: Any, root: Path | None) -> str:
        """Identifies the index an adapter builds: name, version, parameters, root folder."""
        key = json.dumps([cls.info.name, cls.version, P.as_dict(params), str(root)], sort_keys=True, default=str)
        return hashlib.sha256(key.encode()).hexdigest()[:12]


DATASETS: Registry[type[DatasetAdapter]] = Registry("dataset", "bench.datasets", "thyrobench.datasets")


def register_dataset(cls: type[DatasetAdapter]) -> type[DatasetAdapter]:
    return DATASETS.register(cls.info.name, cls)


def read_grey(path: Path) -> np.ndarray:
    """A greyscale uint8 array from an image file, or a :class:`DataError` naming the file."""
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("L"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot read {path}: {err}") from err


def validate_index(table: pd.DataFrame, dataset: str, num_classes: int = len(CLASS_NAMES)) -> pd.DataFrame:
    """Check the adapter's table and add the ``label`` column (class index, -1 if missing).

    ``tirads`` holds the 1-based class of the adapter's ``class_names`` (TR1..TR5 by default).
    """
    missing = [c for c in INDEX_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"dataset {dataset}: index lacks column(s) {', '.join(missing)}")
    if table.empty:
        raise DataError(f"dataset {dataset}: no images found")
    dup = table["sample_id"][table["sample_id"].duplicated()]
    if len(dup):
        raise DataError(f"dataset {dataset}: duplicate sample_id {', '.join(map(str, dup[:5]))}")
    bad_split = sorted(set(table["split"]) - set(SPLITS))
    if bad_split:
        raise DataError(f"dataset {dataset}: unknown split value(s) {bad_split}; expected {SPLITS}")
    tirads = pd.to_numeric(table["tirads"], errors="coerce")
    bad = tirads.notna() & ~tirads.isin(range(1, num_classes + 1))
    if bad.any():
        raise DataError(f"dataset {dataset}: sample {table['sample_id'][bad].iloc[0]} has tirads outside 1..{num_classes}")
    if "train" not in set(table["split"]):
        raise DataError(f"dataset {dataset}: no image in the training split")
    table = table.reset_index(drop=True).copy()
    table["patient_id"] = table["patient_id"].astype(str)
    table["tirads"] = tirads.astype("Int64")
    table["label"] = (tirads.fillna(0).astype(int) - 1).where(tirads.notna(), IGNORE).astype(int)
    return table


@dataclass
class Batch:
    image: Tensor  # B x 1 x S x S, per-image standardised
    mask: Tensor  # B x 1 x S x S in {0, 1}
    label: Tensor  # B class indices, -1 where TI-RADS is missing
    index: Tensor  # B row numbers into the dataset table
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.index)

    @classmethod
    def collate(cls, items: dict[str, Tensor], device: torch.device) -> Batch:
        items = {k: v.to(device, non_blocking=True) for k, v in items.items()}
        core = {k: items.pop(k) for k in ("image", "mask", "label", "index")}
        return cls(**core, extras=items)


@dataclass
class PreparedData:
    """A dataset ready for training: the table, cached arrays and fixed folds."""

    name: str
    table: pd.DataFrame  # validated index + ``label``, ``fold`` (-1 outside the CV split), ``pixel_hash``
    images: np.ndarray  # N x S x S uint8 (memory-mapped)
    masks: np.ndarray  # N x S x S uint8 in {0, 1}
    workdir: Path
    n_folds: int
    split_seed: int
    class_names: tuple[str, ...] = CLASS_NAMES

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.table["split"].to_numpy() == split)

    def fold(self, k: int, *, monitor_fraction: float = 0.1, select_on: str = "inner") -> FoldData:
        if not 0 <= k < self.n_folds:
            raise DataError(f"fold {k} does not exist; folds are 0..{self.n_folds - 1}")
        folds = self.table["fold"].to_numpy()
        heldout = np.flatnonzero(folds == k)
        train = np.flatnonzero((folds >= 0) & (folds != k))
        if select_on == "heldout":
            monitor = heldout
        else:
            monitor = monitor_rows(self.table, train, monitor_fraction, self.split_seed + k)
            train = np.setdiff1d(train, monitor)
        return FoldData(self, k, train, monitor, heldout)


@dataclass
class FoldData:
    data: PreparedData
    fold: int
    train: np.ndarray  # rows the model trains on
    monitor: np.ndarray  # rows for per-epoch validation and checkpoint selection
    heldout: np.ndarray  # the fold's held-out rows: the "val" evaluation set

    def class_weights(self) -> Tensor:
        labels = self.data.table["label"].to_numpy()[self.train]
        return class_weights(torch.as_tensor(labels), len(self.data.class_names))


class SampleSet(Dataset[dict[str, Tensor]]):
    """Rows of a :class:`PreparedData` as tensors, with light augmentation for training.

    Augmentation keeps ultrasound geometry: horizontal flips only (a vertical flip would put
    the transducer at the bottom) plus a random contrast/gamma change.
    """

    def __init__(self, data: PreparedData, rows: np.ndarray, extras: dict[str, np.ndarray], augment: bool) -> None:
        self.data, self.rows, self.extras, self.augment = data, rows, extras, augment
        self.labels = data.table["label"].to_numpy()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        r = int(self.rows[i])
        image = torch.from_numpy(np.array(self.data.images[r], dtype=np.float32) / 255.0)[None]
        mask = torch.from_numpy(np.array(self.data.masks[r], dtype=np.float32))[None]
        if self.augment:
            if torch.rand(()) < 0.5:
                image, mask = image.flip(-1), mask.flip(-1)
            gamma = torch.empty(()).uniform_(0.7, 1.5)
            image = image.clamp(min=0).pow(gamma)
        image = (image - image.mean()) / (image.std() + 1e-6)
        item = {"image": image, "mask": mask, "label": torch.tensor(self.labels[r]), "index": torch.tensor(r)}
        for key, values in self.extras.items():
            item[key] = torch.as_tensor(values[r])
        return item
