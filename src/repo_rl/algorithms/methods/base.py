"""The :class:`Method` object and its registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..groups import all_failed, gate
from ..losses import LOSSES


@dataclass(frozen=True)
class Method:
    name: str
    """Registry key (``algorithm.method``)."""
    summary: str
    """One line for ``repo-rl methods`` and the docs."""
    injection: Optional[str] = None
    """Where injected candidates come from: None (pure on-policy), ``rephrase`` (the policy
    rephrases the expert solution, RePO) or ``expert`` (the expert text itself)."""
    gate: str = "rho"
    """Which groups get an injection: ``rho`` (failure fraction >= rho), ``all_fail`` or ``always``."""
    injected_loss: str = "policy"
    """Registered loss (``algorithms.losses.LOSSES``) of injected rows: ``policy`` (clipped
    surrogate), ``shaped`` (LUFFY) or ``sft`` (negative log-likelihood)."""
    advantage_stats: str = "all"
    """Rows the group mean and std come from: ``all``, or ``on_policy`` (LUFFY's option, applied
    when ``baselines.luffy_on_policy_stats`` is on)."""
    drop_group: bool = False
    """Whether the rollouts of a group that received an injection leave the loss (HPT switch)."""
    rollouts: bool = True
    """False for pure SFT: no generation, NLL on expert solutions."""
    rollout_loss: str = "policy"
    """Registered loss of the on-policy rollouts: ``policy`` (clipped surrogate), or ``distill``
    (SDFT: reverse KL to the model with the expert solution in context, per token)."""
    requires_solution: bool = False
    """Whether training rows need an expert solution for the method to do anything (checked at start)."""
    phases: tuple[str, ...] = ()
    """For composite methods: the methods run one after the other (see ``baselines.sft_steps``)."""

    def __post_init__(self) -> None:
        if self.injection not in (None, "rephrase", "expert"):
            raise ValueError(f"method {self.name}: injection must be None, 'rephrase' or 'expert', got {self.injection!r}")
        if self.gate not in ("rho", "all_fail", "always"):
            raise ValueError(f"method {self.name}: gate must be 'rho', 'all_fail' or 'always', got {self.gate!r}")
        for loss in (self.injected_loss, self.rollout_loss):
            if loss not in LOSSES:
                raise ValueError(f"method {self.name}: unknown loss {loss!r}; registered: {', '.join(LOSSES)}")
        if self.advantage_stats not in ("all", "on_policy"):
            raise ValueError(f"method {self.name}: advantage_stats must be 'all' or 'on_policy', got {self.advantage_stats!r}")

    @property
    def injected_kind(self) -> int:
        """The id of :attr:`injected_loss` (``algorithms.losses.KIND_*``), stored per training row."""
        return LOSSES[self.injected_loss].id

    @property
    def rollout_kind(self) -> int:
        """The id of :attr:`rollout_loss`, stored on every on-policy row."""
        return LOSSES[self.rollout_loss].id

    @property
    def teacher(self) -> bool:
        """Whether the rollouts are scored by a teacher: the model with the expert solution in
        context (``baselines.sdft_template``, ``baselines.sdft_teacher``)."""
        return LOSSES[self.rollout_loss].teacher

    @property
    def rephrases(self) -> bool:
        return self.injection == "rephrase"

    def gated(self, rewards: torch.Tensor, eligible: torch.Tensor, delta: float, rho: float) -> torch.Tensor:
        """``[N]`` groups that receive candidates, from rollout rewards ``[N, G]`` and ``eligible``
        (the prompt has an expert solution)."""
        if not self.injection:
            return torch.zeros(rewards.shape[0], dtype=torch.bool)
        if self.gate == "rho":
            return gate(rewards, delta, rho, eligible)
        if self.gate == "all_fail":
            return all_failed(rewards, delta) & eligible
        return eligible.clone()  # "always"

    def phase_at(self, step: int, sft_steps: Optional[int], max_steps: int) -> "Method":
        """The method in force at ``step`` (0-based): composite methods switch phase after
        ``sft_steps`` steps (None: half of ``max_steps``)."""
        if not self.phases:
            return self
        first, second = self.phases
        n = max_steps // 2 if sft_steps is None else sft_steps
        return METHODS[first] if step < n else METHODS[second]


MethodSpec = Method
"""Former name of :class:`Method`."""

METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method
