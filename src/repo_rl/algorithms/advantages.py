"""Group-relative advantages. Pure tensor functions: no model, no I/O."""

from __future__ import annotations

import torch

EPS = 1e-4
"""Added to the standard deviation before dividing (TRL uses the same constant)."""


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: str = "group",
    valid: torch.Tensor | None = None,
    eps: float = EPS,
    stats_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advantages ``A_i = (R_i - mean_g) / (std + eps)`` for rewards laid out group by group.

    Args:
        rewards: ``[N * G]`` rewards, the G rollouts of each prompt contiguous.
        group_size: G.
        scale: ``group`` divides by each group's std, ``batch`` by the std of all valid
            rewards, ``none`` does not divide (Dr. GRPO).
        valid: optional ``[N * G]`` bool mask; invalid entries (verifier error/timeout) are
            left out of the statistics and get advantage 0.
        stats_mask: optional ``[N * G]`` bool mask of the entries the mean and std are taken
            from (LUFFY's on-policy-only statistics); every valid entry still gets an advantage.
    The std is the unbiased sample std, as in TRL. A group whose valid rewards are all equal
    (or that has fewer than two valid entries) gets advantage 0, never NaN. With a
    ``stats_mask`` whose group entries are constant (an all-fail on-policy group), the
    injected entries get ``R - mean`` undivided instead of ``(R - mean) / eps``.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of {group_size} entries, got {tuple(rewards.shape)}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    r = rewards.to(torch.float64)
    v = torch.isfinite(r) if valid is None else (valid.bool() & torch.isfinite(r))
    r = torch.where(v, r, torch.zeros_like(r))
    s = v if stats_mask is None else (v & stats_mask.bool())
    rg, vg = r.view(-1, group_size), v.view(-1, group_size).to(r.dtype)
    sg = s.view(-1, group_size).to(r.dtype)
    n = sg.sum(1, keepdim=True)
    mean = (rg * sg).sum(1, keepdim=True) / n.clamp(min=1)
    adv = (rg - mean) * vg
    if scale == "group":
        std = (((rg - mean) ** 2 * sg).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        degenerate = (n < 2) | (std < 1e-12)
    else:
        flat = r[s]
        std = flat.std() if flat.numel() > 1 else torch.zeros((), dtype=r.dtype)
        degenerate = torch.full_like(n, bool(flat.numel() < 2 or std < 1e-12), dtype=torch.bool)
    if scale != "none":
        adv = adv / (std + eps)
    if stats_mask is None:
        # Groups without spread among their valid rewards carry no signal: exactly 0.
        big = torch.finfo(r.dtype).max
        hi = torch.where(vg.bool(), rg, torch.full_like(rg, -big)).amax(1, keepdim=True)
        lo = torch.where(vg.bool(), rg, torch.full_like(rg, big)).amin(1, keepdim=True)
        adv = torch.where((n >= 2) & (hi > lo), adv, torch.zeros_like(adv))
    else:
        # Outside statistics (LUFFY): when they have no spread, do not divide by ~eps.
        if scale != "none":
            adv = torch.where(degenerate, (rg - mean) * vg, adv)
        adv = torch.where(n >= 1, adv, torch.zeros_like(adv))
    return adv.view(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def group_reward_stats(rewards: torch.Tensor, group_size: int) -> dict[str, float]:
    """TRL-named batch statistics: ``reward``, ``reward_std`` and ``frac_reward_zero_std``."""
    r = rewards.to(torch.float64)
    finite = torch.isfinite(r)
    g = r.view(-1, group_size)
    gf = finite.view(-1, group_size)
    zero_std = []
    for row, ok in zip(g, gf):
        vals = row[ok]
        zero_std.append(bool(vals.numel() < 2 or (vals.max() - vals.min()).abs() < 1e-12))
    vals = r[finite]
    return {
        "reward": float(vals.mean()) if vals.numel() else float("nan"),
        "reward_std": float(vals.std()) if vals.numel() > 1 else 0.0,
        "frac_reward_zero_std": sum(zero_std) / max(len(zero_std), 1),
    }
