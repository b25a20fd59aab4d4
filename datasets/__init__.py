"""Built-in dataset adapters, each imported here by name."""

from bench.datasets import aimi, ddti, folder, synthetic, thyroidxl, tn3k  # noqa: F401
