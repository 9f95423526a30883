"""Generation behind a small protocol and one engine factory (:func:`make_generator`): the protocol,
the registry, per-row seeds and the built-in HF sampler here, vLLM in :mod:`repo_rl.engines.vllm`.

:class:`HFGenerator` is a KV-cached sampling loop over any Hugging Face causal LM. Each
row carries its own seed, so a sample depends only on ``(seed, prompt)`` and not on the
batch it was generated in. With ``temperature=0`` it is greedy decoding and matches
``model.generate(do_sample=False)`` token for token.

Prompts of very different lengths (rollouts and RePO's long rephrase prompts in one call) are
prefilled in length buckets and, for the architectures in :data:`BUCKETED_DECODE_MODEL_TYPES`,
also decoded in those buckets: one forward per token for the whole batch, with each bucket's
attention over its own KV cache, so short rows never attend over the padding of long ones.
When sampling on CPU in fp32, large buckets over short caches compute that attention with two
matmuls instead of SDPA's flash kernel (faster there; greedy decoding always keeps SDPA).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


class Generator(Protocol):
    """Generates one completion per prompt row; ``seeds[i]`` seeds row ``i``.

    An engine is one class with these two methods, registered with :func:`register_generator`
    and chosen by ``generation.backend``; :func:`make_generator` builds it for training,
    evaluation, ``repo-rl compare`` and the TRL adapter.
    """

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int], logprobs: bool = False
    ) -> Any:
        """The completion token ids of each row (EOS included when produced); with ``logprobs``,
        ``(ids, token_logprobs)``: ``log softmax(logits / T)`` of each sampled token at the sampling
        temperature T (T = 1 when greedy), before top-p and top-k, the distribution the training
        log-probs use (see ``algorithm.temperature``)."""
        ...

    def sync_weights(self, model: Any) -> None:
        """Make the engine generate with ``model``'s current weights; called after every optimizer
        step. An engine that samples from the training model itself has nothing to do."""
        ...


LogprobGenerator = Generator
"""Former name of :class:`Generator` (log-probs are part of the protocol now)."""

GENERATORS: dict[str, Callable[..., Generator]] = {}
"""``generation.backend`` name -> engine class (or factory) taking ``(model, eos_token_ids, pad_token_id, **options)``."""


def register_generator(name: str, factory: Callable[..., Generator]) -> None:
    if name in GENERATORS:
        raise ValueError(f"generation backend {name!r} is already registered")
    GENERATORS[name] = factory


def make_generator(
    model: Any, eos_token_ids: Sequence[int], pad_token_id: int, backend: str = "hf", **options: Any
) -> Generator:
    """The one place an engine is built: ``backend`` is ``generation.backend`` (``hf``: :class:`HFGenerator`)."""
    try:
        factory = GENERATORS[backend]
    except KeyError:
        raise ValueError(f"generation.backend: unknown engine {backend!r}; expected one of {', '.join(sorted(GENERATORS))}") from None
    return factory(model, eos_token_ids, pad_token_id, **options)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. ``(run_seed, step, prompt_index, sample)``), stable across runs."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


# Trial order of ``repo.rephrase_batching=auto`` (ABBA, so warm-up favours neither mode).
BATCHING_TRIALS = ("separate", "with_rollouts", "with_rollouts", "separate")


def choose_batching(trials: list[tuple[str, float]]) -> Optional[str]:
    """The faster rephrase batching mode once every trial of :data:`BATCHING_TRIALS` has a time.

    ``trials`` are ``(mode, seconds of generation + rephrase)`` in the order run. Returns None
    while trials are missing; ties go to ``separate`` (it samples fewer rows).
    """
    if len(trials) < len(BATCHING_TRIALS):
        return None
    total = {"separate": 0.0, "with_rollouts": 0.0}
    for mode, sec in trials[: len(BATCHING_TRIALS)]:
        total[mode] += sec
    return "with_rollouts" if total["with_rollouts"] < total["separate"] else "separate"


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


@functools.lru_cache(maxsize=None)
def _preallocated_layer_class() -> type:
    """A transformers ``DynamicLayer`` that writes new keys/values into preallocated buffers.

    The stock layer grows by ``torch.cat`` at every decode step, copying the whole cache each
    time; with long prompts that copy costs more than the step's compute on CPU. This layer
    keeps ``capacity`` positions and returns views of the filled part (it grows by doubling if
    a call needs more). Built once, on first use, so importing this module does not import
    transformers.
    """
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity
            self._k: Optional[torch.Tensor] = None
            self._v: Optional[torch.Tensor] = None
            self._n = 0

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            t = key_states.shape[-2]
            if self._k is None or self._n + t > self._k.shape[-2]:
                B, H, _, D = key_states.shape
                need = self._n + t
                cap = max(self.capacity, need if self._k is None else 2 * need)
                k = key_states.new_empty(B, H, cap, D)
                v = value_states.new_empty(B, value_states.shape[1], cap, value_states.shape[-1])
                if self._k is not None:
                    k[..., : self._n, :] = self._k[..., : self._n, :]
                    v[..., : self._n, :] = self._v[..., : self._n, :]
                self._k, self._v = k, v
            self._k[..., self._n : self._n + t, :] = key_states
            self._v[..., self._n : self._n + t, :] = value_states
            self._n += t
            self.keys, self.values = self._k[..., : self._n, :], self._v[..., : self._n, :]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self._k is not None:
                self._k, self._v = self._k[indices], self._v[indices]
                self.keys, self.values = self._k[..., : self._n, :], self._v[..., : self._n, :]

    return PreallocatedLayer


def _new_cache(capacity: int):
    """An empty ``DynamicCache`` whose layers preallocate ``capacity`` positions."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layer_class_to_replicate = functools.partial(_preallocated_layer_class(), capacity)
    return cache


