"""A deterministic generator of ultrasound-like thyroid B-mode images, one nodule each.

Every image shows one nodule whose ACR TI-RADS category follows, by the ACR point rules,
from features that are drawn into the image, so the label is learnable from the pixels and
tied to the shape and texture of the mask.

ACR TI-RADS (Tessler et al., JACR 2017 white paper), points per feature, summed:

=====================  ==============================================================
composition            cystic / spongiform 0, mixed cystic-solid 1, solid 2
echogenicity           anechoic 0, hyper- or isoechoic 1, hypoechoic 2, very hypoechoic 3
shape                  taller-than-wide 3, otherwise 0
margin                 smooth / ill-defined 0, lobulated / irregular 2
                       (extrathyroidal extension, 3 points, is not simulated)
echogenic foci         additive: macrocalcifications 1, peripheral (rim) 2, punctate 3
=====================  ==============================================================

Points -> category: 0-1 TR1, 2 TR2, 3 TR3, 4-6 TR4, >= 7 TR5.

How an image is made (all coordinates are fractions of the image side, so 64, 128 and 256
pixel images show the same scene at different resolutions):

1. **Nodule outline**: a star-shaped polar radius r(theta) (clean, lobulated or spiculated),
   mapped by a linear transform into an ellipse whose bounding box has the drawn
   height/width ratio exactly (taller-than-wide means the vertical axis is longer, as ACR
   measures it on a transverse image). The mask is the inside of that outline.
2. **Scene**: echogenicity map (mean backscatter, 1.0 = thyroid parenchyma) of skin,
   subcutaneous fat, strap muscle, parenchyma, deep muscle and the carotid, plus a
   "specular" map of bright interfaces (skin, fasciae, thyroid capsule, calcifications)
   and an attenuation map.
3. **Nodule**: echogenicity sets the nodule's mean level, composition its interior
   (anechoic fluid, microcysts, a cystic pocket or solid tissue), the margin how sharply it
   blends into the parenchyma, foci add bright specular echoes.
4. **Acquisition**: a linear probe sends vertical beams, so the transmitted intensity of a
   column is exp(-k * integral of (attenuation - TGC)) above each pixel: fluid attenuates less
   than the TGC assumes (posterior enhancement under cysts and vessels), calcifications far more
   (acoustic shadows). Speckle is the envelope of a complex Gaussian scatterer field blurred
   by an anisotropic point-spread function (laterally wider than axially): Rayleigh
   statistics, spatially correlated, multiplicative. Specular echoes do not speckle. A
   little electronic noise, then log compression to a display dynamic range, as a scanner
   does.

Determinism: a patient's nodule (features and shape) depends only on ``(seed, patient)``,
each view only on ``(seed, patient, image)``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage as ndi
from tqdm import tqdm

from bench.data import DatasetAdapter, DatasetInfo, register_dataset
from bench.params import param

COMPOSITIONS = ("cystic", "spongiform", "mixed", "solid")
ECHOGENICITIES = ("anechoic", "hyperechoic", "isoechoic", "hypoechoic", "very_hypoechoic")
MARGINS = ("smooth", "ill_defined", "lobulated", "irregular")
FOCI = ("macro", "rim", "punctate")
NO_FOCI = "none"  # the index's foci string for an empty tuple (an empty string would read back as NaN from CSV)

_COMPOSITION_POINTS = {"cystic": 0, "spongiform": 0, "mixed": 1, "solid": 2}
_ECHO_POINTS = {"anechoic": 0, "hyperechoic": 1, "isoechoic": 1, "hypoechoic": 2, "very_hypoechoic": 3}
_MARGIN_POINTS = {"smooth": 0, "ill_defined": 0, "lobulated": 2, "irregular": 2}
_FOCI_POINTS = {"macro": 1, "rim": 2, "punctate": 3}
_TALLER_POINTS = 3

INDEX_COLUMNS = ("sample_id", "patient_id", "image", "mask", "tirads", "source", "split",
                 "composition", "echogenicity", "taller_than_wide", "margin", "foci", "points")


# ----------------------------------------------------------------------------- ACR rules


@dataclass(frozen=True)
class NoduleFeatures:
    """The ACR TI-RADS features of one nodule (extrathyroidal extension not modelled)."""

    composition: str
    echogenicity: str
    taller_than_wide: bool
    margin: str
    foci: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, value, allowed in (("composition", self.composition, COMPOSITIONS),
                                     ("echogenicity", self.echogenicity, ECHOGENICITIES),
                                     ("margin", self.margin, MARGINS)):
            if value not in allowed:
                raise ValueError(f"NoduleFeatures.{name}={value!r}; valid: {', '.join(allowed)}")
        bad = [f for f in self.foci if f not in FOCI]
        if bad or len(set(self.foci)) != len(self.foci):
            raise ValueError(f"NoduleFeatures.foci={self.foci!r}; a subset of {FOCI}")
        # canonical order, so equal feature sets compare (and hash) equal
        object.__setattr__(self, "foci", tuple(f for f in FOCI if f in self.foci))
        object.__setattr__(self, "taller_than_wide", bool(self.taller_than_wide))

    def points(self) -> int:
        return acr_points(self)

    def tirads(self) -> int:
        return tirads_from_points(self.points())

    def foci_string(self) -> str:
        return "+".join(self.foci) or NO_FOCI


def acr_points(f: NoduleFeatures) -> int:
    """ACR TI-RADS points: the sum over the five feature categories."""
    return (_COMPOSITION_POINTS[f.composition] + _ECHO_POINTS[f.echogenicity]
            + (_TALLER_POINTS if f.taller_than_wide else 0) + _MARGIN_POINTS[f.margin]
            + sum(_FOCI_POINTS[x] for x in f.foci))


def tirads_from_points(points: int) -> int:
    """0-1 -> TR1, 2 -> TR2, 3 -> TR3, 4-6 -> TR4, >= 7 -> TR5."""
    if points < 0:
        raise ValueError(f"ACR points cannot be negative: {points}")
    if points <= 1:
        return 1
    if points <= 3:
        return points
    return 4 if points <= 6 else 5


def parse_foci(text: str) -> tuple[str, ...]:
    """The inverse of :meth:`NoduleFeatures.foci_string`."""
    return () if not isinstance(text, str) or text in ("", NO_FOCI) else tuple(text.split("+"))


def _pick(rng: np.random.Generator, options: tuple[str, ...], probs: tuple[float, ...]) -> str:
    return options[int(rng.choice(len(options), p=probs))]


def _draw_features(rng: np.random.Generator) -> NoduleFeatures:
    """One clinically coherent feature set from a rough clinical prior."""
    composition = _pick(rng, COMPOSITIONS, (0.12, 0.12, 0.28, 0.48))
    if composition == "cystic":  # a simple cyst: anechoic, round-oval, smooth, nothing inside
        return NoduleFeatures("cystic", "anechoic", False, "smooth", ())
    if composition == "spongiform":  # benign by definition: iso/hyperechoic, no suspicious features
        echo = _pick(rng, ("isoechoic", "hyperechoic"), (0.7, 0.3))
        return NoduleFeatures("spongiform", echo, False, _pick(rng, ("smooth", "ill_defined"), (0.7, 0.3)), ())
    if composition == "mixed":  # echogenicity of the solid part; very hypoechoic solid parts are rare
        echo = _pick(rng, ("hyperechoic", "isoechoic", "hypoechoic"), (0.25, 0.5, 0.25))
        taller = rng.random() < 0.1
    else:
        echo = _pick(rng, ("hyperechoic", "isoechoic", "hypoechoic", "very_hypoechoic"), (0.15, 0.3, 0.38, 0.17))
        taller = rng.random() < 0.25
    margin = _pick(rng, MARGINS, (0.4, 0.2, 0.2, 0.2))
    foci = tuple(f for f, p in zip(FOCI, (0.2, 0.1, 0.2), strict=True) if rng.random() < p)
    return NoduleFeatures(composition, echo, taller, margin, foci)


def sample_features(rng: np.random.Generator, tirads: int) -> NoduleFeatures:
    """Rejection-sample coherent features until the ACR rules give category ``tirads``."""
    if tirads not in (1, 2, 3, 4, 5):
        raise ValueError(f"tirads must be 1..5, got {tirads!r}")
    for _ in range(100_000):
        features = _draw_features(rng)
        if features.tirads() == tirads:
            return features
    raise RuntimeError(f"could not sample features for TR{tirads}")  # unreachable with the prior above


# ----------------------------------------------------------------------------- nodule shape

_N_THETA = 720
_THETA = np.linspace(0.0, 2.0 * np.pi, _N_THETA, endpoint=False)
# nodule bounding box limits (fractions of the image): inside the thyroid band, off the borders
_X_LIMITS = (0.06, 0.94)
_Y_LIMITS = (0.27, 0.92)

# nodule echo level relative to parenchyma (1.0); strap muscle is ~0.34-0.4
_ECHO_LEVEL = {"anechoic": (0.01, 0.01), "very_hypoechoic": (0.14, 0.19), "hypoechoic": (0.45, 0.52),
               "isoechoic": (0.95, 1.05), "hyperechoic": (2.2, 2.6)}
_FLUID = 0.01         # echo level of anechoic fluid (below the electronic noise floor)
_FLUID_ATTEN = 0.12   # attenuation of fluid relative to soft tissue
_LOOKS = 3            # compounded speckle looks


@dataclass(frozen=True, eq=False)
class _Nodule:
    """What all views of one patient's nodule share."""

    radius: np.ndarray            # r(theta) on _THETA, mean ~1
    spin: float                   # orientation of the outline pattern
    base_aspect: float            # height / width of the underlying ellipse
    size: float                   # geometric-mean diameter, fraction of the image side
    level: float                  # echo level of the solid part, relative to parenchyma
    pocket: tuple[float, float, float]   # mixed: cystic pocket (angle, offset, radius), unit-nodule units
    n_punctate: int
    n_macro: int
    rim_arcs: tuple[tuple[float, float], ...]   # (start angle, span) of peripheral calcification arcs


