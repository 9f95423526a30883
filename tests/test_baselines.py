"""Baselines: LUFFY shaping, the mixed per-kind loss, on-policy-only group statistics, the
method registry, and the baselines run end to end on the tiny model.

Expected values are worked out by hand (arithmetic in the comments) or come from plain
Python-loop references written here, never from running the code under test. The trainer
tests recompute every gate decision themselves from the on-policy rewards of each group.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from repo_rl.algorithms import (
    KIND_POLICY,
    KIND_SFT,
    KIND_SHAPED,
    METHODS,
    clipped_surrogate,
    group_advantages,
    luffy_shaping,
    mixed_token_loss,
)
from repo_rl.config import build_config
from repo_rl.trainer import Trainer

from .conftest import ROWS, tiny_overrides

EPS = 1e-4  # the documented std offset of group_advantages


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


def assert_close(actual, expected, tol=1e-6):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, rtol=tol, atol=tol), (actual.tolist(), expected.tolist())


# ======================================================================================
# 1. LUFFY shaping f(p) = p / (p + gamma)
# ======================================================================================


def test_luffy_shaping_values():
    p = t64([0.1, 1.0, 0.0, 0.3, 0.02])
    # 0.1/(0.1+0.1) = 0.5 ; 1/1.1 = 0.909090... ; 0/0.1 = 0 ; 0.3/0.4 = 0.75 ; 0.02/0.12 = 1/6
    assert_close(luffy_shaping(p, 0.1), [0.5, 1 / 1.1, 0.0, 0.75, 1 / 6], tol=1e-12)
    # gamma is honoured: gamma = 1 -> 1/(1+1) = 0.5 ; 0.1/1.1
    assert_close(luffy_shaping(t64([1.0, 0.1]), 1.0), [0.5, 0.1 / 1.1], tol=1e-12)


def test_luffy_shaping_gradient_wrt_p():
    # d/dp p/(p+g) = ((p+g) - p)/(p+g)^2 = g/(p+g)^2
    # p=0.1: 0.1/0.04 = 2.5 ; p=1: 0.1/1.21 = 0.0826446... ; p=0: 1/g = 10 ; p=0.3: 0.1/0.16 = 0.625
    p = t64([0.1, 1.0, 0.0, 0.3]).requires_grad_(True)
    luffy_shaping(p, 0.1).sum().backward()
    assert_close(p.grad, [2.5, 0.1 / 1.21, 10.0, 0.625], tol=1e-10)


def test_luffy_shaping_gradient_through_exp_vanishes_for_tiny_p():
    # With p = exp(logp): d f / d logp = f'(p) * p = g p / (p+g)^2.
    # logp = ln 0.1 (p = g): g^2 / (2g)^2 = 1/4, the maximum of g p/(p+g)^2.
    # logp = -20: p = 2.06e-9, g p/(p+g)^2 ~= p/g = 2.06e-8 -> the gradient vanishes although
    # f'(p) itself is ~1/g = 10 there: the exp factor p kills it (TOYWORLD_NOTES: "foreign tokens
    # have near-zero probability and p/(p+0.1) makes their gradient vanish").
    g = 0.1
    logp = t64([math.log(0.1), -1.0, -5.0, -10.0, -20.0, -40.0]).requires_grad_(True)
    luffy_shaping(torch.exp(logp), g).sum().backward()
    p = [math.exp(x) for x in logp.tolist()]
    expected = [g * q / (q + g) ** 2 for q in p]
    assert_close(logp.grad, expected, tol=1e-12)
    assert logp.grad[0].item() == pytest.approx(0.25, abs=1e-12)
    # Strictly decreasing as p shrinks below gamma, and tiny for tiny p.
    grads = logp.grad.tolist()
    assert all(a > b for a, b in zip(grads, grads[1:]))
    assert grads[4] == pytest.approx(math.exp(-20) / g, rel=1e-6)  # ~2.06e-8
    assert grads[4] < 1e-7 and grads[5] < 1e-16
    # The maximum over p is at p = gamma (1/4): scan a grid of logp.
    grid = torch.linspace(-12, 0, 601, dtype=torch.float64).requires_grad_(True)
    luffy_shaping(torch.exp(grid), g).sum().backward()
    assert grid.grad.max().item() <= 0.25 + 1e-12


# ======================================================================================
# 2. mixed_token_loss: policy rows, shaped rows, SFT rows
# ======================================================================================

LN = math.log
EL, EH = 0.2, 0.28  # asymmetric clip range: [0.8, 1.28]


def _hand_batch():
    """Five rows, three tokens each; see the comments in the test for the arithmetic."""
    logp = [
        [LN(0.65), LN(0.2), LN(0.3)],  # 0 POLICY A=+2
        [LN(0.3), LN(0.6), LN(0.5)],  # 1 POLICY A=-1
        [LN(0.1), LN(0.9), LN(0.5)],  # 2 SHAPED A=+1.5
        [LN(0.3), LN(0.02), 0.0],  # 3 SHAPED A=-2
        [LN(0.25), LN(0.5), 0.0],  # 4 SFT    A=-5
    ]
    old = [
        [LN(0.5), LN(0.2), LN(0.5)],  # ratios 1.3, 1.0, 0.6
        [LN(0.5), LN(0.4), LN(0.5)],  # ratios 0.6, 1.5, 1.0
        [x - 5.0 for x in logp[2]],  # ratio e^5 = 148.4, far above 1.28
        [x + 5.0 for x in logp[3]],  # ratio e^-5 = 0.0067, far below 0.8
        [x + 3.0 for x in logp[4]],  # ratio e^-3 = 0.0498, far below 0.8
    ]
    adv = [2.0, -1.0, 1.5, -2.0, -5.0]
    kind = [KIND_POLICY, KIND_POLICY, KIND_SHAPED, KIND_SHAPED, KIND_SFT]
    return t64(logp), t64(old), t64(adv), torch.tensor(kind)


def test_mixed_token_loss_hand_values_and_masks():
    logp, old, adv, kind = _hand_batch()
    loss, low, high = mixed_token_loss(logp, old, adv, kind, EL, EH, gamma=0.1)
    f = lambda p: p / (p + 0.1)  # noqa: E731
    expected = [
        # row 0, A=2: r=1.3 > 1.28 -> -min(2.6, 2.56) = -2.56 ; r=1 -> -2 ; r=0.6 (A>0) -> -min(1.2, 1.6) = -1.2
        [-2.56, -2.0, -1.2],
        # row 1, A=-1: r=0.6 -> -min(-0.6, -0.8) = 0.8 ; r=1.5 -> -min(-1.5, -1.28) = 1.5 ; r=1 -> 1
        [0.8, 1.5, 1.0],
        # row 2, A=1.5, no clipping whatever the ratio: -f(p)*A
        # p=0.1: -0.5*1.5 = -0.75 ; p=0.9: -0.9*1.5 = -1.35 ; p=0.5: -(0.5/0.6)*1.5 = -1.25
        [-0.75, -1.35, -1.25],
        # row 3, A=-2: 2 f(p): p=0.3: 2*0.75 = 1.5 ; p=0.02: 2/6 = 0.3333 ; p=1: 2/1.1 = 1.8182
        [1.5, 2 * f(0.02), 2 / 1.1],
        # row 4, SFT: -logp whatever the advantage: ln 4, ln 2, 0
        [LN(4.0), LN(2.0), 0.0],
    ]
    assert_close(loss, expected, tol=1e-9)
    # Clip masks: row 0 token 0 is high-clipped, row 1 token 0 low-clipped; nothing else.
    # Rows 2-4 would be flagged by clipped_surrogate (ratio e^5 with A>0, e^-5 / e^-3 with A<0)
    # but are not policy rows.
    exp_low = [[False] * 3 for _ in range(5)]
    exp_high = [[False] * 3 for _ in range(5)]
    exp_low[1][0] = True
    exp_high[0][0] = True
    assert low.tolist() == exp_low
    assert high.tolist() == exp_high
    _, raw_low, raw_high = clipped_surrogate(logp, old, adv, EL, EH)
    assert raw_high[2].all() and raw_low[3].all() and raw_low[4].all()  # the masking matters


def test_mixed_token_loss_policy_rows_equal_clipped_surrogate():
    logp, old, adv, kind = _hand_batch()
    loss, low, high = mixed_token_loss(logp, old, adv, kind, EL, EH)
    ref, rlow, rhigh = clipped_surrogate(logp[:2], old[:2], adv[:2], EL, EH)
    assert torch.equal(loss[:2], ref)
    assert torch.equal(low[:2], rlow) and torch.equal(high[:2], rhigh)


def test_mixed_token_loss_sft_rows_ignore_advantage_and_old_logp():
    logp, old, adv, kind = _hand_batch()
    a = mixed_token_loss(logp, old, adv, kind, EL, EH)[0]
    adv2, old2 = adv.clone(), old.clone()
    adv2[4] = 7.0
    old2[4] = logp[4] - 9.0
    b = mixed_token_loss(logp, old2, adv2, kind, EL, EH)[0]
    assert torch.equal(a[4], b[4])
    assert_close(b[4], [LN(4.0), LN(2.0), 0.0], tol=1e-12)


def test_mixed_token_loss_gamma_only_changes_shaped_rows():
    logp, old, adv, kind = _hand_batch()
    a = mixed_token_loss(logp, old, adv, kind, EL, EH, gamma=0.1)[0]
    b = mixed_token_loss(logp, old, adv, kind, EL, EH, gamma=0.5)[0]
    keep = kind != KIND_SHAPED
    assert torch.equal(a[keep], b[keep])
    # row 2, gamma=0.5: p=0.1 -> 0.1/0.6 = 1/6 -> -1.5/6 = -0.25 ; p=0.9 -> 0.9/1.4 -> -1.5*0.642857 ; p=0.5 -> 0.5 -> -0.75
    assert_close(b[2], [-0.25, -1.5 * 0.9 / 1.4, -0.75], tol=1e-9)


def test_mixed_token_loss_gradients_per_kind():
    logp, old, adv, kind = _hand_batch()
    logp = logp.clone().requires_grad_(True)
    loss, _, _ = mixed_token_loss(logp, old, adv, kind, EL, EH, gamma=0.1)
    loss.sum().backward()
    g = 0.1
    shaped = lambda p, a: -a * g * p / (p + g) ** 2  # noqa: E731  d/dlogp of -f(exp(logp)) * A
    expected = [
        # row 0: clipped token -> 0 ; unclipped tokens -A*r: -2*1 = -2, -2*0.6 = -1.2
        [0.0, -2.0, -1.2],
        # row 1: clipped token -> 0 ; -A*r = 1.5 ; 1*1 = 1
        [0.0, 1.5, 1.0],
        # row 2 (A=1.5): p=0.1: -1.5*0.01/0.04 = -0.375 ; p=0.9: -1.5*0.09/1 = -0.135 ; p=0.5: -1.5*0.05/0.36
        [-0.375, -0.135, shaped(0.5, 1.5)],
        # row 3 (A=-2): p=0.3: 2*0.03/0.16 = 0.375 ; p=0.02: 2*0.002/0.0144 ; p=1: 2*0.1/1.21
        [0.375, shaped(0.02, -2.0), 0.2 / 1.21],
        # row 4 (SFT): d(-logp)/dlogp = -1
        [-1.0, -1.0, -1.0],
    ]
    assert torch.isfinite(logp.grad).all()
    assert_close(logp.grad, expected, tol=1e-9)


def ref_mixed(logp, old, adv, kind, el, eh, gamma):
    """Plain-loop reference; ``adv`` is per sequence or per token."""
    B, T = len(logp), len(logp[0])
    loss = [[0.0] * T for _ in range(B)]
    low = [[False] * T for _ in range(B)]
    high = [[False] * T for _ in range(B)]
    for b in range(B):
        for i in range(T):
            a = adv[b][i] if isinstance(adv[b], list) else adv[b]
            lp, o = logp[b][i], old[b][i]
            if kind[b] == KIND_POLICY:
                r = math.exp(lp - o)
                rc = min(max(r, 1 - el), 1 + eh)
                loss[b][i] = -min(r * a, rc * a)
                low[b][i] = r < 1 - el and a < 0
                high[b][i] = r > 1 + eh and a > 0
            elif kind[b] == KIND_SHAPED:
                p = math.exp(lp)
                loss[b][i] = -(p / (p + gamma)) * a
            else:
                loss[b][i] = -lp
    return loss, low, high


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_mixed_token_loss_matches_loop_reference(seed, per_token_adv):
    gen = torch.Generator().manual_seed(seed)
    B, T = 9, 6
    logp = -6 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    old = logp + (torch.rand(B, T, generator=gen, dtype=torch.float64) - 0.5) * 1.5
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64) if per_token_adv else torch.randn(B, generator=gen, dtype=torch.float64)
    kind = torch.tensor([KIND_POLICY, KIND_SHAPED, KIND_SFT] * 3)[torch.randperm(B, generator=gen)]
    gamma = [0.1, 0.05, 0.3][seed]
    loss, low, high = mixed_token_loss(logp, old, adv, kind, 0.2, 0.28, gamma)
    rl, rlow, rhigh = ref_mixed(logp.tolist(), old.tolist(), adv.tolist(), kind.tolist(), 0.2, 0.28, gamma)
    assert_close(loss, rl, tol=1e-10)
    assert low.tolist() == rlow and high.tolist() == rhigh
    assert any(any(r) for r in rlow) or any(any(r) for r in rhigh)  # some clipping exercised


# ======================================================================================
# 3. group_advantages with stats_mask (LUFFY: on-policy-only statistics)
# ======================================================================================


def test_stats_mask_excludes_expert_from_mean_and_std():
    # Group of 4: expert (reward 1) at slot 0, on-policy [0, 1, 0] at slots 1-3.
    # On-policy mean = 1/3 ; sample var = ((1/3)^2 + (2/3)^2 + (1/3)^2) / 2 = (6/9)/2 = 1/3
    # std = sqrt(1/3) = 0.5773503 ; denominator 0.5774503.
    # reward 1: (2/3)/0.5774503 = 1.1545009 ; reward 0: (-1/3)/0.5774503 = -0.5772504
    r = t64([1.0, 0.0, 1.0, 0.0])
    stats = torch.tensor([False, True, True, True])
    d = math.sqrt(1 / 3) + EPS
    assert_close(group_advantages(r, 4, "group", stats_mask=stats), [(2 / 3) / d, (-1 / 3) / d, (2 / 3) / d, (-1 / 3) / d])
    # Without the mask: mean 0.5, std sqrt(4*0.25/3) = sqrt(1/3) -> +-0.5/0.5774503 = +-0.8658758
    assert_close(group_advantages(r, 4, "group"), [0.5 / d, -0.5 / d, 0.5 / d, -0.5 / d])
    # scale none: R - 1/3 -> 2/3, -1/3, 2/3, -1/3
    assert_close(group_advantages(r, 4, "none", stats_mask=stats), [2 / 3, -1 / 3, 2 / 3, -1 / 3])


def test_stats_mask_every_valid_entry_gets_an_advantage_invalid_get_zero():
    # Two groups of 4. Group 0: expert 1 at slot 3, on-policy [0.5, 0, NaN] (NaN: verifier error).
    # Stats from {0.5, 0}: mean 0.25, var = (0.0625*2)/1 = 0.125, std = 0.3535534
    # -> expert 0.75/0.3536534 = 2.1207 ; 0.5 -> 0.25/0.3536534 ; 0 -> -0.25/0.3536534 ; NaN -> 0
    # Group 1: on-policy [1, 0, 0], expert 1 at slot 0 marked invalid by `valid` -> 0.
    # Stats {1, 0, 0}: mean 1/3, std sqrt(1/3): 1 -> (2/3)/0.5774503 ; 0 -> (-1/3)/0.5774503
    r = t64([0.5, 0.0, float("nan"), 1.0, 1.0, 1.0, 0.0, 0.0])
    stats = torch.tensor([True, True, True, False, False, True, True, True])
    valid = torch.tensor([True, True, True, True, False, True, True, True])
    d0 = math.sqrt(0.125) + EPS
    d1 = math.sqrt(1 / 3) + EPS
    exp = [0.25 / d0, -0.25 / d0, 0.0, 0.75 / d0, 0.0, (2 / 3) / d1, (-1 / 3) / d1, (-1 / 3) / d1]
    assert_close(group_advantages(r, 4, "group", valid=valid, stats_mask=stats), exp)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_stats_mask_constant_on_policy_group_scores_expert_undivided(scale):
    # One group: expert 1 at slot 0, on-policy all 0. On-policy mean 0, std 0.
    # The expert gets R - mean = 1 - 0 = 1 (not 1/eps = 10000); on-policy rows 0 - 0 = 0.
    # scale=batch: the only statistics in the batch are the three zeros, std 0 as well.
    r = t64([1.0, 0.0, 0.0, 0.0])
    stats = torch.tensor([False, True, True, True])
    assert_close(group_advantages(r, 4, scale, stats_mask=stats), [1.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_stats_mask_constant_on_policy_group_of_successes(scale):
    # Group 0: on-policy all 1 and the expert 1 -> 1 - 1 = 0 everywhere.
    # Group 1: on-policy all 0.5, expert 1 -> 1 - 0.5 = 0.5 (group / none: undivided).
    # batch: the batch statistics [1, 1, 1, 0.5, 0.5, 0.5] are not constant: mean 0.75,
    # var = 6 * 0.25^2 / 5 = 0.075 -> the expert gets 0.5 / (sqrt(0.075) + eps) = 1.8251.
    r = t64([1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 1.0, 0.5])
    stats = torch.tensor([True, True, False, True, True, True, False, True])
    e = 0.5 / (math.sqrt(0.075) + EPS) if scale == "batch" else 0.5
    assert_close(group_advantages(r, 4, scale, stats_mask=stats), [0, 0, 0, 0, 0, 0, e, 0])


def test_stats_mask_batch_scale_uses_batch_std_of_on_policy_entries():
    # Group A: expert 1 + on-policy [0, 0, 0] ; group B: expert 1 + on-policy [1, 0, 0].
    # Batch statistics entries: [0, 0, 0, 1, 0, 0]: mean 1/6,
    # var = (5*(1/6)^2 + (5/6)^2)/5 = (5/36 + 25/36)/5 = 1/6 -> std = 0.4082483 ; + eps = 0.4083483.
    # Centering is by each group's on-policy mean: A mean 0, B mean 1/3.
    # A: expert 1/0.4083483 = 2.4489 ; on-policy 0.
    # B: expert and the 1 -> (2/3)/0.4083483 = 1.6326 ; zeros -> (-1/3)/0.4083483 = -0.8163
    r = t64([1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    stats = torch.tensor([False, True, True, True, True, True, True, False])
    d = math.sqrt(1 / 6) + EPS
    exp = [1 / d, 0, 0, 0, (-1 / 3) / d, (2 / 3) / d, (-1 / 3) / d, (2 / 3) / d]
    assert_close(group_advantages(r, 4, "batch", stats_mask=stats), exp)


def test_stats_mask_single_on_policy_entry_is_a_constant_group():
    # Group of 3: expert 1, one valid on-policy 0.25, one invalid. n = 1: no std, so the expert
    # gets 1 - 0.25 = 0.75 undivided and the on-policy entry 0.
    r = t64([1.0, 0.25, float("nan")])
    stats = torch.tensor([False, True, True])
    assert_close(group_advantages(r, 3, "group", stats_mask=stats), [0.75, 0.0, 0.0])
    assert_close(group_advantages(r, 3, "none", stats_mask=stats), [0.75, 0.0, 0.0])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_stats_mask_group_without_any_on_policy_statistics_is_zero_for_every_scale(scale):
    # Group 0: all on-policy rewards are verifier errors (NaN), only the expert (1) is valid: no
    # on-policy mean exists. The code's own `where(n >= 1, adv, 0)` says such a group scores 0;
    # every scale must agree. Group 1 is ordinary: stats {0, 1, 1}: mean 2/3, std sqrt(1/3).
    r = t64([float("nan"), 1.0, float("nan"), float("nan"), 0.0, 1.0, 1.0, 1.0])
    stats = torch.tensor([True, False, True, True, True, True, True, False])
    out = group_advantages(r, 4, scale, stats_mask=stats)
    assert out[:4].tolist() == [0.0, 0.0, 0.0, 0.0]


def ref_stats_advantages(rewards, G, scale, valid, stats, eps=EPS):
    """Loop reference for on-policy-only statistics (every group has >= 1 stats entry)."""
    r = [float(x) for x in rewards]
    ok = [math.isfinite(x) and bool(valid[i]) for i, x in enumerate(r)]
    st = [ok[i] and bool(stats[i]) for i in range(len(r))]
    all_stats = [r[i] for i in range(len(r)) if st[i]]
    bm = sum(all_stats) / len(all_stats)
    batch_std = math.sqrt(sum((x - bm) ** 2 for x in all_stats) / (len(all_stats) - 1))
    out = [0.0] * len(r)
    for s0 in range(0, len(r), G):
        idx = range(s0, s0 + G)
        S = [r[i] for i in idx if st[i]]
        m = sum(S) / len(S)
        std = math.sqrt(sum((x - m) ** 2 for x in S) / (len(S) - 1)) if len(S) > 1 else 0.0
        for i in idx:
            if not ok[i]:
                continue
            d = r[i] - m
            if scale == "group":
                out[i] = d if std < 1e-12 else d / (std + eps)
            elif scale == "batch":
                out[i] = d / (batch_std + eps)
            else:
                out[i] = d
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_stats_mask_matches_loop_reference(seed, scale):
    rng = random.Random(seed)
    G, N = 5, 12
    rewards, valid, stats = [], [], []
    for _ in range(N):
        inj = rng.randrange(G)  # one injected (expert) slot per group
        for j in range(G):
            if j == inj:
                rewards.append(1.0)
                stats.append(False)
            else:
                rewards.append(rng.choice([0.0, 0.0, 0.5, 1.0, float("nan")]))
                stats.append(True)
            valid.append(rng.random() > 0.1)
        # keep at least one valid on-policy stats entry per group (no-statistics groups are tested apart)
        j = (inj + 1) % G
        k = len(rewards) - G + j
        rewards[k] = rng.choice([0.0, 1.0])
        valid[k] = True
    exp = ref_stats_advantages(rewards, G, scale, valid, stats)
    out = group_advantages(t64(rewards), G, scale, valid=torch.tensor(valid), stats_mask=torch.tensor(stats))
    assert_close(out, exp, tol=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_all_true_stats_mask_equals_no_mask(scale):
    rng = random.Random(7)
    r = t64([rng.choice([0.0, 0.5, 1.0, float("nan")]) for _ in range(40)])
    valid = torch.tensor([rng.random() > 0.2 for _ in range(40)])
    a = group_advantages(r, 4, scale, valid=valid)
    b = group_advantages(r, 4, scale, valid=valid, stats_mask=torch.ones(40, dtype=torch.bool))
    assert_close(b, a, tol=1e-9)


# ======================================================================================
# 4. The registry matches PAPER.md, and the trainer's gate / phase dispatch
# ======================================================================================


def test_registry_has_every_baseline():
    assert {"grpo", "repo", "raw_expert", "luffy", "hpt_switch", "sft", "sft_then_grpo"} <= set(METHODS)


@pytest.mark.parametrize(
    "name, injection, gate, kind, drop, rollouts, phases",
    [
        # GRPO: pure on-policy.
        ("grpo", None, None, None, False, True, ()),
        # RePO: rho gate, verified rephrasings trained with the clipped surrogate.
        ("repo", "rephrase", "rho", KIND_POLICY, False, True, ()),
        # Raw expert: RePO's gate and replacement with the unrephrased text, trained as a rollout.
        ("raw_expert", "expert", "rho", KIND_POLICY, False, True, ()),
        # LUFFY: one expert trace in every group, shaping f(p) = p/(p+gamma), no clipping.
        ("luffy", "expert", "always", KIND_SHAPED, False, True, ()),
        # HPT switch: only all-fail groups, SFT on the expert solution, the group's rollouts dropped.
        ("hpt_switch", "expert", "all_fail", KIND_SFT, True, True, ()),
        # SFT: NLL on the expert solutions, no rollouts.
        ("sft", None, None, KIND_SFT, False, False, ()),
        # SFT then GRPO.
        ("sft_then_grpo", None, None, None, False, True, ("sft", "grpo")),
    ],
)
def test_method_spec_flags(name, injection, gate, kind, drop, rollouts, phases):
    s = METHODS[name]
    assert s.name == name
    assert s.injection == injection
    if gate is not None:
        assert s.gate == gate
    if kind is not None:
        assert s.injected_kind == kind
    assert s.drop_group is drop
    assert s.rollouts is rollouts
    assert tuple(s.phases) == phases
    for ph in s.phases:
        assert ph in METHODS and not METHODS[ph].phases
    # Everything that learns from the expert text needs it.
    assert s.requires_solution is (name not in ("grpo",))


def test_trainer_gate_per_method():
    # Rows: failure fractions (delta 0.5, reward 0.5 is a success) and eligibility:
    # r0 [0,0,0,0] 1.0 | r1 [1,0.25,0,0] 0.75 | r2 [0.5,1,0,0] 0.5 | r3 [1,1,1,0.4] 0.25
    # r4 [1,1,1,1] 0 | r5 [0,0,0,0] 1.0 but no solution
    R = t64([[0, 0, 0, 0], [1, 0.25, 0, 0], [0.5, 1, 0, 0], [1, 1, 1, 0.4], [1, 1, 1, 1], [0, 0, 0, 0]])
    eligible = torch.tensor([True, True, True, True, True, False])
    got = {name: METHODS[name].gated(R, eligible, 0.5, 0.5).tolist() for name in METHODS if name in
           ("grpo", "repo", "raw_expert", "luffy", "hpt_switch", "sft")}
    assert got["grpo"] == [False] * 6
    assert got["sft"] == [False] * 6
    assert got["repo"] == [True, True, True, False, False, False]  # gamma >= 0.5 and eligible
    assert got["raw_expert"] == [True, True, True, False, False, False]
    assert got["luffy"] == [True, True, True, True, True, False]  # every group with a solution
    assert got["hpt_switch"] == [True, False, False, False, False, False]  # all failed only
    # rho = 0.75 moves r2 (gamma 0.5) out of the rho gate; the all-fail gate ignores rho.
    assert METHODS["raw_expert"].gated(R, eligible, 0.5, 0.75).tolist() == [True, True, False, False, False, False]
    assert METHODS["hpt_switch"].gated(R, eligible, 0.5, 0.75).tolist() == [True, False, False, False, False, False]


@pytest.mark.parametrize("sft_steps, max_steps, expected", [
    (2, 5, ["sft", "sft", "grpo", "grpo", "grpo"]),
    (None, 5, ["sft", "sft", "grpo", "grpo", "grpo"]),  # None: 5 // 2 = 2
    (None, 3, ["sft", "grpo", "grpo"]),  # 3 // 2 = 1
    (0, 2, ["grpo", "grpo"]),
])
def test_spec_for_step_phases(sft_steps, max_steps, expected):
    got = [METHODS["sft_then_grpo"].phase_at(s, sft_steps, max_steps).name for s in range(max_steps)]
    assert got == expected
    # A method without phases is always itself.
    assert METHODS["luffy"].phase_at(3, None, 5).name == "luffy"


# ======================================================================================
# 5. The baselines end to end on the tiny model
# ======================================================================================

HARD = {"q1", "q3", "q5"}  # q5 has no solution: an all-fail group that can never be injected
DELTA = 0.5


def graded_reward(prompts, completions, answer, id, **kwargs):
    """Deterministic reward with several levels: 0 on HARD prompts, else (sum of char codes mod 5)/4
    in {0, 0.25, 0.5, 0.75, 1}; with delta = 0.5 a rollout fails on 0 and 0.25 (0.5 is a success)."""
    out = []
    for c, i in zip(completions, id):
        text = c if isinstance(c, str) else c[-1]["content"]
        out.append(0.0 if i in HARD else (sum(map(ord, text)) % 5) / 4)
    return out


def zero_reward(prompts, completions, **kwargs):
    return [0.0 for _ in completions]


class Recorder:
    """Wraps the trainer's scorer and keeps every call's (prompt ids, texts, rewards)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, prompts, completions, examples):
        r, m = self.inner(prompts, completions, examples)
        self.calls.append(([e.id for e in examples], list(completions), r.tolist()))
        return r, m


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(tmp_path, model_dir, data, method, reward="graded_reward", **extra):
    over = {
        "algorithm.method": method,
        "reward.funcs": f"[tests.test_baselines:{reward}]",
        "repo.delta": DELTA,
        "train.save_every": 0,
        **extra,
    }
    cfg = build_config({}, tiny_overrides(model_dir, data, **over))
    out = tmp_path / method
    trainer = Trainer(cfg, out, progress=False)
    trainer.scorer = Recorder(trainer.scorer)
    trainer.train()
    return out, trainer, read(out / "completions.jsonl"), read(out / "metrics.jsonl")


