"""Text helpers shared by the reward functions: boxed-answer extraction and completion text."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["completion_text", "end_at_answer", "end_of_last_box", "extract_boxed", "strip_math_delimiters"]

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _brace_pairs(text: str) -> dict[int, int]:
    """Map the index of every balanced ``{`` to the index just past its ``}`` (one linear pass).

    Escaped characters (``\\{``, ``\\}``, ``\\\\``) do not count as grouping braces.
    """
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i + 1
        i += 1
    return pairs


def _box_argument(text: str, pos: int, stop: int, pairs: dict[int, int]) -> tuple[int, int, int] | None:
    """Locate the argument of a ``\\boxed`` whose name ends at ``pos`` (searching before ``stop``).

    Returns ``(content_start, content_end, end_of_box)`` or None when there is no complete argument.
    """
    i = pos
    while i < stop and text[i] in " \t\r\n":
        i += 1
    if i >= stop:
        return None
    if text[i] == "{":
        end = pairs.get(i)
        if end is None or end > stop:
            return None
        return i + 1, end - 1, end
    if i == pos:
        return None
    # ``\\boxed 5$``: an unbraced argument runs to the next delimiter or whitespace.
    j = i
    while j < stop and text[j] not in "$ \t\r\n":
        j += 1
    return i, j, j


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def extract_boxed(text: str) -> str | None:
    """Return the stripped content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Nested braces are handled, whitespace between ``\\boxed`` and ``{`` is allowed, and a
    box whose content is itself a single box is unwrapped. A truncated (unclosed) box is
    skipped. Returns None when there is no complete box. Runs in linear time.
    """
    if not isinstance(text, str) or "\\" not in text:
        return None
    pairs: dict[int, int] | None = None
    span: tuple[int, int] | None = None
    pos = 0
    n = len(text)
    while True:
        m = _BOX_RE.search(text, pos)
        if m is None:
            break
        if pairs is None:
            pairs = _brace_pairs(text)
        arg = _box_argument(text, m.end(), n, pairs)
        if arg is None:
            pos = m.end()
            continue
        span, pos = (arg[0], arg[1]), arg[2]
    if span is None or pairs is None:
        return None
    start, end = _strip_span(text, *span)
    while True:
        m = _BOX_RE.match(text, start, end)
        if m is None:
            break
        arg = _box_argument(text, m.end(), end, pairs)
        if arg is None or _strip_span(text, arg[2], end)[0] != end:
            break
        start, end = _strip_span(text, arg[0], arg[1])
    return text[start:end]


def end_of_last_box(text: str) -> int | None:
    """Index just past the last complete ``\\boxed{...}`` (or ``\\fbox``) of ``text``, or None without one."""
    if not isinstance(text, str) or "\\" not in text:
        return None
    pairs: dict[int, int] | None = None
    end = None
    pos = 0
    while True:
        m = _BOX_RE.search(text, pos)
        if m is None:
            return end
        if pairs is None:
            pairs = _brace_pairs(text)
        arg = _box_argument(text, m.end(), len(text), pairs)
        if arg is None:
            pos = m.end()
            continue
        end, pos = arg[2], arg[2]


_ANSWER_TAIL = re.compile(r"[ \t]*(?:\$\$|\$|\\\]|\\\))?[ \t]*[.!]?")


def end_at_answer(text: str) -> str:
    """``text`` up to its last complete boxed answer, with the closing ``$``/``\\]`` and full stop
    that follow it on its line; unchanged without a box."""
    end = end_of_last_box(text)
    if end is None:
        return text
    tail = _ANSWER_TAIL.match(text, end)
    return text[: tail.end() if tail else end].rstrip()


def strip_math_delimiters(text: str) -> str:
    """Strip surrounding whitespace and one or more layers of ``$..$``, ``$$..$$``, ``\\(..\\)``, ``\\[..\\]``."""
    s = text.strip()
    changed = True
    while changed and s:
        changed = False
        for left, right in _DELIMITERS:
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                inner = s[len(left) : len(s) - len(right)]
                if left == "$" and "$" in inner:
                    continue
                s = inner.strip()
                changed = True
                break
    return s


def _content_to_text(content: Any) -> str:
    """Flatten a message ``content`` (string or list of typed parts) into text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return str(content)


def completion_text(completion: Any) -> str:
    """Return the text of a completion given as a string or a list of chat messages.

    For a message list (TRL conversational format) the contents of the assistant messages
    are joined; if there is no assistant message, the last message is used.
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return _content_to_text(completion.get("content"))
    if isinstance(completion, Sequence):
        messages = [m for m in completion if isinstance(m, Mapping)]
        if not messages:
            return "".join(str(m) for m in completion)
        assistant = [m for m in messages if m.get("role") == "assistant"]
        chosen = assistant if assistant else messages[-1:]
        return "\n".join(_content_to_text(m.get("content")) for m in chosen)
    return str(completion)
