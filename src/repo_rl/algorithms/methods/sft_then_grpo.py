"""SFT for ``baselines.sft_steps`` steps, then GRPO for the rest of the budget."""

from .base import Method, register_method

SFT_THEN_GRPO = register_method(
    Method(
        "sft_then_grpo",
        "SFT for baselines.sft_steps steps, then GRPO for the rest of the budget.",
        phases=("sft", "grpo"),
        requires_solution=True,
    )
)
