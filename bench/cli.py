"""The ``bench`` command line."""

from __future__ import annotations

import dataclasses
import os
import sys
import textwrap
import warnings
from typing import Any

import click

from bench.errors import BenchError, DataWarning

QUICK = {  # --quick: everything small enough for a laptop CPU in a minute or two
    "dataset": "synthetic:patients=24,images_per_patient=2,size=64",
    "image_size": 64,
    "encoder": "tu-resnet10t",
    "decoder_channels": (32, 16, 16, 8, 8),
    "epochs": 2,
    "iters": 4,
    "batch_size": 4,
    "patience": 0,
}

workspace_option = click.option(
    "--workspace", "-w", type=click.Path(file_okay=False), default=None, envvar="BENCH_WORKSPACE", show_envvar=True,
    help="Workspace folder: MLflow store, checkpoints, caches.  [default: ./bench-workspace]",
)


class BenchGroup(click.Group):
    """Print user errors (bad names, bad data) as one clear line, without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except BenchError as err:
            raise click.ClickException(str(err)) from err


_python_showwarning = warnings.showwarning


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Data defects as one 'warning: ...' line (the message names the file); others as Python does."""
    if issubclass(category, DataWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _python_showwarning(message, category, *args, **kwargs)


@click.group(cls=BenchGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="thyrobench")
def main() -> None:
    """thyrobench: compare multi-task learning methods on thyroid ultrasound.

    One network predicts the nodule mask and the ACR TI-RADS category (TR1-TR5). Every
    method runs under the same data, folds, trainer and metrics; every run is recorded in
    MLflow (a SQLite store inside the workspace).

    \b
    Quick start:
      bench run --quick --methods vanilla,st-unet --folds 2
      bench results
      bench ui
    """


@main.command()
@click.option("--methods", "-m", required=True, help="Comma-separated methods, e.g. 'vanilla,pcgrad,cagrad:c=0.5,clinical+rlar@mid'. See `bench methods`.")
@click.option("--dataset", "-d", default=None, help="Dataset name with optional options 'name:key=value,...'. See `bench datasets`.  [default: synthetic]")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False), default=None, help="Folder of the dataset (not needed for synthetic).")
@click.option("--external", "-x", multiple=True,
              help="External datasets for zero-shot evaluation of every fold's best checkpoint, comma-separated: "
                   "'aimi=/data/aimi,ddti=/data/ddti', or 'NAME:key=value@ROOT' with dataset options. Logged as external/<name>/*.")
