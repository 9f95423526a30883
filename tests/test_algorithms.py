"""Unit tests for repo_rl.algorithms (advantages, losses, groups, methods).

Expected values come from hand arithmetic (written in the comments) or from plain
Python-loop reference implementations defined in this file, never from running the code.
"""

from __future__ import annotations

import math

import pytest
import torch

from repo_rl.algorithms import (
    METHODS,
    ORIGIN_EXPERT,
    ORIGIN_ON_POLICY,
    ORIGIN_REPHRASED,
    MethodSpec,
    aggregate,
    all_failed,
    assign_candidates,
    clipped_surrogate,
    compose_groups,
    layout_candidates,
    entropy_from_logits,
    failure_fraction,
    gate,
    group_advantages,
    group_reward_stats,
    kl_k3,
    masked_mean,
    register_method,
    replacement_slots,
    token_logprobs,
)
from repo_rl import algorithms as alg

EPS = 1e-4
NAN = float("nan")
SEEDS = [0, 1, 2, 3, 4]


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def assert_close(actual, expected, tol=1e-5):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, rtol=tol, atol=tol), (actual.tolist(), expected.tolist())


# ======================================================================================
# Plain-loop reference implementations
# ======================================================================================


def ref_std(xs):
    """Unbiased sample std of a python list (len >= 2)."""
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def ref_group_advantages(rewards, G, scale, valid=None, eps=EPS):
    r = [float(x) for x in rewards]
    ok = [math.isfinite(x) and (valid is None or bool(valid[i])) for i, x in enumerate(r)]
    all_valid = [x for x, o in zip(r, ok) if o]
    batch_std = ref_std(all_valid) if len(all_valid) > 1 else 0.0
    out = [0.0] * len(r)
    for start in range(0, len(r), G):
        idx = [i for i in range(start, start + G) if ok[i]]
        if len(idx) < 2:
            continue
        mean = sum(r[i] for i in idx) / len(idx)
        for i in idx:
            d = r[i] - mean
            if scale == "group":
                out[i] = d / (ref_std([r[j] for j in idx]) + eps)
            elif scale == "batch":
                out[i] = d / (batch_std + eps)
            else:
                out[i] = d
    return out


def ref_clipped(logp, old, adv, el, eh):
    B, T = len(logp), len(logp[0])
    loss = [[0.0] * T for _ in range(B)]
    low = [[False] * T for _ in range(B)]
    high = [[False] * T for _ in range(B)]
    for b in range(B):
        a = adv[b]
        for i in range(T):
            r = math.exp(logp[b][i] - old[b][i])
            rc = min(max(r, 1 - el), 1 + eh)
            loss[b][i] = -min(r * a, rc * a)
            low[b][i] = r < 1 - el and a < 0
            high[b][i] = r > 1 + eh and a > 0
    return loss, low, high


def ref_aggregate(pt, mask, loss_type, num_sequences=None, num_tokens=None, L=None):
    B, T = len(pt), len(pt[0])
    nseq = B if num_sequences is None else num_sequences
    if loss_type == "grpo":
        total = 0.0
        for b in range(B):
            s = sum(pt[b][i] for i in range(T) if mask[b][i])
            n = sum(1 for i in range(T) if mask[b][i])
            total += s / max(n, 1)
        return total / max(nseq, 1)
    s = sum(pt[b][i] for b in range(B) for i in range(T) if mask[b][i])
    if loss_type == "dapo":
        n = sum(1 for b in range(B) for i in range(T) if mask[b][i]) if num_tokens is None else num_tokens
        return s / max(n, 1)
    L = T if L is None else L
    return s / (max(nseq, 1) * L)


def ref_failure_fraction(rows, delta):
    out = []
    for row in rows:
        fails = 0
        for x in row:
            if math.isnan(x) or x < delta:
                fails += 1
        out.append(fails / len(row))
    return out


def ref_replacement_slots(rows, k):
    out = []
    for row in rows:
        keyed = [(-math.inf if math.isnan(x) else x, i) for i, x in enumerate(row)]
        out.append([i for _, i in sorted(keyed)[:k]])
    return out


def ref_compose(rewards, slots, cand, accept, origin):
    N, G = len(rewards), len(rewards[0])
    k = len(slots[0])
    new = [list(row) for row in rewards]
    orig = [[ORIGIN_ON_POLICY] * G for _ in range(N)]
    src = [[n * G + i for i in range(G)] for n in range(N)]
    for n in range(N):
        for j in range(k):
            if accept[n][j]:
                s = slots[n][j]
                new[n][s] = cand[n][j]
                orig[n][s] = origin
                src[n][s] = N * G + n * k + j
    return new, orig, src


def ref_assign(verified, k, allow_unverified):
    choices, oks = [], []
    for row in verified:
        order = [a for a, v in enumerate(row) if v] + [a for a, v in enumerate(row) if not v]
        c, o = [], []
        for j in range(k):
            if j < len(order):
                c.append(order[j])
                o.append(bool(row[order[j]]) or allow_unverified)
            else:
                c.append(0)
                o.append(False)
        choices.append(c)
        oks.append(o)
    return choices, oks


def random_rewards(n, nan_p=0.2, discrete=True):
    """Rewards mixing a small discrete set (ties, equal groups) and NaNs."""
    if discrete:
        vals = torch.tensor([0.0, 0.25, 1.0])[torch.randint(0, 3, (n,))]
    else:
        vals = torch.rand(n)
    return torch.where(torch.rand(n) < nan_p, torch.full_like(vals, NAN), vals)


