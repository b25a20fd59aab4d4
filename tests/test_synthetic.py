"""The synthetic generator: ACR rules, coherent sampling, determinism, visible features."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from bench.datasets.synthetic import (
    COMPOSITIONS,
    FOCI,
    INDEX_COLUMNS,
    NoduleFeatures,
    acr_points,
    generate,
    parse_foci,
    render,
    sample_features,
    tirads_from_points,
)
from PIL import Image
from scipy import ndimage as ndi


def solid(echo: str = "isoechoic", *, taller: bool = False, margin: str = "smooth", foci=()) -> NoduleFeatures:
    return NoduleFeatures("solid", echo, taller, margin, tuple(foci))


@pytest.mark.parametrize(("features", "points", "tirads"), [
    (solid("hypoechoic", taller=True, margin="irregular", foci=("punctate",)), 2 + 2 + 3 + 2 + 3, 5),
    (NoduleFeatures("spongiform", "isoechoic", False, "smooth", ()), 0 + 1, 1),
    (NoduleFeatures("cystic", "anechoic", False, "smooth", ()), 0, 1),
    (NoduleFeatures("mixed", "isoechoic", False, "ill_defined", ()), 1 + 1, 2),
    (NoduleFeatures("mixed", "hypoechoic", False, "smooth", ()), 1 + 2, 3),
    (solid("hyperechoic"), 2 + 1, 3),
    (solid("isoechoic", margin="lobulated"), 2 + 1 + 2, 4),
    (solid("very_hypoechoic", foci=("macro",)), 2 + 3 + 1, 4),
    (solid("hypoechoic", foci=("rim", "macro")), 2 + 2 + 2 + 1, 5),
    (solid("very_hypoechoic", taller=True, margin="lobulated", foci=FOCI), 2 + 3 + 3 + 2 + 1 + 2 + 3, 5),
])
def test_acr_points_and_category(features, points, tirads):
    assert acr_points(features) == features.points() == points
    assert features.tirads() == tirads


def test_points_to_category_boundaries():
    assert [tirads_from_points(p) for p in range(10)] == [1, 1, 2, 3, 4, 4, 4, 5, 5, 5]


def test_features_are_validated_and_canonical():
    with pytest.raises(ValueError, match="echogenicity"):
        NoduleFeatures("solid", "dark", False, "smooth", ())
    with pytest.raises(ValueError, match="foci"):
        NoduleFeatures("solid", "isoechoic", False, "smooth", ("comet",))
    a = solid(foci=("punctate", "macro"))
    assert a.foci == ("macro", "punctate") and a == solid(foci=("macro", "punctate"))
    assert parse_foci(a.foci_string()) == a.foci and parse_foci(solid().foci_string()) == ()


@pytest.mark.parametrize("tirads", [1, 2, 3, 4, 5])
def test_sample_features_hits_the_category_with_coherent_features(tirads):
    rng = np.random.default_rng(tirads)
    draws = [sample_features(rng, tirads) for _ in range(300)]
    for f in draws:
        assert f.tirads() == tirads
        assert (f.echogenicity == "anechoic") == (f.composition == "cystic")
        if f.composition in ("cystic", "spongiform"):
            assert not f.foci and not f.taller_than_wide and f.margin in ("smooth", "ill_defined")
        if f.composition == "spongiform":
            assert f.echogenicity in ("isoechoic", "hyperechoic")
        if f.composition == "mixed":
            assert f.echogenicity != "very_hypoechoic"
    if tirads >= 3:  # several different routes to the same category
        assert len({(f.composition, f.echogenicity, f.margin, f.foci) for f in draws}) >= 5
    with pytest.raises(ValueError):
        sample_features(rng, 6)


@pytest.mark.parametrize("size", [64, 128, 256])
def test_render_shapes_and_mask(size):
    for seed, tirads in enumerate((1, 3, 5)):
        rng = np.random.default_rng(seed)
        image, mask = render(sample_features(rng, tirads), rng, size)
        assert image.shape == mask.shape == (size, size)
        assert image.dtype == np.uint8 and mask.dtype == bool
        assert 0.01 * size**2 < mask.sum() < 0.4 * size**2
        border = np.concatenate([mask[:2].ravel(), mask[-2:].ravel(), mask[:, :2].ravel(), mask[:, -2:].ravel()])
        assert not border.any()
        assert ndi.label(mask)[1] == 1  # one connected nodule
        assert image.std() > 20  # a textured scene, not a flat picture


def test_taller_than_wide_is_the_mask_shape():
    for seed in range(12):
        margin = ("smooth", "ill_defined", "lobulated", "irregular")[seed % 4]
        for taller in (True, False):
            _, mask = render(solid("hypoechoic", taller=taller, margin=margin), np.random.default_rng(seed), 64)
            ys, xs = np.nonzero(mask)
            height, width = np.ptp(ys) + 1, np.ptp(xs) + 1
            assert (height > width) == taller, (seed, margin, taller, height, width)


def _inside_and_ring(features: NoduleFeatures, seed: int) -> tuple[float, float]:
    image, mask = render(features, np.random.default_rng(seed), 128)
    ring = ndi.binary_dilation(mask, iterations=8) & ~ndi.binary_dilation(mask, iterations=3)
    return float(image[mask].mean()), float(image[ring].mean())


def test_echogenicity_is_visible():
    # the same seed gives the same scene and geometry, so the comparisons are paired
    for seed in range(4):
        very, ring = _inside_and_ring(solid("very_hypoechoic"), seed)
        hypo, _ = _inside_and_ring(solid("hypoechoic"), seed)
        iso, _ = _inside_and_ring(solid("isoechoic"), seed)
        hyper, _ = _inside_and_ring(solid("hyperechoic"), seed)
        assert very + 15 < hypo < ring - 15, (seed, very, hypo, ring)
        assert hyper > ring + 20 and abs(iso - ring) < 12, (seed, iso, hyper, ring)


def _below(features: NoduleFeatures, seed: int) -> float:
    """Mean brightness of a band under the nodule's lowest row, in the nodule's columns."""
    image, mask = render(features, np.random.default_rng(seed), 128)
    ys, xs = np.nonzero(mask)
    cols = slice(xs.min() + 5, xs.max() - 4)
    return float(image[ys.max() + 3:ys.max() + 10, cols].mean())


def test_posterior_enhancement_and_shadowing():
    for seed in range(3):
        tissue = _below(solid(), seed)
        cyst = _below(NoduleFeatures("cystic", "anechoic", False, "smooth", ()), seed)
        assert cyst > tissue + 10, (seed, cyst, tissue)  # fluid attenuates less than tissue


def test_foci_are_visible():
    for seed in range(3):
        plain, mask = render(solid("hypoechoic"), np.random.default_rng(seed), 128)
        dotted, _ = render(solid("hypoechoic", foci=("punctate",)), np.random.default_rng(seed), 128)
        assert np.percentile(dotted[mask], 99) > np.percentile(plain[mask], 99) + 40
        calcified, _ = render(solid("hypoechoic", foci=("macro",)), np.random.default_rng(seed), 128)
        assert calcified[mask].max() > np.median(plain) + 70  # a bright echo
        # an acoustic shadow: some columns under the nodule turn much darker
        under = slice(np.nonzero(mask)[0].max() + 3, 128)
        assert calcified[under].mean(axis=0).min() < plain[under].mean(axis=0).min() - 25


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generate_is_deterministic_and_patient_stable(tmp_path):
    a = generate(tmp_path / "a", patients=5, images_per_patient=2, size=64, seed=7, progress=False)
    b = generate(tmp_path / "b", patients=5, images_per_patient=2, size=64, seed=7, progress=False)
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(files_a) == 20 and files_a == files_b
    assert not [name for name in files_a if not name.endswith(".png")]  # no temporary files left
    pd.testing.assert_frame_equal(a.drop(columns=["image", "mask"]), b.drop(columns=["image", "mask"]))

    c = generate(tmp_path / "c", patients=8, images_per_patient=2, size=64, seed=7, progress=False)
    files_c = _files(tmp_path / "c")
    for name in ("images/p0003_i0.png", "images/p0003_i1.png", "masks/p0003_i1.png"):
        assert files_c[name] == files_a[name]
    pd.testing.assert_frame_equal(c.iloc[:10].drop(columns=["image", "mask"]), a.drop(columns=["image", "mask"]))

    generate(tmp_path / "d", patients=5, images_per_patient=2, size=64, seed=8, progress=False)
    assert _files(tmp_path / "d") != files_a


def test_generate_index_table(tmp_path):
    table = generate(tmp_path, patients=6, images_per_patient=3, size=64, seed=0, progress=False)
    assert tuple(table.columns) == INDEX_COLUMNS
    assert len(table) == 18 and table["sample_id"].is_unique
    assert table["sample_id"].iloc[4] == "p0001_i1" and table["patient_id"].iloc[4] == "p0001"
    assert table["tirads"].dtype == np.int64 and table["points"].dtype == np.int64
    assert table["taller_than_wide"].dtype == bool
    assert set(table["tirads"]) <= {1, 2, 3, 4, 5} and (table["source"] == "synthetic").all()
    assert (table["split"] == "train").all() and set(table["composition"]) <= set(COMPOSITIONS)
    for row in table.itertuples():
        features = NoduleFeatures(row.composition, row.echogenicity, row.taller_than_wide, row.margin,
                                  parse_foci(row.foci))
        assert features.points() == row.points and features.tirads() == row.tirads
        assert Path(row.image).is_absolute() and Path(row.mask).is_absolute()
    feature_cols = ["tirads", "composition", "echogenicity", "taller_than_wide", "margin", "foci", "points"]
    assert (table.groupby("patient_id")[feature_cols].nunique() == 1).all().all()  # one nodule per patient

    images = [np.asarray(Image.open(p)) for p in table["image"].iloc[:3]]
    assert all(im.dtype == np.uint8 and im.shape == (64, 64) for im in images)
    assert not np.array_equal(images[0], images[1])  # different views of the same nodule
    mask = np.asarray(Image.open(table["mask"].iloc[0]))
    assert set(np.unique(mask)) == {0, 255}


def test_class_probs_select_categories(tmp_path):
    table = generate(tmp_path, patients=4, images_per_patient=1, size=64, seed=1,
                     class_probs=(0, 0, 0, 0, 1), progress=False)
    assert (table["tirads"] == 5).all()
    with pytest.raises(ValueError):
        generate(tmp_path, patients=1, images_per_patient=1, size=64, seed=1, class_probs=(1, 0), progress=False)
