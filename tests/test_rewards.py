"""Tests for repo_rl.rewards: extraction, the three built-in rewards, the verifier pool and the registry."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from repo_rl.rewards import (
    ChoiceReward,
    MathReward,
    RewardSpecError,
    VerifierPool,
    available_rewards,
    choice_reward,
    completion_text,
    extract_boxed,
    extract_choice,
    extract_number,
    load_reward,
    make_math_reward,
    make_numeric_reward,
    math_reward,
    numeric_reward,
    parse_choice,
    register_reward,
    strip_math_delimiters,
)
from repo_rl.rewards import registry as registry_module

SLOW_TOWER = r"\boxed{9^{9^{9}}}"  # exact evaluation of 9**387420489 runs far past any deadline


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _not_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_gone(pid: int, within: float = 10.0) -> bool:
    """True once ``pid`` has exited and been reaped (a zombie still answers ``kill(pid, 0)``)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if _not_running(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def mreward() -> Iterator[MathReward]:
    """A private math reward (own pool, one worker) shared by this module's tests."""
    reward = make_math_reward(timeout=5.0, num_workers=1)
    yield reward
    reward.close()


@pytest.fixture()
def helper_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Write an importable helper module with custom reward/task functions; return its name."""
    name = f"reward_helper_{os.getpid()}_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import os

            NOT_CALLABLE = 42

            def length_reward(prompts, completions, **kwargs):
                return [float(len(c)) for c in completions]

            class Scorers:
                @staticmethod
                def constant(prompts, completions, **kwargs):
                    return [0.5 for _ in completions]

            def boom(*args):
                raise RuntimeError("boom from the helper task")

            def crash(*args):
                os._exit(7)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{a} then \boxed{b}", "b"),
        (r"\boxed {x+1}", "x+1"),
        (r"\fbox{7}", "7"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\boxed{\boxed{3}}", "3"),
        (r"\boxed{5} and a cut-off \boxed{6", "5"),
        (r"$\boxed 9$", "9"),
        (r"\boxed{}", ""),
        ("no box here", None),
        (r"\boxedx{3}", None),
        (r"\boxed{unclosed", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


def test_extraction_is_linear_on_adversarial_text() -> None:
    nested = "\\boxed{" * 20000 + "1" + "}" * 20000
    texts = ["\\boxed{" * 50000, nested, "1," * 100000, "**" * 100000, "A " * 100000, "\\frac{1}{" * 30000]
    start = time.monotonic()
    for text in texts:
        extract_boxed(text)
        extract_number(text)
        extract_choice(text)
    assert time.monotonic() - start < 5.0
    assert extract_boxed(nested) == "1"


def test_strip_math_delimiters() -> None:
    assert strip_math_delimiters("  $x$ ") == "x"
    assert strip_math_delimiters(r"$$\frac12$$") == r"\frac12"
    assert strip_math_delimiters(r"\(a\)") == "a"
    assert strip_math_delimiters("$1$ and $2$") == "$1$ and $2$"


def test_completion_text_formats() -> None:
    assert completion_text("plain") == "plain"
    assert completion_text(chat("hi")) == "hi"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text", "text": "a1"}]}]
    assert completion_text(msgs) == "a1"
    assert completion_text([{"role": "user", "content": "only user"}]) == "only user"
    assert completion_text(None) == ""


# --------------------------------------------------------------------------- math_reward


def test_math_reward_strings_and_chat(mreward: MathReward) -> None:
    completions = [
        r"The result is \boxed{\frac{1}{2}}.",
        r"\boxed{0.5}",
        "So the answer is 0.5",
        r"\boxed{3}",
        r"$\boxed{(1,2]}$",
        "",
    ]
    answers = [r"\frac12", r"$\frac{1}{2}$", r"\boxed{1/2}", "4", "(1,2]", "1"]
    expected = [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert mreward(prompts=["p"] * 6, completions=completions, answer=answers) == expected
    assert mreward(prompts=[chat("p")] * 6, completions=[chat(c) for c in completions], answer=answers) == expected


def test_math_reward_ignores_extra_columns(mreward: MathReward) -> None:
    out = mreward(
        prompts=["q", "q"],
        completions=[r"\boxed{x^2+2x+1}", r"\boxed{x^2+1}"],
        answer=["(x+1)^2", "(x+1)^2"],
        solution=["...", "..."],
        domain=["math", "math"],
        id=[1, 2],
        completion_ids=[[1], [2]],
        trainer_state=object(),
    )
    assert out == [1.0, 0.0]


def test_math_reward_counts_items(mreward: MathReward) -> None:
    before = mreward.stats.snapshot()
    mreward(None, [r"\boxed{2}", r"\boxed{3}", "x"], answer=["2", "2", "2"])
    after = mreward.stats.snapshot()
    assert after["items"] - before["items"] == 3
    assert after["errors"] == before["errors"]
    assert after["timeouts"] == before["timeouts"]


def test_math_reward_missing_gold_is_error_not_zero(mreward: MathReward) -> None:
    before = mreward.stats.snapshot()
    assert mreward(None, [r"\boxed{1}", r"\boxed{1}"], answer=[None, "1.0"]) == [None, 1.0]
    assert mreward.stats.errors - before["errors"] == 1


def test_math_reward_argument_checks(mreward: MathReward) -> None:
    with pytest.raises(ValueError, match="answer"):
        mreward(prompts=["p"], completions=["x"])
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        mreward(prompts=None, completions=["a", "b"], answer=["1"])
    assert mreward(None, [], answer=[]) == []


def test_math_reward_timeout_returns_none_quickly() -> None:
    timeout = 0.75
    reward = make_math_reward(timeout=timeout, num_workers=1)
    try:
        assert reward(None, [r"\boxed{0.25}"], answer=[r"\frac14"]) == [1.0]  # starts the worker
        (old_pid,) = reward.pool.worker_pids()
        start = time.monotonic()
        out = reward(None, [r"\boxed{0.5}", SLOW_TOWER], answer=["1/2", "1"])
        elapsed = time.monotonic() - start
        assert out == [1.0, None]
        assert elapsed < timeout + 1.5, elapsed
        assert reward.stats.snapshot() == {"items": 3, "errors": 0, "timeouts": 1}
        assert wait_gone(old_pid), "the timed-out worker must be killed and reaped"
        # Items queued behind a timed-out one are still scored by the replacement worker.
        assert reward(None, [SLOW_TOWER, r"\boxed{0.5}"], answer=["1", "1/2"]) == [None, 1.0]
        assert reward.stats.timeouts == 2
    finally:
        reward.close()


def test_math_reward_from_non_main_thread() -> None:
    reward = make_math_reward(timeout=0.75, num_workers=1)
    results: list[object] = []

    def target() -> None:
        try:
            results.append(reward(None, [r"\boxed{\sqrt{8}}", SLOW_TOWER], answer=[r"2\sqrt{2}", "0"]))
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            results.append(exc)

    try:
        thread = threading.Thread(target=target)
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert results == [[1.0, None]]
        assert reward.stats.timeouts == 1
    finally:
        reward.close()


def test_math_reward_worker_error_and_crash_give_none(helper_module: str) -> None:
    class Boom(MathReward):
        task = f"{helper_module}:boom"

    class Crash(MathReward):
        task = f"{helper_module}:crash"

    boom = Boom(timeout=5.0, num_workers=1)
    crash = Crash(timeout=5.0, num_workers=1)
    try:
        assert boom(None, [r"\boxed{1.0}", r"\boxed{1}"], answer=["1", "1"]) == [None, 1.0]  # 2nd: fast path
        assert boom.stats.snapshot() == {"items": 2, "errors": 1, "timeouts": 0}
        outcome = boom.outcomes([r"\boxed{2.0}"], ["2"])[0]
        assert outcome.status == "error" and "boom from the helper task" in (outcome.error or "")
        assert crash(None, [r"\boxed{1.0}", r"\boxed{2.0}"], answer=["1", "2"]) == [None, None]
        assert crash.stats.snapshot() == {"items": 2, "errors": 2, "timeouts": 0}
    finally:
        boom.close()
        crash.close()


def test_math_reward_timeout_setting_and_pickle() -> None:
    reward = make_math_reward(timeout=3.0, num_workers=1)
    reward.timeout = 1.5
    assert reward.timeout == 1.5
    with pytest.raises(ValueError):
        reward.timeout = 0
    copy = pickle.loads(pickle.dumps(reward))
    assert copy.timeout == 1.5 and copy.__name__ == "math_reward"
    assert copy._pool is None


def test_builtin_names_for_trl() -> None:
    assert math_reward.__name__ == "math_reward"
    assert numeric_reward.__name__ == "numeric_reward"
    assert choice_reward.__name__ == "choice_reward"
    for fn in (math_reward, numeric_reward, choice_reward):
        assert set(fn.stats.snapshot()) == {"items", "errors", "timeouts"}


# --------------------------------------------------------------------------- numeric_reward


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("The total is 1,234,567 dollars.", "1234567", 1.0),
        ("x = 10 - 4 = 6", "6", 1.0),
        ("It drops to -12.5 degrees", "-12.5", 1.0),
        (r"\boxed{\frac{3}{4}}", "0.75", 1.0),
        (r"\boxed{-\dfrac{1}{2}}", "-0.5", 1.0),
        ("so 7/8 of the cake", "0.875", 1.0),
        ("The rate is 45%", "45", 1.0),
        (r"\boxed{5 \text{ cm}} then 9 more", "5", 1.0),
        ("about 3.14", "3.14159", 0.0),
        ("The answer is 12", "13", 0.0),
        ("no number", "1", 0.0),
        ("answer 72", r"\boxed{72}", 1.0),
        ("answer 72", "$72$", 1.0),
    ],
)
def test_numeric_reward(completion: str, answer: str, expected: float) -> None:
    assert numeric_reward(prompts=None, completions=[completion], answer=[answer]) == [expected]
    assert numeric_reward(prompts=None, completions=[chat(completion)], answer=[answer], id=[3]) == [expected]


def test_numeric_reward_tolerance_factory() -> None:
    loose = make_numeric_reward(rel_tol=1e-2)
    assert loose(None, ["about 3.14"], answer=["3.14159"]) == [1.0]
    assert numeric_reward(None, ["about 3.14"], answer=["3.14159"]) == [0.0]
    absolute = make_numeric_reward(rel_tol=0.0, abs_tol=0.5)
    assert absolute(None, ["0.4", "0.6"], answer=["0", "0"]) == [1.0, 0.0]
    with pytest.raises(ValueError):
        make_numeric_reward(rel_tol=-1)


def test_numeric_reward_bad_gold_is_error() -> None:
    reward = make_numeric_reward()
    assert reward(None, ["3", "3"], answer=["three", "3"]) == [None, 1.0]
    assert reward.stats.snapshot() == {"items": 2, "errors": 1, "timeouts": 0}


def test_extract_number_prefers_box() -> None:
    assert extract_number(r"\boxed{1,000} and 5") == 1000.0
    assert extract_number("values 1, 2, 3") == 3.0
    assert extract_number("nothing") is None


# --------------------------------------------------------------------------- choice_reward


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        (r"Thus \boxed{C}", "C", 1.0),
        (r"\boxed{\text{(B)}}", "B", 1.0),
        ("The answer is (C).", "(C)", 1.0),
        ("the answer is (c)", "C", 1.0),
        ("Answer: D", "D. Paris", 1.0),
        ("After checking each: **A**", "A", 1.0),
        ("Option A looks tempting but the answer is B", "B", 1.0),
        ("I'll go with\nE", "E", 1.0),
        ("Answer: B", "C", 0.0),
        ("I am not sure.", "A", 0.0),
        ("The answer is J", "J", 1.0),
    ],
)
def test_choice_reward(completion: str, answer: str, expected: float) -> None:
    assert choice_reward(prompts=None, completions=[completion], answer=[answer]) == [expected]
    assert choice_reward(prompts=None, completions=[chat(completion)], answer=[answer], extra=[0]) == [expected]


def test_choice_helpers_and_bad_gold() -> None:
    assert parse_choice("(C)") == "C"
    assert parse_choice("c. something") == "C"
    assert parse_choice("Paris") is None
    assert extract_choice("nothing to see") is None
    reward = ChoiceReward()
    assert reward(None, ["Answer: A", "Answer: A"], answer=["Paris", "A"]) == [None, 1.0]
    assert reward.stats.snapshot() == {"items": 2, "errors": 1, "timeouts": 0}
    abcd = ChoiceReward(letters="ABCD")
    assert abcd(None, ["The answer is E"], answer=["A"]) == [0.0]


# --------------------------------------------------------------------------- VerifierPool


def test_pool_runs_stdlib_tasks_with_errors_and_crashes() -> None:
    with VerifierPool(num_workers=1, timeout=5.0) as pool:
        out = pool.run("math:sqrt", [(4.0,), (-1.0,), (9.0,)])
        assert [o.status for o in out] == ["ok", "error", "ok"]
        assert out[0].value == 2.0 and out[2].value == 3.0
        assert "ValueError" in (out[1].error or "")
        out = pool.run("os:_exit", [(3,)])
        assert out[0].status == "error" and "exit code 3" in (out[0].error or "")
        assert pool.run("math:sqrt", [(16.0,)])[0].value == 4.0
        assert pool.run("no_such_module_xyz:f", [(1,)])[0].status == "error"
        assert pool.counters.crashes == 1


def test_pool_deadline_is_per_item_not_per_batch() -> None:
    with VerifierPool(num_workers=1, timeout=0.6, chunk_size=8) as pool:
        pool.run("time:sleep", [(0,)])
        start = time.monotonic()
        out = pool.run("time:sleep", [(0.25,)] * 4)  # 1 s in total, each well under 0.6 s
        assert [o.status for o in out] == ["ok"] * 4
        assert time.monotonic() - start >= 0.9
        out = pool.run("time:sleep", [(0.1,), (30,), (0.1,)])
        assert [o.status for o in out] == ["ok", "timeout", "ok"]
        assert 0.5 <= out[1].elapsed < 1.5
        assert pool.counters.timeouts == 1


def test_pool_two_workers_run_in_parallel() -> None:
    with VerifierPool(num_workers=2, timeout=5.0) as pool:
        pool.run("time:sleep", [(0,), (0,)])
        assert len(pool.worker_pids()) == 2
        start = time.monotonic()
        out = pool.run("time:sleep", [(0.4,)] * 4)
        assert all(o.ok for o in out)
        assert time.monotonic() - start < 1.4


def test_pool_close_reaps_workers_and_restarts_lazily() -> None:
    pool = VerifierPool(num_workers=1, timeout=5.0)
    pool.run("math:sqrt", [(1.0,)])
    pids = pool.worker_pids()
    assert len(pids) == 1
    pool.close()
    assert all(wait_gone(pid) for pid in pids)
    assert pool.worker_pids() == []
    assert pool.run("math:sqrt", [(1.0,)])[0].value == 1.0
    pool.close()


def test_pool_rejects_bad_args() -> None:
    with pytest.raises(ValueError):
        VerifierPool(num_workers=0)
    with pytest.raises(ValueError):
        VerifierPool(timeout=0)
    with pytest.raises(ValueError):
        VerifierPool(chunk_size=0)


def _run_python(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True, timeout=60, env=env)


def test_pool_workers_exit_with_interpreter(tmp_path: Path) -> None:
    script = tmp_path / "uses_pool.py"
    script.write_text(
        textwrap.dedent(
            """
            from repo_rl.rewards import VerifierPool

            if __name__ == "__main__":
                pool = VerifierPool(num_workers=2, timeout=5.0)
                pool.run("time:sleep", [(0,), (0,)])
                print(" ".join(str(p) for p in pool.worker_pids()), flush=True)
            """
        )
    )
    proc = _run_python([str(script)])
    assert proc.returncode == 0, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    assert all(wait_gone(pid) for pid in pids)


def test_math_reward_in_unguarded_stdin_script() -> None:
    """Workers never re-import the caller's __main__: no guard needed, `python -` works."""
    code = textwrap.dedent(
        r"""
        from repo_rl.rewards import make_math_reward
        reward = make_math_reward(timeout=5.0, num_workers=1)
        print(reward(None, [r"\boxed{0.50}", r"\boxed{3}"], answer=["1/2", "4"]))
        print(reward.pool.worker_pids()[0])
        """
    )
    proc = _run_python(["-"], stdin=code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert proc.stdout.splitlines()[0] == "[1.0, 0.0]"
    assert wait_gone(int(lines[-1]))


# --------------------------------------------------------------------------- registry


@pytest.fixture()
def clean_registry() -> Iterator[None]:
    saved = dict(registry_module._REGISTRY)
    yield
    registry_module._REGISTRY.clear()
    registry_module._REGISTRY.update(saved)


def test_load_builtin_rewards() -> None:
    assert load_reward("math") is math_reward
    assert load_reward("numeric") is numeric_reward
    assert load_reward(" choice ") is choice_reward
    assert {"math", "numeric", "choice"} <= set(available_rewards())


def test_load_reward_dotted_paths(helper_module: str) -> None:
    assert helper_module not in sys.modules
    fn = load_reward(f"{helper_module}:length_reward")
    assert helper_module in sys.modules
    assert fn(prompts=None, completions=["ab", "abcd"]) == [2.0, 4.0]
    assert load_reward(f"{helper_module}.length_reward") is fn
    const = load_reward(f"{helper_module}:Scorers.constant")
    assert const(None, ["x"]) == [0.5]
    assert load_reward(f"{helper_module}.Scorers.constant") is const


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("maths", ["'maths'", "unknown reward", "did you mean 'math'"]),
        ("Numeric", ["'Numeric'", "did you mean 'numeric'"]),
        ("nonexistent_pkg_xyz.mod:fn", ["'nonexistent_pkg_xyz.mod:fn'", "module 'nonexistent_pkg_xyz' not found"]),
        ("nonexistent_pkg_xyz.fn", ["module 'nonexistent_pkg_xyz' not found"]),
        ("os.path:no_such_function", ["'os.path:no_such_function'", "has no attribute 'no_such_function'"]),
        ("os.path.no_such_function", ["has no attribute 'no_such_function'"]),
        ("os.path:jion", ["did you mean 'join'"]),
        ("os:sep", ["'os:sep'", "not callable", "str"]),
        ("", ["empty"]),
        ("pkg.mod:", ["expected 'package.module:function'"]),
        ("a b.c", ["expected"]),
    ],
)
def test_load_reward_errors(spec: str, fragments: list[str]) -> None:
    with pytest.raises(RewardSpecError) as info:
        load_reward(spec)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(info.value, ValueError)


