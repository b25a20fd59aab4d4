"""RLAR (four layers) and Rep-MTL: reference values, layer choice, double backward, bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from bench.methods.repmtl import RepMTL, saliency_alignment, saliency_entropy
from torch import nn

from bench.errors import ConfigError
from bench.losses import soft_dice_loss, weighted_ce
from bench.method import METHODS, Losses, StepContext, resolve
from bench.models import ModelSpec, MultiTaskUNet, Output, TimmClassifier
from bench.runner import resolve_methods
from bench.trainer import TrainConfig

SPEC = ModelSpec(encoder="tu-resnet10t", decoder_channels=(8, 8, 8, 8, 8))
# the intended encoder stage (index into the 5 stages) of each RLAR variant, written out by hand
STAGES = {"rlar": (4,), "rlar@last": (3,), "rlar@mid": (2,), "rlar@mean": (2, 3, 4)}
STRIDES = {4: 32, 3: 16, 2: 8}


@pytest.fixture(scope="module")
def unet() -> MultiTaskUNet:
    torch.manual_seed(0)
    return MultiTaskUNet(SPEC)


@pytest.fixture(scope="module")
def batch() -> SimpleNamespace:
    g = torch.Generator().manual_seed(1)
    image = torch.randn(3, 1, 64, 64, generator=g)
    mask = (torch.rand(3, 1, 64, 64, generator=g) > 0.7).float()
    return SimpleNamespace(image=image, mask=mask, label=torch.tensor([0, 2, 4]))


def ctx() -> StepContext:
    return StepContext(0, 0, torch.tensor([1.0, 2.0, 0.5, 1.0, 1.5]))


def regularizer(name: str, **overrides):
    method = resolve(name if not overrides else name + ":" + ",".join(f"{k}={v}" for k, v in overrides.items()))
    return method.base, method.regularizers[0]


def reference_rlar(model: MultiTaskUNet, batch, stages: tuple[int, ...], lam: float, eps: float = 1e-12) -> torch.Tensor:
    """rlar.md Eqs. 4-6 written out sample by sample, on the encoder's own stage outputs."""
    feats = model.encoder(batch.image)
    seg = model.segmentation_head(model.decoder(feats))
    cls, _ = model.head(feats[-1])
    task_losses = [soft_dice_loss(seg, batch.mask), weighted_ce(cls, batch.label, ctx().class_weights)]
    per_layer = []
    for stage in stages:
        z = feats[1 + stage]
        g_seg, g_cls = (torch.autograd.grad(loss, z, create_graph=True)[0] for loss in task_losses)
        values = []
        for b in range(z.shape[0]):
            d_seg = g_seg[b].reshape(-1) / (torch.linalg.norm(g_seg[b]) + eps)
            d_cls = g_cls[b].reshape(-1) / (torch.linalg.norm(g_cls[b]) + eps)
            values.append(abs(torch.dot(d_seg, d_cls) / (torch.linalg.norm(d_seg) * torch.linalg.norm(d_cls))))
        per_layer.append(sum(values) / len(values))
    return lam * sum(per_layer) / len(per_layer)


def grads_of(model: nn.Module, value: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters()]
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(value, params, retain_graph=True, allow_unused=True), params, strict=True)]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_rlar_equals_a_straightforward_computation_at_the_intended_layer(unet, batch, name):
    """The value matches Eqs. 4-6 on the hand-picked encoder stage(s); for ``mean`` (all three stages)
    so does the parameter gradient (double backward)."""
    unet.eval()  # deterministic forward: both computations see the same graph values
    base, reg = regularizer(name, lambda_rlar=0.7)
    out = unet(batch.image)
    penalty = reg.penalty(out, base.losses(out, batch, ctx()), batch, unet)[name]
    expected = reference_rlar(unet, batch, STAGES[name], lam=0.7)
    assert float(penalty.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert 0 < float(penalty.detach()) < 0.7
    if name == "rlar@mean":
        for ours, ref in zip(grads_of(unet, penalty), grads_of(unet, expected), strict=True):
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7)
    # the maps the variant names are the stages intended: stride and channel count
    chosen = [out.features[n] for n in reg.layers_of(unet)]
    for z, stage in zip(chosen, STAGES[name], strict=True):
        assert z.shape[-1] == 64 // STRIDES[stage] and z.shape[1] == unet.encoder.out_channels[1 + stage]
    unet.train()