# ======================================================================================
# group_advantages
# ======================================================================================


def test_group_advantages_group_scale_hand_values():
    # group 1: [1,0,0,1] -> mean 0.5, deviations +-0.5, unbiased var = 4*0.25/3 = 1/3,
    #          std = sqrt(1/3) = 0.57735 -> A = +-0.5 / (0.57735 + 1e-4)
    # group 2: [1,1,1,0] -> mean 0.75, deviations [.25,.25,.25,-.75],
    #          var = (3*0.0625 + 0.5625)/3 = 0.25, std 0.5 -> A = dev / 0.5001
    r = t([1, 0, 0, 1, 1, 1, 1, 0])
    s1 = math.sqrt(1 / 3) + EPS
    s2 = 0.5 + EPS
    expected = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, 0.25 / s2, 0.25 / s2, 0.25 / s2, -0.75 / s2]
    adv = group_advantages(r, 4, "group")
    assert adv.dtype == torch.float32
    assert_close(adv, expected)


def test_group_advantages_batch_scale_hand_values():
    # All 8 rewards [1,0,0,1,1,1,1,0]: 5 ones, mean 0.625.
    # sum sq dev = 5*0.375^2 + 3*0.625^2 = 0.703125 + 1.171875 = 1.875; unbiased var = 1.875/7
    # Centring is still per group (means 0.5 and 0.75), the divisor is the batch std.
    r = t([1, 0, 0, 1, 1, 1, 1, 0])
    s = math.sqrt(1.875 / 7) + EPS
    expected = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0.25 / s, 0.25 / s, 0.25 / s, -0.75 / s]
    assert_close(group_advantages(r, 4, "batch"), expected)


def test_group_advantages_no_scale_is_centred_only():
    # Dr. GRPO: A = R - group mean -> [.5,-.5,-.5,.5] and [.25,.25,.25,-.75]
    r = t([1, 0, 0, 1, 1, 1, 1, 0])
    assert_close(group_advantages(r, 4, "none"), [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])


def test_group_advantages_nan_excluded_and_zero():
    # [1, nan, 0, 0.5]: valid {1, 0, 0.5}, mean 0.5, deviations [.5, -.5, 0],
    # var = (0.25+0.25+0)/2 = 0.25, std 0.5 -> [0.5/0.5001, 0, -0.5/0.5001, 0]
    r = t([1, NAN, 0, 0.5])
    adv = group_advantages(r, 4, "group")
    assert torch.isfinite(adv).all()
    assert adv[1].item() == 0.0
    assert_close(adv, [0.5 / 0.5001, 0.0, -0.5 / 0.5001, 0.0])


def test_group_advantages_valid_mask_excludes_entries():
    # rewards [1,0,1,0], valid [T,T,F,T]: valid {1,0,0}, mean 1/3, deviations [2/3,-1/3,-1/3],
    # var = (4/9 + 1/9 + 1/9)/2 = 1/3, std = 0.57735 -> entry 2 (invalid) gets exactly 0
    r = t([1, 0, 1, 0])
    valid = torch.tensor([True, True, False, True])
    s = math.sqrt(1 / 3) + EPS
    adv = group_advantages(r, 4, "group", valid=valid)
    assert adv[2].item() == 0.0
    assert_close(adv, [(2 / 3) / s, (-1 / 3) / s, 0.0, (-1 / 3) / s])


def test_group_advantages_batch_std_uses_only_valid_entries():
    # rewards [1, 0, nan, 5] with valid [T,T,T,F] -> valid {1, 0}: mean 0.5, unbiased std
    # sqrt(0.5) (the 5.0 would change it if it leaked in), deviations +-0.5
    r = t([1, 0, NAN, 5])
    valid = torch.tensor([True, True, True, False])
    s = math.sqrt(0.5) + EPS
    assert_close(group_advantages(r, 4, "batch", valid=valid), [0.5 / s, -0.5 / s, 0.0, 0.0])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_all_equal_group_is_exactly_zero(scale):
    # group 1 all 0.5 -> deviations 0 -> advantage exactly 0 (not NaN from 0/0);
    # group 2 [1,0] keeps non-zero advantages so the batch std is non-zero
    r = t([0.5, 0.5, 0.5, 0.5, 1, 0, 1, 0])
    adv = group_advantages(r, 4, scale)
    assert torch.isfinite(adv).all()
    assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    # an entire batch of equal rewards: batch std 0 -> still 0, not NaN
    adv2 = group_advantages(t([1.0] * 6), 3, scale)
    assert adv2.tolist() == [0.0] * 6


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_all_equal_float64_group_is_exactly_zero(scale):
    # Docstring contract: a group whose valid rewards are all equal gets advantage 0.
    # 0.1 is not exact in binary: 0.1+0.1+0.1 = 0.30000000000000004, /3 = 0.10000000000000002,
    # so a naive (R - mean) leaves ~1e-17 (scaled by 1/(std+eps) up to ~1e-13 for "group").
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], dtype=torch.float64)
    adv = group_advantages(r, 3, scale)
    assert adv.tolist() == [0.0] * 6


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_single_valid_entry_is_zero(scale):
    # group 1 has one valid entry -> 0; group 2 all NaN -> 0; group 3 normal ([1,0,...])
    r = t([1, NAN, NAN, NAN, NAN, NAN, NAN, NAN, 1, 0, NAN, NAN])
    adv = group_advantages(r, 4, scale)
    assert torch.isfinite(adv).all()
    assert adv[:8].tolist() == [0.0] * 8
    assert adv[8].item() > 0 > adv[9].item()


