"""Verification of RePO's rephrases (``repo.verify``): which rephrases may be injected as answers to q.

A rollout on q is scored by the training reward, which asks one question: is the final answer
right? For a rephrase that question is too weak. The expert solution sits in the rephrase's
context, final answer included, so a text can pass by copying the number: with the ``numeric``
reward's fallback (the last number when there is no ``\\boxed{}``), incoherent text whose last
number happens to match verifies, and RePO then trains it under q with the group's largest
advantage. ``repo.verify`` lists the checks a rephrase must pass instead; all of them must pass.

Answer checks (the list must hold one; the injected row's reward is its score):

``reward``
    The training reward (``reward.funcs``) on the whole text, as rollouts are scored, fallback
    extraction included.
``strict``
    The training reward on the last ``\\boxed{...}`` alone: the answer must sit in a final
    ``\\boxed{}``; a number elsewhere in the text never counts. Built once for every reward, so a
    custom reward that needs the whole text (a format reward) cannot pass it.

Faithfulness checks:

``steps``
    The numbers of the expert solution's working (its text before its last ``\\boxed``), other
    than 0 and 1, appear in the rephrase's working: at least ``repo.steps_min`` of them; and of
    the numbers in the rephrase's working at least ``repo.steps_precision`` come from the question
    or the solution. A rephrase that boxes the copied answer without the reference's steps fails,
    and so does one that surrounds them with numbers from nowhere. Needs no domain code.
``judge``
    An LLM behind an OpenAI-compatible server (``repo.judge``, the same settings as
    ``reward.judge``) is asked whether the rephrase reaches the reference answer through the
    reference's reasoning in coherent language (:data:`FAITHFUL_TEMPLATE`).
``row``
    The row's own check: a regular expression, or a list of them, in the column named by
    ``repo.row_check_column``; each must match the rephrase. Rows without the column pass.
``pkg.mod:fn``
    A custom check with TRL's reward signature ``f(prompts, completions, **columns)``; a
    rephrase passes at a value >= ``repo.delta``. The columns include ``solution``.

The helpers :func:`working`, :func:`numbers_in`, :func:`steps_share` and :func:`copy_share` are
pure; :class:`RephraseVerifier` runs the configured checks on a batch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from ..config.checks import ANSWER_CHECKS, BUILTIN_CHECKS, check_label  # the names repo.verify accepts
from ..data import Example
from ..errors import UserError
from ..rewards.extract import extract_boxed

FAITHFUL_TEMPLATE = (
    "You are checking a student's solution against an expert's reference solution.\n\n"
    "Question:\n{question}\n\n"
    "Reference solution:\n{reference}\n\n"
    "Student's solution:\n{answer}\n\n"
    "Does the student's solution reach the reference's final answer through the reference's reasoning "
    "(the same facts and steps), written in coherent language? A solution that only states the final "
    "answer, or whose working is wrong, garbled or unrelated to the question, does not. "
    "Reply with one word: YES or NO."
)

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def working(text: str) -> str:
    """The working of a solution: its text before the last ``\\boxed`` (all of it when there is none)."""
    found = list(_BOX.finditer(text))
    return text[: found[-1].start()] if found else text


def numbers_in(text: str) -> set[float]:
    """The numbers written in ``text`` (``3*8`` gives 3 and 8, ``1:8`` 1 and 8, ``1,200`` 1200)."""
    return {float(x) for x in _NUMBER.findall(_THOUSANDS.sub("", text))}


def reference_steps(solution: str) -> set[float]:
    """The numbers of an expert solution's working that a faithful rephrase should show: all but 0 and 1."""
    return numbers_in(working(solution)) - {0.0, 1.0}


def steps_share(text: str, solution: str) -> float:
    """Share of :func:`reference_steps` that appear in the working of ``text`` (1.0 when there are none)."""
    ref = reference_steps(solution)
    if not ref:
        return 1.0
    return len(ref & numbers_in(working(text))) / len(ref)


