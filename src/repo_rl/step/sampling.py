"""The sampling stages of a step: rollouts, candidates for the gated groups, and the method's
group composition (gate -> candidates -> verify -> inject).

:class:`StepSampler` generates through the configured engine (:func:`repo_rl.engines.make_generator`)
and scores through :class:`repo_rl.rewards.scorer.RewardScorer`; the group surgery itself is the
pure :func:`repo_rl.algorithms.inject_candidates`, the rephrase clean-up
:func:`repo_rl.step.prompts.clean_rephrase`, both shared with the TRL adapter.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import torch

from .. import algorithms as alg
from ..config import Config
from ..data import Example
from .bank import BankEntry, RephraseBank
from .prompts import PromptRenderer, clean_rephrase
from ..engines import SamplingParams, derive_seed
from .types import Group, Rollouts, Sequence_
from .verify import RephraseVerifier

# Seed streams, so rollouts, rephrases and eval samples never share random numbers.
STREAM_ROLLOUT, STREAM_REPHRASE, STREAM_EVAL, STREAM_STEP, STREAM_BANK, STREAM_WARMUP = 1, 2, 3, 4, 5, 6


class StepSampler:
    """Rollouts and composed groups of one step; see the module docstring."""

    def __init__(
        self,
        cfg: Config,
        tokenizer: Any,
        renderer: PromptRenderer,
        eos_ids: Sequence[int],
        scorer: Callable[..., tuple[torch.Tensor, dict[str, float]]],
        sample: Callable[[list[list[int]], SamplingParams, list[int], bool], tuple[list[list[int]], Optional[list[list[float]]]]],
        logprobs_under: Callable[[list[Sequence_]], list[torch.Tensor]],
        prompt_ids: Callable[[int], list[int]],
        verifier: Optional[RephraseVerifier] = None,
        bank: Optional[RephraseBank] = None,
        context_length: Optional[int] = None,
    ) -> None:
        self.cfg, self.tokenizer, self.renderer = cfg, tokenizer, renderer
        self.eos_ids = list(eos_ids)
        self.scorer = scorer
        self.sample = sample
        """``sample(rows, params, seeds, want_logprobs) -> (ids, token log-probs or None)``."""
        self.logprobs_under = logprobs_under
        """No-grad log-probs of sequences under the current policy, at the training temperature."""
        self.prompt_ids = prompt_ids
        self.verifier = verifier
        """``repo.verify`` on rephrases (None: the training reward, ``reward >= repo.delta``)."""
        self.bank = bank if bank is not None else RephraseBank(0)
        """Earlier verified rephrases shown as worked examples (``repo.fewshot``); the trainer fills it."""
        self.context_length = context_length
        """Tokens a prompt and its new tokens may take (the model's or the engine's); None: unbounded."""
        self.sampler_logps = False
        """Keep the sampler's token log-probs on each rollout (``Sequence_.sampler_logps``), for the
        importance sampling correction."""
        self.defer_gap = False
        """Leave the training model alone: rephrases whose log pi(o | P) the sampler did not give go to
        ``Group.gap_missing`` for the trainer, instead of a forward here. The trainer sets it, as it
        may sample in a thread beside the update; False: the forward through ``logprobs_under``."""

    # ------------------------------------------------------------------ helpers
    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.eos_ids[0]

    def encode_completion(self, text: str) -> list[int]:
        """Token ids of a text completion plus EOS, cut to ``max_completion_length``."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [self.eos_token_id]
        return ids[: self.cfg.algorithm.max_completion_length]

    def is_truncated(self, ids: Sequence[int], limit: int) -> bool:
        return len(ids) >= limit and (not ids or ids[-1] not in self.eos_ids)

    def rollout_params(self) -> SamplingParams:
        a = self.cfg.algorithm
        return SamplingParams(a.max_completion_length, a.temperature, a.top_p, a.top_k)

    def rephrase_params(self) -> SamplingParams:
        a, r = self.cfg.algorithm, self.cfg.repo
        return SamplingParams(
            r.max_new_tokens or a.max_completion_length,
            a.temperature if r.temperature is None else r.temperature,
            a.top_p if r.top_p is None else r.top_p,
            a.top_k,
        )

    def rephrase_rows(
        self, examples: list[Example], dataset_index: list[int], positions: Sequence[int], step: int
    ) -> tuple[list[list[int]], list[int]]:
        """Rephrase prompts P(q, k) and seeds: ``num_attempts`` rows per prompt position, in order.

        With ``repo.fewshot``, each row shows its own draw of bank entries (seeded like the row), as
        many as fit the context with room for ``repo.max_new_tokens``."""
        cfg = self.cfg
        r = cfg.repo
        chat = r.rephrase_chat == "auto"
        room = None if self.context_length is None else self.context_length - self.rephrase_params().max_new_tokens
        rows, seeds = [], []
        for n in positions:
            ex = examples[n]
            occurrence = dataset_index[:n].count(dataset_index[n])
            plain = None
            for a in range(r.num_attempts):
                shots = self.bank.pick(r.fewshot, ex.id, derive_seed(cfg.train.seed, STREAM_BANK, step, dataset_index[n], occurrence, a))
                if shots:
                    ids = self.renderer.rephrase_ids(ex, r.rephrase_template, shots, chat)
                    while shots and room is not None and len(ids) > room:
                        shots = shots[1:]  # the oldest example goes first
                        ids = self.renderer.rephrase_ids(ex, r.rephrase_template, shots, chat)
                if not shots:
                    plain = plain if plain is not None else self.renderer.rephrase_ids(ex, r.rephrase_template, (), chat)
                    ids = plain
                rows.append(ids)
                seeds.append(derive_seed(cfg.train.seed, STREAM_REPHRASE, step, dataset_index[n], occurrence, a))
        return rows, seeds

    def bank_warmup(self, examples: list[Example], dataset_index: list[int]) -> list[BankEntry]:
        """One zero-shot rephrase of each row (``repo.bank_warmup``), cleaned and verified like a
        step's; those that pass, for the bank (seeded by the row, so every rank and a rerun agree)."""
        cfg = self.cfg
        if not examples:
            return []
        rows = [self.renderer.rephrase_ids(e, cfg.repo.rephrase_template, (), cfg.repo.rephrase_chat == "auto") for e in examples]
        seeds = [derive_seed(cfg.train.seed, STREAM_WARMUP, di, n) for n, di in enumerate(dataset_index)]
        outs, _ = self.sample(rows, self.rephrase_params(), seeds, False)
        texts = [clean_rephrase(ids, self.tokenizer, cfg.repo.strip_patterns, cfg.algorithm.max_completion_length,
                                self.eos_token_id, cfg.repo.end_at_answer)[1] for ids in outs]
        if self.verifier is not None:
            passed = self.verifier(examples, texts).passed.tolist()
        else:
            passed = (self.scorer([e.prompt for e in examples], texts, examples)[0] >= cfg.repo.delta).tolist()
        return [BankEntry(e.id, e.question_text, e.solution or "", t, -1) for e, t, ok in zip(examples, texts, passed) if ok]

    # ------------------------------------------------------------------ rollouts
    def rollouts(self, examples: list[Example], dataset_index: list[int], method: alg.Method, step: int, batching: str) -> Rollouts:
        """G completions per prompt; with ``batching="with_rollouts"`` (RePO only) the rephrases of
        every prompt with a solution are sampled in the same call, and the gate picks later."""
        cfg = self.cfg
        G = cfg.algorithm.num_generations
        rows, seeds = [], []
        for n, di in enumerate(dataset_index):
            occurrence = dataset_index[:n].count(di)
            for j in range(G):
                rows.append(self.prompt_ids(di))
                seeds.append(derive_seed(cfg.train.seed, STREAM_ROLLOUT, step, di, occurrence, j))
        params = self.rollout_params()
        if not (method.rephrases and self.rephrase_params() == params):
            batching = "separate"
        rp_rows: list[list[int]] = []
        eligible: list[int] = []
        if batching == "with_rollouts":
            eligible = [n for n, e in enumerate(examples) if e.solution is not None]
            rp_rows, rp_seeds = self.rephrase_rows(examples, dataset_index, eligible, step)
            rows, seeds = rows + rp_rows, seeds + rp_seeds
        comps, lps = self.sample(rows, params, seeds, self.sampler_logps or (bool(rp_rows) and cfg.repo.log_prob_gap))
        pool = None
        if rp_rows:
            A, base = cfg.repo.num_attempts, len(rows) - len(rp_rows)
            pool = {
                n: [(rows[base + i * A + a], comps[base + i * A + a], lps[base + i * A + a] if lps is not None else []) for a in range(A)]
                for i, n in enumerate(eligible)
            }
            rows, comps = rows[:base], comps[:base]
        teachers = [self.teacher_prompt_ids(e) if method.teacher else None for e in examples]
        keep = self.sampler_logps and lps is not None
        seqs = [Sequence_(r, c, self.is_truncated(c, params.max_new_tokens), method.rollout_kind, teachers[i // G],
                          sampler_logps=list(lps[i]) if keep else None)
                for i, (r, c) in enumerate(zip(rows, comps))]
        return Rollouts(seqs, [self.decode(c) for c in comps], pool, batching)

    def teacher_prompt_ids(self, example: Example) -> Optional[list[int]]:
        """SDFT's teacher prompt P(q, k) (``baselines.sdft_template``, else ``repo.rephrase_template``);
        None for a prompt without an expert solution, whose rollouts then get no distillation signal."""
        if example.solution is None:
            return None
        return self.renderer.ids(self.renderer.rephrase_prompt(example, self.cfg.sdft_template[0]))

    def sft_group(self, examples: list[Example], dataset_index: list[int]) -> Group:
        """Pure SFT: the expert solution of each prompt under q, no rollouts."""
        seqs, texts, keep = [], [], []
        limit = self.cfg.algorithm.max_completion_length
        for n, ex in enumerate(examples):
            if ex.solution is None:
                continue
            comp = self.encode_completion(ex.solution)
            seqs.append(Sequence_(self.prompt_ids(dataset_index[n]), comp, self.is_truncated(comp, limit), alg.KIND_SFT))
            texts.append(ex.solution)
            keep.append(n)
        counters = {f"repo/{key}": 0.0 for key in ("groups", "gated", "attempts", "verified", "replaced", "positive")}
        return Group(
            [examples[n] for n in keep], [dataset_index[n] for n in keep], seqs, texts,
            rewards=torch.full((len(seqs),), float("nan"), dtype=torch.float64),
            origins=torch.full((len(seqs),), alg.ORIGIN_EXPERT, dtype=torch.long),
            dropped=torch.zeros(len(seqs), dtype=torch.bool), counters=counters,
        )

    # ------------------------------------------------------------------ composition
    def _rephrase_candidates(self, examples, dataset_index, rollouts: Rollouts, gidx: list[int], step: int):
        """Rephrases of the gated groups, cleaned: (sequences, texts, prompt rows, log pi(o|P) or None)."""
        cfg = self.cfg
        A = cfg.repo.num_attempts
        params = self.rephrase_params()
        if rollouts.rephrase_pool is not None:  # sampled with the rollouts
            rows, outs, lps = (list(x) for x in zip(*(rollouts.rephrase_pool[n][a] for n in gidx for a in range(A))))
        else:
            rows, seeds = self.rephrase_rows(examples, dataset_index, gidx, step)
            outs, lps = self.sample(rows, params, seeds, cfg.repo.log_prob_gap)  # all gated groups in one call
        # The sampler's log-probs are at the rephrase temperature; they count only when that is the
        # temperature of the training log-probs (a stripped text is new ids, recomputed too).
        train_t = cfg.algorithm.temperature if cfg.algorithm.temperature > 0 else 1.0
        same_t = (params.temperature if params.temperature > 0 else 1.0) == train_t
        seqs, texts, logp = [], [], []
        for c, ids in enumerate(outs):
            comp, text, stripped, cut = clean_rephrase(ids, self.tokenizer, cfg.repo.strip_patterns,
                                                       cfg.algorithm.max_completion_length, self.eos_token_id,
                                                       cfg.repo.end_at_answer)
            truncated = cut or (not stripped and self.is_truncated(ids, params.max_new_tokens))
            seqs.append(Sequence_([], comp, truncated))
            texts.append(text)
            sampled = same_t and lps is not None and len(lps[c]) == len(ids) and comp == ids[: len(comp)]
            logp.append(float(sum(lps[c][: len(comp)])) if sampled else None)
        return seqs, texts, rows, logp

    def compose(
        self, examples: list[Example], dataset_index: list[int], rollouts: Rollouts, rewards: torch.Tensor,
        method: alg.Method, step: int, timings: dict[str, float],
    ) -> Group:
        """The method's groups: gate -> candidates (rephrases or expert text) -> verify -> inject."""
        cfg = self.cfg
        G, N = cfg.algorithm.num_generations, len(examples)
        R = rewards.view(N, G)
        eligible = torch.tensor([e.solution is not None for e in examples])
        gated = method.gated(R, eligible, cfg.repo.delta, cfg.repo.rho)
        counters = {f"repo/{key}": 0.0 for key in ("attempts", "verified", "replaced", "positive")}
        counters["repo/groups"], counters["repo/gated"] = float(N), float(gated.sum())
        if method.rephrases:  # the same keys on every rank and every step
            counters.update(self.verifier.zero_counters() if self.verifier is not None else {"repo/reward_ok": 0.0})
        group = Group(examples, dataset_index, list(rollouts.sequences), list(rollouts.texts), rewards,
                      torch.zeros(N * G, dtype=torch.long), torch.zeros(N * G, dtype=torch.bool), counters,
                      batching=rollouts.batching)
        if not method.injection or not bool(gated.any()):
            return group
        A = cfg.repo.num_attempts
        gidx = gated.nonzero().flatten().tolist()
        t0 = time.perf_counter()
        rp_rows: list[list[int]] = []
        rp_logp: list[Optional[float]] = []
        if method.rephrases:
            cand_seqs, cand_texts, rp_rows, rp_logp = self._rephrase_candidates(examples, dataset_index, rollouts, gidx, step)
        else:  # the expert solution itself, trained under q
            cand_texts = [examples[n].solution or "" for n in gidx for _ in range(A)]
            cand_seqs = []
            for text in cand_texts:
                comp = self.encode_completion(text)
                cand_seqs.append(Sequence_([], comp, self.is_truncated(comp, cfg.algorithm.max_completion_length)))
        timings["rephrase"] = time.perf_counter() - t0
        if method.rephrases:
            t0 = time.perf_counter()
            cand_examples = [examples[n] for n in gidx for _ in range(A)]
            if self.verifier is not None:
                verdicts = self.verifier(cand_examples, cand_texts)
                cand_r, passed = verdicts.score, verdicts.passed
                for key, v in verdicts.counters.items():
                    counters[key] = counters.get(key, 0.0) + v  # rewards/* counters of the checks' reward calls too
            else:
                cand_r, rmetrics = self.scorer([e.prompt for e in cand_examples], cand_texts, cand_examples)
                passed = cand_r >= cfg.repo.delta  # NaN compares False
                for key in ("rewards/verifier_errors", "rewards/verifier_timeouts", *(k for k in rmetrics if k.startswith("rewards/judge_"))):
                    counters[key] = counters.get(key, 0.0) + rmetrics[key]
                counters["repo/reward_ok"] = float(passed.sum())
            timings["reward"] = timings.get("reward", 0.0) + time.perf_counter() - t0
            verified = passed.view(len(gidx), A)
            counters["repo/attempts"], counters["repo/verified"] = float(verified.numel()), float(verified.sum())
            group.bank_candidates = [BankEntry(e.id, e.question_text, e.solution or "", t, step)
                                     for e, t, ok in zip(cand_examples, cand_texts, passed.tolist()) if ok]
            k, origin = cfg.repo.num_replace, alg.ORIGIN_REPHRASED
        else:
            # The expert solution is the reference: it is taken as correct (reward 1) whether or
            # not the verifier can parse its foreign format.
            cand_r = torch.ones(len(gidx) * A, dtype=torch.float64)
            verified = torch.ones(len(gidx), A, dtype=torch.bool)
            k, origin = 1, alg.ORIGIN_EXPERT
        inj = alg.inject_candidates(R, torch.tensor(gidx), cand_r, verified, k, cfg.repo.allow_unverified, origin)
        for flat, c in inj.injected:
            q = rollouts.sequences[(flat // G) * G].prompt_ids
            group.sequences[flat] = Sequence_(q, cand_seqs[c].completion_ids, cand_seqs[c].truncated, method.injected_kind)
            group.texts[flat] = cand_texts[c]
        group.rewards, group.origins = inj.rewards.view(-1), inj.origins.view(-1)
        if method.drop_group:
            got = (inj.origins != alg.ORIGIN_ON_POLICY).any(1, keepdim=True)
            group.dropped = (got & (inj.origins == alg.ORIGIN_ON_POLICY)).view(-1)
        counters["repo/replaced"] = float(len(inj.injected))
        # Hard-sample utilisation, part (a): gated groups that got a positive learning signal.
        counters["repo/positive"] = float(inj.positive(cfg.repo.delta)[gated].sum())
        if inj.injected and method.rephrases and cfg.repo.log_prob_gap:
            # log pi(o|P(q,k)) comes from the sampler (or a forward here); log pi(o|q) from the update.
            missing = [(f, c) for f, c in inj.injected if rp_logp[c] is None]
            if missing and self.defer_gap:
                group.gap_missing = [(f, Sequence_(rp_rows[c], cand_seqs[c].completion_ids, False)) for f, c in missing]
                missing = []
            if missing:
                under_p = self.logprobs_under([Sequence_(rp_rows[c], cand_seqs[c].completion_ids, False) for _, c in missing])
                for (_, c), lp in zip(missing, under_p):
                    rp_logp[c] = float(lp.sum())
            group.gap_under_p = {f: float(rp_logp[c]) for f, c in inj.injected if rp_logp[c] is not None}
        return group

