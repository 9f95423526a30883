"""Method registry: how groups are composed and which loss applies.

A method is data, not code: the trainer reads these flags and calls the pure functions
in :mod:`groups`, :mod:`advantages` and :mod:`losses`. New methods register here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class MethodSpec:
    name: str
    """Registry key (``algorithm.method``)."""
    summary: str
    """One line for ``repo-rl methods`` and the docs."""
    injection: Optional[str] = None
    """None (pure on-policy), ``rephrase`` (RePO) or ``expert`` (raw expert text)."""
    requires_solution: bool = False
    """Whether training rows need an expert solution for the method to do anything."""


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