def steps_precision(text: str, solution: str, question: str) -> float:
    """Share of the numbers in the working of ``text`` that come from the question or the expert
    solution (0 and 1 always count); 1.0 when the working has no number. A rephrase that writes
    numbers from nowhere (``1:8 = 2*8 = 12``) scores below 1."""
    have = numbers_in(working(text))
    if not have:
        return 1.0
    allowed = numbers_in(solution) | numbers_in(question) | {0.0, 1.0}
    return len(have & allowed) / len(have)


def boxed_only(text: str) -> Optional[str]:
    """``\\boxed{answer}`` of the last boxed answer of ``text``, or None without one."""
    inner = extract_boxed(text)
    return None if inner is None else "\\boxed{" + inner + "}"


def _words(text: str) -> list[str]:
    return text.split()


def copy_share(text: str, reference: str, n: int = 6) -> float:
    """Share of the reference's word ``n``-grams that occur in ``text`` (a reference shorter than ``n``
    words counts as one n-gram, itself). 1.0 is a verbatim copy of the reference's wording."""
    ref, got = _words(reference), _words(text)
    if not ref:
        return 0.0
    k = min(n, len(ref))
    grams = {tuple(ref[i : i + k]) for i in range(len(ref) - k + 1)}
    have = {tuple(got[i : i + k]) for i in range(len(got) - k + 1)}
    return len(grams & have) / len(grams)


def row_patterns(example: Example, column: str) -> Optional[list[str]]:
    """The row's own check (``repo.row_check_column``): a list of regular expressions, or None."""
    value = (example.extra or {}).get(column)
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UserError(f"{example.id}: column {column!r} (repo.row_check_column) must be a regular expression or a list of them, "
                    f"got {type(value).__name__}")


def check_row_patterns(examples: Sequence[Example], column: str) -> int:
    """Compile every row's own check once at start (a bad pattern is a one-line error naming the row);
    returns how many rows carry one."""
    n = 0
    for e in examples:
        pats = row_patterns(e, column)
        if pats is None:
            continue
        n += 1
        for p in pats:
            try:
                re.compile(p)
            except re.error as err:
                raise UserError(f"{e.id}: column {column!r} holds an invalid regular expression {p!r} ({err})") from None
    return n


@dataclass
class Verdicts:
    """What :class:`RephraseVerifier` found for a batch of rephrases."""

    reward: torch.Tensor
    """``[n]`` the training reward on the whole text (NaN: unscored)."""
    score: torch.Tensor
    """``[n]`` the reward an injected rephrase carries: ``strict``'s when it is configured, else ``reward``'s."""
    passed: torch.Tensor
    """``[n]`` every check of ``repo.verify`` passed."""
    checks: dict[str, torch.Tensor] = field(default_factory=dict)
    """Check name -> ``[n]`` bool; ``reward``, ``strict`` and ``steps`` are always computed (they are cheap)."""
    counters: dict[str, float] = field(default_factory=dict)
    """Sums for the step's metrics (``repo/reward_ok``, ``repo/fallback``, ``repo/verify/<check>``, reward counters)."""

    def via(self, i: int) -> str:
        """How rephrase ``i`` passed the training reward: ``boxed`` (its final boxed answer alone
        passes), ``fallback`` (only the whole text passes) or ``-`` (it does not pass)."""
        if not bool(self.checks["reward"][i]):
            return "-"
        return "boxed" if bool(self.checks["strict"][i]) else "fallback"


