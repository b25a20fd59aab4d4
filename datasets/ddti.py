"""``ddti``: the Digital Database of Thyroid Ultrasound Images (Pedraza et al., SPIE 9287, 2015).

Layouts (both as distributed)::

    <root>/N.xml, <root>/N_M.jpg              flat (the original zip, Kaggle)
    <root>/xml/N.xml, <root>/raw_jpg/N_M.jpg  sub-folders (GitHub mirrors)

``N.xml`` describes case N: ``<tirads>`` and one ``<mark>`` per image M whose ``<svg>`` is a
JSON list of regions ``{"points": [{"x", "y"}...], "regionType": "freehand" | "arrow"}`` in
pixels of the 560x360 image. The mask is the union of the filled freehand polygons, clipped
to the frame.

Defects of the real release, each handled with a :class:`~bench.errors.DataWarning` naming the
file: an ``<svg>`` cut off mid-JSON (the complete points are salvaged and the outline closed;
the row's ``outline`` column says ``truncated``), an empty ``<svg>`` (no outline: the image is
left out), two-point ``arrow`` regions (ignored). Images that are byte-identical across cases
put those cases in one group (``patient_id``), so a split never separates them.

DDTI's ``<tirads>`` is a Kwak-style scale (2, 3, 4a, 4b, 4c, 5), not ACR TR1-TR5. The default
``scale=tr`` maps 2->TR2, 3->TR3, 4a/4b/4c->TR4, 5->TR5 (an assumption, declared);
``scale=ddti6`` keeps the six categories as six classes. The raw value is kept in
``ddti_tirads``. There are no patient ids: the case number is the grouping unit.
"""

from __future__ import annotations

import hashlib
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from bench.datasets._common import case_key, listing, warn
from PIL import Image, ImageDraw

from bench.data import CLASS_NAMES, INDEX_COLUMNS, DatasetAdapter, DatasetInfo, register_dataset
from bench.errors import DataError
from bench.params import param

DDTI_CATEGORIES = ("2", "3", "4a", "4b", "4c", "5")
TO_TR = {"2": 2, "3": 3, "4a": 4, "4b": 4, "4c": 4, "5": 5}
_POINT = re.compile(r'"x"\s*:\s*(-?\d+(?:\.\d+)?)\s*,\s*"y"\s*:\s*(-?\d+(?:\.\d+)?)')
_REGION_TYPE = re.compile(r'"regionType"\s*:\s*"([^"]*)"')
_FIELDS = ("age", "sex", "composition", "echogenicity", "margins", "calcifications")

Polygon = list[tuple[float, float]]


@dataclass
class Mark:
    image: str  # the M of N_M.jpg
    polygons: list[Polygon]
    outline: str  # complete, truncated, missing
    problems: list[str] = field(default_factory=list)


@dataclass
class Case:
    number: str
    tirads: str  # raw, "" when missing
    fields: dict[str, str]
    marks: list[Mark]
    problems: list[str] = field(default_factory=list)


def parse_case(path: Path) -> Case:
    """Read one case XML; defects are listed in ``problems`` (the caller decides to warn)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DataError(f"{path}: not valid XML ({err})") from err
    if root.tag != "case":
        raise DataError(f"{path}: root element is <{root.tag}>, expected <case> (a DDTI case file)")
    text = {child.tag: (child.text or "").strip() for child in root if child.tag != "mark"}
    case = Case(path.stem, text.get("tirads", "").lower(), {k: text.get(k, "") for k in _FIELDS}, [])
    if text.get("number") and text["number"] != path.stem:
        case.problems.append(f"{path}: <number>{text['number']}</number> differs from the file name; using {path.stem}")
    if case.tirads and case.tirads not in TO_TR:
        case.problems.append(f"{path}: unknown <tirads> {case.tirads!r} (expected one of {', '.join(DDTI_CATEGORIES)}); treated as missing")
        case.tirads = ""
    for mark in root.iter("mark"):
        number = (mark.findtext("image") or "").strip()
        case.marks.append(_parse_svg(path, number, mark.findtext("svg") or ""))
    return case


def _parse_svg(path: Path, image: str, svg: str) -> Mark:
    where = f"{path} (image {image})"
    if not svg.strip():
        return Mark(image, [], "missing", [f"{where}: empty <svg>, no nodule outline; image left out"])
    try:
        regions = json.loads(svg)
        truncated = False
    except json.JSONDecodeError:
        regions, truncated = _salvage(svg), True
    mark = Mark(image, [], "truncated" if truncated else "complete")
    ignored = 0
    for region in regions if isinstance(regions, list) else []:
        raw = region.get("points", []) if isinstance(region, dict) else []
        points = [(float(p["x"]), float(p["y"])) for p in raw if isinstance(p, dict) and "x" in p and "y" in p]
        if not isinstance(region, dict) or region.get("regionType", "freehand") != "freehand" or len(points) < 3:
            ignored += 1
            continue
        mark.polygons.append(points)
    if ignored:
        mark.problems.append(f"{where}: ignored {ignored} region(s) that are not outlines (arrow marks or fewer than 3 points)")
    if truncated:
        n = sum(len(p) for p in mark.polygons)
        mark.problems.append(f"{where}: <svg> is cut off ({len(svg)} characters, invalid JSON); "
                             f"salvaged {len(mark.polygons)} outline(s) from {n} complete points and closed them")
    if not mark.polygons:
        mark.outline = "missing"
        mark.problems.append(f"{where}: no usable nodule outline; image left out")
    return mark


def _salvage(svg: str) -> list[dict]:
    """The regions of a cut-off JSON list: every complete ``{"x", "y"}`` pair of each region."""
    regions = []
    for chunk in svg.split('"points"')[1:]:
        kind = _REGION_TYPE.search(chunk)
        points = [{"x": x, "y": y} for x, y in _POINT.findall(chunk)]
        regions.append({"points": points, "regionType": kind.group(1) if kind else "freehand"})
    return regions


def rasterize(polygons: list[Polygon], width: int, height: int) -> np.ndarray:
    """Union of filled polygons as a bool mask; PIL clips points outside the frame."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        draw.polygon(polygon, fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def find_layout(root: Path) -> tuple[Path, Path]:
    """(folder of the XMLs, folder of the JPGs), or a DataError saying what was expected."""
    if (root / "xml").is_dir() and (root / "raw_jpg").is_dir():
        return root / "xml", root / "raw_jpg"
    if any(root.glob("*.xml")) and any(root.glob("*_*.jpg")):
        return root, root
    raise DataError(f"{root} is not a DDTI folder: expected N.xml and N_M.jpg side by side, or the sub-folders "
                    f"xml/ and raw_jpg/; found {listing(root)}")


