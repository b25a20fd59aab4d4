"""Turn a dataset adapter into :class:`~bench.data.PreparedData`: index, resized-array cache, folds.

Layout under ``<workspace>/data/<dataset>-<fingerprint>/``::

    index.csv                 the adapter's table (+ label, pixel_hash)
    <S>px-<key>/images.npy    N x S x S uint8, aspect ratio kept by zero-padding to a square
    <S>px-<key>/masks.npy     N x S x S uint8 in {0, 1}
    folds-k<K>-s<seed>.csv    sample_id -> fold, shared by every method

Everything is written to a temporary name and renamed when complete, so an error (a
missing or corrupt file) leaves nothing half-written behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from bench import params as P
from bench.data import DATASETS, DatasetAdapter, PreparedData, validate_index
from bench.errors import DataError
from bench.splits import check_classes, check_leakage, make_folds


def open_adapter(spec: str, root: str | Path | None, data_dir: Path) -> DatasetAdapter:
    """``"synthetic:patients=40"`` -> an adapter instance with validated parameters."""
    name, args = P.split_spec(spec)
    cls = DATASETS.get(name)
    params = P.build(cls.Params, args, owner=f"dataset {name}")
    path = Path(root).resolve() if root else None
    return cls(path, params, data_dir / f"{name}-{cls.fingerprint(params, path)}")


def prepare(
    spec: str,
    root: str | Path | None,
    data_dir: Path,
    *,
    image_size: int,
    n_folds: int,
    split_seed: int = 0,
    progress: bool = True,
    with_folds: bool = True,
) -> PreparedData:
    """``with_folds=False`` (an external evaluation set): every row gets fold -1, no fold checks."""
    adapter = open_adapter(spec, root, data_dir)
    workdir = adapter.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    table = validate_index(adapter.build_index(), adapter.info.name, len(adapter.class_names))
    key = _content_key(table, adapter.version)
    arrays = workdir / f"{image_size}px-{key}"
    if not (arrays / "masks.npy").exists():
        _build_arrays(adapter, table, arrays, image_size, progress)
    table["pixel_hash"] = pd.read_csv(arrays / "hashes.csv")["pixel_hash"].to_numpy()
    _atomic_csv(table, workdir / "index.csv")
    if with_folds:
        table["fold"] = _folds(table, workdir / f"folds-k{n_folds}-s{split_seed}.csv", n_folds, split_seed)
        check_leakage(table, table["fold"].to_numpy())
        check_classes(table, table["fold"].to_numpy(), list(adapter.class_names))
    else:
        table["fold"] = -1
    return PreparedData(
        name=P.format_spec(adapter.info.name, adapter.params),
        table=table,
        images=np.load(arrays / "images.npy", mmap_mode="r"),
        masks=np.load(arrays / "masks.npy", mmap_mode="r"),
        workdir=workdir,
        n_folds=n_folds,
        split_seed=split_seed,
        class_names=adapter.class_names,
    )


def _folds(table: pd.DataFrame, path: Path, n_folds: int, seed: int) -> np.ndarray:
    """Load the saved folds if they still match the table, else build and save them."""
    if path.exists():
        saved = pd.read_csv(path, dtype={"sample_id": str})
        if sorted(saved["sample_id"]) == sorted(table["sample_id"].astype(str)):
            return saved.set_index("sample_id").loc[table["sample_id"].astype(str), "fold"].to_numpy()
    folds = make_folds(table, n_folds, seed)
    _atomic_csv(pd.DataFrame({"sample_id": table["sample_id"], "fold": folds}), path)
    return folds


def _content_key(table: pd.DataFrame, version: str) -> str:
    """Changes when a sample, a path or a file's size/mtime changes."""
    h = hashlib.sha256(version.encode())
    stats: dict[str, str] = {}
    for path in pd.unique(pd.concat([table["image"], table["mask"]]).dropna().astype(str)):
        file = Path(path.split("#")[0])
        st = file.stat() if file.exists() else None
        stats[path] = f"{st.st_size}:{st.st_mtime_ns}" if st else "missing"
    for row in table[["sample_id", "image", "mask"]].astype(str).itertuples(index=False):
        h.update("|".join((*row, stats.get(row.image, ""), stats.get(row.mask, ""))).encode())
    return h.hexdigest()[:10]


def _build_arrays(adapter: DatasetAdapter, table: pd.DataFrame, out: Path, size: int, progress: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (len(table), size, size))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (len(table), size, size))
        hashes: list[str] = [""] * len(table)

        def one(i: int) -> None:
            row = table.iloc[i]
            image, mask = adapter.load_image(row), adapter.load_mask(row)
            if image.shape != mask.shape:
                raise DataError(f"sample {row['sample_id']}: image {image.shape} and mask {mask.shape} differ in size ({row['image']})")
            hashes[i] = hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()
            images[i] = resize_square(image, size, Image.Resampling.BILINEAR)
            masks[i] = resize_square(mask.astype(np.uint8) * 255, size, Image.Resampling.BILINEAR) > 127

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            desc = f"caching {adapter.info.name} at {size}px"
            for _ in tqdm(pool.map(one, range(len(table))), total=len(table), desc=desc, disable=not progress, leave=False):
                pass
        images.flush()
        masks.flush()
        pd.DataFrame({"sample_id": table["sample_id"], "pixel_hash": hashes}).to_csv(tmp / "hashes.csv", index=False)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resize_square(array: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    """Zero-pad to a centred square (keeping the aspect ratio: taller-than-wide matters), then resize."""
    h, w = array.shape
    side = max(h, w)
    canvas = np.zeros((side, side), dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = array
    return np.asarray(Image.fromarray(canvas).resize((size, size), resample), dtype=np.uint8)


def _atomic_csv(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)
