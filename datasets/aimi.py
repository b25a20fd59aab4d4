"""``aimi``: Stanford AIMI Thyroid Ultrasound Cine-clip (167 patients, 192 nodules; Research Use Agreement).

Layout::

    <root>/dataset.hdf5   image, mask: N x H x W uint8 (mask 0/255); annot_id (|S4), frame_num (|S3)
    <root>/metadata.csv   annot_id, ..., ti-rads_level (ACR 1-5), histopath_diagnosis (0 benign, 1 malignant)

One row per kept frame; frames are read one at a time from the HDF5 (the real file is 36 GB and
is never loaded whole). Byte-string fields are decoded and stripped (``b'129_'`` -> ``"129_"``,
trailing underscore kept, as in ``metadata.csv``).

Grouping: the release has no patient ids, only one ``annot_id`` per nodule clip (192 clips of 167
patients, the mapping is not given). ``annot_id`` is therefore the finest grouping available and
is used as ``patient_id`` (and ``clip_id``): all frames of a clip stay in one fold, but two
nodules of one patient may not. TI-RADS is the clip's ``ti-rads_level``, shared by its frames.
``every=k`` keeps every k-th frame of each clip (by ``frame_num``), the first always.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
from bench.datasets._common import listing, warn

from bench.data import INDEX_COLUMNS, DatasetAdapter, DatasetInfo, register_dataset
from bench.errors import DataError
from bench.params import param

HDF5_KEYS = ("image", "mask", "annot_id", "frame_num")
META_COLUMNS = ("annot_id", "ti-rads_level", "histopath_diagnosis")


@dataclass(frozen=True)
class AIMIParams:
    every: int = param(1, "keep every k-th frame of each clip (frame subsampling)", low=1)


def _decode(values: np.ndarray) -> list[str]:
    return [(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)).strip() for v in values]


@register_dataset
class AIMI(DatasetAdapter):
    info = DatasetInfo("aimi", "Stanford AIMI thyroid cine-clips: dataset.hdf5 + metadata.csv, frames grouped by annot_id",
                       "Stanford AIMI, doi:10.71718/7m5n-rh16")
    Params = AIMIParams

    def __init__(self, root: Path | None, params: Any, workdir: Path) -> None:
        super().__init__(root, params, workdir)
        self._file: h5py.File | None = None
        self._lock = threading.Lock()

    @property
    def hdf5_path(self) -> Path:
        assert self.root is not None
        return self.root / "dataset.hdf5"

    def build_index(self) -> pd.DataFrame:
        assert self.root is not None
        meta_path = self.root / "metadata.csv"
        if not self.hdf5_path.is_file() or not meta_path.is_file():
            raise DataError(f"{self.root} is not a Stanford AIMI cine-clip folder: expected dataset.hdf5 and "
                            f"metadata.csv; found {listing(self.root)}")
        clips, frames = self._read_ids()
        meta = self._read_metadata(meta_path)
        rows = []
        table = pd.DataFrame({"clip": clips, "frame": frames, "row": np.arange(len(clips))})
        bad = table["frame"].isna()
        for i in np.flatnonzero(bad.to_numpy())[:20]:
            warn(f"{self.hdf5_path}: frame_num of row {i} is not an integer; frame left out")
        table = table[~bad].astype({"frame": int})
        table["first"] = table.groupby("clip")["row"].transform("min")  # clips in stored order, frames by number
        table = table.sort_values(["first", "frame"], kind="stable")
        for clip, group in table.groupby("clip", sort=False):
            record = meta.get(clip)
            if record is None:
                warn(f"{self.hdf5_path}: annot_id {clip!r} has no row in metadata.csv; TI-RADS missing")
            tirads, pathology = record or (None, None)
            for j, r in enumerate(group.itertuples(index=False)):
                if j % self.params.every:
                    continue
                ref = f"{self.hdf5_path}#{r.row}"
                rows.append({"sample_id": f"{clip.rstrip('_')}_f{r.frame:03d}", "patient_id": clip, "image": ref,
                             "mask": ref, "tirads": tirads, "source": "aimi", "split": "train",
                             "clip_id": clip, "frame": r.frame, "pathology": pathology})
        for clip in sorted(set(meta) - set(table["clip"])):
            warn(f"{meta_path}: annot_id {clip!r} has no frame in dataset.hdf5")
        if not rows:
            raise DataError(f"{self.hdf5_path}: no frames")
        out = pd.DataFrame(rows)
        out["tirads"] = out["tirads"].astype("Int64")
        out["pathology"] = out["pathology"].astype("Int64")
        return out[[*INDEX_COLUMNS, "clip_id", "frame", "pathology"]]

    def _read_ids(self) -> tuple[list[str], pd.Series]:
        try:
            with h5py.File(self.hdf5_path, "r") as f:
                missing = [k for k in HDF5_KEYS if k not in f]
                if missing:
                    raise DataError(f"{self.hdf5_path}: missing dataset(s) {', '.join(missing)}; expected {', '.join(HDF5_KEYS)}, "
                                    f"found {', '.join(sorted(f.keys())) or 'none'}")
                n = f["image"].shape[0]
                shapes = {k: f[k].shape for k in HDF5_KEYS}
                if f["image"].ndim != 3 or shapes["mask"] != shapes["image"] or shapes["annot_id"] != (n,) or shapes["frame_num"] != (n,):
                    raise DataError(f"{self.hdf5_path}: inconsistent shapes {shapes}; expected image and mask N x H x W, "
                                    "annot_id and frame_num N")
                clips = _decode(f["annot_id"][:])
                frames = pd.to_numeric(pd.Series(_decode(f["frame_num"][:])), errors="coerce")
        except OSError as err:
            raise DataError(f"{self.hdf5_path}: cannot open as HDF5 ({err})") from err
        return clips, frames

    def _read_metadata(self, path: Path) -> dict[str, tuple[int | None, int | None]]:
        meta = pd.read_csv(path, dtype={"annot_id": str})
        missing = [c for c in META_COLUMNS if c not in meta.columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(meta.columns)}")
        out: dict[str, tuple[int | None, int | None]] = {}
        for rec in meta.to_dict("records"):
            clip = str(rec["annot_id"]).strip()
            level = pd.to_numeric(rec["ti-rads_level"], errors="coerce")
            tirads = int(level) if pd.notna(level) and level in range(1, 6) else None
            if tirads is None:
                warn(f"{path}: annot_id {clip!r} has ti-rads_level {rec['ti-rads_level']!r}, not 1-5; TI-RADS missing")
            histo = pd.to_numeric(rec["histopath_diagnosis"], errors="coerce")
            out[clip] = (tirads, int(histo) if histo in (0, 1) else None)
        return out

    def _h5(self) -> h5py.File:
        with self._lock:  # one read-only handle per adapter; h5py serialises reads itself
            if self._file is None:
                self._file = h5py.File(self.hdf5_path, "r")
            return self._file

    def _frame(self, ref: str, key: str) -> np.ndarray:
        path, row = ref.rsplit("#", 1)
        if Path(path) != self.hdf5_path:
            raise DataError(f"{ref}: not a frame of {self.hdf5_path}")
        return np.asarray(self._h5()[key][int(row)])

    def load_image(self, row: pd.Series) -> np.ndarray:
        return self._frame(str(row["image"]), "image").astype(np.uint8)

    def load_mask(self, row: pd.Series) -> np.ndarray:
        return self._frame(str(row["mask"]), "mask") > 0
