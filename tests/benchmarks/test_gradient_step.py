"""Step time of every combiner relative to ``vanilla``, and of PCGrad/CAGrad relative to the floor
"one backward per task, then combine" (CPU, batch 8, 64 px, the default ResNet-34 U-Net).

All variants run interleaved in one process (each round runs every variant once, starting one
later than the round before), and each ratio is taken within a round, then the median over
rounds: absolute times on a shared CPU drift, same-round ratios do not (perf-baseline.md).
Run with ``pytest tests/benchmarks/test_gradient_step.py --benchmark-enable -s``; the normal suite
runs one round on a tiny model, untimed, and checks that the floor computes the same update.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import pytest
import torch
from bench.methods.cagrad import cagrad_weights

from bench.data import Batch
from bench.method import METHODS, Method, StepContext, resolve
from bench.models import ModelSpec

FULL = ModelSpec()  # resnet34, decoder (256, 128, 64, 32, 16)
ROUNDS = 4
TINY = ModelSpec(encoder="tu-resnet10t", decoder_channels=(16, 8, 8, 8, 8))


def floor_step(model, method: Method, batch: Batch, ctx: StepContext, combine: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Plain per-task ``backward`` (the LibMTL way), shared grads flattened, combined, written back."""
    shared = list(model.shared_parameters())
    losses = list(method.base.losses(model(batch.image), batch, ctx).tasks.values())
    rows = []
    for i, loss in enumerate(losses):
        for p in shared:
            p.grad = None
        loss.backward(retain_graph=i < len(losses) - 1)
        rows.append(torch.cat([p.grad.flatten() for p in shared]))
    update = combine(torch.stack(rows))
    offset = 0
    for p in shared:
        p.grad = update[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def pcgrad_two_tasks(j: torch.Tensor) -> torch.Tensor:
    g1, g2 = j
    dot = torch.dot(g1, g2).clamp(max=0)
    return g1 - dot / g2.dot(g2) * g2 + g2 - dot / g1.dot(g1) * g1


def cagrad_official(j: torch.Tensor) -> torch.Tensor:
    weights, _ = cagrad_weights((j @ j.T).double(), 0.4)
    return weights.to(j) @ j


def variants(spec: ModelSpec, only: tuple[str, ...] = ()) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    size = 64
    batch = Batch(image=torch.randn(8, 1, size, size), mask=(torch.rand(8, 1, size, size) > 0.7).float(),
                  label=torch.arange(8) % 5, index=torch.arange(8))
    ctx = StepContext(epoch=0, iteration=0, class_weights=torch.ones(5))
    vanilla = resolve("vanilla")
    initial = vanilla.base.build_model(spec)
    out: dict[str, Callable[[], None]] = {}

    def make(method: Method, floor: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[[], None]:
        model = copy.deepcopy(initial)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)

        def step() -> None:
            torch.manual_seed(0)  # the same dropout masks in every variant
            optimizer.zero_grad(set_to_none=True)
            if floor is not None:
                floor_step(model, method, batch, ctx, floor)
            else:
                losses = method.base.losses(model(batch.image), batch, ctx)
                method.combiner.backward(losses, model, ctx)
            optimizer.step()
            method.combiner.after_step(lambda: method.base.losses(model(batch.image), batch, ctx).tasks)

        step.model = model  # type: ignore[attr-defined]
        return step

    wanted = lambda n: not only or n in only  # noqa: E731
    combiners = [n for n in METHODS.names() if METHODS.get(n).info.role == "combiner"]
    for name in ["vanilla", *combiners]:
        if wanted(name):
            out[name] = make(resolve(name))
    if wanted("floor-pcgrad"):
        out["floor-pcgrad"] = make(vanilla, pcgrad_two_tasks)
    if wanted("floor-cagrad"):
        out["floor-cagrad"] = make(vanilla, cagrad_official)
    return out


def run_rounds(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Per variant: wall times under its name, process (CPU) times under ``cpu:<name>``."""
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for n in names for k in (n, f"cpu:{n}")}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            start, cpu = time.perf_counter(), time.process_time()
            steps[n]()
            times[n].append(time.perf_counter() - start)
            times[f"cpu:{n}"].append(time.process_time() - cpu)
    return times


@pytest.mark.timeout(3600)
def test_gradient_step_ratios(benchmark):
    if not benchmark.enabled:  # one untimed round on a tiny model; the floors must match the harness
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        steps = variants(TINY, ("pcgrad", "floor-pcgrad", "cagrad", "floor-cagrad"))
        benchmark.pedantic(run_rounds, args=(steps, 1), rounds=1, iterations=1)
        torch.set_num_threads(threads)
        for name in ("pcgrad", "cagrad"):
            a, b = steps[name].model, steps[f"floor-{name}"].model  # type: ignore[attr-defined]
            for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=f"{name}: {n}")
        return
    torch.set_num_threads(1)  # CPU time is then not inflated by a busy host (perf-baseline.md)
    steps = variants(FULL)
    run_rounds(steps, 1)  # warm-up
    times: dict[str, list[float]] = {}
    benchmark.pedantic(lambda: times.update(run_rounds(steps, ROUNDS)), rounds=1, iterations=1)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    table: dict[str, float] = {}
    for prefix in ("", "cpu:"):
        table.update({f"{prefix}{n}/vanilla": ratio(prefix + n, prefix + "vanilla") for n in steps if n != "vanilla"})
        table[f"{prefix}pcgrad/floor"] = ratio(prefix + "pcgrad", prefix + "floor-pcgrad")
        table[f"{prefix}cagrad/floor"] = ratio(prefix + "cagrad", prefix + "floor-cagrad")
    table["vanilla_ms"] = 1000 * statistics.median(times["vanilla"])
    benchmark.extra_info.update(table)
    for key, value in table.items():
        print(f"{key:28s} {value:8.2f}")
    assert table["cpu:pcgrad/floor"] < 1.25 and table["cpu:cagrad/floor"] < 1.25  # target 1.1: see README
