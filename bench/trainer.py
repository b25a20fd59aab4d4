"""One trainer for every method.

AdamW; epochs of a fixed number of iterations drawn with replacement from the training
rows; validation on the monitoring rows after every epoch; the best checkpoint by the
base's declared score; early stopping; an atomic ``last.pt`` after every epoch (model,
optimizer, scaler, method state, RNG states, history) from which a killed run resumes
exactly; a non-finite loss stops the run with a clear message. On CUDA the forward pass
runs under autocast (bfloat16 where supported, else float16 with a GradScaler).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from bench.data import Batch, FoldData, PreparedData, SampleSet
from bench.errors import NonFiniteLossError
from bench.method import Losses, Method, StepContext
from bench.metrics import segmentation_scores, summarize
from bench.models import ModelSpec

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that changes the result of training (part of the config hash)."""

    epochs: int = 100
    iters_per_epoch: int = 250
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 1e-2
    patience: int = 20  # epochs without a better monitoring score before stopping; 0 = never
    image_size: int = 256
    encoder: str = "resnet34"
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    weights: str | None = None  # local pretrained weights file
    amp: bool = True  # autocast on CUDA; ignored on CPU
    select_on: str = "inner"  # "inner": a held-back part of the training folds; "heldout": the fold itself
    monitor_fraction: float = 0.1
    augment: bool = True

    def model_spec(self, num_classes: int) -> ModelSpec:
        return ModelSpec(self.encoder, num_classes, 1, tuple(self.decoder_channels), self.weights)


@dataclass(frozen=True)
class Runtime:
    """How training runs, without changing what it computes (not hashed)."""

    device: str = "auto"
    num_workers: int = -1  # -1: 0 on CPU, up to 4 on CUDA
    progress: bool = True
    eval_batch_size: int = 16

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def workers(self, device: torch.device) -> int:
        if self.num_workers >= 0:
            return self.num_workers
        return min(4, os.cpu_count() or 1) if device.type == "cuda" else 0


