"""Model building blocks shared by every method.

* :class:`MultiTaskUNet` — a segmentation-models-pytorch U-Net whose encoder is shared by
  the segmentation decoder and a classification head on the bottleneck. Any smp encoder
  name works, including timm encoders with the ``tu-`` prefix. The encoder feature maps
  are exposed by name so representation-level methods can read (and differentiate
  with respect to) the exact tensors the heads consume.
* :func:`timm_classifier` — a single-task classifier from timm by name.

Layer names: ``stage1`` … ``stageN`` are the encoder stages from shallow to deep;
``bottleneck`` is the deepest (the classification head's input), ``last`` the stage just
above it, ``mid`` the middle stage (stride 8 on a 5-stage encoder).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

LAYER_ALIASES = ("bottleneck", "last", "mid")


@dataclass(frozen=True)
class ModelSpec:
    """What every model builder needs; set by the trainer from its configuration."""

    encoder: str = "resnet34"
    num_classes: int = 5
    in_channels: int = 1
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    weights: str | None = None  # a local state_dict file; never downloaded


@dataclass
class Output:
    """What a model returns. ``seg`` and ``cls`` hold the final predictions' logits."""

    seg: Tensor | None = None  # B x 1 x H x W logits of the nodule mask
    cls: Tensor | None = None  # B x K TI-RADS logits
    embedding: Tensor | None = None  # B x E classification embedding (head input after pooling)
    features: dict[str, Tensor] = field(default_factory=dict)  # named encoder maps, in the graph
    extras: dict[str, Tensor] = field(default_factory=dict)  # model-specific outputs


class ClassificationHead(nn.Module):
    """Global average pool -> dropout -> linear: the light head at the bottleneck."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        embedding = z.mean(dim=(2, 3))
        return self.fc(self.drop(embedding)), embedding


def layer_names(n_stages: int) -> dict[str, int]:
    """Map layer names to indices into the list of ``n_stages`` encoder stages."""
    names = {f"stage{i + 1}": i for i in range(n_stages)}
    names.update(bottleneck=n_stages - 1, last=max(n_stages - 2, 0), mid=n_stages // 2)
    return names


class MultiTaskUNet(nn.Module):
    """Shared-encoder U-Net with an optional classification head at the bottleneck.

    ``head`` replaces the default :class:`ClassificationHead` (it receives the bottleneck
    map and returns ``(logits, embedding)``); ``with_head=False`` gives a plain segmenter.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        seg_classes: int = 1,
        with_head: bool = True,
        head: nn.Module | None = None,
        in_channels: int | None = None,
    ) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        unet = smp.Unet(
            spec.encoder,
            encoder_weights=None,
            in_channels=in_channels or spec.in_channels,
            classes=seg_classes,
            decoder_channels=tuple(spec.decoder_channels),
            encoder_depth=len(spec.decoder_channels),
        )
        self.encoder = unet.encoder
        self.decoder = unet.decoder
        self.segmentation_head = unet.segmentation_head
        stage_channels = list(self.encoder.out_channels)[1:]
        self.layers = layer_names(len(stage_channels))
        self.layer_channels = {name: stage_channels[i] for name, i in self.layers.items()}
        self.head: nn.Module | None = None
        if with_head:
            self.head = head or ClassificationHead(stage_channels[-1], spec.num_classes)
        if spec.weights:
            load_weights(self, spec.weights)

    def forward(self, x: Tensor) -> Output:
        feats = self.encoder(x)
        stages = feats[1:]
        out = Output(seg=self.segmentation_head(self.decoder(feats)))
        out.features = {name: stages[i] for name, i in self.layers.items()}
        if self.head is not None:
            out.cls, out.embedding = self.head(stages[-1])
        return out

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        tasks = {"seg": [*self.decoder.parameters(), *self.segmentation_head.parameters()]}
        if self.head is not None:
            tasks["cls"] = list(self.head.parameters())
        return {k: [p for p in v if p.requires_grad] for k, v in tasks.items()}


class TimmClassifier(nn.Module):
    """A single-task TI-RADS classifier from timm (random init unless ``spec.weights``)."""

    def __init__(self, name: str, spec: ModelSpec) -> None:
        super().__init__()
        import timm

        self.net = timm.create_model(name, pretrained=False, num_classes=spec.num_classes, in_chans=spec.in_channels)
        self.layers = {"bottleneck": 0}  # the only named map in Output.features
        if spec.weights:
            load_weights(self.net, spec.weights)

    def forward(self, x: Tensor) -> Output:
        feats = self.net.forward_features(x)
        embedding = self.net.forward_head(feats, pre_logits=True)
        return Output(cls=self.net.forward_head(feats), embedding=embedding, features={"bottleneck": feats})

    def shared_parameters(self) -> list[nn.Parameter]:
        return []

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {"cls": [p for p in self.parameters() if p.requires_grad]}


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into ``model``; keys that do not fit are reported, not silently dropped.

    Accepts a plain state_dict or a dict holding one under ``state_dict`` / ``model``. Keys
    may carry a prefix (``encoder.``, ``module.``): the longest one that makes keys match is
    used. Classification layers whose shape differs (another number of classes) are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    own = model.state_dict()
    best: dict[str, Tensor] = {}
    for prefix in _candidate_prefixes(own, state):
        mapped = {prefix + k.removeprefix("module."): v for k, v in state.items()}
        fitting = {k: v for k, v in mapped.items() if k in own and own[k].shape == v.shape}
        if len(fitting) > len(best):
            best = fitting
    if not best:
        raise ValueError(f"no tensor in {path} matches the model ({len(state)} tensors in the file)")
    model.load_state_dict(best, strict=False)
    skipped = len(state) - len(best)
    if skipped:
        import warnings

        warnings.warn(f"{path}: loaded {len(best)} tensors, skipped {skipped} that do not fit the model", stacklevel=2)


def _candidate_prefixes(own: dict[str, Tensor], state: dict[str, Tensor]) -> Sequence[str]:
    prefixes = {""}
    for key in own:
        parts = key.split(".")
        for i in range(1, min(len(parts), 3)):
            prefixes.add(".".join(parts[:i]) + ".")
    return sorted(prefixes)
