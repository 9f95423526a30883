"""Compatibility module: the evaluation code lives in :mod:`repo_rl.evaluation`.

``repo_rl.evaluate`` re-exports the public names it used to define (metrics from
:mod:`repo_rl.evaluation.metrics`, benchmarks and layouts from :mod:`~repo_rl.evaluation.benchmarks`
and :mod:`~repo_rl.evaluation.layouts`, generation and scoring from
:mod:`~repo_rl.evaluation.runner`, the ``repo-rl eval`` command from :mod:`~repo_rl.evaluation.cli`).
New code should import from :mod:`repo_rl.evaluation` or its modules.
"""

from __future__ import annotations

from .evaluation import *  # noqa: F401,F403
from .evaluation import __all__  # noqa: F401