def _outline(rng: np.random.Generator, margin: str) -> np.ndarray:
    """r(theta) with mean 1: a near-circle, lobes, or a jagged spiculated border."""
    r = 1.0 + 0.02 * np.cos(2 * _THETA + rng.uniform(0, 2 * np.pi))
    if margin == "lobulated":  # a few broad bumps
        k = int(rng.integers(3, 7))
        a = rng.uniform(0.1, 0.18)
        r = r + a * np.cos(k * _THETA + rng.uniform(0, 2 * np.pi))
        r = r + 0.35 * a * np.cos((k + int(rng.choice([-1, 1]))) * _THETA + rng.uniform(0, 2 * np.pi))
    elif margin == "irregular":  # many high-frequency harmonics plus a few sharp spicules
        for k in range(7, 25):
            r = r + rng.uniform(0.01, 0.035) * np.cos(k * _THETA + rng.uniform(0, 2 * np.pi))
        for _ in range(int(rng.integers(4, 9))):
            d = np.angle(np.exp(1j * (_THETA - rng.uniform(0, 2 * np.pi))))  # wrapped angular distance
            sign = 1.0 if rng.random() < 0.75 else -0.6                    # mostly outward spikes
            r = r + sign * rng.uniform(0.12, 0.28) * np.exp(-((d / rng.uniform(0.04, 0.09)) ** 2))
    return r / r.mean()


