"""Radiomics targets for clinical guidance (RLAR paper §2.2): 13 TI-RADS-aligned descriptors per image.

Computed from the image and its **ground-truth** mask, on the cached arrays the model
trains on (``PreparedData.images`` / ``masks``: zero-padded to a square, then resized, so
shape ratios and the taller-than-wide orientation survive), once per dataset, in a process
pool, and cached in the dataset's workdir. They are a training-time signal only: nothing
here runs at inference.

Three groups (the paper's), 14 features cached; a target vector takes 13 of them, the 13th
texture feature being the GLCM joint entropy (Table 5's ``radiomics_glcm_entropy``, the
default) or IMC1 (named in the paper's text):

* **shape** (from the mask):

  - ``circularity`` = 4 pi A / P^2, A the pixel count, P the Crofton perimeter estimate
    from boundary crossings along rows, columns and both diagonals, P = pi/8 (n_0 + n_90 +
    (n_45 + n_135) / sqrt 2): unbiased for a disc (circularity 1.00 from a radius of 10 px),
    within 5% for straight edges (a square gives 0.88, not pi/4). Pyradiomics' marching-
    squares perimeter follows the pixel staircase, so a disc would score 0.89.
  - ``ellipticity`` = 1 / (16 pi^2 I1), Rosin's moment ellipticity, with I1 = (mu20 mu02 -
    mu11^2) / mu00^4 the first affine moment invariant of the mask taken as a union of unit
    squares (each pixel adds 1/12 to mu20 and mu02). I1 >= 1/(16 pi^2) with equality only
    for an ellipse, so the value is in (0, 1], 1 for any ellipse whatever its elongation,
    9/pi^2 for a square, lower for lobulated or irregular outlines.
  - ``elongation`` = pyradiomics ``shape2D`` ``Elongation``: sqrt(lambda_minor / lambda_major)
    of the mask's pixel-coordinate covariance; b/a for an ellipse with semi-axes a >= b.
  - ``aspect_ratio`` = height / width of the mask's bounding box in image axes (rows spanned
    / columns spanned). The image's vertical axis is depth (anteroposterior), so > 1 is the
    ACR TI-RADS "taller-than-wide" shape.

* **margin** (own definitions; pyradiomics has none), with ``inner`` = mask pixels within
  ``ring_width`` px of the outside (Euclidean distance transform) and ``outer`` = background
  pixels within ``ring_width`` px of the mask:

  - ``edge_sharpness`` = mean Sobel gradient magnitude (grey levels per pixel: both Sobel
    responses divided by 8) over the contour band, the pixels at distance 1 on either side
    of the boundary. A well-defined margin is a steep step; an ill-defined one is spread.
  - ``edge_contrast`` = mean grey level of ``outer`` minus mean of ``inner``: positive when
    the nodule is darker than its surroundings (hypoechoic).

* **echogenicity and texture** (pyradiomics 3.0.1, inside the mask): first-order ``Mean``,
  ``Entropy``, ``Kurtosis``; GLCM ``Contrast``, ``JointEnergy``, ``Correlation``,
  ``JointEntropy``, ``Imc1``. Settings (:class:`RadiomicsSettings`, recorded next to the
  cache and in the cache key): fixed bin width 8 grey levels (32 bins on 8-bit images), no
  intensity normalisation (echogenicity is an absolute grey level), GLCM at distance 1,
  symmetric, averaged over the 4 in-plane angles. The image goes to pyradiomics as a
  one-slice 3D volume with ``force2D`` (dimension 0): a plain 2D SimpleITK image makes
  pyradiomics 3.0.1 use a single GLCM angle.

Bad masks never put a NaN in the cache: each value has a validity flag. An empty mask or
one below :data:`MIN_PIXELS` pixels makes every feature of that sample invalid; a feature
that comes out non-finite (e.g. kurtosis of a flat region) is invalid alone; each case is
logged as a warning naming the sample. A mask touching the image border is computed (the
shape describes the visible part) with a warning. Invalid entries are 0 in the cache, are
skipped by the z-score statistics and by the guidance loss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from scipy import ndimage as ndi

if TYPE_CHECKING:
    from bench.data import PreparedData

log = logging.getLogger(__name__)

SHAPE = ("circularity", "ellipticity", "elongation", "aspect_ratio")
MARGIN = ("edge_sharpness", "edge_contrast")
TEXTURE = ("mean", "entropy", "kurtosis", "glcm_contrast", "glcm_joint_energy", "glcm_correlation")
TEXTURE_13TH = ("glcm_joint_entropy", "glcm_imc1")
FEATURES = SHAPE + MARGIN + TEXTURE + TEXTURE_13TH  # the 14 cached columns
POOL_MIN_IMAGES = 256  # below this a process pool's start-up (seconds) costs more than it saves
MIN_PIXELS = 9  # fewer mask pixels: every feature undefined (texture and moments need an area)
CACHE_VERSION = "1"  # bump when a definition changes

# feature -> pyradiomics result key (after the "original_" prefix)
PYRADIOMICS_KEYS = {
    "mean": "firstorder_Mean",
    "entropy": "firstorder_Entropy",
    "kurtosis": "firstorder_Kurtosis",
    "glcm_contrast": "glcm_Contrast",
    "glcm_joint_energy": "glcm_JointEnergy",
    "glcm_correlation": "glcm_Correlation",
    "glcm_joint_entropy": "glcm_JointEntropy",
    "glcm_imc1": "glcm_Imc1",
    "elongation": "shape2D_Elongation",
}


def target_features(texture_13th: str = "glcm_joint_entropy") -> tuple[str, ...]:
    """The 13 features of a target vector, in order (shape, margin, texture)."""
    if texture_13th not in TEXTURE_13TH:
        raise ValueError(f"texture_13th must be one of {TEXTURE_13TH}, got {texture_13th!r}")
    return SHAPE + MARGIN + TEXTURE + (texture_13th,)


@dataclass(frozen=True)
class RadiomicsSettings:
    bin_width: float = 8.0  # grey levels per bin (fixed bin width, pyradiomics binWidth)
    normalize: bool = False  # pyradiomics normalize: off, echogenicity is the absolute grey level
    force2D: bool = True  # per-slice (in-plane) texture on the one-slice volume
    glcm_distance: int = 1
    ring_width: int = 3  # px: inner/outer rings for edge_contrast

    def pyradiomics(self) -> dict[str, Any]:
        """The settings as pyradiomics names them."""
        return {"binWidth": self.bin_width, "normalize": self.normalize, "force2D": self.force2D,
                "force2Ddimension": 0, "distances": [self.glcm_distance], "symmetricalGLCM": True,
                "label": 1, "additionalInfo": False}


@dataclass
class Radiomics:
    """Per-row features of a dataset; ``valid`` is False where a value is undefined (value 0)."""

    values: np.ndarray  # N x F float32
    valid: np.ndarray  # N x F bool
    features: tuple[str, ...]
    path: Path | None = None

    def select(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        idx = [self.features.index(n) for n in names]
        return self.values[:, idx], self.valid[:, idx]


# ----------------------------------------------------------------------------- one image
def image_features(image: np.ndarray, mask: np.ndarray, settings: RadiomicsSettings = RadiomicsSettings(),
                   *, sample: str = "?", extractor: Any = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features of one image: (values[F], valid[F], warnings). Never raises on a bad mask."""
    values = np.zeros(len(FEATURES), dtype=np.float64)
    valid = np.zeros(len(FEATURES), dtype=bool)
    m = np.asarray(mask) > 0
    area = int(m.sum())
    if area < MIN_PIXELS:
        return values.astype(np.float32), valid, [f"sample {sample}: mask has {area} pixel(s) (< {MIN_PIXELS}); radiomics target undefined, not used"]
    notes: list[str] = []
    if m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any():
        notes.append(f"sample {sample}: mask touches the image border; shape and margin describe the visible part")
    image = np.asarray(image, dtype=np.float64)
    found = {**_pyradiomics(image, m, settings, extractor), **_shape(m), **_margin(image, m, settings.ring_width)}
    for i, name in enumerate(FEATURES):
        v = found.get(name, float("nan"))
        if np.isfinite(v):
            values[i], valid[i] = v, True
    bad = [n for n, ok in zip(FEATURES, valid, strict=True) if not ok]
    if bad:
        notes.append(f"sample {sample}: {', '.join(bad)} undefined (non-finite); not used")
    return values.astype(np.float32), valid, notes


