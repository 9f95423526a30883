"""Pure algorithm functions (tensors in, tensors out) and the method registry."""

from .advantages import group_advantages, group_reward_stats
from .groups import (
    ORIGIN_EXPERT,
    ORIGIN_NAMES,
    ORIGIN_ON_POLICY,
    ORIGIN_REPHRASED,
    all_failed,
    assign_candidates,
    compose_groups,
    failure_fraction,
    gate,
    replacement_slots,
)
from .losses import (
    KIND_POLICY,
    KIND_SFT,
    KIND_SHAPED,
    aggregate,
    clipped_surrogate,
    entropy_from_logits,
    kl_k3,
    luffy_shaping,
    masked_mean,
    mixed_token_loss,
    token_logprobs,
)
from .methods import METHODS, MethodSpec, register_method

__all__ = [
    "KIND_POLICY",
    "KIND_SFT",
    "KIND_SHAPED",
    "luffy_shaping",
    "mixed_token_loss",
    "METHODS",
    "MethodSpec",
    "ORIGIN_EXPERT",
    "ORIGIN_NAMES",
    "ORIGIN_ON_POLICY",
    "ORIGIN_REPHRASED",
    "aggregate",
    "all_failed",
    "assign_candidates",
    "clipped_surrogate",
    "compose_groups",
    "entropy_from_logits",
    "failure_fraction",
    "gate",
    "group_advantages",
    "group_reward_stats",
    "kl_k3",
    "masked_mean",
    "register_method",
    "replacement_slots",
    "token_logprobs",
]
