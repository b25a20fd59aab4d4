"""Bad input fails before training with a message naming what is wrong, and leaves nothing half-written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from click.testing import CliRunner
from PIL import Image

from bench.cli import main


def bench(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def make_folder(root: Path, n_patients: int = 10, labels=None) -> Path:
    """A valid `folder` dataset: one 48x64 image per patient, a square nodule, TI-RADS cycling 1..5."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_patients):
        image = rng.integers(0, 255, (48, 64), dtype=np.uint8)
        mask = np.zeros((48, 64), dtype=np.uint8)
        mask[10:30, 20:40] = 255
        Image.fromarray(image).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
        rows.append({"sample_id": f"s{i}", "patient_id": f"p{i}", "tirads": (labels or [1, 2, 3, 4, 5])[i % 5]})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def run_folder(root: Path, ws: Path, *extra: str) -> tuple[int, str]:
    return bench("run", "--quick", "--methods", "vanilla", "--dataset", "folder", "--data-root", str(root),
                 "--folds", "2", "--epochs", "1", "--iters", "1", "--no-progress", "--workspace", str(ws), *extra)


def leftovers(ws: Path) -> list[str]:
    """What an aborted run must not leave: cached arrays, temporary files, checkpoints, run folders."""
    found = [p for p in ws.rglob("*") if p.suffix in (".npy", ".pt", ".tmp") or p.name.startswith(".tmp")]
    found += list((ws / "runs").glob("*"))
    return sorted(str(p.relative_to(ws)) for p in found)


def test_unknown_method_lists_valid_names_and_touches_nothing(tmp_path):
    code, out = bench("run", "--methods", "vanila", "--workspace", str(tmp_path / "ws"))
    assert code != 0
    assert "unknown method 'vanila'" in out and "vanilla" in out and "st-unet" in out
    assert "Traceback" not in out
    assert not (tmp_path / "ws").exists()


def test_bad_method_parameter_names_method_parameter_and_range(tmp_path):
    code, out = bench("run", "--methods", "vanilla:w_cls=-1", "--workspace", str(tmp_path / "ws"))
    assert code != 0 and "vanilla" in out and "w_cls" in out and "[0.0, inf]" in out
    code, out = bench("run", "--methods", "vanilla:nope=1", "--workspace", str(tmp_path / "ws"))
    assert code != 0 and "nope" in out and "w_cls" in out  # the valid names are listed
    assert not (tmp_path / "ws").exists()


def test_unknown_dataset_lists_valid_names(tmp_path):
    code, out = bench("run", "--methods", "vanilla", "--dataset", "thyroid", "--workspace", str(tmp_path / "ws"))
    assert code != 0 and "unknown dataset 'thyroid'" in out and "synthetic" in out and "folder" in out


def test_corrupt_image_is_named_and_no_cache_is_left(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "images" / "s3.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    code, out = run_folder(root, tmp_path / "ws")
    assert code != 0 and "cannot read" in out and "s3.png" in out
    assert leftovers(tmp_path / "ws") == []


def test_missing_mask_is_named(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "masks" / "s7.png").unlink()
    code, out = run_folder(root, tmp_path / "ws")
    assert code != 0 and "s7" in out and "no mask" in out
    assert leftovers(tmp_path / "ws") == []


def test_empty_dataset_is_an_error_before_training(tmp_path):
    root = make_folder(tmp_path / "data", n_patients=0)
    pd.DataFrame(columns=["sample_id", "patient_id", "tirads"]).to_csv(root / "labels.csv", index=False)
    code, out = run_folder(root, tmp_path / "ws")
    assert code != 0 and "no images found" in out
    assert leftovers(tmp_path / "ws") == []


def test_a_fold_without_a_class_is_an_error_before_training(tmp_path):
    # TR5 on one patient only: one of the two folds cannot hold it
    root = make_folder(tmp_path / "data", labels=[1, 2, 3, 4, 1])
    labels = pd.read_csv(root / "labels.csv")
    labels.loc[labels["sample_id"] == "s9", "tirads"] = 5
    labels.to_csv(root / "labels.csv", index=False)
    code, out = run_folder(root, tmp_path / "ws")
    assert code != 0 and "has no sample of TR5" in out and "TR5: 1 patients" in out
    ws = tmp_path / "ws"
    assert not (ws / "runs").exists() and not (ws / "mlflow.db").exists()  # stopped before any run was made


def test_wrong_image_and_mask_sizes_are_named(tmp_path):
    root = make_folder(tmp_path / "data")
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(root / "masks" / "s2.png")
    code, out = run_folder(root, tmp_path / "ws")
    assert code != 0 and "s2" in out and "differ in size" in out
    assert leftovers(tmp_path / "ws") == []


def test_a_nan_loss_stops_the_run_marked_failed(tmp_path):
    root = make_folder(tmp_path / "data")
    code, out = run_folder(root, tmp_path / "ws", "--lr", "1e30", "--iters", "3")
    assert code != 0
    assert "non-finite loss" in out and "FAILED" in out
    from bench.tracking import Workspace, all_runs

    runs = all_runs(Workspace(tmp_path / "ws"))
    assert runs and {r.info.status for r in runs} == {"FAILED"}
    assert {r.data.tags["failure"] for r in runs} == {"nan_loss"}
