"""Built-in dataset adapters, each imported here by name."""

from bench.datasets import folder, synthetic  # noqa: F401
