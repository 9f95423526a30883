"""Training and evaluation examples: schema, loaders and row-numbered validation.

Supported sources: JSONL, JSON (a list of rows), Parquet, a ``datasets`` name, and
``toyworld:<split>`` for the embedded toy world. Field names are configurable and may be
dotted paths into nested columns (``reward_model.ground_truth`` for the verl/LUFFY layout).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

Prompt = Union[str, list[dict[str, str]]]

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


class DataError(ValueError):
    """A data file or row is invalid. The message names the file, row and field."""


@dataclass
class Example:
    prompt: Prompt
    """Plain text or a list of chat messages ``{"role", "content"}``."""
    answer: str
    """Reference answer checked by the verifier."""
    solution: Optional[str] = None
    """Expert solution (off-policy knowledge); None when the row has none."""
    domain: Optional[str] = None
    id: str = ""
    extra: Optional[dict[str, Any]] = None
    """Other columns of the row, passed to custom reward functions as keyword columns."""

    @property
    def question_text(self) -> str:
        """The prompt as text: the last user message of a chat prompt."""
        if isinstance(self.prompt, str):
            return self.prompt
        users = [m["content"] for m in self.prompt if m.get("role") == "user"]
        return users[-1] if users else self.prompt[-1]["content"]


@dataclass
class LoadReport:
    source: str
    rows: int = 0
    loaded: int = 0
    bad: int = 0
    without_solution: int = 0
    first_errors: list[str] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.first_errors is None:
            self.first_errors = []


# Layouts recognised when the configured field is absent from a row.
_FALLBACKS = {
    "answer": ("reward_model.ground_truth", "ground_truth", "gold", "target_answer"),
    "solution": ("target", "expert_solution", "reference_solution"),
    "domain": ("data_source",),
    "id": ("extra_info.index", "unique_id", "idx"),
}


def get_field(row: dict, path: str) -> tuple[bool, Any]:
    cur: Any = row
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            return False, None
    return True, cur


def as_text(value: Any) -> Optional[str]:
    """Answers/solutions may be numbers, strings, or (LUFFY ``target``) chat messages."""
    if value is None:
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN / Infinity literals or 1e999: not an answer
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n".join(str(m["content"]) for m in value)
    if isinstance(value, list) and len(value) == 1:
        return as_text(value[0])
    return None


def _check_messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    if not value:
        raise DataError(f"{where}: field {field!r} is an empty list of messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: field {field!r} message {j} must be a mapping with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in CHAT_ROLES:
            raise DataError(
                f"{where}: field {field!r} message {j} has unknown role {role!r} (expected one of {', '.join(CHAT_ROLES)})"
            )
        if not isinstance(content, str):
            raise DataError(f"{where}: field {field!r} message {j} content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in out):
        raise DataError(f"{where}: field {field!r} has no user message")
    if not any(m["content"].strip() for m in out if m["role"] == "user"):
        raise DataError(f"{where}: field {field!r} user message is empty")
    return out


def _unencodable(value: Any, path: str = "") -> Optional[str]:
    """The dotted path of the first string (key or value) that cannot be written as UTF-8, or None.

    JSON may spell lone surrogates (``"\\ud800"``); Python decodes them, but tokenizers and
    every UTF-8 log file then fail on them.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "<row>"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and _unencodable(k) is not None:
                return path or "<key>"
            found = _unencodable(v, sub)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _unencodable(v, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def row_to_example(row: Any, fields: Any, where: str) -> Example:
    """Validate one row and convert it to an Example. Raises DataError naming ``where`` and the field."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    bad = _unencodable(row)
    if bad is not None:
        raise DataError(f"{where}: field {bad!r} is not valid Unicode text (an unpaired surrogate escape such as \\ud800)")

    def lookup(name: str) -> tuple[bool, Any, str]:
        path = getattr(fields, name)
        ok, val = get_field(row, path)
        if ok or path != name:
            return ok, val, path
        for alt in _FALLBACKS.get(name, ()):
            ok, val = get_field(row, alt)
            if ok:
                return ok, val, alt
        return False, None, path

    ok, prompt, pkey = lookup("prompt")
    if not ok:
        raise DataError(f"{where}: missing field {pkey!r} (the prompt; set data.fields.prompt to use another column)")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: field {pkey!r} is empty")
    elif isinstance(prompt, list):
        prompt = _check_messages(prompt, where, pkey)
    else:
        raise DataError(f"{where}: field {pkey!r} must be a string or a list of chat messages, got {type(prompt).__name__}")

    ok, answer, akey = lookup("answer")
    if not ok:
        raise DataError(f"{where}: missing field {akey!r} (the reference answer; set data.fields.answer to use another column)")
    answer_text = as_text(answer)
    if answer_text is None:
        raise DataError(f"{where}: field {akey!r} must be a string or a number, got {type(answer).__name__}")
    if not answer_text.strip():
        raise DataError(f"{where}: field {akey!r} is empty")

    ok, solution, skey = lookup("solution")
    sol_text = None
    if ok and solution is not None:
        sol_text = as_text(solution)
        if sol_text is None:
            raise DataError(f"{where}: field {skey!r} must be a string or chat messages, got {type(solution).__name__}")
        if not sol_text.strip():
            sol_text = None

    ok, domain, _ = lookup("domain")
    ok_id, rid, ikey = lookup("id")
    if ok_id and rid is not None and not isinstance(rid, (str, int)):
        raise DataError(f"{where}: field {ikey!r} must be a string or an integer, got {type(rid).__name__}")
    used = {pkey, akey, skey}
    extra = {k: v for k, v in row.items() if k not in used}
    return Example(
        prompt=prompt,
        answer=answer_text.strip(),
        solution=sol_text,
        domain=None if domain is None else str(domain),
        id=str(rid) if ok_id and rid is not None else where,
        extra=extra or None,
    )


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, DataError(f"{where}: not valid UTF-8 (byte {e.start})")
                continue
            if not text.strip():
                continue
            text = text.rstrip("\r\n")  # an error at the line's end is not "line 2, column 1"
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                end = " (the end of the line: a closing brace, bracket or quote missing?)" if e.pos >= len(text.rstrip()) else ""
                yield where, DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}{end})")
            except (ValueError, RecursionError) as e:  # e.g. an integer beyond Python's digit limit
                yield where, DataError(f"{where}: invalid JSON ({str(e)[:120]})")


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: invalid JSON ({str(e)[:120]})") from None
    if isinstance(data, dict):
        for key in ("data", "rows", "examples", "test", "train"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows (or JSONL, one object per line)")
    for i, row in enumerate(data):
        yield f"{path}[{i}]", row


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for bad files
        raise DataError(f"{path}: cannot read as Parquet ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}#row{i}", row


def _iter_hf(name: str, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise DataError(f"{name}: not a readable file or datasets name ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    for i, row in enumerate(ds):
        yield f"{name}[{split}][{i}]", row


def iter_rows(source: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    """Yield ``(where, row_or_DataError)`` for a file path or a datasets name."""
    if source.startswith("toyworld:"):
        raise DataError(f"{source}: toyworld sources are resolved by the trainer, not read as files")
    path = Path(source)
    if path.is_dir():
        raise DataError(f"{source}: is a directory, expected a JSONL, JSON or Parquet file")
    if path.exists():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            yield from _iter_jsonl(path)
        elif suffix == ".json":
            yield from _iter_json(path)
        elif suffix in (".parquet", ".pq"):
            yield from _iter_parquet(path)
        else:
            raise DataError(f"{source}: unknown file type {suffix!r} (expected .jsonl, .json or .parquet)")
        return
    if any(source.endswith(s) for s in (".jsonl", ".json", ".parquet", ".ndjson", ".pq")) or "/" in source and source.startswith((".", "/")):
        raise DataError(f"{source}: file not found")
    yield from _iter_hf(source, split)


def load_examples(
    sources: Union[str, list[str]],
    fields: Any,
    on_bad_row: str = "error",
    split: str = "train",
    reports: Optional[list[LoadReport]] = None,
) -> list[Example]:
    """Load and validate examples from one or more sources.

    With ``on_bad_row="error"`` the first bad row raises :class:`DataError`; with ``skip``
    bad rows are dropped, counted in the :class:`LoadReport` and the first few kept as
    messages. A file that yields no valid row is always an error.
    """
    srcs = [sources] if isinstance(sources, str) else list(sources)
    out: list[Example] = []
    seen_ids: dict[str, str] = {}
    for src in srcs:
        rep = LoadReport(source=src)
        for where, row in iter_rows(src, split):
            rep.rows += 1
            try:
                if isinstance(row, DataError):
                    raise row
                ex = row_to_example(row, fields, where)
                if ex.id in seen_ids:
                    raise DataError(f"{where}: duplicate id {ex.id!r} (first seen at {seen_ids[ex.id]})")
                seen_ids[ex.id] = where
            except DataError as e:
                if on_bad_row == "error":
                    raise
                rep.bad += 1
                if len(rep.first_errors) < 5:
                    rep.first_errors.append(str(e))
                continue
            rep.loaded += 1
            rep.without_solution += ex.solution is None
            out.append(ex)
        if rep.loaded == 0:
            detail = f"; first error: {rep.first_errors[0]}" if rep.first_errors else ""
            raise DataError(f"{src}: no valid rows ({rep.rows} read, {rep.bad} bad){detail}")
        if reports is not None:
            reports.append(rep)
    return out


class PromptSampler:
    """Deterministic epoch-wise shuffled order over examples, with a resumable position.

    The order of epoch ``e`` is a permutation seeded by ``(seed, e)``, so the state is just
    ``(epoch, index)`` and resuming at an epoch boundary is exact.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        if n <= 0:
            raise ValueError("no examples to sample from")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._make_order(0)

    def _make_order(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.index >= self.n:
                self.epoch += 1
                self.index = 0
                self._order = self._make_order(self.epoch)
            out.append(self._order[self.index])
            self.index += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed") != self.seed:
            raise DataError(
                f"checkpoint was taken with train.seed={state.get('seed')}, the config now says {self.seed}; "
                "resume with the same seed"
            )
        if state.get("n") != self.n:
            raise DataError(
                f"checkpoint was taken with {state.get('n')} training examples, the data now has {self.n}; "
                "resume with the same data.train_files"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._make_order(self.epoch)
