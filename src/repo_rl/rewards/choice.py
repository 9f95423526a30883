"""Multiple-choice reward: compare the chosen option letter (A-J by default) with the reference letter."""

from __future__ import annotations

import re
import string

from .base import InProcessReward
from .extract import extract_boxed, strip_math_delimiters
from .pool import Outcome

__all__ = ["ChoiceReward", "extract_choice", "make_choice_reward", "parse_choice"]

_DEFAULT_LETTERS = "ABCDEFGHIJ"
_WRAPPER_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textrm|mbox)\s*\{([^{}]*)\}")


class _Patterns:
    """Compiled extraction patterns for one set of option letters."""

    def __init__(self, letters: str) -> None:
        up = re.escape(letters.upper())
        low = re.escape(letters.lower())
        self.letters = letters.upper()
        # A whole answer string: "C", "(C)", "[c]", "C. text", "C) text", "Option C".
        self.whole = re.compile(
            rf"^\s*(?:(?:option|choice)\s*)?[\(\[]?\s*([{up}{low}])\s*[\)\]]?(?:[.:)\]]|\s|$)", re.IGNORECASE
        )
        letter = rf"(?:\(\s*([{up}{low}])\s*\)|([{up}])(?![\w]))"
        # "answer is (C)", "Answer: C", "the correct option is **B**", "final answer: C".
        self.anchored = re.compile(
            rf"(?i:answer|option|choice)\s*(?:(?i:is)\s*)?:?\s*(?:(?i:option|choice)\s*)?[*_\s]*{letter}"
        )
        # "**C**", "**(C)**", "**C. Paris**".
        self.bold = re.compile(rf"\*\*\s*\(?([{up}])\)?(?:[.:)][^*\n]*)?\s*\*\*")
        # A standalone letter at the very end: "... so the choice is C." / "(B)".
        self.final = re.compile(rf"(?:^|[\s\[(*:])\(?([{up}])\)?[\s.*)\]!]*$")


def _first(m: re.Match[str] | None) -> str | None:
    if m is None:
        return None
    return next((g for g in m.groups() if g), None)


def _last(pattern: re.Pattern[str], text: str) -> str | None:
    found: str | None = None
    for m in pattern.finditer(text):
        found = _first(m) or found
    return found


def _unwrap(text: str) -> str:
    s = strip_math_delimiters(text)
    boxed = extract_boxed(s)
    if boxed:
        s = boxed
    for _ in range(3):
        s = _WRAPPER_RE.sub(r"\1", s)
    return strip_math_delimiters(s)


_PATTERNS: dict[str, _Patterns] = {}


def _patterns(letters: str) -> _Patterns:
    key = letters.upper()
    if key not in _PATTERNS:
        _PATTERNS[key] = _Patterns(key)
    return _PATTERNS[key]


def parse_choice(answer: str, letters: str = _DEFAULT_LETTERS) -> str | None:
    """The option letter of a reference answer such as "C", "(C)", "C. Paris" or "\\boxed{C}" (uppercase)."""
    found = _first(_patterns(letters).whole.match(_unwrap(answer)))
    return found.upper() if found else None


def extract_choice(text: str, letters: str = _DEFAULT_LETTERS) -> str | None:
    """The option letter a completion settles on, or None.

    Tried in order: the last ``\\boxed{}``; the last "answer is (C)" / "Answer: C"; the last
    bold "**C**"; a standalone letter ending the text.
    """
    p = _patterns(letters)
    boxed = extract_boxed(text)
    if boxed:
        found = _first(p.whole.match(_unwrap(boxed)))
        if found:
            return found.upper()
    for pattern in (p.anchored, p.bold):
        found = _last(pattern, text)
        if found:
            return found.upper()
    found = _first(p.final.search(text.rstrip()))
    return found.upper() if found else None


class ChoiceReward(InProcessReward):
    """1.0 when the completion's chosen letter equals the reference letter, else 0.0.

    Runs in-process. A reference answer that is not an option letter counts as an error (None).
    """

    def __init__(self, *, letters: str = _DEFAULT_LETTERS, name: str = "choice_reward") -> None:
        super().__init__(name)
        letters = letters.upper()
        if not letters or any(c not in string.ascii_uppercase for c in letters) or len(set(letters)) != len(letters):
            raise ValueError(f"letters must be distinct ASCII letters, got {letters!r}")
        self.letters = letters

    def _score_one(self, text: str, raw_gold: str | None) -> Outcome:
        gold = None if raw_gold is None else parse_choice(raw_gold, self.letters)
        if gold is None:
            return Outcome("error", None, "reference answer is not an option letter")
        pred = extract_choice(text, self.letters)
        return Outcome("ok", 1.0 if pred == gold else 0.0)


def make_choice_reward(*, letters: str = _DEFAULT_LETTERS, name: str = "choice_reward") -> ChoiceReward:
    """Build a :class:`ChoiceReward` for a custom set of option letters."""
    return ChoiceReward(letters=letters, name=name)
