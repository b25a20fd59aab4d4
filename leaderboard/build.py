"""``bench leaderboard``: rebuild LEADERBOARD.md, results.csv, index.html and figures from MLflow.

Deterministic: runs, methods and metrics are sorted, the bootstrap is seeded, PNGs carry no
version or date, and nothing reads the clock, so building twice gives identical files.
Everything is written into a temporary folder first and moved into place at the end.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from bench.leaderboard import plots
from bench.leaderboard.analysis import PRIMARY, Section, analyse, references, references_for, slug
from bench.leaderboard.collect import Runs, collect
from bench.leaderboard.render import Block, Bullets, Heading, Image, Para, Table, to_html, to_markdown

from bench import stats as S
from bench.errors import ConfigError
from bench.tracking import Workspace

OUTPUTS = ("LEADERBOARD.md", "index.html", "results.csv", "reference.csv", "figures")
TITLE = "thyrobench leaderboard"


@dataclass(frozen=True)
class Built:
    out: Path
    sections: list[Section]
    n_runs: int
    n_excluded: int


def default_baseline() -> str:
    """The base a recipe uses when it names none (the registry's ``default=True`` base)."""
    from bench.method import METHODS

    METHODS.load()
    names = [n for n in METHODS.names() if METHODS.get(n).info.role == "base" and METHODS.get(n).info.default]
    return names[0] if names else ""


def build(ws: Workspace, out: Path, baseline: str | None = None, *, n_resamples: int = 2000, seed: int = 0) -> Built:
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS) if out.exists() else []
    if foreign:
        raise ConfigError(f"--out {out} holds files the leaderboard did not write ({', '.join(foreign[:5])}); choose an empty or new folder")
    baseline = baseline or default_baseline()
    runs = collect(ws)
    keys = runs.metrics[["dataset", "eval_set"]].drop_duplicates().sort_values(["dataset", "eval_set"], key=_set_order)
    sections = [analyse(runs, d, e, baseline, n_resamples=n_resamples, seed=seed) for d, e in keys.itertuples(index=False)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        root = Path(tmp)
        blocks = _page(runs, sections, baseline, root, n_resamples, seed)
        (root / "LEADERBOARD.md").write_text(to_markdown(blocks), encoding="utf-8")
        (root / "index.html").write_text(to_html(blocks, root, TITLE), encoding="utf-8")
        tidy = runs.metrics[["dataset", "eval_set", "method", "family", "fold", "seed", "run_id", "metric", "value"]]
        tidy.to_csv(root / "results.csv", index=False, float_format="%.10g", lineterminator="\n")
        references().to_csv(root / "reference.csv", index=False, lineterminator="\n")
        for name in OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        out.mkdir(exist_ok=True)
        for name in OUTPUTS:
            if (root / name).exists():
                (root / name).replace(out / name)
    return Built(out, sections, len(runs.run_ids()), len(runs.excluded))


def _set_order(col: pd.Series) -> pd.Series:
    if col.name != "eval_set":
        return col
    return col.map(lambda s: {"val": "0", "test": "1"}.get(s, "2" + s))


# ------------------------------------------------------------------------------ the page
def _page(runs: Runs, sections: list[Section], baseline: str, root: Path, n_resamples: int, seed: int) -> list[Block]:
    blocks: list[Block] = [Heading(1, TITLE)]
    datasets = sorted({s.dataset for s in sections})
    blocks.append(Para(f"Rebuilt from the MLflow store alone: {len(runs.run_ids())} finished runs on "
                       f"{len(datasets)} dataset(s); baseline for the tests: {baseline or '(none)'}."))
    blocks.append(Bullets([
        "Values: mean ± std over the (fold, seed) runs of each method, n = runs.",
        "Mean rank: methods ranked within each (fold, seed) block (1 = best, ties averaged), averaged over blocks; "
        "the 'mean rank' column averages that over the metrics the method has.",
        f"Primary metrics (omnibus test, CD diagram, tests against the baseline): {', '.join(PRIMARY)}. "
        "Blocks share training data, so the tests are approximate.",
        "Friedman χ² (scipy) with the Iman–Davenport F; CD diagrams join methods that pairwise Wilcoxon signed-rank "
        "tests with Holm correction (scikit-posthocs) do not separate at α = 0.05.",
        f"Against the baseline: Wilcoxon signed-rank over paired blocks, Holm over all comparisons of a section; "
        f"effect size r = matched-pairs rank-biserial correlation; Δ with a 95% percentile CI from a paired bootstrap "
        f"of the per-sample predictions that resamples patients ({n_resamples} resamples, seed {seed}), metrics pooled over runs.",
        "Δm%: mean over tasks of the mean signed relative change against the single-task runs (hd95 sign-flipped).",
        "Reference rows (grey, italic) are the papers' reported numbers on their own splits: never ranked or tested.",
    ]))
    if len(runs.excluded):
        blocks.append(Heading(2, "Runs left out"))
        ex = runs.excluded
        blocks.append(Table(["run", "method", "dataset", "fold", "seed", "status", "reason"],
                            [[r.run_id[:12], r.method, r.dataset, r.fold, r.seed, r.status, r.reason] for r in ex.itertuples()]))
    all_curves = runs.curves()
    for dataset in datasets:
        blocks.append(Heading(2, f"Dataset {dataset}"))
        for section in [s for s in sections if s.dataset == dataset]:
            blocks.extend(_section(section, root))
        curves = all_curves[all_curves["dataset"] == dataset]
        methods = next(s.methods for s in sections if s.dataset == dataset)
        fig = plots.training_curves(curves, methods)
        blocks.append(Heading(3, "Training curves (mean over runs per epoch)"))
        if isinstance(fig, S.Skipped):
            blocks.append(Para(f"No training curves: {fig.reason}.", muted=True))
        else:
            path = f"figures/{slug(dataset)}-curves.png"
            plots.save(fig, root / path)
            blocks.append(Image(path, f"training curves on {dataset}"))
    blocks.extend(_reference_blocks())
    return blocks


def _fmt(value: float, metric: str) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    return f"{value:.2f}" if S.lower_is_better(metric) else f"{value:.3f}"


def _p(value: float | None) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


PM = "\u00a0±\u00a0"  # no line break inside "mean ± std"


def _p_is(value: float) -> str:
    text = _p(value)
    return f"p {text[0]} {text[1:]}" if text.startswith("<") else f"p = {text}"


def _section(section: Section, root: Path) -> list[Block]:
    blocks: list[Block] = [Heading(3, f"{section.eval_set}")]
    headline = [m for m in section.metrics if any(m in ms for ms in S.TASK_METRICS.values())]
    others = [m for m in section.metrics if m not in headline]
    caption = f"{section.dataset}, {section.eval_set}: mean ± std over the (fold, seed) runs."
    blocks.append(_metric_table(section, headline or others, extra=True, caption=caption + " " + section.delta_note))
    if headline and others:
        blocks.append(_metric_table(section, others, extra=False, caption="Secondary metrics. " + caption))
    blocks.append(Heading(4, "Friedman test and critical-difference diagrams"))
    for metric in [m for m in PRIMARY if m in section.friedman]:
        f = section.friedman[metric]
        if isinstance(f, S.Skipped):
            blocks.append(Para(f"{metric}: Friedman test absent — {f.reason}.", muted=True))
        else:
            blocks.append(Para(f"{metric}: Friedman χ² = {f.statistic:.3f}, {_p_is(f.pvalue)}; Iman–Davenport F = "
                               f"{f.iman_davenport_f:.3f}, {_p_is(f.iman_davenport_p)} ({f.k} methods, {f.n} blocks)."))
        nem = section.nemenyi[metric]
        if isinstance(nem, S.Nemenyi):
            blocks.append(Para(f"{metric}: Nemenyi critical difference (classic Demšar reading) = {nem.critical_difference:.3f} "
                               f"mean-rank units at α = {nem.alpha}.", muted=True))
        fig = plots.cd_diagram(section, metric)
        if isinstance(fig, S.Skipped):
            blocks.append(Para(f"{metric}: no critical-difference diagram — {fig.reason}.", muted=True))
        else:
            path = f"figures/{section.slug}-cd-{metric}.png"
            plots.save(fig, root / path)
            blocks.append(Image(path, f"critical-difference diagram of {metric}"))
    blocks.append(Heading(4, f"Against the baseline {section.baseline}"))
    if isinstance(section.comparisons, S.Skipped):
        blocks.append(Para(f"Tests against the baseline absent — {section.comparisons.reason}.", muted=True))
    elif not section.comparisons:
        blocks.append(Para("No other method shares a primary metric with the baseline.", muted=True))
    else:
        rows = []
        for c in section.comparisons:
            iv = c.interval
            if isinstance(iv, S.Skipped):
                delta, ci = "–", f"absent: {iv.reason}"
            else:
                delta, ci = f"{iv.estimate:+.4f}", f"[{iv.low:+.4f}, {iv.high:+.4f}] ({iv.n_clusters} patients)"
            rows.append([c.method, c.metric, str(c.n_blocks), f"{c.mean_diff:+.4f}", delta, ci,
                         "–" if c.effect is None else f"{c.effect:+.2f}", _p(c.pvalue), _p(c.p_holm), c.note])
        blocks.append(Table(["method", "metric", "blocks", "mean Δ over runs", "Δ pooled", "95% CI (patient bootstrap)",
                             "effect r", "p (Wilcoxon)", "p (Holm)", "note"], rows,
                            caption="Δ = method − baseline (for hd95 negative is better). r > 0: the method is higher in most blocks."))
    blocks.append(Heading(4, "Run values per metric"))
    path = f"figures/{section.slug}-box.png"
    plots.save(plots.box_strip(section, section.metrics), root / path)
    blocks.append(Image(path, f"box and strip plots per metric, {section.dataset} {section.eval_set}"))
    return blocks


def _paper_metric_order(metric: str) -> tuple[int, str]:
    """dice, dice_benign, ..., iou, ..., hd95, then classification metrics as the papers list them."""
    order = ("dice", "iou", "hd95", "precision", "recall", "f1", "accuracy", "auc")
    base = metric.split("_")[0] if metric.split("_")[0] in order else metric
    return (order.index(base) if base in order else len(order), metric)


def _metric_table(section: Section, metrics: list[str], extra: bool, caption: str) -> Table:
    """One row per method (+ the papers' rows on the same dataset and set); mean rank and Δm% when ``extra``."""
    header = ["method", "family / source", "n", *(["mean rank", "Δm%"] if extra else []),
              *[m + (" ↓" if S.lower_is_better(m) else " ↑") for m in metrics]]
    rows, reference = [], []
    for method in section.methods:
        s = section.summary.loc[method]
        n = int(max(s[(m, "n")] for m in section.metrics))
        cells = [_fmt(s[(m, "mean")], m) + ("" if not np.isfinite(s[(m, "std")]) else PM + _fmt(s[(m, "std")], m))
                 if s[(m, "n")] else "–" for m in metrics]
        rank, dm = s[("mean rank", "")], section.delta_m.get(method, np.nan)
        tail = ["–" if not np.isfinite(rank) else f"{rank:.2f}", "–" if not np.isfinite(dm) else f"{dm:+.2f}"]
        rows.append([method, section.families[method], str(n), *(tail if extra else []), *cells])
        reference.append(False)
    ref = references_for(section.dataset, section.eval_set)
    for (paper, name), group in ref.groupby(["paper", "method"], sort=False):  # a method's rows of several tables: one row
        values = dict(zip(group["metric"], zip(group["mean"], group["std"], strict=True), strict=True))
        if not any(m in values for m in metrics):
            continue
        cells = [(values[m][0] + (PM + values[m][1] if values[m][1] else "")) if m in values else "" for m in metrics]
        tables = [t.split(" (")[0].removeprefix("Table ") for t in dict.fromkeys(group["table"])]
        source = f"{paper}, Table{'s' if len(tables) > 1 else ''} {', '.join(tables)}"
        rows.append([name, source, "", *(["", ""] if extra else []), *cells])
        reference.append(True)
    return Table(header, rows, reference, caption=caption)


def _reference_blocks() -> list[Block]:
    ref = references()
    blocks: list[Block] = [Heading(2, "Reported in the papers (reference only)"),
                           Para("Transcribed from the papers (leaderboard/reference.csv); their splits, resolutions and "
                                "label sets differ from these runs, so they are never ranked or tested.", muted=True)]
    for (paper, table), group in ref.groupby(["paper", "table"], sort=False):
        sets = list(dict.fromkeys(group["eval_set"]))
        columns = sorted(dict.fromkeys(zip(group["eval_set"], group["metric"], strict=True)),
                         key=lambda c: (sets.index(c[0]), *_paper_metric_order(c[1])))
        rows = []
        for name, rows_of in group.groupby("method", sort=False):
            values = {(r.eval_set, r.metric): r.mean + (PM + r.std if r.std else "") for r in rows_of.itertuples()}
            rows.append([name, *[values.get(c, "–") for c in columns]])
        dataset = group["dataset"].iloc[0]
        blocks.append(Heading(3, f"{paper}, {table}"))
        blocks.append(Table(["method", *[f"{e} {m}" for e, m in columns]], rows, [True] * len(rows),
                            caption=f"dataset: {dataset}. " + "; ".join(dict.fromkeys(group["note"])) + "."))
    return blocks
