"""Tables and statistics of one (dataset, evaluation set) section of the leaderboard."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from bench.leaderboard.collect import Runs

from bench import stats as S
from bench.results import METRICS

PRIMARY = ("dice", "hd95", "f1")  # declared primary metrics: ranks' tests, CD diagrams, tests against the baseline
SINGLE_TASK_FAMILY = "single-task"
REFERENCE_FILE = Path(__file__).with_name("reference.csv")


@dataclass(frozen=True)
class Comparison:
    """One method against the baseline on one metric."""

    method: str
    metric: str
    n_blocks: int
    mean_diff: float  # mean over paired blocks of method - baseline
    pvalue: float | None  # Wilcoxon signed-rank over blocks (None: skipped)
    effect: float | None  # matched-pairs rank-biserial correlation over blocks
    interval: S.Interval | S.Skipped  # patient-cluster bootstrap of the pooled difference
    note: str = ""
    p_holm: float | None = None


@dataclass
class Section:
    dataset: str
    eval_set: str
    methods: list[str]  # ordered: family, then name
    families: dict[str, str]
    metrics: list[str]
    runs: pd.DataFrame  # this section's tidy rows
    summary: pd.DataFrame  # index method; columns (metric, mean|std|n|rank)
    delta_m: pd.Series  # method -> Δm% (NaN where undefined)
    delta_refs: dict[str, str]  # metric -> single-task method used as its reference
    delta_note: str
    friedman: dict[str, S.Friedman | S.Skipped] = field(default_factory=dict)
    pairwise: dict[str, pd.DataFrame | S.Skipped] = field(default_factory=dict)
    nemenyi: dict[str, S.Nemenyi | S.Skipped] = field(default_factory=dict)
    mean_ranks: dict[str, pd.Series] = field(default_factory=dict)
    baseline: str = ""
    comparisons: list[Comparison] | S.Skipped = field(default_factory=list)

    @property
    def slug(self) -> str:
        return slug(f"{self.dataset}-{self.eval_set}")


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def ordered_metrics(names: list[str] | set[str]) -> list[str]:
    known = [m for m in METRICS if m in names]
    return known + sorted(set(names) - set(known))


def block_table(runs: pd.DataFrame, metric: str, methods: list[str]) -> pd.DataFrame:
    """(fold, seed) x method values of one metric, complete blocks only."""
    rows = runs[runs["metric"] == metric]
    table = rows.pivot_table(index=["fold", "seed"], columns="method", values="value", aggfunc="mean")
    table = table.reindex(columns=[m for m in methods if m in table.columns])
    return table.dropna(axis=0, how="any").sort_index()


def analyse(runs: Runs, dataset: str, eval_set: str, baseline: str, *, n_resamples: int = 2000, seed: int = 0) -> Section:
    frame = runs.metrics[(runs.metrics["dataset"] == dataset) & (runs.metrics["eval_set"] == eval_set)]
    families = frame.drop_duplicates("method").set_index("method")["family"].to_dict()
    methods = sorted(families, key=lambda m: (families[m] != SINGLE_TASK_FAMILY, families[m], m))
    metrics = ordered_metrics(set(frame["metric"]))
    grouped = frame.groupby(["method", "metric"])["value"]
    summary = pd.DataFrame(index=pd.Index(methods, name="method"))
    for metric in metrics:
        summary[(metric, "mean")] = [grouped.mean().get((m, metric), np.nan) for m in methods]
        summary[(metric, "std")] = [grouped.std().get((m, metric), np.nan) for m in methods]
        summary[(metric, "n")] = [int(grouped.count().get((m, metric), 0)) for m in methods]
    summary.columns = pd.MultiIndex.from_tuples(summary.columns)
    section = Section(dataset, eval_set, methods, families, metrics, frame, summary, pd.Series(dtype=float), {}, "")
    _ranks_and_tests(section)
    _delta_m(section)
    _against_baseline(section, runs, baseline, n_resamples, seed)
    return section


def _ranks_and_tests(section: Section) -> None:
    for metric in section.metrics:
        table = block_table(section.runs, metric, section.methods)
        if table.shape[1] >= 2 and len(table):
            section.mean_ranks[metric] = S.mean_ranks(table, metric)
        if metric in PRIMARY:
            section.friedman[metric] = S.friedman(table)
            section.pairwise[metric] = S.pairwise_wilcoxon(table)
            section.nemenyi[metric] = S.nemenyi(table)
    ranks = pd.DataFrame(section.mean_ranks).reindex(section.methods)
    section.summary[("mean rank", "")] = ranks.mean(axis=1, skipna=True)


def _delta_m(section: Section) -> None:
    means = {metric: section.summary[(metric, "mean")] for metric in section.metrics}
    refs: dict[str, float] = {}
    singles = [m for m in section.methods if section.families[m] == SINGLE_TASK_FAMILY]
    for task_metrics in S.TASK_METRICS.values():
        for metric in task_metrics:
            if metric not in means:
                continue
            values = means[metric].reindex(singles).dropna()
            if values.empty:
                continue
            best = values.idxmin() if S.lower_is_better(metric) else values.idxmax()
            section.delta_refs[metric], refs[metric] = str(best), float(values[best])
    if not refs:
        section.delta_note = ("absent: no single-task baseline (family single-task) was run on this dataset and set, "
                              "so Δm% has no reference")
        section.delta_m = pd.Series(np.nan, index=section.methods)
        return
    out = {}
    for method in section.methods:
        values = {metric: float(means[metric][method]) for metric in means}
        out[method] = S.delta_m(values, refs)[0]
    section.delta_m = pd.Series(out)
    used = ", ".join(f"{k}: {v}" for k, v in section.delta_refs.items())
    section.delta_note = (f"Δm% against the best single-task run per metric ({used}); per task the mean signed relative change "
                          f"over {'; '.join(f'{t}: ' + ', '.join(ms) for t, ms in S.TASK_METRICS.items())}, then the mean over tasks "
                          "(hd95 sign-flipped).")


def _against_baseline(section: Section, runs: Runs, baseline: str, n_resamples: int, seed: int) -> None:
    section.baseline = baseline
    if baseline not in section.methods:
        section.comparisons = S.Skipped(f"the baseline {baseline!r} has no finished run on this dataset and set "
                                        f"(choose one with --baseline: {', '.join(section.methods)})")
        return
    if len(section.methods) < 2:
        section.comparisons = S.Skipped("only one method on this dataset and set: nothing to compare")
        return
    comparisons = []
    for metric in [m for m in PRIMARY if m in section.metrics]:
        for method in section.methods:
            if method == baseline:
                continue
            table = block_table(section.runs, metric, [baseline, method])
            if table.shape[1] < 2:
                continue
            interval = _bootstrap(runs, section, method, baseline, metric, table.index, n_resamples, seed)
            diff = table[method] - table[baseline]
            if len(table) < 2:
                comparisons.append(Comparison(method, metric, len(table), float(diff.mean()) if len(diff) else np.nan,
                                              None, None, interval, f"Wilcoxon needs ≥ 2 paired (fold, seed) blocks, found {len(table)}"))
                continue
            _, p, effect = S.wilcoxon_vs(table[method].to_numpy(), table[baseline].to_numpy())
            floor = 2.0 / 2 ** len(table)
            note = f"with {len(table)} blocks the smallest possible p is {floor:.3g}" if floor > 0.05 else ""
            comparisons.append(Comparison(method, metric, len(table), float(diff.mean()), p, effect, interval, note))
    tested = [c for c in comparisons if c.pvalue is not None]
    adjusted = S.holm([c.pvalue for c in tested])  # type: ignore[misc]
    holm = {id(c): float(a) for c, a in zip(tested, adjusted, strict=True)}
    section.comparisons = [Comparison(**{**c.__dict__, "p_holm": holm.get(id(c))}) for c in comparisons]


def _bootstrap(runs: Runs, section: Section, method: str, baseline: str, metric: str, blocks: pd.Index,
               n_resamples: int, seed: int) -> S.Interval | S.Skipped:
    """Pair the two methods' per-sample predictions by (sample, fold, seed) over the common blocks."""
    tables = []
    for name in (method, baseline):
        ids = section.runs[(section.runs["method"] == name)].drop_duplicates("run_id")
        parts = []
        for row in ids.itertuples():
            if (row.fold, row.seed) not in blocks:
                continue
            pred = runs.predictions(row.run_id, section.eval_set)
            if pred is None:
                return S.Skipped(f"run {row.run_id[:8]} of {name} has no predictions/{section.eval_set}.csv")
            parts.append(pred.assign(fold=row.fold, seed=row.seed))
        if not parts:
            return S.Skipped("no paired runs")
        tables.append(pd.concat(parts, ignore_index=True).drop_duplicates(["sample_id", "fold", "seed"]))
    merged = tables[0].merge(tables[1], on=["sample_id", "fold", "seed"], suffixes=("", "_b"), validate="one_to_one")
    if merged.empty:
        return S.Skipped("the two methods' predictions share no sample")
    merged = merged.sort_values(["fold", "seed", "sample_id"], ignore_index=True)
    cols = [c for c in tables[0].columns if c not in ("sample_id", "fold", "seed")]
    a = merged[["sample_id", "fold", "seed", *cols]]
    b = merged[["sample_id", "fold", "seed", *[f"{c}_b" for c in cols if f"{c}_b" in merged]]]
    b = b.rename(columns=lambda c: c[:-2] if c.endswith("_b") else c)
    k = sum(1 for c in cols if c.startswith("prob_")) or None
    return S.bootstrap_difference(metric, a, b, merged["patient_id"].to_numpy(), n_resamples=n_resamples, seed=seed,
                                  num_classes=k)


def references() -> pd.DataFrame:
    """The papers' reported numbers (``reference.csv``): never ranked, never tested."""
    return pd.read_csv(REFERENCE_FILE, dtype=str, keep_default_na=False)


def references_for(dataset: str, eval_set: str) -> pd.DataFrame:
    """Reference rows of the same dataset (the adapter name before ``:``) and evaluation set."""
    ref = references()
    name = dataset.split(":", 1)[0].lower()
    return ref[(ref["dataset"] == name) & (ref["eval_set"] == eval_set)]
