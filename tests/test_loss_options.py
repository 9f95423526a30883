"""The loss options: dual clip (``clip_ratio_c``), the log-ratio clamp (``log_ratio_bound``),
the KL penalty with and without TRL's bias correction, and :func:`token_loss`, which puts
them together.

Hand-worked numbers in the comments; every value is also checked against a plain-Python
per-token loop (values and hand-derived gradients) on random inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from repo_rl.algorithms.losses import (
    KIND_POLICY,
    KIND_SFT,
    KIND_SHAPED,
    clipped_surrogate,
    kl_k3,
    kl_penalty,
    mixed_token_loss,
    token_loss,
)

F64 = torch.float64
LN2 = math.log(2.0)


def t(x):
    return torch.tensor(x, dtype=F64)


def close(got, want, tol=1e-9):
    got = got.tolist() if isinstance(got, torch.Tensor) else got
    flat_g = torch.tensor(got, dtype=F64).flatten().tolist()
    flat_w = torch.tensor(want, dtype=F64).flatten().tolist()
    assert len(flat_g) == len(flat_w), (got, want)
    for g, w in zip(flat_g, flat_w):
        assert math.isclose(g, w, rel_tol=tol, abs_tol=tol), (got, want)


def grad_of(fn, logp):
    """(value, d sum(value) / d logp) of ``fn(logp)``."""
    x = logp.clone().requires_grad_(True)
    out = fn(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), g


# --------------------------------------------------------------------------------------
# Plain-Python references, one token at a time
# --------------------------------------------------------------------------------------


def ref_surrogate(lp, old, A, el, eh, c=None, bound=None):
    """(loss, d loss / d logp) of -min(r*A, clip(r, 1-el, 1+eh)*A), dual clip, clamp."""
    lr = lp - old
    clamped = bound is not None and abs(lr) > bound
    if bound is not None:
        lr = max(-bound, min(bound, lr))
    r = math.exp(lr)
    dr = 0.0 if clamped else r  # d r / d logp
    unclipped = r * A
    clipped = min(max(r, 1 - el), 1 + eh) * A
    loss = -min(unclipped, clipped)
    # unclipped active (or a tie, where r lies inside the clip range and both slopes agree): -A r';
    # clipped active: r is outside the range, clamp is flat -> 0
    grad = -A * dr if unclipped <= clipped else 0.0
    if c is not None and A < 0 and loss > -A * c:
        loss, grad = -A * c, 0.0
    return loss, grad


def ref_k3(lp, ref):
    d = ref - lp
    return math.exp(d) - d - 1, 1 - math.exp(d)  # value, d k3 / d logp (d d / d logp = -1)


def ref_token_loss(lp, old, A, kind, ref, *, el, eh, gamma, beta, bias, c, bound):
    """(loss, grad) of one token of :func:`token_loss`."""
    if kind == KIND_POLICY:
        loss, grad = ref_surrogate(lp, old, A, el, eh, c, bound)
    elif kind == KIND_SHAPED:
        p = math.exp(lp)
        loss = -p / (p + gamma) * A
        grad = -A * gamma * p / (p + gamma) ** 2  # d/dlogp p/(p+g) = g p / (p+g)^2
    else:
        loss, grad = -lp, -1.0
    if ref is not None and beta != 0:
        k3, dk3 = ref_k3(lp, ref)
        if not bias:
            R, dR = 1.0, 0.0
        elif kind == KIND_POLICY:
            lr = lp - old
            clamped = bound is not None and abs(lr) > bound
            R = math.exp(max(-bound, min(bound, lr)) if bound is not None else lr)
            dR = 0.0 if clamped else R
        else:  # ratio pinned to 1 in value: exp(logp - logp.detach()), slope 1
            R, dR = 1.0, 1.0
        loss += beta * k3 * R
        grad += beta * (dk3 * R + k3 * dR)
    return loss, grad


# ======================================================================================
# clipped_surrogate: log_ratio_bound and clip_ratio_c
# ======================================================================================


def _runaway():
    # one token, logp - old = 30, A = -1
    return t([[-1.0]]), t([[-31.0]]), t([-1.0])


def test_runaway_negative_token_unbounded_loss_is_e30():
    # r = e^30 = 1.0686e13; r*A = -1.0686e13, clip(r)*A = 1.2 * -1 = -1.2;
    # min(-1.0686e13, -1.2) = -1.0686e13 -> loss = e^30
    logp, old, adv = _runaway()
    loss, _, _ = clipped_surrogate(logp, old, adv, 0.2, 0.2)
    close(loss, [[math.exp(30)]])
    assert loss.item() > 1e13


def test_log_ratio_bound_caps_the_runaway_at_e20():
    # log ratio 30 clamped to 20 -> r = e^20 = 4.85165e8 -> loss = e^20
    logp, old, adv = _runaway()
    loss, _, _ = clipped_surrogate(logp, old, adv, 0.2, 0.2, log_ratio_bound=20.0)
    close(loss, [[math.exp(20)]])
    assert 4.85e8 < loss.item() < 4.86e8
    # the lower side too: log ratio -30 -> -20, A = +1: min(e^-20, 0.8) = e^-20 -> loss -e^-20
    loss, _, _ = clipped_surrogate(t([[-31.0]]), t([[-1.0]]), t([1.0]), 0.2, 0.2, log_ratio_bound=20.0)
    close(loss, [[-math.exp(-20)]], tol=1e-15)
    assert loss.item() != -math.exp(-30)


def test_dual_clip_caps_the_runaway_at_c_times_minus_a():
    # loss = min(e^30, -A * c) = min(1.07e13, 1 * 3) = 3 (with or without the bound: min(e^20, 3) = 3)
    logp, old, adv = _runaway()
    loss, low, high = clipped_surrogate(logp, old, adv, 0.2, 0.2, clip_ratio_c=3.0)
    close(loss, [[3.0]])
    loss, _, _ = clipped_surrogate(logp, old, adv, 0.2, 0.2, clip_ratio_c=3.0, log_ratio_bound=20.0)
    close(loss, [[3.0]])
    # A = -2 -> cap -A * c = 6
    loss, _, _ = clipped_surrogate(logp, old, t([-2.0]), 0.2, 0.2, clip_ratio_c=3.0)
    close(loss, [[6.0]])
    # the dual clip does not mark the token as low- or high-clipped (r > 1 + eps with A < 0)
    assert not low.any() and not high.any()


def test_gradient_is_zero_beyond_the_log_ratio_clamp():
    # A = -1, r > 1.2: loss = r (unclipped term active), d loss/d logp = r.
    # log ratio 10 (inside the bound 20): gradient e^10 = 22026.47
    # log ratio 30 (clamped to 20): the loss is the constant e^20 -> gradient 0
    # without the bound, log ratio 30: gradient e^30
    old = t([[0.0, 0.0]])
    logp = t([[10.0, 30.0]])
    adv = t([-1.0])
    val, g = grad_of(lambda x: clipped_surrogate(x, old, adv, 0.2, 0.2, log_ratio_bound=20.0)[0], logp)
    close(val, [[math.exp(10), math.exp(20)]])
    close(g, [[math.exp(10), 0.0]])
    assert g[0, 1].item() == 0.0
    _, g = grad_of(lambda x: clipped_surrogate(x, old, adv, 0.2, 0.2)[0], logp)
    close(g, [[math.exp(10), math.exp(30)]])


def test_gradient_is_zero_under_the_dual_clip():
    # c = 3. Ratios 2 and 4 (logp = ln r, old = 0), eps 0.2:
    #   A = -1, r = 2: loss = -min(-2, -1.2) = 2 < 3   -> kept, gradient -A r = 2
    #   A = -1, r = 4: loss = 4 > 3 -> capped at 3     -> gradient 0   (without c: 4, gradient 4)
    #   A = -2, r = 2: loss = -min(-4, -2.4) = 4 < 6   -> kept, gradient -A r = 4
    #   A = -2, r = 4: loss = 8 > 6 -> capped at 6     -> gradient 0   (without c: 8, gradient 8)
    logp = torch.log(t([[2.0, 4.0], [2.0, 4.0]]))
    old = torch.zeros_like(logp)
    adv = t([-1.0, -2.0])
    val, g = grad_of(lambda x: clipped_surrogate(x, old, adv, 0.2, 0.2, clip_ratio_c=3.0)[0], logp)
    close(val, [[2.0, 3.0], [4.0, 6.0]])
    close(g, [[2.0, 0.0], [4.0, 0.0]])
    val, g = grad_of(lambda x: clipped_surrogate(x, old, adv, 0.2, 0.2)[0], logp)
    close(val, [[2.0, 4.0], [4.0, 8.0]])
    close(g, [[2.0, 4.0], [4.0, 8.0]])


def test_dual_clip_leaves_positive_advantages_alone():
    # A > 0, c = 3. A cap -A*c would be negative and, applied to positive advantages, would
    # replace every loss by -A*c:
    #   A = 2, r = 0.5: -min(1.0, 0.8*2 = 1.6) = -1   (gradient -A r = -1)   [not -6]
    #   A = 2, r = 4:   -min(8, 1.2*2 = 2.4)  = -2.4 (clipped, gradient 0)  [not -6]
    #   A = 5, r = 1:   -min(5, 5)            = -5   (gradient -A r = -5)   [not -15]
    logp = torch.log(t([[0.5, 4.0], [1.0, 1.0]]))
    old = torch.zeros_like(logp)
    adv = t([2.0, 5.0])
    val_c, g_c = grad_of(lambda x: clipped_surrogate(x, old, adv, 0.2, 0.2, clip_ratio_c=3.0)[0], logp)
    close(val_c, [[-1.0, -2.4], [-5.0, -5.0]])
    close(g_c, [[-1.0, 0.0], [-5.0, -5.0]])
    val, g = grad_of(lambda x: clipped_surrogate(x, old, adv, 0.2, 0.2)[0], logp)
    assert torch.equal(val, val_c) and torch.equal(g, g_c)
    # zero advantage: cap -0 * c = 0 = the loss; nothing changes
    val0, _ = grad_of(lambda x: clipped_surrogate(x, old, t([0.0, 0.0]), 0.2, 0.2, clip_ratio_c=3.0)[0], logp)
    assert torch.equal(val0, torch.zeros_like(val0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_options_off_is_exactly_the_plain_clipped_objective(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 6
    old = -3 * torch.rand(B, T, generator=g, dtype=F64)
    logp = old + 2.5 * torch.randn(B, T, generator=g, dtype=F64)  # ratios e^-7 .. e^7
    adv = torch.randn(B, generator=g, dtype=F64)
    default, low_d, high_d = clipped_surrogate(logp, old, adv, 0.2, 0.28)
    off, low_o, high_o = clipped_surrogate(logp, old, adv, 0.2, 0.28, clip_ratio_c=None, log_ratio_bound=None)
    assert torch.equal(default, off) and torch.equal(low_d, low_o) and torch.equal(high_d, high_o)
    for b in range(B):
        for j in range(T):
            lp, o, A = logp[b, j].item(), old[b, j].item(), adv[b].item()
            r = math.exp(lp - o)
            want = -min(r * A, min(max(r, 0.8), 1.28) * A)
            assert math.isclose(off[b, j].item(), want, rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("c,bound", [(None, None), (1.5, None), (None, 1.5), (2.0, 1.0)])
def test_clipped_surrogate_options_match_the_loop(seed, c, bound):
    # log ratios in N(0, 2^2) so both the bound (1 or 1.5) and the dual clip are often active
    g = torch.Generator().manual_seed(100 + seed)
    B, T = 3, 7
    old = -2 * torch.rand(B, T, generator=g, dtype=F64)
    logp = old + 2.0 * torch.randn(B, T, generator=g, dtype=F64)
    adv = 2 * torch.randn(B, T, generator=g, dtype=F64)  # per-token advantages
    val, grad = grad_of(lambda x: clipped_surrogate(x, old, adv, 0.2, 0.28, clip_ratio_c=c, log_ratio_bound=bound)[0], logp)
    active_c = active_bound = 0
    for b in range(B):
        for j in range(T):
            lp, o, A = logp[b, j].item(), old[b, j].item(), adv[b, j].item()
            want, want_g = ref_surrogate(lp, o, A, 0.2, 0.28, c, bound)
            assert math.isclose(val[b, j].item(), want, rel_tol=1e-12, abs_tol=1e-12), (b, j)
            assert math.isclose(grad[b, j].item(), want_g, rel_tol=1e-12, abs_tol=1e-12), (b, j)
            active_bound += bound is not None and abs(lp - o) > bound
            active_c += c is not None and want == -A * c
    # the random inputs do exercise the option under test
    assert active_bound > 0 or bound is None
    assert active_c > 0 or c is None


# ======================================================================================
# kl_penalty
# ======================================================================================

# d = ref - logp.  k3 = e^d - d - 1;  d k3 / d logp = 1 - e^d.
#   d = ln 2: k3 = 2 - ln 2 - 1 = 1 - ln 2 = 0.306853;  d k3/d logp = 1 - 2 = -1
#   d = -1:   k3 = e^-1 + 1 - 1 = e^-1    = 0.367879;  d k3/d logp = 1 - e^-1 = 0.632121
# With the bias-correction ratio r = exp(logp - old), old = logp.detach() (r = 1, dr/dlogp = 1):
#   d/dlogp [k3 r] = (1 - e^d) r + k3 dr/dlogp = (1 - e^d) + k3
#   d = ln 2: -1 + (1 - ln 2) = -ln 2 = -0.693147
#   d = -1:   (1 - e^-1) + e^-1 = 1
K3_LN2, K3_M1 = 1 - LN2, math.exp(-1)
LOGP = t([[-1.0, -0.5]])
REF = LOGP + t([[LN2, -1.0]])


def test_kl_penalty_without_old_logp_is_plain_k3():
    val, g = grad_of(lambda x: kl_penalty(x, REF), LOGP)
    close(val, [[K3_LN2, K3_M1]], tol=1e-12)
    close(g, [[-1.0, 1 - math.exp(-1)]], tol=1e-12)
    assert torch.equal(val, kl_k3(LOGP, REF))
    # the k3 gradient is nonzero whenever policy != reference, zero when they agree
    _, g0 = grad_of(lambda x: kl_penalty(x, x.detach()), LOGP)
    assert torch.equal(g0, torch.zeros_like(g0))


def test_kl_penalty_with_old_logp_at_ratio_one_keeps_the_ratio_gradient():
    # value = k3 (r = 1); gradient = (1 - e^d) + k3 = [-ln 2, 1] (vs [-1, 0.632] without the ratio)
    val, g = grad_of(lambda x: kl_penalty(x, REF, x.detach()), LOGP)
    close(val, [[K3_LN2, K3_M1]], tol=1e-12)
    close(g, [[-LN2, 1.0]], tol=1e-12)
    # old given as a separate constant tensor equal to logp: the same
    val2, g2 = grad_of(lambda x: kl_penalty(x, REF, LOGP.clone()), LOGP)
    close(val2, val.tolist(), tol=1e-15)
    close(g2, g.tolist(), tol=1e-15)


def test_kl_penalty_ratio_two_and_its_clamp():
    # old = logp - ln 2 -> r = 2: value 2 k3 = [2 (1 - ln 2), 2 e^-1] = [0.613706, 0.735759];
    # gradient r ((1 - e^d) + k3) = 2 [-ln 2, 1] = [-1.386294, 2]
    val, g = grad_of(lambda x: kl_penalty(x, REF, LOGP - LN2), LOGP)
    close(val, [[2 * K3_LN2, 2 * K3_M1]], tol=1e-12)
    close(g, [[-2 * LN2, 2.0]], tol=1e-12)
    # old = logp - 30, bound 20 -> r = e^20 held constant: value e^20 k3, gradient e^20 (1 - e^d)
    val, g = grad_of(lambda x: kl_penalty(x, REF, LOGP - 30.0, log_ratio_bound=20.0), LOGP)
    e20 = math.exp(20)
    close(val, [[e20 * K3_LN2, e20 * K3_M1]], tol=1e-12)
    close(g, [[e20 * -1.0, e20 * (1 - math.exp(-1))]], tol=1e-12)


# ======================================================================================
# token_loss
# ======================================================================================

# Three rows, one token each, logp = ln 0.5 (p = 0.5), ref_logp = 0 -> d = ln 2, k3 = 1 - ln 2:
#   row 0 POLICY, old = logp - ln 2 (r = 2), A = +1, eps .2/.2:
#       surrogate -min(2, 1.2) = -1.2 (clipped, gradient 0)
#       kl 0.1 * r k3 = 0.2 (1 - ln 2) = 0.0613706          -> loss -1.1386294
#       gradient 0.1 r ((1 - e^d) + k3) = 0.2 (-ln 2) = -0.1386294
#   row 1 SHAPED (gamma 0.1), old = logp - 30 (garbage; ratio pinned to 1), A = +1:
#       -p/(p+g) A = -0.5/0.6 = -0.8333333; kl 0.1 (1 - ln 2) = 0.0306853 -> loss -0.8026480
#       gradient -A g p/(p+g)^2 = -0.05/0.36 = -0.1388889, kl 0.1 (-ln 2) = -0.0693147 -> -0.2082036
#   row 2 SFT, old = logp + 5 (garbage), A = 0:
#       -logp = ln 2 = 0.6931472; kl 0.0306853 -> loss 0.7238325
#       gradient -1 - 0.0693147 = -1.0693147
HAND_LOGP = t([[math.log(0.5)], [math.log(0.5)], [math.log(0.5)]])
HAND_OLD = HAND_LOGP + t([[-LN2], [-30.0], [5.0]])
HAND_ADV = t([1.0, 1.0, 0.0])
HAND_KIND = torch.tensor([KIND_POLICY, KIND_SHAPED, KIND_SFT])
HAND_REF = torch.zeros(3, 1, dtype=F64)


def _hand(x, **kw):
    kw = {"epsilon_low": 0.2, "epsilon_high": 0.2, "gamma": 0.1, "beta": 0.1, "ref_logp": HAND_REF, **kw}
    return token_loss(x, HAND_OLD, HAND_ADV, HAND_KIND, **kw)


def test_token_loss_hand_values_and_gradients():
    val, g = grad_of(lambda x: _hand(x)[0], HAND_LOGP)
    k = 0.1 * (1 - LN2)
    close(val, [[-1.2 + 2 * k], [-0.5 / 0.6 + k], [LN2 + k]], tol=1e-12)
    close(val, [[-1.1386294], [-0.8026480], [0.7238325]], tol=1e-7)
    close(g, [[-0.2 * LN2], [-0.05 / 0.36 - 0.1 * LN2], [-1.0 - 0.1 * LN2]], tol=1e-12)
    close(g, [[-0.1386294], [-0.2082036], [-1.0693147]], tol=1e-7)
    _, parts = _hand(HAND_LOGP)
    assert set(parts) == {"clip_low", "clip_high", "kl"}
    assert parts["clip_high"].tolist() == [[True], [False], [False]]
    assert not parts["clip_low"].any()
    # parts["kl"] is k3 itself, without the ratio 2 of row 0, and carries no graph
    close(parts["kl"], [[1 - LN2]] * 3, tol=1e-12)
    x = HAND_LOGP.clone().requires_grad_(True)
    assert not _hand(x)[1]["kl"].requires_grad


def test_token_loss_without_bias_correction_uses_plain_k3():
    # row 0: -1.2 + 0.1 (1 - ln 2) = -1.1693147; gradient of the KL term 0.1 (1 - e^d) = -0.1
    val, g = grad_of(lambda x: _hand(x, use_bias_correction_kl=False)[0], HAND_LOGP)
    k = 0.1 * (1 - LN2)
    close(val, [[-1.2 + k], [-0.5 / 0.6 + k], [LN2 + k]], tol=1e-12)
    close(g, [[-0.1], [-0.05 / 0.36 - 0.1], [-1.0 - 0.1]], tol=1e-12)


def test_non_policy_rows_pin_the_ratio_even_without_a_bound():
    # rows 1 and 2 carry old log-probs 30 and 5 away; with log_ratio_bound=None a ratio that were
    # not pinned would be e^30 / e^-5 in value, and inf * 0 = NaN in the gradient with old 1000 away
    val, g = grad_of(lambda x: _hand(x, log_ratio_bound=None)[0], HAND_LOGP)
    k = 0.1 * (1 - LN2)
    close(val[1:], [[-0.5 / 0.6 + k], [LN2 + k]], tol=1e-12)
    far_old = HAND_LOGP + t([[0.0], [-1000.0], [1000.0]])
    val, g = grad_of(
        lambda x: token_loss(x, far_old, HAND_ADV, HAND_KIND, epsilon_low=0.2, epsilon_high=0.2, beta=0.1,
                             ref_logp=HAND_REF, log_ratio_bound=None)[0],
        HAND_LOGP,
    )
    assert torch.isfinite(val).all() and torch.isfinite(g).all()
    close(g[1:], [[-0.05 / 0.36 - 0.1 * LN2], [-1.0 - 0.1 * LN2]], tol=1e-12)


@pytest.mark.parametrize("beta,ref", [(0.0, True), (0.1, False), (0.0, False)])
def test_token_loss_without_kl_is_mixed_token_loss_exactly(beta, ref):
    g = torch.Generator().manual_seed(7)
    B, T = 4, 5
    old = -2 * torch.rand(B, T, generator=g, dtype=F64)
    logp = old + torch.randn(B, T, generator=g, dtype=F64)
    ref_logp = logp + torch.randn(B, T, generator=g, dtype=F64) if ref else None
    adv = torch.randn(B, generator=g, dtype=F64)
    kind = torch.tensor([KIND_POLICY, KIND_SHAPED, KIND_SFT, KIND_POLICY])
    kw = {"clip_ratio_c": 3.0, "log_ratio_bound": 0.5}
    val, grad = grad_of(lambda x: token_loss(x, old, adv, kind, epsilon_low=0.2, epsilon_high=0.3, gamma=0.1,
                                             beta=beta, ref_logp=ref_logp, **kw)[0], logp)
    want, want_g = grad_of(lambda x: mixed_token_loss(x, old, adv, kind, 0.2, 0.3, 0.1, **kw)[0], logp)
    assert torch.equal(val, want) and torch.equal(grad, want_g)
    _, parts = token_loss(logp, old, adv, kind, epsilon_low=0.2, epsilon_high=0.3, beta=beta, ref_logp=ref_logp, **kw)
    assert set(parts) == {"clip_low", "clip_high"}
    _, low, high = mixed_token_loss(logp, old, adv, kind, 0.2, 0.3, 0.1, **kw)
    assert torch.equal(parts["clip_low"], low) and torch.equal(parts["clip_high"], high)


def test_token_loss_is_mixed_token_loss_plus_beta_kl_penalty():
    g = torch.Generator().manual_seed(3)
    B, T = 3, 4
    old = -2 * torch.rand(B, T, generator=g, dtype=F64)
    logp = old + torch.randn(B, T, generator=g, dtype=F64)
    ref_logp = logp + torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, generator=g, dtype=F64)
    kind = torch.tensor([KIND_POLICY, KIND_SHAPED, KIND_SFT])
    got, parts = token_loss(logp, old, adv, kind, epsilon_low=0.2, epsilon_high=0.2, beta=0.05, ref_logp=ref_logp)
    pinned = torch.where((kind == KIND_POLICY).view(-1, 1).expand_as(logp), old, logp)
    base, _, _ = mixed_token_loss(logp, old, adv, kind, 0.2, 0.2, log_ratio_bound=20.0)
    want = base + 0.05 * kl_penalty(logp, ref_logp, pinned, 20.0)
    close(got, want.tolist(), tol=1e-12)
    assert torch.equal(parts["kl"], kl_k3(logp, ref_logp))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta,bias,c,bound", [
    (0.05, True, None, None),
    (0.05, True, 2.0, 1.0),
    (0.2, False, 1.5, 20.0),
    (0.0, True, 2.0, 1.0),
])
def test_token_loss_matches_the_loop(seed, beta, bias, c, bound):
    g = torch.Generator().manual_seed(1000 + seed)
    B, T = 5, 4
    old = -2 * torch.rand(B, T, generator=g, dtype=F64)
    logp = old + 1.5 * torch.randn(B, T, generator=g, dtype=F64)
    ref_logp = logp + torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, generator=g, dtype=F64)
    adv[seed % B] = 0.0
    kind = torch.randint(0, 3, (B,), generator=g)
    kind[0], kind[1], kind[2] = KIND_POLICY, KIND_SHAPED, KIND_SFT
    eps_lo, eps_hi, gamma = 0.2, 0.28, 0.1
    val, grad = grad_of(
        lambda x: token_loss(x, old, adv, kind, epsilon_low=eps_lo, epsilon_high=eps_hi, gamma=gamma, beta=beta,
                             ref_logp=ref_logp, use_bias_correction_kl=bias, clip_ratio_c=c, log_ratio_bound=bound)[0],
        logp,
    )
    _, parts = token_loss(logp, old, adv, kind, epsilon_low=eps_lo, epsilon_high=eps_hi, gamma=gamma, beta=beta,
                          ref_logp=ref_logp, use_bias_correction_kl=bias, clip_ratio_c=c, log_ratio_bound=bound)
    assert ("kl" in parts) == (beta != 0)
    for b in range(B):
        k = int(kind[b])
        for j in range(T):
            lp, o, r = logp[b, j].item(), old[b, j].item(), ref_logp[b, j].item()
            want, want_g = ref_token_loss(lp, o, adv[b].item(), k, r, el=eps_lo, eh=eps_hi, gamma=gamma, beta=beta,
                                          bias=bias, c=c, bound=bound)
            assert math.isclose(val[b, j].item(), want, rel_tol=1e-10, abs_tol=1e-10), (b, j, k)
            assert math.isclose(grad[b, j].item(), want_g, rel_tol=1e-10, abs_tol=1e-10), (b, j, k)
            ratio = math.exp(lp - o)
            pol = k == KIND_POLICY
            assert bool(parts["clip_low"][b, j]) == (pol and ratio < 1 - eps_lo and adv[b].item() < 0)
            assert bool(parts["clip_high"][b, j]) == (pol and ratio > 1 + eps_hi and adv[b].item() > 0)
            if beta != 0:
                assert math.isclose(parts["kl"][b, j].item(), ref_k3(lp, r)[0], rel_tol=1e-12, abs_tol=1e-12)
