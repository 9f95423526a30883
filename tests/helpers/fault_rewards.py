"""Reward functions for the reliability and fault tests, used through dotted import paths.

Each keeps TRL's signature ``f(prompts, completions, answer, **columns) -> list[float | None]``
and is deterministic in its inputs, so runs that use them stay reproducible.
"""

from __future__ import annotations


def _text(c):
    return c if isinstance(c, str) else c[-1]["content"]


def _contains(c, a) -> float:
    return 1.0 if a in _text(c) else 0.0


def some_none(prompts, completions, answer, **kwargs):
    """A verifier that fails (None) on every third item of a call and scores the rest normally."""
    return [None if i % 3 == 0 else _contains(c, a) for i, (c, a) in enumerate(zip(completions, answer))]


def constant_one(prompts, completions, answer, **kwargs):
    """Every completion is correct: every group has zero reward variance."""
    return [1.0 for _ in completions]


def some_nonfinite(prompts, completions, answer, **kwargs):
    """inf, -inf and NaN on some items (a numerically broken reward), a normal score elsewhere."""
    bad = (float("inf"), float("-inf"), float("nan"))
    return [bad[(i // 5) % 3] if i % 5 == 0 else _contains(c, a) for i, (c, a) in enumerate(zip(completions, answer))]


def not_a_number(prompts, completions, answer, **kwargs):
    """A broken reward that returns strings."""
    return ["high" for _ in completions]


POWER_TOWER = r"\boxed{9^{9^{9^{9}}}}"  # exact evaluation never ends: always a verifier timeout


class AdversarialMath:
    """The built-in math verifier, except that the first completion of every call is replaced
    by a power tower no verifier can finish: each call has at least one timeout (None), and
    the trainer sees the verifier's ``stats`` and ``timeout`` like those of the built-in."""

    def __init__(self) -> None:
        self.__name__ = "adversarial_math"
        self._timeout = 1.0
        self._inner = None

    def _reward(self):
        if self._inner is None:
            from repo_rl.rewards import make_math_reward

            self._inner = make_math_reward(timeout=self._timeout, num_workers=1, name=self.__name__)
        return self._inner

    @property
    def timeout(self) -> float:
        return self._timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._timeout = float(value)
        if self._inner is not None:
            self._inner.timeout = value

    @property
    def stats(self):
        return self._reward().stats

    def __call__(self, prompts, completions, answer, **kwargs):
        texts = [POWER_TOWER if i == 0 else _text(c) for i, c in enumerate(completions)]
        return self._reward()(prompts, texts, answer=answer)

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None


adversarial_math = AdversarialMath()


def raises_on_batches(prompts, completions, answer, **kwargs):
    """Scores one completion at a time only: a call on several raises (as a function written for
    single items does), which the guard absorbs by retrying item by item."""
    if len(completions) > 1:
        raise ValueError(f"expected one completion, got {len(completions)}")
    return [_contains(completions[0], answer[0])]
