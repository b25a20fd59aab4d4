"""Helpers shared by the representation-level regularizers (RLAR, Rep-MTL).

Both differentiate each task loss with respect to a named encoder feature map of the model
(``Output.features``; ``model.layers`` lists the names) with ``create_graph=True``, so the
regularizer's own gradient reaches the heads and the encoder in the trainer's one backward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from bench.errors import ConfigError

# preferred display names when several names point at one encoder stage
_ALIASES = ("bottleneck", "last", "mid")


def model_layers(model: nn.Module, owner: str) -> Mapping[str, int]:
    """The model's ``name -> encoder stage index`` map, or a clear error if it has none."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, Mapping) or not layers:
        raise ConfigError(f"{owner}: model {type(model).__name__} exposes no named encoder feature maps "
                          "(a `layers` attribute mapping names to Output.features)")
    return layers


def pick_layers(model: nn.Module, layer: str, owner: str, *, mean_of: int = 3) -> tuple[str, ...]:
    """Feature names for ``layer``: one name, or for ``"mean"`` the ``mean_of`` deepest distinct stages.

    Raises :class:`ConfigError` listing the valid names when the model lacks the layer.
    """
    layers = model_layers(model, owner)
    valid = sorted(layers) + ["mean"]
    if layer == "mean":
        by_stage: dict[int, str] = {}
        for name in [n for n in _ALIASES if n in layers] + sorted(n for n in layers if n not in _ALIASES):
            by_stage.setdefault(layers[name], name)
        if len(by_stage) < mean_of:
            raise ConfigError(f"{owner}: layer 'mean' needs {mean_of} encoder stages but {type(model).__name__} "
                              f"exposes {len(by_stage)} ({', '.join(sorted(layers))})")
        return tuple(by_stage[i] for i in sorted(by_stage)[-mean_of:])
    if layer not in layers:
        raise ConfigError(f"{owner}: layer {layer!r} does not exist for {type(model).__name__}; "
                          f"valid layers: {', '.join(valid)}")
    return (layer,)


def representation_gradients(loss: Tensor, features: Sequence[Tensor]) -> list[Tensor]:
    """``dloss/dz`` for each feature map ``z``, kept in the graph (``create_graph=True``).

    Total derivatives: every path from ``z`` to the loss counts (deeper encoder stages, the
    decoder's skip connection, the heads). Only the part of the graph between the features
    and the loss is traversed; a loss that does not depend on a map gives zeros.
    """
    if not loss.requires_grad:
        return [torch.zeros_like(z) for z in features]
    return list(torch.autograd.grad(loss, list(features), create_graph=True, retain_graph=True,
                                    allow_unused=True, materialize_grads=True))


def require_features(features: Mapping[str, Tensor], names: Sequence[str], owner: str) -> list[Tensor]:
    missing = [n for n in names if n not in features]
    if missing:
        raise ConfigError(f"{owner}: the model output has no feature map {', '.join(missing)}; "
                          f"it has {', '.join(sorted(features)) or 'none'}")
    return [features[n] for n in names]
