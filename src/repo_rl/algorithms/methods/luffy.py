"""LUFFY (mixed-policy GRPO): one expert trace in every group, trained with the policy shaping
f(p) = p / (p + gamma) and no clipping; optionally on-policy-only group statistics."""

from .base import Method, register_method

LUFFY = register_method(
    Method(
        "luffy",
        "LUFFY: one expert trace per group, trained with the shaping f(p)=p/(p+gamma) and no clipping.",
        injection="expert",
        gate="always",
        injected_loss="shaped",
        advantage_stats="on_policy",
        requires_solution=True,
    )
)
