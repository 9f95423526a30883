"""Math answer-equivalence reward backed by math-verify, run in a :class:`VerifierPool`."""

from __future__ import annotations

import os
import threading
from typing import Any

from .base import RewardFunction
from .extract import extract_boxed, strip_math_delimiters
from .pool import Outcome, VerifierPool

__all__ = ["MathReward", "make_math_reward", "normalize_gold"]

_TASK = "repo_rl.rewards._worker:verify_math"
_PRELOAD = ("math_verify", "repo_rl.rewards._worker")


def _default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def normalize_gold(answer: str) -> str:
    """Reduce a reference answer to bare LaTeX: strip ``$..$``-style delimiters and a ``\\boxed{}``."""
    s = strip_math_delimiters(answer)
    boxed = extract_boxed(s)
    if boxed:
        s = strip_math_delimiters(boxed)
    return s


def _canonical(s: str) -> str:
    """Whitespace-free form used by the in-process fast path (exact matches only)."""
    s = "".join(strip_math_delimiters(s).split())
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


class MathReward(RewardFunction):
    """1.0 when the completion's final answer is mathematically equivalent to ``answer``.

    The answer is the content of the last ``\\boxed{}``/``\\fbox{}``; without one, math-verify's
    own LaTeX/expression extraction runs over the whole completion (``strict``: it scores 0). Parsing and comparison run
    in worker processes with a hard per-item ``timeout``; a timeout or a verifier exception
    gives None and is counted in :attr:`stats`. A prediction that equals the reference
    character for character (ignoring whitespace) is accepted without a round trip.

    Args:
        timeout: per-item deadline in seconds (settable later through ``.timeout``).
        num_workers: worker processes of the private pool (default: 2, or 1 on a single CPU;
            ignored when ``pool`` is given).
        pool: a shared :class:`VerifierPool` to use instead of a private one.
        name: the ``__name__`` reported to loggers.
    """

    task: str = _TASK
    """``module:function`` run in the workers as ``task(prediction, is_boxed, gold) -> float``."""

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        num_workers: int | None = None,
        pool: VerifierPool | None = None,
        name: str = "math_reward",
        strict: bool = False,
    ) -> None:
        super().__init__(name)
        self.strict = bool(strict)
        """Only the last ``\\boxed{}`` answer counts: a completion without one scores 0 (no extraction
        from free text). The built-in ``math_strict``."""
        self._pool = pool
        self._owns_pool = pool is None
        self._pool_lock = threading.Lock()
        self._num_workers = 1
        self.num_workers = _default_workers() if num_workers is None else num_workers
        self._timeout = 5.0
        self.timeout = timeout

    @property
    def num_workers(self) -> int:
        """Worker processes of the private pool (changes apply to the next call)."""
        return self._num_workers

    @num_workers.setter
    def num_workers(self, value: int) -> None:
        if int(value) < 1:
            raise ValueError(f"num_workers must be >= 1, got {value}")
        self._num_workers = int(value)
        if self._owns_pool and self._pool is not None:
            self._pool.num_workers = self._num_workers

    @property
    def timeout(self) -> float:
        """Per-item verification deadline in seconds."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        value = float(value)
        if not 0 < value < float("inf"):
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {value}")
        self._timeout = value

    @property
    def pool(self) -> VerifierPool:
        """The worker pool, created on first use."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = VerifierPool(self._num_workers, self._timeout, preload=_PRELOAD)
            return self._pool

    def close(self) -> None:
        """Stop the worker processes of a private pool (they restart on the next call)."""
        if self._owns_pool and self._pool is not None:
            self._pool.close()

    def _score(self, texts: list[str], golds: list[str | None]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(texts)
        tasks: list[tuple[str, bool, str]] = []
        where: list[int] = []
        for i, (text, raw_gold) in enumerate(zip(texts, golds)):
            gold = normalize_gold(raw_gold) if raw_gold is not None else ""
            if not gold:
                outcomes[i] = Outcome("error", None, "missing or empty reference answer")
                continue
            boxed = extract_boxed(text)
            if boxed is not None:
                if not boxed:
                    outcomes[i] = Outcome("ok", 0.0)
                    continue
                if _canonical(boxed) == _canonical(gold):
                    outcomes[i] = Outcome("ok", 1.0)
                    continue
                tasks.append((boxed, True, gold))
            else:
                if self.strict or not text.strip():
                    outcomes[i] = Outcome("ok", 0.0)
                    continue
                tasks.append((text, False, gold))
            where.append(i)
        if tasks:
            for i, outcome in zip(where, self.pool.run(self.task, tasks, timeout=self._timeout)):
                outcomes[i] = outcome
        return [o if o is not None else Outcome("error", None, "not scored") for o in outcomes]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_pool_lock", None)
        if self._owns_pool:
            state["_pool"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pool_lock = threading.Lock()


def make_math_reward(
    *,
    timeout: float = 5.0,
    num_workers: int | None = None,
    pool: VerifierPool | None = None,
    name: str = "math_reward",
    strict: bool = False,
) -> MathReward:
    """Build a :class:`MathReward` with its own settings (and its own pool unless ``pool`` is given;
    ``strict``: the last boxed answer only)."""
    return MathReward(timeout=timeout, num_workers=num_workers, pool=pool, name=name, strict=strict)
