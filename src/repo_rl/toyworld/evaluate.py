"""Greedy-decoding accuracy of a toy-world model, through the shared evaluation path.

Completions come from the generation engine of training and ``repo-rl eval``
(:func:`repo_rl.engines.make_generator`, greedy :class:`~repo_rl.engines.SamplingParams`; the
``hf`` engine matches ``model.generate(do_sample=False)`` token for token), and accuracy is the
shared metric of :mod:`repo_rl.evaluation.metrics`: with one greedy sample per row it is avg@1
(= pass@1), the fraction of rows whose ``toy_reward`` is correct.
"""

from __future__ import annotations

from typing import Sequence

from ..evaluation.metrics import aggregate
from .world import REPHRASE_TEMPLATE, ToyWorldConfig, generate_rows, toy_reward

#: Seeds of the evaluation rows drawn by :func:`evaluate_splits` (apart from the train seeds
#: used by ``write_datasets``).
EVAL_SEED = 777


def _max_new_tokens(rows: Sequence[dict]) -> int:
    # A native solution is about 9 characters per digit; leave room for an eos.
    n = max(len(r["answer"]) for r in rows)
    return 9 * n + 8


def generate_greedy(model, tokenizer, prompts: Sequence[str], batch_size: int = 128,
                    max_new_tokens: int = 48) -> list[str]:
    """Greedy completions (decoded with ``skip_special_tokens=True``), ``batch_size`` rows per forward."""
    from ..engines import SamplingParams, make_generator  # lazy: the engines import torch

    if not prompts:
        return []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engine = make_generator(model, [tokenizer.eos_token_id], pad, batch_size=batch_size)
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    comps = engine.generate(ids, SamplingParams(max_new_tokens, temperature=0.0), [0] * len(ids))
    return tokenizer.batch_decode(comps, skip_special_tokens=True)


def accuracy(model, tokenizer, rows: Sequence[dict], batch_size: int = 128,
             prompt_key: str = "prompt") -> float:
    """Fraction of rows whose greedy completion of ``row[prompt_key]`` gets ``toy_reward`` 1
    (avg@1 of :func:`repo_rl.evaluation.metrics.aggregate`, one sample per row)."""
    if not rows:
        raise ValueError("accuracy: no rows")
    prompts = [r[prompt_key] for r in rows]
    comps = generate_greedy(model, tokenizer, prompts, batch_size, _max_new_tokens(rows))
    rewards = toy_reward(prompts, comps, [r["answer"] for r in rows])
    return aggregate([[r] for r in rewards], ks=[1])["avg@k"]


def rephrase_rows(rows: Sequence[dict]) -> list[dict]:
    """Rows whose prompt is the rephrase prompt P(q, k) built from the expert solution."""
    return [dict(r, prompt=REPHRASE_TEMPLATE.format(question=r["prompt"], solution=r["solution"]))
            for r in rows]


def evaluate_splits(model, tokenizer, cfg: ToyWorldConfig, n: int = 200, batch_size: int = 128,
                    seed: int = EVAL_SEED) -> dict[str, float]:
    """Greedy accuracy on ``n`` rows each of: easy, hard (held-out values), general, and
    ``rephrase_hard`` (rephrase success on hard training-value items given their expert text)."""
    res = {
        "easy": accuracy(model, tokenizer, generate_rows(cfg, "easy", n, seed), batch_size),
        "hard": accuracy(model, tokenizer, generate_rows(cfg, "hard_heldout", n, seed), batch_size),
        "general": accuracy(model, tokenizer, generate_rows(cfg, "general", n, seed), batch_size),
        "rephrase_hard": accuracy(model, tokenizer,
                                  rephrase_rows(generate_rows(cfg, "hard", n, seed)), batch_size),
    }
    return res
