"""Numeric-answer reward: compare the final number of a completion to the reference within a tolerance."""

from __future__ import annotations

import math
import re

from .base import InProcessReward
from .extract import extract_boxed, strip_math_delimiters
from .pool import Outcome

__all__ = ["NumericReward", "extract_number", "make_numeric_reward", "parse_number"]

_SIGN = r"(?:(?<![\w.)\]}])[-−–])?"
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_NUM = rf"{_SIGN}(?:{_UNSIGNED})"
_TOKEN_RE = re.compile(
    rf"(?P<fsign>{_SIGN})\\[dt]?frac\s*\{{\s*(?P<fnum>{_NUM})\s*\}}\s*\{{\s*(?P<fden>{_NUM})\s*\}}"
    rf"|(?P<num>{_NUM})(?:\s*/\s*(?P<den>{_UNSIGNED}))?"
)
_TEXT_CMD_RE = re.compile(r"\\(?:text|mathrm|textbf|mathbf|textrm|mbox)\s*\{([^{}]*)\}")
_DROP_RE = re.compile(r"\\[,;:! ]|\\left|\\right|\\\$|\\%|[$%\s]|\^\{?\\circ\}?|°")


def _to_float(token: str) -> float:
    return float(token.replace(",", "").replace("−", "-").replace("–", "-"))


def _token_value(m: re.Match[str]) -> float | None:
    try:
        if m.group("fnum") is not None:
            num, den = _to_float(m.group("fnum")), _to_float(m.group("fden"))
            sign = -1.0 if m.group("fsign") else 1.0
        else:
            num = _to_float(m.group("num"))
            den = _to_float(m.group("den")) if m.group("den") is not None else 1.0
            sign = 1.0
    except ValueError:
        return None
    if den == 0:
        return None
    value = sign * num / den
    return value if math.isfinite(value) else None


def parse_number(text: str) -> float | None:
    """Value of ``text`` if it is (after removing units, ``$``, ``%``, spacing macros) one number.

    Accepts integers, decimals, thousands separators, negatives, ``a/b`` and ``\\frac{a}{b}``.
    """
    s = strip_math_delimiters(text)
    s = _TEXT_CMD_RE.sub("", s)
    s = _DROP_RE.sub("", s)
    if not s:
        return None
    m = _TOKEN_RE.fullmatch(s)
    return _token_value(m) if m else None


def extract_number(text: str) -> float | None:
    """The answer number of a completion: the last boxed answer if any, else the last number in the text."""
    boxed = extract_boxed(text)
    if boxed is not None:
        value = parse_number(boxed)
        if value is not None:
            return value
        text = boxed
    last: float | None = None
    for m in _TOKEN_RE.finditer(text):
        last = _token_value(m)
    return last


class NumericReward(InProcessReward):
    """1.0 when the completion's final number equals the reference number within tolerance.

    Runs in-process (extraction is linear-time regex work). ``rel_tol``/``abs_tol`` follow
    :func:`math.isclose`. A reference answer without a number is counted as an error (None).
    Percent signs are ignored: "50%" reads as 50.
    """

    def __init__(self, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9, name: str = "numeric_reward", strict: bool = False) -> None:
        super().__init__(name)
        self.strict = bool(strict)
        """Only the last ``\\boxed{}`` answer counts, read as one number; no fallback to the last number
        of the text (the built-in ``numeric_strict``)."""
        if rel_tol < 0 or abs_tol < 0:
            raise ValueError("rel_tol and abs_tol must be >= 0")
        self.rel_tol = float(rel_tol)
        self.abs_tol = float(abs_tol)

    def _score_one(self, text: str, raw_gold: str | None) -> Outcome:
        gold = None if raw_gold is None else extract_number(raw_gold)
        if gold is None:
            return Outcome("error", None, "reference answer has no number")
        if self.strict:
            boxed = extract_boxed(text)
            pred = None if boxed is None else parse_number(boxed)
        else:
            pred = extract_number(text)
        ok = pred is not None and math.isclose(pred, gold, rel_tol=self.rel_tol, abs_tol=self.abs_tol)
        return Outcome("ok", 1.0 if ok else 0.0)


def make_numeric_reward(*, rel_tol: float = 1e-6, abs_tol: float = 1e-9, name: str = "numeric_reward",
                        strict: bool = False) -> NumericReward:
    """Build a :class:`NumericReward` with custom tolerances (``strict``: the boxed answer only)."""
    return NumericReward(rel_tol=rel_tol, abs_tol=abs_tol, name=name, strict=strict)
