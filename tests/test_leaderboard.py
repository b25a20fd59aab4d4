"""`bench leaderboard`: statistics from MLflow runs with known values, determinism, bad input, the HTML page.

Most tests write runs with MlflowClient (tags, final metrics from bench.metrics.summarize of
known per-sample predictions, the predictions CSVs, per-epoch history), as the runner does;
one test reads a real tiny `bench run`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from bench.leaderboard.analysis import references
from bench.leaderboard.build import build
from click.testing import CliRunner
from mlflow.entities import Metric
from scipy import stats
from statsmodels.stats.multitest import multipletests

from bench import stats as S
from bench.cli import main
from bench.errors import ConfigError
from bench.metrics import summarize
from bench.tracking import RunLogger, Workspace

DATASET = "thyroidxl"  # the reference rows of the RLAR paper attach to this dataset's tables
FOLDS, SEEDS, PATIENTS = 3, 2, 30
# method -> (family, segmentation quality or None, probability of a correct class or None)
METHODS = {"vanilla": ("mtl", 0.70, 0.55), "pcgrad": ("gradient", 0.78, 0.65),
           "st-unet": ("single-task", 0.74, None), "st-effnet": ("single-task", None, 0.50)}


@cache
def _predictions(method: str, fold: int, seed: int, eval_set: str) -> pd.DataFrame:
    _, seg, cls = METHODS[method]
    rng = np.random.default_rng(zlib.crc32(f"{method}|{fold}|{seed}|{eval_set}".encode()))
    patients = [p for p in range(PATIENTS) if eval_set != "val" or p % FOLDS == fold]
    rows = pd.DataFrame({"sample_id": [f"p{p:03d}_i{i}" for p in patients for i in range(2)],
                         "patient_id": [f"p{p:03d}" for p in patients for _ in range(2)]})
    rows.insert(2, "fold", fold)
    rows.insert(3, "seed", seed)
    label_rng = np.random.default_rng(1000 + len(rows))  # labels depend on the samples only
    rows["label"] = label_rng.integers(0, 5, len(rows))
    if cls is not None:
        rows["pred"] = np.where(rng.random(len(rows)) < cls, rows["label"], rng.integers(0, 5, len(rows)))
        probs = rng.dirichlet(np.ones(5), len(rows)) * 0.5
        probs[np.arange(len(rows)), rows["pred"]] += 0.5
        for c in range(5):
            rows[f"prob_{c}"] = probs[:, c]
    if seg is not None:
        rows["dice"] = np.clip(seg + rng.normal(0, 0.08, len(rows)), 0, 1)
        rows["iou"] = rows["dice"] / (2 - rows["dice"])
        rows["hd95"] = np.clip(40 * (1 - rows["dice"]) + rng.normal(0, 2, len(rows)), 0, None)
    return rows


def predictions(method: str, fold: int, seed: int, eval_set: str) -> pd.DataFrame:
    return _predictions(method, fold, seed, eval_set).copy()


def write_run(ws: Workspace, exp_id: str, tags: dict[str, str], sets: dict[str, pd.DataFrame], status: str = "FINISHED",
              start_time: int | None = None) -> str:
    run_id = ws.client.create_run(exp_id, start_time=start_time, tags=tags).info.run_id
    log = RunLogger(ws, run_id)
    history = [Metric(k, v, 0, epoch) for epoch in range(3) for k, v in
               {"train/loss_seg": 1.0 / (epoch + 1), "monitor/dice": 0.5 + 0.1 * epoch, "monitor/score": 0.4 + 0.1 * epoch}.items()]
    final = [Metric(f"{name}/{k}", v, 0, 0) for name, table in sets.items() for k, v in summarize(table, 5).items() if np.isfinite(v)]
    ws.client.log_batch(run_id, metrics=history + final)  # one write: the store is slow under load
    with tempfile.TemporaryDirectory() as tmp:
        for name, table in sets.items():
            path = Path(tmp) / f"{name.replace('/', '_')}.csv"
            table.to_csv(path, index=False)
            log.artifact(path, "predictions")
    log.finish(status)
    return run_id


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An initialised, empty MLflow SQLite store: copying it skips MLflow's schema migrations (~15 s)."""
    ws = Workspace(tmp_path_factory.mktemp("template"))
    ws.client.search_experiments()
    return ws.root / "mlflow.db"


def new_workspace(root: Path, store: Path) -> Workspace:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(store, root / "mlflow.db")
    return Workspace(root)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, empty_store) -> Workspace:
    return populate(new_workspace(tmp_path_factory.mktemp("ws"), empty_store))


