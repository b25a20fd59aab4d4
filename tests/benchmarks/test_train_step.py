"""One vanilla training step on the CPU (batch 8, 128 px, the default ResNet-34 U-Net): the anchor later
benchmarks compare against. Run with `make bench` (the normal suite runs it once, untimed)."""

import torch

from bench.data import Batch
from bench.method import StepContext, resolve
from bench.models import ModelSpec


def test_vanilla_step_cpu(benchmark):
    torch.manual_seed(0)
    method = resolve("vanilla")
    model = method.base.build_model(ModelSpec())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    batch = Batch(image=torch.randn(8, 1, 128, 128), mask=(torch.rand(8, 1, 128, 128) > 0.7).float(),
                  label=torch.arange(8) % 5, index=torch.arange(8))
    ctx = StepContext(epoch=0, iteration=0, class_weights=torch.ones(5))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        losses = method.base.losses(model(batch.image), batch, ctx)
        method.combiner.backward(losses, model, ctx)
        optimizer.step()
        return float(losses.total())

    loss = benchmark.pedantic(step, rounds=5, warmup_rounds=1) if benchmark.enabled else step()
    assert torch.isfinite(torch.tensor(loss))
    if benchmark.enabled:
        benchmark.extra_info["images_per_s"] = 8 / benchmark.stats["mean"]