@dataclass(frozen=True)
class DDTIParams:
    scale: str = param("tr", "label scale: 'tr' maps 2,3,4a/4b/4c,5 to TR2,TR3,TR4,TR5 (declared assumption); "
                       "'ddti6' keeps DDTI's six categories as classes", choices=("tr", "ddti6"))


@register_dataset
class DDTI(DatasetAdapter):
    info = DatasetInfo("ddti", "DDTI: per-case XML polygons + JPG (flat or xml/ + raw_jpg/), Kwak-style TI-RADS",
                       "Pedraza et al., SPIE 9287 92870W, 2015, doi:10.1117/12.2073532")
    Params = DDTIParams

    @property  # type: ignore[override]
    def class_names(self) -> tuple[str, ...]:
        return CLASS_NAMES if self.params.scale == "tr" else DDTI_CATEGORIES

    def label(self, raw: str) -> int | None:
        if not raw:
            return None
        return TO_TR[raw] if self.params.scale == "tr" else DDTI_CATEGORIES.index(raw) + 1

    def build_index(self) -> pd.DataFrame:
        assert self.root is not None
        xml_dir, jpg_dir = find_layout(self.root)
        rows = []
        marked: set[str] = set()
        for path in sorted(xml_dir.glob("*.xml"), key=lambda p: case_key(p.stem)):
            try:
                case = parse_case(path)
            except DataError as err:
                warn(f"{err}; case skipped")
                continue
            for problem in case.problems:
                warn(problem)
            for mark in case.marks:
                for problem in mark.problems:
                    warn(problem)
                image = jpg_dir / f"{case.number}_{mark.image}.jpg"
                marked.add(image.name)
                if mark.outline == "missing":
                    continue
                if not image.is_file():
                    warn(f"{path}: image {mark.image} has an outline but {image} does not exist; left out")
                    continue
                rows.append({"sample_id": f"{case.number}_{mark.image}", "case": case.number, "image": str(image),
                             "mask": f"{path}#{mark.image}", "tirads": self.label(case.tirads), "source": "ddti",
                             "split": "train", "ddti_tirads": case.tirads, "outline": mark.outline, **case.fields})
        for image in sorted(jpg_dir.glob("*_*.jpg")):
            if image.name not in marked:
                warn(f"{image}: no <mark> for this image in {xml_dir / (image.stem.split('_')[0] + '.xml')}; left out")
        if not rows:
            raise DataError(f"{self.root}: no DDTI image with a nodule outline found")
        table = pd.DataFrame(rows)
        table.insert(1, "patient_id", _duplicate_groups(table))
        table["tirads"] = table["tirads"].astype("Int64")
        return table[[*INDEX_COLUMNS, *[c for c in table.columns if c not in INDEX_COLUMNS]]]

    def load_mask(self, row: pd.Series) -> np.ndarray:
        xml, image = str(row["mask"]).rsplit("#", 1)
        mark = next((m for m in parse_case(Path(xml)).marks if m.image == image), None)
        if mark is None or not mark.polygons:
            raise DataError(f"{xml}: no outline for image {image}")
        with Image.open(row["image"]) as im:
            width, height = im.size
        return rasterize(mark.polygons, width, height)


def _duplicate_groups(table: pd.DataFrame) -> list[str]:
    """Group id per row: the smallest case number among cases sharing a byte-identical image."""
    parent = {c: c for c in table["case"]}

    def find(c: str) -> str:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    first_case: dict[str, str] = {}
    for case, image in zip(table["case"], table["image"], strict=True):
        digest = hashlib.sha256(Path(image).read_bytes()).hexdigest()
        other = first_case.setdefault(digest, case)
        a, b = find(case), find(other)
        if a != b:
            parent[max(a, b, key=case_key)] = min(a, b, key=case_key)
    return [find(c) for c in table["case"]]
