"""The ``bench`` command line."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from typing import Any

import click

from bench.errors import BenchError

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
            return super().invoke(ctx)
        except BenchError as err:
            raise click.ClickException(str(err)) from err


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
@workspace_option
def run(**opts: Any) -> None:
    """Train and evaluate methods on a dataset; one MLflow run per (method, fold, seed).

    Finished runs with the same configuration are skipped; unfinished ones resume from
    their last checkpoint. Results: `bench results`, the MLflow UI: `bench ui`.
    """
    from bench.runner import run_grid, seeds_from
    from bench.tracking import Workspace
    from bench.trainer import Runtime, TrainConfig

    quick = QUICK if opts["quick"] else {}

    def pick(key: str, default: Any) -> Any:
        return opts.get(key) if opts.get(key) is not None else quick.get(key, default)

    defaults = TrainConfig()
    cfg = TrainConfig(
        epochs=pick("epochs", defaults.epochs), iters_per_epoch=pick("iters", defaults.iters_per_epoch),
        batch_size=pick("batch_size", defaults.batch_size), lr=pick("lr", defaults.lr),
        weight_decay=pick("weight_decay", defaults.weight_decay), patience=pick("patience", defaults.patience),
        image_size=pick("image_size", defaults.image_size), encoder=pick("encoder", defaults.encoder),
        decoder_channels=quick.get("decoder_channels", defaults.decoder_channels), weights=opts["weights"],
        amp=not opts["no_amp"], select_on=opts["select_on"],
    )
    runtime = Runtime(device=opts["device"], num_workers=opts["workers"], progress=not opts["no_progress"])
    ws = Workspace(opts["workspace"])
    dataset = pick("dataset", "synthetic")
    if opts["quick"] and opts["dataset"] is None:
        dataset = QUICK["dataset"]
    only = [int(f) for f in opts["only_folds"].split(",")] if opts["only_folds"] else None
    outcomes = run_grid(
        _split_methods(opts["methods"]), dataset, ws, data_root=opts["data_root"], n_folds=opts["folds"], folds=only,
        seeds=seeds_from(opts["seeds"]), split_seed=opts["split_seed"], cfg=cfg, runtime=runtime,
        retry_failed=opts["retry_failed"], echo=lambda s: click.echo(s, err=True),
    )
    from bench.results import results_table

    click.echo(results_table(ws))
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise click.ClickException(f"{len(failed)} run(s) failed: " + "; ".join(o.message for o in failed))


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
    _exec(cmd, env)


def _exec(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.Popen(cmd, env=env)
    try:
        proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(2)
        proc.wait()


if __name__ == "__main__":
    main()
