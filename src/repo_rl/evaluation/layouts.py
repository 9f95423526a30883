"""Benchmark layouts: which columns of a row hold the prompt, the answer, the id, the domain
and the options, detected from the field names of the first row or given with ``--field``.

See the Layouts section of ``docs/EVALUATION.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ..data import get_field  # the dotted-path field reader of the training loader
from ..errors import UserError
from ..rewards import extract_boxed

__all__ = ["FIELD_KEYS", "Layout", "detect_layout", "first_present", "get_field", "parse_field_args", "unknown_layout"]

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

MULTIPLE_CHOICE_LAYOUTS = ("gpqa", "mmlu-pro", "arc", "arc-original")


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
        return self.name in MULTIPLE_CHOICE_LAYOUTS or (self.name == "fields" and self.options is not None)

    def describe(self) -> str:
        parts = [f"{k}={v}" for k in FIELD_KEYS if (v := getattr(self, k))]
        return f"{self.name} ({', '.join(parts)})" if parts else self.name


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


def first_present(row: dict, keys: Sequence[str], want_str: bool = False) -> Optional[str]:
    """The first of ``keys`` (dotted paths) that ``row`` has with a non-None (text, with ``want_str``) value."""
    for k in keys:
        ok, val = get_field(row, k)
        if ok and val is not None and (not want_str or isinstance(val, str)):
            return k
    return None


def unknown_layout(source: str, row: dict, detail: str = "") -> UserError:
    """The one-line error for a row whose layout is not recognised, with the fields it has."""
    found = ", ".join(sorted(map(str, row))) or "none"
    return UserError(
        f"{source}: unknown layout{detail} (fields found: {found}); name the columns with "
        "--field prompt=COLUMN --field answer=COLUMN (add --field options=COLUMN for multiple choice)"
    )


def _fields_layout(row: dict, source: str, fields: dict[str, str]) -> Layout:
    """The ``--field`` mapping, with the keys it leaves out detected as usual."""
    prompt = fields.get("prompt") or first_present(row, PROMPT_KEYS)
    answer = fields.get("answer") or first_present(row, ANSWER_KEYS)
    for key, col in fields.items():
        if not get_field(row, col)[0]:
            raise unknown_layout(source, row, f": --field {key}={col} names a column the first row does not have")
    if prompt is None or answer is None:
        missing = "prompt" if prompt is None else "answer"
        raise unknown_layout(source, row, f": no {missing} column found")
    return Layout(
        "fields",
        prompt=prompt,
        answer=answer,
        id=fields.get("id") or first_present(row, ID_KEYS),
        domain=fields.get("domain") or first_present(row, DOMAIN_KEYS),
        options=fields.get("options"),
    )


def detect_layout(row: Any, source: str, fields: Optional[dict[str, str]] = None) -> Layout:
    """The layout of ``source`` from its first row, or the ``--field`` mapping when given."""
    if not isinstance(row, dict):
        raise UserError(f"{source}: expected rows that are JSON objects, got {type(row).__name__}")
    if fields:
        return _fields_layout(row, source, fields)
    row_id, domain = first_present(row, ID_KEYS), first_present(row, DOMAIN_KEYS)
    keys = set(row)
    if {"Question", "Correct Answer", "Incorrect Answer 1"} <= keys:
        return Layout("gpqa", prompt="Question", answer="Correct Answer", id=row_id, domain=domain)
    choices = row.get("choices")
    if isinstance(choices, dict) and "text" in choices and "label" in choices and "answerKey" in row:
        prompt = first_present(row, PROMPT_KEYS, want_str=True)
        if prompt:
            return Layout("arc", prompt=prompt, answer="answerKey", id=row_id, options="choices")
    question = row.get("question")
    if isinstance(question, dict) and "stem" in question and isinstance(question.get("choices"), list) and "answerKey" in row:
        return Layout("arc-original", prompt="question.stem", answer="answerKey", id=row_id, options="question.choices")
    if isinstance(row.get("options"), list) and ("answer" in row or "answer_index" in row):
        prompt = first_present(row, PROMPT_KEYS, want_str=True)
        if prompt:
            answer = "answer_index" if "answer_index" in row else "answer"
            return Layout("mmlu-pro", prompt=prompt, answer=answer, id=row_id, domain=domain, options="options")
    if isinstance(row.get("prompt"), list) or "reward_model" in row:
        answer = first_present(row, ANSWER_KEYS)
        if answer is None:
            raise unknown_layout(source, row, ": a verl-style row without reward_model.ground_truth or answer")
        return Layout("verl", prompt="prompt", answer=answer, id=row_id, domain=domain)
    prompt = first_present(row, PROMPT_KEYS, want_str=True)
    answer = first_present(row, ANSWER_KEYS)
    if prompt and answer:
        return Layout("math", prompt=prompt, answer=answer, id=row_id, domain=domain)
    if prompt and isinstance(row.get("solution"), str) and extract_boxed(row["solution"]):
        return Layout("math-boxed-solution", prompt=prompt, answer="solution", id=row_id, domain=domain)
    raise unknown_layout(source, row)
