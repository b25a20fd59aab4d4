"""Built-in method plugins: one module per method family, each imported here by name."""

from bench.methods import (  # noqa: F401  # noqa: F401  # noqa: F401
    aligned_mtl,
    cagrad,
    clinical,  # noqa: F401
    famo,
    gradnorm,
    imtl,
    loss_weighting,
    mgda,
    msmtl,  # noqa: F401
    nash_mtl,
    pcgrad,
    repmtl,
    rlar,
    single_task,
    upgrad,
    vanilla,
)