def _pyradiomics(image: np.ndarray, m: np.ndarray, settings: RadiomicsSettings, extractor: Any) -> dict[str, float]:
    import SimpleITK as sitk

    extractor = extractor or make_extractor(settings)
    img = sitk.GetImageFromArray(image[None].astype(np.float32))
    msk = sitk.GetImageFromArray(m[None].astype(np.uint8))
    try:
        result = extractor.execute(img, msk)
    except (ValueError, RuntimeError) as err:  # pyradiomics rejects degenerate masks
        log.debug("pyradiomics failed: %s", err)
        return {}
    out = {name: float(result[f"original_{key}"]) for name, key in PYRADIOMICS_KEYS.items()}
    return out


def make_extractor(settings: RadiomicsSettings) -> Any:
    """A pyradiomics extractor computing exactly the features used here."""
    import radiomics
    from radiomics import featureextractor

    radiomics.setVerbosity(logging.ERROR)
    logging.getLogger("radiomics").setLevel(logging.ERROR)  # its per-image INFO records cost time; bad masks are reported here
    ex = featureextractor.RadiomicsFeatureExtractor(**settings.pyradiomics())
    ex.disableAllFeatures()
    by_class: dict[str, list[str]] = {}
    for key in PYRADIOMICS_KEYS.values():
        cls, name = key.split("_", 1)
        by_class.setdefault(cls, []).append(name)
    ex.enableFeaturesByName(**by_class)
    return ex


