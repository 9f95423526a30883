"""Method registry: how groups are composed and which loss applies.

A method is data, not code: the trainer reads these flags and calls the pure functions
in :mod:`groups`, :mod:`advantages` and :mod:`losses`. New methods register here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .losses import KIND_POLICY, KIND_SFT, KIND_SHAPED


@dataclass(frozen=True)
class MethodSpec:
    name: str
    """Registry key (``algorithm.method``)."""
    summary: str
    """One line for ``repo-rl methods`` and the docs."""
    injection: Optional[str] = None
    """None (pure on-policy), ``rephrase`` (RePO) or ``expert`` (raw expert text)."""
    gate: str = "rho"
    """Which groups get an injection: ``rho`` (failure fraction >= rho), ``all_fail`` or ``always``."""
    injected_kind: int = KIND_POLICY
    """Loss of injected sequences: KIND_POLICY (clipped surrogate), KIND_SHAPED (LUFFY) or KIND_SFT."""
    drop_group: bool = False
    """Whether the rollouts of a group that received an injection leave the loss (HPT switch)."""
    rollouts: bool = True
    """False for pure SFT: no generation, NLL on expert solutions."""
    requires_solution: bool = False
    """Whether training rows need an expert solution for the method to do anything."""
    phases: tuple[str, ...] = ()
    """For composite methods: the methods run one after the other (see ``baselines.sft_steps``)."""


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


register_method(MethodSpec("grpo", "GRPO: pure on-policy group-relative policy optimisation."))
register_method(
    MethodSpec(
        "repo",
        "RePO: gated groups get verified rephrasings of the expert solution by the current policy "
        "in place of their lowest-reward rollouts (arXiv 2602.10819; not Replay-Enhanced PO).",
        injection="rephrase",
        requires_solution=True,
    )
)
register_method(
    MethodSpec(
        "raw_expert",
        "RePO's gate and replacement with the unrephrased expert text (the paper's main ablation).",
        injection="expert",
        requires_solution=True,
    )
)
register_method(
    MethodSpec(
        "luffy",
        "LUFFY: one expert trace per group, trained with the shaping f(p)=p/(p+gamma) and no clipping.",
        injection="expert",
        gate="always",
        injected_kind=KIND_SHAPED,
        requires_solution=True,
    )
)
register_method(
    MethodSpec(
        "hpt_switch",
        "HPT/ReLIFT switch: a group whose rollouts all fail is replaced by an SFT step on the expert solution.",
        injection="expert",
        gate="all_fail",
        injected_kind=KIND_SFT,
        drop_group=True,
        requires_solution=True,
    )
)
register_method(
    MethodSpec(
        "sft",
        "SFT: negative log-likelihood of the expert solutions, no rollouts.",
        rollouts=False,
        injected_kind=KIND_SFT,
        requires_solution=True,
    )
)
register_method(
    MethodSpec(
        "sft_then_grpo",
        "SFT for baselines.sft_steps steps, then GRPO for the rest of the budget.",
        phases=("sft", "grpo"),
        requires_solution=True,
    )
)
