"""``repo-rl audit-rephrases`` (the command is in :mod:`repo_rl.cli`): what RePO would inject, measured on
your own config before a run.

    repo-rl audit-rephrases --config X -n 64 [--samples 4] [-o DIR] [key.sub=value ...]

It takes ``n`` training rows with an expert solution (seeded by ``train.seed``), and samples
``--samples`` rephrases of each with the run's own template, engine, sampling settings, bank
(``repo.fewshot``: the bank starts empty and fills from the audit's own verified rephrases, row
batch by row batch, as in training) and verification (``repo.verify``). For every rephrase it
records:

* whether the training reward passes it, and how: through its final ``\\boxed{}`` answer alone, or
  only through fallback extraction (the last number of free text);
* each check of :mod:`repo_rl.step.verify` (``reward``, ``strict`` and ``steps`` always; ``judge``,
  ``row`` and custom checks when configured) and whether it passes ``repo.verify`` as a whole,
  the faithful rate of the table;
* how much of the reference it copies (the share of the reference's word 6-grams it contains);
* its mean log-prob per token under P(q, k), the prompt it was sampled from, and under q, the prompt
  it would be trained under.

It writes ``DIR/audit.md`` (the table, also printed), ``DIR/audit.json`` and ``DIR/rephrases.jsonl``
(every rephrase with its labels, to read). Rows without a solution are counted, never sampled.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

COPY_THRESHOLD = 0.5
"""A rephrase holding at least this share of the reference's word 6-grams counts as a copy."""


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else float("nan")


def summarize(records: list[dict[str, Any]], checks: list[str], fewshot: int) -> dict[str, Any]:
    """The audit's rates from its per-rephrase records (pure: tested on hand-made records)."""
    n = len(records)
    rate = lambda xs: (sum(xs) / len(xs)) if xs else float("nan")  # noqa: E731
    verified = [r for r in records if r["checks"]["reward"]]
    faithful = [r for r in records if r["passed"]]
    out: dict[str, Any] = {
        "rephrases": n,
        "rows": len({r["id"] for r in records}),
        "verified_rate": rate([r["checks"]["reward"] for r in records]),
        "via_boxed": rate([r["via"] == "boxed" for r in verified]),
        "via_fallback": rate([r["via"] == "fallback" for r in verified]),
        "faithful_rate": rate([r["passed"] for r in records]),
        "checks": {c: rate([r["checks"][c] for r in records]) for c in records[0]["checks"]} if records else {},
        "copy_rate": rate([r["copy_share"] >= COPY_THRESHOLD for r in records]),
        "copy_share": _mean([r["copy_share"] for r in records]),
        "faithful_copy_rate": rate([r["copy_share"] >= COPY_THRESHOLD for r in faithful]),
        "logp_p": _mean([r["logp_p"] for r in records]),
        "logp_q": _mean([r["logp_q"] for r in records]),
        "faithful_logp_p": _mean([r["logp_p"] for r in faithful]),
        "faithful_logp_q": _mean([r["logp_q"] for r in faithful]),
        "mean_tokens": _mean([r["tokens"] for r in records]),
        "repo.verify": list(checks),
    }
    if fewshot:
        full = [r for r in records if r["shots"] >= fewshot]
        out["faithful_rate_full_bank"] = rate([r["passed"] for r in full])
        out["rephrases_full_bank"] = len(full)
    return out


def table(s: dict[str, Any]) -> str:
    """The audit's table in Markdown."""
    f = lambda x, spec=".3f": "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)  # noqa: E731
    rows = [
        ("rows / rephrases", f"{s['rows']} / {s['rephrases']}"),
        ("verified by the training reward", f(s["verified_rate"])),
        ("... of them through the final \\boxed{} answer", f(s["via_boxed"])),
        ("... of them only through fallback extraction", f(s["via_fallback"])),
        (f"faithful: pass repo.verify = {s['repo.verify']}", f(s["faithful_rate"])),
    ]
    if "faithful_rate_full_bank" in s:
        rows.append((f"faithful, with a full bank ({s['rephrases_full_bank']} rephrases)", f(s["faithful_rate_full_bank"])))
    rows += [(f"check `{c}` passes", f(v)) for c, v in s["checks"].items()]
    rows += [
        (f"copies of the reference (>= {COPY_THRESHOLD:g} of its word 6-grams)", f(s["copy_rate"])),
        ("mean share of the reference's 6-grams copied", f(s["copy_share"])),
        ("copies among the faithful", f(s["faithful_copy_rate"])),
        ("log-prob per token under P(q,k): all / faithful", f"{f(s['logp_p'])} / {f(s['faithful_logp_p'])}"),
        ("log-prob per token under q: all / faithful", f"{f(s['logp_q'])} / {f(s['faithful_logp_q'])}"),
        ("mean tokens per rephrase", f(s["mean_tokens"], ".1f")),
    ]
    return "| measure | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