def test_load_reward_errors_from_helper_module(helper_module: str, tmp_path: Path) -> None:
    with pytest.raises(RewardSpecError, match="not callable"):
        load_reward(f"{helper_module}:NOT_CALLABLE")
    with pytest.raises(RewardSpecError, match="did you mean 'length_reward'"):
        load_reward(f"{helper_module}:lenght_reward")
    broken = f"{helper_module}_broken"
    (tmp_path / f"{broken}.py").write_text("import definitely_missing_dependency_xyz\n")
    with pytest.raises(RewardSpecError) as info:
        load_reward(f"{broken}:f")
    assert "importing module" in str(info.value) and "definitely_missing_dependency_xyz" in str(info.value)
    sys.modules.pop(broken, None)


def test_register_reward(clean_registry: None, helper_module: str) -> None:
    def toy(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    register_reward("toy_test", toy)
    assert load_reward("toy_test") is toy
    register_reward("toy_test", toy)  # same object again: no-op
    with pytest.raises(ValueError, match="already registered"):
        register_reward("toy_test", lambda *a, **k: [])
    register_reward("toy_test", numeric_reward, overwrite=True)
    assert load_reward("toy_test") is numeric_reward
    register_reward("lazy_test", f"{helper_module}:length_reward")
    assert helper_module not in sys.modules
    assert load_reward("lazy_test")(None, ["abc"]) == [3.0]
    with pytest.raises(ValueError, match="invalid reward name"):
        register_reward("bad.name", toy)
    with pytest.raises(TypeError):
        register_reward("not_fn", 3)  # type: ignore[arg-type]
