"""GRPO: pure on-policy, group-relative advantages (loss variants by ``algorithm.loss_type``)."""

from .base import Method, register_method

GRPO = register_method(Method("grpo", "GRPO: pure on-policy group-relative policy optimisation."))
