"""Evaluation: ``repo-rl eval`` and the metrics every evaluation in repo-rl shares.

==================  ===================================================================
module              owns
==================  ===================================================================
:mod:`.metrics`     pass@k, avg@k, correctness, aggregation (pure functions)
:mod:`.layouts`     :class:`Layout`: which columns hold prompt/answer/id/domain/options
:mod:`.readers`     rows of JSONL / JSON / Parquet / CSV files and ``datasets`` names
:mod:`.benchmarks`  :class:`EvalItem`, :class:`Benchmark`, prompts, :func:`load_benchmark`
:mod:`.runner`      sample seeds, generation, scoring, per-item records, result files
:mod:`.cli`         the ``repo-rl eval`` arguments, checks, run and table
==================  ===================================================================

Importing this package does not import torch. See ``docs/EVALUATION.md``.
"""

from .benchmarks import (
    CHOICE_INSTRUCTION,
    KINDS,
    LETTERS,
    MATH_INSTRUCTION,
    Benchmark,
    EvalItem,
    benchmark_name,
    format_choice_prompt,
    load_benchmark,
    with_instruction,
)
from .cli import add_eval_parser, format_table, run_eval_command
from .layouts import FIELD_KEYS, Layout, detect_layout, parse_field_args
from .metrics import aggregate, avg_at_k, default_ks, is_correct, macro_average, pass_at_k
from .readers import read_rows
from .runner import evaluate_benchmark, generate, item_record, sample_seed, score, summarize

__all__ = [
    "CHOICE_INSTRUCTION",
    "FIELD_KEYS",
    "KINDS",
    "LETTERS",
    "MATH_INSTRUCTION",
    "Benchmark",
    "EvalItem",
    "Layout",
    "add_eval_parser",
    "aggregate",
    "avg_at_k",
    "benchmark_name",
    "default_ks",
    "detect_layout",
    "evaluate_benchmark",
    "format_choice_prompt",
    "format_table",
    "generate",
    "is_correct",
    "item_record",
    "load_benchmark",
    "macro_average",
    "parse_field_args",
    "pass_at_k",
    "read_rows",
    "run_eval_command",
    "sample_seed",
    "score",
    "summarize",
    "with_instruction",
]
