"""Combining the configured reward functions into one reward per completion.

:class:`RewardScorer` calls each function of ``reward.funcs`` with TRL's signature
``f(prompts, completions, **columns)`` and adds up their weighted outputs.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from ..data import Example
from ..errors import TrainingError, UserError


class RewardScorer:
    """Calls the configured reward functions with TRL's signature and combines them.

    ``None`` from a function (verifier error or timeout) makes the combined reward NaN: the
    sample is then left out of the loss and the group statistics, and counted.
    """

    def __init__(self, specs: Sequence[str], weights: Optional[Sequence[float]], timeout: float) -> None:
        from .. import rewards as rw

        self.funcs: list[Callable[..., list]] = []
        for spec in specs:
            try:
                fn = rw.load_reward(spec)
            except ValueError as e:
                raise UserError(f"reward.funcs: {e}") from None
            if hasattr(fn, "timeout"):
                try:
                    fn.timeout = timeout
                except AttributeError:
                    pass
            self.funcs.append(fn)
        self.names = [getattr(f, "__name__", str(s)) for f, s in zip(self.funcs, specs)]
        self.weights = list(weights) if weights is not None else [1.0] * len(self.funcs)
        self._last = [self._snapshot(f) for f in self.funcs]

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

    def __call__(self, prompts: list[Any], completions: list[str], examples: list[Example]) -> tuple[torch.Tensor, dict[str, float]]:
        """Combined rewards ``[len(completions)]`` (NaN where a function gave None) and counters
        (sums and counts, so they add up across ranks)."""
        cols: dict[str, list[Any]] = {
            "answer": [e.answer for e in examples],
            "solution": [e.solution for e in examples],
            "domain": [e.domain for e in examples],
            "id": [e.id for e in examples],
        }
        extra_keys = sorted({k for e in examples if e.extra for k in e.extra} - set(cols) - {"prompt", "completions"})
        for k in extra_keys:
            cols[k] = [(e.extra or {}).get(k) for e in examples]
        total = torch.zeros(len(completions), dtype=torch.float64)
        metrics: dict[str, float] = {}
        nones = 0
        for fn, name, w in zip(self.funcs, self.names, self.weights):
            out = fn(prompts=prompts, completions=completions, **cols)
            if len(out) != len(completions):
                raise TrainingError(f"reward {name} returned {len(out)} values for {len(completions)} completions")
            try:
                vals = torch.tensor([float("nan") if v is None else float(v) for v in out], dtype=torch.float64)
            except (TypeError, ValueError):
                bad = next(v for v in out if v is not None and not isinstance(v, (int, float)))
                raise TrainingError(f"reward {name} returned {bad!r:.60}; expected a number or None per completion") from None
            # inf / -inf are verifier failures like None and NaN: out of the loss, and counted.
            vals = torch.where(torch.isfinite(vals), vals, torch.full_like(vals, float("nan")))
            nones += int(torch.isnan(vals).sum())
            finite = vals[torch.isfinite(vals)]
            metrics[f"rewards/{name}/sum"] = float(finite.sum())
            metrics[f"rewards/{name}/count"] = float(finite.numel())
            total = total + w * vals
        errors = timeouts = 0
        for i, fn in enumerate(self.funcs):
            snap = self._snapshot(fn)
            errors += snap.get("errors", 0) - self._last[i].get("errors", 0)
            timeouts += snap.get("timeouts", 0) - self._last[i].get("timeouts", 0)
            self._last[i] = snap
        metrics["rewards/verifier_errors"] = float(errors)
        metrics["rewards/verifier_timeouts"] = float(timeouts)
        metrics["rewards/invalid"] = float(nones)
        return total, metrics