def test_group_advantages_integer_input_and_errors():
    # integer rewards [1,0] -> mean .5, std sqrt(.5) -> +-0.5/(0.70711+1e-4), output float32
    adv = group_advantages(torch.tensor([1, 0]), 2, "group")
    assert adv.dtype == torch.float32
    s = math.sqrt(0.5) + EPS
    assert_close(adv, [0.5 / s, -0.5 / s])
    with pytest.raises(ValueError):
        group_advantages(t([1, 0, 1]), 2)  # not a multiple of G
    with pytest.raises(ValueError):
        group_advantages(t([[1, 0], [1, 0]]), 2)  # not 1-D
    with pytest.raises(ValueError):
        group_advantages(t([1, 0]), 2, scale="std")


def test_group_advantages_does_not_mutate_input():
    r = t([1, NAN, 0, 1])
    before = r.clone()
    group_advantages(r, 4, "group")
    assert torch.equal(torch.isnan(r), torch.isnan(before))
    assert torch.equal(torch.nan_to_num(r), torch.nan_to_num(before))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("N,G", [(1, 2), (3, 4), (5, 8), (2, 3)])
def test_group_advantages_matches_loop(seed, scale, N, G):
    torch.manual_seed(seed)
    r = random_rewards(N * G, discrete=seed % 2 == 0)
    use_mask = seed % 3 == 0
    valid = torch.rand(N * G) > 0.2 if use_mask else None
    adv = group_advantages(r, G, scale, valid=valid)
    expected = ref_group_advantages(r.tolist(), G, scale, None if valid is None else valid.tolist())
    assert torch.isfinite(adv).all()
    assert_close(adv, expected, tol=1e-4)


# ======================================================================================
# group_reward_stats
# ======================================================================================


def test_group_reward_stats_hand_values():
    # rewards [1,0,0,1 | 1,1,1,1]: mean 6/8 = 0.75.
    # sq dev: six ones 6*0.0625 = 0.375, two zeros 2*0.5625 = 1.125 -> 1.5/7 -> std 0.46291
    # group 2 has zero spread -> frac_reward_zero_std = 1/2
    s = group_reward_stats(t([1, 0, 0, 1, 1, 1, 1, 1]), 4)
    assert s["reward"] == pytest.approx(0.75)
    assert s["reward_std"] == pytest.approx(math.sqrt(1.5 / 7))
    assert s["frac_reward_zero_std"] == pytest.approx(0.5)


def test_group_reward_stats_nan():
    # finite rewards [1,0,0,1] -> mean 0.5, std sqrt(1/3); group 2 has one finite entry -> zero std
    s = group_reward_stats(t([1, NAN, 0, 0, NAN, NAN, NAN, 1]), 4)
    assert s["reward"] == pytest.approx(0.5)
    assert s["reward_std"] == pytest.approx(math.sqrt(1 / 3))
    assert s["frac_reward_zero_std"] == pytest.approx(0.5)
    s = group_reward_stats(t([NAN] * 4), 2)
    assert math.isnan(s["reward"])
    assert s["reward_std"] == 0.0
    assert s["frac_reward_zero_std"] == 1.0


# ======================================================================================
# clipped_surrogate
# ======================================================================================

RATIOS = [0.5, 1.0, 1.1, 2.0]  # below, at 1, inside, above (eps_low 0.2 / eps_high 0.28)


def _logp(ratios):
    return torch.log(t(ratios, torch.float64)).unsqueeze(0), torch.zeros(1, len(ratios), dtype=torch.float64)


def test_clipped_surrogate_positive_advantage():
    # A = +1, clip range [0.8, 1.28]:
    #   r*A        = [0.5, 1, 1.1, 2.0]
    #   clip(r)*A  = [0.8, 1, 1.1, 1.28]
    #   min        = [0.5, 1, 1.1, 1.28]  -> loss = -min
    # high-clipped: r > 1.28 with A > 0 -> only r = 2.0; low: none (needs A < 0)
    logp, old = _logp(RATIOS)
    loss, low, high = clipped_surrogate(logp, old, t([1.0], torch.float64), 0.2, 0.28)
    assert_close(loss, [[-0.5, -1.0, -1.1, -1.28]])
    assert low.tolist() == [[False, False, False, False]]
    assert high.tolist() == [[False, False, False, True]]


def test_clipped_surrogate_negative_advantage():
    # A = -2, clip range [0.8, 1.28]:
    #   r*A       = [-1, -2, -2.2, -4]
    #   clip(r)*A = [-1.6, -2, -2.2, -2.56]
    #   min       = [-1.6, -2, -2.2, -4] -> loss = [1.6, 2, 2.2, 4]
    # low-clipped: r < 0.8 with A < 0 -> r = 0.5; r = 2.0 is NOT clipped for A < 0
    logp, old = _logp(RATIOS)
    loss, low, high = clipped_surrogate(logp, old, t([-2.0], torch.float64), 0.2, 0.28)
    assert_close(loss, [[1.6, 2.0, 2.2, 4.0]])
    assert low.tolist() == [[True, False, False, False]]
    assert high.tolist() == [[False, False, False, False]]


