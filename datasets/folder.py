"""``folder``: bring your own data as image/mask files and a labels table.

Layout::

    <root>/images/<sample_id>.<png|jpg|bmp|tif>
    <root>/masks/<sample_id>.<png|...>      same name stem; nodule > 127
    <root>/labels.csv                        sample_id, tirads (1-5 or empty)
                                             [, patient_id] [, split (train/test)]

Without a ``patient_id`` column every image is its own patient — say so in a paper,
since images of one patient in two folds inflate every metric.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.data import DatasetAdapter, DatasetInfo, register_dataset
from bench.errors import DataError

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@register_dataset
class Folder(DatasetAdapter):
    info = DatasetInfo("folder", "your own images/, masks/ and labels.csv", "")

    def build_index(self) -> pd.DataFrame:
        assert self.root is not None
        labels_path = self.root / "labels.csv"
        for required in (self.root / "images", self.root / "masks", labels_path):
            if not required.exists():
                raise DataError(f"dataset folder: {self.root} is not a folder dataset: {required.name} is missing "
                                "(expected images/, masks/ and labels.csv)")
        labels = pd.read_csv(labels_path, dtype={"sample_id": str, "patient_id": str})
        if "sample_id" not in labels or "tirads" not in labels:
            raise DataError(f"{labels_path}: needs columns sample_id and tirads, found {list(labels.columns)}")
        images = _by_stem(self.root / "images")
        masks = _by_stem(self.root / "masks")
        rows = []
        for rec in labels.to_dict("records"):
            sid = str(rec["sample_id"])
            if sid not in images:
                raise DataError(f"{labels_path}: sample {sid} has no image in {self.root / 'images'}")
            if sid not in masks:
                raise DataError(f"{labels_path}: sample {sid} has no mask in {self.root / 'masks'}")
            patient = rec.get("patient_id")
            rows.append({
                "sample_id": sid,
                "patient_id": sid if patient is None or pd.isna(patient) else str(patient),
                "image": str(images[sid]),
                "mask": str(masks[sid]),
                "tirads": rec["tirads"],
                "source": "folder",
                "split": rec.get("split") if isinstance(rec.get("split"), str) else "train",
            })
        return pd.DataFrame(rows, columns=["sample_id", "patient_id", "image", "mask", "tirads", "source", "split"])


def _by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in SUFFIXES}