def crofton_perimeter(m: np.ndarray) -> float:
    """Perimeter of a binary mask from its boundary crossings in 4 directions (Crofton formula)."""
    b = np.pad(np.asarray(m, dtype=np.int8), 1)
    n_h, n_v = np.abs(np.diff(b, axis=1)).sum(), np.abs(np.diff(b, axis=0)).sum()
    n_d = np.abs(b[1:, 1:] - b[:-1, :-1]).sum() + np.abs(b[1:, :-1] - b[:-1, 1:]).sum()
    return float(np.pi / 8 * (n_h + n_v + n_d / np.sqrt(2)))


def _shape(m: np.ndarray) -> dict[str, float]:
    rows, cols = np.nonzero(m)
    n = float(len(rows))
    y, x = rows - rows.mean(), cols - cols.mean()
    mu20, mu02, mu11 = (x * x).sum() + n / 12, (y * y).sum() + n / 12, (x * y).sum()
    i1 = (mu20 * mu02 - mu11**2) / n**4
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    return {"circularity": 4 * np.pi * n / crofton_perimeter(m) ** 2, "ellipticity": 1.0 / (16 * np.pi**2 * i1),
            "aspect_ratio": height / width}


def _margin(image: np.ndarray, m: np.ndarray, ring_width: int) -> dict[str, float]:
    d_in = ndi.distance_transform_edt(m)
    d_out = ndi.distance_transform_edt(~m)
    inner, outer = m & (d_in <= ring_width), ~m & (d_out <= ring_width)
    band = (m & (d_in == 1)) | (~m & (d_out == 1))
    if not outer.any() or not band.any():
        return {}
    gradient = np.hypot(ndi.sobel(image, axis=0), ndi.sobel(image, axis=1)) / 8.0
    return {"edge_sharpness": float(gradient[band].mean()), "edge_contrast": float(image[outer].mean() - image[inner].mean())}


Part = np.ndarray | tuple[str, np.ndarray]  # the pixels, or (a .npy file, its rows) to memory-map in the worker


def _part(array: np.ndarray, rows: np.ndarray) -> Part:
    """Rows of ``array``: by file name for a memory-mapped cache (nothing to pickle), else copied."""
    filename = getattr(array, "filename", None)
    if isinstance(array, np.memmap) and filename and str(filename).endswith(".npy"):
        return (str(filename), rows)
    return np.asarray(array[rows])


def _load(part: Part) -> np.ndarray:
    if isinstance(part, tuple):
        return np.asarray(np.load(part[0], mmap_mode="r")[part[1]])
    return part


