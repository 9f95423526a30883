"""SDFT (on-policy self-distillation): the policy, shown the expert solution in its context, is the
teacher of its own rollouts on q; each sampled token is pulled toward the teacher by the per-token
reverse KL (stop-gradient teacher). No reward enters the loss."""

from .base import Method, register_method

SDFT = register_method(
    Method(
        "sdft",
        "SDFT: on-policy self-distillation, reverse KL per token to the policy with the expert solution in context.",
        rollout_loss="distill",
        requires_solution=True,
    )
)
