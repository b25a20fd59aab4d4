"""Step time of the representation-level regularizers relative to `vanilla`, measured in one run.

Each method trains its own copy of one initial ResNet-34 U-Net (batch 8, 128 px, CPU, one
thread); a round times one full step of every method (zero_grad, forward, losses, penalties,
backward, AdamW), the order rotating from round to round, and the ratio to vanilla is taken
within each round. Run with `make bench`; the normal suite runs every step once, untimed.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch

from bench.data import Batch
from bench.method import StepContext, resolve
from bench.models import ModelSpec

NAMES = ("vanilla", "rlar", "rlar@last", "rlar@mid", "rlar@mean", "rep-mtl")
# ceilings on the median wall-time ratio to vanilla (measured values are in the README)
TARGETS = {"rlar": 2.5, "rlar@last": 3.0, "rlar@mid": 3.5, "rlar@mean": 4.0, "rep-mtl": 2.5}
ROUNDS, WARMUP = 6, 2
DEFAULT = ModelSpec()  # ResNet-34 U-Net, the harness default


def make_steps(size: int, spec: ModelSpec = DEFAULT) -> dict[str, Callable[[], float]]:
    torch.manual_seed(0)
    model = resolve("vanilla").base.build_model(spec)
    batch = Batch(image=torch.randn(8, 1, size, size), mask=(torch.rand(8, 1, size, size) > 0.7).float(),
                  label=torch.arange(8) % 5, index=torch.arange(8))
    ctx = StepContext(epoch=0, iteration=0, class_weights=torch.ones(5))
    steps = {}
    for name in NAMES:
        method, own = resolve(name), copy.deepcopy(model)
        for component in method.components().values():
            component.configure(own)
        optimizer = torch.optim.AdamW(own.parameters(), lr=3e-4)

        def step(method=method, own=own, optimizer=optimizer) -> float:
            optimizer.zero_grad(set_to_none=True)
            out = own(batch.image)
            losses = method.base.losses(out, batch, ctx)
            for reg in method.regularizers:
                losses.extra.update(reg.penalty(out, losses, batch, own))
            method.combiner.backward(losses, own, ctx)
            optimizer.step()
            return float(losses.total().detach())

        steps[name] = step
    return steps


def interleaved_ratios(steps: dict[str, Callable[[], float]]) -> dict[str, dict[str, float]]:
    """Median (and min/max) over rounds of each method's wall and CPU time divided by vanilla's in that round."""
    wall: dict[str, list[float]] = {n: [] for n in steps}
    cpu: dict[str, list[float]] = {n: [] for n in steps}
    names = list(steps)
    for r in range(WARMUP + ROUNDS):
        order = names[r % len(names):] + names[: r % len(names)]
        times = {}
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            times[name] = (time.perf_counter() - t0, time.process_time() - c0)
        if r >= WARMUP:
            for name in names:
                wall[name].append(times[name][0] / times["vanilla"][0])
                cpu[name].append(times[name][1] / times["vanilla"][1])
    return {n: {"median": statistics.median(wall[n]), "min": min(wall[n]), "max": max(wall[n]),
                "cpu_median": statistics.median(cpu[n])} for n in names}


def test_representation_step_ratios(benchmark):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if not benchmark.enabled:  # normal suite: every method steps once on a tiny model
            tiny = ModelSpec(encoder="tu-resnet10t", decoder_channels=(8, 8, 8, 8, 8))
            steps = make_steps(64, tiny)
            losses = benchmark(lambda: {name: step() for name, step in steps.items()})
            assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
            return
        steps = make_steps(128)
        ratios = interleaved_ratios(steps)
        benchmark.pedantic(steps["rlar"], rounds=3, warmup_rounds=0)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info.update({f"ratio[{n}]": r for n, r in ratios.items()})
    print("\nstep time / vanilla (median over rounds [min-max], CPU-time median):")
    for name, r in ratios.items():
        print(f"  {name:10s} {r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]  cpu {r['cpu_median']:.2f}")
    for name, ceiling in TARGETS.items():
        assert ratios[name]["median"] <= ceiling, (name, ratios[name])
