"""The method plugin contract.

A *method* as the user names it (``vanilla``, ``pcgrad``, ``rlar@mid``,
``clinical+rlar@mid``) is a recipe of components, each a registered plugin class in one
file under ``methods/``:

* a **base** builds the model and computes the task losses (``vanilla``, ``st-unet``, …);
* **regularizers** add loss terms computed from the model's outputs and features
  (RLAR, Rep-MTL, consistency terms);
* a **combiner** turns the task losses into parameter gradients (plain sum by default;
  loss weighting such as UW or FAMO; gradient aggregation such as PCGrad or CAGrad).

Tokens are joined with ``+`` and each may carry overrides: ``clinical+cagrad:c=0.5``. A
recipe without a base uses the base that declares ``default=True``; without a combiner the
task losses are summed. The trainer only calls the hooks below; it never branches on a name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from torch import Tensor, nn

from bench import params as P
from bench.consistency import inconsistency
from bench.models import ModelSpec, Output
from bench.registry import Registry

if TYPE_CHECKING:
    import optuna

    from bench.data import Batch, FoldData, PreparedData
    from bench.trainer import TrainConfig

Role = Literal["base", "regularizer", "combiner"]


@dataclass(frozen=True)
class MethodInfo:
    """What ``bench methods`` shows and what the registry needs to know about a component."""

    name: str
    role: Role
    family: str  # leaderboard grouping: single-task, mtl, loss-weighting, gradient, representation, two-stage
    paper: str
    summary: str
    min_tasks: int = 1  # regularizers/combiners acting between tasks need 2
    default: bool = False  # the base used when a recipe names none
    bases: tuple[str, ...] = ()  # regularizers/combiners that only work with these bases; a recipe naming none gets the first


@dataclass
class Losses:
    """Per-task losses (what a combiner combines) and extra terms added as a plain sum."""

    tasks: dict[str, Tensor]
    extra: dict[str, Tensor] = field(default_factory=dict)

    def total(self) -> Tensor:
        return sum(self.tasks.values()) + sum(self.extra.values())  # type: ignore[return-value]

    def detached(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in {**self.tasks, **self.extra}.items()}


@dataclass
class StepContext:
    """What a step's hooks may need beyond the batch."""

    epoch: int
    iteration: int
    class_weights: Tensor  # K class weights from the training fold's label frequencies
    scale: Callable[[Tensor], Tensor] = lambda t: t  # AMP loss scaling (identity without a GradScaler)


