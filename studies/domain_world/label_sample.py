"""Draw the sample of rephrases that docs/REAL_MODEL.md reads by hand, from an audit's rephrases.jsonl.

    python studies/domain_world/label_sample.py runs/domain_world/audit/default-bank2 [--seed 2026]

Prints 48 rephrases that passed ``repo.verify`` and 24 that the training reward verified but
``repo.verify`` refused, drawn with ``--seed``, in the order of ``audit_labels.jsonl`` (whose
``label`` and ``note`` fields are a reader's, not a program's).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def draw(audit_dir: Path, seed: int = 2026) -> tuple[list[dict], list[dict]]:
    recs = [json.loads(x) for x in (audit_dir / "rephrases.jsonl").read_text().splitlines() if x.strip()]
    passed = [r for r in recs if r["passed"]]
    refused = [r for r in recs if not r["passed"] and r["checks"]["reward"]]
    rng = random.Random(seed)
    return rng.sample(passed, min(48, len(passed))), rng.sample(refused, min(24, len(refused)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("audit_dir", type=Path)
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args(argv)
    passed, refused = draw(args.audit_dir, args.seed)
    for tag, rows in (("P", passed), ("R", refused)):
        for i, r in enumerate(rows):
            print(f"{tag}{i:02d} {r['id']} answer={r['answer']} | {r['text']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
