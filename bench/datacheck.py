"""``bench data check NAME --data-root PATH``: validate a dataset folder and summarise it.

Builds the adapter's index (collecting every :class:`~bench.errors.DataWarning`), then reads
every image and mask once: unreadable files, image/mask size mismatches, empty masks, identical
images under different patient ids and patients in two splits are reported, each naming the
sample and file. Nothing is cached or written outside a temporary folder.
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from bench.cache import open_adapter
from bench.data import DatasetAdapter, validate_index
from bench.errors import DataError, DataWarning


@dataclass
class Report:
    dataset: str
    root: str | None
    table: pd.DataFrame | None = None  # the validated index
    class_names: tuple[str, ...] = ()
    sizes: Counter[tuple[int, int]] = field(default_factory=Counter)  # (height, width) -> images
    images_read: int = 0
    warnings: list[str] = field(default_factory=list)  # recoverable: repaired or left out
    errors: list[str] = field(default_factory=list)  # the dataset (or a sample) cannot be used as is

    @property
    def ok(self) -> bool:
        return not self.errors


def check_dataset(spec: str, root: str | Path | None, *, max_images: int | None = None, progress: bool = False) -> Report:
    report = Report(spec, str(root) if root else None)
    with tempfile.TemporaryDirectory(prefix="bench-data-check-") as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        try:
            adapter = open_adapter(spec, root, Path(tmp))
            report.class_names = tuple(adapter.class_names)
            report.table = validate_index(adapter.build_index(), adapter.info.name, len(report.class_names))
        except DataError as err:
            report.errors.append(str(err))
        if report.table is not None:
            _check_pixels(adapter, report, max_images, progress)
            _check_splits(report)
        report.warnings.extend(str(w.message) for w in caught if issubclass(w.category, DataWarning))
    return report


def _check_pixels(adapter: DatasetAdapter, report: Report, max_images: int | None, progress: bool) -> None:
    table = report.table
    assert table is not None
    rows = table if max_images is None else table.iloc[:max_images]
    owners: dict[str, set[str]] = {}
    first: dict[str, str] = {}
    for _, row in tqdm(rows.iterrows(), total=len(rows), desc="reading images", disable=not progress, leave=False):
        sid = row["sample_id"]
        try:
            image, mask = adapter.load_image(row), adapter.load_mask(row)
        except DataError as err:
            report.errors.append(f"sample {sid}: {err}")
            continue
        report.images_read += 1
        report.sizes[image.shape[:2]] += 1
        if image.shape != mask.shape:
            report.errors.append(f"sample {sid}: image {image.shape} and mask {mask.shape} differ in size ({row['image']})")
        elif not np.any(mask):
            report.warnings.append(f"sample {sid}: the mask is empty ({row['mask']})")
        digest = hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()
        owners.setdefault(digest, set()).add(str(row["patient_id"]))
        first.setdefault(digest, sid)
        if len(owners[digest]) == 2 and first[digest] != sid:
            report.errors.append(f"samples {first[digest]} and {sid}: identical images under different patient ids "
                                 f"({', '.join(sorted(owners[digest]))}); they would leak across folds")


def _check_splits(report: Report) -> None:
    table = report.table
    assert table is not None
    splits = table.groupby("patient_id")["split"].nunique()
    for patient in splits[splits > 1].index[:20]:
        report.errors.append(f"patient {patient} has images in more than one split")


def summary_tables(report: Report) -> dict[str, pd.DataFrame]:
    """Images and patients per class and split (and per pathology, where the index has it)."""
    table = report.table
    assert table is not None
    names = [*report.class_names, "missing"]
    cls = pd.Categorical([names[i] for i in table["label"]], categories=names)
    frame = table.assign(**{"class": cls})
    out = {"class": _counts(frame, "class")}
    if "pathology" in table:
        path = table["pathology"].map({0: "benign", 1: "malignant"}).fillna("missing")
        out["pathology"] = _counts(table.assign(pathology=path), "pathology")
    return out


def _counts(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    images = frame.groupby([column, "split"], observed=False).size().unstack(fill_value=0)
    patients = frame.groupby([column, "split"], observed=False)["patient_id"].nunique().unstack(fill_value=0)
    return pd.concat({"images": images, "patients": patients}, axis=1)


def format_report(report: Report) -> str:
    lines = [f"dataset {report.dataset}" + (f" at {report.root}" if report.root else "")]
    if report.table is not None:
        table = report.table
        lines.append(f"{len(table)} images, {table['patient_id'].nunique()} patients (grouping unit)")
        for split, part in table.groupby("split"):
            lines.append(f"  {split}: {len(part)} images, {part['patient_id'].nunique()} patients")
        for name, counts in summary_tables(report).items():
            lines += ["", f"per {name}:", counts.to_string()]
        if report.sizes:
            sizes = ", ".join(f"{w}x{h}: {n}" for (h, w), n in report.sizes.most_common(8))
            more = f" and {len(report.sizes) - 8} more sizes" if len(report.sizes) > 8 else ""
            lines += ["", f"image sizes (width x height) of {report.images_read} images read: {sizes}{more}"]
    for title, items in (("errors", report.errors), ("warnings", report.warnings)):
        lines += ["", f"{len(items)} {title}" + (":" if items else "")]
        lines += [f"  - {item}" for item in items]
    lines += ["", "OK: usable" + (" (warnings above: repaired or left out)" if report.warnings else "")
              if report.ok else "NOT USABLE as is: fix the errors above"]
    return "\n".join(lines)