def groups_of(comps, G):
    """{(step, group): [rows in slot order]} with G rows each."""
    out: dict = {}
    for c in comps:
        out.setdefault((c["step"], c["group"]), []).append(c)
    assert all(len(v) == G for v in out.values())
    return out


def check_against_raw(groups, recorder, G, injected_groups):
    """Injected rows sit at the lowest raw reward (first on ties); every other row is the rollout."""
    assert len(recorder.calls) == len({s for s, _ in groups})  # one scoring call per step
    for (step, g), rows in groups.items():
        ids, texts, raw = recorder.calls[step - 1]
        raw_g, texts_g = raw[g * G:(g + 1) * G], texts[g * G:(g + 1) * G]
        assert {ids[g * G + j] for j in range(G)} == {rows[0]["prompt_id"]}
        lowest = min(range(G), key=lambda j: (raw_g[j], j))
        for j, c in enumerate(rows):
            if (step, g) in injected_groups and j == lowest:
                assert c["origin"] == "expert"
            else:
                assert c["origin"] == "on_policy"
                assert c["reward"] == raw_g[j] and c["text"] == texts_g[j]
    return {(s, g): recorder.calls[s - 1][2][g * G:(g + 1) * G] for (s, g) in groups}


SOLUTION = {r["id"]: r["solution"] for r in ROWS}


