"""``tn3k``: TN3K thyroid nodule segmentation (Gong et al., ISBI 2021 / CBM 2022).

Layout::

    <root>/trainval-image/0000.jpg ...   <root>/trainval-mask/0000.jpg ...   (2,879)
    <root>/test-image/0000.jpg ...       <root>/test-mask/0000.jpg ...       (614)
    <root>/label4trainval.csv, label4test.csv   name,label  (0 benign, 1 malignant; optional)

Masks are lossy JPEGs and are thresholded at > 127. TN3K has **no TI-RADS and no patient ids**:
every image is its own group (say so when reporting CV numbers). ``labels=none`` (default)
leaves the class target missing — segmentation only; ``labels=pathology`` makes benign /
malignant the two classes. The ``pathology`` column is filled either way when the label files
exist. The authors' own 5-fold JSON files are not used (thyrobench builds its folds).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from bench.datasets._common import listing, warn

from bench.data import CLASS_NAMES, INDEX_COLUMNS, DatasetAdapter, DatasetInfo, register_dataset
from bench.errors import DataError
from bench.params import param

PARTS = (("train", "trainval"), ("test", "test"))
SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
PATHOLOGY_CLASSES = ("benign", "malignant")


@dataclass(frozen=True)
class TN3KParams:
    labels: str = param("none", "class target: 'none' (segmentation only, TN3K has no TI-RADS) or "
                        "'pathology' (benign/malignant from label4*.csv)", choices=("none", "pathology"))


def _key(name: str) -> str:
    """``"0012.jpg"``, ``"12"`` and ``"12.0"`` all name image 12."""
    name = name.strip()
    if Path(name).suffix.lower() in SUFFIXES:
        name = Path(name).stem
    try:
        return str(int(float(name)))
    except ValueError:
        return name


def read_labels(path: Path) -> dict[str, int]:
    """``name,label`` lines; a header row and float labels are tolerated, bad lines warned about."""
    out: dict[str, int] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        parts = [p.strip() for p in line.replace(";", ",").split(",")]
        if len(parts) < 2 or not parts[0]:
            continue
        try:
            value = float(parts[1])
        except ValueError:
            if i > 1:
                warn(f"{path}:{i}: label {parts[1]!r} is not a number; line ignored")
            continue
        if value not in (0.0, 1.0):
            warn(f"{path}:{i}: label {parts[1]!r} is not 0 (benign) or 1 (malignant); line ignored")
            continue
        out[_key(parts[0])] = int(value)
    return out


@register_dataset
class TN3K(DatasetAdapter):
    info = DatasetInfo("tn3k", "TN3K: {trainval,test}-{image,mask}/ JPEGs, benign/malignant labels, no TI-RADS",
                       "Gong et al., ISBI 2021; github.com/haifangong/TRFE-Net-for-thyroid-nodule-segmentation")
    Params = TN3KParams

    @property  # type: ignore[override]
    def class_names(self) -> tuple[str, ...]:
        return PATHOLOGY_CLASSES if self.params.labels == "pathology" else CLASS_NAMES

    def build_index(self) -> pd.DataFrame:
        assert self.root is not None
        if not (self.root / "trainval-image").is_dir() or not (self.root / "trainval-mask").is_dir():
            raise DataError(f"{self.root} is not a TN3K folder: expected trainval-image/ and trainval-mask/ "
                            f"(and test-image/, test-mask/); found {listing(self.root)}")
        rows = []
        for split, part in PARTS:
            image_dir, mask_dir = self.root / f"{part}-image", self.root / f"{part}-mask"
            if not image_dir.is_dir():
                continue
            labels_path = self.root / f"label4{part}.csv"
            labels = read_labels(labels_path) if labels_path.is_file() else {}
            if not labels_path.is_file():
                if self.params.labels == "pathology":
                    raise DataError(f"{labels_path} is missing; labels=pathology needs label4trainval.csv and label4test.csv")
                warn(f"{labels_path} is missing; pathology unknown for {part}")
            images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in SUFFIXES}
            masks = {p.stem: p for p in sorted(mask_dir.iterdir()) if p.suffix.lower() in SUFFIXES} if mask_dir.is_dir() else {}
            for stem in sorted(set(masks) - set(images)):
                warn(f"{masks[stem]}: mask without an image in {image_dir}; left out")
            for stem, image in images.items():
                if stem not in masks:
                    warn(f"{image}: no mask in {mask_dir}; left out")
                    continue
                pathology = labels.get(_key(stem))
                if labels and pathology is None:
                    warn(f"{image}: no label in {labels_path}; pathology unknown")
                tirads = pathology + 1 if self.params.labels == "pathology" and pathology is not None else None
                sample = f"{part}-{stem}"
                rows.append({"sample_id": sample, "patient_id": sample, "image": str(image), "mask": str(masks[stem]),
                             "tirads": tirads, "source": "tn3k", "split": split, "pathology": pathology})
        if not rows:
            raise DataError(f"{self.root}: no TN3K image with a mask found")
        table = pd.DataFrame(rows)
        table["tirads"] = table["tirads"].astype("Int64")
        table["pathology"] = table["pathology"].astype("Int64")
        return table[[*INDEX_COLUMNS, "pathology"]]
