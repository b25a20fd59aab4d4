"""Built-in method plugins: one module per method family, each imported here by name."""

from bench.methods import single_task, vanilla  # noqa: F401
from bench.methods import rlar, repmtl  # noqa: F401
from bench.methods import clinical  # noqa: F401
from bench.methods import aligned_mtl, cagrad, famo, gradnorm, imtl, loss_weighting, mgda, nash_mtl, pcgrad, upgrad  # noqa: F401
from bench.methods import msmtl  # noqa: F401
