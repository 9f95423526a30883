"""Benchmark evaluation: ``repo-rl eval``.

Samples ``n`` completions per item with :class:`~repo_rl.rollout.HFGenerator` (per-sample
seeds from :func:`~repo_rl.rollout.derive_seed`, so results do not depend on the batch size),
scores them with the training verifiers (``math``: :class:`~repo_rl.rewards.MathReward`,
``choice``: :data:`~repo_rl.rewards.choice_reward`) and reports pass@1, avg@k and the unbiased
pass@k per benchmark. Every completion is written to a per-benchmark JSONL file.

Rows are read by :mod:`repo_rl.data` (JSONL, JSON, Parquet, a ``datasets`` name; CSV is
added here for GPQA). The layout of a file is detected from its field names; see
``docs/EVALUATION.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from .config import FieldsConfig
from .data import DataError, Prompt, _get as get_field, iter_rows, row_to_example
from .errors import UserError
from .rewards import choice_reward, extract_boxed, make_math_reward, parse_choice, strip_math_delimiters

__all__ = [
    "CHOICE_INSTRUCTION",
    "MATH_INSTRUCTION",
    "Benchmark",
    "EvalItem",
    "Layout",
    "add_eval_parser",
    "aggregate",
    "avg_at_k",
    "default_ks",
    "detect_layout",
    "format_choice_prompt",
    "is_correct",
    "load_benchmark",
    "parse_field_args",
    "pass_at_k",
    "run_eval_command",
    "with_instruction",
]

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""Appended to math prompts (unless the prompt already mentions ``\\boxed``)."""
CHOICE_INSTRUCTION = (
    "Answer with the letter of the correct option. Put only the letter within \\boxed{}, for example \\boxed{A}."
)
"""Appended to multiple-choice prompts after the lettered options."""

LETTERS = "ABCDEFGHIJ"
"""Option letters; the default letters of :data:`~repo_rl.rewards.choice_reward`."""

FIELD_KEYS = ("prompt", "answer", "id", "domain", "options")
"""Keys accepted by ``--field KEY=COLUMN``."""

# Candidate column names, in order of preference, of the usual public releases.
PROMPT_KEYS = ("problem", "question", "prompt", "Problem", "Question", "input", "query")
ANSWER_KEYS = (
    "answer",
    "final_answer",
    "Answer",
    "reward_model.ground_truth",
    "ground_truth",
    "gold",
    "target_answer",
    "expected_answer",
)
ID_KEYS = ("id", "unique_id", "question_id", "Record ID", "idx", "extra_info.index", "ID")
DOMAIN_KEYS = ("domain", "data_source", "subject", "category", "type", "High-level domain")
_MC_SOURCES = ("gpqa", "mmlu", "arc", "choice", "mcq", "multiple", "commonsense", "hellaswag", "piqa", "obqa")

# Seed streams (first argument after the run seed of derive_seed).
_STREAM_SAMPLE = 0x5EED01
_STREAM_SHUFFLE = 0x5EED02

# A field path no row has: the expert solution is not needed for evaluation.
_UNUSED = "\x00unused"
_JOINED = "\x00answer"

KINDS = ("math", "choice")


