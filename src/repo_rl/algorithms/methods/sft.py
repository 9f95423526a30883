"""SFT: negative log-likelihood of the expert solutions under q, no rollouts."""

from .base import Method, register_method

SFT = register_method(
    Method(
        "sft",
        "SFT: negative log-likelihood of the expert solutions, no rollouts.",
        rollouts=False,
        injected_loss="sft",
        requires_solution=True,
    )
)