def test_luffy_one_expert_per_group_with_solution(tmp_path, tiny_model_dir, tiny_data):
    G = 4
    out, trainer, comps, metrics = run(tmp_path, tiny_model_dir, tiny_data, "luffy", **{"train.max_steps": 3})
    groups = groups_of(comps, G)
    assert len(groups) == 9
    with_solution = {k for k, rows in groups.items() if SOLUTION[rows[0]["prompt_id"]] is not None}
    assert len(with_solution) < len(groups)  # q5 (no solution) was sampled
    for k, rows in groups.items():
        experts = [c for c in rows if c["origin"] == "expert"]
        assert len(experts) == (1 if k in with_solution else 0), k
        for c in experts:
            assert c["text"] == SOLUTION[c["prompt_id"]] and c["reward"] == 1.0
        assert all(c["in_loss"] for c in rows)
    check_against_raw(groups, trainer.scorer, G, with_solution)
    # Advantages: on-policy-only statistics, recomputed by hand from the logged rewards.
    saw_constant = saw_mixed = False
    for rows in groups.values():
        S = [c["reward"] for c in rows if c["origin"] == "on_policy"]
        m = sum(S) / len(S)
        std = math.sqrt(sum((x - m) ** 2 for x in S) / (len(S) - 1))
        for c in rows:
            d = c["reward"] - m
            exp = d if std < 1e-12 else d / (std + EPS)
            assert c["advantage"] == pytest.approx(exp, abs=1e-5), (rows, c)
        if any(c["origin"] == "expert" for c in rows):
            saw_constant |= std < 1e-12
            saw_mixed |= std > 0
    assert saw_constant and saw_mixed  # both branches were exercised
    assert all(r["phase"] == "luffy" for r in metrics)
    # gate rate = groups with a solution / groups, per step
    for r in metrics:
        n = sum(1 for (s, _g) in with_solution if s == r["step"])
        assert r["repo/gate_rate"] == pytest.approx(n / 3) and r["repo/replaced"] == n


