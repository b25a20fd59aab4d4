"""Model building blocks: named feature maps, parameter groups, local weights."""

import pytest
import torch

from bench.models import ModelSpec, MultiTaskUNet, TimmClassifier, layer_names

SPEC = ModelSpec(encoder="tu-resnet10t", decoder_channels=(16, 16, 8, 8, 8))


def test_layer_names_on_five_stages():
    assert layer_names(5) == {"stage1": 0, "stage2": 1, "stage3": 2, "stage4": 3, "stage5": 4,
                              "bottleneck": 4, "last": 3, "mid": 2}


def test_features_are_the_encoder_maps_the_heads_consume():
    model = MultiTaskUNet(SPEC).eval()
    x = torch.randn(2, 1, 64, 64)
    out = model(x)
    feats = model.encoder(x)[1:]
    assert out.features["bottleneck"].shape == feats[-1].shape == (2, 512, 2, 2)
    assert out.features["last"].shape[-1] == 4 and out.features["mid"].shape[-1] == 8  # strides 16 and 8
    assert torch.equal(out.features["mid"], feats[2])
    # the classification logits are a function of the bottleneck map that is exposed
    grad = torch.autograd.grad(out.cls.sum(), out.features["bottleneck"], retain_graph=True)[0]
    assert grad.abs().sum() > 0
    assert out.seg.shape == (2, 1, 64, 64) and out.cls.shape == (2, 5)


def test_parameter_groups_partition_the_model():
    model = MultiTaskUNet(SPEC)
    groups = [model.shared_parameters(), *model.task_parameters().values()]
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_any_smp_encoder_name_including_timm():
    for encoder in ("resnet18", "tu-mobilenetv3_small_050"):
        out = MultiTaskUNet(ModelSpec(encoder=encoder, decoder_channels=(8, 8, 8, 8, 8)))(torch.randn(1, 1, 64, 64))
        assert out.seg.shape == (1, 1, 64, 64)


def test_local_weights_file_is_loaded(tmp_path):
    source = MultiTaskUNet(SPEC)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": source.encoder.state_dict()}, path)  # an encoder-only checkpoint
    target = MultiTaskUNet(ModelSpec(**{**SPEC.__dict__, "weights": str(path)}))
    for (name, a), b in zip(source.encoder.state_dict().items(), target.encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="not found"):
        MultiTaskUNet(ModelSpec(**{**SPEC.__dict__, "weights": str(tmp_path / "none.pt")}))


def test_timm_classifier_by_name():
    model = TimmClassifier("resnet10t", ModelSpec(num_classes=5))
    out = model(torch.randn(2, 1, 64, 64))
    assert out.cls.shape == (2, 5) and out.seg is None and out.embedding.shape[0] == 2
