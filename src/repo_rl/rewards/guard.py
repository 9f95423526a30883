"""Guards for reward functions that are not repo-rl's own (``reward.funcs: [pkg.mod:fn]``).

The built-in verifiers bound their own time (worker processes, a per-item deadline) and never
raise on a bad completion. A user function is wrapped in :class:`GuardedReward`, which gives it
the same guarantees:

* **Time.** A call on ``N`` completions gets ``N x reward.timeout`` seconds (the built-ins'
  per-item deadline, summed over the batch the function is called on); a retry on one
  completion gets ``reward.timeout``. A function named by an import path (``pkg.mod:fn``, the
  config's only way) runs in a worker process of its own (a :class:`~.pool.VerifierPool` with
  one worker) that re-imports it by that path; past the deadline the process is killed and
  replaced, and every item of the call is None, counted in ``rewards/verifier_timeouts``. The
  process is a fresh interpreter with the trainer's ``sys.path``; state kept in the module is
  the worker's own, and the module is imported once more there. A callable with no import
  path (a lambda or closure given to :func:`~.registry.register_reward`), one of ``__main__``,
  or one marked ``fn.in_process = True`` (e.g. it shares a model loaded in the trainer) runs in
  a daemon thread instead: past the deadline the call is abandoned (a thread cannot be
  stopped, so it may still run, and until it returns later calls are skipped and counted as
  timeouts) and a warning says so once. A callable that bounds its own time, like the
  built-ins (it has ``timeout`` and ``stats.snapshot()``), is called directly.
* **Exceptions.** A call that raises is retried one completion at a time to find the items
  that fail: those are None and counted in ``rewards/verifier_errors`` (a warning says so
  once); the others keep their reward. A function that raises on every completion of
  ``max_failed_calls`` (3) consecutive calls stops the run: :class:`~repo_rl.errors.TrainingError`,
  one line naming the function and the last exception. A worker process that dies during a
  call (``os._exit``, a segfault) counts the call's items as errors, without retries.
* **Return values** (:func:`coerce_rewards`). A list or tuple (or a 1-D numpy array or torch
  tensor) with one value per completion. A value is None (no reward: left out of the loss), an
  ``int``/``float``, a ``bool`` (``True`` is 1.0: TRL scores a list of bools the same way), a
  numpy scalar or a 0-d numpy array / torch tensor. Anything else (a dict, None or a string
  instead of the list, a string or a nested list as a value, a wrong length) breaks the
  contract: the run stops with one line naming the function, what it returned (type and a
  short repr) and what is expected. Range checks (non-finite, beyond float32) are the
  scorer's (:mod:`.scorer`).
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import TrainingError
from ._worker import describe_exception
from .pool import VerifierPool

__all__ = [
    "FLOAT32_MAX",
    "GuardedReward",
    "RewardContractError",
    "coerce_rewards",
    "is_self_guarded",
]

logger = logging.getLogger("repo_rl.rewards")

FLOAT32_MAX = 3.4028234663852886e38
"""Largest finite float32: rewards are cast to float32 for the advantages."""

TASK = "repo_rl.rewards.guard:worker_call"
_EXPECTED_VALUE = "a number (int, float, bool, numpy scalar or 0-d tensor) or None"
_STARTUP_FAILED = "verifier workers failed to start"

Mode = Literal["process", "thread", "direct"]


class RewardContractError(ValueError):
    """A reward function's output is not one number or None per completion (message: one line,
    starting with the verb, e.g. ``returned dict ({'a': 1}); expected ...``)."""


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - repr of exotic objects can fail
        text = object.__repr__(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _what(value: Any) -> str:
    """``None`` or ``<type> (<short repr>)``, with the type's package for non-builtins."""
    if value is None:
        return "None"
    t = type(value)
    module = getattr(t, "__module__", "") or ""
    name = t.__name__ if module == "builtins" else f"{module.split('.')[0]}.{t.__name__}"
    return f"{name} ({_short(value)})"


class _NotANumber(Exception):
    pass


