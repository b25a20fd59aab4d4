"""Radiomics targets: known geometry, agreement with pyradiomics, bad masks, the cache, z-scoring."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from bench.datasets import radiomics as R
from radiomics import firstorder, glcm, shape2D
from scipy import ndimage as ndi

from bench.data import PreparedData

S = 128
YY, XX = np.mgrid[:S, :S]
F = {name: i for i, name in enumerate(R.FEATURES)}


def ellipse(a: float, b: float, cx: float = 64.3, cy: float = 63.6) -> np.ndarray:
    """Semi-axes a (horizontal) and b (vertical), centre off the pixel grid."""
    return ((XX - cx) / a) ** 2 + ((YY - cy) / b) ** 2 <= 1


def scene(mask: np.ndarray, inside: float = 60, outside: float = 150, noise: float = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.where(mask, inside, outside) + rng.normal(0, noise, mask.shape), 0, 255).astype(np.uint8)


def features(mask: np.ndarray, image: np.ndarray | None = None) -> dict[str, float]:
    values, valid, notes = R.image_features(scene(mask) if image is None else image, mask)
    assert valid.all() and not notes
    return dict(zip(R.FEATURES, values.tolist(), strict=True))


# ------------------------------------------------------------------ known geometry
def test_disc_is_circular_elliptic_and_unelongated():
    f = features(ellipse(40, 40))
    assert f["circularity"] == pytest.approx(1.0, abs=0.02)
    assert f["ellipticity"] == pytest.approx(1.0, abs=0.005)
    assert f["elongation"] == pytest.approx(1.0, abs=0.01)
    assert f["aspect_ratio"] == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize(("a", "b"), [(48, 24), (24, 48), (45, 30)])
def test_ellipse_elongation_and_taller_than_wide_aspect(a, b):
    f = features(ellipse(a, b))
    assert f["elongation"] == pytest.approx(min(a, b) / max(a, b), abs=0.01)
    assert f["aspect_ratio"] == pytest.approx(b / a, rel=0.03)  # height / width: > 1 is taller than wide
    assert f["ellipticity"] == pytest.approx(1.0, abs=0.01)  # any ellipse, whatever its elongation
    exact_perimeter = np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))  # Ramanujan
    assert f["circularity"] == pytest.approx(4 * np.pi * np.pi * a * b / exact_perimeter**2, abs=0.03)


def test_square_ellipticity_is_nine_over_pi_squared_and_lobulation_lowers_it():
    square = (np.abs(XX - 64) < 30) & (np.abs(YY - 64) < 30)
    assert features(square)["ellipticity"] == pytest.approx(9 / np.pi**2, abs=1e-3)
    theta, radius = np.arctan2(YY - 64, XX - 64), np.hypot(YY - 64, XX - 64)
    lobulated = radius <= 35 * (1 + 0.25 * np.cos(6 * theta))
    f = features(lobulated)
    assert f["ellipticity"] < 0.95 and f["circularity"] < 0.8


def test_sharp_edge_is_sharper_than_the_same_edge_blurred_and_contrast_has_the_hypoechoic_sign():
    mask = ellipse(35, 30)
    step = np.where(mask, 60.0, 150.0)
    sharp = features(mask, step.astype(np.uint8))
    blurred = features(mask, np.round(ndi.gaussian_filter(step, 2.0)).astype(np.uint8))
    assert sharp["edge_sharpness"] > 2 * blurred["edge_sharpness"]
    assert sharp["edge_contrast"] == pytest.approx(90.0)  # outer ring 150 - inner ring 60
    brighter = features(mask, np.where(mask, 200, 100).astype(np.uint8))
    assert brighter["edge_contrast"] == pytest.approx(-100.0)


# ------------------------------------------------------------------ pyradiomics called directly
def test_every_pyradiomics_feature_equals_pyradiomics_called_directly():
    rng = np.random.default_rng(3)
    image = np.clip(ndi.gaussian_filter(rng.gamma(2.0, 40.0, (S, S)), 1.0), 0, 255).astype(np.uint8)
    theta, radius = np.arctan2(YY - 60, XX - 70), np.hypot(YY - 60, XX - 70)
    mask = radius <= 30 * (1 + 0.2 * np.sin(5 * theta))
    values, valid, _ = R.image_features(image, mask)
    settings = R.RadiomicsSettings()
    # the full (uncropped) one-slice volume, through the feature classes rather than the extractor
    img = sitk.GetImageFromArray(image[None].astype(np.float32))
    msk = sitk.GetImageFromArray(mask[None].astype(np.uint8))
    kwargs = {"binWidth": settings.bin_width, "force2D": True, "force2Ddimension": 0,
              "distances": [settings.glcm_distance], "symmetricalGLCM": True}
    direct = {}
    for prefix, cls in (("firstorder", firstorder.RadiomicsFirstOrder), ("glcm", glcm.RadiomicsGLCM),
                        ("shape2D", shape2D.RadiomicsShape2D)):
        extractor = cls(img, msk, **kwargs)
        extractor.enableAllFeatures()
        direct.update({f"{prefix}_{k}": float(v) for k, v in extractor.execute().items()})
    assert valid.all()
    for name, key in R.PYRADIOMICS_KEYS.items():
        assert values[F[name]] == pytest.approx(direct[key], rel=1e-5, abs=1e-7), name


# ------------------------------------------------------------------ bad masks
def prepared(tmp_path: Path, images: np.ndarray, masks: np.ndarray, split: list[str] | None = None) -> PreparedData:
    n = len(images)
    table = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
                          "split": split or ["train"] * n, "label": [0] * n, "fold": [i % 2 for i in range(n)]})
    return PreparedData("toy", table, images, masks, tmp_path, 2, 0)


def test_empty_one_pixel_and_border_masks_give_defined_targets_and_warnings(tmp_path, caplog):
    good = ellipse(30, 20)
    one = np.zeros((S, S), bool)
    one[40, 40] = True
    border = (XX < 30) & (np.abs(YY - 64) < 20)
    masks = np.stack([good, np.zeros((S, S), bool), one, border, np.ones((S, S), bool)]).astype(np.uint8)
    images = np.stack([scene(m.astype(bool), seed=i) for i, m in enumerate(masks)])
    with caplog.at_level(logging.WARNING, logger=R.log.name):
        out = R.dataset_radiomics(prepared(tmp_path, images, masks), progress=False)
    assert np.isfinite(out.values).all()
    assert out.valid[0].all() and not out.valid[1].any() and not out.valid[2].any()
    assert out.valid[3].all()  # border-touching: computed, with a warning
    assert not out.valid[4, F["edge_sharpness"]]  # a mask filling the image has no margin
    text = caplog.text
    assert "sample s1: mask has 0 pixel(s)" in text and "sample s2: mask has 1 pixel(s)" in text
    assert "sample s3: mask touches the image border" in text
    assert "sample s4" in text and "edge_sharpness" in text
    with np.load(out.path) as saved:  # and the same, NaN-free, on disk
        assert np.isfinite(saved["values"]).all()


# ------------------------------------------------------------------ the cache
def test_second_call_computes_nothing_and_changed_masks_recompute(tmp_path, monkeypatch):
    masks = np.stack([ellipse(20 + 3 * i, 25) for i in range(4)]).astype(np.uint8)
    images = np.stack([scene(m.astype(bool), seed=i) for i, m in enumerate(masks)])
    data = prepared(tmp_path, images, masks, split=["train", "train", "train", "test"])
    first = R.dataset_radiomics(data, progress=False)
    assert not first.valid[3].any()  # test-split rows are never computed
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []

    def no_compute(*args, **kwargs):
        raise AssertionError("computed again")

    monkeypatch.setattr(R, "compute", no_compute)
    second = R.dataset_radiomics(data, progress=False)
    np.testing.assert_array_equal(second.values, first.values)
    np.testing.assert_array_equal(second.valid, first.valid)
    assert second.path == first.path and first.path.with_suffix(".json").exists()

    changed = masks.copy()
    changed[0] = ellipse(10, 10)
    with pytest.raises(AssertionError, match="computed again"):
        R.dataset_radiomics(prepared(tmp_path, images, changed), progress=False)


def test_process_pool_on_the_memory_mapped_cache_gives_the_same_values_as_one_process(tmp_path):
    masks = np.stack([ellipse(15 + i, 20) for i in range(6)]).astype(np.uint8)
    images = np.stack([scene(m.astype(bool), seed=i) for i, m in enumerate(masks)])
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "masks.npy", masks)
    rows = np.array([5, 1, 3, 0])
    ids = [f"s{r}" for r in rows]
    serial = R.compute(images[rows], masks[rows], ids, workers=1)
    pooled = R.compute(np.load(tmp_path / "images.npy", mmap_mode="r"), np.load(tmp_path / "masks.npy", mmap_mode="r"),
                       ids, rows=rows, workers=2, chunk=2, pool_min=0)  # workers read the files, by row
    np.testing.assert_array_equal(serial[0], pooled[0])
    np.testing.assert_array_equal(serial[1], pooled[1])
    assert serial[0][0, F["elongation"]] == pytest.approx(20 / 20, abs=0.02)  # row 5: a = 20, b = 20


# ------------------------------------------------------------------ standardisation
def test_z_scores_use_the_training_rows_and_valid_entries_only():
    rng = np.random.default_rng(0)
    values = rng.normal(5, 2, (40, 3)).astype(np.float32)
    valid = np.ones((40, 3), bool)
    valid[3, 0] = False
    values[3, 0] = 1e6  # an invalid entry must not move the statistics
    values[:, 2] = 7.0  # constant feature: std falls back to 1
    train = np.arange(0, 30)
    out = R.standardize(values, valid, train)
    ok = valid[train, 0]
    assert out.mean[0] == pytest.approx(values[train, 0][ok].mean(), rel=1e-6)
    assert out.std[0] == pytest.approx(values[train, 0][ok].std(), rel=1e-5)
    assert out.z[3, 0] == 0 and np.isfinite(out.z).all() and (out.z[:, 2] == 0).all()
    shifted = values.copy()
    shifted[30:] += 100  # changing the held-out rows changes nothing about the statistics
    again = R.standardize(shifted, valid, train)
    np.testing.assert_allclose(again.mean, out.mean)
    np.testing.assert_allclose(again.z[train], out.z[train])