def _draw_nodule(rng: np.random.Generator, f: NoduleFeatures) -> _Nodule:
    aspect = rng.uniform(1.25, 1.6) if f.taller_than_wide else 1.0 / rng.uniform(1.15, 1.8)
    lo, hi = _ECHO_LEVEL[f.echogenicity]
    pocket = (rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.45), rng.uniform(0.5, 0.7))
    arcs = tuple((rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.1) * np.pi)
                 for _ in range(int(rng.integers(1, 3))))
    return _Nodule(radius=_outline(rng, f.margin), spin=rng.uniform(0, 2 * np.pi), base_aspect=aspect,
                   size=rng.uniform(0.24, 0.38), level=rng.uniform(lo, hi), pocket=pocket,
                   n_punctate=int(rng.integers(3, 8)), n_macro=int(rng.integers(1, 3)), rim_arcs=arcs)


@dataclass(frozen=True, eq=False)
class _View:
    """A nodule placed in one image: polar coordinates of every pixel in the nodule frame."""

    t: np.ndarray        # rho / r(theta): < 1 inside the outline
    theta: np.ndarray    # angle in the nodule's own frame
    u: np.ndarray        # (2, H, W) coordinates in the unit-nodule frame
    box: tuple[float, float, float, float]   # x0, y0, x1, y1 (fractions)
    radius_px: float     # mean radius in pixels


