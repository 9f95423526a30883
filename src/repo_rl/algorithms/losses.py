"""Policy losses. Pure tensor functions on per-token tensors: no model, no I/O.

Shapes: ``[B, T]`` per-token tensors with a ``mask`` of the same shape (1 on completion
tokens), ``[B]`` per-sequence tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    *,
    clip_ratio_c: float | None = None,
    log_ratio_bound: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO/GRPO clipped objective, per token, as a loss to minimise.

    ``loss = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)`` with ``r = exp(logp - old_logp)``.
    Returns ``(loss, low_clipped, high_clipped)``; the masks mark tokens whose clipped term
    was the active one (``r < 1 - eps_low`` with ``A < 0`` / ``r > 1 + eps_high`` with ``A > 0``),
    matching TRL's ``clip_ratio/low_mean`` and ``clip_ratio/high_mean``.

    ``log_ratio_bound``: clamp ``logp - old_logp`` to ``[-bound, bound]`` before ``exp`` (verl uses
    20), so one runaway token cannot overflow the loss. ``clip_ratio_c``: verl's dual clip; for
    ``A < 0`` the loss is at most ``-A * clip_ratio_c``.
    """
    log_ratio = logp - old_logp
    if log_ratio_bound is not None:
        log_ratio = torch.clamp(log_ratio, -log_ratio_bound, log_ratio_bound)
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(-1) if advantages.dim() == logp.dim() - 1 else advantages
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    loss = -torch.min(unclipped, clipped)
    if clip_ratio_c is not None:
        loss = torch.where(adv < 0, torch.min(loss, -adv * clip_ratio_c), loss)
    low = (ratio < 1 - epsilon_low) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    return loss, low, high


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, old_logp: torch.Tensor | None = None, log_ratio_bound: float | None = None
) -> torch.Tensor:
    """Per-token KL term of the loss: :func:`kl_k3`, times the importance ratio ``exp(logp - old_logp)``
    when ``old_logp`` is given (TRL's ``use_bias_correction_kl``; the ratio keeps its gradient, so
    at ratio 1 the value is k3's and the gradient gains ``k3 * d logp``). Without ``old_logp`` it is
    plain k3, as verl's ``low_var_kl`` (verl also clamps that to [-10, 10]; k3 here is unclamped)."""
    kl = kl_k3(logp, ref_logp)
    if old_logp is None:
        return kl
    log_ratio = logp - old_logp
    if log_ratio_bound is not None:
        log_ratio = torch.clamp(log_ratio, -log_ratio_bound, log_ratio_bound)
    return kl * torch.exp(log_ratio)


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    *,
    num_sequences: int | None = None,
    num_tokens: int | float | None = None,
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    - ``grpo``: mean over each sequence's tokens, then mean over sequences;
    - ``dapo``: sum over all tokens / total number of tokens;
    - ``dr_grpo``: sum over all tokens / (sequences x max_completion_length).

    For gradient accumulation pass the totals of the *whole* batch (``num_sequences``,
    ``num_tokens``): the micro-batch losses then add up exactly to the full-batch loss.
    Defaults are the totals of this tensor.
    """
    mask = mask.to(per_token.dtype)
    nseq = per_token.shape[0] if num_sequences is None else num_sequences
    if loss_type == "grpo":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / max(nseq, 1)
    if loss_type == "dapo":
        ntok = mask.sum() if num_tokens is None else num_tokens
        return (per_token * mask).sum() / max(float(ntok), 1.0)
    if loss_type == "dr_grpo":
        L = per_token.shape[-1] if max_completion_length is None else max_completion_length
        return (per_token * mask).sum() / (max(nseq, 1) * L)
    raise ValueError(f"loss_type must be grpo, dapo or dr_grpo, got {loss_type!r}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (0 when the mask is empty)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def entropy_from_logits(logits: torch.Tensor, chunk_elements: int = 1 << 21) -> torch.Tensor:
    """Per-position entropy of the softmax over the last dimension.

    Computed a slice of positions at a time (about ``chunk_elements`` logits per slice), so the
    log-softmax temporaries of a large vocabulary never exist for the whole batch at once.
    """
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    rows = max(1, chunk_elements // max(V, 1))
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for s in range(0, flat.shape[0], rows):
        logp = torch.log_softmax(flat[s : s + rows].float(), dim=-1)
        out[s : s + rows] = -(logp.exp() * logp).sum(-1)
    return out.view(logits.shape[:-1])


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position, without materialising the full log-softmax twice."""
    logits = logits.float()
    return torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def luffy_shaping(p: torch.Tensor, gamma: float) -> torch.Tensor:
    """LUFFY's policy shaping ``f(p) = p / (p + gamma)`` of a token probability."""
    return p / (p + gamma)