def test_clipped_surrogate_zero_advantage():
    logp, old = _logp(RATIOS)
    loss, low, high = clipped_surrogate(logp, old, t([0.0], torch.float64), 0.2, 0.28)
    assert_close(loss, [[0.0] * 4])
    assert not low.any() and not high.any()


def test_clipped_surrogate_asymmetric_epsilon():
    # ratios [0.85, 1.4]
    # eps_low 0.1, eps_high 0.5 -> range [0.9, 1.5]:
    #   A=-1: 0.85 -> min(-0.85, -0.9) = -0.9 -> loss 0.9 (low clipped); 1.4 -> loss 1.4
    #   A=+1: 0.85 -> loss -0.85;   1.4 inside [.9, 1.5] -> loss -1.4 (not high clipped)
    # eps_low 0.2, eps_high 0.28 -> range [0.8, 1.28]:
    #   A=-1: 0.85 inside -> 0.85, 1.4 -> 1.4;  A=+1: 1.4 -> min(1.4, 1.28) -> loss -1.28 (high)
    logp = torch.log(t([[0.85, 1.4], [0.85, 1.4]], torch.float64))
    old = torch.zeros_like(logp)
    adv = t([-1.0, 1.0], torch.float64)
    loss, low, high = clipped_surrogate(logp, old, adv, 0.1, 0.5)
    assert_close(loss, [[0.9, 1.4], [-0.85, -1.4]])
    assert low.tolist() == [[True, False], [False, False]]
    assert high.tolist() == [[False, False], [False, False]]
    loss, low, high = clipped_surrogate(logp, old, adv, 0.2, 0.28)
    assert_close(loss, [[0.85, 1.4], [-0.85, -1.28]])
    assert low.tolist() == [[False, False], [False, False]]
    assert high.tolist() == [[False, False], [False, True]]


def test_clipped_surrogate_uses_log_ratio_and_per_token_advantages():
    # logp - old = log 2 with old = -3 -> ratio 2; per-token advantages [B, T] accepted
    # A = [[1, -1]], eps .2/.2 -> token 0: min(2, 1.2) = 1.2 -> loss -1.2; token 1: min(-2,-1.2) -> loss 2
    old = t([[-3.0, -3.0]], torch.float64)
    logp = old + math.log(2.0)
    loss, low, high = clipped_surrogate(logp, old, t([[1.0, -1.0]], torch.float64), 0.2, 0.2)
    assert_close(loss, [[-1.2, 2.0]])
    assert high.tolist() == [[True, False]] and low.tolist() == [[False, False]]


def test_clipped_surrogate_gradient_zero_when_clipped():
    # d loss / d logp = -r*A when the unclipped term is active, 0 when the clipped term is.
    # A=+1, ratios [1.1, 2.0] (eps .2/.28): token 0 -> -1.1, token 1 (clipped) -> 0
    logp = torch.log(t([[1.1, 2.0]], torch.float64)).requires_grad_(True)
    loss, _, _ = clipped_surrogate(logp, torch.zeros_like(logp), t([1.0], torch.float64), 0.2, 0.28)
    loss.sum().backward()
    assert_close(logp.grad, [[-1.1, 0.0]])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,T", [(1, 1), (3, 5), (6, 2)])
def test_clipped_surrogate_matches_loop(seed, B, T):
    torch.manual_seed(seed)
    old = -torch.rand(B, T, dtype=torch.float64) * 3
    logp = old + torch.randn(B, T, dtype=torch.float64) * 0.5
    adv = torch.randn(B, dtype=torch.float64)
    el, eh = 0.1 + 0.2 * torch.rand(()).item(), 0.1 + 0.3 * torch.rand(()).item()
    loss, low, high = clipped_surrogate(logp, old, adv, el, eh)
    rl, rlow, rhigh = ref_clipped(logp.tolist(), old.tolist(), adv.tolist(), el, eh)
    assert_close(loss, rl, tol=1e-9)
    assert low.tolist() == rlow
    assert high.tolist() == rhigh


# ======================================================================================
# kl_k3
# ======================================================================================


def test_kl_k3():
    x = t([[-0.5, -2.0, -7.0]], torch.float64)
    assert kl_k3(x, x).tolist() == [[0.0, 0.0, 0.0]]
    # logp = log .5, ref = log .25: d = ref - logp = log .5 = -0.693147
    #   k3 = exp(d) - d - 1 = 0.5 + 0.693147 - 1 = 0.193147
    # logp = -1, ref = 0: d = 1 -> e - 1 - 1 = 0.718282
    logp = t([math.log(0.5), -1.0], torch.float64)
    ref = t([math.log(0.25), 0.0], torch.float64)
    assert_close(kl_k3(logp, ref), [0.5 + math.log(2) - 1, math.e - 2])
    torch.manual_seed(0)
    a, b = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    k = kl_k3(a, b)
    assert (k > 0).all()


# ======================================================================================
# aggregate / masked_mean
# ======================================================================================

PT = [[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 100.0, 100.0]]  # 100s are masked out
MASK = [[1, 1, 1, 0], [1, 1, 0, 0]]