def _chunk(args: tuple[Part, Part, list[str], RadiomicsSettings]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    images, masks, ids, settings = _load(args[0]), _load(args[1]), args[2], args[3]
    extractor = make_extractor(settings)
    values, valid, notes = [], [], []
    for image, mask, sid in zip(images, masks, ids, strict=True):
        v, ok, w = image_features(image, mask, settings, sample=sid, extractor=extractor)
        values.append(v)
        valid.append(ok)
        notes.extend(w)
    return np.stack(values), np.stack(valid), notes


def compute(images: np.ndarray, masks: np.ndarray, ids: Sequence[str], settings: RadiomicsSettings = RadiomicsSettings(),
            *, rows: np.ndarray | None = None, workers: int = 2, chunk: int = 32, pool_min: int = POOL_MIN_IMAGES,
            progress: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features of ``images[rows]`` (all by default; ``ids`` names those rows), in a pool of
    ``workers`` processes (in this process for ``workers=1`` or fewer than ``pool_min`` images)."""
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    n = len(rows)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} sample ids for {n} images")
    if n == 0:
        return np.zeros((0, len(FEATURES)), np.float32), np.zeros((0, len(FEATURES)), bool), []
    bounds = range(0, n, chunk)
    if workers <= 1 or n < pool_min:
        parts = [_chunk((images[rows[i:i + chunk]], masks[rows[i:i + chunk]], list(ids[i:i + chunk]), settings))
                 for i in bounds]
    else:
        from tqdm.auto import tqdm

        jobs = [(_part(images, rows[i:i + chunk]), _part(masks, rows[i:i + chunk]), list(ids[i:i + chunk]), settings)
                for i in bounds]
        # spawn: the parent may hold torch/OpenMP threads that a fork would copy mid-state
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(tqdm(pool.map(_chunk, jobs), total=len(jobs), desc="radiomics targets", disable=not progress, leave=False))
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            [w for p in parts for w in p[2]])


# ----------------------------------------------------------------------------- dataset cache
def cache_path(data: PreparedData, settings: RadiomicsSettings = RadiomicsSettings()) -> Path:
    """``<workdir>/radiomics-<S>px-<key>.npz``; the key covers pixels, masks, rows and settings."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps([CACHE_VERSION, asdict(settings), _pyradiomics_version()], sort_keys=True).encode())
    h.update(np.ascontiguousarray(_target_rows(data)).tobytes())
    h.update(np.ascontiguousarray(data.images).tobytes())
    h.update(np.ascontiguousarray(data.masks).tobytes())
    return Path(data.workdir) / f"radiomics-{data.images.shape[-1]}px-{h.hexdigest()}.npz"


def dataset_radiomics(data: PreparedData, settings: RadiomicsSettings = RadiomicsSettings(), *,
                      workers: int | None = None, progress: bool = True) -> Radiomics:
    """Every training-split row's features, computed once and cached (atomic write).

    Rows outside the training split (the official test split) are never computed: they are
    never trained on. Their entries are invalid.
    """
    path = cache_path(data, settings)
    if path.exists():
        with np.load(path, allow_pickle=False) as saved:
            result = Radiomics(saved["values"], saved["valid"], tuple(str(f) for f in saved["features"]), path)
        _summary(result, data)
        return result
    rows = np.flatnonzero(_target_rows(data))
    ids = data.table["sample_id"].astype(str).to_numpy()
    start = time.perf_counter()
    part_v, part_ok, notes = compute(data.images, data.masks, list(ids[rows]), settings, rows=rows,
                                     workers=workers if workers is not None else min(2, os.cpu_count() or 1),
                                     progress=progress)
    for note in notes:
        log.warning(note)
    values = np.zeros((len(ids), len(FEATURES)), np.float32)
    valid = np.zeros((len(ids), len(FEATURES)), bool)
    values[rows], valid[rows] = part_v, part_ok
    seconds = time.perf_counter() - start
    record = {"settings": asdict(settings), "pyradiomics": _pyradiomics_version(), "features": list(FEATURES),
              "rows_computed": len(rows), "seconds": round(seconds, 3), "warnings": notes}
    # the record first: the .npz, written last, is what marks the cache complete
    _atomic_write(path.with_suffix(".json"), lambda fh: fh.write(json.dumps(record, indent=2).encode()))
    _atomic_write(path, lambda fh: np.savez(fh, values=values, valid=valid, features=np.array(FEATURES),
                                            sample_id=ids.astype(str)))
    log.info("radiomics targets for %d images in %.1f s -> %s", len(rows), seconds, path)
    return Radiomics(values, valid, FEATURES, path)


def _target_rows(data: PreparedData) -> np.ndarray:
    return (data.table["split"] == "train").to_numpy()


def _summary(result: Radiomics, data: PreparedData) -> None:
    rows = _target_rows(data)
    undefined = int((~result.valid[rows].all(axis=1)).sum())
    if undefined:
        log.warning("radiomics targets: %d training image(s) have undefined features (listed in %s)",
                    undefined, result.path.with_suffix(".json") if result.path else "the cache record")


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write`` into a unique temporary file next to ``path``, fsync, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _pyradiomics_version() -> str:
    from importlib.metadata import version

    return version("pyradiomics")


# ----------------------------------------------------------------------------- standardisation
@dataclass(frozen=True)
class Standardized:
    z: np.ndarray  # N x F float32, 0 where invalid
    valid: np.ndarray  # N x F bool
    mean: np.ndarray  # F
    std: np.ndarray  # F


def standardize(values: np.ndarray, valid: np.ndarray, train_rows: np.ndarray) -> Standardized:
    """z-score every row with the mean/std of the *valid training rows* only.

    A feature with no valid training value, or a constant one, gets std 1 (and mean 0 when
    undefined), so the result is always finite.
    """
    v, ok = values[train_rows].astype(np.float64), valid[train_rows]
    count = ok.sum(axis=0)
    mean = np.where(count > 0, (v * ok).sum(axis=0) / np.maximum(count, 1), 0.0)
    var = np.where(count > 0, (((v - mean) ** 2) * ok).sum(axis=0) / np.maximum(count, 1), 1.0)
    std = np.sqrt(var)
    std = np.where(std > 1e-12, std, 1.0)
    z = np.where(valid, (values - mean) / std, 0.0).astype(np.float32)
    return Standardized(z, valid.copy(), mean, std)
