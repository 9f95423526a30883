"""Greedy-decoding accuracy of a toy-world model."""

from __future__ import annotations

from typing import Sequence

import torch

from .world import REPHRASE_TEMPLATE, ToyWorldConfig, generate_rows, toy_reward

#: Seeds of the evaluation rows drawn by :func:`evaluate_splits` (apart from the train seeds
#: used by ``write_datasets``).
EVAL_SEED = 777


def _max_new_tokens(rows: Sequence[dict]) -> int:
    # A native solution is about 9 characters per digit; leave room for an eos.
    n = max(len(r["answer"]) for r in rows)
    return 9 * n + 8


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: Sequence[str], batch_size: int = 128,
                    max_new_tokens: int = 48) -> list[str]:
    """Greedy completions (decoded with ``skip_special_tokens=True``), left-padded batches."""
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i:i + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            gen = model.generate(
                **enc, do_sample=False, max_new_tokens=max_new_tokens, use_cache=True,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1]:]
            outs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
        if was_training:
            model.train()
    return outs


def accuracy(model, tokenizer, rows: Sequence[dict], batch_size: int = 128,
             prompt_key: str = "prompt") -> float:
    """Fraction of rows whose greedy completion of ``row[prompt_key]`` gets ``toy_reward`` 1."""
    if not rows:
        raise ValueError("accuracy: no rows")
    prompts = [r[prompt_key] for r in rows]
    comps = generate_greedy(model, tokenizer, prompts, batch_size, _max_new_tokens(rows))
    rewards = toy_reward(prompts, comps, [r["answer"] for r in rows])
    return sum(rewards) / len(rewards)


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