def test_aggregate_hand_values():
    pt, mask = t(PT), t(MASK)
    # grpo: seq means (1+2+3)/3 = 2 and (4+5)/2 = 4.5 -> (2 + 4.5)/2 = 3.25
    assert aggregate(pt, mask, "grpo").item() == pytest.approx(3.25)
    # dapo: (1+2+3+4+5)/5 tokens = 3
    assert aggregate(pt, mask, "dapo").item() == pytest.approx(3.0)
    # dr_grpo: 15 / (2 sequences x 4 positions) = 1.875; with L=10: 15/20 = 0.75
    assert aggregate(pt, mask, "dr_grpo").item() == pytest.approx(1.875)
    assert aggregate(pt, mask, "dr_grpo", max_completion_length=10).item() == pytest.approx(0.75)
    # explicit global totals: grpo 6.5/4 = 1.625, dapo 15/10 = 1.5, dr_grpo 15/(4*4) = 0.9375
    assert aggregate(pt, mask, "grpo", num_sequences=4).item() == pytest.approx(1.625)
    assert aggregate(pt, mask, "dapo", num_tokens=10).item() == pytest.approx(1.5)
    assert aggregate(pt, mask, "dr_grpo", num_sequences=4).item() == pytest.approx(0.9375)
    # bool mask accepted
    assert aggregate(pt, mask.bool(), "dapo").item() == pytest.approx(3.0)


def test_aggregate_empty_sequence_and_bad_type():
    # third sequence fully masked contributes 0 but still counts: (2 + 4.5 + 0)/3
    pt = t(PT + [[9.0, 9.0, 9.0, 9.0]])
    mask = t(MASK + [[0, 0, 0, 0]])
    assert aggregate(pt, mask, "grpo").item() == pytest.approx(6.5 / 3)
    assert aggregate(pt, mask, "dapo").item() == pytest.approx(3.0)
    with pytest.raises(ValueError):
        aggregate(pt, mask, "ppo")


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("seed", SEEDS)
def test_aggregate_matches_loop(loss_type, seed):
    torch.manual_seed(seed)
    B, T = 2 + seed, 3 + seed % 3
    pt = torch.randn(B, T, dtype=torch.float64)
    mask = (torch.rand(B, T) > 0.3).to(torch.float64)
    got = aggregate(pt, mask, loss_type)
    assert got.item() == pytest.approx(ref_aggregate(pt.tolist(), mask.tolist(), loss_type), abs=1e-12)
    got = aggregate(pt, mask, loss_type, num_sequences=B + 3, num_tokens=17, max_completion_length=T + 2)
    exp = ref_aggregate(pt.tolist(), mask.tolist(), loss_type, B + 3, 17, T + 2)
    assert got.item() == pytest.approx(exp, abs=1e-12)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aggregate_micro_batches_sum_to_full_batch(loss_type, seed):
    # Gradient accumulation: summing micro-batch losses computed with the whole batch's
    # totals must equal the full-batch loss, even when each micro-batch is trimmed to its
    # own padded width (dr_grpo then needs the global max_completion_length).
    torch.manual_seed(seed)
    B, T = 8, 6
    lengths = torch.randint(0, T + 1, (B,))
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.float64)
    pt = torch.randn(B, T, dtype=torch.float64, requires_grad=True)
    full = aggregate(pt, mask, loss_type, max_completion_length=T)
    n_tok = mask.sum().item()
    total = torch.zeros((), dtype=torch.float64)
    for lo, hi in [(0, 3), (3, 5), (5, 8)]:
        m = mask[lo:hi]
        width = max(int(m.sum(-1).max().item()), 1)  # trim trailing padding per micro-batch
        total = total + aggregate(
            pt[lo:hi, :width], m[:, :width], loss_type, num_sequences=B, num_tokens=n_tok, max_completion_length=T
        )
    assert total.item() == pytest.approx(full.item(), abs=1e-12)
    g_full = torch.autograd.grad(full, pt)[0]
    g_micro = torch.autograd.grad(total, pt)[0]
    assert torch.allclose(g_full, g_micro, atol=1e-12)


def test_aggregate_micro_batches_without_totals_differ():
    # Sanity check that the exactness test can fail: dapo micro-batches normalised by their
    # own token counts do not add up. Rows [1,1] (2 tokens) and [4,_] (1 token):
    # full = 6/3 = 2; per-micro means 1 + 4 = 5, halved (2 micro-batches) = 2.5 != 2
    pt = t([[1.0, 1.0], [4.0, 0.0]])
    mask = t([[1, 1], [1, 0]])
    assert aggregate(pt, mask, "dapo").item() == pytest.approx(2.0)
    parts = aggregate(pt[:1], mask[:1], "dapo") + aggregate(pt[1:], mask[1:], "dapo")
    assert parts.item() / 2 == pytest.approx(2.5)
    exact = aggregate(pt[:1], mask[:1], "dapo", num_tokens=3) + aggregate(pt[1:], mask[1:], "dapo", num_tokens=3)
    assert exact.item() == pytest.approx(2.0)


def test_masked_mean():
    # (1 + 3)/2 = 2; empty mask -> 0
    assert masked_mean(t([1.0, 2.0, 3.0, 4.0]), t([1, 0, 1, 0])).item() == pytest.approx(2.0)
    assert masked_mean(t([1.0, 2.0]), t([0, 0])).item() == 0.0


# ======================================================================================
# token_logprobs / entropy_from_logits
# ======================================================================================


