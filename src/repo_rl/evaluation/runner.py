"""Running a benchmark: sample ``n`` completions per item with a generation engine (built by
:func:`repo_rl.engines.make_generator`), score them with the training verifiers, write one JSONL
line per item and summarise with :mod:`.metrics`.

Sample ``j`` of the item at row ``i`` is seeded with :func:`sample_seed`, so a completion does
not depend on the batch size, on ``--limit`` or on the other items of its batch.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .benchmarks import KINDS, Benchmark, EvalItem
from .metrics import aggregate, is_correct

__all__ = [
    "evaluate_benchmark",
    "generate",
    "item_record",
    "outcome_score",
    "sample_seed",
    "score",
    "summarize",
    "write_jsonl",
    "write_results",
]

STREAM_SAMPLE = 0x5EED01
"""Seed stream of the eval samples (first argument after the run seed of ``derive_seed``)."""


def sample_seed(seed: int, index: int, sample: int) -> int:
    """Seed of sample ``sample`` of the item at row ``index``."""
    from ..engines import derive_seed  # lazy: the engines import torch

    return derive_seed(seed, STREAM_SAMPLE, index, sample)


def generate(
    items: Sequence[EvalItem],
    n: int,
    generator: Any,
    renderer: Any,
    params: Any,
    seed: int,
    batch_size: int,
    progress: bool = True,
    desc: str = "",
) -> list[list[tuple[list[int], int]]]:
    """``n`` completions ``(token ids, seed)`` per item, in batches of ``batch_size`` rows.

    ``generator`` is an engine (:class:`repo_rl.engines.Generator`), ``renderer`` a
    :class:`repo_rl.step.prompts.PromptRenderer`, ``params`` :class:`repo_rl.engines.SamplingParams`.
    """
    from tqdm.auto import tqdm

    prompt_ids = [renderer.ids(it.prompt) for it in items]
    rows = [(i, j) for i in range(len(items)) for j in range(n)]
    order = sorted(range(len(rows)), key=lambda r: len(prompt_ids[rows[r][0]]))  # less padding per batch
    out: list[list[Any]] = [[None] * n for _ in items]
    with tqdm(total=math.ceil(len(rows) / batch_size), desc=desc, unit="batch", disable=not progress, file=sys.stderr) as bar:
        for s in range(0, len(order), batch_size):
            chunk = [rows[r] for r in order[s : s + batch_size]]
            seeds = [sample_seed(seed, items[i].index, j) for i, j in chunk]
            comps = generator.generate([prompt_ids[i] for i, _ in chunk], params, seeds)
            for (i, j), ids, sd in zip(chunk, comps, seeds):
                out[i][j] = (list(ids), sd)
            bar.update(1)
    return out


def score(items: Sequence[EvalItem], texts: Sequence[Sequence[str]], rewards: dict[str, Any]) -> list[list[Any]]:
    """Verifier outcomes (:class:`~repo_rl.rewards.Outcome`) per item and sample, one reward call per kind."""
    out: list[list[Any]] = [[None] * len(t) for t in texts]
    for kind in KINDS:
        where = [(i, j) for i, it in enumerate(items) if it.kind == kind for j in range(len(texts[i]))]
        if not where:
            continue
        args = ([texts[i][j] for i, j in where], [items[i].gold for i, _ in where])
        if kind == "judge":  # the judge reads the question too
            outcomes = rewards[kind].outcomes(*args, prompts=[items[i].prompt for i, _ in where])
        else:
            outcomes = rewards[kind].outcomes(*args)
        for (i, j), o in zip(where, outcomes):
            out[i][j] = o
    return out


def outcome_score(o: Any) -> Optional[float]:
    """The score of a verifier outcome; None for an error or a timeout."""
    return float(o.value) if o.ok and o.value is not None else None


def item_record(item: EvalItem, samples: Sequence[tuple[list[int], int]], texts: Sequence[str], outcomes: Sequence[Any], eos: set[int], max_new_tokens: int) -> dict[str, Any]:
    """One line of the per-item JSONL."""
    comps = []
    for (ids, sd), text, o in zip(samples, texts, outcomes):
        s = outcome_score(o)
        c = {
            "text": text,
            "score": s,
            "correct": is_correct(s),
            "status": o.status,
            "tokens": len(ids),
            "truncated": len(ids) >= max_new_tokens and not (ids and ids[-1] in eos),
            "seed": sd,
        }
        if o.error:
            c["error"] = o.error
        comps.append(c)
    num = sum(c["correct"] for c in comps)
    rec: dict[str, Any] = {"index": item.index, "id": item.id, "kind": item.kind, "domain": item.domain, "prompt": item.prompt, "gold": item.gold}
    if item.options is not None:
        rec["options"] = item.options
        rec["gold_text"] = item.gold_text
    rec.update({"n": len(comps), "num_correct": num, "avg": num / len(comps) if comps else 0.0, "completions": comps})
    return rec


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Benchmark metrics from the per-item records (what the JSON reports)."""
    scores = [[c["score"] for c in r["completions"]] for r in records]
    out = aggregate(scores)
    comps = [c for r in records for c in r["completions"]]
    out["verifier_errors"] = sum(c["status"] == "error" for c in comps)
    out["verifier_timeouts"] = sum(c["status"] == "timeout" for c in comps)
    out["mean_completion_tokens"] = sum(c["tokens"] for c in comps) / len(comps)
    out["truncated_fraction"] = sum(c["truncated"] for c in comps) / len(comps)
    return out


def evaluate_benchmark(
    bench: Benchmark,
    *,
    n: int,
    generator: Any,
    renderer: Any,
    tokenizer: Any,
    params: Any,
    rewards: dict[str, Any],
    eos: Sequence[int],
    seed: int,
    batch_size: int,
    completions_file: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate, score, write the per-item JSONL and return the benchmark's metrics."""
    t0 = time.perf_counter()
    samples = generate(bench.items, n, generator, renderer, params, seed, batch_size, progress, desc=bench.name)
    t_gen = time.perf_counter() - t0
    texts = [[tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in s] for s in samples]
    t1 = time.perf_counter()
    outcomes = score(bench.items, texts, rewards)
    t_score = time.perf_counter() - t1
    eos_set = set(int(e) for e in eos)
    records = [item_record(it, s, t, o, eos_set, params.max_new_tokens) for it, s, t, o in zip(bench.items, samples, texts, outcomes)]
    write_jsonl(completions_file, records)
    summary = {"source": bench.source, "layout": bench.layout.describe(), "kind": bench.kind}
    summary.update(summarize(records))
    summary.update(
        {
            "completions_file": str(completions_file.resolve()),
            "wall_time_s": time.perf_counter() - t0,
            "generation_time_s": t_gen,
            "scoring_time_s": t_score,
        }
    )
    return summary


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """The per-item JSONL, written atomically."""
    _atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_results(path: Path, report: dict[str, Any]) -> None:
    """The results JSON, written atomically (rewritten after each benchmark, so partial results survive a crash)."""
    _atomic_write(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