def populate(ws: Workspace) -> Workspace:
    """4 methods x 3 folds x 2 seeds on val (2 methods on external/aimi) + 4 runs to leave out."""
    exp = ws.experiment_id()
    for method, (family, _, _) in METHODS.items():
        for fold in range(FOLDS):
            for seed in range(SEEDS):
                sets = {"val": predictions(method, fold, seed, "val")}
                if method in ("vanilla", "pcgrad"):
                    sets["external/aimi"] = predictions(method, fold, seed, "external/aimi")
                write_run(ws, exp, {"method": method, "family": family, "dataset": DATASET, "fold": str(fold),
                                    "seed": str(seed), "config_hash": "c0ffee"}, sets)
    outlier = predictions("vanilla", 0, 0, "val").assign(dice=0.0, iou=0.0, hd95=90.0)
    base = {"method": "vanilla", "family": "mtl", "dataset": DATASET, "fold": "0", "seed": "5"}
    write_run(ws, exp, base, {"val": outlier}, status="RUNNING")
    write_run(ws, exp, {**base, "kind": "trial"}, {"val": outlier})
    write_run(ws, exp, {k: v for k, v in base.items() if k != "dataset"}, {"val": outlier})
    write_run(ws, exp, {**base, "fold": "2", "seed": "1"}, {"val": outlier}, start_time=1)  # older than the real one
    return ws