class RephraseVerifier:
    """Runs ``repo.verify`` on rephrases; see the module docstring.

    ``scorer`` is the training reward (:class:`repo_rl.rewards.scorer.RewardScorer`, called as
    ``scorer(prompts, texts, examples) -> (rewards, counters)``)."""

    def __init__(self, cfg: Any, scorer: Any, *, check_judge: bool = True) -> None:
        r = cfg.repo
        self.checks = list(r.verify)
        self.delta = float(r.delta)
        self.steps_min = float(r.steps_min)
        self.steps_precision = float(r.steps_precision)
        self.row_column = r.row_check_column
        self.scorer = scorer
        self.judge = None
        if "judge" in self.checks:
            from ..rewards.judge import JudgeReward

            jc = r.judge
            self.judge = JudgeReward(
                jc.base_url, jc.model, api_key_env=jc.api_key_env, template=jc.template or FAITHFUL_TEMPLATE,
                template_file=jc.template_file, system_prompt=jc.system_prompt, verdict=jc.verdict, max_score=jc.max_score,
                max_tokens=jc.max_tokens, temperature=jc.temperature, max_answer_chars=jc.max_answer_chars,
                concurrency=jc.concurrency, timeout=jc.timeout, retries=jc.retries, backoff=jc.backoff, cache=jc.cache,
                name="faithful_judge",
            )
            if check_judge:
                try:
                    self.judge.check()
                except UserError as e:  # the reward judge's one line, naming repo.judge
                    raise UserError(str(e).replace("reward.judge.", "repo.judge.")) from None
        self._judge_seen: dict[str, int] = {}
        self.custom: dict[str, Any] = {}
        for spec in self.checks:
            if spec not in BUILTIN_CHECKS:
                from ..rewards.scorer import RewardScorer

                self.custom[spec] = RewardScorer([spec], None, cfg.reward.timeout)

    def close(self) -> None:
        for s in self.custom.values():
            s.close()

    def zero_counters(self) -> dict[str, float]:
        """Every counter :meth:`__call__` returns, at 0: a step (or a rank) without rephrases reports
        the same keys as one with them."""
        names = ["reward", "strict", "steps"] + [check_label(c) for c in self.checks if check_label(c) not in ("reward", "strict", "steps")]
        out = {"repo/reward_ok": 0.0, "repo/fallback": 0.0, **{f"repo/verify/{n}": 0.0 for n in names}}
        if self.judge is not None:
            out.update({f"repo/judge_{k}": 0.0 for k in ("errors", "timeouts", "cache_hits", "requests")})
        return out

    def __call__(self, examples: Sequence[Example], texts: Sequence[str]) -> Verdicts:
        n = len(texts)
        examples, texts = list(examples), list(texts)
        prompts = [e.prompt for e in examples]
        counters: dict[str, float] = {}

        def add(metrics: dict[str, float]) -> None:
            for key in ("rewards/verifier_errors", "rewards/verifier_timeouts", *(k for k in metrics if k.startswith("rewards/judge_"))):
                if key in metrics:
                    counters[key] = counters.get(key, 0.0) + metrics[key]

        reward, m = self.scorer(prompts, texts, examples)
        add(m)
        boxes = [boxed_only(t) for t in texts]
        has_box = [i for i, b in enumerate(boxes) if b is not None]
        strict = torch.full((n,), math.nan, dtype=torch.float64)
        if has_box:
            sub = [examples[i] for i in has_box]
            r_box, m = self.scorer([e.prompt for e in sub], [boxes[i] for i in has_box], sub)
            add(m)
            strict[has_box] = r_box
        checks: dict[str, torch.Tensor] = {
            "reward": reward >= self.delta,  # NaN compares False
            "strict": strict >= self.delta,
            "steps": torch.tensor([e.solution is not None and steps_share(t, e.solution) >= self.steps_min
                                   and steps_precision(t, e.solution, e.question_text) >= self.steps_precision
                                   for e, t in zip(examples, texts)], dtype=torch.bool),
        }
        if "judge" in self.checks and self.judge is not None:
            refs = [e.solution or "" for e in examples]
            out = self.judge(prompts=prompts, completions=texts, answer=refs)
            checks["judge"] = torch.tensor([v is not None and v >= self.delta for v in out], dtype=torch.bool)
            # The faithfulness judge's own counters (an item it could not judge fails the check).
            snap = self.judge.stats.snapshot()
            for k in ("judge_errors", "judge_timeouts", "cache_hits", "requests"):
                counters[f"repo/judge_{k.removeprefix('judge_')}"] = float(snap[k] - self._judge_seen.get(k, 0))
            self._judge_seen = snap
        if "row" in self.checks:
            ok = []
            for e, t in zip(examples, texts):
                pats = row_patterns(e, self.row_column)
                ok.append(pats is None or all(re.search(p, t) for p in pats))
            checks["row"] = torch.tensor(ok, dtype=torch.bool)
        for spec, sc in self.custom.items():
            vals, m = sc(prompts, texts, examples)
            add(m)
            checks[check_label(spec)] = vals >= self.delta
        passed = torch.ones(n, dtype=torch.bool)
        for spec in self.checks:
            passed &= checks[check_label(spec)]
        score = strict if "strict" in self.checks else reward
        counters["repo/reward_ok"] = float(checks["reward"].sum())
        counters["repo/fallback"] = float((checks["reward"] & ~checks["strict"]).sum())
        for name, ok in checks.items():
            counters[f"repo/verify/{name}"] = float(ok.sum())
        return Verdicts(reward, score, passed, checks, counters)


