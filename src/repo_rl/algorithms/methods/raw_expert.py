"""Raw-expert injection: RePO's gate and replacement with the unrephrased expert text (the
paper's main ablation)."""

from .base import Method, register_method

RAW_EXPERT = register_method(
    Method(
        "raw_expert",
        "RePO's gate and replacement with the unrephrased expert text (the paper's main ablation).",
        injection="expert",
        requires_solution=True,
    )
)