def _full_attention_sdpa(model: Any) -> bool:
    """True when every layer is full causal attention through SDPA, so a decode step's mask is the padding mask.

    Sliding-window or chunked layers need transformers' own mask; eager attention wants an additive float mask.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa":
        return False
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return all(t == "full_attention" for t in types)
    return not getattr(cfg, "use_sliding_window", False) and not getattr(cfg, "attention_chunk_size", None)


#: Model types whose attention modules do ``rope -> cache.update -> attention function``, so a
#: decode step can hand each length bucket its own cache (see :func:`_decode_attention`).
BUCKETED_DECODE_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})

_DECODE_ATTENTION = "repo_rl_decode_attention"


def _matmul_decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: Optional[float] = None
) -> torch.Tensor:
    """One-token attention as two matmuls and a softmax: ``[n, H, 1, D]`` queries -> ``[n, 1, H, D]``.

    On CPU this is faster than SDPA's flash kernel for many rows over short caches (see
    :func:`_matmul_attention_pays`). It rounds differently, so it serves sampling only: greedy
    decoding keeps SDPA and matches ``model.generate`` token for token.
    """
    n, H, _, D = query.shape
    kvh = key.shape[1]
    scale = D**-0.5 if scaling is None else scaling
    q = query.reshape(n, kvh, H // kvh, D) * scale  # the heads of one key/value group are adjacent
    scores = torch.matmul(q, key.transpose(-1, -2)).masked_fill(mask.logical_not(), float("-inf"))
    probs = torch.softmax(scores.float(), -1).to(value.dtype)
    return torch.matmul(probs, value).reshape(n, H, 1, D).transpose(1, 2).contiguous()


def _matmul_attention_pays(key: torch.Tensor) -> bool:
    """Whether :func:`_matmul_decode_attention` beats SDPA for a bucket with cache ``key``.

    Measured with ``benchmarks/decode_attention_bench.py`` (2 threads, AMD EPYC Zen 4, fp32, head
    dim 64): matmuls took 0.45-0.89x SDPA's time at 32+ (rows x key/value heads) over 30-110 cached
    positions, but 0.78-1.85x it for 2-8 rows and 0.92-1.06x over 400 positions. Only fp32
    qualifies: in bf16 the scores would be rounded.
    """
    n, kvh, span, _ = key.shape
    return key.device.type == "cpu" and key.dtype == torch.float32 and n * kvh >= 32 and span <= 256


def _decode_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    repo_rl_buckets: Sequence[tuple[int, int, Any, torch.Tensor]] = (),
    repo_rl_exact: bool = True,
    **kwargs: Any,
):
    """The attention of one decode step, run once per length bucket (transformers' SDPA by default).

    ``repo_rl_buckets`` holds ``(start, end, cache, mask)`` for each contiguous block of rows:
    the new token's keys and values go into that bucket's cache, and its queries attend over
    that cache under its own padding mask. The model's own mask (``attention_mask``) is unused.
    Without ``repo_rl_exact``, large CPU buckets over short caches use
    :func:`_matmul_decode_attention`.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    outs = []
    for s, e, cache, mask in repo_rl_buckets:
        k, v = cache.update(key[s:e], value[s:e], module.layer_idx)
        if not repo_rl_exact and _matmul_attention_pays(k):
            outs.append(_matmul_decode_attention(query[s:e], k, v, mask, kwargs.get("scaling")))
        else:
            outs.append(sdpa_attention_forward(module, query[s:e], k, v, mask, **kwargs)[0])
    return (torch.cat(outs) if len(outs) > 1 else outs[0]), None


@functools.lru_cache(maxsize=None)
def _register_decode_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(_DECODE_ATTENTION, _decode_attention)
    return _DECODE_ATTENTION


def _supports_bucketed_decode(model: Any) -> bool:
    cfg = getattr(model, "config", None)
    return _full_attention_sdpa(model) and getattr(cfg, "model_type", None) in BUCKETED_DECODE_MODEL_TYPES


@contextlib.contextmanager
def _attention_implementation(model: Any, name: str):
    """Every config of ``model``'s modules set to attention implementation ``name``, restored after."""
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules()) if hasattr(c, "_attn_implementation_internal")}
    saved = {k: c._attn_implementation_internal for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation_internal = name
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation_internal = saved[k]


class HFGenerator:
    """KV-cached sampling for a Hugging Face causal LM, with per-row seeds.

    With ``compact`` (the default), rows that have produced EOS are dropped from the batch and
    the KV cache whenever a quarter of the remaining rows have finished, so long tails of a
    few unfinished rows do not pay for the whole batch. With ``bucket_prefill`` (the default),
    prompts of very different lengths are prefilled in separate length buckets (see
    :meth:`_prefill`) and, where the architecture allows it, decoded in them too.
    """

    def __init__(
        self,
        model: Any,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        batch_size: Optional[int] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        compact: bool = True,
        bucket_prefill: bool = True,
    ) -> None:
        self.model = model
        self.compact = compact
        self.bucket_prefill = bucket_prefill
        self.eos = torch.tensor(sorted(set(int(e) for e in eos_token_ids)), dtype=torch.long)
        self.pad = int(pad_token_id)
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        params = inspect.signature(model.forward).parameters
        # transformers >= 5 calls the KV cache argument ``cache``; older releases ``past_key_values``.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" in params
        self._mask4d = _full_attention_sdpa(model)
        self._bucketed_decode = bucket_prefill and _supports_bucketed_decode(model)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        dev = next(self.model.parameters()).device.type
        return torch.autocast(dev, dtype=self.autocast_dtype)

    def _no_autocast(self):
        """Autocast off inside an autocast region (nested, so the region's weight cache survives)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(next(self.model.parameters()).device.type, enabled=False)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int], logprobs: bool = False
    ) -> Any:
        """Completion ids per row, or ``(ids, token_logprobs)`` with ``logprobs`` (see :class:`Generator`)."""
        ids, lps = self._generate(prompts, params, seeds, want_logprobs=logprobs)
        return (ids, lps) if logprobs else ids

    def sync_weights(self, model: Any) -> None:
        """Nothing to do: this engine samples from the training model's own parameters."""

    def generate_with_logprobs(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int]
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Like :meth:`generate`, plus ``log softmax(logits / T)[token]`` of each sampled token
        (T the sampling temperature, 1 when greedy; before top-p and top-k)."""
        return self._generate(prompts, params, seeds, want_logprobs=True)

    @torch.inference_mode()
    def _generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int], want_logprobs: bool
    ) -> tuple[list[list[int]], list[list[float]]]:
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt row is required")
        if not prompts:
            return [], []
        bs = self.batch_size or len(prompts)
        # Group rows of similar prompt length to reduce padding; restore the order after.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[list[int]] = [[] for _ in prompts]
        out_lp: list[list[float]] = [[] for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        try:
            for s in range(0, len(order), bs):
                chunk = order[s : s + bs]
                res, lps = self._generate_batch([prompts[i] for i in chunk], params, [seeds[i] for i in chunk], want_logprobs)
                for j, i in enumerate(chunk):
                    out[i] = res[j]
                    if want_logprobs:
                        out_lp[i] = lps[j]
        finally:
            self.model.train(was_training)
        return out, out_lp

    def _generate_batch(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int], want_logprobs: bool = False
    ) -> tuple[list[list[int]], list[list[float]]]:
        device = next(self.model.parameters()).device
        B = len(prompts)
        L = max(len(p) for p in prompts)
        T = params.max_new_tokens
        for p in prompts:
            if len(p) == 0:
                raise ValueError("empty prompt")
        # The attention mask for the whole call, allocated once; step t passes a view of it
        # (boolean where that view is the 4D padding mask SDPA takes).
        attn_full = torch.zeros((B, L + T), dtype=torch.bool if self._mask4d else torch.long)
        for i, p in enumerate(prompts):
            attn_full[i, L - len(p) : L] = 1
        attn_full = attn_full.to(device)
        attn = attn_full[:, :L]
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        # Each row's uniforms for the whole call, drawn at once from its own generator (the same
        # stream as one scalar draw per token).
        uniforms = None
        if params.temperature > 0:
            uniforms = torch.stack([torch.rand(T, generator=torch.Generator().manual_seed(int(sd))) for sd in seeds]).to(device)
        eos = self.eos.to(device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        tokens = torch.full((B, T), self.pad, dtype=torch.long, device=device)
        token_lp = torch.zeros((B, T), dtype=torch.float32, device=device) if want_logprobs else None
        lengths = torch.full((B,), T, dtype=torch.long, device=device)

        extra = {"logits_to_keep": 1} if self._keep_kw else {}
        # One autocast region for the whole call: its cache keeps the low-precision copy of each
        # weight for every decode step instead of re-casting all weights per token (2.2x faster
        # decoding for SmolLM2 in bf16 on CPU). Sampling runs with autocast off, in fp32.
        with self._autocast(), contextlib.ExitStack() as decoding:
            cache, logits, buckets = self._prefill(prompts, L, T, extra)
            if buckets is not None:
                decoding.enter_context(_attention_implementation(self.model, _register_decode_attention()))
            next_pos = pos[:, -1:] + 1
            rows = torch.arange(B, device=device)  # the call's row index of each row still in the batch
            compact = self.compact and (buckets is not None or hasattr(cache, "batch_select_indices"))
            for t in range(T):
                with self._no_autocast():
                    nxt = self._sample(logits, params, None if uniforms is None else uniforms[:, t])
                    if token_lp is not None:
                        scaled = logits / params.temperature if params.temperature > 0 else logits
                        token_lp[rows, t] = torch.log_softmax(scaled, -1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
                nxt = torch.where(done, torch.full_like(nxt, self.pad), nxt)
                tokens[rows, t] = nxt
                hit = torch.isin(nxt, eos) & ~done
                lengths[rows[hit]] = t + 1
                done = done | hit
                if bool(done.all()) or t == T - 1:
                    break
                if compact and 4 * int(done.sum()) >= done.numel():
                    # A quarter of the rows have finished: drop them from the batch and the KV cache,
                    # so the remaining decode steps compute only rows that still sample.
                    keep = (~done).nonzero().squeeze(-1)
                    if buckets is None:
                        cache.batch_select_indices(keep)
                    else:
                        buckets = self._select_rows(buckets, keep)
                    rows, done, nxt, next_pos, attn_full = rows[keep], done[keep], nxt[keep], next_pos[keep], attn_full[keep]
                    if uniforms is not None:
                        uniforms = uniforms[keep]
                attn_full[:, L + t] = 1
                if self._mask4d:
                    # A one-token query may attend to every unpadded key: the padding mask, already
                    # in the 4D form attention takes, skips rebuilding a causal mask per token.
                    mask = attn_full[:, None, None, : L + t + 1]
                else:
                    mask = attn_full[:, : L + t + 1]
                if buckets is None:
                    step_kw = {"use_cache": True, self._cache_kw: cache}
                else:
                    # Bucket b's cache holds its rows left-padded to its own longest prompt Lb: the
                    # last Lb + t + 1 columns of the call's mask.
                    step_kw = {"use_cache": False, "repo_rl_exact": params.temperature <= 0,
                               "repo_rl_buckets": [(s, e, c, mask[s:e, ..., L - Lb :]) for s, e, Lb, c in buckets]}
                outp = self.model(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=next_pos, **step_kw, **extra)
                logits = outp.logits[:, -1, :].float()
                next_pos = next_pos + 1
        tokens, lengths = tokens.cpu(), lengths.cpu()
        out = [tokens[i, : int(lengths[i])].tolist() for i in range(B)]
        lps: list[list[float]] = []
        if token_lp is not None:
            token_lp = token_lp.cpu()
            lps = [token_lp[i, : int(lengths[i])].tolist() for i in range(B)]
        return out, lps

    @staticmethod
    def _buckets(lengths: Sequence[int], ratio: float = 1.5) -> list[list[int]]:
        """Row indices grouped so that each group's longest prompt is at most ``ratio`` x its shortest."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        out: list[list[int]] = []
        for i in order:
            if out and lengths[i] <= ratio * lengths[out[-1][0]]:
                out[-1].append(i)
            else:
                out.append([i])
        return out

    def _prefill_one(self, prompts: Sequence[Sequence[int]], rows: list[int], capacity: int, extra: dict):
        """Prefill ``rows`` left-padded to their own longest prompt; returns (cache, last logits)."""
        device = next(self.model.parameters()).device
        Lb = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), Lb), self.pad, dtype=torch.long)
        attn = torch.zeros((len(rows), Lb), dtype=torch.long)
        for j, i in enumerate(rows):
            p = prompts[i]
            ids[j, Lb - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            attn[j, Lb - len(p) :] = 1
        ids, attn = ids.to(device), attn.to(device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = _new_cache(capacity)
        outp = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **{self._cache_kw: cache}, **extra)
        return cache, outp.logits[:, -1, :].float()

    def _prefill(self, prompts: Sequence[Sequence[int]], L: int, T: int, extra: dict):
        """The prompt forward pass: ``(cache, last logits, buckets)``.

        Prompts of very different lengths (e.g. rollouts and rephrase prompts in one call) are
        prefilled in length buckets, so short prompts do not pay for the padding of long ones.
        With bucketed decoding (supported models, prompts sorted by length so that each bucket
        is a contiguous block of rows), every bucket keeps its own cache, one bucket when the
        lengths are close: ``buckets`` is ``[(start, end, Lb, cache)]`` and ``cache`` is None.
        Otherwise ``buckets`` is None and the bucket caches are left-padded to ``L`` with masked
        zeros and stacked into one cache.
        """
        rows_all = list(range(len(prompts)))
        buckets = self._buckets([len(p) for p in prompts]) if self.bucket_prefill else [rows_all]
        bucketed = self._bucketed_decode and self._mask4d
        if len(buckets) == 1:
            cache, logits = self._prefill_one(prompts, rows_all, L + T, extra)
            return (None, logits, [(0, len(prompts), L, cache)]) if bucketed else (cache, logits, None)
        if bucketed and [i for rows in buckets for i in rows] == rows_all:
            parts = []
            for rows in buckets:
                Lb = max(len(prompts[i]) for i in rows)
                parts.append((rows[0], rows[-1] + 1, Lb, *self._prefill_one(prompts, rows, Lb + T, extra)))
            return None, torch.cat([lg for *_, lg in parts]), [part[:4] for part in parts]
        parts = [(rows, *self._prefill_one(prompts, rows, 0, extra)) for rows in buckets]  # copied below
        if not all(hasattr(c, "layers") and all(hasattr(x, "keys") for x in c.layers) for _, c, _ in parts):
            return (*self._prefill_one(prompts, rows_all, L + T, extra), None)  # caches we cannot stack
        B = len(prompts)
        inv = torch.empty(B, dtype=torch.long)
        inv[torch.tensor([i for rows, _, _ in parts for i in rows])] = torch.arange(B)
        merged = _new_cache(L + T)
        for li in range(len(parts[0][1].layers)):
            ks, vs = [], []
            for _, c, _ in parts:
                k, v = c.layers[li].keys, c.layers[li].values
                pad = L - k.shape[-2]
                ks.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
                vs.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
            dev = ks[0].device
            merged.update(torch.cat(ks)[inv.to(dev)], torch.cat(vs)[inv.to(dev)], li)
        logits = torch.cat([lg for _, _, lg in parts])[inv.to(parts[0][2].device)]
        return merged, logits, None

    @staticmethod
    def _select_rows(buckets: list, keep: torch.Tensor) -> list:
        """Bucket caches and row ranges after keeping rows ``keep`` (sorted) of the batch."""
        out, start = [], 0
        for s, e, Lb, cache in buckets:
            sel = keep[(keep >= s) & (keep < e)] - s
            n = int(sel.numel())
            if n == 0:
                continue
            if n < e - s:
                cache.batch_select_indices(sel)
            out.append((start, start + n, Lb, cache))
            start += n
        return out

    @staticmethod
    def _sample(logits: torch.Tensor, params: SamplingParams, u: Optional[torch.Tensor]) -> torch.Tensor:
        """Inverse-CDF sampling with one uniform per row (``u``: ``[B]``); greedy at temperature 0."""
        if params.temperature <= 0 or u is None:
            return logits.argmax(-1)
        logits = _filter_logits(logits / params.temperature, params.top_k, params.top_p)
        probs = torch.softmax(logits, dim=-1)
        cdf = probs.cumsum(-1)
        u = u.to(cdf.dtype) * cdf[:, -1]  # guards against the cdf ending slightly below 1
        idx = torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1)
        return idx.clamp(max=logits.shape[-1] - 1)


def _vllm_generator(*args: Any, **kwargs: Any) -> Generator:
    """``generation.backend: vllm`` (:class:`repo_rl.engines.vllm.VLLMGenerator`), imported when built."""
    from .vllm import VLLMGenerator

    return VLLMGenerator(*args, **kwargs)


register_generator("hf", HFGenerator)
register_generator("vllm", _vllm_generator)