def test_luffy_batch_scale_all_fail_step_gives_expert_advantage_one(tmp_path, tiny_model_dir, tiny_data):
    # Every rollout scores 0: on-policy statistics are constant in every group and in the whole
    # batch. The expert's advantage must be 1 - 0 = 1 (not 1/eps = 1e4), the rollouts' 0.
    out, _, comps, _ = run(tmp_path, tiny_model_dir, tiny_data, "luffy", reward="zero_reward",
                           **{"train.max_steps": 1, "algorithm.scale_rewards": "batch"})
    experts = [c for c in comps if c["origin"] == "expert"]
    assert experts
    assert [c["advantage"] for c in experts] == pytest.approx([1.0] * len(experts))
    assert all(c["advantage"] == 0.0 for c in comps if c["origin"] == "on_policy")


def test_hpt_switch_only_all_fail_groups_and_their_rollouts_leave_the_loss(tmp_path, tiny_model_dir, tiny_data):
    G = 4
    out, trainer, comps, metrics = run(tmp_path, tiny_model_dir, tiny_data, "hpt_switch", **{"train.max_steps": 3})
    groups = groups_of(comps, G)
    raw = {}
    # Recompute the switch from the raw on-policy rewards: all G rewards < delta, and a solution.
    recs = trainer.scorer.calls
    for (s, g), rows in groups.items():
        raw[(s, g)] = recs[s - 1][2][g * G:(g + 1) * G]
    switched = {k for k, rows in groups.items()
                if all(x < DELTA for x in raw[k]) and SOLUTION[rows[0]["prompt_id"]] is not None}
    assert switched and switched != set(groups)  # both kinds of group occur
    # an all-fail group without a solution is not switched
    assert any(all(x < DELTA for x in raw[k]) for k in set(groups) - switched)
    check_against_raw(groups, trainer.scorer, G, switched)
    for k, rows in groups.items():
        experts = [c for c in rows if c["origin"] == "expert"]
        if k in switched:
            assert len(experts) == 1 and experts[0]["in_loss"]
            assert experts[0]["text"] == SOLUTION[rows[0]["prompt_id"]]
            assert [c["in_loss"] for c in rows if c["origin"] == "on_policy"] == [False] * (G - 1)
        else:
            assert experts == []
            assert all(c["in_loss"] for c in rows)
    for r in metrics:
        n = sum(1 for (s, _g) in switched if s == r["step"])
        assert r["repo/replaced"] == n and r["repo/gate_rate"] == pytest.approx(n / 3)