@dataclass
class FitResult:
    best_path: Path
    best_epoch: int
    best_score: float
    history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        method: Method,
        fold: FoldData,
        cfg: TrainConfig,
        *,
        seed: int,
        run_dir: Path,
        runtime: Runtime = Runtime(),
        callbacks: list[EpochCallback] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.method, self.fold, self.cfg, self.seed = method, fold, cfg, seed
        self.run_dir, self.runtime = run_dir, runtime
        self.callbacks = callbacks or []
        self.meta = meta or {}
        self.device = runtime.torch_device()
        seed_everything(seed)
        self.model = method.base.build_model(cfg.model_spec(len(fold.data.class_names))).to(self.device)
        for component in method.components().values():
            component.configure(self.model)
            component.check_config(cfg)
        self.extras: dict[str, np.ndarray] = {}
        for component in method.components().values():
            self.extras.update(component.prepare(fold))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.amp_dtype = _amp_dtype(self.device, cfg.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.class_weights = fold.class_weights().to(self.device)
        self.epoch = 0  # epochs completed
        self.best_score, self.best_epoch, self.bad_epochs = -float("inf"), -1, 0
        self.history: list[dict[str, float]] = []

    # ----------------------------------------------------------------- checkpoints
    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"

    def save(self) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method": self.method.state_dict(),
            "epoch": self.epoch,
            "best": (self.best_score, self.best_epoch, self.bad_epochs),
            "history": self.history,
            "rng": rng_state(),
            "meta": self.meta,
        }
        atomic_save(state, self.last_path)

    def resume(self) -> bool:
        """Restore from ``last.pt`` if present; returns whether it did."""
        if not self.last_path.exists():
            return False
        state = torch.load(self.last_path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        self.epoch = state["epoch"]
        self.best_score, self.best_epoch, self.bad_epochs = state["best"]
        self.history = state["history"]
        set_rng_state(state["rng"])
        return True

    # ----------------------------------------------------------------- training
    def fit(self) -> FitResult:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.resume()
        while self.epoch < self.cfg.epochs and not self._patience_exhausted():
            record = self._train_epoch()
            metrics = self.evaluate_rows(self.fold.monitor, summarize_only=True)
            score = self.method.base.score(metrics)
            record.update({f"monitor/{k}": v for k, v in metrics.items()})
            record["monitor/score"] = score
            for name, component in self.method.components().items():
                record.update({f"diag/{name}/{k}": v for k, v in component.diagnostics().items()})
            self.epoch += 1
            if score > self.best_score:
                self.best_score, self.best_epoch, self.bad_epochs = score, self.epoch - 1, 0
                atomic_save({"model": self.model.state_dict(), "epoch": self.best_epoch, "score": score}, self.best_path)
            else:
                self.bad_epochs += 1
            self.history.append(record)
            for callback in self.callbacks:
                callback(self.epoch - 1, record)
            self.save()
        return FitResult(self.best_path, self.best_epoch, self.best_score, self.history)

    def _patience_exhausted(self) -> bool:
        return self.cfg.patience > 0 and self.bad_epochs >= self.cfg.patience

    def _train_epoch(self) -> dict[str, float]:
        self.model.train()
        sums: dict[str, float] = {}
        batches = self._batches(self.epoch)
        bar = tqdm(batches, total=self.cfg.iters_per_epoch, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
                   disable=not self.runtime.progress, leave=False)
        for it, batch in enumerate(bar):
            losses = self.step(batch, it)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
        means = {k: v / self.cfg.iters_per_epoch for k, v in sums.items()}
        for component in self.method.components().values():
            component.on_epoch_end(self.epoch, means)
        return {f"train/loss_{k}": v for k, v in means.items()}

    def step(self, batch: Batch, iteration: int) -> dict[str, float]:
        """One optimisation step; returns the detached losses."""
        method = self.method
        ctx = StepContext(self.epoch, iteration, self.class_weights, self.scaler.scale)
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.compute_losses(batch, ctx, with_regularizers=True)
        values = losses.detached()
        bad = {k: v for k, v in values.items() if not np.isfinite(v)}
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss at epoch {self.epoch + 1}, iteration {iteration + 1}: "
                + ", ".join(f"{k}={v}" for k, v in bad.items())
                + f" (method {method.name}; try a lower --lr)"
            )
        method.combiner.backward(losses, self.model, ctx)
        self.scaler.step(self.optimizer)
        self.scaler.update()

        def recompute() -> dict[str, torch.Tensor]:
            with torch.no_grad():
                return self.compute_losses(batch, ctx, with_regularizers=False).tasks

        method.combiner.after_step(recompute)
        return values

    def compute_losses(self, batch: Batch, ctx: StepContext, *, with_regularizers: bool) -> Losses:
        with self.autocast():
            out = self.model(batch.image)
            losses = self.method.base.losses(out, batch, ctx)
            if with_regularizers:
                for reg in self.method.regularizers:
                    losses.extra.update(reg.penalty(out, losses, batch, self.model))
        return losses

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _batches(self, epoch: int) -> Iterator[Batch]:
        data = SampleSet(self.fold.data, self.fold.train, self.extras, augment=self.cfg.augment)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        sampler = RandomSampler(data, replacement=True, num_samples=self.cfg.iters_per_epoch * self.cfg.batch_size, generator=gen)
        loader = DataLoader(data, batch_size=self.cfg.batch_size, sampler=sampler, drop_last=True, generator=gen,
                            num_workers=self.runtime.workers(self.device), pin_memory=self.device.type == "cuda")
        for items in loader:
            yield Batch.collate(items, self.device)

    # ----------------------------------------------------------------- evaluation
    def load_best(self) -> None:
        state = torch.load(self.best_path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])

    def evaluate_rows(self, rows: np.ndarray, *, summarize_only: bool = False) -> Any:
        table = predict(self.model, self.method, self.fold.data, rows, self.runtime, self.device, self.autocast)
        return summarize(table, len(self.fold.data.class_names)) if summarize_only else table


@torch.no_grad()
def predict(
    model: nn.Module,
    method: Method,
    data: PreparedData,
    rows: np.ndarray,
    runtime: Runtime,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> pd.DataFrame:
    """Per-sample predictions: ids, label, predicted class and probabilities, Dice/IoU/HD95."""
    model.eval()
    loader = DataLoader(SampleSet(data, rows, {}, augment=False), batch_size=runtime.eval_batch_size, shuffle=False)
    records: list[dict[str, Any]] = []
    for items in loader:
        batch = Batch.collate(items, device)
        with autocast():
            out = model(batch.image)
        probs = torch.softmax(out.cls.float(), dim=1).cpu().numpy() if out.cls is not None else None
        masks = (out.seg.float() > 0).cpu().numpy()[:, 0] if out.seg is not None else None
        extra = {k: np.asarray(v) for k, v in method.base.sample_metrics(out, batch).items()}
        for i, r in enumerate(batch.index.cpu().numpy()):
            row = data.table.iloc[r]
            rec: dict[str, Any] = {"sample_id": row["sample_id"], "patient_id": row["patient_id"], "label": int(row["label"])}
            if probs is not None:
                rec["pred"] = int(probs[i].argmax())
                rec.update({f"prob_{c}": float(p) for c, p in enumerate(probs[i])})
            if masks is not None:
                rec.update(segmentation_scores(masks[i], data.masks[r] > 0))
            rec.update({k: float(v[i]) for k, v in extra.items()})
            records.append(rec)
    model.train()
    return pd.DataFrame.from_records(records)


def _amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    if device.type != "cuda" or not amp:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