def check_verify(cfg: Any, examples: list[Example], scorer: Any, say: Optional[Callable[[str], None]] = None) -> None:
    """``repo.verify`` against the data, before any model loads:

    * ``strict``: the expert solutions' own final ``\\boxed{}`` answers are scored by the strict rule
      (at most 256 of them). A reference that cannot pass its own verifier means no rephrase can
      either: none with a box and a template that does not ask for one, or none that passes (a
      reward that needs the whole text), is an error. Solutions without boxes under a template that
      asks for one are fine: the rephrase boxes its answer.
    * ``row``: every row's own regular expressions compile; none at all is a notice (the check then
      passes everything).
    * ``repo.fewshot`` with only answer checks is a notice: the bank spreads whatever passes.
    """

    say = say or _notice
    r = cfg.repo
    sols = [e for e in examples if e.solution is not None]
    if "strict" in r.verify and sols:
        boxed = [e for e in sols if extract_boxed(e.solution or "") is not None]
        asks = "\\boxed" in r.rephrase_template
        if not boxed:
            if not asks:
                raise UserError(
                    f"repo.verify=strict: none of the {len(sols)} expert solutions has a \\boxed{{}} answer and "
                    "repo.rephrase_template does not ask for one, so no rephrase could ever verify; ask for the final answer "
                    "in \\boxed{} in the template, or use repo.verify=[reward]"
                )
        else:
            sample = boxed[:256]
            texts = ["\\boxed{" + (extract_boxed(e.solution or "") or "") + "}" for e in sample]
            scores, _ = scorer([e.prompt for e in sample], texts, sample)
            if not bool((scores >= r.delta).any()):
                raise UserError(
                    f"repo.verify=strict: none of {len(sample)} expert solutions passes the strict rule (its last \\boxed{{}} "
                    f"answer alone, scored by reward.funcs={cfg.reward.funcs}, stays below repo.delta={r.delta}), so no reference "
                    "answer verifies and no rephrase could; a reward that needs the whole text cannot score a boxed answer "
                    "alone: use repo.verify=[reward] or check data.fields.answer"
                )
    if r.fewshot and not any(c not in ("reward", "strict") for c in r.verify):
        say(f"repo.fewshot={r.fewshot} with repo.verify={list(r.verify)}: the bank shows the policy whatever passes, and an "
            "answer check alone passes a bare boxed answer, which the bank then spreads (docs/REAL_MODEL.md: 75% passed "
            "strict, 9% carried the fact); add a faithfulness check such as steps or judge")
    if "row" in r.verify:
        n = check_row_patterns(examples, r.row_check_column)
        if n == 0:
            say(f"repo.verify=row: no training row has a {r.row_check_column!r} column (repo.row_check_column), so the row "
                "check passes every rephrase")


def _notice(msg: str) -> None:
    import sys

    print(f"repo-rl: {msg}", file=sys.stderr)


__all__ = [
    "ANSWER_CHECKS",
    "BUILTIN_CHECKS",
    "FAITHFUL_TEMPLATE",
    "RephraseVerifier",
    "Verdicts",
    "boxed_only",
    "check_verify",
    "check_label",
    "check_row_patterns",
    "copy_share",
    "numbers_in",
    "reference_steps",
    "row_patterns",
    "steps_precision",
    "steps_share",
    "working",
]