class EpochMeans:
    """Running means of per-step diagnostics, read and reset once per epoch (in ``diagnostics()``).

    A tensor is summed where it lives, so adding one costs no device sync; a non-finite float
    is left out, a non-finite epoch mean too.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor | float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: Mapping[str, Tensor | float]) -> None:
        for key, value in values.items():
            if isinstance(value, Tensor):
                value = value.detach()
            elif not math.isfinite(value):
                continue
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def pop(self) -> dict[str, float]:
        means = {k: float(self.sums[k]) / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return {k: v for k, v in means.items() if math.isfinite(v)}


class Component:
    """Behaviour shared by bases, regularizers and combiners; every hook has a default."""

    info: ClassVar[MethodInfo]
    Params: ClassVar[type] = P.NoParams
    #: Tuning of the trainer's shared hyperparameters (``bench.tune.SHARED_SPACE``: lr, weight_decay):
    #: map a TrainConfig field to an optuna distribution to set its range for this method, or to None to keep it fixed.
    shared_space: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, params: Any = None) -> None:
        self.params = params if params is not None else self.Params()

    @classmethod
    def search_space(cls, trial: optuna.Trial) -> dict[str, Any]:
        """Optuna suggestions for this component's parameters: suggest each under its field name
        (``trial.suggest_float("c", 0.1, 0.9)``) and return ``{field: value}``; see ``bench.tune``."""
        return {}

    def prepare(self, fold: FoldData) -> dict[str, np.ndarray]:
        """Per-sample arrays (aligned with the dataset's rows) to attach to every batch."""
        return {}

    def configure(self, model: nn.Module) -> None:
        """Check the model suits this component; raise a clear error before training."""

    def check_config(self, cfg: TrainConfig) -> None:
        """Check the training configuration suits this component (e.g. the batch size); raise before training."""

    def on_epoch_end(self, epoch: int, train_losses: Mapping[str, float]) -> None:
        """Called after each training epoch with the epoch-mean training losses."""

    def diagnostics(self) -> dict[str, float]:
        """Per-epoch values to log (then reset); e.g. task weights or gradient cosines."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.info.name} has no state but the checkpoint holds {sorted(state)}")


class Base(Component):
    """Builds the model and computes the per-task losses."""

    tasks: ClassVar[tuple[str, ...]] = ("seg", "cls")

    def build_model(self, spec: ModelSpec) -> nn.Module:
        raise NotImplementedError

    def losses(self, out: Output, batch: Batch, step: StepContext) -> Losses:
        raise NotImplementedError

    def relabel(self, data: PreparedData) -> PreparedData:
        """``data`` with the class labels and names this base predicts; by default the dataset's
        TI-RADS classes, unchanged. Called before any training: raise a :class:`DataError`
        there when the labels the base needs are missing."""
        return data

    def sample_metrics(self, out: Output, batch: Batch) -> dict[str, Tensor]:
        """Extra per-sample values for the prediction table; by default the task
        inconsistency measures the outputs allow (:func:`bench.consistency.inconsistency`)."""
        return inconsistency(out)

    def guidance_channels(self, model: nn.Module) -> dict[str, tuple[Tensor, int]]:
        """Named classifier inputs for feature importance (``bench explain``): name -> (weight
        matrix, index of the column that reads the channel). Empty when the base has none."""
        return {}

    def score(self, metrics: Mapping[str, float]) -> float:
        """Validation score for the best checkpoint: mean of Dice and macro-F1 over the tasks trained."""
        keys = [k for task, k in (("seg", "dice"), ("cls", "f1")) if task in self.tasks]
        return float(np.mean([metrics.get(k, 0.0) for k in keys]))


class Regularizer(Component):
    """Adds weighted loss terms; may differentiate through the model's features."""

    def penalty(self, out: Output, losses: Losses, batch: Batch, model: nn.Module) -> dict[str, Tensor]:
        raise NotImplementedError


class Combiner(Component):
    """Turns losses into parameter gradients. This base class sums them (equal weighting)."""

    info = MethodInfo("sum", "combiner", "mtl", "", "plain sum of the task losses")

    def backward(self, losses: Losses, model: nn.Module, step: StepContext) -> None:
        step.scale(losses.total()).backward()

    def after_step(self, recompute: Callable[[], dict[str, Tensor]]) -> None:
        """Called after the optimizer step; ``recompute()`` gives the task losses on the same batch."""


METHODS: Registry[type[Component]] = Registry("method", "bench.methods", "thyrobench.methods")


def register(cls: type[Component]) -> type[Component]:
    """Class decorator: make a component available by its ``info.name``."""
    if not dataclasses.is_dataclass(cls.Params):
        raise TypeError(f"{cls.__name__}.Params must be a dataclass")
    return METHODS.register(cls.info.name, cls)


@dataclass
class Method:
    """A resolved recipe: one base, any regularizers, one combiner."""

    base: Base
    regularizers: list[Regularizer]
    combiner: Combiner
    name: str  # canonical spec: tokens in role order, non-default parameters only

    def components(self) -> dict[str, Component]:
        parts: list[Component] = [self.base, *self.regularizers]
        if type(self.combiner) is not Combiner:
            parts.append(self.combiner)
        return {c.info.name: c for c in parts}

    @property
    def family(self) -> str:
        named = [c for c in self.components().values() if c is not self.base]
        return named[-1].info.family if named else self.base.info.family

    def params(self) -> dict[str, Any]:
        """Flat ``component.param -> value`` for every component, defaults included."""
        return {f"{name}.{k}": v for name, c in self.components().items() for k, v in P.as_dict(c.params).items()}

    def state_dict(self) -> dict[str, Any]:
        return {name: c.state_dict() for name, c in self.components().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, c in self.components().items():
            c.load_state_dict(state.get(name, {}))


def resolve(spec: str, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Method:
    """Parse ``"clinical+rlar@mid:lambda_rlar=0.05"`` into a :class:`Method`.

    ``overrides`` maps a component name to extra typed parameter values (used by tuning).
    """
    tokens = [t for t in spec.split("+") if t.strip()]
    if not tokens:
        raise P.ParamError("empty method name")
    parts: dict[Role, list[Component]] = {"base": [], "regularizer": [], "combiner": []}
    for token in tokens:
        name, args = P.split_spec(token)
        cls = METHODS.get(name)
        values: dict[str, Any] = {**args, **(overrides or {}).get(name, {})}
        parts[cls.info.role].append(cls(P.build(cls.Params, values, owner=f"method {name}")))
    if len(parts["base"]) > 1 or len(parts["combiner"]) > 1:
        raise P.ParamError(f"{spec!r}: a method combines at most one base and one combiner")
    base = parts["base"][0] if parts["base"] else _implied_base(parts["regularizer"] + parts["combiner"])
    combiner = parts["combiner"][0] if parts["combiner"] else Combiner()
    regs = [c for c in parts["regularizer"] if isinstance(c, Regularizer)]
    assert isinstance(base, Base)
    for c in (*regs, combiner):
        if c.info.bases and base.info.name not in c.info.bases:
            raise P.ParamError(f"{c.info.name} works only with base {' or '.join(c.info.bases)}, not {base.info.name}")
    for c in (*regs, combiner):
        if c.info.min_tasks > len(base.tasks):
            raise P.ParamError(f"{c.info.name} needs {c.info.min_tasks} tasks but {base.info.name} trains {len(base.tasks)}")
    ordered = [base, *regs] + ([combiner] if type(combiner) is not Combiner else [])
    # the default base is implied: "pcgrad" and "vanilla+pcgrad" name the same method
    implied = base.info.default and len(ordered) > 1 and not P.non_default(base.params)
    shown = ordered[1:] if implied else ordered
    name = "+".join(P.format_spec(c.info.name, c.params) for c in shown)
    return Method(base=base, regularizers=regs, combiner=combiner, name=name)  # type: ignore[arg-type]


def recipes() -> list[str]:
    """Two-part recipes of every non-default base with each regularizer and each combiner it
    has enough tasks for (e.g. ``<base>+<regularizer>``); the default base's are the bare names."""
    METHODS.load()
    classes = [METHODS.get(n) for n in METHODS.names()]
    bases = [c for c in classes if c.info.role == "base" and not c.info.default]
    others = [c for c in classes if c.info.role in ("regularizer", "combiner")]
    return [f"{b.info.name}+{o.info.name}" for b in bases for o in others
            if issubclass(b, Base) and o.info.min_tasks <= len(b.tasks) and b.info.name in (o.info.bases or [b.info.name])]


def _implied_base(components: list[Component]) -> Base:
    """The default base, or the first base that every component restricted to some bases accepts."""
    needs = [c.info.bases for c in components if c.info.bases]
    if not needs:
        return _default_base()
    common = [b for b in needs[0] if all(b in n for n in needs)]
    if not common:
        raise P.ParamError("no base suits " + " and ".join(f"{c.info.name} ({'/'.join(c.info.bases)})" for c in components if c.info.bases))
    base = METHODS.get(common[0])()
    assert isinstance(base, Base)
    return base


def _default_base() -> Base:
    METHODS.load()
    defaults = [cls for cls in (METHODS.get(n) for n in METHODS.names()) if cls.info.role == "base" and cls.info.default]
    if len(defaults) != 1:
        raise RuntimeError(f"exactly one base must declare default=True, found {len(defaults)}")
    base = defaults[0]()
    assert isinstance(base, Base)
    return base
