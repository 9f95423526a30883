"""The RePO gate and group surgery. Pure tensor functions: no model, no I/O.

Rewards are ``[N, G]`` (N groups of G rollouts). A rollout "fails" when its reward is
below ``delta``; a verifier error (NaN reward) counts as a failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ORIGIN_ON_POLICY = 0
ORIGIN_REPHRASED = 1
ORIGIN_EXPERT = 2
ORIGIN_NAMES = {ORIGIN_ON_POLICY: "on_policy", ORIGIN_REPHRASED: "rephrased", ORIGIN_EXPERT: "expert"}


def failure_fraction(rewards: torch.Tensor, delta: float) -> torch.Tensor:
    """gamma = (1/G) * #{i : R_i < delta} per group, ``[N, G] -> [N]``. NaN counts as failed."""
    failed = ~(rewards >= delta)  # NaN >= delta is False, so NaN is a failure
    return failed.to(torch.float32).mean(-1)


def gate(rewards: torch.Tensor, delta: float, rho: float, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Groups that trigger injection: ``gamma >= rho`` (and ``eligible``, e.g. has a solution)."""
    g = failure_fraction(rewards, delta) >= rho
    return g if eligible is None else g & eligible.bool()


def all_failed(rewards: torch.Tensor, delta: float) -> torch.Tensor:
    """Groups in which every rollout failed (the HPT/ReLIFT switch trigger), ``[N]`` bool."""
    return failure_fraction(rewards, delta) >= 1.0


def replacement_slots(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` lowest-reward rollouts per group, ``[N, G] -> [N, k]``.

    NaN rewards rank lowest. Ties go to the lowest index (stable sort), so the choice is
    deterministic.
    """
    if not 1 <= k <= rewards.shape[-1]:
        raise ValueError(f"k must be in [1, {rewards.shape[-1]}], got {k}")
    key = torch.where(torch.isnan(rewards), torch.full_like(rewards, -float("inf")), rewards)
    return torch.sort(key, dim=-1, stable=True).indices[:, :k]


def compose_groups(
    rewards: torch.Tensor,
    slots: torch.Tensor,
    candidate_rewards: torch.Tensor,
    accept: torch.Tensor,
    origin: int = ORIGIN_REPHRASED,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace rollouts with injected candidates.

    Args:
        rewards: ``[N, G]`` rollout rewards.
        slots: ``[N, k]`` slot indices to fill (from :func:`replacement_slots`).
        candidate_rewards: ``[N, k]`` rewards of the candidates for those slots.
        accept: ``[N, k]`` bool, whether candidate ``(n, j)`` is injected (gated, produced
            and verified). Rejected candidates leave the rollout in place.
        origin: origin code written at injected slots.

    Returns ``(new_rewards [N, G], origin [N, G], source [N, G])`` where ``source`` indexes a
    pool laid out as ``[N*G rollouts] + [N*k candidates]``: ``source[n, i] = n*G + i`` for a kept
    rollout and ``N*G + n*k + j`` for candidate ``(n, j)``.
    """
    N, G = rewards.shape
    k = slots.shape[1]
    source = torch.arange(N * G, device=rewards.device).view(N, G).clone()
    origins = torch.full((N, G), ORIGIN_ON_POLICY, dtype=torch.long, device=rewards.device)
    new_rewards = rewards.clone()
    cand_index = N * G + torch.arange(N * k, device=rewards.device).view(N, k)
    rows = torch.arange(N, device=rewards.device).unsqueeze(1).expand(N, k)
    acc = accept.bool()
    r_sel, s_sel = rows[acc], slots[acc]
    source[r_sel, s_sel] = cand_index[acc]
    origins[r_sel, s_sel] = origin
    new_rewards[r_sel, s_sel] = candidate_rewards[acc].to(new_rewards.dtype)
    return new_rewards, origins, source


def assign_candidates(verified: torch.Tensor, k: int, allow_unverified: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick up to ``k`` candidates per group from ``A`` attempts.

    Args:
        verified: ``[N, A]`` bool, whether attempt ``a`` of group ``n`` verified.
        k: slots to fill per group.
        allow_unverified: if True, every attempt is acceptable (verified ones first).

    Returns ``(choice [N, k], accept [N, k])``: ``choice[n, j]`` is the attempt index used for
    slot ``j`` (verified attempts first, in attempt order), ``accept[n, j]`` whether it is usable.
    """
    N, A = verified.shape
    v = verified.bool()
    # Rank attempts: verified first, then by index (stable).
    key = (~v).to(torch.long) * A + torch.arange(A, device=v.device)
    order = torch.argsort(key, dim=-1)
    kk = min(k, A)
    choice = order[:, :kk]
    ok = torch.gather(v, 1, choice) | allow_unverified
    if kk < k:
        pad = torch.zeros(N, k - kk, dtype=torch.long, device=v.device)
        choice = torch.cat([choice, pad], 1)
        ok = torch.cat([ok, torch.zeros(N, k - kk, dtype=torch.bool, device=v.device)], 1)
    return choice, ok


def layout_candidates(
    gated_rows: torch.Tensor,
    choice: torch.Tensor,
    accept: torch.Tensor,
    attempt_rewards: torch.Tensor,
    num_groups: int,
    attempts: int,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay the chosen attempts of the gated groups out per group, for :func:`compose_groups`.

    Args:
        gated_rows: ``[M]`` group index of each gated group, in the order its attempts were made.
        choice, accept: ``[M, k]`` from :func:`assign_candidates`.
        attempt_rewards: ``[M * attempts]`` rewards; attempt ``a`` of gated row ``r`` is at
            ``r * attempts + a``.
        num_groups: N, the number of groups in the step.
        dtype: dtype of the returned rewards (default: ``attempt_rewards.dtype``).

    Returns ``(rewards [N, k], accept [N, k], attempt [N, k])``: ``attempt[n, j]`` is the index
    into ``attempt_rewards`` of candidate ``(n, j)``. Groups that were not gated get reward 0,
    no acceptance and attempt 0.
    """
    M, k = choice.shape
    dev = attempt_rewards.device
    rows = gated_rows.to(dev, torch.long)
    flat = torch.arange(M, device=dev).unsqueeze(1) * attempts + choice.to(dev)
    rewards = torch.zeros(num_groups, k, dtype=dtype or attempt_rewards.dtype, device=dev)
    acc = torch.zeros(num_groups, k, dtype=torch.bool, device=dev)
    attempt = torch.zeros(num_groups, k, dtype=torch.long, device=dev)
    rewards[rows] = attempt_rewards[flat].to(rewards.dtype)
    acc[rows] = accept.to(dev, torch.bool)
    attempt[rows] = flat
    return rewards, acc, attempt



@dataclass(frozen=True)
class Injection:
    """What :func:`inject_candidates` did to a step's groups."""

    rewards: torch.Tensor
    """``[N, G]`` rewards after injection."""
    origins: torch.Tensor
    """``[N, G]`` origin code of every row (ORIGIN_*)."""
    injected: list[tuple[int, int]]
    """``(flat position in the N*G layout, attempt index)`` of every injected candidate, in flat order."""
    accept: torch.Tensor
    """``[N, k]`` whether candidate slot ``(n, j)`` was filled."""
    candidate_rewards: torch.Tensor
    """``[N, k]`` reward of the candidate laid out for slot ``(n, j)`` (0 where none)."""

    def positive(self, delta: float) -> torch.Tensor:
        """``[N]`` groups that received a candidate with reward >= delta (a learning signal)."""
        return (self.accept & (self.candidate_rewards >= delta)).any(1)


def inject_candidates(
    rewards: torch.Tensor,
    gated_rows: torch.Tensor,
    attempt_rewards: torch.Tensor,
    verified: torch.Tensor,
    num_replace: int,
    allow_unverified: bool = False,
    origin: int = ORIGIN_REPHRASED,
) -> Injection:
    """RePO's group composition in one call: assign -> slots -> layout -> compose -> index remap.

    Args:
        rewards: ``[N, G]`` rollout rewards.
        gated_rows: ``[M]`` gated group indices, in the order their attempts were made.
        attempt_rewards: ``[M * A]`` rewards of the candidates (attempt ``a`` of gated row ``r``
            at ``r * A + a``).
        verified: ``[M, A]`` bool, which attempts may be injected (reward >= delta).
        num_replace: lowest-reward rollouts replaced per gated group (capped at ``A``).
        allow_unverified: inject attempts that did not verify too (verified ones first).
        origin: origin code of injected rows.
    """
    N, G = rewards.shape
    A = verified.shape[1]
    choice, ok = assign_candidates(verified, num_replace, allow_unverified)
    k = choice.shape[1]
    slots = replacement_slots(rewards, k)
    cand_rewards, accept, attempt = layout_candidates(gated_rows, choice, ok, attempt_rewards, N, A, dtype=rewards.dtype)
    new_rewards, origins, source = compose_groups(rewards, slots, cand_rewards, accept, origin)
    pool = attempt.view(-1).tolist()
    injected = [(flat, pool[src - N * G]) for flat, src in enumerate(source.view(-1).tolist()) if src >= N * G]
    return Injection(new_rewards, origins, injected, accept, cand_rewards)


def drop_negatives_beside_injected(advantages: torch.Tensor, origins: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[N*G]`` advantages with the negative advantages of on-policy rows set to 0 in every group
    that holds an injected row (``origins != ORIGIN_ON_POLICY``); other groups, the injected rows
    and positive advantages are unchanged (``repo.gated_negatives=false``: a gated group then
    trains its injected row, and any successful rollout, without pushing its failures down)."""
    a = advantages.view(-1, group_size)
    o = origins.view(-1, group_size)
    has = (o != ORIGIN_ON_POLICY).any(1, keepdim=True)
    drop = has & (o == ORIGIN_ON_POLICY) & (a < 0)
    return torch.where(drop, torch.zeros_like(a), a).reshape(-1)
