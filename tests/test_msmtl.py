"""MS-MTL (Kang et al. 2022): consistency losses on hand-made maps, the two-stage network,
binary classes, the Eq. 12 inconsistency measures, and a tiny run of every variant."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from bench.methods.msmtl import (
    IntraConsistency,
    binary_labels,
    intra_loss,
    multiclass_dice_loss,
    t1t2t3_loss,
    t1t3_loss,
)

from bench.consistency import (
    BINARY_SEG,
    MULTICLASS_SEG,
    binary_as_multiclass,
    inconsistency,
    merged_logits,
    multiclass_as_cls,
)
from bench.errors import ConfigError, DataError
from bench.method import resolve
from bench.metrics import summarize
from bench.models import ModelSpec, MultiTaskUNet, Output
from bench.params import ParamError

SPEC = ModelSpec(encoder="tu-resnet10t", decoder_channels=(16, 8, 8, 8, 8))


def one_hot_map(label_map: torch.Tensor, channels: int) -> torch.Tensor:
    """H x W integer map (0 background, 1+k class k) -> 1 x C x H x W one-hot probabilities."""
    return torch.nn.functional.one_hot(label_map.long(), channels).permute(2, 0, 1)[None].float()


def nodule_map(cls: int, classes: int = 2, size: int = 16, pixels: int = 2) -> torch.Tensor:
    """A confident (K+1)-class map: a small nodule of class ``cls`` on background."""
    m = torch.zeros(size, size, dtype=torch.long)
    m[0, :pixels] = 1 + cls
    return one_hot_map(m, classes + 1)


# ------------------------------------------------------------------ L_T1T3 (Algorithm 1, Fig. 3)
FIG3 = [  # nodule class drawn in the map, Cls^pred, L printed in Fig. 3
    (0, [1.0, 0.0], 1.0711),  # consistent
    (1, [0.0, 1.0], 1.0716),  # consistent
    (1, [0.999, 0.001], 1.9918),  # inconsistent
    (1, [0.986, 0.014], 1.9738),  # inconsistent
]


def test_t1t3_reproduces_fig3_values_and_ordering():
    losses = []
    for cls, cls_prob, printed in FIG3:
        seg = nodule_map(cls)
        # Seg-as-Cls columns of Fig. 3: 'max' ~ [0.731, 0.269]; 'all' ~ [0.502, 0.498]
        expected_max = [0.731, 0.269] if cls == 0 else [0.269, 0.731]
        assert multiclass_as_cls(seg, "max")[0].tolist() == pytest.approx(expected_max, abs=1e-3)
        assert multiclass_as_cls(seg, "all")[0, cls].item() == pytest.approx(0.502, abs=1e-3)
        loss = t1t3_loss(seg, torch.tensor([cls_prob])).item()
        assert loss == pytest.approx(printed, abs=3e-3)  # the figure prints rounded inputs
        losses.append(loss)
    assert max(losses[:2]) < min(losses[2:])
    # Eq. 5 as printed (log p) orders the rows the same way, but not with the figure's values
    plain = [t1t3_loss(nodule_map(c), torch.tensor([p]), sce="plain").item() for c, p, _ in FIG3]
    assert max(plain[:2]) < min(plain[2:]) and plain[0] > 3.0


def test_t1t3_uses_only_max_probability_locations():
    # a benign nodule (confident) on a background where 'malignant' is 0.4 everywhere (never the max)
    prob = torch.zeros(1, 3, 16, 16)
    prob[0, 0], prob[0, 2] = 0.6, 0.4
    prob[0, :, 5:9, 5:9] = torch.tensor([0.05, 0.9, 0.05])[:, None, None]
    assert multiclass_as_cls(prob, "max").argmax().item() == 0  # benign
    assert multiclass_as_cls(prob, "all").argmax().item() == 1  # all locations: malignant
    benign, malignant = torch.tensor([[0.95, 0.05]]), torch.tensor([[0.05, 0.95]])
    assert t1t3_loss(prob, benign) < t1t3_loss(prob, malignant)
    assert t1t3_loss(prob, benign, locations="all") > t1t3_loss(prob, malignant, locations="all")


def test_t1t3_orders_and_gradients():
    seg = nodule_map(1, classes=5).requires_grad_()
    cls = torch.tensor([[0.1, 0.1, 0.6, 0.1, 0.1]], requires_grad=True)
    both = t1t3_loss(seg, cls)
    assert both.item() == pytest.approx((t1t3_loss(seg, cls, order="sc") + t1t3_loss(seg, cls, order="cs")).item())
    both.backward()
    assert cls.grad.abs().sum() > 0 and seg.grad.abs().sum() > 0  # both tasks learn from it


# ------------------------------------------------------------------ L_T2T3 (Eq. 4)
def test_intra_consistent_maps_score_lower():
    m = torch.zeros(16, 16, dtype=torch.long)
    m[4:10, 4:10] = 1
    m[6:10, 6:10] = 2  # the nodule split across both classes: merged it is still the square
    prob_mc = one_hot_map(m, 3)
    same = (m > 0).float()[None, None]
    shifted = torch.roll(same, shifts=4, dims=-1)
    assert intra_loss(prob_mc, same).item() == pytest.approx(0.0, abs=1e-6)
    assert intra_loss(prob_mc, shifted).item() > 0.1
    soft = 0.5 * same + 0.25
    assert 0 < intra_loss(prob_mc, soft).item() < intra_loss(prob_mc, shifted).item()


# ------------------------------------------------------------------ L_T1T2T3 (Algorithm 2)
@pytest.mark.parametrize("classes", [2, 5])
def test_algorithm2_routes_binary_map_into_predicted_class(classes):
    nodule = torch.rand(3, 1, 8, 8)
    labels = torch.tensor([0, classes - 1, 1])
    routed = binary_as_multiclass(nodule, labels, classes)
    assert routed.shape == (3, classes + 1, 8, 8)
    assert torch.allclose(routed.sum(1), torch.ones(3, 8, 8))
    for i, c in enumerate(labels.tolist()):
        assert torch.equal(routed[i, 0], 1 - nodule[i, 0]) and torch.equal(routed[i, 1 + c], nodule[i, 0])
        others = [k for k in range(1, classes + 1) if k != 1 + c]
        assert routed[i, others].abs().sum() == 0


def test_t1t2t3_consistent_lower_and_no_gradient_through_the_argmax():
    m = torch.zeros(16, 16, dtype=torch.long)
    m[4:10, 4:10] = 2  # the (K+1)-class map says class 1 (malignant)
    prob_mc = one_hot_map(m, 3)
    nodule = (m > 0).float()[None, None]
    cls = torch.tensor([[0.2, 0.8]], requires_grad=True)
    agree = t1t2t3_loss(prob_mc, nodule, cls)
    disagree = t1t2t3_loss(prob_mc, nodule, torch.tensor([[0.8, 0.2]]))
    assert agree.item() == pytest.approx(0.0, abs=1e-6) and disagree.item() > 0.3
    assert not agree.requires_grad  # the classifier enters through argmax only


# ------------------------------------------------------------------ T3 loss
def test_multiclass_dice_loss_uses_class_or_merged_map():
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:10, 4:10] = 1
    logits = torch.full((2, 3, 16, 16), -10.0)
    logits[:, 0] = 10.0
    logits[:, 2, 4:10, 4:10], logits[:, 0, 4:10, 4:10] = 10.0, -10.0  # nodule predicted malignant
    right = multiclass_dice_loss(logits, mask, torch.tensor([1, 1]))
    wrong = multiclass_dice_loss(logits, mask, torch.tensor([0, 0]))
    unlabelled = multiclass_dice_loss(logits, mask, torch.tensor([-1, -1]))
    assert right.item() < 1e-3 and wrong.item() > 0.5 and unlabelled.item() < 1e-3


# ------------------------------------------------------------------ network
@pytest.mark.parametrize("spec", ["msmtl", "msmtl:classes=binary", "mtl-mc", "mtl-mc:classes=binary"])
def test_shapes_for_k2_and_k5(spec):
    method = resolve(spec)
    model = method.base.build_model(SPEC)
    k = 2 if "binary" in spec else 5
    x = torch.randn(2, 1, 64, 64)
    out = model(x)
    assert out.cls.shape == (2, k) and out.seg.shape == (2, 1, 64, 64)
    assert out.extras[MULTICLASS_SEG].shape == (2, k + 1, 64, 64)
    assert torch.allclose(out.seg, merged_logits(out.extras[MULTICLASS_SEG]))
    groups = [model.shared_parameters(), *model.task_parameters().values()]
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    if spec.startswith("msmtl"):
        assert out.extras[BINARY_SEG].shape == (2, 1, 64, 64)
        # stage 2 reads stage 1's logits: the (K+1)-class map depends on stage 1's decoder
        out.extras[MULTICLASS_SEG].sum().backward()
        assert model.stage1.segmentation_head[0].weight.grad.abs().sum() > 0
        assert set(model.task_parameters()) == {"cls", "seg_mc"}


def test_consistency_regularizers_need_the_right_model():
    assert resolve("intra+inter").name == "msmtl+intra+inter"  # the base they need is implied
    assert resolve("inter").name == "msmtl+inter" and resolve("mtl-mc+inter").name == "mtl-mc+inter"
    with pytest.raises(ParamError, match="intra works only with base msmtl, not mtl-mc"):
        resolve("mtl-mc+intra")
    with pytest.raises(ParamError, match="inter works only with base msmtl or mtl-mc, not vanilla"):
        resolve("vanilla+inter")
    with pytest.raises(ConfigError, match="intra needs .*msmtl or mtl-mc.*not MultiTaskUNet"):
        IntraConsistency().configure(MultiTaskUNet(SPEC))
    with pytest.raises(ConfigError, match="separate binary segmentation"):
        IntraConsistency().configure(resolve("mtl-mc").base.build_model(SPEC))
    method = resolve("mtl-mc+inter:t1t3=0")
    with pytest.raises(ConfigError, match="no term left"):
        method.regularizers[0].configure(method.base.build_model(SPEC))


# ------------------------------------------------------------------ labels
def table(**columns):
    n = len(next(iter(columns.values())))
    base = {"sample_id": [f"s{i}" for i in range(n)], "split": ["train"] * n, "tirads": [pd.NA] * n}
    return pd.DataFrame({**base, **columns})


def test_binary_labels_from_pathology_or_tirads():
    t = table(tirads=[1, 3, 4, 5, None], pathology=[1, 0, None, 0, 1])
    assert binary_labels(t, "d", "auto", 4).tolist() == [1, 0, -1, 0, 1]  # pathology wins; no TI-RADS fill-in
    assert binary_labels(t, "d", "tirads", 4).tolist() == [0, 0, 1, 1, -1]
    assert binary_labels(t, "d", "tirads", 5).tolist() == [0, 0, 0, 1, -1]
    assert binary_labels(t.drop(columns="pathology"), "d", "auto", 4).tolist() == [0, 0, 1, 1, -1]


def test_missing_or_bad_labels_are_clear_errors():
    with pytest.raises(DataError, match="dataset d: binary classes need a 'pathology' column or TI-RADS"):
        binary_labels(table(tirads=[None, None]), "d", "auto", 4)
    with pytest.raises(DataError, match="need a 'pathology' column"):
        binary_labels(table(tirads=[3, 4]), "d", "pathology", 4)
    with pytest.raises(DataError, match="sample s1 has pathology='malignant'"):
        binary_labels(table(pathology=[0, "malignant"]), "d", "auto", 4)


def test_relabel_swaps_classes_only_in_binary_mode_and_fails_without_labels(tmp_path):
    from bench.data import CLASS_NAMES, PreparedData

    t = table(tirads=[1, 4, 5, None])
    t["label"] = [0, 3, 4, -1]
    data = PreparedData("d", t, np.zeros((4, 8, 8)), np.zeros((4, 8, 8)), tmp_path, 2, 0)
    assert resolve("msmtl").base.relabel(data) is data
    binary = resolve("msmtl:classes=binary").base.relabel(data)
    assert binary.class_names == ("benign", "malignant") and binary.table["label"].tolist() == [0, 1, 1, -1]
    assert data.class_names == CLASS_NAMES and data.table["label"].tolist() == [0, 3, 4, -1]  # untouched
    unlabelled = PreparedData("d", t.assign(label=-1, tirads=pd.NA), data.images, data.masks, tmp_path, 2, 0)
    with pytest.raises(DataError, match="dataset d: msmtl needs class labels .* no training image has a tirads label"):
        resolve("msmtl").base.relabel(unlabelled)
    with pytest.raises(DataError, match="binary classes need a 'pathology' column or TI-RADS"):
        resolve("mtl-mc:classes=binary").base.relabel(unlabelled)


# ------------------------------------------------------------------ Eq. 12
def test_inconsistency_measures_on_hand_made_outputs():
    m = torch.zeros(2, 8, 8, dtype=torch.long)
    m[:, 2:6, 2:6] = 1  # both samples: a 16-pixel class-0 nodule
    multiclass = 10 * one_hot_map(m[0], 3).repeat(2, 1, 1, 1) - 5
    binary = torch.full((2, 1, 8, 8), -5.0)
    binary[0, 0, 2:6, 2:6] = 5  # sample 0: same region
    binary[1, 0, 2:6, 2:4] = 5  # sample 1: half of it
    cls = torch.tensor([[3.0, 0.0], [0.0, 3.0]])  # sample 1's classifier says class 1
    got = inconsistency(Output(seg=binary, cls=cls, extras={MULTICLASS_SEG: multiclass, BINARY_SEG: binary}))
    assert got["inconsis_cls"].tolist() == [0.0, 1.0]
    assert got["inconsis_seg2"].tolist() == pytest.approx([0.0, 0.5])
    assert got["inconsis_seg3"].tolist() == pytest.approx([0.0, 1.0])  # right place, wrong class
    # only what the outputs allow: a multi-class map + classifier (mtl-mc), nothing for vanilla
    assert set(inconsistency(Output(cls=cls, extras={MULTICLASS_SEG: multiclass}))) == {"inconsis_cls"}
    assert inconsistency(Output(seg=binary, cls=cls)) == {}
    background = 10 * one_hot_map(torch.zeros(8, 8), 3).repeat(2, 1, 1, 1)
    empty = inconsistency(Output(cls=cls, extras={MULTICLASS_SEG: background}))
    assert torch.isnan(empty["inconsis_cls"]).all()  # no nodule predicted: Seg-as-Cls is undefined


def test_summarize_averages_per_sample_extras():
    frame = pd.DataFrame({"sample_id": ["a", "b", "c"], "label": [0, 1, 0], "fold": [0, 0, 0],
                          "dice": [1.0, 0.5, 0.0], "inconsis_cls": [1.0, 0.0, np.nan], "empty": [np.nan] * 3})
    out = summarize(frame, 2)
    assert out["inconsis_cls"] == 0.5 and "empty" not in out and "fold" not in out


# ------------------------------------------------------------------ end to end
def test_every_variant_runs_end_to_end(tmp_path):
    from bench.runner import run_grid
    from bench.tracking import Workspace
    from bench.trainer import Runtime, TrainConfig

    cfg = TrainConfig(epochs=1, iters_per_epoch=2, batch_size=4, image_size=64, encoder="tu-resnet10t",
                      decoder_channels=(16, 8, 8, 8, 8), patience=0)
    variants = ["msmtl", "msmtl+intra", "msmtl+inter", "msmtl+intra+inter", "mtl-mc+inter", "msmtl:classes=binary+intra+inter"]
    outcomes = run_grid(variants, "synthetic:patients=20,images_per_patient=2,size=64", Workspace(tmp_path),
                        n_folds=2, folds=[0], cfg=cfg, runtime=Runtime(progress=False), echo=lambda s: None)
    assert [o.status for o in outcomes] == ["finished"] * len(variants)
    for o in outcomes:
        m = o.metrics
        assert 0 <= m["val/dice"] <= 1 and 0 <= m["val/inconsis_cls"] <= 1 and np.isfinite(m["val/f1"])
        assert ("val/inconsis_seg2" in m) == o.spec.method.name.startswith("msmtl")
    binary = outcomes[-1]
    ws = Workspace(tmp_path)
    local = ws.client.download_artifacts(binary.run_id, "predictions/val.csv", str(tmp_path / "dl"))
    pred = pd.read_csv(local)
    assert {"prob_0", "prob_1"} <= set(pred) and "prob_2" not in set(pred)
    assert set(pred["label"]) <= {0, 1}  # benign/malignant from TI-RADS >= 4 (synthetic has no pathology)
    for key in ("inconsis_cls", "inconsis_seg2", "inconsis_seg3"):
        assert pred[key].mean() == pytest.approx(binary.metrics[f"val/{key}"], abs=1e-5)
    history = ws.client.get_metric_history(binary.run_id, "train/loss_inter_t1t2t3")
    assert len(history) == 1 and history[0].value > 0