def test_mean_variant_names_its_three_layers_and_logs_each(unet, batch):
    base, reg = regularizer("rlar@mean")
    assert reg.layers_of(unet) == ("mid", "last", "bottleneck")
    out = unet(batch.image)
    for _ in range(2):
        reg.penalty(out, base.losses(out, batch, ctx()), batch, unet)
    diag = reg.diagnostics()
    per_layer = [diag[f"abs_cos/{n}"] for n in ("mid", "last", "bottleneck")]
    assert diag["abs_cos"] == pytest.approx(sum(per_layer) / 3, rel=1e-5)
    assert diag["penalty"] == pytest.approx(0.1 * diag["abs_cos"], rel=1e-5)
    assert all(abs(diag[f"cos/{n}"]) <= a + 1e-7 for n, a in zip(("mid", "last", "bottleneck"), per_layer, strict=True))
    assert reg.diagnostics() == {}  # reset after each epoch


class LinearProbe(nn.Module):
    """z = the parameter itself (B x C x 1 x 1); each task loss is linear in z, so dL_t/dz is chosen freely."""

    layers = {"bottleneck": 0}

    def __init__(self, batch: int = 3, channels: int = 4) -> None:
        super().__init__()
        self.z = nn.Parameter(torch.randn(batch, channels, 1, 1))

    def losses(self, a: torch.Tensor, b: torch.Tensor) -> tuple[Output, Losses]:
        out = Output(features={"bottleneck": self.z * 1.0})
        z = out.features["bottleneck"]
        return out, Losses(tasks={"seg": (a * z).sum(), "cls": (b * z).sum()})  # gradients: a and b


@pytest.mark.parametrize(("relation", "expected"), [("orthogonal", 0.0), ("parallel", 0.7), ("opposite", 0.7), ("zero", 0.0)])
def test_rlar_is_zero_when_orthogonal_and_lambda_when_parallel_or_opposite(relation, expected):
    torch.manual_seed(0)
    probe = LinearProbe()
    a = torch.randn(3, 4, 1, 1)
    ortho = torch.randn(3, 4, 1, 1)
    ortho -= (ortho * a).sum(1, keepdim=True) / (a * a).sum(1, keepdim=True) * a
    b = {"orthogonal": ortho, "parallel": 3.0 * a, "opposite": -0.01 * a, "zero": 0.0 * a}[relation]
    _, reg = regularizer("rlar", lambda_rlar=0.7)
    out, losses = probe.losses(a, b)
    value = reg.penalty(out, losses, None, probe)["rlar"]
    assert float(value.detach()) == pytest.approx(expected, abs=1e-6)


def test_a_sample_without_a_label_has_no_direction_and_finite_gradients(unet, batch):
    """A batch without TI-RADS labels: the classification gradient is 0, |cos| is 0, the backward stays finite."""
    base, reg = regularizer("rlar@mid")
    unlabelled = SimpleNamespace(image=batch.image, mask=batch.mask, label=torch.full((3,), -1))
    out = unet(unlabelled.image)
    value = reg.penalty(out, base.losses(out, unlabelled, ctx()), unlabelled, unet)["rlar@mid"]
    assert float(value.detach()) == 0.0
    grads = torch.autograd.grad(value, unet.shared_parameters(), allow_unused=True)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)


@pytest.mark.parametrize(("name", "autocast"), [*((n, False) for n in [*sorted(STAGES), "rep-mtl"]),
                                                ("rlar@mean", True), ("rep-mtl", True)])