def test_raw_expert_injects_exactly_the_rho_gated_groups(tmp_path, tiny_model_dir, tiny_data):
    G, RHO = 4, 0.5
    out, trainer, comps, metrics = run(tmp_path, tiny_model_dir, tiny_data, "raw_expert",
                                       **{"train.max_steps": 3, "repo.rho": RHO})
    groups = groups_of(comps, G)
    recs = trainer.scorer.calls
    raw = {(s, g): recs[s - 1][2][g * G:(g + 1) * G] for (s, g) in groups}
    # gamma = #{R < delta}/G ; with G = 4, rho = 0.5 the gate is ">= 2 failures" (2/4 = 0.5 exactly).
    gated = {k for k, rows in groups.items()
             if sum(x < DELTA for x in raw[k]) / G >= RHO and SOLUTION[rows[0]["prompt_id"]] is not None}
    fails = {k: sum(x < DELTA for x in raw[k]) for k in groups}
    assert any(fails[k] < G for k in gated)  # a partly failed group is gated (not only all-fail)
    assert any(k not in gated and SOLUTION[groups[k][0]["prompt_id"]] is not None for k in groups)  # and one is not
    check_against_raw(groups, trainer.scorer, G, gated)
    for k, rows in groups.items():
        experts = [c for c in rows if c["origin"] == "expert"]
        assert len(experts) == (1 if k in gated else 0), k
        assert all(c["in_loss"] for c in rows)
        # Trained as a rollout: plain group statistics over all G composed rewards, expert included.
        R = [c["reward"] for c in rows]
        m = sum(R) / G
        std = math.sqrt(sum((x - m) ** 2 for x in R) / (G - 1))
        for c in rows:
            exp = 0.0 if std < 1e-12 else (c["reward"] - m) / (std + EPS)
            assert c["advantage"] == pytest.approx(exp, abs=1e-5)
    # Consistency with what completions.jsonl alone shows: a gated group has lost its lowest
    # rollout, a failure, so its visible on-policy failures + 1 reach rho * G.
    for k in gated:
        vis = sum(c["reward"] < DELTA for c in groups[k] if c["origin"] == "on_policy")
        assert (vis + 1) / G >= RHO


