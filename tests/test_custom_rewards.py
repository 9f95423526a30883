"""User reward functions (``reward.funcs: [pkg.mod:fn]``) that misbehave: each case has a clear
outcome and no traceback. Every test writes a real module into ``tmp_path`` and goes through
:class:`RewardScorer` the way the trainer does (``RewardScorer(specs, weights, timeout)``, then
``scorer(prompts, completions, examples)``)."""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from repo_rl.data import Example
from repo_rl.errors import TrainingError, UserError
from repo_rl.rewards import load_reward, register_reward
from repo_rl.rewards import registry as registry_module
from repo_rl.rewards.guard import GuardedReward
from repo_rl.rewards.scorer import RewardScorer


@pytest.fixture()
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """``make(source)`` writes an importable module into tmp_path and returns its name."""
    names: list[str] = []
    monkeypatch.syspath_prepend(str(tmp_path))
    base = "crw_" + re.sub(r"\W", "_", tmp_path.name)

    def make(source: str) -> str:
        name = f"{base}_{len(names)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield make
    for name in names:
        sys.modules.pop(name, None)


@pytest.fixture()
def scorers() -> Iterator[Callable[..., RewardScorer]]:
    """Builds scorers and stops their worker processes afterwards."""
    made: list[RewardScorer] = []

    def build(specs: list[str], timeout: float = 5.0, weights: list[float] | None = None) -> RewardScorer:
        s = RewardScorer(specs, weights, timeout)
        made.append(s)
        return s

    yield build
    for s in made:
        s.close()


@pytest.fixture()
def clean_registry() -> Iterator[None]:
    saved = dict(registry_module._REGISTRY)
    yield
    registry_module._REGISTRY.clear()
    registry_module._REGISTRY.update(saved)


def score(scorer: RewardScorer, completions: list[str], answer: str = "5") -> tuple[list[float], dict[str, float]]:
    examples = [Example(prompt=f"q{i}", answer=answer, id=f"q{i}") for i in range(len(completions))]
    rewards, metrics = scorer([e.prompt for e in examples], list(completions), examples)
    return rewards.tolist(), metrics


def same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b))


def warnings_of(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and needle in r.getMessage()]


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# --------------------------------------------------------------------------- 1. raising


RAISES = """
    def on_bad(prompts, completions, answer, **kw):
        out = []
        for c, a in zip(completions, answer):
            if "bad" in c:
                raise ValueError(f"cannot parse {c!r}")
            out.append(1.0 if a in c else 0.0)
        return out

    def always(prompts, completions, **kw):
        raise KeyError("no column 'gold'")

    def on_fail(prompts, completions, **kw):
        if any("fail" in c for c in completions):
            raise RuntimeError("failing batch")
        return [1.0 for _ in completions]

    def exits(prompts, completions, **kw):
        import sys
        if "exit" in completions[0]:
            sys.exit(3)
        return [1.0 for _ in completions]

    def dies(prompts, completions, **kw):
        import os
        if any("die" in c for c in completions):
            os._exit(9)
        return [1.0 for _ in completions]
"""


def test_raising_items_are_counted_errors_and_the_others_keep_their_reward(make_module, scorers, caplog):
    mod = make_module(RAISES)
    s = scorers([f"{mod}:on_bad"])
    r, m = score(s, ["5", "bad", "x", "bad 5"])
    assert same(r, [1.0, math.nan, 0.0, math.nan]), r  # the batch raised; the item retries found 1 and 3
    assert m["rewards/verifier_errors"] == 2 and m["rewards/invalid"] == 2 and m["rewards/verifier_timeouts"] == 0
    r, m = score(s, ["bad"])
    assert same(r, [math.nan]) and m["rewards/verifier_errors"] == 1
    (w,) = warnings_of(caplog, f"{mod}:on_bad")  # once, naming the function and the exception
    assert "ValueError: cannot parse" in w


def test_raising_on_every_call_stops_after_three_consecutive_calls(make_module, scorers):
    mod = make_module(RAISES)
    s = scorers([f"{mod}:always"])
    for _ in range(2):
        r, m = score(s, ["5", "6"])
        assert same(r, [math.nan, math.nan]) and m["rewards/verifier_errors"] == 2
    with pytest.raises(TrainingError) as e:
        score(s, ["5", "6"])
    msg = one_line(e.value)
    assert f"{mod}:always" in msg and "3 consecutive calls" in msg and "KeyError" in msg and "no column 'gold'" in msg, msg