def _rotation(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s], [s, c]])


def _place(nod: _Nodule, rng: np.random.Generator, size: int) -> _View:
    """Jitter scale, tilt, aspect and position; keep the bounding box aspect exact."""
    tilt = rng.uniform(-0.17, 0.17)
    scale = nod.size * rng.uniform(0.9, 1.1)
    aspect = nod.base_aspect * rng.uniform(0.95, 1.05)
    aspect = max(aspect, 1.2) if nod.base_aspect > 1 else min(aspect, 1 / 1.12)
    flip = np.diag([-1.0, 1.0]) if rng.random() < 0.5 else np.eye(2)
    m = (_rotation(tilt) @ np.diag([1 / np.sqrt(nod.base_aspect), np.sqrt(nod.base_aspect)])
         @ flip @ _rotation(nod.spin))
    pts = m @ np.stack([nod.radius * np.cos(_THETA), nod.radius * np.sin(_THETA)])
    w, h = scale / np.sqrt(aspect), scale * np.sqrt(aspect)
    m = np.diag([w / np.ptp(pts[0]), h / np.ptp(pts[1])]) @ m   # exact bounding box w x h
    pts = m @ np.stack([nod.radius * np.cos(_THETA), nod.radius * np.sin(_THETA)])
    x0 = rng.uniform(_X_LIMITS[0], max(_X_LIMITS[0], _X_LIMITS[1] - w))
    y0 = rng.uniform(_Y_LIMITS[0], max(_Y_LIMITS[0], _Y_LIMITS[1] - h))
    centre = np.array([x0, y0]) - pts.min(axis=1)
    grid = (np.arange(size) + 0.5) / size
    d = np.stack(np.broadcast_arrays(grid[None, :] - centre[0], grid[:, None] - centre[1]))
    u = np.einsum("ij,jhw->ihw", np.linalg.inv(m), d)
    theta = np.mod(np.arctan2(u[1], u[0]), 2 * np.pi)
    t = np.hypot(u[0], u[1]) / np.interp(theta, _THETA, nod.radius, period=2 * np.pi)
    return _View(t=t, theta=theta, u=u, box=(x0, y0, x0 + w, y0 + h), radius_px=0.25 * (w + h) * size)


# ----------------------------------------------------------------------------- scene