def test_token_logprobs_hand_value():
    # logits [0, log 3] -> softmax [1/4, 3/4] -> log p(1) = log .75, log p(0) = log .25
    logits = t([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    out = token_logprobs(logits, torch.tensor([[1, 0]]))
    assert_close(out, [[math.log(0.75), math.log(0.25)]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_logprobs_matches_log_softmax_gather(seed):
    torch.manual_seed(seed)
    logits = torch.randn(3, 5, 11) * 4
    targets = torch.randint(0, 11, (3, 5))
    ref = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    out = token_logprobs(logits, targets)
    assert out.shape == (3, 5)
    assert torch.allclose(out, ref, atol=1e-5)
    # bf16 logits are upcast: result is float32
    assert token_logprobs(logits.bfloat16(), targets).dtype == torch.float32


def test_entropy_from_logits():
    # uniform over V=7 -> log 7; one-hot-ish (100 vs 0) -> ~0
    assert_close(entropy_from_logits(torch.zeros(2, 7)), [math.log(7)] * 2)
    e = entropy_from_logits(t([[100.0, 0.0, 0.0, 0.0]]))
    assert 0 <= e.item() < 1e-6
    # [0, log 3] -> p = [.25, .75] -> H = .25*ln4 + .75*ln(4/3) = 0.346574 + 0.215762 = 0.562335
    e = entropy_from_logits(t([0.0, math.log(3.0)]))
    assert e.item() == pytest.approx(0.25 * math.log(4) + 0.75 * math.log(4 / 3), abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 11, 50, 1 << 21])
def test_entropy_in_slices_equals_the_whole_batch_at_once(chunk):
    """Slices of positions (chunk_elements // V rows each, at least one) give exactly the
    per-position loop's answer, whatever the slice boundaries."""
    x = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0)) * 4
    got = entropy_from_logits(x, chunk_elements=chunk)
    assert got.shape == (3, 5)
    for b in range(3):
        for p in range(5):
            lp = torch.log_softmax(x[b, p], -1)
            assert torch.equal(got[b, p], -(lp.exp() * lp).sum())


# ======================================================================================
# failure_fraction / gate / all_failed
# ======================================================================================


def test_failure_fraction_threshold_is_strict_and_nan_fails():
    # delta 0.5: 0.5 is NOT a failure (R < delta is strict), 0.4 is, 1.0 is not, NaN is -> 2/4
    r = t([[0.5, 0.4, 1.0, NAN], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.5, 0.5]])
    assert_close(failure_fraction(r, 0.5), [0.5, 1.0, 0.0])


def test_gate_rho_boundaries_and_eligibility():
    r = t([[0.5, 0.4, 1.0, NAN], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.5, 0.5]])  # gamma .5, 1, 0
    assert gate(r, 0.5, 0.5).tolist() == [True, True, False]  # gamma >= rho (inclusive)
    assert gate(r, 0.5, 0.51).tolist() == [False, True, False]
    assert gate(r, 0.5, 0.0).tolist() == [True, True, True]  # rho 0 gates every group
    assert gate(r, 0.5, 1.0).tolist() == [False, True, False]  # rho 1: only all-failed
    eligible = torch.tensor([True, False, True])
    assert gate(r, 0.5, 0.5, eligible).tolist() == [True, False, False]
    assert gate(r, 0.5, 0.0, torch.tensor([1, 0, 1])).tolist() == [True, False, True]


def test_all_failed():
    # delta .5: [0,0,nan] all fail; [0,0,.5] has a success (0.5 == delta is not a failure)
    r = t([[0.0, 0.0, NAN], [0.0, 0.0, 0.5], [NAN, NAN, NAN]])
    assert all_failed(r, 0.5).tolist() == [True, False, True]
    # delta 0: nothing is < 0, only NaNs fail
    assert all_failed(r, 0.0).tolist() == [False, False, True]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("N,G", [(1, 2), (4, 4), (7, 8)])
def test_failure_fraction_and_gate_match_loop(seed, N, G):
    torch.manual_seed(seed)
    r = random_rewards(N * G, nan_p=0.15).view(N, G)
    delta = [0.0, 0.25, 0.5, 1.0, 0.3][seed]
    ff = failure_fraction(r, delta)
    ref = ref_failure_fraction(r.tolist(), delta)
    assert_close(ff, ref, tol=1e-6)
    eligible = torch.rand(N) > 0.3
    for rho in [0.0, 0.25, 0.5, 0.75, 1.0]:
        exp = [f >= rho - 1e-9 and bool(e) for f, e in zip(ref, eligible.tolist())]
        assert gate(r, delta, rho, eligible).tolist() == exp
        assert gate(r, delta, rho).tolist() == [f >= rho - 1e-9 for f in ref]
    assert all_failed(r, delta).tolist() == [f == 1.0 for f in ref]


# ======================================================================================
# replacement_slots
# ======================================================================================


