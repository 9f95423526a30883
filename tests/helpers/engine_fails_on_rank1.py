"""``repo-rl`` whose generation engine fails to start on rank 1 (tests/test_distributed.py).

Usage: python engine_fails_on_rank1.py train ARGS...
"""

import os
import sys

from repo_rl import trainer
from repo_rl.cli import main

_make = trainer.make_generator


def make_generator(*args, **kwargs):
    if os.environ.get("RANK") == "1":
        raise RuntimeError("no engine here (on purpose)")
    return _make(*args, **kwargs)


trainer.make_generator = make_generator
sys.exit(main(sys.argv[1:]))