def _noise(rng: np.random.Generator, size: int, sigma: tuple[float, float]) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian noise smoothed by ``sigma`` (pixels: y, x).

    Very smooth fields are made on a coarser grid and interpolated up (same look, less work).
    """
    step = [max(1, int(s / 3)) for s in sigma]
    shape = [-(-size // f) for f in step]
    field = ndi.gaussian_filter(rng.standard_normal(shape), [s / f for s, f in zip(sigma, step, strict=True)], mode="wrap")
    if step != [1, 1]:
        field = ndi.zoom(field, step, order=1, grid_mode=True, mode="grid-wrap")[:size, :size]
    return (field - field.mean()) / (field.std() + 1e-12)


def _wavy(rng: np.random.Generator, x: np.ndarray, base: float, amp: float) -> np.ndarray:
    """A gently undulating layer boundary y(x)."""
    return (base + amp * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * x + rng.uniform(0, 2 * np.pi))
            + 0.4 * amp * np.sin(2 * np.pi * rng.uniform(1.0, 2.5) * x + rng.uniform(0, 2 * np.pi)))


def _line(y: np.ndarray, boundary: np.ndarray, width: float) -> np.ndarray:
    """A thin bright interface along ``boundary`` (Gaussian profile of ``width``)."""
    return np.exp(-(((y - boundary[None, :]) / width) ** 2))


@dataclass
class _Maps:
    echo: np.ndarray       # diffuse scatterer strength (speckles), parenchyma = 1
    specular: np.ndarray   # bright interfaces and calcifications (no speckle)
    atten: np.ndarray      # attenuation relative to soft tissue


def _scene(rng: np.random.Generator, size: int, box: tuple[float, float, float, float]) -> _Maps:
    """Skin, fat, strap muscle, thyroid parenchyma, deep muscle and the carotid."""
    px = 1.0 / size
    x = (np.arange(size) + 0.5) / size
    y = x[:, None]
    amp = rng.uniform(0.005, 0.015)
    skin = _wavy(rng, x, rng.uniform(0.02, 0.035), 0.003)
    thy_top = _wavy(rng, x, min(rng.uniform(0.17, 0.25), box[1] - 0.025 - 1.4 * amp), amp)
    fat = _wavy(rng, x, min(rng.uniform(0.07, 0.12), float(thy_top.min()) - 0.05), 0.006)
    thy_bottom = _wavy(rng, x, max(rng.uniform(0.8, 0.9), box[3] + 0.03 + 1.4 * amp), amp)

    parenchyma = 1.0 + 0.07 * _noise(rng, size, (0.04 * size, 0.04 * size))   # fine homogeneous gland
    fibres = _noise(rng, size, (max(0.5, 0.004 * size), 0.06 * size))          # horizontal striations
    septa = np.clip(_noise(rng, size, (max(0.5, 0.005 * size), 0.05 * size)) - 1.0, 0, None)
    muscle = rng.uniform(0.34, 0.4) * (1 + 0.25 * fibres)
    echo = np.where(y < skin, 1.6, np.where(y < fat, 0.65 * (1 + 0.6 * septa),
                    np.where(y < thy_top, muscle, np.where(y < thy_bottom, parenchyma,
                                                           0.5 * (1 + 0.2 * fibres)))))
    width = max(0.7 * px, 0.005)
    specular = (2.5 * _line(y, np.full_like(x, 0.004), width) + 1.2 * _line(y, skin, width)
                + 1.0 * _line(y, fat, width) + rng.uniform(1.0, 1.8) * _line(y, thy_top, width)
                + 1.2 * _line(y, thy_bottom, width))
    atten = np.where(y < fat, 0.9, np.where(y < thy_top, 1.1, 1.0)) * np.ones_like(x)
    maps = _Maps(echo=echo, specular=specular, atten=atten)
    _carotid(rng, size, box, float(thy_top.mean()), float(thy_bottom.mean()), maps)
    return maps


def _carotid(rng: np.random.Generator, size: int, box: tuple[float, float, float, float],
             top: float, bottom: float, maps: _Maps) -> None:
    """A dark round vessel at the side with more room, kept clear of the nodule."""
    if rng.random() < 0.15:
        return
    r = rng.uniform(0.07, 0.11)
    left = box[0] >= 1 - box[2]
    gap = box[0] if left else 1 - box[2]
    off = min(rng.uniform(0.04, 0.14), gap - r - 0.03)
    if off < -0.5 * r:
        return
    cx = off if left else 1 - off
    cy = rng.uniform(min(top + r, bottom - r), bottom - 0.6 * r)
    x = (np.arange(size) + 0.5) / size
    dist = np.hypot(x[None, :] - cx, x[:, None] - cy) / r
    lumen = dist < 1.0
    maps.echo[lumen] = _FLUID
    maps.atten[lumen] = _FLUID_ATTEN                # blood: posterior enhancement below
    maps.specular += 1.5 * np.exp(-(((dist - 1.0) * r / max(0.7 / size, 0.006)) ** 2))   # vessel wall


# ----------------------------------------------------------------------------- nodule


def _paint_nodule(f: NoduleFeatures, nod: _Nodule, view: _View, rng: np.random.Generator,
                  size: int, maps: _Maps) -> np.ndarray:
    """Blend the nodule into the scene maps; return its mask."""
    t = view.t
    mask = _one_piece(t < 1.0)
    interior = nod.level * (1 + 0.08 * _noise(rng, size, (0.03 * size, 0.03 * size)))
    atten = np.ones_like(t)
    fluid = np.zeros_like(mask)
    if f.composition == "cystic":
        fluid = mask.copy()
    elif f.composition == "spongiform":   # >50% of the volume small anechoic spaces between septa
        blobs = _noise(rng, size, (max(0.7, 0.008 * size),) * 2)
        inner = t < 0.93
        fluid = inner & (blobs > np.quantile(blobs[inner], rng.uniform(0.35, 0.45)))
        interior = interior * 1.15   # septa are bright interfaces
    elif f.composition == "mixed":        # an eccentric cystic pocket inside a solid wall
        angle, offset, radius = nod.pocket
        d = np.hypot(view.u[0] - offset * np.cos(angle), view.u[1] - offset * np.sin(angle)) / radius
        d = d + 0.12 * _noise(rng, size, (0.02 * size, 0.02 * size))
        fluid = (t < 0.85) & (d < 1.0)
    interior = np.where(fluid, _FLUID, interior)
    atten = np.where(fluid, 0.25 if f.composition == "spongiform" else _FLUID_ATTEN, atten)

    # margin: a sharp edge (just anti-aliased), or a soft transition for an ill-defined one
    soft = 0.035 * size if f.margin == "ill_defined" else max(0.35, 0.003 * size)
    w = ndi.gaussian_filter(mask.astype(float), soft)
    maps.echo = maps.echo * (1 - w) + interior * w
    maps.atten = maps.atten * (1 - w) + atten * w

    rim_px = max(1.2, 0.012 * size)   # thickness of thin structures, pixels
    if f.echogenicity == "isoechoic":   # a thin dark halo keeps an isoechoic nodule visible
        halo = (t >= 1.0) & (t < 1.0 + max(1.5, 0.02 * size) / view.radius_px)
        halo = ndi.gaussian_filter(halo.astype(float), max(0.5, soft / 2))
        maps.echo = maps.echo * (1 - (0.85 if f.margin != "ill_defined" else 0.65) * halo / max(halo.max(), 1e-9))
    if f.composition == "cystic":       # thin bright cyst wall
        maps.specular += 0.5 * np.exp(-(((t - 1.0) * view.radius_px / rim_px) ** 2))
    _paint_foci(f, nod, view, rng, size, fluid, maps)
    return mask


def _one_piece(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component: a spicule thinner than a pixel can leave stray pixels."""
    labels, n = ndi.label(mask)
    if n <= 1:
        return mask
    return labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))


