"""Real-dataset adapters (ThyroidXL, AIMI cine-clips, DDTI, TN3K), `bench data check` and external evaluation.

ThyroidXL, AIMI and TN3K cannot be shipped: their adapters run on tiny fixtures written here in
each exact on-disk layout (`shared/reference/datasets.md`). DDTI runs on the real release in
`../shared/data/ddti` (counts from its SOURCE.md) as well as on fixtures with each defect.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from bench.datasets.aimi import AIMI, AIMIParams
from bench.datasets.ddti import DDTI, DDTIParams, parse_case, rasterize
from bench.datasets.thyroidxl import ThyroidXL
from bench.datasets.tn3k import TN3K, TN3KParams
from click.testing import CliRunner
from matplotlib.path import Path as MplPath
from PIL import Image

from bench.cli import main
from bench.data import validate_index
from bench.datacheck import check_dataset, format_report
from bench.errors import ConfigError, DataError, DataWarning
from bench.external import parse_external
from bench.method import resolve
from bench.runner import RunSpec
from bench.tracking import Workspace, all_runs
from bench.trainer import TrainConfig

REAL_DDTI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ddti"
needs_ddti = pytest.mark.skipif(not (REAL_DDTI / "xml").is_dir(), reason=f"real DDTI not found at {REAL_DDTI}")


# ----------------------------------------------------------------------------- fixture writers


def _pair(rng: np.random.Generator, shape=(48, 64)) -> tuple[np.ndarray, np.ndarray]:
    """A random grey image and a {0, 255} rectangular nodule mask at a random place."""
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    mask = np.zeros(shape, dtype=np.uint8)
    y, x = rng.integers(4, shape[0] // 2), rng.integers(4, shape[1] // 2)
    mask[y : y + shape[0] // 3, x : x + shape[1] // 3] = 255
    return image, mask


def write_thyroidxl(root: Path, per_class: int = 2, test_patients: int = 3, images: int = 2) -> Path:
    """Current release: {train,test}/{images,masks}/*.png, stats/id2info_eng.json, stats/*_patients.txt."""
    rng = np.random.default_rng(1)
    info, split_ids = {}, {"train": [], "test": []}
    n_train = 5 * per_class
    for p in range(n_train + test_patients):
        pid, split = f"{p + 58:08d}", "train" if p < n_train else "test"
        names = [f"{pid}_{rng.integers(16**8):08X}_{k}.png" for k in range(images)]
        for name in names:
            image, mask = _pair(rng)
            for kind, array in (("images", image), ("masks", mask)):
                (root / split / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / split / kind / name)
        tirads = p % 5 + 1
        info[pid] = {"age": 50, "gender": 2, "conclusion": 1 if tirads == 5 else 3,
                     "nodule_1": {"Position": "Left lobe", "Width": 12.0, "Height": 9.0, "Depth": None,
                                  "TIRADS": str(tirads) if p % 2 else tirads, "FNAC": "2", "Conclusion": "x",
                                  "Histopathology": None},
                     "nodule_2": None, "images": names}
        split_ids[split].append(pid)
    (root / "stats").mkdir()
    (root / "stats" / "id2info_eng.json").write_text(json.dumps(info))
    for split, ids in split_ids.items():
        (root / "stats" / f"{split}_patients.txt").write_text("\n".join(ids) + "\n")
    return root


def write_aimi(root: Path, clips=(("129_", 4, 4, 1), ("1_", 3, 2, 0), ("7_", 2, 3, 0)), shape=(40, 52)) -> tuple[Path, np.ndarray]:
    """dataset.hdf5 (image, mask uint8 N x H x W; annot_id |S4; frame_num |S3), clip by clip, frames
    stored in reverse order; metadata.csv with the 14 released columns. Returns the root and the images."""
    rng = np.random.default_rng(2)
    images, masks, ids, frames = [], [], [], []
    for clip, n, _, _ in clips:
        for frame in range(n, 0, -1):
            image, mask = _pair(rng, shape)
            images.append(image), masks.append(mask), ids.append(clip.encode()), frames.append(str(frame).encode())
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "dataset.hdf5", "w") as f:
        f["image"], f["mask"] = np.stack(images), np.stack(masks)
        f["annot_id"], f["frame_num"] = np.array(ids, dtype="S4"), np.array(frames, dtype="S3")
    columns = ["annot_id", "age", "sex", "location", "size_x", "size_y", "size_z", "ti-rads_composition",
               "ti-rads_echogenicity", "ti-rads_shape", "ti-rads_margin", "ti-rads_echogenicfoci", "ti-rads_level",
               "histopath_diagnosis"]
    rows = [[clip, 50, "Female", "right", 1.0, 1.0, 1.0, 2, 2, 0, 0, 0, level, histo] for clip, _, level, histo in clips]
    pd.DataFrame(rows, columns=columns).to_csv(root / "metadata.csv", index=False)
    return root, np.stack(images)


SQUARE = [{"x": 10, "y": 10}, {"x": 40, "y": 10}, {"x": 40, "y": 30}, {"x": 10, "y": 30}]


def _svg(*regions: tuple[str, list[dict]]) -> str:
    return json.dumps([{"points": pts, "annotation": {}, "regionType": kind} for kind, pts in regions])


def write_ddti(root: Path, layout: str = "sub") -> Path:
    """Five cases: a clean one (two images), a cut-off <svg>, an empty <svg> plus an arrow region,
    and two cases sharing a byte-identical image; 'sub' = xml/ + raw_jpg/, 'flat' = side by side."""
    xml_dir, jpg_dir = (root / "xml", root / "raw_jpg") if layout == "sub" else (root, root)
    xml_dir.mkdir(parents=True, exist_ok=True)
    jpg_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    big = [{"x": int(60 + 30 * np.cos(t)), "y": int(30 + 20 * np.sin(t))} for t in np.linspace(0, 6.2, 40)]
    truncated = _svg(("freehand", SQUARE), ("freehand", big))[:-60]
    cases = {
        "1": ("4b", {"1": _svg(("freehand", SQUARE)), "2": _svg(("freehand", SQUARE), ("freehand", big))}),
        "2": ("2", {"1": truncated}),
        "3": ("", {"1": "", "2": _svg(("freehand", big), ("arrow", SQUARE[:2]))}),
        "5": ("5", {"1": _svg(("freehand", big))}),
        "7": ("4a", {"1": _svg(("freehand", SQUARE))}),
    }
    for number, (tirads, marks) in cases.items():
        body = "".join(f"<mark><image>{m}</image><svg>{svg}</svg></mark>" for m, svg in marks.items())
        (xml_dir / f"{number}.xml").write_text(
            f"<case><number>{number}</number><age>40</age><sex>F</sex><composition>solid</composition>"
            f"<echogenicity></echogenicity><margins></margins><calcifications></calcifications>"
            f"<tirads>{tirads}</tirads><reportbacaf></reportbacaf><reporteco></reporteco>{body}</case>")
        for m in marks:
            Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(jpg_dir / f"{number}_{m}.jpg")
    (jpg_dir / "7_1.jpg").write_bytes((jpg_dir / "5_1.jpg").read_bytes())  # the same image in two cases
    return root


def write_tn3k(root: Path, n_trainval: int = 6, n_test: int = 2) -> Path:
    """{trainval,test}-{image,mask}/0000.jpg..., JPEG masks, label4*.csv with a header and float labels."""
    rng = np.random.default_rng(4)
    for part, n in (("trainval", n_trainval), ("test", n_test)):
        (root / f"{part}-image").mkdir(parents=True)
        (root / f"{part}-mask").mkdir()
        lines = ["name,label"]
        for i in range(n):
            image, mask = _pair(rng, (44 + 4 * i, 60))
            Image.fromarray(image).save(root / f"{part}-image" / f"{i:04d}.jpg")
            Image.fromarray(mask).save(root / f"{part}-mask" / f"{i:04d}.jpg", quality=75)
            lines.append(f"{i:04d}.jpg,{float(i % 2)}")
        (root / f"label4{part}.csv").write_text("\n".join(lines) + "\n")
    return root


def index_of(adapter_cls, root: Path, params=None) -> tuple[pd.DataFrame, list[str], object]:
    adapter = adapter_cls(root, params or adapter_cls.Params(), root.parent / "work")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = adapter.build_index()
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    return table, messages, adapter


# ----------------------------------------------------------------------------- ThyroidXL


def test_thyroidxl_png_layout_official_split_tirads_and_patient_ids(tmp_path):
    root = write_thyroidxl(tmp_path / "ThyroidXL")
    table, problems, adapter = index_of(ThyroidXL, root)
    assert problems == []
    assert len(table) == 13 * 2 and table["patient_id"].nunique() == 13
    assert table["patient_id"].str.fullmatch(r"\d{8}").all()  # zero-padded, not an int
    assert table.groupby("split")["patient_id"].nunique().to_dict() == {"test": 3, "train": 10}
    first = table.iloc[0]
    assert first["sample_id"].startswith(first["patient_id"] + "_")
    info = json.loads((root / "stats" / "id2info_eng.json").read_text())
    expected = {pid: int(rec["nodule_1"]["TIRADS"]) for pid, rec in info.items()}  # str or int in the file
    assert (table["tirads"].astype(int) == table["patient_id"].map(expected)).all()
    assert ((table["pathology"] == 1) == (table["tirads"] == 5)).all()  # conclusion 1 -> malignant
    assert adapter.load_mask(first).dtype == bool and adapter.load_mask(first).any()


def test_thyroidxl_split_lists_win_over_folders_and_defects_warn(tmp_path):
    root = write_thyroidxl(tmp_path / "ThyroidXL")
    info = json.loads((root / "stats" / "id2info_eng.json").read_text())
    moved = next(p for p in (root / "train" / "images").iterdir())
    moved.rename(root / "test" / "images" / moved.name)
    (root / "train" / "masks" / moved.name).rename(root / "test" / "masks" / moved.name)
    patient = moved.name.split("_")[0]
    info[patient]["nodule_1"]["TIRADS"] = None
    (root / "stats" / "id2info_eng.json").write_text(json.dumps(info))
    orphan = next((root / "train" / "masks").iterdir())
    orphan.unlink()
    table, problems, _ = index_of(ThyroidXL, root)
    assert set(table.loc[table["patient_id"] == patient, "split"]) == {"train"}  # the official list wins
    assert any(str(moved.name) in p and "official train split" in p for p in problems)
    assert any(f"{orphan.name}: no mask" in p.replace(str(root / "train" / "images") + "/", "") for p in problems)
    assert table.loc[table["patient_id"] == patient, "tirads"].isna().all()
    assert any("no valid nodule_1.TIRADS" in p for p in problems)


def test_thyroidxl_coco_layout(tmp_path):
    root = tmp_path / "old"
    src = write_thyroidxl(tmp_path / "new", per_class=1, test_patients=1)
    info = json.loads((src / "stats" / "id2info_eng.json").read_text())
    for split in ("train", "test"):
        names = sorted(p.name for p in (src / split / "images").iterdir())
        for kind in ("images", "masks"):
            (root / split / kind).mkdir(parents=True)
            for name in names:
                (root / split / kind / name).write_bytes((src / split / kind / name).read_bytes())
        coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
                "annotations": [{"id": i, "image_id": i, "category_id": 2 if info[n[:8]]["conclusion"] == 1 else 1}
                                for i, n in enumerate(names)],
                "categories": [{"id": 1, "name": "benign"}, {"id": 2, "name": "malignant"}]}
        (root / split / f"{split}_annotations.json").write_text(json.dumps(coco))
    table, problems, _ = index_of(ThyroidXL, root)
    assert len(table) == 12 and table["tirads"].isna().all()
    assert any("TI-RADS missing for every image" in p for p in problems)
    assert ((table["pathology"] == 1) == table["patient_id"].map(lambda p: info[p]["conclusion"] == 1)).all()
    # root-level files whose `info` holds the patient records bring TI-RADS back
    (root / "train_annotations.json").write_text(json.dumps({"info": info, "images": []}))
    table, problems, _ = index_of(ThyroidXL, root)
    assert table["tirads"].notna().all() and not problems


def test_a_folder_that_is_not_thyroidxl_fails_with_expected_and_found(tmp_path):
    write_tn3k(tmp_path / "tn3k")
    with pytest.raises(DataError, match=r"not a ThyroidXL folder: expected train/images/.*found label4test.csv"):
        index_of(ThyroidXL, tmp_path / "tn3k")


# ----------------------------------------------------------------------------- AIMI


def test_aimi_frames_grouped_by_clip_decoded_subsampled_and_read_lazily(tmp_path):
    root, images = write_aimi(tmp_path / "aimi")
    table, problems, adapter = index_of(AIMI, root, AIMIParams(every=2))
    assert problems == []
    assert table["clip_id"].tolist() == ["129_"] * 2 + ["1_"] * 2 + ["7_"]  # frames 1,3 | 1,3 | 1
    assert table["frame"].tolist() == [1, 3, 1, 3, 1]
    assert (table["patient_id"] == table["clip_id"]).all()  # annot_id: the finest grouping released
    assert table["tirads"].tolist() == [4, 4, 2, 2, 3] and table["pathology"].tolist() == [1, 1, 0, 0, 0]
    row = table.iloc[1]  # clip 129_, frame 3: stored 2nd (frames are stored 4, 3, 2, 1)
    np.testing.assert_array_equal(adapter.load_image(row), images[1])
    with h5py.File(root / "dataset.hdf5") as f:
        np.testing.assert_array_equal(adapter.load_mask(row), f["mask"][1] > 0)
    full, _, _ = index_of(AIMI, root)
    assert len(full) == 9 and full["sample_id"].is_unique


def test_aimi_defects_warn_and_a_wrong_folder_fails(tmp_path):
    root, _ = write_aimi(tmp_path / "aimi")
    meta = pd.read_csv(root / "metadata.csv", dtype={"annot_id": str})
    meta.loc[meta["annot_id"] == "7_", "annot_id"] = "8_"  # 7_ loses its row; 8_ has no frames
    meta.loc[meta["annot_id"] == "1_", "ti-rads_level"] = 9
    meta.to_csv(root / "metadata.csv", index=False)
    table, problems, _ = index_of(AIMI, root)
    assert any("annot_id '7_' has no row in metadata.csv" in p for p in problems)
    assert any("annot_id '8_' has no frame" in p for p in problems)
    assert any("ti-rads_level 9" in p for p in problems)
    assert table.loc[table["clip_id"] != "129_", "tirads"].isna().all()
    with h5py.File(root / "dataset.hdf5", "a") as f:
        del f["frame_num"]
    with pytest.raises(DataError, match=r"dataset.hdf5: missing dataset\(s\) frame_num"):
        index_of(AIMI, root)
    with pytest.raises(DataError, match=r"not a Stanford AIMI cine-clip folder: expected dataset.hdf5 and metadata.csv; found"):
        index_of(AIMI, write_tn3k(tmp_path / "tn3k"))


# ----------------------------------------------------------------------------- DDTI


@pytest.mark.parametrize("layout", ["sub", "flat"])
def test_ddti_fixture_defects_masks_and_duplicate_groups(tmp_path, layout):
    root = write_ddti(tmp_path / "ddti", layout)
    table, problems, adapter = index_of(DDTI, root, DDTIParams())
    assert table["sample_id"].tolist() == ["1_1", "1_2", "2_1", "3_2", "5_1", "7_1"]
    assert table.set_index("sample_id")["outline"].to_dict()["2_1"] == "truncated"
    assert table["tirads"].tolist()[:3] == [4, 4, 2] and pd.isna(table["tirads"].iloc[3])
    assert table["ddti_tirads"].tolist() == ["4b", "4b", "2", "", "5", "4a"]
    # the byte-identical image makes cases 5 and 7 one group
    assert table.set_index("sample_id")["patient_id"].to_dict() == {"1_1": "1", "1_2": "1", "2_1": "2", "3_2": "3",
                                                                     "5_1": "5", "7_1": "5"}
    assert len(problems) == 3
    assert any("2.xml (image 1): <svg> is cut off" in p and "salvaged 2 outline(s)" in p for p in problems)
    assert any("3.xml (image 1): empty <svg>" in p for p in problems)
    assert any("3.xml (image 2): ignored 1 region(s)" in p for p in problems)
    square = adapter.load_mask(table.iloc[0])
    assert square.shape == (60, 90) and square[10:31, 10:41].all() and square.sum() == 21 * 31
    both = adapter.load_mask(table.iloc[1])
    assert (both >= square).all() and both.sum() > square.sum()
    assert adapter.load_mask(table.iloc[2]).sum() > 21 * 31  # the salvaged second outline adds to the square
    six, _, _ = index_of(DDTI, root, DDTIParams(scale="ddti6"))
    assert six["tirads"].tolist()[:3] == [4, 4, 1]  # 4b is the 4th of 2,3,4a,4b,4c,5
    assert validate_index(six, "ddti", 6)["label"].tolist()[:3] == [3, 3, 0]


def test_ddti_not_a_ddti_folder(tmp_path):
    root, _ = write_aimi(tmp_path / "aimi")
    with pytest.raises(DataError, match=r"not a DDTI folder: expected N.xml and N_M.jpg .*found dataset.hdf5, metadata.csv"):
        index_of(DDTI, root, DDTIParams())


@needs_ddti
def test_ddti_real_release_counts_agree_with_source_md():
    table, problems, adapter = index_of(DDTI, REAL_DDTI, DDTIParams())
    # SOURCE.md: 390 cases / 480 images; 6 empty <svg> are left out, 8 truncated are salvaged
    assert len(table) == 474 and (table["outline"] == "complete").sum() == 466 and (table["outline"] == "truncated").sum() == 8
    per_category = table["ddti_tirads"].value_counts().to_dict()
    assert per_category == {"4a": 96, "4b": 79, "4c": 68 - 1, "5": 45, "2": 42, "3": 19, "": 131 - 5}
    assert table.drop_duplicates("case").groupby("ddti_tirads").size().to_dict() == {
        "": 92 - 2, "2": 38, "3": 14, "4a": 85, "4b": 75, "4c": 56, "5": 30}  # 120 and 389 only had the empty image
    assert sum("<svg> is cut off" in p for p in problems) == 8 and sum("empty <svg>" in p for p in problems) == 6
    ignored = [int(p.split("ignored ")[1].split()[0]) for p in problems if "ignored" in p]
    assert len(ignored) == 6 and sum(ignored) == 8  # 8 arrow regions: 337 (x3), 358, 362, 378, 384, 399
    groups = table.groupby("patient_id")["case"].agg(lambda c: sorted(set(c), key=int))
    assert groups["150"] == ["150", "233", "323", "326", "349"] and groups["353"] == ["353", "396"]
    assert table["patient_id"].nunique() == 388 - 5
    labelled = validate_index(table, "ddti")
    assert labelled["tirads"].value_counts().to_dict() == {4: 96 + 79 + 67, 5: 45, 2: 42, 3: 19}


@needs_ddti
def test_ddti_real_masks_match_an_independent_point_in_polygon_fill():
    case = parse_case(REAL_DDTI / "xml" / "2.xml")
    [polygon] = case.marks[0].polygons
    ours = rasterize([polygon], 560, 360)
    yy, xx = np.mgrid[0:360, 0:560]
    theirs = MplPath(np.array(polygon)).contains_points(np.c_[xx.ravel(), yy.ravel()]).reshape(360, 560)
    iou = (ours & theirs).sum() / (ours | theirs).sum()
    assert iou > 0.97 and 2000 < ours.sum() < 560 * 360 // 2
    truncated = parse_case(REAL_DDTI / "xml" / "54.xml").marks[0]
    assert truncated.outline == "truncated" and all(len(p) >= 3 for p in truncated.polygons)


# ----------------------------------------------------------------------------- TN3K


def test_tn3k_jpeg_masks_thresholded_labels_and_modes(tmp_path):
    root = write_tn3k(tmp_path / "tn3k")
    (root / "trainval-mask" / "0005.jpg").unlink()
    table, problems, adapter = index_of(TN3K, root, TN3KParams())
    assert problems == [f"{root / 'trainval-image' / '0005.jpg'}: no mask in {root / 'trainval-mask'}; left out"]
    assert table.groupby("split").size().to_dict() == {"test": 2, "train": 5}
    assert table["tirads"].isna().all() and adapter.class_names == ("TR1", "TR2", "TR3", "TR4", "TR5")
    assert table["pathology"].tolist() == [0, 1, 0, 1, 0, 0, 1]  # header row and "1.0" tolerated
    assert table["patient_id"].is_unique  # no patient ids in TN3K: every image its own group
    mask = adapter.load_mask(table.iloc[0])
    assert set(np.unique(mask)) == {False, True}
    rng = np.random.default_rng(4)
    _, drawn = _pair(rng, (44, 60))
    assert (mask == (drawn > 0)).mean() > 0.98  # the lossy JPEG mask, thresholded, is the drawn one
    binary, _, adapter = index_of(TN3K, root, TN3KParams(labels="pathology"))
    assert adapter.class_names == ("benign", "malignant")
    assert validate_index(binary, "tn3k", 2)["label"].tolist() == [0, 1, 0, 1, 0, 0, 1]


# ----------------------------------------------------------------------------- bench data check


def test_data_check_summarises_and_lists_every_problem(tmp_path):
    root = write_ddti(tmp_path / "ddti")
    report = check_dataset("ddti", root)
    assert report.ok and report.images_read == 6 and report.sizes == {(60, 90): 6}
    text = format_report(report)
    assert "6 images, 4 patients" in text and "90x60: 6" in text and "3 warnings" in text
    assert "OK: usable" in text
    counts = text.split("per class:")[1]
    assert [line.split()[:2] for line in counts.splitlines() if line.startswith(("TR2", "TR4", "missing"))] == [
        ["TR2", "1"], ["TR4", "3"], ["missing", "1"]]
    # a mask of the wrong size is an error naming the sample; the CLI exits with 1
    thy = write_thyroidxl(tmp_path / "thy", per_class=1, test_patients=1)
    bad = next((thy / "test" / "masks").iterdir())
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(bad)
    result = CliRunner().invoke(main, ["data", "check", "thyroidxl", "--data-root", str(thy)])
    assert result.exit_code == 1
    assert f"sample {bad.stem}: image (48, 64) and mask (10, 10) differ in size" in result.output
    assert "12 images, 6 patients" in result.output and "NOT USABLE" in result.output
    result = CliRunner().invoke(main, ["data", "check", "aimi", "--data-root", str(thy)])
    assert result.exit_code == 1 and "not a Stanford AIMI cine-clip folder" in result.output


# ----------------------------------------------------------------------------- external evaluation


def test_parse_external_forms_and_errors(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    specs = parse_external([f"aimi={a},ddti:scale=ddti6@{b}", "synthetic:patients=6,size=64"])
    assert [(s.spec, s.root) for s in specs] == [("aimi", str(a)), ("ddti:scale=ddti6", str(b)),
                                                 ("synthetic:patients=6,size=64", None)]
    with pytest.raises(ConfigError, match="more than once"):
        parse_external(f"ddti={a},ddti:scale=ddti6@{b}")
    with pytest.raises(ConfigError, match="aimi needs its folder"):
        parse_external("aimi")
    with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
        parse_external("nope")


def test_external_sets_are_part_of_the_config_hash():
    def spec(external=()):
        return RunSpec(resolve("vanilla"), "thyroidxl", None, 0, 0, 3, 0, TrainConfig(), external)

    assert "external" not in spec().config()  # runs without external sets keep their old hash
    assert spec(("ddti",)).config_hash() != spec().config_hash()
    assert spec(("aimi", "ddti")).config_hash() == spec(("ddti", "aimi")).config_hash()
    assert spec(("ddti:scale=ddti6",)).config_hash() != spec(("ddti",)).config_hash()


def test_external_identical_to_training_images_is_leakage(tmp_path):
    thy = write_thyroidxl(tmp_path / "thy", per_class=2, test_patients=1, images=1)
    copy = tmp_path / "copy"
    for kind in ("images", "masks"):
        (copy / kind).mkdir(parents=True)
        for p in sorted((thy / "train" / kind).iterdir())[:2]:
            (copy / kind / p.name).write_bytes(p.read_bytes())
    pd.DataFrame({"sample_id": [p.stem for p in sorted((copy / "images").iterdir())], "tirads": [1, 2]}).to_csv(
        copy / "labels.csv", index=False)
    result = CliRunner().invoke(main, ["run", "--quick", "--methods", "vanilla", "--dataset", "thyroidxl", "--data-root",
                                       str(thy), "--folds", "2", "--external", f"folder={copy}", "--no-progress",
                                       "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 1
    assert "leakage: 2 image(s) of external set folder are identical to images of the training dataset thyroidxl" in result.output
    assert not all_runs(Workspace(tmp_path / "ws"))  # nothing trained, no run opened


TINY_RUN = ["--quick", "--methods", "vanilla", "--folds", "2", "--epochs", "1", "--iters", "3", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One workspace: DDTI (real) with a TN3K external set, and ThyroidXL with AIMI + DDTI external sets."""
    if not (REAL_DDTI / "xml").is_dir():
        pytest.skip(f"real DDTI not found at {REAL_DDTI}")
    tmp = tmp_path_factory.mktemp("external")
    ws = tmp / "ws"
    tn3k = write_tn3k(tmp / "tn3k")
    thy = write_thyroidxl(tmp / "thyroidxl", per_class=2, test_patients=3, images=1)
    aimi, _ = write_aimi(tmp / "aimi")
    out = {}
    for key, args in (("ddti", ["--dataset", "ddti", "--data-root", str(REAL_DDTI), "--external", f"tn3k={tn3k}"]),
                      ("thyroidxl", ["--dataset", "thyroidxl", "--data-root", str(thy), "--only-folds", "0",
                                     "--external", f"aimi={aimi},ddti={REAL_DDTI}"])):
        result = CliRunner().invoke(main, ["run", *TINY_RUN, *args, "--workspace", str(ws)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        out[key] = result.output
    out["ws"] = Workspace(ws)
    out["runs"] = {(r.data.tags["dataset"], r.data.tags["fold"]): r for r in all_runs(out["ws"])}
    return out


def _artifact(ws: Workspace, run, name: str, dest: Path) -> pd.DataFrame:
    return pd.read_csv(ws.client.download_artifacts(run.info.run_id, name, str(dest)), dtype={"sample_id": str})


@pytest.mark.slow
def test_ddti_run_no_case_in_two_folds(runs, tmp_path):
    ws = runs["ws"]
    assert {k for k in runs["runs"] if k[0] == "ddti"} == {("ddti", "0"), ("ddti", "1")}
    folds = pd.read_csv(next(ws.data_dir.glob("ddti-*/folds-k2-s0.csv")), dtype={"sample_id": str})
    index = pd.read_csv(next(ws.data_dir.glob("ddti-*/index.csv")), dtype={"sample_id": str, "case": str, "patient_id": str})
    merged = index.merge(folds, on="sample_id")
    assert len(merged) == 474 and set(merged["fold"]) == {0, 1}
    assert merged.groupby("case")["fold"].nunique().max() == 1
    assert merged.groupby("patient_id")["fold"].nunique().max() == 1  # duplicate-image groups too
    assert merged.loc[merged["case"].isin(["150", "233", "323", "326", "349"]), "fold"].nunique() == 1
    held = [_artifact(ws, runs["runs"][("ddti", str(k))], "predictions/val.csv", tmp_path / str(k)) for k in (0, 1)]
    cases = [set(h["sample_id"].str.split("_").str[0]) for h in held]
    assert not cases[0] & cases[1] and len(held[0]) + len(held[1]) == 474