# ======================================================================================
# Metrics (pure functions)
# ======================================================================================


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one item with ``c`` correct out of ``n`` samples (Chen et al., 2021).

    ``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` so it never
    forms large binomials.
    """
    n, c, k = int(n), int(c), int(k)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def is_correct(score: Optional[float]) -> bool:
    """A sample is correct when its verifier score is >= 0.5 (scores are 0/1); None (error, timeout) is not."""
    return score is not None and not math.isnan(score) and score >= 0.5


def avg_at_k(scores: Sequence[Optional[float]]) -> float:
    """Mean correctness of the k samples of one item (None counts as incorrect)."""
    if len(scores) == 0:
        raise ValueError("avg_at_k: no scores")
    return sum(is_correct(s) for s in scores) / len(scores)


def default_ks(n: int) -> list[int]:
    """1, the powers of two below n, and n."""
    ks = {1, n}
    k = 2
    while k < n:
        ks.add(k)
        k *= 2
    return sorted(ks)


def aggregate(item_scores: Sequence[Sequence[Optional[float]]], ks: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Benchmark metrics from the per-sample scores of each item (every item has the same n).

    ``pass@1`` and ``pass@k`` (k = n) are means over items of :func:`pass_at_k`; ``avg@k`` the
    mean over items of :func:`avg_at_k`. ``pass_at`` holds pass@k for every k in ``ks``.
    """
    if not item_scores:
        raise ValueError("aggregate: no items")
    n = len(item_scores[0])
    if n < 1 or any(len(s) != n for s in item_scores):
        raise ValueError("aggregate: every item needs the same number (>= 1) of scores")
    counts = [sum(is_correct(s) for s in row) for row in item_scores]
    ks = sorted(set(ks)) if ks else default_ks(n)
    m = len(item_scores)
    pass_at = {str(k): sum(pass_at_k(n, c, k) for c in counts) / m for k in ks if 1 <= k <= n}
    return {
        "items": m,
        "n": n,
        "k": n,
        "pass@1": sum(pass_at_k(n, c, 1) for c in counts) / m,
        "avg@k": sum(avg_at_k(row) for row in item_scores) / m,
        "pass@k": sum(pass_at_k(n, c, n) for c in counts) / m,
        "pass_at": pass_at,
        "correct_samples": sum(counts),
        "solved_items": sum(c > 0 for c in counts),
    }


# ======================================================================================
# Layouts and items
# ======================================================================================


@dataclass
class EvalItem:
    """One benchmark question, ready for generation and scoring."""

    index: int
    """Row number in the source (stable under ``--limit``); seeds derive from it."""
    id: str
    prompt: Prompt
    """Formatted prompt (instruction and lettered options included), text or chat messages."""
    gold: str
    """Reference for the verifier: a LaTeX answer (math) or an option letter (choice)."""
    kind: str
    """``math`` or ``choice``."""
    domain: Optional[str] = None
    options: Optional[list[str]] = None
    gold_text: Optional[str] = None
    """Multiple choice: the text of the correct option."""


@dataclass
class Layout:
    """How the rows of a source map to items."""

    name: str
    """``math``, ``math-boxed-solution``, ``verl``, ``gpqa``, ``mmlu-pro``, ``arc``, ``arc-original`` or ``fields``."""
    prompt: Optional[str] = None
    answer: Optional[str] = None
    id: Optional[str] = None
    domain: Optional[str] = None
    options: Optional[str] = None

    @property
    def multiple_choice(self) -> bool:
        return self.name in ("gpqa", "mmlu-pro", "arc", "arc-original") or (self.name == "fields" and self.options is not None)

    def describe(self) -> str:
        parts = [f"{k}={v}" for k in FIELD_KEYS if (v := getattr(self, k))]
        return f"{self.name} ({', '.join(parts)})" if parts else self.name


@dataclass
class Benchmark:
    name: str
    source: str
    layout: Layout
    items: list[EvalItem] = field(default_factory=list)

    @property
    def kind(self) -> str:
        kinds = sorted({it.kind for it in self.items})
        return kinds[0] if len(kinds) == 1 else "mixed"


def parse_field_args(specs: Optional[Sequence[str]]) -> dict[str, str]:
    """``["prompt=problem", "answer=gold"]`` -> ``{"prompt": "problem", "answer": "gold"}``."""
    out: dict[str, str] = {}
    for spec in specs or ():
        key, sep, col = spec.partition("=")
        key, col = key.strip(), col.strip()
        if not sep or not key or not col:
            raise UserError(f"--field {spec!r}: expected KEY=COLUMN, e.g. --field prompt=problem")
        if key not in FIELD_KEYS:
            raise UserError(f"--field {spec!r}: unknown key {key!r} (expected one of {', '.join(FIELD_KEYS)})")
        out[key] = col
    return out


def _first_present(row: dict, keys: Sequence[str], want_str: bool = False) -> Optional[str]:
    for k in keys:
        ok, val = get_field(row, k)
        if ok and val is not None and (not want_str or isinstance(val, str)):
            return k
    return None


def _unknown_layout(source: str, row: dict, detail: str = "") -> UserError:
    found = ", ".join(sorted(map(str, row))) or "none"
    return UserError(
        f"{source}: unknown layout{detail} (fields found: {found}); name the columns with "
        "--field prompt=COLUMN --field answer=COLUMN (add --field options=COLUMN for multiple choice)"
    )


def detect_layout(row: Any, source: str, fields: Optional[dict[str, str]] = None) -> Layout:
    """The layout of ``source`` from its first row, or the ``--field`` mapping when given."""
    if not isinstance(row, dict):
        raise UserError(f"{source}: expected rows that are JSON objects, got {type(row).__name__}")
    if fields:
        prompt = fields.get("prompt") or _first_present(row, PROMPT_KEYS)
        answer = fields.get("answer") or _first_present(row, ANSWER_KEYS)
        for key, col in fields.items():
            if not get_field(row, col)[0]:
                raise _unknown_layout(source, row, f": --field {key}={col} names a column the first row does not have")
        if prompt is None or answer is None:
            missing = "prompt" if prompt is None else "answer"
            raise _unknown_layout(source, row, f": no {missing} column found")
        return Layout(
            "fields",
            prompt=prompt,
            answer=answer,
            id=fields.get("id") or _first_present(row, ID_KEYS),
            domain=fields.get("domain") or _first_present(row, DOMAIN_KEYS),
            options=fields.get("options"),
        )
    keys = set(row)
    if {"Question", "Correct Answer", "Incorrect Answer 1"} <= keys:
        return Layout("gpqa", prompt="Question", answer="Correct Answer", id=_first_present(row, ID_KEYS), domain=_first_present(row, DOMAIN_KEYS))
    choices = row.get("choices")
    if isinstance(choices, dict) and "text" in choices and "label" in choices and "answerKey" in row:
        prompt = _first_present(row, PROMPT_KEYS, want_str=True)
        if prompt:
            return Layout("arc", prompt=prompt, answer="answerKey", id=_first_present(row, ID_KEYS), options="choices")
    question = row.get("question")
    if isinstance(question, dict) and "stem" in question and isinstance(question.get("choices"), list) and "answerKey" in row:
        return Layout("arc-original", prompt="question.stem", answer="answerKey", id=_first_present(row, ID_KEYS), options="question.choices")
    if isinstance(row.get("options"), list) and ("answer" in row or "answer_index" in row):
        prompt = _first_present(row, PROMPT_KEYS, want_str=True)
        if prompt:
            return Layout(
                "mmlu-pro",
                prompt=prompt,
                answer="answer_index" if "answer_index" in row else "answer",
                id=_first_present(row, ID_KEYS),
                domain=_first_present(row, DOMAIN_KEYS),
                options="options",
            )
    if isinstance(row.get("prompt"), list) or "reward_model" in row:
        answer = _first_present(row, ANSWER_KEYS)
        if answer is None:
            raise _unknown_layout(source, row, ": a verl-style row without reward_model.ground_truth or answer")
        return Layout("verl", prompt="prompt", answer=answer, id=_first_present(row, ID_KEYS), domain=_first_present(row, DOMAIN_KEYS))
    prompt = _first_present(row, PROMPT_KEYS, want_str=True)
    answer = _first_present(row, ANSWER_KEYS)
    if prompt and answer:
        return Layout("math", prompt=prompt, answer=answer, id=_first_present(row, ID_KEYS), domain=_first_present(row, DOMAIN_KEYS))
    if prompt and isinstance(row.get("solution"), str) and extract_boxed(row["solution"]):
        return Layout("math-boxed-solution", prompt=prompt, answer="solution", id=_first_present(row, ID_KEYS), domain=_first_present(row, DOMAIN_KEYS))
    raise _unknown_layout(source, row)


def with_instruction(prompt: Prompt, instruction: Optional[str]) -> Prompt:
    """Append ``instruction`` to the (last user message of the) prompt, unless it already mentions ``\\boxed``."""
    if not instruction:
        return prompt
    if isinstance(prompt, str):
        return prompt if "\\boxed" in prompt else f"{prompt.rstrip()}\n\n{instruction}"
    msgs = [dict(m) for m in prompt]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    if "\\boxed" not in msgs[last]["content"]:
        msgs[last]["content"] = f"{msgs[last]['content'].rstrip()}\n\n{instruction}"
    return msgs


def format_choice_prompt(question: str, options: Sequence[str], instruction: Optional[str]) -> str:
    """The question, the options as ``A. text`` lines, then the instruction."""
    lines = [question.strip(), ""] + [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    text = "\n".join(lines)
    return f"{text}\n\n{instruction}" if instruction else text


def _text(value: Any, where: str, name: str) -> str:
    if isinstance(value, bool) or value is None:
        raise DataError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
    if isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value.strip()


def _options(value: Any, where: str, name: str) -> tuple[list[str], Optional[list[str]]]:
    """Options as a list of texts plus their labels when given (``{text, label}`` or a list of such)."""
    labels = None
    if isinstance(value, dict) and "text" in value:
        texts = value["text"]
        labels = value.get("label")
    elif isinstance(value, list) and value and all(isinstance(v, dict) and "text" in v for v in value):
        texts = [v["text"] for v in value]
        labels = [v.get("label") for v in value]
    else:
        texts = value
    if hasattr(texts, "tolist"):  # numpy arrays from some readers
        texts = texts.tolist()
    if not isinstance(texts, list) or len(texts) < 2:
        raise DataError(f"{where}: field {name!r} must be a list of at least 2 options")
    if len(texts) > len(LETTERS):
        raise DataError(f"{where}: field {name!r} has {len(texts)} options; at most {len(LETTERS)} (A-J) are supported")
    opts = [_text(t, where, f"{name}[{i}]") for i, t in enumerate(texts)]
    if labels is not None:
        labels = [str(x).strip() for x in (labels.tolist() if hasattr(labels, "tolist") else labels)]
        if len(labels) != len(opts):
            raise DataError(f"{where}: field {name!r} has {len(opts)} options but {len(labels)} labels")
    return opts, labels


def _gold_index(answer: Any, options: list[str], labels: Optional[list[str]], where: str, name: str) -> int:
    """Index of the correct option from a label, a letter, a 0-based index or the option text."""
    idx: Optional[int] = None
    if isinstance(answer, int) and not isinstance(answer, bool):
        idx = answer
    elif isinstance(answer, str):
        a = answer.strip()
        if labels is not None and a in labels:
            idx = labels.index(a)
        elif (letter := parse_choice(a)) is not None:
            idx = LETTERS.index(letter)
        elif a in options:
            idx = options.index(a)
    if idx is None or not 0 <= idx < len(options):
        raise DataError(f"{where}: field {name!r} = {answer!r} does not name one of the {len(options)} options")
    return idx


def _domain(row: dict, layout: Layout) -> Optional[str]:
    if not layout.domain:
        return None
    ok, val = get_field(row, layout.domain)
    return str(val) if ok and val is not None else None


def _row_id(row: dict, layout: Layout, where: str) -> str:
    if layout.id:
        ok, val = get_field(row, layout.id)
        if ok and isinstance(val, (str, int)) and not isinstance(val, bool):
            return str(val)
    return where


def _choice_item(index: int, where: str, row: dict, layout: Layout, seed: int, instruction: Optional[str]) -> EvalItem:
    if layout.name == "gpqa":
        question = _text(row.get("Question"), where, "Question")
        correct = _text(row.get("Correct Answer"), where, "Correct Answer")
        wrong = [
            _text(row[k], where, k)
            for k in (f"Incorrect Answer {j}" for j in range(1, len(LETTERS)))
            if k in row and isinstance(row[k], str) and row[k].strip()
        ]
        if not wrong:
            raise DataError(f"{where}: no 'Incorrect Answer N' field has text")
        options = [correct] + wrong
        order = list(range(len(options)))
        random.Random(_derive_seed(seed, _STREAM_SHUFFLE, index)).shuffle(order)
        options = [options[i] for i in order]
        gold = order.index(0)
    else:
        ok, q = get_field(row, layout.prompt or "")
        question = _text(q if ok else None, where, layout.prompt or "prompt")
        ok, raw = get_field(row, layout.options or "")
        if not ok:
            raise DataError(f"{where}: missing field {layout.options!r} (the options)")
        options, labels = _options(raw, where, layout.options or "options")
        ok, ans = get_field(row, layout.answer or "")
        if not ok or ans is None:
            raise DataError(f"{where}: missing field {layout.answer!r} (the correct option)")
        if layout.name == "mmlu-pro" and layout.answer == "answer_index" and "answer" in row:
            ok_letter = _gold_index(row["answer"], options, None, where, "answer")
            gold = _gold_index(ans, options, labels, where, "answer_index")
            if gold != ok_letter:
                raise DataError(f"{where}: 'answer' ({row['answer']!r}) and 'answer_index' ({ans!r}) disagree")
        else:
            gold = _gold_index(ans, options, labels, where, layout.answer or "answer")
    return EvalItem(
        index=index,
        id=_row_id(row, layout, where),
        prompt=format_choice_prompt(question, options, instruction),
        gold=LETTERS[gold],
        kind="choice",
        domain=_domain(row, layout),
        options=options,
        gold_text=options[gold],
    )


def _plain_item(
    index: int, where: str, row: dict, layout: Layout, kind: str, math_instruction: Optional[str], choice_instruction: Optional[str]
) -> EvalItem:
    answer_path = layout.answer or "answer"
    if layout.name == "math-boxed-solution":
        ok, sol = get_field(row, answer_path)
        boxed = extract_boxed(sol) if ok and isinstance(sol, str) else None
        if not boxed:
            raise DataError(f"{where}: field 'solution' has no \\boxed{{}} answer")
        row, answer_path = {**row, _JOINED: boxed}, _JOINED
    elif answer_path.rsplit(".", 1)[-1] == "final_answer":
        ok, val = get_field(row, answer_path)
        if ok and isinstance(val, list) and len(val) > 1 and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in val):
            row, answer_path = {**row, _JOINED: ", ".join(strip_math_delimiters(str(v)) for v in val)}, _JOINED  # OlympiadBench: several answers
    fields = FieldsConfig(
        prompt=layout.prompt or "prompt",
        answer=answer_path,
        solution=_UNUSED,
        domain=layout.domain or "domain",
        id=layout.id or "id",
    )
    ex = row_to_example(row, fields, where)
    if kind == "auto":
        kind = "math"
        if layout.name == "verl" and any(s in (ex.domain or "").lower() for s in _MC_SOURCES) and parse_choice(ex.answer):
            kind = "choice"
    gold = ex.answer
    if kind == "choice":
        letter = parse_choice(gold)
        if letter is None:
            raise DataError(f"{where}: answer {gold!r} is not an option letter (A-J), which multiple choice scoring needs")
        gold = letter
    prompt = with_instruction(ex.prompt, math_instruction if kind == "math" else choice_instruction)
    return EvalItem(index=index, id=ex.id, prompt=prompt, gold=gold, kind=kind, domain=ex.domain)


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter=delim)
            for i, row in enumerate(reader):
                yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}: invalid CSV ({e})") from None


def _read_hf_config(source: str, split: str) -> Iterator[tuple[str, Any]]:
    name, config = source.split(":", 1)
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise DataError(f"{source}: not a readable file or datasets name ({type(e).__name__}: {first})") from None
    for i, row in enumerate(ds):
        yield f"{source}[{split}][{i}]", row


def read_rows(source: str, split: str = "test") -> list[tuple[str, Any]]:
    """``(where, row)`` pairs of a file or ``datasets`` name (``NAME:CONFIG`` picks a config)."""
    path = Path(source).expanduser()
    try:
        if path.suffix.lower() in (".csv", ".tsv"):
            if not path.is_file():
                raise DataError(f"{source}: file not found")
            rows = list(_read_csv(path))
        elif ":" in source and not path.exists() and not source.startswith("toyworld:") and "/" in source.split(":", 1)[0]:
            rows = list(_read_hf_config(source, split))
        else:
            rows = list(iter_rows(str(path) if path.exists() else source, split))
    except DataError as e:
        raise UserError(str(e)) from None
    for _, row in rows:
        if isinstance(row, DataError):
            raise UserError(str(row))
    return rows


def load_benchmark(
    source: str,
    *,
    fields: Optional[dict[str, str]] = None,
    kind: str = "auto",
    split: str = "test",
    seed: int = 0,
    limit: Optional[int] = None,
    math_instruction: Optional[str] = MATH_INSTRUCTION,
    choice_instruction: Optional[str] = CHOICE_INSTRUCTION,
    name: Optional[str] = None,
) -> Benchmark:
    """Read ``source``, detect its layout and build the items. Raises UserError naming the row."""
    if kind not in ("auto",) + KINDS:
        raise UserError(f"--kind {kind}: expected auto, math or choice")
    rows = read_rows(source, split)
    if not rows:
        raise UserError(f"{source}: no rows")
    layout = detect_layout(rows[0][1], source, fields)
    if layout.multiple_choice and kind == "math":
        raise UserError(f"{source}: --kind math does not apply to the multiple-choice layout {layout.name}")
    if limit is not None:
        rows = rows[:limit]
    items = []
    try:
        for i, (where, row) in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if layout.multiple_choice:
                items.append(_choice_item(i, where, row, layout, seed, choice_instruction))
            else:
                items.append(_plain_item(i, where, row, layout, kind, math_instruction, choice_instruction))
    except DataError as e:
        raise UserError(str(e)) from None
    return Benchmark(name=name or benchmark_name(source), source=source, layout=layout, items=items)


def benchmark_name(source: str) -> str:
    path = Path(source)
    base = path.stem if path.suffix else source
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", base).strip("_") or "data"


# ======================================================================================
# Generation and scoring
# ======================================================================================


def _derive_seed(*parts: int) -> int:
    from .rollout import derive_seed  # lazy: rollout imports torch

    return derive_seed(*parts)


def sample_seed(seed: int, index: int, sample: int) -> int:
    """Seed of sample ``sample`` of the item at row ``index``."""
    return _derive_seed(seed, _STREAM_SAMPLE, index, sample)


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
    """``n`` completions ``(token ids, seed)`` per item, in batches of ``batch_size`` rows."""
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
        outcomes = rewards[kind].outcomes([texts[i][j] for i, j in where], [items[i].gold for i, _ in where])
        for (i, j), o in zip(where, outcomes):
            out[i][j] = o
    return out


def _outcome_score(o: Any) -> Optional[float]:
    return float(o.value) if o.ok and o.value is not None else None


def item_record(item: EvalItem, samples: Sequence[tuple[list[int], int]], texts: Sequence[str], outcomes: Sequence[Any], eos: set[int], max_new_tokens: int) -> dict[str, Any]:
    """One line of the per-item JSONL."""
    comps = []
    for (ids, sd), text, o in zip(samples, texts, outcomes):
        s = _outcome_score(o)
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
    _write_jsonl(completions_file, records)
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


# ======================================================================================
# Output
# ======================================================================================


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    _atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The stdout table: one row per benchmark (and the macro average when there are several)."""
    ns = sorted({r["n"] for r in results.values()})
    kcol = f"@{ns[0]}" if len(ns) == 1 else "@k"
    head = ["benchmark", "kind", "items", "n", "pass@1", f"avg{kcol}", f"pass{kcol}", "errors", "timeouts", "time"]
    rows = [
        [name, r["kind"], str(r["items"]), str(r["n"]), f"{r['pass@1']:.4f}", f"{r['avg@k']:.4f}", f"{r['pass@k']:.4f}",
         str(r["verifier_errors"]), str(r["verifier_timeouts"]), f"{r['wall_time_s']:.1f}s"]
        for name, r in results.items()
    ]
    if len(results) > 1:
        avg = macro_average(results)
        rows.append(["average", "", str(sum(r["items"] for r in results.values())), "", f"{avg['pass@1']:.4f}",
                     f"{avg['avg@k']:.4f}", f"{avg['pass@k']:.4f}", "", "", ""])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def macro_average(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Unweighted mean over benchmarks (how papers report an "Avg." column)."""
    m = len(results)
    return {key: sum(r[key] for r in results.values()) / m for key in ("pass@1", "avg@k", "pass@k")}


# ======================================================================================
# Command line
# ======================================================================================


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on benchmarks (pass@1, avg@k, pass@k)",
        description="Sample --n completions per item, verify them with the training verifiers and report "
        "pass@1, avg@k and the unbiased pass@k per benchmark. Layouts are detected from field names "
        "(see docs/EVALUATION.md) or set with --field.",
    )
    p.add_argument("--model", "-m", required=True, help="model directory, hub id, or a built-in name (smollm2-135m-instruct, toyworld)")
    p.add_argument("--data", "-d", action="append", required=True, metavar="FILE_OR_NAME",
                   help="benchmark file (.jsonl, .json, .parquet, .csv) or datasets name (NAME or NAME:CONFIG); repeatable")
    p.add_argument("--n", type=int, default=4, help="samples per item (default 4)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature, 0 = greedy (default 0.6)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="completion length limit (default 1024)")
    p.add_argument("--output", "-o", help="results JSON (default runs/eval-<model>-<time>/results.json); "
                   "per-item completions go next to it as <stem>.<benchmark>.jsonl")
    p.add_argument("--limit", type=int, help="evaluate only the first N items of each benchmark")
    p.add_argument("--seed", type=int, default=0, help="sampling and option-shuffling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per generation batch (default 32)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward passes")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--field", action="append", metavar="KEY=COLUMN",
                   help=f"column mapping, KEY in {', '.join(FIELD_KEYS)} (dots reach nested fields); repeatable")
    p.add_argument("--kind", choices=("auto", "math", "choice"), default="auto",
                   help="scoring: math (math-verify) or choice (option letter); auto follows the layout")
    p.add_argument("--split", default="test", help="split of a datasets name (default test)")
    p.add_argument("--system-prompt", help="system message for text prompts (with a chat template)")
    p.add_argument("--no-chat-template", action="store_true", help="feed raw text even when the tokenizer has a chat template")
    p.add_argument("--math-instruction", default=MATH_INSTRUCTION, help="appended to math prompts ('' for none)")
    p.add_argument("--choice-instruction", default=CHOICE_INSTRUCTION, help="appended to multiple-choice prompts ('' for none)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--verifier-workers", type=int, default=1, help="math verifier worker processes (default 1)")
    p.add_argument("--verifier-timeout", type=float, default=5.0, help="per-item verifier timeout in seconds (default 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_eval_command)
    return p


def _check_args(args: argparse.Namespace) -> None:
    checks = [
        (args.n >= 1, f"--n {args.n}: must be >= 1"),
        (args.temperature >= 0, f"--temperature {args.temperature}: must be >= 0"),
        (0 < args.top_p <= 1, f"--top-p {args.top_p}: must be in (0, 1]"),
        (args.top_k >= 0, f"--top-k {args.top_k}: must be >= 0"),
        (args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens}: must be >= 1"),
        (args.batch_size >= 1, f"--batch-size {args.batch_size}: must be >= 1"),
        (args.limit is None or args.limit >= 1, f"--limit {args.limit}: must be >= 1"),
        (args.threads is None or args.threads >= 1, f"--threads {args.threads}: must be >= 1"),
        (args.verifier_workers >= 1, f"--verifier-workers {args.verifier_workers}: must be >= 1"),
        (0 < args.verifier_timeout < float("inf"), f"--verifier-timeout {args.verifier_timeout}: must be > 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


def _output_path(args: argparse.Namespace) -> Path:
    if args.output:
        out = Path(args.output).expanduser()
        if out.is_dir():
            raise UserError(f"--output {args.output}: is a directory; give a file name such as results.json")
    else:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.model.rstrip("/")).name) or "model"
        out = Path("runs") / f"eval-{stem}-{time.strftime('%Y%m%d-%H%M%S')}" / "results.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output {out}: cannot create its folder ({e.strerror or e})") from None
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"--output {out}: folder is not writable")
    return out


def run_eval_command(args: argparse.Namespace) -> int:
    """Run ``repo-rl eval``: load every benchmark, then the model, evaluate, write JSON and print a table."""
    t_start = time.perf_counter()
    _check_args(args)
    fields = parse_field_args(args.field)
    seed = int(args.seed)
    math_instr = args.math_instruction or None
    choice_instr = args.choice_instruction or None

    # Data first: a bad file fails before a model is loaded.
    benches: list[Benchmark] = []
    names: set[str] = set()
    for src in args.data:
        b = load_benchmark(src, fields=fields, kind=args.kind, split=args.split, seed=seed, limit=args.limit,
                           math_instruction=math_instr, choice_instruction=choice_instr)
        base, j = b.name, 2
        while b.name in names:
            b.name, j = f"{base}-{j}", j + 1
        names.add(b.name)
        benches.append(b)
        print(f"data: {src}: {len(b.items)} items, layout {b.layout.describe()}, scored as {b.kind}", file=sys.stderr)
    out = _output_path(args)

    import torch

    from .config import ModelConfig
    from .modeling import eos_token_ids, load_model_and_tokenizer
    from .prompts import PromptRenderer
    from .rollout import HFGenerator, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(seed)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    mcfg = ModelConfig(
        name_or_path=args.model,
        chat_template="never" if args.no_chat_template else "auto",
        system_prompt=args.system_prompt,
    )
    try:
        model, tokenizer, model_path = load_model_and_tokenizer(mcfg, device=device)
    except UserError as e:
        raise UserError(str(e).replace("model.name_or_path=", "--model ", 1)) from None
    model.eval()
    renderer = PromptRenderer(tokenizer, mcfg.chat_template, mcfg.system_prompt)
    eos = eos_token_ids(model, tokenizer)
    generator = HFGenerator(model, eos, tokenizer.pad_token_id, autocast_dtype=torch.bfloat16 if args.bf16 else None)
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    if args.temperature == 0 and args.n > 1:
        print(f"note: --temperature 0 is greedy decoding; the {args.n} samples of an item are identical", file=sys.stderr)
    math_reward = make_math_reward(timeout=args.verifier_timeout, num_workers=args.verifier_workers)
    rewards = {"math": math_reward, "choice": choice_reward}

    from . import __version__

    report: dict[str, Any] = {
        "repo_rl_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": args.model,
        "model_path": str(model_path),
        "settings": {
            "n": args.n, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "max_new_tokens": args.max_new_tokens, "seed": seed, "batch_size": args.batch_size, "bf16": bool(args.bf16),
            "device": device, "kind": args.kind, "limit": args.limit, "split": args.split, "fields": fields,
            "chat_template": renderer.use_chat, "system_prompt": args.system_prompt,
            "math_instruction": math_instr, "choice_instruction": choice_instr,
            "verifier_timeout": args.verifier_timeout,
        },
        "benchmarks": {},
    }
    try:
        for b in benches:
            comp_file = out.with_name(f"{out.stem}.{b.name}.jsonl")
            report["benchmarks"][b.name] = evaluate_benchmark(
                b, n=args.n, generator=generator, renderer=renderer, tokenizer=tokenizer, params=params,
                rewards=rewards, eos=eos, seed=seed, batch_size=args.batch_size, completions_file=comp_file,
                progress=not args.no_progress,
            )
            report["wall_time_s"] = time.perf_counter() - t_start
            _atomic_write(out, json.dumps(report, indent=2, ensure_ascii=False) + "\n")  # partial results survive a crash
    finally:
        math_reward.close()
    if len(benches) > 1:
        report["average"] = macro_average(report["benchmarks"])
    report["wall_time_s"] = time.perf_counter() - t_start
    _atomic_write(out, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(format_table(report["benchmarks"]))
    print(f"results: {out}", file=sys.stderr)
    return 0
