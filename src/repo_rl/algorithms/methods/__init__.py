"""Training methods as objects, one file each.

A :class:`Method` declares what the trainer does with a step: whether it samples rollouts,
which groups its gate picks, where the candidates injected into those groups come from
(``rephrase``: the policy rephrases the expert solution, ``expert``: the expert text itself),
which registered loss (:data:`repo_rl.algorithms.losses.LOSSES`) trains them, and which rows the
advantage statistics come from. The trainer calls these hooks and the pure functions in
:mod:`~repo_rl.algorithms.groups`, :mod:`~repo_rl.algorithms.advantages` and
:mod:`~repo_rl.algorithms.losses`; it never tests a method's name.

Adding a method is one file here that calls :func:`register_method` (imported below), plus
its tests.
"""

from __future__ import annotations

from .base import METHODS, Method, MethodSpec, register_method

# The built-in methods register themselves on import.
from . import grpo, repo, raw_expert, luffy, hpt_switch, sft, sft_then_grpo, sdft  # noqa: E402,F401  isort: skip

__all__ = ["METHODS", "Method", "MethodSpec", "register_method"]
