"""Base class and counters shared by the built-in reward functions."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from .extract import completion_text
from .pool import Outcome

__all__ = ["RewardFunction", "RewardStats"]


class RewardStats:
    """Thread-safe lifetime counters of a reward function.

    ``items``: completions scored; ``errors``: items whose verifier raised, crashed or had no
    usable reference answer; ``timeouts``: items that overran the per-item deadline. Consumers
    (the trainer) log the deltas between two :meth:`snapshot` calls.
    """

    __slots__ = ("items", "errors", "timeouts", "_lock")

    def __init__(self) -> None:
        self.items = 0
        self.errors = 0
        self.timeouts = 0
        self._lock = threading.Lock()

    def record(self, items: int = 0, errors: int = 0, timeouts: int = 0) -> None:
        """Add to the counters atomically."""
        with self._lock:
            self.items += items
            self.errors += errors
            self.timeouts += timeouts

    def snapshot(self) -> dict[str, int]:
        """A consistent copy of the counters."""
        with self._lock:
            return {"items": self.items, "errors": self.errors, "timeouts": self.timeouts}

    def reset(self) -> None:
        """Set every counter back to zero."""
        with self._lock:
            self.items = self.errors = self.timeouts = 0

    def __getstate__(self) -> dict[str, int]:
        return self.snapshot()

    def __setstate__(self, state: dict[str, int]) -> None:
        self._lock = threading.Lock()
        self.items = int(state.get("items", 0))
        self.errors = int(state.get("errors", 0))
        self.timeouts = int(state.get("timeouts", 0))

    def __repr__(self) -> str:
        s = self.snapshot()
        return f"RewardStats(items={s['items']}, errors={s['errors']}, timeouts={s['timeouts']})"


class RewardFunction(ABC):
    """A reward callable with TRL's signature ``f(prompts, completions, **columns) -> list[float | None]``.

    Completions may be strings or chat-message lists; the reference answers come from the
    ``answer`` column. Other columns are accepted and ignored. A value is 1.0 (correct), 0.0
    (wrong or no answer found) or None (verifier error or timeout, never silently 0).
    Subclasses implement :meth:`_score`.
    """

    def __init__(self, name: str) -> None:
        self.__name__ = name
        self.stats = RewardStats()

    @abstractmethod
    def _score(self, texts: list[str], golds: list[str | None]) -> list[Outcome]:
        """Score completion texts against reference answers (None: missing), one Outcome each."""

    def __call__(
        self,
        prompts: Sequence[Any] | None = None,
        completions: Sequence[Any] | None = None,
        answer: Sequence[Any] | str | None = None,
        **columns: Any,
    ) -> list[float | None]:
        if completions is None:
            raise TypeError(f"{self.__name__}: missing required argument 'completions'")
        if answer is None:
            raise ValueError(f"{self.__name__}: the reference answers must be passed as the 'answer' column")
        return [float(o.value) if o.ok and o.value is not None else None for o in self.outcomes(completions, answer)]

    def outcomes(self, completions: Sequence[Any], answer: Sequence[Any] | str) -> list[Outcome]:
        """Detailed per-item results (status, value, error message, seconds); updates :attr:`stats`."""
        texts = [completion_text(c) for c in completions]
        answers = [answer] * len(texts) if isinstance(answer, str) else list(answer)
        if len(answers) != len(texts):
            raise ValueError(f"{self.__name__}: got {len(texts)} completions but {len(answers)} answers")
        golds = [None if a is None else str(a) for a in answers]
        outcomes = self._score(texts, golds) if texts else []
        self.stats.record(
            items=len(outcomes),
            errors=sum(o.status == "error" for o in outcomes),
            timeouts=sum(o.status == "timeout" for o in outcomes),
        )
        return outcomes

    def score(self, completion: Any, answer: Any) -> float | None:
        """Score a single completion (convenience wrapper around ``__call__``)."""
        return self(prompts=None, completions=[completion], answer=[answer])[0]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.__name__}>"


class InProcessReward(RewardFunction):
    """A reward scored item by item in this process (cheap, linear-time checks).

    Subclasses implement :meth:`_score_one`; an exception there is an error (None), never 0.
    """

    def _score(self, texts: list[str], golds: list[str | None]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for text, raw_gold in zip(texts, golds):
            try:
                outcomes.append(self._score_one(text, raw_gold))
            except Exception as exc:  # noqa: BLE001 - a scoring bug must surface as None, not 0
                outcomes.append(Outcome("error", None, f"{type(exc).__name__}: {exc}"))
        return outcomes

    @abstractmethod
    def _score_one(self, text: str, raw_gold: str | None) -> Outcome:
        """Score one completion text against one reference answer."""