@dataclass(frozen=True)
class LossOptions:
    """Settings every registered loss may read."""

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    gamma: float = 0.1
    """LUFFY's shaping constant."""
    clip_ratio_c: float | None = None
    log_ratio_bound: float | None = None
    distill_is_clip: float | None = 2.0
    """Self-distillation: the importance ratio pi / pi_old that weights the loss is capped here
    (None: no ratio), as TRL's ``distillation_is_clip``."""
    distill_kl: torch.Tensor | None = None
    """Self-distillation over the whole vocabulary: ``[B, T]`` exact per-token KL(pi || pi_T)
    (:func:`reverse_kl`, with its gradient), used instead of the sampled-token estimate."""


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, LossOptions], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``fn(logp, old_logp, advantages, options) -> (per-token loss [B, T], per-token metrics)``; the
advantages broadcast to ``[B, T]``. Metrics are bool masks such as ``clip_low`` / ``clip_high``."""


@dataclass(frozen=True)
class LossKind:
    name: str
    id: int
    """Stored per training row; rows of one batch may use different losses."""
    fn: LossFn
    advantage_weighted: bool = True
    """The loss and its gradient are zero when the row's advantage is 0 (see :func:`zero_gradient_rows`)."""
    teacher: bool = False
    """The row's per-token advantages come from teacher log-probs (:func:`token_advantages`)."""


LOSSES: dict[str, LossKind] = {}
"""Per-row losses by name (verl's ``register_policy_loss`` style); ``Method.injected_loss`` names one."""