def _random_pixels(rng: np.random.Generator, region: np.ndarray, n: int) -> np.ndarray:
    """``n`` random (y, x) sub-pixel positions inside ``region``."""
    idx = rng.choice(np.flatnonzero(region), size=n, replace=n > region.sum())
    yx = np.stack(np.unravel_index(idx, region.shape), axis=1).astype(float)
    return yx + rng.uniform(-0.4, 0.4, size=yx.shape)


def _paint_foci(f: NoduleFeatures, nod: _Nodule, view: _View, rng: np.random.Generator,
                size: int, fluid: np.ndarray, maps: _Maps) -> None:
    t = view.t
    yy, xx = np.mgrid[0:size, 0:size].astype(float)

    def region(limit: float) -> np.ndarray:
        solid = (t < limit) & ~fluid
        return solid if solid.sum() >= 4 else t < limit

    if "punctate" in f.foci:   # tiny bright dots, no shadow (smaller than the beam)
        sigma = max(0.6, 0.007 * size)
        for y0, x0 in _random_pixels(rng, region(0.8), nod.n_punctate):
            maps.specular += rng.uniform(5.0, 7.0) * np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / (2 * sigma**2))
    if "macro" in f.foci:      # coarse calcifications: bright blob, strong attenuation -> shadow
        for y0, x0 in _random_pixels(rng, region(0.55), nod.n_macro):
            ax = rng.uniform(0.028, 0.045) * size
            ay = ax * rng.uniform(0.55, 0.85)
            blob = (((xx - x0) / ax) ** 2 + ((yy - y0) / ay) ** 2) < 1.0
            blob = ndi.gaussian_filter(blob.astype(float), 0.5)
            maps.specular += rng.uniform(6.0, 9.0) * blob
            maps.atten += 14.0 * blob
    if "rim" in f.foci:        # peripheral (eggshell) calcification: bright arcs just inside the margin
        thick = max(1.2, 0.015 * size) / view.radius_px
        band = (t > 0.97 - thick) & (t < 0.97)
        arcs = np.zeros_like(band)
        for start, span in nod.rim_arcs:
            arcs |= np.mod(view.theta - start, 2 * np.pi) < span
        rim = ndi.gaussian_filter((band & arcs).astype(float), 0.5)
        maps.specular += rng.uniform(4.0, 6.0) * rim
        maps.atten += 6.0 * rim


