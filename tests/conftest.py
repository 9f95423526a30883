"""Shared fixtures: a tiny Qwen2 model and a char-level tokenizer, built offline from a config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Test models are tiny: one intra-op thread is as fast as two and does not thrash when the
# machine is shared (two threads were seen 10x slower than one on a loaded 2-core box).
import torch  # noqa: E402

torch.set_num_threads(1)
_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Runs with train.threads=N change torch's global thread count; give later tests theirs back."""
    yield
    torch.set_num_threads(_THREADS)


def make_tokenizer():
    from repo_rl.models.tiny import make_char_tokenizer

    return make_char_tokenizer()


def make_tiny_model_dir(path: Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    from repo_rl.models.tiny import save_tiny_model_dir

    save_tiny_model_dir(path, make_tokenizer(), hidden_size=hidden, num_layers=layers, seed=seed)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-qwen2"))


ROWS = [
    {"id": f"q{i}", "prompt": p, "answer": a, "solution": s}
    for i, (p, a, s) in enumerate(
        [
            ("what is 2+3?", "5", "two plus three is 5"),
            ("what is 4+4?", "8", "four plus four is 8"),
            ("what is 1+6?", "7", "one plus six is 7"),
            ("what is 3+6?", "9", "three plus six is 9"),
            ("what is 0+2?", "2", "zero plus two is 2"),
            ("what is 5+1?", "6", None),
        ]
    )
]


@pytest.fixture()
def tiny_data(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    with open(path, "w") as fh:
        for r in ROWS:
            fh.write(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n")
    return path


def tiny_overrides(model_dir: Path, data: Path, **extra) -> list[str]:
    """Overrides for a fast run on the tiny model with the test reward."""
    base = {
        "model.name_or_path": str(model_dir),
        "data.train_files": str(data),
        "reward.funcs": "[tests.helpers.rewards:contains_answer]",
        "algorithm.num_generations": 4,
        "algorithm.max_completion_length": 8,
        "train.prompts_per_step": 3,
        "train.max_steps": 3,
        "train.learning_rate": 1e-3,
        "train.micro_batch_size": 5,
        "train.save_every": 2,
        "repo.num_attempts": 4,
        # The tiny model never boxes an answer: the tests verify rephrases with the reward itself.
        "repo.verify": "[reward]",
        "train.bf16": "false",  # exact float32, whatever the CPU (train.bf16=auto follows the hardware)
        "logging.progress": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# --------------------------------------------------------------------------- the fast subset

DURATIONS = Path(__file__).parent / "durations.json"
FAST_LIMIT_S = 0.6
"""``--fast`` leaves out tests whose recorded time is above this, but keeps the quickest test of
every file, so every file (and the module it tests) still runs."""


def pytest_addoption(parser):
    group = parser.getgroup("repo-rl")
    group.addoption("--fast", action="store_true",
                    help=f"the fast subset: tests recorded at <= {FAST_LIMIT_S} s (tests/durations.json), plus the quickest "
                         "test of every file")
    group.addoption("--record-durations", action="store_true",
                    help="write every test's time to tests/durations.json at the end (for --fast)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--fast"):
        return
    recorded = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    by_file: dict[str, list] = {}
    for item in items:
        by_file.setdefault(item.nodeid.split("::")[0], []).append(item)
    keep, drop = [], []
    for file_items in by_file.values():
        quickest = min(file_items, key=lambda it: recorded.get(it.nodeid, 0.0))
        for it in file_items:
            t = recorded.get(it.nodeid)  # a test with no record (a new one) runs
            (keep if t is None or t <= FAST_LIMIT_S or it is quickest else drop).append(it)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


_TIMES: dict[str, float] = {}


def pytest_runtest_logreport(report):
    _TIMES[report.nodeid] = _TIMES.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption("--record-durations") and _TIMES:
        old = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
        old.update({k: round(v, 3) for k, v in _TIMES.items()})
        DURATIONS.write_text(json.dumps(dict(sorted(old.items())), indent=0) + "\n")
