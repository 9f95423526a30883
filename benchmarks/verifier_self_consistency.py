"""Self-consistency of the math verifier on real benchmark answers: every gold answer, boxed,
must verify against itself (through math-verify, with the exact-match shortcut turned off).

    python benchmarks/verifier_self_consistency.py ../shared/benchmarks/*.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from repo_rl.rewards import make_math_reward
from repo_rl.rewards import math_verifier


def main(paths: list[str]) -> int:
    # Turn off the in-process exact-match shortcut, so every item goes through math-verify.
    math_verifier._canonical = lambda s: object()
    reward = make_math_reward(timeout=10.0)
    total = ok = 0
    print("| file | items | self-verified | errors | timeouts |\n|---|---|---|---|---|")
    t0 = time.time()
    failures = []
    for p in paths:
        rows = json.loads(Path(p).read_text())
        golds = [str(r["answer"]) for r in rows]
        comps = [g if "\\boxed" in g else f"\\boxed{{{g}}}" for g in golds]
        before = reward.stats.snapshot()
        scores = reward(completions=comps, answer=golds)
        after = reward.stats.snapshot()
        good = sum(1 for s in scores if s == 1.0)
        failures += [(Path(p).name, g) for g, s in zip(golds, scores) if s != 1.0]
        total += len(rows)
        ok += good
        print(f"| {Path(p).name} | {len(rows)} | {good} | {after['errors'] - before['errors']} | {after['timeouts'] - before['timeouts']} |")
    print(f"| all | {total} | {ok} ({ok / total:.1%}) | | |\n\n{time.time() - t0:.0f} s")
    for name, g in failures[:20]:
        print(f"- {name}: `{g[:100]}`")
    reward.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