# ----------------------------------------------------------------------------- acquisition


def _acquire(maps: _Maps, rng: np.random.Generator, size: int) -> np.ndarray:
    """Attenuation with TGC, speckle, electronic noise and log compression -> uint8."""
    # ~0.5 dB/cm/MHz at 10 MHz, two-way, over ~4 cm: 3-5 nepers over the full depth, mostly
    # undone by the time-gain compensation; what it leaves is a gentle darkening with depth
    k = rng.uniform(3.0, 5.0)
    tgc = rng.uniform(0.8, 0.93)
    excess = (maps.atten - tgc) * (k / size)
    transmitted = np.exp(-(np.cumsum(excess, axis=0) - excess))   # through the tissue above
    transmitted = ndi.gaussian_filter1d(transmitted, max(0.5, 0.008 * size), axis=1)   # beam width

    # speckle: envelope of a complex scatterer field blurred by the PSF (lateral > axial),
    # averaged over a few looks as spatial compounding does on thyroid scanners
    psf = (max(0.35, 0.0045 * size), max(0.6, 0.009 * size))
    env = np.zeros((size, size))
    for _ in range(_LOOKS):
        re = ndi.gaussian_filter(rng.standard_normal((size, size)), psf)
        im = ndi.gaussian_filter(rng.standard_normal((size, size)), psf)
        env += np.hypot(re, im)
    env /= np.sqrt(np.mean(env**2))

    signal = transmitted * (maps.echo * env + maps.specular * (0.85 + 0.15 * env))
    # electronic noise: complex Gaussian, band-limited by the receive filter like the echoes
    noise = ndi.gaussian_filter(rng.standard_normal((2, size, size)), (0, *psf))
    noise *= rng.uniform(0.08, 0.12) / np.sqrt(np.mean(noise**2) * 2)
    signal = np.hypot(signal + noise[0], noise[1])
    db = 20 * np.log10(signal + 1e-6)
    dynamic_range = rng.uniform(38.0, 44.0)
    gain = rng.uniform(-2.0, 2.0)
    gray = (db + 2.5 + gain) / dynamic_range + 0.47   # parenchyma (mean log-speckle -2.5 dB) ~ mid-grey
    gray = gray * 255 + rng.normal(0.0, 1.5, size=gray.shape)
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- public API