def test_a_call_that_scores_resets_the_failure_count(make_module, scorers):
    mod = make_module(RAISES)
    s = scorers([f"{mod}:on_fail"])
    for batch in (["fail", "fail"], ["fail"], ["ok"], ["fail", "fail"], ["fail"]):
        score(s, batch)
    with pytest.raises(TrainingError, match="on_fail raised on every completion in 3"):
        score(s, ["fail"])


def test_sys_exit_or_a_dying_process_inside_the_call_is_an_error_not_the_end(make_module, scorers):
    mod = make_module(RAISES)
    s = scorers([f"{mod}:exits", f"{mod}:dies"])
    r, m = score(s, ["exit", "5"])
    # Item 0: `exits` errored (None, counted), `dies` gave 1.0, and a None leaves only its own term
    # out (TRL's nansum); item 1: both functions gave 1.0.
    assert same(r, [1.0, 2.0]) and m["rewards/verifier_errors"] == 1
    r, m = score(s, ["die", "5"])  # the worker process dies: that function's items are errors
    assert same(r, [1.0, 1.0]) and m["rewards/verifier_errors"] == 2  # `exits` scored both
    r, _ = score(s, ["5", "5"])  # a new worker takes over
    assert r == [2.0, 2.0]


# --------------------------------------------------------------------------- 2. not a list


@pytest.mark.parametrize(
    ("body", "what"),
    [
        ("None", "returned None"),
        ("{c: 1.0 for c in completions}", "returned dict ({"),
        ("'1.0'", "returned str ('1.0')"),
        ("0.5", "returned float (0.5)"),
        ("(x for x in [1.0] * len(completions))", "returned generator"),
        ("[1.0]", "returned 1 values for 2 completions"),
    ],
)
def test_a_return_value_that_is_not_a_list_is_one_clear_error(make_module, scorers, body, what):
    mod = make_module(f"def fn(prompts, completions, **kw):\n    return {body}\n")
    s = scorers([f"{mod}:fn"])
    with pytest.raises(TrainingError) as e:
        score(s, ["5", "6"])
    msg = one_line(e.value)
    assert msg.startswith(f"reward {mod}:fn ") and what in msg and "expected a list of 2 values" in msg, msg


# --------------------------------------------------------------------------- 3. value types


@pytest.mark.parametrize(
    ("body", "what"),
    [
        ("['1' for _ in completions]", "returned str ('1') for completion 0"),
        ("[1.0, b'1']", "returned bytes (b'1') for completion 1"),
        ("[[1.0] for _ in completions]", "returned list ([1.0]) for completion 0"),
        ("[1.0, complex(1, 0)]", "returned complex ((1+0j)) for completion 1"),
        ("[1.0, __import__('decimal').Decimal('1')]", "returned decimal.Decimal"),
        ("[1.0, __import__('torch').tensor([1.0])]", "returned torch.Tensor"),
    ],
)
def test_values_that_are_not_numbers_are_refused(make_module, scorers, body, what):
    mod = make_module(f"def fn(prompts, completions, **kw):\n    return {body}\n")
    s = scorers([f"{mod}:fn"])
    with pytest.raises(TrainingError) as e:
        score(s, ["5", "6"])
    msg = one_line(e.value)
    assert f"reward {mod}:fn " in msg and what in msg and "expected a number" in msg, msg


def test_bools_numpy_scalars_and_0d_tensors_are_numbers(make_module, scorers):
    mod = make_module(
        """
        import fractions
        import numpy as np
        import torch

        def fn(prompts, completions, **kw):
            return [True, False, np.float32(0.25), np.int64(3), np.bool_(True), np.array(0.5),
                    torch.tensor(0.75), torch.tensor(2, dtype=torch.int32), fractions.Fraction(1, 4), None, 7]

        def as_array(prompts, completions, **kw):
            return np.array([0.5] * len(completions))

        def as_tensor(prompts, completions, **kw):
            return torch.tensor([True] * len(completions))
        """
    )
    s = scorers([f"{mod}:fn"])
    r, m = score(s, ["c"] * 11)
    assert same(r, [1.0, 0.0, 0.25, 3.0, 1.0, 0.5, 0.75, 2.0, 0.25, math.nan, 7.0]), r
    assert m["rewards/invalid"] == 1
    r, _ = score(scorers([f"{mod}:as_array", f"{mod}:as_tensor"]), ["c", "d"])
    assert r == [1.5, 1.5]


# --------------------------------------------------------------------------- 4. out of range