def test_penalty_gradient_reaches_the_encoder_and_both_heads(unet, batch, name, autocast):
    """Only the penalty is back-propagated: its double backward must train all three parts."""
    if autocast and not _cpu_bf16_autocast_works():
        pytest.skip("CPU autocast with bfloat16 is not supported here")
    base, reg = regularizer(name)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = unet(batch.image)
        penalty = sum(reg.penalty(out, base.losses(out, batch, ctx()), batch, unet).values())
    assert penalty.dtype == torch.float32 and torch.isfinite(penalty)
    groups = {"encoder": unet.shared_parameters(), **unet.task_parameters()}
    params = [p for g in groups.values() for p in g]
    grads = dict(zip(map(id, params), torch.autograd.grad(penalty, params, allow_unused=True), strict=True))
    norms = {k: sum(float(grads[id(p)].abs().sum()) for p in g if grads[id(p)] is not None) for k, g in groups.items()}
    assert set(norms) == {"encoder", "seg", "cls"}
    assert all(v > 0 and math.isfinite(v) for v in norms.values()), norms


def _cpu_bf16_autocast_works() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = torch.randn(2, 3, requires_grad=True)
            y = (x @ x.T).sum()
        (g,) = torch.autograd.grad(y, x, create_graph=True)
        g.sum().backward()
        return True
    except RuntimeError:
        return False


# -------------------------------------------------------------------- Rep-MTL


def oracle_saliencies() -> torch.Tensor:
    """methods.md §3: T=2, B=2, C=2, H'=1, W'=2 (rows = channels, columns = positions), as T x B x C x H x W."""
    s1 = [[[1, 2], [0, -1]], [[0.5, 0], [1, 1]]]
    s2 = [[[-1, 1], [2, 0]], [[1, 1], [0, -2]]]
    return torch.tensor([s1, s2], dtype=torch.float32).unsqueeze(3)


def test_repmtl_reproduces_the_numeric_example():
    s = oracle_saliencies()
    assert float(saliency_entropy(s)) == pytest.approx((3 * math.log(2) + 0.6730116670092565) / 4, abs=1e-6)
    assert float(saliency_entropy(s)) == pytest.approx(0.688113, abs=1e-6)
    expected = {(0.1, False): 0.007264, (1.0, False): 0.000726, (0.1, True): 0.884464, (1.0, True): 0.695608}
    for (tau, positive), value in expected.items():
        assert float(saliency_alignment(s, tau, positive)) == pytest.approx(value, abs=2e-6), (tau, positive)


def test_repmtl_penalty_differentiates_the_task_losses_to_the_saliencies():
    """Losses linear in z with dL_t/dz = S_t of the example: the penalty is 0.9 x the example's values."""
    s = oracle_saliencies()
    z = torch.zeros(2, 2, 1, 2, requires_grad=True)
    feature = z * 1.0
    losses = Losses(tasks={"seg": (s[0] * feature).sum() * 1e-6, "cls": (s[1] * feature).sum() * 1e-6})
    _, reg = regularizer("rep-mtl", tau=1.0)
    terms = reg.penalty(Output(features={"bottleneck": feature}), losses, None, LinearProbe())
    assert float(terms["rep-mtl.tsr"].detach()) == pytest.approx(0.9 * 0.688113, abs=1e-6)  # the 1e-6 scale does not matter
    assert float(terms["rep-mtl.csa"].detach()) == pytest.approx(0.9 * 0.000726, abs=2e-6)
    assert reg.diagnostics() == pytest.approx({"tsr": 0.688113, "csa": 0.000726}, abs=2e-6)


def test_repmtl_needs_two_samples_per_batch_before_training():
    with pytest.raises(ConfigError, match=r"rep-mtl: .*batch size of 2 or more \(got 1; --batch-size\)"):
        resolve_methods(["rlar", "rep-mtl"], TrainConfig(batch_size=1, encoder="tu-resnet10t",
                                                         decoder_channels=(8, 8, 8, 8, 8)), 5)
    assert [m.name for m in resolve_methods(["rep-mtl"], TrainConfig(batch_size=2, encoder="tu-resnet10t",
                                                                     decoder_channels=(8, 8, 8, 8, 8)), 5)] == ["rep-mtl"]
    z = torch.zeros(1, 2, 1, 2, requires_grad=True)
    with pytest.raises(ConfigError, match="got 1"):
        RepMTL().penalty(Output(features={"bottleneck": z}), Losses({"seg": z.sum(), "cls": z.sum()}), None, LinearProbe())