def test_replacement_slots_hand():
    # [0.5, nan, 0.2, 0.2, 1.0]: NaN lowest (1), then the 0.2 tie in index order (2, 3), then 0.5 (0)
    r = t([[0.5, NAN, 0.2, 0.2, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert replacement_slots(r, 1).tolist() == [[1], [0]]
    assert replacement_slots(r, 3).tolist() == [[1, 2, 3], [0, 1, 2]]
    assert replacement_slots(r, 5).tolist() == [[1, 2, 3, 0, 4], [0, 1, 2, 3, 4]]


def test_replacement_slots_k_bounds():
    r = t([[0.0, 1.0, 0.5]])
    with pytest.raises(ValueError):
        replacement_slots(r, 0)
    with pytest.raises(ValueError):
        replacement_slots(r, 4)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("N,G,k", [(1, 2, 1), (5, 4, 2), (6, 8, 3), (3, 8, 8)])
def test_replacement_slots_matches_loop(seed, N, G, k):
    torch.manual_seed(seed)
    r = random_rewards(N * G, nan_p=0.2).view(N, G)  # discrete values -> many ties
    assert replacement_slots(r, k).tolist() == ref_replacement_slots(r.tolist(), k)


# ======================================================================================
# compose_groups
# ======================================================================================


def test_compose_groups_hand():
    # N=2, G=3, k=2. Pool layout: 6 rollouts (0..5) then candidates 6 + n*2 + j.
    # row 0: slot 0 <- candidate (0,0) [pool 6], candidate (0,1) rejected -> slot 2 keeps rollout 2
    # row 1: slot 0 <- candidate (1,0) [pool 8], slot 1 <- candidate (1,1) [pool 9], slot 2 keeps 5
    rewards = t([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    slots = torch.tensor([[0, 2], [0, 1]])
    cand = t([[1.0, 1.0], [1.0, 0.7]])
    accept = torch.tensor([[True, False], [True, True]])
    new, origin, source = compose_groups(rewards, slots, cand, accept)
    assert_close(new, [[1.0, 1.0, 0.0], [1.0, 0.7, 0.0]])
    assert origin.tolist() == [[ORIGIN_REPHRASED, 0, 0], [ORIGIN_REPHRASED, ORIGIN_REPHRASED, 0]]
    assert source.tolist() == [[6, 1, 2], [8, 9, 5]]
    # input untouched
    assert rewards.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]


def test_compose_groups_nothing_accepted_and_expert_origin():
    rewards = t([[0.2, NAN], [1.0, 0.0]])
    slots = torch.tensor([[1], [1]])
    new, origin, source = compose_groups(rewards, slots, t([[1.0], [1.0]]), torch.zeros(2, 1, dtype=torch.bool))
    assert new[0, 0].item() == pytest.approx(0.2) and math.isnan(new[0, 1].item())
    assert new[1].tolist() == [1.0, 0.0]
    assert origin.tolist() == [[0, 0], [0, 0]]
    assert source.tolist() == [[0, 1], [2, 3]]
    # accept given as ints, origin = expert; pool index for (1, 0) = 4 + 1*1 + 0 = 5
    new, origin, source = compose_groups(rewards, slots, t([[1.0], [0.5]]), torch.tensor([[0], [1]]), ORIGIN_EXPERT)
    assert origin.tolist() == [[0, 0], [0, ORIGIN_EXPERT]]
    assert source.tolist() == [[0, 1], [2, 5]]
    assert new[1].tolist() == [1.0, 0.5]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("N,G,k", [(1, 2, 1), (4, 4, 2), (5, 8, 3)])
def test_compose_groups_matches_loop(seed, N, G, k):
    torch.manual_seed(seed)
    r = random_rewards(N * G, nan_p=0.1, discrete=False).view(N, G)
    slots = replacement_slots(r, k) if seed % 2 else torch.stack([torch.randperm(G)[:k] for _ in range(N)])
    cand = torch.rand(N, k)
    accept = torch.rand(N, k) > 0.4
    new, origin, source = compose_groups(r, slots, cand, accept)
    rn, ro, rs = ref_compose(r.tolist(), slots.tolist(), cand.tolist(), accept.tolist(), ORIGIN_REPHRASED)
    assert torch.equal(torch.isnan(new), torch.isnan(torch.tensor(rn)))
    assert torch.equal(torch.nan_to_num(new, -7.0), torch.nan_to_num(torch.tensor(rn), -7.0))
    assert origin.tolist() == ro
    assert source.tolist() == rs
    # each source index used at most once, rollouts keep their own index
    flat = source.view(-1).tolist()
    assert len(set(flat)) == len(flat)


# ======================================================================================
# assign_candidates
# ======================================================================================


def test_assign_candidates_hand():
    # row 0: verified attempts 1 and 3 -> [1, 3] accepted
    # row 1: none verified -> attempts [0, 1], rejected (accepted only with allow_unverified)
    # row 2: only attempt 2 verified -> [2, 0]: first accepted, the unverified filler is not
    v = torch.tensor([[False, True, False, True], [False, False, False, False], [False, False, True, False]])
    choice, ok = assign_candidates(v, 2)
    assert choice.tolist() == [[1, 3], [0, 1], [2, 0]]
    assert ok.tolist() == [[True, True], [False, False], [True, False]]
    choice, ok = assign_candidates(v, 2, allow_unverified=True)
    assert choice.tolist() == [[1, 3], [0, 1], [2, 0]]
    assert ok.tolist() == [[True, True], [True, True], [True, True]]


def test_assign_candidates_more_slots_than_attempts():
    # A = 2 attempts, k = 3 slots: the third slot is padding and never accepted
    v = torch.tensor([[True, False], [False, True]])
    choice, ok = assign_candidates(v, 3)
    assert choice.shape == (2, 3) and ok.shape == (2, 3)
    assert choice[:, :2].tolist() == [[0, 1], [1, 0]]
    assert ok.tolist() == [[True, False, False], [True, False, False]]
    _, ok = assign_candidates(v, 3, allow_unverified=True)
    assert ok.tolist() == [[True, True, False], [True, True, False]]


def test_layout_candidates_hand():
    # N = 4 groups; groups 3 and 1 gated (in that order), A = 2 attempts each, k = 2 slots.
    # attempt rewards: gated row 0 (group 3) -> [0.1, 0.9]; gated row 1 (group 1) -> [0.7, 0.2]
    gated = torch.tensor([3, 1])
    choice = torch.tensor([[1, 0], [0, 1]])
    ok = torch.tensor([[True, False], [True, True]])
    r = torch.tensor([0.1, 0.9, 0.7, 0.2])
    rew, acc, att = layout_candidates(gated, choice, ok, r, num_groups=4, attempts=2)
    # group 3 takes attempts 1 and 0 (flat 1, 0); group 1 takes attempts 0 and 1 (flat 2, 3)
    assert att.tolist() == [[0, 0], [2, 3], [0, 0], [1, 0]]
    assert rew.tolist() == [[0.0, 0.0], pytest.approx([0.7, 0.2]), [0.0, 0.0], pytest.approx([0.9, 0.1])]
    assert acc.tolist() == [[False, False], [True, True], [False, False], [True, False]]
    rew64, _, _ = layout_candidates(gated, choice, ok, r, 4, 2, dtype=torch.float64)
    assert rew64.dtype == torch.float64


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("N,A,k", [(1, 1, 1), (5, 3, 2), (6, 4, 3)])
def test_layout_candidates_matches_loop(seed, N, A, k):
    g = torch.Generator().manual_seed(seed)
    M = int(torch.randint(1, N + 1, (), generator=g))
    gated = torch.randperm(N, generator=g)[:M]
    choice = torch.randint(0, A, (M, k), generator=g)
    ok = torch.rand(M, k, generator=g) < 0.5
    r = torch.rand(M * A, generator=g, dtype=torch.float64)
    rew, acc, att = layout_candidates(gated, choice, ok, r, N, A, dtype=torch.float32)
    e_rew, e_acc, e_att = torch.zeros(N, k), torch.zeros(N, k, dtype=torch.bool), torch.zeros(N, k, dtype=torch.long)
    for row, n in enumerate(gated.tolist()):
        for j in range(k):
            c = row * A + int(choice[row, j])
            e_rew[n, j] = r[c]
            e_acc[n, j] = bool(ok[row, j])
            e_att[n, j] = c
    assert torch.equal(rew, e_rew) and torch.equal(acc, e_acc) and torch.equal(att, e_att)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("N,A,k", [(1, 1, 1), (4, 3, 2), (6, 5, 5), (3, 2, 4)])
@pytest.mark.parametrize("allow", [False, True])
def test_assign_candidates_matches_loop(seed, N, A, k, allow):
    torch.manual_seed(seed)
    v = torch.rand(N, A) > 0.5
    choice, ok = assign_candidates(v, k, allow)
    rc, ro = ref_assign(v.tolist(), k, allow)
    assert ok.tolist() == ro
    # padded (never-accepted) choices beyond A carry no meaning; compare the real ones
    kk = min(k, A)
    assert choice[:, :kk].tolist() == [row[:kk] for row in rc]
    assert choice.dtype == torch.long and ok.dtype == torch.bool


# ======================================================================================
# method registry
# ======================================================================================


def test_methods_registry():
    assert {"grpo", "repo"} <= set(METHODS)
    assert METHODS["grpo"].injection is None and not METHODS["grpo"].requires_solution
    assert METHODS["repo"].injection == "rephrase" and METHODS["repo"].requires_solution
    assert "Replay" in METHODS["repo"].summary  # disambiguation from Replay-Enhanced PO
    with pytest.raises(ValueError, match="grpo"):
        register_method(MethodSpec("grpo", "duplicate"))
    assert METHODS["grpo"].summary != "duplicate"


def test_register_new_method():
    name = "_test_only_method"
    try:
        spec = register_method(MethodSpec(name, "test", injection="expert", requires_solution=True))
        assert METHODS[name] is spec
        with pytest.raises(ValueError):
            register_method(MethodSpec(name, "again"))
    finally:
        METHODS.pop(name, None)


def test_zero_gradient_rows_by_hand():
    adv = torch.tensor([0.0, 0.5, 0.0, 0.0, -1.0])
    kinds = torch.tensor([alg.KIND_POLICY, alg.KIND_POLICY, alg.KIND_SHAPED, alg.KIND_SFT, alg.KIND_SHAPED])
    assert alg.zero_gradient_rows(adv, kinds, beta=0.0).tolist() == [True, False, True, False, False]
    assert alg.zero_gradient_rows(adv, kinds, beta=0.04).tolist() == [False] * 5


def test_zero_gradient_rows_have_exactly_zero_loss_gradient():
    """Against autograd on mixed_token_loss, row by row, for random log-probs and ratios."""
    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    adv = torch.tensor([0.0, 1.0, 0.0, 0.0, -0.5, 0.0])
    kinds = torch.tensor([alg.KIND_POLICY, alg.KIND_POLICY, alg.KIND_SHAPED, alg.KIND_SFT, alg.KIND_SHAPED, alg.KIND_POLICY])
    logp = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g)  # ratios away from 1, some clipped
    loss, _, _ = alg.mixed_token_loss(logp, old, adv, kinds, 0.2, 0.2)
    loss.sum().backward()
    flagged = alg.zero_gradient_rows(adv, kinds, beta=0.0)
    for i in range(B):
        zero_row = bool((logp.grad[i] == 0).all()) and bool((loss[i] == 0).all())
        assert zero_row == bool(flagged[i]), i