def test_values_beyond_float32_or_not_finite_are_invalid_and_warned_once(make_module, scorers, caplog):
    mod = make_module(
        """
        def fn(prompts, completions, **kw):
            return [1e39, -1e39, float("inf"), float("nan"), 0.5, 10 ** 400, 3e38, None]
        """
    )
    s = scorers([f"{mod}:fn"])
    for _ in range(2):
        r, m = score(s, ["c"] * 8)
        assert same(r, [math.nan] * 4 + [0.5, math.nan, 3e38, math.nan]), r
        assert m["rewards/invalid"] == 6 and m["rewards/fn/count"] == 2
        assert torch.isfinite(torch.tensor([x for x in r if not math.isnan(x)]).float()).all()
    (w,) = warnings_of(caplog, f"{mod}:fn")
    assert "float32" in w and "invalid" in w and "1e+39" in w


def test_a_weighted_sum_beyond_float32_is_invalid(make_module, scorers, caplog):
    mod = make_module("def big(prompts, completions, **kw):\n    return [3e38, 1.0][: len(completions)]\n")
    s = scorers([f"{mod}:big", f"{mod}:big"])
    r, m = score(s, ["a", "b"])
    assert same(r, [math.nan, 2.0]) and m["rewards/invalid"] == 1
    assert warnings_of(caplog, "weighted sum")


# --------------------------------------------------------------------------- 5. never returns


HANGS = """
    import os, time

    def fn(prompts, completions, **kw):
        if any("hang" in c for c in completions):
            with open(os.environ["CRW_PID_FILE"], "w") as f:
                f.write(str(os.getpid()))
            time.sleep(3600)
        return [1.0 for _ in completions]
"""


def test_a_function_that_never_returns_is_stopped_after_timeout_times_items(make_module, scorers, tmp_path, monkeypatch, caplog):
    pid_file = tmp_path / "pid"
    monkeypatch.setenv("CRW_PID_FILE", str(pid_file))
    mod = make_module(HANGS)
    s = scorers([f"{mod}:fn"], timeout=0.5)
    assert score(s, ["5"])[0] == [1.0]  # the worker is up
    t0 = time.monotonic()
    r, m = score(s, ["5", "hang"])
    wall = time.monotonic() - t0
    assert same(r, [math.nan, math.nan]) and m["rewards/verifier_timeouts"] == 2 and m["rewards/verifier_errors"] == 0
    assert 0.9 <= wall < 15, wall  # 2 completions x 0.5 s, then a kill
    pid = int(pid_file.read_text())
    assert pid != os.getpid()
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(pid, 0)
    (w,) = warnings_of(caplog, f"{mod}:fn")
    assert "did not return" in w and "0.5s" in w
    assert score(s, ["5", "5"])[0] == [1.0, 1.0]  # a fresh worker carries on


def test_closures_run_in_process_and_are_bounded_by_a_thread_deadline(clean_registry, scorers, caplog):
    release = threading.Event()
    calls: list[int] = []

    def closure(prompts, completions, **kw):  # not importable, not picklable: runs in a thread
        calls.append(len(completions))
        if "hang" in completions[0]:
            release.wait(30)
        if any("bad" in c for c in completions):
            raise ValueError("bad item")
        return [float(len(c)) for c in completions]

    register_reward("crw_closure", closure)
    s = scorers(["crw_closure"], timeout=0.3)
    (fn,) = s.funcs
    assert isinstance(fn, GuardedReward) and fn.mode == "thread"
    r, m = score(s, ["ab", "bad", "abcd"])
    assert same(r, [2.0, math.nan, 4.0]) and m["rewards/verifier_errors"] == 1
    assert calls == [3, 1, 1, 1]  # the state is this process's: the batch, then one by one
    t0 = time.monotonic()
    r, m = score(s, ["hang", "x"])
    assert time.monotonic() - t0 < 5
    assert same(r, [math.nan, math.nan]) and m["rewards/verifier_timeouts"] == 2
    (w,) = warnings_of(caplog, "did not return")
    assert "thread" in w and "may still be running" in w
    n_calls = len(calls)
    r, m = score(s, ["ab"])  # the abandoned call still runs: skipped, counted as a timeout
    assert same(r, [math.nan]) and m["rewards/verifier_timeouts"] == 1 and len(calls) == n_calls
    release.set()
    deadline = time.monotonic() + 10
    while fn._running is not None and fn._running.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert score(s, ["ab"])[0] == [2.0]


