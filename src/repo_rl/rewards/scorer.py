"""Combining the configured reward functions into one reward per completion.

:class:`RewardScorer` calls each function of ``reward.funcs`` with TRL's signature
``f(prompts, completions, **columns)`` and adds up their weighted outputs. Functions that are
not repo-rl's own run under the guards of :mod:`.guard` (deadline, contained exceptions,
checked output).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional, Sequence

import torch

from ..data import Example
from ..errors import TrainingError, UserError
from ._worker import describe_exception
from .combine import combine_rewards
from .guard import FLOAT32_MAX, GuardedReward, RewardContractError, coerce_rewards

logger = logging.getLogger("repo_rl.rewards")


def _is_builtin(fn: Any) -> bool:
    """repo-rl's own reward functions: trusted to bound their time and not to raise per item."""
    from .base import RewardFunction

    if isinstance(fn, RewardFunction):
        return True
    module = getattr(fn, "__module__", None)
    return isinstance(module, str) and (module == "repo_rl" or module.startswith("repo_rl."))


class RewardScorer:
    """Calls the configured reward functions with TRL's signature and combines them.

    ``None`` from a function (also a verifier error or timeout) leaves only that function's term
    out of the weighted sum, as TRL does (:func:`~.combine.combine_rewards`); a completion that no
    function scored is NaN: it is left out of the loss and the group statistics, and counted.

    What happens when a function misbehaves (user functions are wrapped in
    :class:`~.guard.GuardedReward`; see :mod:`.guard` for the details):

    * It raises: the call is retried one completion at a time; the completions that raise are
      None and counted in ``rewards/verifier_errors``. Raising on every completion of 3
      consecutive calls stops the run (:class:`TrainingError`, one line naming the function and
      the exception). A built-in that raises (a misconfiguration, e.g. no ``answer`` column)
      stops the run at once, one line.
    * It returns no list (None, a dict, a string, a number), a list of the wrong length, or a
      value that is not a number (a string, a nested list): :class:`TrainingError` naming the
      function, the type and a short repr of what it returned, and what is expected. ``bool``
      values are taken as 1.0 / 0.0 (as TRL does); numpy scalars and 0-d tensors are accepted.
    * It returns a value that float32 cannot hold (``|r| > 3.4e38``, e.g. 1e39) or a non-finite
      one (inf, -inf, NaN): the item is invalid (NaN, left out of the loss, counted in
      ``rewards/invalid``), and a warning naming the function is logged once. The same holds
      for a weighted sum beyond float32.
    * It does not return: a call on N completions is given N x ``timeout`` seconds; then its
      items are None and counted in ``rewards/verifier_timeouts``.
    * Import-time side effects (``sys.exit()``, argparse) are caught by :func:`~.registry.load_reward`
      and become a :class:`UserError` (one line, ``reward.funcs: ...``).

    :attr:`unscored_calls` counts consecutive calls in which no completion got a reward;
    :meth:`unscored_message` words the line to stop a run with.
    """

    def __init__(
        self,
        specs: Sequence[str],
        weights: Optional[Sequence[float]],
        timeout: float,
        *,
        max_failed_calls: int = 3,
        judge: Any = None,
        by_domain: Optional[dict[str, list[str]]] = None,
        check_judge: bool = True,
    ) -> None:
        from .registry import resolve_reward

        self.funcs: list[Callable[..., list]] = []
        self.labels: list[str] = []
        for spec in specs:
            label = spec.strip() if isinstance(spec, str) else str(spec)
            if label == "judge":  # built from reward.judge, not the registry
                from .judge import JudgeReward

                if judge is None:
                    raise UserError("reward.funcs: judge needs the reward.judge settings (base_url, model ...)")
                fn = judge if isinstance(judge, JudgeReward) else JudgeReward.from_config(judge)
                if check_judge:
                    fn.check()  # a server that is down is an error before any training
                self.funcs.append(fn)
                self.labels.append(label)
                continue
            try:
                fn, path = resolve_reward(spec)
            except ValueError as e:
                raise UserError(f"reward.funcs: {e}") from None
            if _is_builtin(fn):
                if hasattr(fn, "timeout"):
                    try:
                        fn.timeout = timeout
                    except (AttributeError, TypeError, ValueError):
                        pass
            else:
                fn = GuardedReward(fn, label, timeout=timeout, import_path=path, max_failed_calls=max_failed_calls)
            self.funcs.append(fn)
            self.labels.append(label)
        self.names = [getattr(f, "__name__", str(s)) for f, s in zip(self.funcs, specs)]
        self.weights = list(weights) if weights is not None else [1.0] * len(self.funcs)
        self._last = [self._snapshot(f) for f in self.funcs]
        self._warned_range: set[str] = set()
        self.unscored_calls = 0
        """Consecutive calls (with at least one completion) in which every combined reward was
        NaN: no function gave a usable value for any completion. Reset by a call with one."""
        self._streak: dict[str, dict[str, int]] = {}
        self.by_domain = dict(by_domain) if by_domain else None
        """``reward.by_domain``: domain -> the labels of the functions that score its rows."""

    def summary(self) -> list[str]:
        """Lines for the end of a run: functions that raised on whole batches (see
        :meth:`~.guard.GuardedReward.batch_error_summary`)."""
        lines = []
        for fn in self.funcs:
            say = getattr(fn, "batch_error_summary", None)
            line = say() if callable(say) else None
            if line:
                lines.append(line)
        return lines

    def close(self) -> None:
        """Stop the reward functions' worker processes, if they have any (they restart on use)."""
        for fn in self.funcs:
            close = getattr(fn, "close", None)
            if callable(close):
                close()

    @staticmethod
    def _snapshot(fn: Any) -> dict[str, int]:
        stats = getattr(fn, "stats", None)
        return stats.snapshot() if stats is not None and hasattr(stats, "snapshot") else {}

    def _warn_range(self, key: str, message: str) -> None:
        if key not in self._warned_range:
            self._warned_range.add(key)
            logger.warning("%s", message)

    def unscored_message(self, steps: int) -> str:
        """One line for stopping a run after ``steps`` consecutive steps in which no completion
        got a reward, with what each function did during that streak."""
        parts = []
        for label, fn in zip(self.labels, self.funcs):
            c = self._streak.get(label, {})
            last = getattr(fn, "last_error", None)
            if not c.get("items"):  # this scorer's own streak was cut by another kind of call
                parts.append(label + (f" (last error: {last})" if last else ""))
                continue
            what = f"{c.get('none', 0)} of {c['items']} completions without a reward"
            detail = [f"{c[k]} {k}" for k in ("errors", "timeouts") if c.get(k)]
            if c.get("errors") and last:
                detail.append(f"last error: {last}")
            parts.append(f"{label}: {what}" + (f" ({', '.join(detail)})" if detail else ""))
        return (
            f"no completion got a reward in {steps} consecutive steps (every reward was None, NaN, "
            f"an error or a timeout): {'; '.join(parts)}; fix reward.funcs, or raise reward.timeout if these are timeouts"
        )

    def _rows_of(self, label: str, examples: list[Example]) -> Optional[list[int]]:
        """The rows a function scores under ``reward.by_domain`` (None: all of them)."""
        if self.by_domain is None:
            return None
        rows = []
        for i, e in enumerate(examples):
            funcs = self.by_domain.get(str(e.domain))
            if funcs is None:
                raise TrainingError(
                    f"{e.id}: domain {e.domain!r} has no entry in reward.by_domain ({', '.join(self.by_domain)})"
                )
            if label in funcs:
                rows.append(i)
        return rows

    def check_domains(self, examples: Sequence[Example], where: str = "data") -> None:
        """A one-line :class:`UserError` for the first row whose domain ``reward.by_domain`` does
        not route (called when the data loads, not at step 300)."""
        if self.by_domain is None:
            return
        for e in examples:
            if str(e.domain) not in self.by_domain:
                shown = "no domain" if e.domain is None else f"domain {e.domain!r}"
                raise UserError(
                    f"{where}: row {e.id} has {shown}, which reward.by_domain does not route (it routes "
                    f"{', '.join(self.by_domain)}); add the domain, or set the rows' domain / data_source column"
                )

    def __call__(self, prompts: list[Any], completions: list[str], examples: list[Example]) -> tuple[torch.Tensor, dict[str, float]]:
        """Combined rewards ``[len(completions)]`` (:func:`combine_rewards`: NaN where every function
        gave None) and counters
        (sums and counts, so they add up across ranks). ``rewards/items`` is the number of
        completions and ``rewards/unscored`` the number whose combined reward is NaN."""
        cols: dict[str, list[Any]] = {
            "answer": [e.answer for e in examples],
            "solution": [e.solution for e in examples],
            "domain": [e.domain for e in examples],
            "id": [e.id for e in examples],
        }
        extra_keys = sorted({k for e in examples if e.extra for k in e.extra} - set(cols) - {"prompt", "completions"})
        for k in extra_keys:
            cols[k] = [(e.extra or {}).get(k) for e in examples]
        n = len(completions)
        columns: list[torch.Tensor] = []
        metrics: dict[str, float] = {}
        nones = 0
        per_fn: list[tuple[str, int]] = []
        for fn, label, name, w in zip(self.funcs, self.labels, self.names, self.weights):
            rows = self._rows_of(label, examples)
            m = n if rows is None else len(rows)
            if m == 0 and (isinstance(fn, GuardedReward) or rows is not None):
                out: Any = []
            else:
                sub = (lambda xs: xs) if rows is None else (lambda xs: [xs[i] for i in rows])
                try:
                    out = fn(prompts=sub(list(prompts)), completions=sub(list(completions)), **{k: sub(v) for k, v in cols.items()})
                except TrainingError:
                    raise
                except Exception as e:  # noqa: BLE001 - a built-in misused (e.g. no 'answer' column)
                    raise TrainingError(f"reward {label} raised {describe_exception(e)}") from None
            try:
                raw = coerce_rewards(out, m)
            except RewardContractError as e:
                raise TrainingError(f"reward {label} {e}") from None
            if rows is not None:  # rows of other domains: this function's term is left out (None)
                full: list[Any] = [None] * n
                for i, v in zip(rows, raw):
                    full[i] = v
                raw = full
            bad = [v for v in raw if v is not None and not (math.isfinite(v) and abs(v) <= FLOAT32_MAX)]
            if bad:
                self._warn_range(
                    label,
                    f"reward {label} returned {bad[0]:g} for {len(bad)} of {n} completions: rewards must be finite "
                    f"and within float32 range (|r| <= {FLOAT32_MAX:.4g}); such completions count as invalid "
                    "(left out of the loss, counted in rewards/invalid); this warning is shown once",
                )
            vals = torch.tensor(
                [math.nan if v is None or not (math.isfinite(v) and abs(v) <= FLOAT32_MAX) else v for v in raw],
                dtype=torch.float64,
            )
            invalid = int(torch.isnan(vals).sum()) - (n - m)  # other domains' rows are not this function's failures
            nones += invalid
            per_fn.append((label, invalid))
            finite = vals[torch.isfinite(vals)]
            metrics[f"rewards/{name}/sum"] = float(finite.sum())
            metrics[f"rewards/{name}/count"] = float(finite.numel())
            columns.append(vals)
        # A function's None leaves only its own term out; a completion no function scored is NaN.
        per_func = torch.stack(columns, 1) if columns else torch.zeros(n, 0, dtype=torch.float64)
        total = combine_rewards(per_func, self.weights) if columns else torch.full((n,), math.nan, dtype=torch.float64)
        over = torch.isfinite(total) & (total.abs() > FLOAT32_MAX) | torch.isinf(total)
        if bool(over.any()):
            nones += int(over.sum())
            total = torch.where(over, torch.full_like(total, math.nan), total)
            self._warn_range(
                "<weighted sum>",
                f"the weighted sum of reward.funcs is beyond float32 range (|r| > {FLOAT32_MAX:.4g}) for "
                f"{int(over.sum())} of {n} completions: they count as invalid (left out of the loss); "
                "check reward.weights",
            )
        errors = timeouts = 0
        streak_update: dict[str, dict[str, int]] = {}
        for i, fn in enumerate(self.funcs):
            snap = self._snapshot(fn)
            for k in ("judge_errors", "judge_timeouts", "cache_hits", "requests"):
                if k in snap:  # the judge's own counters
                    name_k = k if k.startswith("judge_") else f"judge_{k}"
                    metrics[f"rewards/{name_k}"] = metrics.get(f"rewards/{name_k}", 0.0) + snap[k] - self._last[i].get(k, 0)
            e = snap.get("errors", 0) - self._last[i].get("errors", 0)
            t = snap.get("timeouts", 0) - self._last[i].get("timeouts", 0)
            if "batch_errors" in snap:  # a user function: batch calls that raised and were retried item by item
                metrics[f"rewards/{self.names[i]}/batch_errors"] = float(snap["batch_errors"] - self._last[i].get("batch_errors", 0))
            errors += e
            timeouts += t
            self._last[i] = snap
            streak_update[self.labels[i]] = {"items": n, "none": per_fn[i][1], "errors": e, "timeouts": t}
        unscored = int(torch.isnan(total).sum())
        if n and unscored == n:
            self.unscored_calls += 1
            for label, upd in streak_update.items():
                acc = self._streak.setdefault(label, {})
                for k, v in upd.items():
                    acc[k] = acc.get(k, 0) + v
        elif n:
            self.unscored_calls = 0
            self._streak = {}
        metrics["rewards/verifier_errors"] = float(errors)
        metrics["rewards/verifier_timeouts"] = float(timeouts)
        metrics["rewards/invalid"] = float(nones)
        metrics["rewards/items"] = float(n)
        metrics["rewards/unscored"] = float(unscored)
        return total, metrics