# -------------------------------------------------------------------- bad input and composition


def test_a_layer_the_model_lacks_is_an_error_listing_the_valid_ones():
    classifier = TimmClassifier("resnet10t", ModelSpec(num_classes=5, in_channels=1))
    with pytest.raises(ConfigError, match=r"rlar@mid: layer 'mid' does not exist for TimmClassifier; valid layers: bottleneck, mean"):
        METHODS.get("rlar@mid")().configure(classifier)
    with pytest.raises(ConfigError, match=r"rlar@mean: layer 'mean' needs 3 encoder stages but TimmClassifier exposes 1"):
        METHODS.get("rlar@mean")().configure(classifier)
    METHODS.get("rlar")().configure(classifier)  # the bottleneck exists
    with pytest.raises(ConfigError, match="exposes no named encoder feature maps"):
        RepMTL().configure(nn.Linear(2, 2))


def test_single_task_bases_are_rejected_and_recipes_compose():
    from bench.params import ParamError

    with pytest.raises(ParamError, match="rlar@mid needs 2 tasks but st-unet trains 1"):
        resolve("st-unet+rlar@mid")
    assert resolve("vanilla+rlar@mid:lambda_rlar=0.05").name == "rlar@mid:lambda_rlar=0.05"
    assert resolve("rlar@mean+rep-mtl").params()["rep-mtl.tau"] == 0.1
    if "clinical" not in METHODS.names():
        pytest.skip("the clinical base is not registered yet")
    method = resolve("clinical+rlar@mid:lambda_rlar=0.05")
    assert method.name == "clinical+rlar@mid:lambda_rlar=0.05" and method.base.info.name == "clinical"


def test_rlar_trains_the_clinical_head(batch):
    """On the clinically guided model (its own head), only the feature contract is used: the penalty reaches that head."""
    if "clinical" not in METHODS.names():
        pytest.skip("the clinical base is not registered yet")
    method = resolve("clinical+rlar")
    torch.manual_seed(0)
    model = method.base.build_model(SPEC)
    reg = method.regularizers[0]
    reg.configure(model)
    out = model(batch.image)
    losses = Losses({"seg": soft_dice_loss(out.seg, batch.mask), "cls": weighted_ce(out.cls, batch.label, ctx().class_weights)})
    value = reg.penalty(out, losses, batch, model)["rlar"]
    head = [p for p in model.head.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, head, allow_unused=True)
    assert 0 < float(value.detach()) < 0.1 and any(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_bench_run_logs_the_penalty_and_cosines_per_epoch(tmp_path):
    """Through the runner: the penalties train, and every epoch logs them to MLflow under valid names."""
    from bench.runner import run_grid
    from bench.tracking import Workspace, all_runs
    from bench.trainer import Runtime

    cfg = TrainConfig(epochs=2, iters_per_epoch=2, batch_size=2, image_size=64, encoder="tu-resnet10t",
                      decoder_channels=(8, 8, 8, 8, 8), patience=0)
    ws = Workspace(tmp_path / "ws")
    outcomes = run_grid(["rlar@mean"], "synthetic:patients=20,images_per_patient=1,size=64",
                        ws, n_folds=2, folds=[0], cfg=cfg, runtime=Runtime(progress=False), echo=lambda s: None)
    assert [o.status for o in outcomes] == ["finished"]
    (rlar,) = all_runs(ws)
    assert rlar.data.params["method.rlar_mean.lambda_rlar"] == "0.1"  # '@' is not allowed in MLflow names
    history = ws.client.get_metric_history(rlar.info.run_id, "diag/rlar_mean/penalty")
    assert [m.step for m in history] == [0, 1]
    cosines = [rlar.data.metrics[f"diag/rlar_mean/abs_cos/{n}"] for n in ("mid", "last", "bottleneck")]
    assert rlar.data.metrics["diag/rlar_mean/penalty"] == pytest.approx(0.1 * sum(cosines) / 3, rel=1e-5)
    assert rlar.data.metrics["train/loss_rlar_mean"] == pytest.approx(rlar.data.metrics["diag/rlar_mean/penalty"], rel=1e-5)
