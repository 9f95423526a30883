"""The data of one training step, as the stages hand it on.

rollouts (:class:`Rollouts`) -> rewards -> composition (:class:`Group`) -> advantages ->
update (:class:`repo_rl.step.update.UpdateResult`). Each stage returns a new object; none writes
into another stage's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import algorithms as alg
from ..data import Example


@dataclass
class Sequence_:
    """One training sequence: prompt ids of the ORIGINAL prompt q and completion ids."""

    prompt_ids: list[int]
    completion_ids: list[int]
    truncated: bool
    kind: int = alg.KIND_POLICY
    """Loss applied to the sequence (a registered loss id, ``algorithms.losses.KIND_*``)."""
    teacher_prompt_ids: Optional[list[int]] = None
    """Prompt under which a teacher scores the completion (SDFT: P(q, k)); None: no teacher."""
    sampler_logps: Optional[list[float]] = None
    """Log-prob of each completion token under the sampler that drew it from q (the engine's weights
    at sampling time), for ``algorithm.vllm_importance_sampling_correction``; None: not sampled from
    q by the engine (injected, expert or SFT rows), or not asked for."""


RephrasePool = dict[int, list[tuple[list[int], list[int], list[float]]]]
"""Rephrases sampled with the rollouts: prompt position -> ``num_attempts`` (prompt ids, ids, token log-probs)."""


@dataclass
class Rollouts:
    """G on-policy completions per prompt, group by group."""

    sequences: list[Sequence_]
    texts: list[str]
    rephrase_pool: Optional[RephrasePool] = None
    """Set when the rephrases were sampled in the same call (``repo.rephrase_batching``)."""
    batching: str = "separate"
    """Where this step's rephrases were sampled: ``separate`` or ``with_rollouts``."""


@dataclass
class Group:
    """The step's training rows after the method composed its groups."""

    examples: list[Example]
    dataset_index: list[int]
    sequences: list[Sequence_]
    texts: list[str]
    rewards: torch.Tensor
    """``[N*G]`` rewards after composition (NaN: no reward, out of the loss unless SFT)."""
    origins: torch.Tensor
    """``[N*G]`` ``algorithms.ORIGIN_*``."""
    dropped: torch.Tensor
    """``[N*G]`` rows left out of the loss (HPT switch)."""
    counters: dict[str, float] = field(default_factory=dict)
    """Sums and counts (``repo/*``, ``rewards/*``), added up across ranks into the step's metrics."""
    gap_under_p: dict[int, float] = field(default_factory=dict)
    """Injected rephrase rows (flat position) -> log pi(o_rep | P(q, k)), for ``repo/logp_gap``."""
    batching: str = "separate"
    bank_candidates: list = field(default_factory=list)
    """Rephrases that passed ``repo.verify`` this step (:class:`repo_rl.step.bank.BankEntry`), for the bank."""
    gap_missing: list[tuple[int, "Sequence_"]] = field(default_factory=list)
    """Injected rows (flat position, the rephrase under its prompt P(q, k)) whose log pi(o | P) the
    sampler did not give and a forward of the training model must (``repo/logp_gap``); filled
    instead of ``gap_under_p`` when the sampler defers that forward (the trainer always does: it may
    sample beside an update)."""