@click.option("--folds", type=int, default=3, show_default=True, help="Number of cross-validation folds (patient-grouped, TI-RADS-stratified).")
@click.option("--only-folds", default=None, help="Run only these folds, e.g. '0' or '0,2'.")
@click.option("--seeds", default="1", show_default=True, help="A count N (seeds 0..N-1) or a list '0,3,7'.")
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of the fold assignment (shared by all methods).")
@click.option("--epochs", type=int, default=None, help="Maximum epochs.  [default: 100]")
@click.option("--iters", type=int, default=None, help="Training iterations per epoch.  [default: 250]")
@click.option("--batch-size", type=int, default=None, help="[default: 8]")
@click.option("--lr", type=float, default=None, help="AdamW learning rate.  [default: 3e-4]")
@click.option("--weight-decay", type=float, default=None, help="AdamW weight decay.  [default: 1e-2]")
@click.option("--patience", type=int, default=None, help="Early stopping: epochs without improvement (0 = off).  [default: 20]")
@click.option("--image-size", type=int, default=None, help="Square input size in pixels.  [default: 256]")
@click.option("--encoder", default=None, help="smp encoder name, incl. timm 'tu-*' encoders.  [default: resnet34]")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None, help="Local pretrained weights file (nothing is downloaded).")
@click.option("--select-on", type=click.Choice(["inner", "heldout"]), default="inner", show_default=True,
              help="Checkpoint selection on a held-back part of the training folds (inner) or on the fold itself, as the RLAR paper (heldout).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=int, default=-1, help="DataLoader workers (-1: 0 on CPU, up to 4 on CUDA).")
@click.option("--no-amp", is_flag=True, help="Disable mixed precision on CUDA.")
@click.option("--quick", is_flag=True, help="Tiny everything (64 px, small encoder, few images and iterations): a smoke run in a minute or two on a CPU.")
@click.option("--retry-failed", is_flag=True, help="Re-run runs that FAILED before (e.g. NaN loss).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--tuned", is_flag=True, help="Use each method's best parameters from its `bench tune` study (recorded as tuned.* tags and params).")
@click.option("--storage", default=None, help="Optuna storage URL for --tuned.  [default: sqlite:///<workspace>/optuna.db]")
@click.option("--study", "studies", multiple=True, help="With --tuned: choose among several fitting studies by name (repeatable).")
@workspace_option
def run(**opts: Any) -> None:
    """Train and evaluate methods on a dataset; one MLflow run per (method, fold, seed).

    Finished runs with the same configuration are skipped; unfinished ones resume from
    their last checkpoint. Results: `bench results`, the MLflow UI: `bench ui`.
    """
    from bench.runner import run_grid, seeds_from
    from bench.tracking import Workspace
    from bench.trainer import Runtime

    cfg, dataset = _train_config(opts), _dataset(opts)
    runtime = Runtime(device=opts["device"], num_workers=opts["workers"], progress=not opts["no_progress"])
    ws = Workspace(opts["workspace"])
    adapt = None
    if opts["tuned"]:
        from bench.tune import TunedParams

        adapt = TunedParams(_tune_storage(ws, opts["storage"]), list(opts["studies"])).adapt
    only = [int(f) for f in opts["only_folds"].split(",")] if opts["only_folds"] else None
    from bench.external import parse_external

    external = parse_external(opts["external"])
    outcomes = run_grid(
        _split_methods(opts["methods"]), dataset, ws, data_root=opts["data_root"], n_folds=opts["folds"], folds=only,
        seeds=seeds_from(opts["seeds"]), split_seed=opts["split_seed"], cfg=cfg, runtime=runtime,
        retry_failed=opts["retry_failed"], echo=lambda s: click.echo(s, err=True), external=external, adapt=adapt,
    )
    from bench.results import results_table

    click.echo(results_table(ws))
    for ext in external:
        click.echo("\n" + results_table(ws, eval_set=f"external/{ext.name}"))
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise click.ClickException(f"{len(failed)} run(s) failed: " + "; ".join(o.message for o in failed))


def _train_config(opts: dict[str, Any]) -> Any:
    """The TrainConfig from the options (and --quick's values for those not given)."""
    from bench.trainer import TrainConfig

    quick = QUICK if opts.get("quick") else {}

    def pick(key: str, default: Any) -> Any:
        return opts.get(key) if opts.get(key) is not None else quick.get(key, default)

    defaults = TrainConfig()
    return TrainConfig(
        epochs=pick("epochs", defaults.epochs), iters_per_epoch=pick("iters", defaults.iters_per_epoch),
        batch_size=pick("batch_size", defaults.batch_size), lr=pick("lr", defaults.lr),
        weight_decay=pick("weight_decay", defaults.weight_decay), patience=pick("patience", defaults.patience),
        image_size=pick("image_size", defaults.image_size), encoder=pick("encoder", defaults.encoder),
        decoder_channels=quick.get("decoder_channels", defaults.decoder_channels), weights=opts.get("weights"),
        amp=not opts.get("no_amp"), select_on=opts.get("select_on") or defaults.select_on,
    )


def _dataset(opts: dict[str, Any]) -> str:
    if opts.get("dataset") is not None:
        return str(opts["dataset"])
    return str(QUICK["dataset"]) if opts.get("quick") else "synthetic"


def _tune_storage(ws: Any, url: str | None) -> str:
    from bench.tune import default_storage

    if url is None and not (ws.root / "optuna.db").exists():
        raise BenchError(f"no Optuna storage in {ws.root} (no optuna.db): run `bench tune` first or pass --storage")
    return url or default_storage(ws)


@main.command()
@click.option("--method", "-m", required=True, help="The method to tune, e.g. 'vanilla' or 'clinical+rlar@mid' (parameters given set trial 0).")
@click.option("--dataset", "-d", default=None, help="Dataset name with optional options.  [default: synthetic]")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False), default=None, help="Folder of the dataset.")
@click.option("--trials", type=int, default=20, show_default=True, help="The study's budget: trials in total, over all workers.")
@click.option("--timeout", type=float, default=None, help="Stop starting trials after this many seconds (this worker).")
@click.option("--storage", default=None, help="Optuna RDB URL, e.g. postgresql://user@host/db.  [default: sqlite:///<workspace>/optuna.db]")
@click.option("--study", default=None, help="Study name.  [default: METHOD/DATASET/fFOLD/<hash of the setup>]")
@click.option("--folds", type=int, default=3, show_default=True, help="Number of cross-validation folds.")
@click.option("--fold", type=int, default=0, show_default=True, help="Trials train on this fold's training part and are scored on its held-back monitoring rows.")
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed; TPE is seeded with seed + trial number.")
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of the fold assignment.")
@click.option("--startup-trials", type=int, default=5, show_default=True, help="Random trials before TPE models, and before the median pruner acts.")
@click.option("--warmup-epochs", type=int, default=None, help="Epochs before a trial can be pruned.  [default: a third of --epochs]")
@click.option("--heartbeat", type=int, default=60, show_default=True, help="Seconds between a trial's heartbeats; a trial silent for twice as long is failed and retried.")
@click.option("--epochs", type=int, default=None, help="Maximum epochs per trial.  [default: 100]")
@click.option("--iters", type=int, default=None, help="Training iterations per epoch.  [default: 250]")
@click.option("--batch-size", type=int, default=None, help="[default: 8]")
@click.option("--lr", type=float, default=None, help="Learning rate of trial 0.  [default: 3e-4]")
@click.option("--weight-decay", type=float, default=None, help="Weight decay of trial 0.  [default: 1e-2]")
@click.option("--patience", type=int, default=None, help="Early stopping within a trial (0 = off).  [default: 20]")
@click.option("--image-size", type=int, default=None, help="[default: 256]")
@click.option("--encoder", default=None, help="[default: resnet34]")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None, help="Local pretrained weights file.")
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", type=int, default=-1, help="DataLoader workers (-1: 0 on CPU, up to 4 on CUDA).")
@click.option("--no-amp", is_flag=True, help="Disable mixed precision on CUDA.")
@click.option("--quick", is_flag=True, help="Tiny everything, as `bench run --quick`.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@workspace_option
def tune(**opts: Any) -> None:
    """Tune one method's hyperparameters with Optuna (TPE, median pruning, trial 0 = defaults).

    Run the same command again to continue a study, or on several machines against one
    --storage to share it. Look at a study with `optuna-dashboard <storage URL>`; use its best
    parameters with `bench run --tuned`.
    """
    from bench.tracking import Workspace
    from bench.trainer import Runtime
    from bench.tune import Budget
    from bench.tune import tune as run_study

    ws = Workspace(opts["workspace"])
    runtime = Runtime(device=opts["device"], num_workers=opts["workers"], progress=not opts["no_progress"])
    budget = Budget(trials=opts["trials"], timeout=opts["timeout"], startup_trials=opts["startup_trials"],
                    warmup_epochs=opts["warmup_epochs"])
    if opts["heartbeat"] < 1:
        raise BenchError(f"--heartbeat must be at least 1 second, got {opts['heartbeat']}")
    result = run_study(
        opts["method"], _dataset(opts), ws, data_root=opts["data_root"], fold=opts["fold"], seed=opts["seed"],
        n_folds=opts["folds"], split_seed=opts["split_seed"], cfg=_train_config(opts), runtime=runtime, budget=budget,
        storage=opts["storage"], study_name=opts["study"], heartbeat=opts["heartbeat"],
        echo=lambda s: click.echo(s, err=True),
    )
    counts = ", ".join(f"{v} {k.lower()}" for k, v in result.counts.items())
    click.echo(f"study {result.study_name} ({counts}) on {result.storage}")
    if result.best_trial is not None:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.best_params.items())
        click.echo(f"best: trial {result.best_trial}, monitoring score {result.best_value:.4f}: {params}")


