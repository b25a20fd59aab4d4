"""Gradient-combination methods on fixed Jacobians (reference values from
shared/reference/methods.md), their properties, and the shared mechanism on a real U-Net."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchjd.aggregation as jd
import torchjd.scalarization as jds
from bench.methods.aligned_mtl import aligned_weights
from bench.methods.cagrad import cagrad_weights
from bench.methods.famo import FAMO, famo_logit_grad, famo_objective
from bench.methods.gradnorm import gradnorm_objective
from bench.methods.imtl import imtl_weights
from bench.methods.loss_weighting import DWA, UncertaintyWeighting, dwa_weights, uw_loss
from bench.methods.mgda import mgda_weights
from bench.methods.nash_mtl import NashSolver, nash_weights
from bench.methods.pcgrad import pcgrad_weights
from bench.methods.upgrad import upgrad_weights

from bench import params as P
from bench.gradients import GradientCombiner, mean_cosine
from bench.losses import soft_dice_loss, weighted_ce
from bench.method import Losses, MethodInfo, StepContext, resolve
from bench.models import ModelSpec, MultiTaskUNet


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


J2 = t([[-4, 1, 1], [6, 1, 1]])  # conflicting (cosine < 0)
J2N = t([[1, 1, 0], [1, 0, 1]])  # no conflict
J3 = t([[1, 0, 0], [-1, 1, 0], [0, -2, 1]])
OPPOSITE = t([[-4, 1, 1], [4, -1, -1]])
WITH_ZERO = t([[-4, 1, 1], [0, 0, 0]])


def gram(j: torch.Tensor) -> torch.Tensor:
    return j @ j.T


def close(actual, expected, tol=1e-6) -> None:
    actual, expected = (x.detach() if isinstance(x, torch.Tensor) else x for x in (actual, expected))
    np.testing.assert_allclose(np.asarray(actual, dtype=float), np.asarray(expected, dtype=float), atol=tol, rtol=0)


def combiner(name: str) -> GradientCombiner:
    c = resolve(name).combiner
    assert isinstance(c, GradientCombiner)
    return c


def update(name: str, j: torch.Tensor, losses=(1.0, 1.0)) -> torch.Tensor:
    return combiner(name).weigh(gram(j), t(list(losses)[: len(j)])) @ j


# ---------------------------------------------------------------- PCGrad
def test_pcgrad_reference_two_tasks():
    w = pcgrad_weights(gram(J2))
    close(w, [1 + 22 / 18, 1 + 22 / 38])
    close(w @ J2, [0.584795, 3.801170, 3.801170])
    close(jd.PCGradWeighting()(gram(J2)), w)  # torchjd, an independent implementation
    close(update("pcgrad", J2N), [2, 1, 1])


def test_pcgrad_three_tasks_fixed_orders():
    ascending = [[1, 2], [0, 2], [0, 1]]
    w = pcgrad_weights(gram(J3), orders=ascending)
    close(w, [2, 2.5, 1.6])
    close(w @ J3, [-0.5, -0.7, 1.6])
    w = pcgrad_weights(gram(J3), orders=[list(reversed(o)) for o in ascending])
    close(w, [3, 2.5, 1.4])
    close(w @ J3, [0.5, -0.3, 1.4])


def test_pcgrad_properties():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 50, generator=g, dtype=torch.float64)  # positive entries: no conflict
    close(update("pcgrad", torch.stack([a, b])), a + b, 1e-12)
    close(update("pcgrad", OPPOSITE), [0, 0, 0], 1e-12)
    close(update("pcgrad", J2.flip(0)), update("pcgrad", J2), 1e-12)  # order of two tasks is irrelevant
    assert torch.isfinite(update("pcgrad", WITH_ZERO)).all()
    close(update("pcgrad", WITH_ZERO), WITH_ZERO.sum(0))


# ---------------------------------------------------------------- CAGrad
@pytest.mark.parametrize(("c", "rescale", "sum_scale", "expected"), [
    (0.4, 0, False, [0.346803, 1.163299, 1.163299]),
    (0.4, 1, False, [0.298968, 1.002844, 1.002844]),
    (0.4, 1, True, [0.597936, 2.005688, 2.005688]),
    (0.5, 0, False, [0.183503, 1.204124, 1.204124]),
    (0.5, 1, False, [0.146803, 0.963299, 0.963299]),
    (0.5, 1, True, [0.293605, 1.926599, 1.926599]),
    (0.4, 2, False, [0.247716, 0.830928, 0.830928]),
])
def test_cagrad_reference_table(c, rescale, sum_scale, expected):
    w, ok = cagrad_weights(gram(J2), c, rescale, sum_scale)
    assert ok
    close(w @ J2, expected)


def test_cagrad_defaults_are_official_and_relate_to_torchjd():
    close(update("cagrad", J2), [0.597936, 2.005688, 2.005688])  # c=0.4, rescale 1, x K
    close(cagrad_weights(gram(J2N), 0.4, 0, False)[0] @ J2N, [1.4, 0.7, 0.7])
    close(cagrad_weights(gram(J2N), 0.4, 1, False)[0] @ J2N, [1.206897, 0.603448, 0.603448])
    w3, _ = cagrad_weights(gram(J3), 0.4, 0, False)
    close(w3 @ J3, [-0.081694, -0.163387, 0.333333], 1e-3)
    g = torch.Generator().manual_seed(1)
    for k in (2, 3):
        j = torch.randn(k, 20, generator=g, dtype=torch.float64)
        ours = combiner("cagrad").weigh(gram(j), torch.ones(k)) @ j
        theirs = jd.CAGradWeighting(c=0.4)(gram(j)) @ j  # official = torchjd x K / (1 + c^2)
        close(ours, theirs * k / (1 + 0.4**2), 1e-6 if k == 2 else 1e-3)


def test_cagrad_properties():
    close(update("cagrad", OPPOSITE), [0, 0, 0], 1e-6)
    same = t([[1, 2, 3], [1, 2, 3]])
    close(cagrad_weights(gram(same), 0.4, 0, False)[0] @ same, (1 + 0.4) * same[0], 1e-6)
    close(cagrad_weights(gram(J2), 0.0, 0, False)[0] @ J2, J2.mean(0))  # c = 0: the mean gradient
    zero = update("cagrad", WITH_ZERO)  # official: g0 / (1 + c^2) x K, not torchjd's zero
    assert torch.isfinite(zero).all()
    close(zero, WITH_ZERO.mean(0) * 2 / (1 + 0.16), 1e-3)  # the solver stops ~1e-8 from the vertex


def test_cagrad_out_of_range_names_method_parameter_and_range():
    with pytest.raises(P.ParamError, match=r"method cagrad: parameter c=1\.0 is out of range; valid: \[0\.0, 1\.0\)"):
        resolve("cagrad:c=1")
    with pytest.raises(P.ParamError, match=r"method cagrad: unknown parameter alpha; valid parameters: c \(\[0\.0, 1\.0\)\)"):
        resolve("cagrad:alpha=0.5")
    with pytest.raises(P.ParamError, match=r"method nash-mtl: parameter max_norm=-1\.0 is out of range"):
        resolve("nash-mtl:max_norm=-1")


# ---------------------------------------------------------------- MGDA
def test_mgda_reference():
    close(mgda_weights(gram(J2)), [0.6, 0.4])
    close(update("mgda", J2), [0, 1, 1])
    close(update("mgda", J2N), [1, 0.5, 0.5])
    close(mgda_weights(gram(J3)), [13 / 30, 12 / 30, 5 / 30], 1e-3)
    close(update("mgda", WITH_ZERO), [0, 0, 0])  # exact: the zero vector is in the hull
    close(update("mgda", OPPOSITE), [0, 0, 0])


def test_mgda_normalisation_solves_on_normalised_gradients():
    unit = J2 / J2.norm(dim=1, keepdim=True)
    w = mgda_weights(gram(J2), t([2.0, 0.5]), "l2")
    close(w, mgda_weights(gram(unit)))  # the min-norm point of the unit gradients, applied to raw J
    scaled = J2 / t([2.0, 0.5])[:, None]
    close(mgda_weights(gram(J2), t([2.0, 0.5]), "loss"), mgda_weights(gram(scaled)))


# ---------------------------------------------------------------- Nash-MTL
def test_nash_reference_and_torchjd():
    alpha = nash_weights(gram(J2), NashSolver(2), max_norm=0.0)
    close(alpha, [0.591461, 0.407072], 1e-4)
    close(alpha @ J2, [0.076584, 0.998533, 0.998533], 1e-4)
    close(jd.NashMTL(n_tasks=2, max_norm=0.0)(J2), alpha @ J2, 1e-4)
    close(nash_weights(gram(J2), NashSolver(2), max_norm=1.0) @ J2, [0.054153, 0.706069, 0.706069], 1e-4)
    close(nash_weights(gram(J2N), NashSolver(2), 0.0), [0.57735, 0.57735], 1e-4)
    diag = t([[1, 0, 0], [0, 2, 0]])
    close(nash_weights(gram(diag), NashSolver(2), 0.0) @ diag, [1, 1, 0], 1e-4)
    # the bargaining solution: ||update||^2 = K and g_i . update = 1 / alpha_i
    upd = alpha @ J2
    close(upd @ upd, 2.0, 1e-3)
    close(J2 @ upd, 1 / alpha, 1e-3)


def test_nash_solver_failure_keeps_alpha_and_is_counted():
    method = combiner("nash-mtl:max_norm=0")
    method.task_names = ["a", "b", "c"]
    with pytest.warns(RuntimeWarning, match="nash-mtl: the Nash-MTL solver failed"):
        w = method.weigh(gram(J3), torch.ones(3))
    close(w, [1, 1, 1])  # as the reference code: alpha stays at its start value
    assert method.diagnostics()["fallbacks"] >= 1
    assert method.diagnostics()["fallbacks"] == 0  # reset per epoch


def test_nash_state_is_the_warm_start():
    first = combiner("nash-mtl")
    first.weigh(gram(J2), torch.ones(2))
    state = first.state_dict()
    close(state["alpha"], [0.591461, 0.407072], 1e-4)
    fresh = combiner("nash-mtl")
    fresh.load_state_dict(state)
    assert fresh.solver is not None
    close(fresh.solver.alpha, state["alpha"], 0)


# ---------------------------------------------------------------- IMTL-G, Aligned-MTL, UPGrad
def test_imtl_reference_and_equal_projections():
    close(imtl_weights(gram(J2)), [0.592330, 0.407670])
    close(update("imtl", J2), [0.076697, 1, 1])
    close(imtl_weights(gram(J3)), [0.426314, 0.402013, 0.171673])
    upd = update("imtl", J3)
    projections = (J3 / J3.norm(dim=1, keepdim=True)) @ upd
    close(projections, projections[0].repeat(3), 1e-9)


def test_aligned_mtl_reference():
    close(aligned_weights(gram(J2)), [2 * 0.559072, 2 * 0.408261])  # p = ones: K x torchjd's 1/K
    close(update("aligned-mtl", J2), 2 * t([0.213279, 0.967333, 0.967333]))


def test_upgrad_reference():
    close(upgrad_weights(gram(J2)), [1.110921, 0.789431])
    close(update("upgrad", J2), [0.292902, 1.900352, 1.900352])
    close(upgrad_weights(gram(J2)), [10 / 9, 15 / 19], 1e-3)  # the exact QP
    close(update("upgrad", J2), update("pcgrad", J2) / 2, 1e-3)  # two conflicting tasks: PCGrad / 2


@pytest.mark.parametrize("name", ["pcgrad", "cagrad", "mgda", "nash-mtl", "imtl", "aligned-mtl", "upgrad", "gradnorm"])
def test_every_gradient_method_is_finite_with_a_zero_task_gradient(name):
    with np.errstate(all="ignore"):
        assert torch.isfinite(update(name, WITH_ZERO)).all()


# ---------------------------------------------------------------- loss weighting
def test_famo_two_step_reference_and_torchjd():
    logits = torch.zeros(2, requires_grad=True)
    adam = torch.optim.Adam([logits], lr=0.025, weight_decay=1e-3)
    loss, weights = famo_objective(torch.tensor([1.0, 3.0]), logits)
    close(weights, [0.75, 0.25])
    close(loss, 0.823959)
    logits.grad = famo_logit_grad(logits, torch.tensor([1.0, 3.0]), torch.tensor([0.5, 2.9]))
    adam.step()
    close(logits.detach(), [-0.025, 0.025], 1e-6)
    close(torch.softmax(logits.detach(), 0), [0.487503, 0.512497])
    _, weights = famo_objective(torch.tensor([0.5, 2.9]), logits)
    close(weights, [0.846558, 0.153442])
    theirs = jds.FAMO(2)  # torchjd's FAMO on the same two steps
    close(theirs(torch.tensor([1.0, 3.0])), 0.823959)
    theirs.update(torch.tensor([0.5, 2.9]))
    close(theirs._w.detach(), logits.detach(), 1e-7)


def test_famo_method_updates_its_logits_after_the_step():
    famo = resolve("famo").combiner
    assert isinstance(famo, FAMO)
    x = torch.ones(3, requires_grad=True)
    losses = Losses(tasks={"seg": (x * 1.0).sum() / 3, "cls": (x * 3.0).sum() / 3})
    famo.backward(losses, torch.nn.Linear(1, 1), StepContext(0, 0, torch.ones(5)))
    close(x.grad, [0.75 * 1 / 3 + 0.25 * 1.0] * 3)  # sum_i w_i grad L_i, w = [0.75, 0.25]
    famo.after_step(lambda: {"seg": torch.tensor(0.5), "cls": torch.tensor(2.9)})
    close(famo.logits.detach(), [-0.025, 0.025], 1e-6)
    close(famo.diagnostics()["weight_seg"], 0.75)


def test_uw_matches_torchjd_and_learns_the_log_variances():
    values = torch.tensor([0.7, 2.0])
    theirs = jds.UW(2)
    close(uw_loss(values, torch.zeros(2)), theirs(values))
    uw = resolve("uw").combiner
    assert isinstance(uw, UncertaintyWeighting)
    x = torch.ones(1, requires_grad=True)
    uw.backward(Losses(tasks={"seg": 0.7 * x.sum(), "cls": 2.0 * x.sum()}), torch.nn.Linear(1, 1), StepContext(0, 0, torch.ones(5)))
    close(x.grad, [0.5 * 0.7 + 0.5 * 2.0])  # weights 0.5 exp(-s) at s = 0
    # d/ds_i = 0.5 - 0.5 L_i: Adam's first step moves s_i by lr against its sign
    close(uw.log_vars.detach(), [-3e-4, 3e-4], 1e-9)


def test_dwa_reference_and_epoch_state():
    close(dwa_weights([0.5, 0.9], [1.0, 1.0], 2.0), [0.900332, 1.099668])
    dwa = resolve("dwa").combiner
    assert isinstance(dwa, DWA)
    dwa.task_names = ["seg", "cls"]
    assert dwa.current_weights(["seg", "cls"]) == [1.0, 1.0]
    dwa.on_epoch_end(0, {"seg": 1.0, "cls": 1.0, "clin": 5.0})
    assert dwa.current_weights(["seg", "cls"]) == [1.0, 1.0]  # weights 1 for the first two epochs
    dwa.on_epoch_end(1, {"seg": 0.5, "cls": 0.9})
    close(dwa.current_weights(["seg", "cls"]), [0.900332, 1.099668])


def test_gradnorm_objective_and_direction():
    g = gram(t([[3, 0], [0, 1]]))  # ||g_1|| = 3, ||g_2|| = 1
    # equal weighted norms and equal training rates: nothing to correct
    balanced = torch.log(t([1 / 3, 1.0])).requires_grad_()
    close(gradnorm_objective(balanced, g, t([1.0, 1.0]), t([1.0, 1.0]), 1.5), 0, 1e-12)
    logits = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    # weighted norms [3, 1], mean 2, equal rates: |3 - 2| + |1 - 2|
    objective = gradnorm_objective(logits, g, t([1.0, 1.0]), t([1.0, 1.0]), 1.5)
    close(objective, 2.0)
    (grad,) = torch.autograd.grad(objective, logits)
    assert grad[0] > 0 > grad[1]  # a descent step lowers the weight of the task with the larger gradient
    method = combiner("gradnorm")
    method.task_names = ["seg", "cls"]
    close(method.weigh(g, t([1.0, 1.0])), [1, 1])  # equal weights during epoch 0
    method.on_epoch_end(0, {"seg": 1.0, "cls": 1.0})
    method.weigh(g, t([1.0, 1.0]))
    w = method.weigh(g, t([1.0, 1.0]))
    assert w[0] < 1 < w[1] and math.isclose(float(w.sum()), 2.0)


# ---------------------------------------------------------------- the shared mechanism
class PlainSum(GradientCombiner):
    info = MethodInfo("plain-sum-test", "combiner", "gradient", "", "", min_tasks=2)

    def weigh(self, gramian, losses):
        return torch.ones(gramian.shape[0], dtype=gramian.dtype)


def unet_losses(model: MultiTaskUNet, seed: int = 0, cls_sign: float = 1.0) -> Losses:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 1, 64, 64, generator=g)
    mask = (torch.rand(2, 1, 64, 64, generator=g) > 0.6).float()
    out = model(image)
    cls = weighted_ce(out.cls, torch.tensor([1, 3]), torch.ones(5))
    return Losses(tasks={"seg": soft_dice_loss(out.seg, mask), "cls": cls_sign * cls},
                  extra={"reg": 0.1 * out.features["bottleneck"].pow(2).mean()})


@pytest.fixture(scope="module")
def unet() -> MultiTaskUNet:
    torch.manual_seed(0)
    return MultiTaskUNet(ModelSpec(encoder="tu-resnet10t", decoder_channels=(16, 8, 8, 8, 8))).eval()


def param_grads(model, combine) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    combine()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_plain_sum_aggregator_equals_a_plain_backward(unet):
    """The U-Net's nested skip features must not be counted twice (perf-baseline.md's torchjd trap)."""
    ctx = StepContext(0, 0, torch.ones(5))
    plain = param_grads(unet, lambda: unet_losses(unet).total().backward())
    combined = param_grads(unet, lambda: PlainSum().backward(unet_losses(unet), unet, ctx))
    assert plain.keys() == combined.keys() == {n for n, _ in unet.named_parameters()}
    for n in plain:
        torch.testing.assert_close(combined[n], plain[n], rtol=1e-4, atol=1e-7, msg=n)


def test_heads_get_their_own_plain_gradient_and_the_encoder_the_aggregate(unet):
    ctx = StepContext(0, 0, torch.ones(5))
    seg_only = param_grads(unet, lambda: unet_losses(unet, cls_sign=-1.0).tasks["seg"].backward())
    cls_only = param_grads(unet, lambda: unet_losses(unet, cls_sign=-1.0).tasks["cls"].backward())
    method = combiner("pcgrad")
    got = param_grads(unet, lambda: method.backward(Losses(tasks=unet_losses(unet, cls_sign=-1.0).tasks), unet, ctx))
    for n, _ in unet.named_parameters():
        if n.startswith(("decoder.", "segmentation_head.")):
            torch.testing.assert_close(got[n], seg_only[n], msg=n)
        elif n.startswith("head."):
            torch.testing.assert_close(got[n], cls_only[n], msg=n)
    names = [n for n, _ in unet.named_parameters() if n.startswith("encoder.")]
    j = torch.stack([torch.cat([seg_only[n].flatten() for n in names]), torch.cat([cls_only[n].flatten() for n in names])]).double()
    expected = pcgrad_weights(gram(j)) @ j
    torch.testing.assert_close(torch.cat([got[n].flatten() for n in names]).double(), expected, rtol=1e-4, atol=1e-8)
    diag = method.diagnostics()
    close(diag["cosine"], mean_cosine(gram(j)), 1e-5)
    assert diag["cosine"] < 0  # the flipped classification loss conflicts with segmentation
    close(diag["weight_seg"], pcgrad_weights(gram(j))[0], 1e-4)
    assert diag["fallbacks"] == 0


def test_amp_scale_scales_the_update_and_not_the_weights(unet):
    plain_ctx = StepContext(0, 0, torch.ones(5))
    scaled_ctx = StepContext(0, 0, torch.ones(5), scale=lambda x: x * 1024.0)
    for name in ("cagrad", "nash-mtl"):  # both nonlinear in the Gramian's scale
        base = param_grads(unet, lambda name=name: combiner(name).backward(unet_losses(unet), unet, plain_ctx))
        scaled = param_grads(unet, lambda name=name: combiner(name).backward(unet_losses(unet), unet, scaled_ctx))
        for n in base:
            torch.testing.assert_close(scaled[n] / 1024.0, base[n], rtol=1e-4, atol=1e-8, msg=f"{name} {n}")

