"""``thyroidxl``: ThyroidXL (VNPT-AI, MICCAI 2025; Hugging Face ``VNPT-AI/ThyroidXL``, gated).

Current release::

    <root>/{train,test}/images/<patient>_<8 hex>_<frame>.png
    <root>/{train,test}/masks/<same name>.png          nodule > 127
    <root>/stats/id2info_eng.json                        patient id -> record (nodule_1.TIRADS, conclusion, images)
    <root>/stats/{train,test}_patients.txt               the official patient split

Older revisions (COCO style) are read too: ``{train,test}/{train,test}_annotations.json`` with
``images[].file_name`` and a benign/malignant ``category_id``, or root-level
``{train,test}_annotations.json`` whose ``info`` maps patient id -> the same record as
``id2info_eng.json``. Images are looked for in ``<split>/images/`` and then ``<split>/``.

The patient id is the 8-digit file-name prefix, kept as a zero-padded string. TI-RADS is
``nodule_1.TIRADS`` of the patient's record (ACR TR1-TR5, one value per patient). The split is
the official one from ``stats/*_patients.txt`` where present, otherwise the folder.
``pathology`` is 1 for ``conclusion`` 1/2 (malignant by histopathology/FNAC), 0 for 3/4.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
from bench.datasets._common import listing, warn

from bench.data import INDEX_COLUMNS, SPLITS, DatasetAdapter, DatasetInfo, register_dataset
from bench.errors import DataError

_PATIENT = re.compile(r"^(\d+)_")
SUFFIXES = (".png", ".jpg", ".jpeg")
MALIGNANT_CONCLUSIONS = {1, 2}
BENIGN_CONCLUSIONS = {3, 4}


def patient_of(name: str) -> str | None:
    """``00000058_2201CE11_0.png`` -> ``"00000058"``."""
    match = _PATIENT.match(name)
    return match.group(1) if match else None


def tirads_of(record: dict[str, Any] | None) -> int | None:
    nodule = (record or {}).get("nodule_1") or {}
    value = nodule.get("TIRADS")
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() and 1 <= number <= 5 else None


def pathology_of(record: dict[str, Any] | None) -> int | None:
    try:
        conclusion = int((record or {}).get("conclusion"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return 1 if conclusion in MALIGNANT_CONCLUSIONS else 0 if conclusion in BENIGN_CONCLUSIONS else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read JSON ({err})") from err


@register_dataset
class ThyroidXL(DatasetAdapter):
    info = DatasetInfo("thyroidxl", "ThyroidXL: {train,test}/{images,masks}/*.png, stats/id2info_eng.json, official patient split",
                       "VNPT-AI, MICCAI 2025; huggingface.co/datasets/VNPT-AI/ThyroidXL")

    def build_index(self) -> pd.DataFrame:
        assert self.root is not None
        records = self._records()
        coco = self._coco_pathology()
        image_dirs = {s: d for s in SPLITS if (d := self._image_dir(s)) is not None}
        if not image_dirs or not (records or coco):
            raise DataError(
                f"{self.root} is not a ThyroidXL folder: expected train/images/, train/masks/ and "
                f"stats/id2info_eng.json (or COCO train/train_annotations.json); found {listing(self.root)}")
        official = self._official_split()
        if not records:
            warn(f"{self.root}: no patient records (stats/id2info_eng.json, or 'info' in root-level "
                 "train_annotations.json); TI-RADS missing for every image")
        rows = []
        for folder_split, image_dir in image_dirs.items():
            mask_dir = self.root / folder_split / "masks"
            for image in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in SUFFIXES):
                patient = patient_of(image.name)
                if patient is None:
                    warn(f"{image}: file name does not start with a patient id ('<patient>_<hex>_<frame>.png'); left out")
                    continue
                mask = mask_dir / image.name
                if not mask.is_file():
                    warn(f"{image}: no mask {mask}; left out")
                    continue
                record = records.get(patient)
                if records and record is None:
                    warn(f"{image}: patient {patient} has no record in the id2info file; TI-RADS missing")
                tirads = tirads_of(record)
                if record is not None and tirads is None:
                    warn(f"{image}: patient {patient} has no valid nodule_1.TIRADS "
                         f"({((record.get('nodule_1') or {}).get('TIRADS'))!r}); TI-RADS missing")
                split = official.get(patient, folder_split)
                if official and patient not in official:
                    warn(f"{image}: patient {patient} is in neither stats/*_patients.txt; using the folder ({folder_split})")
                elif split != folder_split:
                    warn(f"{image}: patient {patient} is in the official {split} split but the file is under {folder_split}/; "
                         f"using the official split")
                pathology = pathology_of(record)
                rows.append({"sample_id": image.stem, "patient_id": patient, "image": str(image), "mask": str(mask),
                             "tirads": tirads, "source": "thyroidxl", "split": split,
                             "pathology": pathology if pathology is not None else coco.get(image.name)})
        if not rows:
            raise DataError(f"{self.root}: no ThyroidXL image with a mask found under {', '.join(map(str, image_dirs.values()))}")
        table = pd.DataFrame(rows)
        table["tirads"] = table["tirads"].astype("Int64")
        table["pathology"] = table["pathology"].astype("Int64")
        self._check_listed_images(records, set(table["sample_id"]))
        return table[[*INDEX_COLUMNS, "pathology"]]

    def _image_dir(self, split: str) -> Path | None:
        assert self.root is not None
        for folder in (self.root / split / "images", self.root / split):
            if folder.is_dir() and any(p.suffix.lower() in SUFFIXES for p in folder.iterdir()):
                return folder
        return None

    def _records(self) -> dict[str, dict[str, Any]]:
        """Patient records: ``stats/id2info_eng*.json``, else the ``info`` of root-level COCO files."""
        assert self.root is not None
        for name in ("id2info_eng.json", "id2info_eng_clean.json"):
            path = self.root / "stats" / name
            if path.is_file():
                data = _read_json(path)
                if not isinstance(data, dict):
                    raise DataError(f"{path}: expected an object keyed by patient id, found {type(data).__name__}")
                return {str(k): v for k, v in data.items() if isinstance(v, dict)}
        records: dict[str, dict[str, Any]] = {}
        for split in SPLITS:
            path = self.root / f"{split}_annotations.json"
            if path.is_file():
                info = _read_json(path).get("info")
                if isinstance(info, dict):
                    records.update({str(k): v for k, v in info.items() if isinstance(v, dict)})
        return records

    def _coco_pathology(self) -> dict[str, int]:
        """File name -> 0 benign / 1 malignant from COCO ``categories`` names, where such files exist."""
        assert self.root is not None
        out: dict[str, int] = {}
        for split in SPLITS:
            for path in (self.root / split / f"{split}_annotations.json", self.root / f"{split}_annotations.json"):
                if not path.is_file():
                    continue
                coco = _read_json(path)
                if not isinstance(coco, dict) or "images" not in coco:
                    raise DataError(f"{path}: not a COCO annotation file (no 'images' list)")
                names = {c["id"]: str(c.get("name", "")).lower() for c in coco.get("categories", [])}
                files = {img["id"]: img["file_name"] for img in coco["images"]}
                for ann in coco.get("annotations", []):
                    name = names.get(ann.get("category_id"), "")
                    if ann.get("image_id") in files and ("malig" in name or "benign" in name):
                        out[Path(files[ann["image_id"]]).name] = int("malig" in name)
        return out

    def _official_split(self) -> dict[str, str]:
        assert self.root is not None
        split_of: dict[str, str] = {}
        for split in SPLITS:
            path = self.root / "stats" / f"{split}_patients.txt"
            if not path.is_file():
                continue
            for line in path.read_text().split():
                if split_of.get(line, split) != split:
                    raise DataError(f"{path}: patient {line} is listed in both stats/train_patients.txt and stats/test_patients.txt")
                split_of[line] = split
        return split_of

    def _check_listed_images(self, records: dict[str, dict[str, Any]], found: set[str]) -> None:
        for patient, record in records.items():
            for name in record.get("images") or []:
                if Path(name).stem not in found:
                    warn(f"stats/id2info: patient {patient} lists {name}, which has no image+mask pair under {self.root}")
