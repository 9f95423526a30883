"""Generation behind a small protocol, so other engines (vLLM) can slot in later.

:class:`HFGenerator` is a KV-cached sampling loop over any Hugging Face causal LM. Each
row carries its own seed, so a sample depends only on ``(seed, prompt)`` and not on the
batch it was generated in. With ``temperature=0`` it is greedy decoding and matches
``model.generate(do_sample=False)`` token for token.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


class Generator(Protocol):
    """Generates one completion per prompt row; ``seeds[i]`` seeds row ``i``."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int]) -> list[list[int]]:
        """Return the completion token ids of each row (EOS included when produced)."""
        ...


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. ``(run_seed, step, prompt_index, sample)``), stable across runs."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        cum = probs.cumsum(-1)
        remove = cum - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(remove, -float("inf"))
        logits = torch.full_like(logits, -float("inf")).scatter(-1, idx, sorted_logits)
    return logits


class HFGenerator:
    """KV-cached sampling for a Hugging Face causal LM, with per-row seeds."""

    def __init__(
        self,
        model: Any,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        batch_size: Optional[int] = None,
        autocast_dtype: Optional[torch.dtype] = None,
    ) -> None:
        self.model = model
        self.eos = torch.tensor(sorted(set(int(e) for e in eos_token_ids)), dtype=torch.long)
        self.pad = int(pad_token_id)
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        params = inspect.signature(model.forward).parameters
        # transformers >= 5 calls the KV cache argument ``cache``; older releases ``past_key_values``.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" in params

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        dev = next(self.model.parameters()).device.type
        return torch.autocast(dev, dtype=self.autocast_dtype)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int]) -> list[list[int]]:
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt row is required")
        if not prompts:
            return []
        bs = self.batch_size or len(prompts)
        # Group rows of similar prompt length to reduce padding; restore the order after.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[list[int]] = [[] for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        try:
            for s in range(0, len(order), bs):
                chunk = order[s : s + bs]
                res = self._generate_batch([prompts[i] for i in chunk], params, [seeds[i] for i in chunk])
                for i, r in zip(chunk, res):
                    out[i] = r
        finally:
            self.model.train(was_training)
        return out

    def _generate_batch(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int]) -> list[list[int]]:
        device = next(self.model.parameters()).device
        B = len(prompts)
        L = max(len(p) for p in prompts)
        ids = torch.full((B, L), self.pad, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError("empty prompt")
            ids[i, L - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            attn[i, L - len(p) :] = 1
        ids, attn = ids.to(device), attn.to(device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        gens = [torch.Generator().manual_seed(int(sd)) for sd in seeds]
        eos = self.eos.to(device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        tokens = torch.full((B, params.max_new_tokens), self.pad, dtype=torch.long, device=device)
        lengths = torch.full((B,), params.max_new_tokens, dtype=torch.long, device=device)

        from transformers import DynamicCache

        cache = DynamicCache()
        extra = {"logits_to_keep": 1} if self._keep_kw else {}
        with self._autocast():
            outp = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **{self._cache_kw: cache}, **extra)
        logits = outp.logits[:, -1, :].float()
        next_pos = pos[:, -1:] + 1
        for t in range(params.max_new_tokens):
            nxt = self._sample(logits, params, gens)
            nxt = torch.where(done, torch.full_like(nxt, self.pad), nxt)
            tokens[:, t] = nxt
            hit = torch.isin(nxt, eos) & ~done
            lengths = torch.where(hit, torch.full_like(lengths, t + 1), lengths)
            done = done | hit
            if bool(done.all()) or t == params.max_new_tokens - 1:
                break
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], dim=1)
            with self._autocast():
                outp = self.model(
                    input_ids=nxt.unsqueeze(1),
                    attention_mask=attn,
                    position_ids=next_pos,
                    use_cache=True,
                    **{self._cache_kw: cache},
                    **extra,
                )
            logits = outp.logits[:, -1, :].float()
            next_pos = next_pos + 1
        tokens, lengths = tokens.cpu(), lengths.cpu()
        return [tokens[i, : int(lengths[i])].tolist() for i in range(B)]

    @staticmethod
    def _sample(logits: torch.Tensor, params: SamplingParams, gens: list[torch.Generator]) -> torch.Tensor:
        if params.temperature <= 0:
            return logits.argmax(-1)
        logits = _filter_logits(logits / params.temperature, params.top_k, params.top_p)
        probs = torch.softmax(logits, dim=-1)
        cdf = probs.cumsum(-1)
        u = torch.stack([torch.rand((), generator=g) for g in gens]).to(logits.device, cdf.dtype)
        u = u * cdf[:, -1]  # guards against the cdf ending slightly below 1
        idx = torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1)
        return idx.clamp(max=logits.shape[-1] - 1)