def _render_view(f: NoduleFeatures, nod: _Nodule, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    view = _place(nod, rng, size)
    maps = _scene(rng, size, view.box)
    mask = _paint_nodule(f, nod, view, rng, size, maps)
    return _acquire(maps, rng, size), mask


def render(features: NoduleFeatures, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8, size x size) and its nodule mask (bool) for ``features``."""
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    return _render_view(features, _draw_nodule(rng, features), rng, size)


def _write_png(array: np.ndarray, path: Path) -> None:
    """Write via a temporary file and an atomic rename: never a half-written PNG."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


QUOTA_BLOCK = 20  # patients per block of the class quota


def class_quota(patients: int, class_probs: np.ndarray, seed: int) -> np.ndarray:
    """TI-RADS of each patient: a quota per block of :data:`QUOTA_BLOCK` patients, shuffled.

    Each block holds the classes in proportion to ``class_probs`` (largest remainder), so even
    a small set has every likely class in about its expected number (a fold without a class
    cannot train); blocks are independent, so adding patients never changes earlier ones.
    """
    exact = QUOTA_BLOCK * class_probs
    counts = np.floor(exact).astype(int)
    counts[np.argsort(-(exact - counts), kind="stable")[: QUOTA_BLOCK - counts.sum()]] += 1
    block = np.repeat(np.arange(1, 6), counts)
    n_blocks = -(-patients // QUOTA_BLOCK)
    labels = [np.random.default_rng([seed, 2**31, b]).permutation(block) for b in range(n_blocks)]
    return np.concatenate(labels)[:patients]


def _patients(seed: int, patients: int, class_probs: np.ndarray) -> Iterator[tuple[int, NoduleFeatures, _Nodule]]:
    for p, tirads in enumerate(class_quota(patients, class_probs, seed)):
        rng = np.random.default_rng([seed, p])
        features = sample_features(rng, int(tirads))
        yield p, features, _draw_nodule(rng, features)


def generate(out_dir: Path, *, patients: int, images_per_patient: int, size: int, seed: int,
             class_probs: tuple[float, ...] = (0.1, 0.2, 0.25, 0.25, 0.2), progress: bool = True) -> pd.DataFrame:
    """Write ``patients * images_per_patient`` images and masks; return the index table.

    Each patient has one nodule (TI-RADS drawn from ``class_probs``), seen in
    ``images_per_patient`` views with fresh position, scale, tilt, scene and speckle.
    """
    if patients < 1 or images_per_patient < 1:
        raise ValueError("patients and images_per_patient must be at least 1")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    probs = np.asarray(class_probs, dtype=float)
    if probs.shape != (5,) or (probs < 0).any() or probs.sum() <= 0:
        raise ValueError(f"class_probs must be 5 non-negative weights, got {class_probs!r}")
    probs = probs / probs.sum()
    out_dir = Path(out_dir).resolve()
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    bar = tqdm(total=patients * images_per_patient, desc="synthetic images", unit="img", disable=not progress)
    for p, features, nodule in _patients(seed, patients, probs):
        for i in range(images_per_patient):
            image, mask = _render_view(features, nodule, np.random.default_rng([seed, p, i]), size)
            patient_id = f"p{p:04d}"
            sample_id = f"{patient_id}_i{i}"
            image_path, mask_path = out_dir / "images" / f"{sample_id}.png", out_dir / "masks" / f"{sample_id}.png"
            _write_png(image, image_path)
            _write_png(mask.astype(np.uint8) * 255, mask_path)
            rows.append({"sample_id": sample_id, "patient_id": patient_id, "image": str(image_path),
                         "mask": str(mask_path), "tirads": features.tirads(), "source": "synthetic",
                         "split": "train", "composition": features.composition,
                         "echogenicity": features.echogenicity, "taller_than_wide": features.taller_than_wide,
                         "margin": features.margin, "foci": features.foci_string(), "points": features.points()})
            bar.update()
    bar.close()
    table = pd.DataFrame(rows, columns=list(INDEX_COLUMNS))
    return table.astype({"tirads": "int64", "points": "int64", "taller_than_wide": bool})


# ----------------------------------------------------------------------------- adapter


@dataclass(frozen=True)
class SyntheticParams:
    patients: int = param(120, "synthetic patients (one nodule each)", low=1)
    images_per_patient: int = param(3, "views of each patient's nodule", low=1)
    size: int = param(256, "side of the generated images in pixels", low=32)
    seed: int = param(0, "generator seed: same seed, same images", low=0)


@register_dataset
class Synthetic(DatasetAdapter):
    """Generated once into the dataset's cache folder, then read like any image folder."""

    info = DatasetInfo("synthetic", "ultrasound-like images with ACR-rule TI-RADS labels, generated locally",
                       "thyrobench (ACR TI-RADS white paper, Tessler et al. 2017)", needs_root=False)
    Params = SyntheticParams

    def build_index(self) -> pd.DataFrame:
        index = self.workdir / "generated" / "index.csv"
        if not index.exists():
            self.workdir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".generating-", dir=self.workdir))
            try:
                p = self.params
                table = generate(tmp, patients=p.patients, images_per_patient=p.images_per_patient, size=p.size, seed=p.seed)
                table.to_csv(tmp / "index.csv", index=False)
                os.replace(tmp, index.parent)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        table = pd.read_csv(index, dtype={"sample_id": str, "patient_id": str})
        folder = index.parent  # paths are re-rooted: the workspace may have moved
        table["image"] = [str(folder / "images" / Path(p).name) for p in table["image"]]
        table["mask"] = [str(folder / "masks" / Path(p).name) for p in table["mask"]]
        return table
