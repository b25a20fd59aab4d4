"""The shared mechanism behind every gradient-combination method.

Per step, :class:`GradientCombiner` computes the gradient of each task loss with respect to
the shared parameters (``model.shared_parameters()``) once: the K x P task Jacobian J. A
method only implements :meth:`GradientCombiner.weigh`, a function of the K x K Gramian
G = J J^T (and the task losses) that returns K task weights w; the shared update is w J,
written into the shared parameters' ``.grad``. Every other parameter (the heads) gets the plain
gradient of its own loss, i.e. of the sum of the task losses (LibMTL/torchjd convention).
Regularizer terms (``Losses.extra``) are added to every gradient as a plain sum.

The rows of J come from one ``torch.autograd.grad`` per task (the same computation as
torchjd's ``mtl_backward`` with ``parallel_chunk_size=1``, measured fastest on CPU). Because
they are derivatives with respect to parameters, the U-Net's nested skip features need no
special care. Under AMP the losses are scaled by ``StepContext.scale``; the weights are
computed from the unscaled Gramian, so the update keeps the GradScaler's scale.

Loss-weighting methods (UW, DWA, FAMO) need no Jacobian; :class:`LossWeighting` gives them
the weighted sum and the same per-epoch diagnostics of the task weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bench.errors import ConfigError
from bench.method import Combiner, EpochMeans, Losses, StepContext


def mean_cosine(gramian: Tensor) -> float:
    """Mean pairwise cosine between the task gradients (for two tasks: their cosine)."""
    k = gramian.shape[0]
    norms = gramian.diagonal().clamp(min=0).sqrt()
    cos = gramian / (norms[:, None] * norms[None, :]).clamp(min=1e-30)
    upper = torch.triu_indices(k, k, offset=1)
    return float(cos[upper[0], upper[1]].mean()) if k > 1 else 1.0


class GradientCombiner(Combiner):
    """Base class: aggregate the task Jacobian of the shared parameters into one update."""

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.fallbacks = 0  # solver failures since the last diagnostics() call
        self.task_names: list[str] = []  # set before every weigh() call
        self._means = EpochMeans()

    def weigh(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """K task weights from the K x K Gramian (float64) and the K task losses (float64)."""
        raise NotImplementedError

    def note_fallback(self, message: str) -> None:
        """Count a solver failure (logged per epoch as ``fallbacks``); warn the first time."""
        if self.fallbacks == 0:
            warnings.warn(f"{self.info.name}: {message}", RuntimeWarning, stacklevel=2)
        self.fallbacks += 1

    def configure(self, model: nn.Module) -> None:
        shared = getattr(model, "shared_parameters", None)
        if shared is None or not list(shared()):
            raise ConfigError(f"{self.info.name} needs a model with shared parameters (a shared encoder)")

    def backward(self, losses: Losses, model: nn.Module, step: StepContext) -> None:
        shared: list[nn.Parameter] = list(model.shared_parameters())  # type: ignore[operator]
        shared_ids = {id(p) for p in shared}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in shared_ids]
        names = self.task_names = list(losses.tasks)
        jacobian = task_jacobian(losses, shared, others, step, retain_last=bool(losses.extra))
        factor = float(step.scale(torch.ones((), device=jacobian.device)))
        gramian = (jacobian @ jacobian.T).double() / factor**2
        if bool(torch.isfinite(gramian).all()):  # a non-finite entry of J makes its diagonal entry non-finite
            task_losses = torch.stack([v.detach().double() for v in losses.tasks.values()])
            weights = self.weigh(gramian, task_losses)
            self._means.add({"cosine": mean_cosine(gramian)} | {f"weight_{n}": float(w) for n, w in zip(names, weights, strict=True)})
        else:  # an AMP overflow: keep the inf so that the GradScaler skips this step
            weights = torch.ones(len(names), dtype=torch.float64)
        write_grads(shared, weights.to(jacobian) @ jacobian)
        if losses.extra:
            step.scale(sum(losses.extra.values())).backward()  # type: ignore[arg-type]

    def diagnostics(self) -> dict[str, float]:
        out = self._means.pop()
        out["fallbacks"] = float(self.fallbacks)
        self.fallbacks = 0
        return out


def task_jacobian(
    losses: Losses,
    shared: Sequence[nn.Parameter],
    others: Sequence[nn.Parameter],
    step: StepContext,
    *,
    retain_last: bool = False,
) -> Tensor:
    """One backward per task: return J (K x P, scaled like the losses) and accumulate the
    gradient of each loss into ``.grad`` of the non-shared parameters (the heads)."""
    n_shared = len(shared)
    size = sum(p.numel() for p in shared)
    tasks = list(losses.tasks.values())
    jacobian = torch.empty(len(tasks), size, device=shared[0].device, dtype=shared[0].dtype)
    for i, loss in enumerate(tasks):
        retain = retain_last or i < len(tasks) - 1
        if not loss.requires_grad:  # e.g. a constant loss: its gradient is zero everywhere
            jacobian[i].zero_()
            continue
        grads = torch.autograd.grad(step.scale(loss), [*shared, *others], retain_graph=retain, allow_unused=True)
        offset = 0
        for p, g in zip(shared, grads[:n_shared], strict=True):
            row = jacobian[i, offset : offset + p.numel()]
            row.copy_(g.reshape(-1)) if g is not None else row.zero_()
            offset += p.numel()
        for p, g in zip(others, grads[n_shared:], strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
    return jacobian


def write_grads(params: Sequence[nn.Parameter], update: Tensor) -> None:
    """Add the flat vector ``update`` into the parameters' ``.grad`` (in parameter order)."""
    offset = 0
    for p in params:
        g = update[offset : offset + p.numel()].view_as(p)
        p.grad = g.clone() if p.grad is None else p.grad + g
        offset += p.numel()


class LossWeighting(Combiner):
    """Base class for methods that weight the losses: logs the weights' epoch means."""

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self._means = EpochMeans()
        self.task_names: list[str] = []

    def record_weights(self, names: Sequence[str], weights: Tensor) -> None:
        self._means.add({f"weight_{n}": float(w) for n, w in zip(names, weights.detach().flatten(), strict=True)})

    def diagnostics(self) -> dict[str, float]:
        return self._means.pop()


class LearnedTaskVector:
    """A learned per-task vector (loss weights, their logits or log-variances) with its own Adam.

    Made on first use, when the number of tasks is known; stepped with a gradient the method
    computes itself; part of the method's checkpoint.
    """

    def __init__(self, init: float = 0.0, dtype: torch.dtype = torch.float32, **adam: Any) -> None:
        self.init, self.dtype, self.adam = init, dtype, adam
        self.value: Tensor | None = None
        self.optimizer: torch.optim.Adam | None = None

    def ensure(self, k: int) -> Tensor:
        if self.value is None:
            self.value = torch.full((k,), float(self.init), dtype=self.dtype, requires_grad=True)
            self.optimizer = torch.optim.Adam([self.value], **self.adam)
        return self.value

    def step(self, grad: Tensor) -> None:
        assert self.value is not None and self.optimizer is not None, "step() before ensure()"
        self.value.grad = grad.to(self.value)
        self.optimizer.step()
        self.value.grad = None

    def state_dict(self) -> dict[str, Any]:
        if self.value is None or self.optimizer is None:
            return {}
        return {"value": self.value.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            with torch.no_grad():
                self.ensure(len(state["value"])).copy_(state["value"])
            assert self.optimizer is not None
            self.optimizer.load_state_dict(state["optimizer"])
