"""A sampled batch, kept between steps, and the overlap of sampling with the update.

With ``train.max_staleness: 1`` the trainer samples step t+1's :class:`Batch` in a
:class:`Prefetch` thread while step t's update runs (the engine generates in its own process, or
its own thread, with the weights step t started from). The batch waiting for its step is part of
the run's state: a checkpoint carries it (:func:`batch_state`) so a resumed run trains on the very
batch the uninterrupted run would have.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch

from ..data import Example
from .bank import BankEntry
from .types import Group, Sequence_


@dataclass
class Batch:
    """The sampling half of one step, on one rank: rollouts, rewards and the composed groups."""

    step: int
    """The step (0-based) that trains on it."""
    dataset_index: list[int]
    """This rank's prompts (training-row indices), in order."""
    epoch: int
    """The prompt sampler's epoch after these prompts were taken."""
    group: Group
    on_policy: torch.Tensor
    """``[N*G]`` rewards of the rollouts before composition."""
    reward_counts: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    """``generation``, ``rephrase``, ``reward`` seconds (measured where the batch was sampled)."""
    weights_step: int = 0
    """Optimizer steps the sampling weights had taken: ``step - weights_step`` is the staleness."""


def _tensor(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": str(t.dtype).removeprefix("torch."), "values": t.tolist()}


def _from_tensor(d: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(d["values"], dtype=getattr(torch, d["dtype"]))


def batch_state(b: Batch) -> dict[str, Any]:
    """``b`` as plain JSON values (floats round-trip exactly; NaN is kept)."""
    g = b.group
    return {
        "step": b.step, "dataset_index": list(b.dataset_index), "epoch": b.epoch, "weights_step": b.weights_step,
        "on_policy": _tensor(b.on_policy), "reward_counts": dict(b.reward_counts), "timings": dict(b.timings),
        "group": {
            "dataset_index": list(g.dataset_index), "sequences": [asdict(s) for s in g.sequences], "texts": list(g.texts), "rewards": _tensor(g.rewards),
            "origins": _tensor(g.origins), "dropped": _tensor(g.dropped), "counters": dict(g.counters),
            "gap_under_p": [[int(k), v] for k, v in g.gap_under_p.items()], "batching": g.batching,
            "bank_candidates": [asdict(e) for e in g.bank_candidates],
            "gap_missing": [[int(f), asdict(s)] for f, s in g.gap_missing],
        },
    }


def batch_from_state(d: dict[str, Any], examples: list[Example]) -> Batch:
    """The :class:`Batch` that :func:`batch_state` wrote; ``examples`` are the run's training rows."""
    g = d["group"]
    idx = [int(i) for i in d["dataset_index"]]
    group_idx = [int(i) for i in g["dataset_index"]]
    group = Group(
        [examples[i] for i in group_idx], group_idx, [Sequence_(**s) for s in g["sequences"]], list(g["texts"]), _from_tensor(g["rewards"]),
        _from_tensor(g["origins"]), _from_tensor(g["dropped"]), dict(g["counters"]),
        gap_under_p={int(k): float(v) for k, v in g["gap_under_p"]}, batching=g["batching"],
        bank_candidates=[BankEntry(**e) for e in g["bank_candidates"]],
        gap_missing=[(int(f), Sequence_(**s)) for f, s in g["gap_missing"]],
    )
    return Batch(int(d["step"]), idx, int(d["epoch"]), group, _from_tensor(d["on_policy"]), dict(d["reward_counts"]),
                 dict(d["timings"]), int(d["weights_step"]))


class Prefetch:
    """One batch sampled in a background thread (:meth:`start`), collected with :meth:`wait`."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._result: Optional[Batch] = None
        self._error: Optional[BaseException] = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, sample: Callable[[], Batch]) -> None:
        if self._thread is not None:
            raise RuntimeError("a batch is already being sampled")
        self._result, self._error = None, None

        def body() -> None:
            try:
                self._result = sample()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
                self._error = e

        self._thread = threading.Thread(target=body, name="repo-rl-prefetch", daemon=True)
        self._thread.start()

    def wait(self) -> Batch:
        """The sampled batch; the sampling thread's exception, if it raised one."""
        if self._thread is None:
            raise RuntimeError("no batch is being sampled")
        self._thread.join()
        self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        out, self._result = self._result, None
        assert out is not None
        return out

    def cancel(self) -> None:
        """Let a running sampling finish and drop its batch (the run is stopping)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._result, self._error = None, None
