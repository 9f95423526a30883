"""Benchmarks: the rows of a source turned into :class:`EvalItem` s (prompt with instruction or
lettered options, gold answer, kind) by :func:`load_benchmark`.

Rows come from :mod:`.readers`, their layout from :mod:`.layouts`; plain rows go through
:func:`repo_rl.data.row_to_example`, so eval items have the prompts, answers and ids the
training loader gives. See ``docs/EVALUATION.md``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import FieldsConfig
from ..data import DataError, Prompt, row_to_example
from ..errors import UserError
from ..rewards import extract_boxed, parse_choice, strip_math_delimiters
from .layouts import Layout, detect_layout, get_field
from .readers import read_rows

__all__ = [
    "CHOICE_INSTRUCTION",
    "KINDS",
    "LETTERS",
    "MATH_INSTRUCTION",
    "Benchmark",
    "EvalItem",
    "benchmark_name",
    "format_choice_prompt",
    "load_benchmark",
    "shuffle_seed",
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

KINDS = ("math", "choice", "judge")
"""How an item is scored: ``math`` (:class:`~repo_rl.rewards.MathReward`) or ``choice`` (option letter)."""

# data_source substrings of multiple-choice sets (verl rows are scored by letter when one matches).
MC_SOURCES = ("gpqa", "mmlu", "arc", "choice", "mcq", "multiple", "commonsense", "hellaswag", "piqa", "obqa")

STREAM_SHUFFLE = 0x5EED02
"""Seed stream of the GPQA option order (first argument after the run seed of ``derive_seed``)."""

# A field path no row has: the expert solution is not needed for evaluation.
_UNUSED = "\x00unused"
# The field an answer built here (a boxed solution, joined final answers) is stored under.
_JOINED = "\x00answer"


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
    """``math``, ``choice`` or ``judge`` (an open answer scored by the judge reward)."""
    domain: Optional[str] = None
    options: Optional[list[str]] = None
    gold_text: Optional[str] = None
    """Multiple choice: the text of the correct option."""


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


def shuffle_seed(seed: int, index: int) -> int:
    """Seed of the option order of the (GPQA) item at row ``index``."""
    from ..engines import derive_seed  # lazy: the engines import torch

    return derive_seed(seed, STREAM_SHUFFLE, index)


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
        random.Random(shuffle_seed(seed, index)).shuffle(order)
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
        if layout.name == "verl" and any(s in (ex.domain or "").lower() for s in MC_SOURCES) and parse_choice(ex.answer):
            kind = "choice"
    gold = ex.answer
    if kind == "choice":
        letter = parse_choice(gold)
        if letter is None:
            raise DataError(f"{where}: answer {gold!r} is not an option letter (A-J), which multiple choice scoring needs")
        gold = letter
    instruction = {"math": math_instruction, "choice": choice_instruction}.get(kind)  # judge: the prompt as it is
    prompt = with_instruction(ex.prompt, instruction) if instruction else ex.prompt
    return EvalItem(index=index, id=ex.id, prompt=prompt, gold=gold, kind=kind, domain=ex.domain)


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
        raise UserError(f"--kind {kind}: expected auto, math, choice or judge")
    rows = read_rows(source, split)
    if not rows:
        raise UserError(f"{source}: no rows")
    layout = detect_layout(rows[0][1], source, fields)
    if layout.multiple_choice and kind in ("math", "judge"):
        raise UserError(f"{source}: --kind {kind} does not apply to the multiple-choice layout {layout.name}")
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
    """The file stem, or the sanitised dataset name (``org/gpqa:diamond`` -> ``org_gpqa_diamond``)."""
    path = Path(source)
    base = path.stem if path.suffix else source
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", base).strip("_") or "data"
