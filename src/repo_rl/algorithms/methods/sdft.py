"""SDFT (on-policy self-distillation): the model, shown the expert solution in its context, is the
teacher of the policy's rollouts on q (``baselines.sdft_teacher``: the starting weights or the
current ones); each completion token is pulled toward the teacher by the per-token reverse KL
(stop-gradient teacher). No reward enters the loss."""

from .base import Method, register_method

SDFT = register_method(
    Method(
        "sdft",
        "SDFT: on-policy self-distillation, reverse KL per token to the model with the expert solution in context.",
        rollout_loss="distill",
        requires_solution=True,
    )
)
