"""Golden answer-equivalence cases for the built-in rewards (tests/data/verifier_golden.jsonl).

Each line holds ``completion``, ``answer``, ``expected`` (1.0, 0.0, or null for "the verifier
must give up within its deadline") and a ``note``; ``reward`` selects the reward (default
"math"). Expectations are what is mathematically right; cases where math-verify disagrees
are marked ``known_failure`` and run as strict xfails, so the file documents its limits.
``quick`` cases must be decided well inside the deadline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from repo_rl.rewards import Outcome, make_choice_reward, make_math_reward, make_numeric_reward

DATA = Path(__file__).parent / "data" / "verifier_golden.jsonl"
TIMEOUT = 1.5
SLACK = 1.0
CASES: list[dict] = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def _case_id(index: int, case: dict) -> str:
    slug = "".join(ch if ch.isalnum() else "-" for ch in case["note"].split(":")[0].lower())[:40].strip("-")
    return f"{index:03d}-{case.get('reward', 'math')}-{slug}"


@pytest.fixture(scope="module")
def outcomes() -> dict[int, Outcome]:
    """Score every case once, batched per reward, as the trainer would."""
    rewards = {
        "math": make_math_reward(timeout=TIMEOUT, num_workers=1),
        "numeric": make_numeric_reward(),
        "choice": make_choice_reward(),
    }
    results: dict[int, Outcome] = {}
    try:
        for name, reward in rewards.items():
            idx = [i for i, c in enumerate(CASES) if c.get("reward", "math") == name]
            outs = reward.outcomes([CASES[i]["completion"] for i in idx], [CASES[i]["answer"] for i in idx])
            results.update(zip(idx, outs))
    finally:
        rewards["math"].close()
    return results


def test_golden_file_shape() -> None:
    assert len(CASES) >= 60
    assert sum(c.get("reward", "math") == "math" for c in CASES) >= 60
    for case in CASES:
        assert {"completion", "answer", "expected", "note"} <= set(case), case
        assert case["expected"] in (1.0, 0.0, None), case
        assert case.get("reward", "math") in ("math", "numeric", "choice"), case
    assert any(c["expected"] is None for c in CASES)
    assert any(c.get("known_failure") for c in CASES)


@pytest.mark.parametrize(
    ("index", "case"),
    [
        pytest.param(
            i,
            c,
            id=_case_id(i, c),
            marks=[pytest.mark.xfail(strict=True, reason=c["note"])] if c.get("known_failure") else [],
        )
        for i, c in enumerate(CASES)
    ],
)
def test_golden_case(outcomes: dict[int, Outcome], index: int, case: dict) -> None:
    outcome = outcomes[index]
    got = outcome.value if outcome.ok else None
    assert got == case["expected"], f"{case['note']}: got {got!r} ({outcome.status}: {outcome.error})"
    if case["expected"] is None:
        assert outcome.status in ("timeout", "error")
        assert outcome.elapsed <= TIMEOUT + SLACK, outcome.elapsed
    else:
        assert outcome.status == "ok"
    if case.get("quick"):
        assert outcome.elapsed < TIMEOUT / 2, outcome.elapsed