def register_loss(name: str, *, advantage_weighted: bool = True, teacher: bool = False) -> Callable[[LossFn], LossFn]:
    """Decorator: register a per-token loss under ``name`` with the next free id (flags: :class:`LossKind`)."""

    def deco(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = LossKind(name, len(LOSSES), fn, advantage_weighted, teacher)
        return fn

    return deco


@register_loss("policy")
def policy_loss(logp, old_logp, adv, o: LossOptions):
    """Clipped surrogate: on-policy rollouts, RePO rephrasings, raw expert text trained as a rollout."""
    loss, low, high = clipped_surrogate(
        logp, old_logp, adv, o.epsilon_low, o.epsilon_high, clip_ratio_c=o.clip_ratio_c, log_ratio_bound=o.log_ratio_bound
    )
    return loss, {"clip_low": low, "clip_high": high}


@register_loss("shaped")
def shaped_loss(logp, old_logp, adv, o: LossOptions):
    """LUFFY's off-policy term ``-f(pi) * A`` with ``f(p) = p / (p + gamma)``, no clipping."""
    return -luffy_shaping(torch.exp(logp), o.gamma) * adv, {}


@register_loss("sft", advantage_weighted=False)
def sft_loss(logp, old_logp, adv, o: LossOptions):
    """Negative log-likelihood (HPT/ReLIFT switch, SFT); ignores the advantage."""
    return -logp, {}


@register_loss("distill", advantage_weighted=False, teacher=True)
def distill_loss(logp, old_logp, adv, o: LossOptions):
    """On-policy self-distillation (SDFT): the per-token reverse KL to a stop-gradient teacher,
    estimated on the sampled tokens, ``-A_t * log pi(y_t)`` with ``A_t = log pi_T(y_t) - log pi(y_t)``
    (:func:`token_advantages`), times the importance ratio ``pi / pi_old`` capped at
    ``distill_is_clip`` (stop-gradient). TRL's ``sampled_token`` mode: the value is
    ``(log pi - log pi_T) * log pi`` and the gradient is that of KL(pi || pi_T) per token.
    With ``distill_kl`` (``full_logits``), the loss is that exact per-token KL instead."""
    loss = o.distill_kl if o.distill_kl is not None else -adv * logp
    if o.distill_is_clip is not None:
        log_ratio = torch.clamp((logp - old_logp).detach(), -20.0, 20.0)
        loss = loss * torch.exp(log_ratio).clamp(max=o.distill_is_clip)
    return loss, {}


KIND_POLICY = LOSSES["policy"].id
"""Clipped surrogate (on-policy rollouts, RePO rephrasings, raw expert text trained as a rollout)."""
KIND_SHAPED = LOSSES["shaped"].id
"""LUFFY off-policy term: ``-f(pi) * A`` with ``f(p) = p / (p + gamma)``, no clipping."""
KIND_SFT = LOSSES["sft"].id
"""Negative log-likelihood (HPT/ReLIFT switch, SFT)."""
KIND_DISTILL = LOSSES["distill"].id
"""On-policy self-distillation (SDFT): reverse KL to the teacher at each completion token."""


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` KL(pi || pi_T) at each position over the whole vocabulary, from ``[B, T, V]``
    logits; the teacher's side is stop-gradient (TRL's ``full_logits`` mode with alpha = 1)."""
    s = torch.log_softmax(student_logits.float(), dim=-1)
    t = torch.log_softmax(teacher_logits.detach().float(), dim=-1)
    return (s.exp() * (s - t)).sum(-1)


def _kinds_where(kinds: torch.Tensor, flag: str) -> torch.Tensor:
    """``[B]`` bool: rows whose registered loss has ``flag`` (a :class:`LossKind` attribute) set."""
    out = torch.zeros(kinds.shape, dtype=torch.bool, device=kinds.device)
    for lk in LOSSES.values():
        if getattr(lk, flag):
            out |= kinds == lk.id
    return out


def token_advantages(
    advantages: torch.Tensor, kinds: torch.Tensor, logp: torch.Tensor, teacher_logp: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, T]`` per-token advantages: each row's ``[B]`` advantage at every token, except rows whose
    loss learns from a teacher (:attr:`LossKind.teacher`), which get ``log pi_T(y_t) - log pi(y_t)``
    (stop-gradient: minus the reverse KL's per-token estimate on the sampled token)."""
    adv = advantages.view(-1, 1).expand_as(logp)
    if teacher_logp is None:
        return adv
    return torch.where(_kinds_where(kinds, "teacher").view(-1, 1), (teacher_logp - logp).detach(), adv)


def zero_gradient_rows(advantages: torch.Tensor, kinds: torch.Tensor, beta: float) -> torch.Tensor:
    """``[B]`` bool: rows whose :func:`mixed_token_loss` and its gradient are exactly zero.

    Policy and shaped rows with advantage 0 lose ``-min(r * 0, clip(r) * 0)`` or ``-f(p) * 0``
    at every token, whatever the log-probs; SFT and self-distillation rows (losses registered with
    ``advantage_weighted=False``) always have a gradient, and so does every row once a KL penalty
    is added (``beta != 0``). Such rows need no forward or
    backward pass, as long as the loss normalisers still count them.
    """
    if beta != 0:
        return torch.zeros(advantages.shape, dtype=torch.bool, device=advantages.device)
    return (advantages == 0) & _kinds_where(kinds, "advantage_weighted")


def mixed_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    kind: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    gamma: float = 0.1,
    *,
    clip_ratio_c: float | None = None,
    log_ratio_bound: float | None = None,
    distill_is_clip: float | None = 2.0,
    distill_kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loss where each sequence has a kind (``[B]`` of registered loss ids, KIND_*).

    Each row gets its registered loss (:data:`LOSSES`): policy rows :func:`clipped_surrogate`,
    shaped rows ``-luffy_shaping(exp(logp)) * A``, SFT rows ``-logp``, distill rows
    :func:`distill_loss` (their ``advantages`` per token, :func:`token_advantages`). Returns
    ``(loss, clip_low, clip_high)``; the clip masks are zero outside policy rows.
    """
    k = kind.view(-1, 1).expand_as(logp)
    adv = advantages.unsqueeze(-1) if advantages.dim() == logp.dim() - 1 else advantages
    opts = LossOptions(epsilon_low, epsilon_high, gamma, clip_ratio_c, log_ratio_bound, distill_is_clip, distill_kl)
    loss = torch.zeros_like(logp)
    low = high = torch.zeros_like(logp, dtype=torch.bool)
    for lk in LOSSES.values():
        rows = k == lk.id
        if not bool(rows.any()):
            continue
        # Rows of other kinds never use this loss's ratio; pin it to 1 there, so no overflow in a
        # branch that is not selected can leak a NaN gradient.
        old_k = torch.where(rows, old_logp, logp.detach())
        per_tok, parts = lk.fn(logp, old_k, adv, opts)
        loss = torch.where(rows, per_tok, loss)
        if "clip_low" in parts:
            low = low | (parts["clip_low"] & rows)
            high = high | (parts["clip_high"] & rows)
    return loss, low, high


def token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    kind: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    gamma: float = 0.1,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    use_bias_correction_kl: bool = True,
    clip_ratio_c: float | None = None,
    log_ratio_bound: float | None = 20.0,
    distill_is_clip: float | None = 2.0,
    distill_kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The full per-token loss of a batch: :func:`mixed_token_loss` plus ``beta`` times
    :func:`kl_penalty` against ``ref_logp`` (when given and ``beta != 0``).

    Returns ``(per_token_loss, parts)`` with ``parts``: ``clip_low`` / ``clip_high`` (bool masks)
    and, with a KL term, ``kl`` (the per-token k3 value, without the ratio, for logging).
    Reduce the loss with :func:`aggregate`.
    """
    per_tok, low, high = mixed_token_loss(
        logp, old_logp, advantages, kind, epsilon_low, epsilon_high, gamma,
        clip_ratio_c=clip_ratio_c, log_ratio_bound=log_ratio_bound, distill_is_clip=distill_is_clip, distill_kl=distill_kl,
    )
    parts: dict[str, torch.Tensor] = {"clip_low": low, "clip_high": high}
    if ref_logp is not None and beta != 0:
        k = kind.view(-1, 1).expand_as(logp)
        old = torch.where(k == KIND_POLICY, old_logp, logp.detach()) if use_bias_correction_kl else None
        per_tok = per_tok + beta * kl_penalty(logp, ref_logp, old, log_ratio_bound)
        parts["kl"] = kl_k3(logp.detach(), ref_logp)
    return per_tok, parts


IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampling_importance_ratio(
    train_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token_truncate",
    clip_min: Optional[float] = None,
    clip_max: Optional[float] = 3.0,
) -> torch.Tensor:
    """Importance weights ``[B, T]`` that correct a sampler that is not the training policy (TRL's
    ``vllm_importance_sampling_correction``): ``exp(train_logp - sampler_logp)`` per token, or per row
    (``sequence_*``: the exp of the masked sum, broadcast over the row). ``*_truncate`` clamps to
    ``[clip_min, clip_max]``; ``*_mask`` sets weights outside it to 0. Masked positions (``mask`` 0:
    padding, or rows without sampler log-probs) have log-ratio 0, so weight 1 before the bounds;
    NaN sampler log-probs count as 0 too. Both log-prob tensors are detached."""
    if mode not in IS_MODES:
        raise ValueError(f"unknown importance sampling mode {mode!r}; expected one of {', '.join(IS_MODES)}")
    diff = torch.nan_to_num((train_logp.detach() - sampler_logp.detach()) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True).expand_as(train_logp)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -math.inf
    hi = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