def _split_methods(text: str) -> list[str]:
    """Split on the commas between methods, not those between a method's 'key=value' pairs."""
    methods: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if methods and "=" in part and ":" not in part:
            methods[-1] += "," + part  # method names never contain '='
        else:
            methods.append(part)
    return methods


@main.command()
@click.option("--dataset", default=None, help="Only this dataset.")
@click.option("--set", "eval_set", default="val", show_default=True, help="Evaluation set: val, test or external/<name>.")
@workspace_option
def results(workspace: str | None, dataset: str | None, eval_set: str) -> None:
    """Print mean ± std over folds and seeds per method and metric, from MLflow."""
    from bench.results import results_table
    from bench.tracking import Workspace

    ws = Workspace(workspace)
    ws.require()
    click.echo(results_table(ws, dataset=dataset, eval_set=eval_set))


@main.command()
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Output folder (its own: other files there are refused).  [default: <workspace>/leaderboard]")
@click.option("--baseline", "-b", default=None, help="Method the others are tested against.  [default: the default base (see `bench methods`)]")
@click.option("--resamples", type=int, default=2000, show_default=True, help="Patient-bootstrap resamples per confidence interval.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap.")
@workspace_option
def leaderboard(workspace: str | None, out: str | None, baseline: str | None, resamples: int, seed: int) -> None:
    """Rebuild the leaderboard from MLflow: LEADERBOARD.md, results.csv, index.html, figures/.

    Per dataset and evaluation set: mean ± std, mean ranks, Friedman test, Wilcoxon–Holm
    CD diagrams, tests against the baseline with patient-bootstrap CIs, Δm% against the
    single-task runs, and the papers' reported numbers as reference rows.
    """
    from pathlib import Path

    from bench.leaderboard.build import build
    from bench.tracking import Workspace

    ws = Workspace(workspace)
    built = build(ws, Path(out) if out else ws.root / "leaderboard", baseline, n_resamples=resamples, seed=seed)
    left = f", {built.n_excluded} left out (listed on the page)" if built.n_excluded else ""
    click.echo(f"leaderboard of {built.n_runs} runs{left}: {built.out / 'index.html'}")