@pytest.fixture(scope="module")
def built(workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "board"
    return build(workspace, out, n_resamples=300, seed=3)


def section(built, eval_set: str = "val"):
    return next(s for s in built.sections if s.eval_set == eval_set)


def expected(metric: str, eval_set: str = "val") -> pd.DataFrame:
    """(fold, seed) x method values of a metric, straight from the generated predictions."""
    values = {m: {(f, s): _summary(m, f, s, eval_set).get(metric, np.nan) for f in range(FOLDS) for s in range(SEEDS)}
              for m in METHODS}
    return pd.DataFrame(values).dropna(axis=1, how="all")


@cache
def _summary(method: str, fold: int, seed: int, eval_set: str) -> dict[str, float]:
    return summarize(_predictions(method, fold, seed, eval_set), 5)


def test_summary_and_results_csv_hold_the_logged_numbers(built):
    sec = section(built)
    dice = expected("dice")
    for method in dice:
        assert sec.summary.loc[method, ("dice", "mean")] == pytest.approx(dice[method].mean())
        assert sec.summary.loc[method, ("dice", "std")] == pytest.approx(dice[method].std(ddof=1))
        assert sec.summary.loc[method, ("dice", "n")] == FOLDS * SEEDS
    tidy = pd.read_csv(built.out / "results.csv")
    assert set(tidy["method"]) == set(METHODS) and tidy["run_id"].nunique() == len(METHODS) * FOLDS * SEEDS
    row = tidy[(tidy["method"] == "pcgrad") & (tidy["fold"] == 1) & (tidy["seed"] == 0) & (tidy["metric"] == "f1") & (tidy["eval_set"] == "val")]
    assert row["value"].item() == pytest.approx(expected("f1").loc[(1, 0), "pcgrad"])


def test_ranks_friedman_and_cd_matrix_equal_scipy_and_scikit_posthocs(built):
    sec = section(built)
    dice = expected("dice")[sec.pairwise["dice"].columns]
    ref = stats.friedmanchisquare(*dice.to_numpy().T)
    assert sec.friedman["dice"].statistic == pytest.approx(ref.statistic)
    assert sec.friedman["dice"].pvalue == pytest.approx(ref.pvalue)
    ranks = pd.DataFrame(stats.rankdata(-dice.to_numpy(), axis=1), columns=dice.columns).mean()
    assert sec.mean_ranks["dice"].to_dict() == pytest.approx(ranks.to_dict())
    hd95 = expected("hd95")[dice.columns]  # lower is better: ranked ascending
    assert sec.mean_ranks["hd95"].to_dict() == pytest.approx(
        pd.DataFrame(stats.rankdata(hd95.to_numpy(), axis=1), columns=hd95.columns).mean().to_dict())
    a, b = "pcgrad", "st-unet"
    raw = [stats.wilcoxon(dice[x], dice[y]).pvalue for x, y in [(c1, c2) for i, c1 in enumerate(dice) for c2 in list(dice)[i + 1:]]]
    pairs = [(c1, c2) for i, c1 in enumerate(dice) for c2 in list(dice)[i + 1:]]
    holm = dict(zip(pairs, multipletests(raw, method="holm")[1], strict=True))
    assert sec.pairwise["dice"].loc[a, b] == pytest.approx(holm.get((a, b), holm.get((b, a))))
    assert "f1" in sec.friedman and isinstance(sec.friedman["f1"], S.Friedman)  # vanilla, pcgrad, st-effnet


def test_tests_against_the_baseline_equal_scipy_with_holm_and_the_paired_bootstrap(built, workspace):
    sec = section(built)
    assert sec.baseline == "vanilla"
    comps = {(c.method, c.metric): c for c in sec.comparisons}
    assert set(comps) == {("pcgrad", "dice"), ("pcgrad", "hd95"), ("pcgrad", "f1"), ("st-unet", "dice"),
                          ("st-unet", "hd95"), ("st-effnet", "f1")}
    raw = {}
    for (method, metric), c in comps.items():
        table = expected(metric)
        ref = stats.wilcoxon(table[method], table["vanilla"])
        assert c.pvalue == pytest.approx(ref.pvalue) and c.n_blocks == FOLDS * SEEDS
        assert c.mean_diff == pytest.approx((table[method] - table["vanilla"]).mean())
        raw[(method, metric)] = ref.pvalue
    keys = sorted(raw)
    for key, adjusted in zip(keys, multipletests([raw[k] for k in keys], method="holm")[1], strict=True):
        assert comps[key].p_holm == pytest.approx(adjusted)
    # the CI pairs the same samples of the same (fold, seed) runs and resamples patients
    blocks = [(f, s) for f in range(FOLDS) for s in range(SEEDS)]
    a = pd.concat([predictions("pcgrad", f, s, "val") for f, s in blocks]).sort_values(["fold", "seed", "sample_id"], ignore_index=True)
    b = pd.concat([predictions("vanilla", f, s, "val") for f, s in blocks]).sort_values(["fold", "seed", "sample_id"], ignore_index=True)
    direct = S.bootstrap_difference("dice", a, b, a["patient_id"].to_numpy(), n_resamples=300, seed=3)
    assert comps[("pcgrad", "dice")].interval == direct
    assert direct.n_clusters == PATIENTS and direct.low < direct.estimate < direct.high


def test_delta_m_against_the_single_task_runs(built):
    sec = section(built)
    means = {m: expected(m).mean() for m in ("dice", "iou", "hd95", "precision", "recall", "f1")}
    seg = np.mean([(means["dice"]["pcgrad"] - means["dice"]["st-unet"]) / means["dice"]["st-unet"],
                   (means["iou"]["pcgrad"] - means["iou"]["st-unet"]) / means["iou"]["st-unet"],
                   -(means["hd95"]["pcgrad"] - means["hd95"]["st-unet"]) / means["hd95"]["st-unet"]])
    cls = np.mean([(means[m]["pcgrad"] - means[m]["st-effnet"]) / means[m]["st-effnet"] for m in ("precision", "recall", "f1")])
    assert sec.delta_m["pcgrad"] == pytest.approx(100 * (seg + cls) / 2)
    assert sec.delta_refs == {"dice": "st-unet", "iou": "st-unet", "hd95": "st-unet",
                              "precision": "st-effnet", "recall": "st-effnet", "f1": "st-effnet"}


def test_left_out_runs_are_listed_not_averaged(built, workspace):
    page = (built.out / "LEADERBOARD.md").read_text()
    assert "status RUNNING, not FINISHED" in page and "tuning trial (tag kind=trial)" in page and "missing tag(s) dataset" in page
    assert "superseded by the newer run" in page
    assert built.n_excluded == 4 and built.n_runs == len(METHODS) * FOLDS * SEEDS
    assert section(built).summary.loc["vanilla", ("dice", "n")] == FOLDS * SEEDS  # the outlier runs are not in the mean


def test_reference_rows_are_marked_and_never_ranked_or_tested(built):
    ref = references()
    assert set(ref["row_type"]) == {"reference"}
    rlar = ref[(ref["paper"] == "RLAR paper") & (ref["method"] == "+RLAR") & (ref["eval_set"] == "external/aimi")]
    assert rlar.set_index("metric")["mean"].to_dict() == {"precision": "0.4167", "recall": "0.4033", "f1": "0.3700",
                                                          "dice": "0.6277", "iou": "0.4990", "hd95": "205.78"}
    ms = ref[(ref["table"] == "Table 1") & (ref["method"] == "MS-MTL + Intra and Inter")].set_index("metric")["mean"]
    assert ms["dice"] == "0.8084" and ms["auc"] == "0.9608"
    assert ref.groupby("table")["method"].nunique().to_dict() == {
        "Table 1": 21, "Table 1 (classification)": 6, "Table 2 (segmentation)": 4,
        "Table 3 (RLAR layer ablation, classification)": 4, "Table 4 (RLAR layer ablation, segmentation)": 4}
    page = (built.out / "index.html").read_text()
    assert '<tr class="reference"><td>+RLAR</td><td>RLAR paper, Tables 1, 2</td>' in page
    for sec in built.sections:
        assert all(not m.startswith("+") for m in sec.methods)
    external = section(built, "external/aimi")
    assert external.methods == ["pcgrad", "vanilla"] and "0.4033\u00a0±\u00a00.0208" in page


def test_regenerating_gives_identical_files(built, workspace, tmp_path):
    other = shutil.copytree(built.out, tmp_path / "first")
    build(workspace, built.out, n_resamples=300, seed=3)  # again, over the previous output
    files = sorted(p.relative_to(built.out) for p in built.out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".png"]) >= 5
    for f in files:
        assert (built.out / f).read_bytes() == (other / f).read_bytes(), f


