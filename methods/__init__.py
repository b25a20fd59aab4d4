"""Built-in method plugins: one module per method family, each imported here by name."""

from bench.methods import single_task, vanilla  # noqa: F401