class Auditor:
    """The pieces of a training run that sample and verify rephrases, without an optimizer or a run
    directory (see the module docstring)."""

    def __init__(self, cfg: Any, out: Path) -> None:
        import torch

        from . import algorithms as alg
        from .step.bank import RephraseBank
        from .data import load_examples
        from .run.distributed import Dist
        from .errors import UserError
        from .run.health import default_threads, resolve_bf16
        from .models.loading import eos_token_ids, load_model_and_tokenizer
        from .run.preflight import context_limit, resolve_data
        from .step.prompts import PromptRenderer
        from .rewards.scorer import RewardScorer
        from .engines import make_generator
        from .step.sampling import StepSampler
        from .step.update import PolicyUpdate
        from .step.verify import RephraseVerifier, check_verify

        self.cfg = cfg
        if not alg.METHODS[cfg.algorithm.method].rephrases:
            cfg.algorithm.method = "repo"  # the audit is about RePO's rephrases whatever the run trains
        dist = Dist()
        if dist.world > 1:
            raise UserError("audit-rephrases runs in one process; launch it without accelerate")
        threads = cfg.train.threads or default_threads(cfg.train.device)
        if threads:
            torch.set_num_threads(threads)
        srcs = resolve_data(cfg.data.train_files, cfg, out, dist)
        try:
            self.examples = load_examples(srcs, cfg.data.fields, cfg.data.on_bad_row, cfg.data.split)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.scorer = RewardScorer(cfg.reward.funcs, cfg.reward.weights, cfg.reward.timeout, judge=cfg.reward.judge,
                                   by_domain=cfg.reward.by_domain)
        self.with_solution = [i for i, e in enumerate(self.examples) if e.solution is not None]
        self.generator = self.verifier = None
        if not self.with_solution:
            return
        check_verify(cfg, self.examples, self.scorer)
        self.verifier = RephraseVerifier(cfg, self.scorer)
        dev = "cuda" if cfg.train.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.train.device == "auto" else cfg.train.device)
        self.model, self.tokenizer, _ = load_model_and_tokenizer(cfg.model, cfg.toyworld, dev)
        self.model.eval()
        renderer = PromptRenderer(self.tokenizer, cfg.model.chat_template, cfg.model.system_prompt)
        self.renderer = renderer
        eos = eos_token_ids(self.model, self.tokenizer)
        bf16, _ = resolve_bf16(cfg.train.bf16, torch.device(dev))
        autocast = torch.bfloat16 if bf16 else None
        gen_bf16 = bf16 if cfg.train.bf16_generation is None else cfg.train.bf16_generation
        self.generator = make_generator(self.model, eos, self.tokenizer.pad_token_id, cfg.generation.backend,
                                        autocast_dtype=torch.bfloat16 if gen_bf16 else None, **cfg.generation.engine_options())
        self.updater = PolicyUpdate(cfg, dist, self.model, self.model, None, None, None, torch.device(dev),
                                    self.tokenizer.pad_token_id, autocast, False)
        self.bank = RephraseBank(cfg.repo.bank_size if cfg.repo.fewshot else 0)
        self._prompt_cache: dict[int, list[int]] = {}
        self.stages = StepSampler(cfg, self.tokenizer, renderer, eos, self.scorer, self._sample, lambda seqs: [], self._prompt_ids,
                                  verifier=self.verifier, bank=self.bank, context_length=context_limit(cfg, self.model))

    def _prompt_ids(self, idx: int) -> list[int]:
        if idx not in self._prompt_cache:
            self._prompt_cache[idx] = self.renderer.ids(self.examples[idx].prompt)
        return self._prompt_cache[idx]

    def _sample(self, rows, params, seeds, want_logprobs):
        if want_logprobs:
            return self.generator.generate(rows, params, seeds, logprobs=True)
        return self.generator.generate(rows, params, seeds), None

    def close(self) -> None:
        for x in (self.scorer, self.verifier, self.generator):
            close = getattr(x, "close", None)
            if callable(close):
                close()

    def warm_bank(self) -> int:
        """``repo.bank_warmup`` as training does it (the same rows and seeds): the bank's first entries."""
        from .engines import derive_seed
        from .step.bank import warmup_rows
        from .step.sampling import STREAM_WARMUP

        cfg = self.cfg
        if not cfg.repo.fewshot or not cfg.repo.bank_warmup:
            return 0
        chosen = warmup_rows(list(self.with_solution), cfg.repo.bank_warmup, derive_seed(cfg.train.seed, STREAM_WARMUP))
        for entry in self.stages.bank_warmup([self.examples[i] for i in chosen], chosen):
            self.bank.add(entry)
        return len(self.bank)

    def pick_rows(self, n: int) -> list[int]:
        order = list(self.with_solution)
        random.Random(self.cfg.train.seed).shuffle(order)
        return order[:n]

    def audit(self, rows: list[int], batch: int, progress: bool = True) -> list[dict[str, Any]]:
        """Rephrase, verify and label ``rows`` (dataset indices), ``batch`` rows per call."""
        from .step.bank import BankEntry
        from .step.types import Sequence_
        from .step.verify import copy_share, steps_precision, steps_share

        cfg = self.cfg
        A = cfg.repo.num_attempts
        bar = None
        if progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=len(rows), desc="audit-rephrases", unit="row", dynamic_ncols=True)
        records: list[dict[str, Any]] = []
        for b in range(0, len(rows), batch):
            idx = rows[b : b + batch]
            exs = [self.examples[i] for i in idx]
            shots_before = len(self.bank)
            prompt_rows, seeds = self.stages.rephrase_rows(exs, idx, list(range(len(exs))), b // batch)
            outs, _ = self._sample(prompt_rows, self.stages.rephrase_params(), seeds, False)
            from .step.prompts import clean_rephrase

            comps, texts = [], []
            for ids in outs:
                comp, text, _, _ = clean_rephrase(ids, self.tokenizer, cfg.repo.strip_patterns, cfg.algorithm.max_completion_length,
                                                  self.stages.eos_token_id, cfg.repo.end_at_answer)
                comps.append(comp)
                texts.append(text)
            cand = [e for e in exs for _ in range(A)]
            verdicts = self.verifier(cand, texts)
            q_ids = [self._prompt_ids(i) for i in idx for _ in range(A)]
            lp_p = self.updater.logprobs(self.model, [Sequence_(p, c, False) for p, c in zip(prompt_rows, comps)])
            lp_q = self.updater.logprobs(self.model, [Sequence_(q, c, False) for q, c in zip(q_ids, comps)])
            for j, (e, text, comp) in enumerate(zip(cand, texts, comps)):
                ok = bool(verdicts.passed[j])
                if ok:
                    self.bank.add(BankEntry(e.id, e.question_text, e.solution or "", text, b // batch))
                records.append({
                    "id": e.id, "question": e.question_text, "answer": e.answer, "solution": e.solution, "text": text,
                    "reward": None if math.isnan(float(verdicts.reward[j])) else float(verdicts.reward[j]),
                    "checks": {k: bool(v[j]) for k, v in verdicts.checks.items()}, "via": verdicts.via(j), "passed": ok,
                    "steps_share": steps_share(text, e.solution or ""),
                    "steps_precision": steps_precision(text, e.solution or "", e.question_text),
                    "copy_share": copy_share(text, e.solution or ""),
                    "logp_p": float(lp_p[j].mean()) if len(comp) else float("nan"),
                    "logp_q": float(lp_q[j].mean()) if len(comp) else float("nan"),
                    "tokens": len(comp), "shots": min(cfg.repo.fewshot, shots_before), "batch": b // batch,
                })
            if bar is not None:
                bar.update(len(idx))
            else:
                done = min(b + batch, len(rows))
                print(f"audit-rephrases: {done}/{len(rows)} rows, faithful so far "
                      f"{sum(r['passed'] for r in records)}/{len(records)}", file=sys.stderr)
        if bar is not None:
            bar.close()
        return records


def run_audit(cfg: Any, out: Path, n: int, samples: int, batch: int, progress: bool = True) -> Optional[dict[str, Any]]:
    """Audit ``n`` rows with ``samples`` rephrases each; writes the three files to ``out`` and returns
    the summary (None when no row has a solution)."""
    cfg.repo.num_attempts = samples
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    aud = Auditor(cfg, out)
    try:
        total, with_sol = len(aud.examples), len(aud.with_solution)
        print(f"audit-rephrases: {total} training rows, {with_sol} with an expert solution"
              + (f", {total - with_sol} without (never rephrased)" if total > with_sol else ""), file=sys.stderr)
        if not with_sol:
            return None
        warm = aud.warm_bank()
        if cfg.repo.fewshot and cfg.repo.bank_warmup:
            print(f"audit-rephrases: repo.bank_warmup: {cfg.repo.bank_warmup} zero-shot rephrases, {warm} in the bank",
                  file=sys.stderr)
        rows = aud.pick_rows(n)
        records = aud.audit(rows, batch, progress)
    finally:
        aud.close()
    s = summarize(records, list(cfg.repo.verify), cfg.repo.fewshot)
    s["bank_after_warmup"] = warm
    s.update({"wall_s": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d"), "samples_per_row": samples,
              "config": {"rephrase_template": cfg.repo.rephrase_template, "fewshot": cfg.repo.fewshot,
                         "rephrase_chat": cfg.repo.rephrase_chat, "model": cfg.model.name_or_path,
                         "backend": cfg.generation.backend, "reward": cfg.reward.funcs,
                         "temperature": cfg.repo.temperature if cfg.repo.temperature is not None else cfg.algorithm.temperature,
                         "max_new_tokens": cfg.repo.max_new_tokens or cfg.algorithm.max_completion_length}})
    (out / "rephrases.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    (out / "audit.json").write_text(json.dumps(s, indent=1), encoding="utf-8")
    (out / "audit.md").write_text(table(s), encoding="utf-8")
    return s


__all__ = ["Auditor", "run_audit", "summarize", "table"]
