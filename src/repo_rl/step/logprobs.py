"""Per-token log-probs of completions, optionally in chunks of positions.

The plain path asks the model for logits of the completion positions only
(``logits_to_keep``). The chunked path runs the decoder once, then applies the output
head to ``chunk_size`` positions at a time under activation checkpointing, so the full
``[batch, length, vocab]`` logits never exist at once, in the forward or the backward pass.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch.utils.checkpoint import checkpoint

from .. import algorithms as alg
from ..errors import UserError

# Config attributes of models whose head output is post-processed (soft-capped or scaled):
# the chunked path applies the bare output embedding, so it refuses them.
_LOGIT_POSTPROCESS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def check_chunkable(model: Any) -> None:
    cfg = getattr(model, "config", None)
    for name in _LOGIT_POSTPROCESS:
        if getattr(cfg, name, None) not in (None, 1, 1.0):
            raise UserError(
                f"train.logprob_chunk_size: the model post-processes its logits ({name}={getattr(cfg, name)}); "
                "chunked log-probs are not supported for it, leave train.logprob_chunk_size unset"
            )


def _scale(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """``logits / T``: T a float, or ``[B]`` (one temperature per row)."""
    if isinstance(temperature, torch.Tensor):
        return logits / temperature.to(logits.device, logits.dtype).view(-1, *([1] * (logits.dim() - 1)))
    return logits if temperature == 1.0 else logits / temperature


def logprobs_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, want_entropy: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs of ``targets`` under (already scaled) ``logits``, and their entropies when wanted."""
    lp = alg.token_logprobs(logits, targets)
    return lp, (alg.entropy_from_logits(logits.detach()) if want_entropy else None)


def _chunk_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, want_entropy: bool, temperature):
    return logprobs_from_logits(_scale(head(hidden).float(), temperature), targets, want_entropy)


def completion_logits(
    model: Any, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, completion_len: int, temperature: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """``[B, T, V]`` float logits / temperature that predict ``ids[:, P:P+T]`` with ``P = len - T``
    (rows as :func:`completion_logprobs` takes them)."""
    T = completion_len
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, logits_to_keep=T + 1).logits
    return _scale(logits[:, :T, :].float(), temperature)


def completion_logprobs(
    model: Any,
    ids: torch.Tensor,
    attn: torch.Tensor,
    pos: torch.Tensor,
    prompt_len: int,
    completion_len: int,
    chunk_size: Optional[int] = None,
    want_entropy: bool = False,
    temperature: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs ``[B, T]`` (and entropies) of ``ids[:, P:P+T]`` given everything before them.

    Rows are left-padded so every completion starts at column ``P = prompt_len``. Both come from
    ``log softmax(logits / temperature)`` (a float, or one per row), as TRL and verl compute the
    training log-probs at the sampling temperature.
    """
    P, T = prompt_len, completion_len
    targets = ids[:, P : P + T]
    if not chunk_size:
        return logprobs_from_logits(completion_logits(model, ids, attn, pos, T, temperature), targets, want_entropy)
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    hidden = decoder(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
    hidden = hidden[:, P - 1 : P - 1 + T]
    lps, ents = [], []
    for s in range(0, T, chunk_size):
        h, t = hidden[:, s : s + chunk_size], targets[:, s : s + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            lp, ent = checkpoint(_chunk_logprobs, head, h, t, want_entropy, temperature, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(head, h, t, want_entropy, temperature)
        lps.append(lp)
        if ent is not None:
            ents.append(ent)
    return torch.cat(lps, 1), (torch.cat(ents, 1) if want_entropy else None)


def _cache_argument(model: Any) -> str:
    """The forward's keyword for a KV cache: ``cache`` from transformers 5.24 on, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def shared_prompt_logprobs(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    rows: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    want_entropy: bool = False,
    temperature: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`completion_logprobs` for rows that share prompts, each prompt run once.

    ``prompt_ids`` ``[U, P]`` (left-padded, ``prompt_mask``) holds the distinct prompts; row ``b`` of
    ``completion_ids`` ``[B, T]`` (right-padded, ``completion_mask``) continues prompt ``rows[b]``.
    The prompts' keys and values (with their gradient) are indexed out to the rows and the
    completions attend to them from a cache, so a group of G rows costs one prompt pass instead
    of G. The first completion token is predicted from the prompt's last position.
    """
    U, P = prompt_ids.shape
    B, T = completion_ids.shape
    ppos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=ppos, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None)  # transformers >= 5.24's name
    cache = out.past_key_values if cache is None else cache
    cache.batch_select_indices(rows)
    first = _scale(out.logits[:, -1, :].float().index_select(0, rows), temperature)
    lp0, ent0 = logprobs_from_logits(first, completion_ids[:, 0], want_entropy)
    if T == 1:
        return lp0.unsqueeze(1), (ent0.unsqueeze(1) if want_entropy else None)
    attn = torch.cat([prompt_mask.index_select(0, rows), completion_mask[:, : T - 1]], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)[:, P:]
    rest = model(input_ids=completion_ids[:, : T - 1], attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=T - 1,
                 **{_cache_argument(model): cache}).logits
    lp, ent = logprobs_from_logits(_scale(rest.float(), temperature), completion_ids[:, 1:], want_entropy)
    return torch.cat([lp0.unsqueeze(1), lp], 1), (torch.cat([ent0.unsqueeze(1), ent], 1) if want_entropy else None)