def _scalar(value: Any) -> float | None:
    """One reward value as a float (None stays None); raises _NotANumber otherwise."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        raise _NotANumber
    if isinstance(value, numbers.Real):  # int, float, bool, Fraction, numpy floating/integer
        try:
            return float(value)
        except OverflowError:  # an int beyond float: out of range, like 1e39
            return math.inf if value > 0 else -math.inf
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        # numpy scalars (np.bool_ too), 0-d numpy arrays and 0-d torch tensors
        try:
            item = value.item()
        except Exception:  # noqa: BLE001
            raise _NotANumber from None
        if isinstance(item, numbers.Real) and not isinstance(item, (str, bytes)):
            return _scalar(item)
    raise _NotANumber


def coerce_rewards(out: Any, n: int) -> list[float | None]:
    """The ``n`` rewards in ``out`` as floats or None; raises :class:`RewardContractError`.

    Values are not range-checked here (``inf`` and ``1e39`` come back as they are).
    """
    expected = f"expected a list of {n} values, one per completion, each {_EXPECTED_VALUE}"
    if isinstance(out, (list, tuple)):
        items = list(out)
    elif getattr(out, "ndim", None) == 1 and callable(getattr(out, "tolist", None)):
        items = out.tolist()  # 1-D numpy array or torch tensor
    else:
        raise RewardContractError(f"returned {_what(out)}; {expected}")
    if len(items) != n:
        raise RewardContractError(f"returned {len(items)} values for {n} completions; {expected}")
    values: list[float | None] = []
    for i, item in enumerate(items):
        try:
            values.append(_scalar(item))
        except _NotANumber:
            raise RewardContractError(
                f"returned {_what(item)} for completion {i}; expected {_EXPECTED_VALUE} per completion"
            ) from None
    return values


# --------------------------------------------------------------------------- one call


@dataclass(frozen=True)
class _Result:
    kind: Literal["ok", "raised", "timeout", "crashed", "contract"]
    values: list[float | None] | None = None
    message: str = ""


def _call_and_coerce(fn: Any, prompts: Any, completions: list[Any], columns: dict[str, Any]) -> tuple[str, Any]:
    """``("ok", values)``, ``("raised", description)`` or ``("contract", message)``."""
    try:
        out = fn(prompts=prompts, completions=completions, **columns)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit from user code is an error too
        return "raised", describe_exception(exc)
    try:
        return "ok", coerce_rewards(out, len(completions))
    except RewardContractError as exc:
        return "contract", str(exc)


def _to_result(pair: tuple[str, Any]) -> _Result:
    kind, payload = pair
    if kind == "ok":
        return _Result("ok", values=payload)
    return _Result(kind, message=str(payload))  # type: ignore[arg-type]


_RESOLVED: dict[str, Any] = {}


def worker_call(path: str, mode: str, prompts: Any, completions: Any, columns: Any) -> tuple[str, Any]:
    """Runs in the worker process: import the function at ``path`` (once), then call it.

    ``mode`` "import" only imports (outside the call's deadline). Answers ``("ok", values)``,
    ``("raised", ...)``, ``("contract", ...)`` or ``("unavailable", why)`` when the function
    cannot be imported here.
    """
    fn = _RESOLVED.get(path)
    if fn is None:
        try:
            from .registry import import_path

            fn = import_path(path)
            if not callable(fn):
                raise TypeError(f"{path} is not callable")
        except BaseException as exc:  # noqa: BLE001 - SystemExit at import included
            return "unavailable", describe_exception(exc)
        _RESOLVED[path] = fn
    if mode == "import":
        return "ok", None
    return _call_and_coerce(fn, prompts, list(completions), dict(columns or {}))


# --------------------------------------------------------------------------- the wrapper


def is_self_guarded(fn: Any) -> bool:
    """True for callables that bound their own time and count their own failures, like the
    built-ins: a ``timeout`` attribute and ``stats.snapshot()``."""
    stats = getattr(fn, "stats", None)
    return hasattr(fn, "timeout") and callable(getattr(stats, "snapshot", None))


def _choose_mode(fn: Any, import_path: str | None) -> Mode:
    if is_self_guarded(fn):
        return "direct"
    if getattr(fn, "in_process", False) is True or import_path is None:
        return "thread"
    if import_path.partition(":")[0] == "__main__":
        return "thread"
    return "process"


class _Counts:
    """Thread-safe items / errors / timeouts counters (the shape of :class:`~.base.RewardStats`), plus
    ``batch_errors`` (calls on several completions that raised and were retried one by one) and ``calls``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c = {"items": 0, "errors": 0, "timeouts": 0, "batch_errors": 0, "calls": 0}

    def record(self, items: int = 0, errors: int = 0, timeouts: int = 0, batch_errors: int = 0, calls: int = 0) -> None:
        with self._lock:
            self._c["items"] += items
            self._c["errors"] += errors
            self._c["timeouts"] += timeouts
            self._c["batch_errors"] += batch_errors
            self._c["calls"] += calls

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)