def test_import_paths_run_in_a_worker_process_unless_marked_in_process(make_module, scorers):
    mod = make_module(
        """
        import os

        def pid(prompts, completions, **kw):
            return [float(os.getpid()) for _ in completions]

        def pid_here(prompts, completions, **kw):
            return [float(os.getpid()) for _ in completions]
        pid_here.in_process = True
        """
    )
    s = scorers([f"{mod}:pid", f"{mod}.pid_here"])
    assert [f.mode for f in s.funcs] == ["process", "thread"]
    _, m = score(s, ["a"])
    assert m["rewards/pid/sum"] != os.getpid() and m["rewards/pid_here/sum"] == os.getpid()


# --------------------------------------------------------------------------- 6. import side effects


def test_sys_exit_at_import_is_one_line_not_a_silent_exit(make_module):
    mod = make_module("import sys\nsys.exit(0)\ndef fn(prompts, completions, **kw):\n    return [0.0]\n")
    with pytest.raises(UserError) as e:
        RewardScorer([f"{mod}:fn"], None, 1.0)
    msg = one_line(e.value)
    assert msg.startswith("reward.funcs:") and f"importing {mod} exited (code 0)" in msg, msg
    assert mod not in sys.modules


def test_argparse_at_import_does_not_see_our_command_line(make_module, scorers, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["repo-rl", "train", "--config", "x.yaml", "--output-dir", "out"])
    required = make_module(
        """
        import argparse
        p = argparse.ArgumentParser()
        p.add_argument("--judge-url", required=True)
        ARGS = p.parse_args()
        def fn(prompts, completions, **kw):
            return [0.0 for _ in completions]
        """
    )
    with pytest.raises(UserError) as e:
        RewardScorer([f"{required}:fn"], None, 1.0)
    msg = one_line(e.value)
    assert f"importing {required} exited (code 2)" in msg and "--judge-url" in msg, msg
    assert "usage:" not in capsys.readouterr().err  # its usage is not printed as if it were ours
    assert sys.argv[:2] == ["repo-rl", "train"]

    optional = make_module(
        """
        import argparse, sys
        p = argparse.ArgumentParser()
        p.add_argument("--scale", type=float, default=2.0)
        ARGS = p.parse_args()
        ARGV = list(sys.argv)
        print("loaded the judge", file=sys.stderr)
        def fn(prompts, completions, **kw):
            return [ARGS.scale * len(ARGV) for _ in completions]
        """
    )
    s = scorers([f"{optional}:fn"])
    assert capsys.readouterr().err.count("loaded the judge") == 1  # what it prints is still shown
    assert sys.argv[:2] == ["repo-rl", "train"]
    argv = sys.modules[optional].ARGV
    assert len(argv) == 1 and argv[0].endswith(f"{optional}.py"), argv
    assert score(s, ["a"])[0] == [2.0]  # re-imported in the worker with the same neutral argv ...
    assert s.funcs[0].mode == "process"  # ... there, not after falling back to a thread here


def test_load_reward_reports_an_import_time_exit(make_module):
    mod = make_module("raise SystemExit('bye')\n")
    with pytest.raises(ValueError, match=re.escape(f"importing {mod} exited (code 'bye')")):
        load_reward(f"{mod}.fn")


# --------------------------------------------------------------------------- 7. nothing scored


def test_consecutive_calls_without_any_reward_are_counted(make_module, scorers):
    mod = make_module(
        """
        def maybe(prompts, completions, **kw):
            return [1.0 if c == "ok" else None for c in completions]

        def always(prompts, completions, **kw):
            raise ValueError("judge offline")
        """
    )
    s = scorers([f"{mod}:maybe"])
    for k in (1, 2, 3):
        _, m = score(s, ["no", "no"])
        assert s.unscored_calls == k and m["rewards/unscored"] == 2 and m["rewards/items"] == 2
    msg = s.unscored_message(3)
    assert "3 consecutive steps" in msg and f"{mod}:maybe: 6 of 6 completions without a reward" in msg, msg
    _, m = score(s, ["no", "ok"])
    assert s.unscored_calls == 0 and m["rewards/unscored"] == 1
    _, m = score(s, [])  # nothing to score: the count is left as it is
    assert s.unscored_calls == 0 and m["rewards/items"] == 0

    s2 = scorers([f"{mod}:always"])
    for _ in range(2):
        score(s2, ["a"])
    msg = one_line(TrainingError(s2.unscored_message(2)))
    assert "2 errors" in msg and "ValueError: judge offline" in msg, msg