@pytest.mark.slow
def test_segmentation_only_external_set_is_reported_and_scored_without_classes(runs, tmp_path):
    assert "external tn3k: segmentation only: no image has a class label" in runs["ddti"]
    assert "external/tn3k metrics" in runs["ddti"]
    run = runs["runs"][("ddti", "0")]
    metrics = run.data.metrics
    assert 0 <= metrics["external/tn3k/dice"] <= 1 and metrics["external/tn3k/n_seg"] == 8
    assert "external/tn3k/f1" not in metrics and metrics["external/tn3k/n_cls"] == 0
    assert run.data.tags["external.tn3k.labels"].startswith("segmentation only")
    assert run.data.params["data.external"] == "tn3k"
    table = _artifact(runs["ws"], run, "predictions/external_tn3k.csv", tmp_path)
    assert len(table) == 8 and "pred" not in table and (table["label"] == -1).all()
    assert table["dice"].mean() == pytest.approx(metrics["external/tn3k/dice"], abs=1e-5)


@pytest.mark.slow
def test_thyroidxl_with_aimi_and_ddti_external_sets(runs, tmp_path):
    assert "external aimi: segmentation + classification (TR1/TR2/TR3/TR4/TR5; 9 of 9 images labelled)" in runs["thyroidxl"]
    assert "external ddti: segmentation + classification (TR1/TR2/TR3/TR4/TR5; 348 of 474 images labelled)" in runs["thyroidxl"]
    assert {k for k in runs["runs"] if k[0] == "thyroidxl"} == {("thyroidxl", "0")}  # one fold keeps the test quick
    for fold in ("0",):
        run = runs["runs"][("thyroidxl", fold)]
        m = run.data.metrics
        assert m["test/n_seg"] == 3 and "test/f1" in m  # the official test split: 3 patients x 1 image
        assert m["external/aimi/n_seg"] == 9 and m["external/aimi/n_cls"] == 9 and "external/aimi/kappa" in m
        assert m["external/ddti/n_seg"] == 474 and m["external/ddti/n_cls"] == 348
        assert run.data.tags["external.ddti.labels"].startswith("segmentation + classification")
    table = _artifact(runs["ws"], run, "predictions/external_ddti.csv", tmp_path)
    assert len(table) == 474 and set(table["label"]) == {-1, 1, 2, 3, 4} and "prob_4" in table
    assert table["dice"].mean() == pytest.approx(m["external/ddti/dice"], abs=1e-5)
    assert run.data.params["data.external"] == "aimi,ddti"
    config = json.loads(Path(runs["ws"].client.download_artifacts(run.info.run_id, "config.json", str(tmp_path))).read_text())
    assert config["external"] == ["aimi", "ddti"]  # hashed with the rest of the configuration