class _CombinedStats:
    """The wrapper's counters plus those of a self-guarded inner function."""

    def __init__(self, own: _Counts, inner: Any) -> None:
        self._own, self._inner = own, inner

    def snapshot(self) -> dict[str, int]:
        out = self._own.snapshot()
        if self._inner is not None:
            try:
                for k, v in self._inner.snapshot().items():
                    out[k] = out.get(k, 0) + int(v)
            except Exception:  # noqa: BLE001 - a broken stats object must not stop scoring
                pass
        return out


def _slice(value: Any, i: int, n: int) -> Any:
    if isinstance(value, (list, tuple)) and len(value) == n:
        return [value[i]]
    return value


class GuardedReward:
    """A user reward function ``f(prompts, completions, **columns) -> list[float | None]``
    run under a deadline, with exceptions contained and its output checked (see the module doc).

    Args:
        fn: the function.
        label: how messages name it (the ``reward.funcs`` entry).
        timeout: seconds per completion (``reward.timeout``).
        import_path: ``"module:qualname"`` that re-imports ``fn`` in a worker process; None:
            run it in a thread of this process.
        max_failed_calls: consecutive calls raising on every completion before
            :class:`~repo_rl.errors.TrainingError`.
        mode: force "process", "thread" or "direct" (default: chosen as the module doc says).

    ``stats`` counts items, errors and timeouts like a built-in's; ``__name__`` is ``fn``'s.
    """

    import_timeout: float = 300.0
    """Seconds a worker process may take to import the function's module (not charged to calls)."""

    def __init__(
        self,
        fn: Any,
        label: str | None = None,
        *,
        timeout: float = 5.0,
        import_path: str | None = None,
        max_failed_calls: int = 3,
        mode: Mode | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"reward must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.label = label or import_path or getattr(fn, "__name__", None) or _short(fn)
        self.__name__ = getattr(fn, "__name__", None) or self.label
        self.import_path = import_path
        self.mode: Mode = mode or _choose_mode(fn, import_path)
        if self.mode == "process" and not import_path:
            raise ValueError("mode='process' needs an import_path")
        self.max_failed_calls = int(max_failed_calls)
        self.failed_calls = 0
        """Consecutive calls in which every completion raised (or the worker died)."""
        self.last_error: str | None = None
        """The last exception the function raised, ``"Type: message"``."""
        self.batch_error: str | None = None
        """The last exception of a call on several completions that was then retried one by one."""
        self._own = _Counts()
        self._pool: VerifierPool | None = None
        self._pool_lock = threading.Lock()
        self._running: threading.Thread | None = None  # an abandoned call still running
        self._warned: set[str] = set()
        self._timeout = 5.0
        self.timeout = timeout

    # ----------------------------------------------------------------------------- settings

    @property
    def timeout(self) -> float:
        """Seconds per completion (a call on N completions gets N times this)."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        value = float(value)
        if not 0 < value < math.inf:
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {value}")
        self._timeout = value
        if hasattr(self.fn, "timeout"):
            try:
                self.fn.timeout = value
            except (AttributeError, TypeError, ValueError):
                pass
        if self._pool is not None:
            self._pool.timeout = value

    @property
    def stats(self) -> _CombinedStats:
        inner = getattr(self.fn, "stats", None) if self.mode == "direct" else None
        return _CombinedStats(self._own, inner)

    def close(self) -> None:
        """Stop the worker process (restarted on the next call) and close ``fn`` if it can be."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.close()
        close = getattr(self.fn, "close", None)
        if callable(close):
            close()

    def __repr__(self) -> str:
        return f"<GuardedReward {self.label} ({self.mode})>"

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("%s", message)

    # ----------------------------------------------------------------------------- calling

    def __call__(self, prompts: Any = None, completions: Sequence[Any] | None = None, **columns: Any) -> list[float | None]:
        if completions is None:
            raise TypeError(f"{self.label}: missing required argument 'completions'")
        completions = list(completions)
        n = len(completions)
        if n == 0:
            return []
        values: list[float | None] = [None] * n
        errors = timeouts = batch_error = 0
        (first,) = self._invoke([(prompts, completions, columns)], self._timeout * n)
        if first.kind == "ok":
            values = list(first.values or [])
        elif first.kind == "contract":
            raise TrainingError(f"reward {self.label} {first.message}")
        elif first.kind == "timeout":
            timeouts = n
            self._warn_timeout(first.message, n)
        elif first.kind == "crashed":
            errors = n
            self.last_error = first.message
            self._warn_once("crashed", f"reward {self.label}: {first.message}; the {n} completions of the call count "
                                       "as errors (rewards/verifier_errors) and are left out of the loss")
        else:  # raised: find the items that fail, one completion at a time
            self.last_error = first.message
            if n == 1:
                errors = 1
            else:
                batch_error = 1
                self.batch_error = first.message
                calls = [
                    (_slice(prompts, i, n), [completions[i]], {k: _slice(v, i, n) for k, v in columns.items()})
                    for i in range(n)
                ]
                for i, r in enumerate(self._invoke(calls, self._timeout)):
                    if r.kind == "ok":
                        values[i] = (r.values or [None])[0]
                    elif r.kind == "contract":
                        raise TrainingError(f"reward {self.label} {r.message} (called on completion {i} alone)")
                    elif r.kind == "timeout":
                        timeouts += 1
                    else:
                        errors += 1
                        self.last_error = r.message
            if errors:
                self._warn_once(
                    "raised",
                    f"reward {self.label} raised {self.last_error} on {errors} of {n} completions (retried one by one); "
                    "such completions count as errors (rewards/verifier_errors) and are left out of the loss",
                )
            elif batch_error:
                self._warn_once(
                    "batch",
                    f"reward {self.label} raised {first.message} when called on {n} completions at once, but not on "
                    f"any of them alone; each call is retried one completion at a time, which is slower (counted in "
                    f"rewards/{self.__name__}/batch_errors; the end of the run says on how many calls)",
                )
            if timeouts:
                self._warn_timeout("", 1)
        self._own.record(items=n, errors=errors, timeouts=timeouts, batch_errors=batch_error, calls=1)
        self.failed_calls = self.failed_calls + 1 if errors == n else 0
        if self.failed_calls >= self.max_failed_calls:
            raise TrainingError(
                f"reward {self.label} raised on every completion in {self.failed_calls} consecutive calls; "
                f"last error: {self.last_error}"
            )
        return values

    def batch_error_summary(self) -> str | None:
        """One line when calls on several completions raised (and were retried one by one): which
        function, what it raised, on how many of its calls; None when none did."""
        c = self._own.snapshot()
        if not c["batch_errors"]:
            return None
        return (f"reward {self.label} raised on {c['batch_errors']} of its {c['calls']} calls when given a batch "
                f"(last: {self.batch_error}); each such call was retried one completion at a time")

    def _warn_timeout(self, detail: str, n: int) -> None:
        where = (
            "its call was abandoned, but a thread cannot be stopped: it may still be running, and "
            "until it returns later calls are skipped (counted as timeouts)"
            if self.mode == "thread"
            else "its worker process was stopped"
        )
        self._warn_once(
            "timeout",
            f"reward {self.label} did not return within reward.timeout ({self._timeout:g}s) x {n} completions"
            f"{' (' + detail + ')' if detail else ''}; {where}; the completions count as timeouts "
            "(rewards/verifier_timeouts) and are left out of the loss",
        )

    def _invoke(self, calls: list[tuple[Any, list[Any], dict[str, Any]]], deadline: float) -> list[_Result]:
        if self.mode == "process":
            results = self._invoke_process(calls, deadline)
            if results is not None:
                return results
        if self.mode == "direct":
            return [_to_result(_call_and_coerce(self.fn, *call)) for call in calls]
        return [self._invoke_thread(call, deadline) for call in calls]

    def _fall_back_to_thread(self, why: str) -> None:
        self.mode = "thread"
        self._warn_once(
            "fallback",
            f"reward {self.label}: {why}; it runs in a thread of the trainer's process from now on "
            "(a call past its deadline is abandoned, not stopped)",
        )

    def _get_pool(self) -> VerifierPool:
        with self._pool_lock:
            if self._pool is None:
                self._pool = VerifierPool(1, self._timeout, memory_limit_mb=None, preload=("repo_rl.rewards.guard",))
            return self._pool

    def _invoke_process(self, calls: list[tuple[Any, list[Any], dict[str, Any]]], deadline: float) -> list[_Result] | None:
        """Run the calls in the worker process; None after falling back to thread mode."""
        path = self.import_path
        pool = self._get_pool()
        try:
            (imp,) = pool.run(TASK, [(path, "import", None, None, None)], timeout=max(self.import_timeout, deadline))
            if imp.status == "timeout":
                message = f"importing {path} in the worker took more than {max(self.import_timeout, deadline):g}s"
                return [_Result("timeout", message=message) for _ in calls]
            if imp.status == "error":
                if (imp.error or "").startswith(_STARTUP_FAILED):
                    self._fall_back_to_thread("its worker process failed to start")
                    return None
                return [_Result("crashed", message=f"its worker process died while importing {path} ({imp.error})") for _ in calls]
            if imp.value[0] == "unavailable":
                self._fall_back_to_thread(f"re-importing {path} in a worker process failed ({imp.value[1]})")
                return None
            outcomes = pool.run(TASK, [(path, "call", p, c, cols) for p, c, cols in calls], timeout=deadline)
        except OSError as exc:  # e.g. no more processes or file descriptors
            self._fall_back_to_thread(f"cannot start a worker process ({describe_exception(exc)})")
            return None
        results: list[_Result] = []
        for call, o in zip(calls, outcomes):
            if o.status == "timeout":
                results.append(_Result("timeout"))
            elif o.status == "error":
                if (o.error or "").startswith("cannot send item"):  # arguments that do not pickle
                    results.append(self._invoke_thread(call, deadline))
                else:
                    results.append(_Result("crashed", message=f"its worker process died during a call ({o.error})"))
            else:
                results.append(_to_result(o.value))
        return results

    def _invoke_thread(self, call: tuple[Any, list[Any], dict[str, Any]], deadline: float) -> _Result:
        running = self._running
        if running is not None and running.is_alive():
            return _Result("timeout", message="an earlier call that overran its deadline is still running")
        self._running = None
        box: list[_Result] = []

        def target() -> None:
            try:
                box.append(_to_result(_call_and_coerce(self.fn, *call)))
            except BaseException as exc:  # noqa: BLE001 - nothing may escape a daemon thread
                box.append(_Result("raised", message=describe_exception(exc)))

        thread = threading.Thread(target=target, name=f"reward {self.label}", daemon=True)
        thread.start()
        thread.join(deadline)
        if thread.is_alive():
            self._running = thread
            return _Result("timeout")
        return box[0] if box else _Result("raised", message="the call ended without a result")
