"""Verifiable reward functions with TRL's signature ``f(prompts, completions, **columns) -> list[float | None]``.

Built-ins: :data:`math_reward` (math-verify equivalence, run in worker processes with a hard
per-item timeout), :data:`numeric_reward` (last number within a tolerance) and
:data:`choice_reward` (multiple-choice letter); :data:`math_strict_reward` and
:data:`numeric_strict_reward` (``math_strict``, ``numeric_strict``) read the last ``\\boxed{}``
answer only, with no extraction from free text (docs/EVALUATION.md lists what each accepts). Each returns 1.0 / 0.0 per completion, or None
when the verifier errored or timed out, and keeps counters in ``.stats``.

:func:`load_reward` resolves a built-in name (``"math"``, ``"numeric"``, ``"choice"``, or one
added with :func:`register_reward`) or a ``"pkg.mod:func"`` import path.
"""

from __future__ import annotations

from .base import RewardFunction, RewardStats
from .choice import ChoiceReward, extract_choice, make_choice_reward, parse_choice
from .extract import completion_text, extract_boxed, strip_math_delimiters
from .math_verifier import MathReward, make_math_reward, normalize_gold
from .numeric import NumericReward, extract_number, make_numeric_reward, parse_number
from .pool import Outcome, VerifierPool
from .registry import RewardSpecError, available_rewards, load_reward, register_reward

math_reward = MathReward()
numeric_reward = NumericReward()
choice_reward = ChoiceReward()
math_strict_reward = MathReward(strict=True, name="math_strict_reward")
numeric_strict_reward = NumericReward(strict=True, name="numeric_strict_reward")

register_reward("math", math_reward)
register_reward("numeric", numeric_reward)
register_reward("choice", choice_reward)
register_reward("math_strict", math_strict_reward)
register_reward("numeric_strict", numeric_strict_reward)

__all__ = [
    "ChoiceReward",
    "MathReward",
    "NumericReward",
    "Outcome",
    "RewardFunction",
    "RewardSpecError",
    "RewardStats",
    "VerifierPool",
    "available_rewards",
    "choice_reward",
    "completion_text",
    "extract_boxed",
    "extract_choice",
    "extract_number",
    "load_reward",
    "make_choice_reward",
    "make_math_reward",
    "make_numeric_reward",
    "math_reward",
    "math_strict_reward",
    "normalize_gold",
    "numeric_reward",
    "numeric_strict_reward",
    "parse_choice",
    "parse_number",
    "register_reward",
    "strip_math_delimiters",
]