def _nll(model, prompt_ids, comp_ids):
    ids = torch.tensor([prompt_ids + comp_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    P = len(prompt_ids)
    return [-float(lp[P - 1 + j, comp_ids[j]]) for j in range(len(comp_ids))]


def test_sft_has_no_rollouts_and_its_loss_is_the_mean_nll(tmp_path, tiny_model_dir, tiny_data):
    from transformers import AutoModelForCausalLM

    L = 8  # algorithm.max_completion_length of tiny_overrides
    out, trainer, comps, metrics = run(tmp_path, tiny_model_dir, tiny_data, "sft", **{"train.max_steps": 2})
    assert trainer.scorer.calls == []  # nothing was generated or scored
    assert comps and all(c["origin"] == "expert" and c["in_loss"] for c in comps)
    assert all(c["text"] == SOLUTION[c["prompt_id"]] for c in comps)
    step1 = [c for c in comps if c["step"] == 1]
    ids1 = [c["prompt_id"] for c in step1]
    assert len(step1) == len([i for i in ids1 if SOLUTION[i] is not None]) >= 1
    # Step 1's loss is computed with the initial weights (one PPO epoch): dapo aggregation =
    # sum of token NLLs / number of tokens, each completion = solution + EOS cut to L tokens.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).float().eval()
    tok = trainer.tokenizer
    prompts = {r["id"]: r["prompt"] for r in ROWS}
    nll = []
    for c in step1:
        comp = (tok(c["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:L]
        nll += _nll(model, trainer.renderer.ids(prompts[c["prompt_id"]]), comp)
    expected = sum(nll) / len(nll)
    assert metrics[0]["loss"] > 0
    assert metrics[0]["loss"] == pytest.approx(expected, rel=1e-4)
    assert all(r["phase"] == "sft" and r["loss"] > 0 for r in metrics)


@pytest.mark.parametrize("sft_steps, expected", [(1, ["sft", "grpo", "grpo"]), (2, ["sft", "sft", "grpo"])])
def test_sft_then_grpo_phases(tmp_path, tiny_model_dir, tiny_data, sft_steps, expected):
    out, trainer, comps, metrics = run(tmp_path, tiny_model_dir, tiny_data, "sft_then_grpo",
                                       **{"train.max_steps": 3, "baselines.sft_steps": sft_steps})
    assert [r["phase"] for r in metrics] == expected
    assert [r["step"] for r in metrics] == [1, 2, 3]
    for step, ph in enumerate(expected, start=1):
        rows = [c for c in comps if c["step"] == step]
        if ph == "sft":
            assert rows and all(c["origin"] == "expert" for c in rows)
        else:
            assert len(rows) == 3 * 4 and all(c["origin"] == "on_policy" for c in rows)
    assert len(trainer.scorer.calls) == expected.count("grpo")  # only GRPO steps generate
