"""Radiomics targets of one 256 px image (all 14 features, one process): the per-image cost behind
"seconds per 1,000 images" in the README. Run with `make bench` (the normal suite runs it once, untimed)."""

import numpy as np
from bench.datasets import radiomics as R
from scipy import ndimage as ndi


def test_radiomics_one_256px_image(benchmark):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256]
    mask = ((xx - 120) / 50) ** 2 + ((yy - 130) / 70) ** 2 <= 1
    speckle = ndi.gaussian_filter(rng.gamma(2.0, 1.0, (256, 256)), (0.8, 1.6))
    image = np.clip(np.where(mask, 70, 130) * speckle, 0, 255).astype(np.uint8)
    extractor = R.make_extractor(R.RadiomicsSettings())

    def one() -> np.ndarray:
        values, valid, _ = R.image_features(image, mask, extractor=extractor)
        assert valid.all()
        return values

    values = benchmark.pedantic(one, rounds=20, warmup_rounds=2) if benchmark.enabled else one()
    assert np.isfinite(values).all()
    if benchmark.enabled:
        benchmark.extra_info["cpu_seconds_per_1000_images"] = 1000 * benchmark.stats["mean"]