def test_bad_input_names_what_is_missing(tmp_path, empty_store):
    with pytest.raises(ConfigError, match="no mlflow.db"):
        build(Workspace(tmp_path / "nothing"), tmp_path / "out")
    ws = new_workspace(tmp_path / "ws", empty_store)
    exp = ws.experiment_id()
    with pytest.raises(ConfigError, match="no runs in the workspace"):
        build(ws, tmp_path / "out")
    write_run(ws, exp, {"method": "vanilla", "fold": "0"}, {"val": predictions("vanilla", 0, 0, "val")})
    result = CliRunner().invoke(main, ["leaderboard", "--workspace", str(ws.root), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "no usable runs" in result.output and "missing tag(s) dataset, seed" in result.output
    assert not (tmp_path / "out").exists()  # nothing half-written
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="holds files the leaderboard did not write"):
        build(ws, mine)
    assert (mine / "notes.txt").read_text() == "keep"


@pytest.fixture(scope="module")
def tiny_real_run(tmp_path_factory, empty_store) -> Path:
    """One method, one fold, one seed of a real `bench run`: too few runs for any test."""
    root = new_workspace(tmp_path_factory.mktemp("real"), empty_store).root
    result = CliRunner().invoke(main, ["run", "--quick", "--methods", "vanilla", "--folds", "2", "--only-folds", "0",
                                       "--epochs", "2", "--iters", "2", "--no-progress", "--workspace", str(root)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root


def test_a_real_run_too_few_for_tests_says_why(tiny_real_run):
    result = CliRunner().invoke(main, ["leaderboard", "--workspace", str(tiny_real_run)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = tiny_real_run / "leaderboard"
    page = (out / "LEADERBOARD.md").read_text()
    assert "leaderboard of 1 runs" in result.output
    assert "dice: Friedman test absent — needs at least 3 methods, found 1" in page
    assert "Tests against the baseline absent — only one method on this dataset and set" in page
    assert "absent: no single-task baseline" in page
    curves = next((out / "figures").glob("*-curves.png"))
    assert curves.stat().st_size > 10_000  # drawn from the run's real per-epoch history
    tidy = pd.read_csv(out / "results.csv")
    assert tidy["fold"].unique().tolist() == [0] and "dice" in set(tidy["metric"])


# ------------------------------------------------------------------------------ the page in a browser
def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def browser(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--hide-scrollbars"]
    return subprocess.run([chromium(), *flags, *args], capture_output=True, text=True, timeout=120, check=False)  # type: ignore[list-item]


@pytest.mark.skipif(chromium() is None and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed (`apt-get install chromium`; CI installs it and runs this test)")
def test_the_html_page_opens_in_headless_chromium_with_table_and_figures(built, tmp_path):
    from PIL import Image as PILImage

    assert chromium() is not None, "CI is set but chromium is missing: .ci/run installs it"
    url = (built.out / "index.html").as_uri()
    html_text = (built.out / "index.html").read_text()
    assert "http://" not in html_text and "https://" not in html_text  # nothing to fetch: self-contained
    dom = browser("--dump-dom", url, profile=tmp_path / "p1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<table>") >= 4 and "pcgrad" in dom.stdout
    assert dom.stdout.count('<img src="data:image/png;base64,') == html_text.count("<img ")
    shot = tmp_path / "page.png"
    res = browser(f"--screenshot={shot}", "--window-size=1280,6000", url, profile=tmp_path / "p2")
    assert shot.exists(), res.stderr[-2000:]
    keep = os.environ.get("BENCH_SCREENSHOT")  # a path to keep the screenshot at, to look at it
    if keep:
        shutil.copy(shot, keep)
    image = np.asarray(PILImage.open(shot).convert("RGB")).astype(int)
    assert image.shape[:2] == (6000, 1280)
    assert image.std() > 20  # not a blank page
    # a figure was decoded and drawn: the first method's colour (#1f77b4) of the plots is on screen
    blue = (np.abs(image - np.array([31, 119, 180])).sum(axis=2) < 30).sum()
    assert blue > 50