@main.command()
def methods() -> None:
    """List methods: name, role, family, paper and hyperparameters with defaults."""
    from bench.method import METHODS

    for name in METHODS.names():
        cls = METHODS.get(name)
        info = cls.info
        click.echo(click.style(name, bold=True) + f"  [{info.role}, {info.family}]  {info.summary}")
        if info.paper:
            click.echo(f"    paper: {info.paper}")
        for f in dataclasses.fields(cls.Params):
            from bench.params import describe_range

            click.echo(f"    {f.name} = {f.default!r}  ({describe_range(f)}) {f.metadata.get('help', '')}")
    click.echo("\nCombine with '+': a base (model + task losses), regularizers, one combiner (how losses become")
    click.echo("gradients), e.g. 'clinical+rlar@mid'. Override parameters with 'name:key=value,key=value'.")
    from bench.method import recipes

    by_base: dict[str, list[str]] = {}
    for recipe in recipes():
        base, _, other = recipe.partition("+")
        by_base.setdefault(base, []).append(other)
    if by_base:
        click.echo("\n" + click.style("Recipes", bold=True) + ": each base below + one of the components listed "
                   "(more regularizers and a combiner may be stacked):")
        for base, others in by_base.items():
            lines = textwrap.wrap(", ".join(others), width=96, initial_indent=f"  {base} + ", subsequent_indent="      ",
                                  break_on_hyphens=False)
            click.echo("\n".join(lines))


@main.command()
def datasets() -> None:
    """List dataset adapters and their options."""
    from bench.data import DATASETS
    from bench.params import describe_range

    for name in DATASETS.names():
        cls = DATASETS.get(name)
        root = "needs --data-root" if cls.info.needs_root else "built in"
        click.echo(click.style(name, bold=True) + f"  ({root})  {cls.info.summary}")
        if cls.info.source:
            click.echo(f"    source: {cls.info.source}")
        for f in dataclasses.fields(cls.Params):
            click.echo(f"    {f.name} = {f.default!r}  ({describe_range(f)}) {f.metadata.get('help', '')}")


@main.group()
def data() -> None:
    """Inspect dataset folders."""


@data.command("check")
@click.argument("name")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False), default=None, help="Folder of the dataset.")
@click.option("--max-images", type=int, default=None, help="Read only the first N images' pixels (counts use all).  [default: all]")
def data_check(name: str, data_root: str | None, max_images: int | None) -> None:
    """Validate a dataset folder: counts per class and split, patients, image sizes, every problem found.

    NAME is a dataset as for `bench run --dataset` ('ddti', 'aimi:every=5'). Exits with 1 when
    the folder cannot be used as is.
    """
    from bench.datacheck import check_dataset, format_report

    report = check_dataset(name, data_root, max_images=max_images, progress=True)
    click.echo(format_report(report))
    if not report.ok:
        raise SystemExit(1)


@main.command()
@click.option("--run-id", required=True, help="MLflow run id of a finished run whose base has guidance channels.")
@click.option("--external", "-x", multiple=True,
              help="External datasets to evaluate too, as for `bench run --external` (e.g. 'aimi=/data/aimi').")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@workspace_option
def explain(workspace: str | None, run_id: str, external: tuple[str, ...], device: str) -> None:
    """Feature importance (RLAR paper, Table 5): disable one guidance channel at a time.

    Zeroes the classifier weights that read the channel, re-runs inference on each
    evaluation set and prints ΔPrecision/ΔRecall/ΔF1 per feature; the table, a figure and
    the deltas are logged to the run (artifacts under explain/).
    """
    from bench.explain import explain_run, markdown, wide
    from bench.external import parse_external
    from bench.tracking import Workspace
    from bench.trainer import Runtime

    ws = Workspace(workspace)
    ws.require()
    table = explain_run(ws, run_id, Runtime(device=device, progress=False), parse_external(external))
    click.echo(markdown(wide(table)), nl=False)


@main.command()
@click.option("--port", type=int, default=5000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@workspace_option
def ui(workspace: str | None, port: int, host: str) -> None:
    """Open the MLflow UI on the workspace's store (Ctrl-C stops it)."""
    from bench.tracking import Workspace

    ws = Workspace(workspace)
    ws.require()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", ws.tracking_uri,
           "--host", host, "--port", str(port), "--workers", "1"]
    click.echo(f"MLflow UI on http://{host}:{port}  (store {ws.tracking_uri})", err=True)
    os.execve(sys.executable, cmd, env)  # the server replaces this process: Ctrl-C and signals reach it


if __name__ == "__main__":
    main()
