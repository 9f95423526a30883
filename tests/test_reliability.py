"""Reliability: the malformed-input corpus, adversarial verifier inputs, determinism and security.

The corpus lives in ``tests/data/malformed/`` (``cases.json`` lists every case; see its
``about``). Each case runs ``repo-rl train`` on the tiny test model and must end with exit
code 2 and one stderr line ``repo-rl: error: ...`` that names the file, row or key; never a
traceback, a hang, or an output directory with checkpoints or metrics rows. Cases marked
``bug`` in the manifest fail on the code of 2026-11-24; docs/RELIABILITY.md gives the fixes.

``run_case`` is shared with ``benchmarks/reliability_report.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import pytest

from .conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
# Subprocesses import the same repo_rl as this process (src/ or an installed copy).
SRC = Path(__import__("repo_rl").__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parent / "data" / "malformed"
MANIFEST = json.loads((CORPUS / "cases.json").read_text(encoding="utf-8"))
CASES: list[dict[str, Any]] = MANIFEST["cases"]

# Every case trains at most one short step, single-threaded (the machine has 2 shared cores).
BASE = {
    "algorithm.method": "grpo",
    "train.max_steps": 1,
    "train.prompts_per_step": 2,
    "train.threads": 1,
    "algorithm.max_completion_length": 4,
}
CASE_TIMEOUT_S = 60  # a case that takes longer is a hang
SUBPROCESS_CASES = [
    "unknown_flag",
    "bad_yaml",
    "truncated_json",
    "non_utf8",
    "model_no_config",
    "output_dir_under_a_file",
    "lone_surrogate",
]
ERROR_PREFIX = "repo-rl: error:"


# --------------------------------------------------------------------------------------
# Running one corpus case
# --------------------------------------------------------------------------------------


class CaseTimeout(BaseException):
    """Raised in the main thread when an in-process case overruns (BaseException: nothing catches it)."""


@contextlib.contextmanager
def _deadline(seconds: int):
    def on_alarm(signum, frame):
        raise CaseTimeout(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _fill(text: str, subst: dict[str, str]) -> str:
    for k, v in subst.items():
        text = text.replace("{" + k + "}", v)
    return text


def _setup(case: dict[str, Any], tmp: Path, model: Path) -> None:
    if case.get("setup") == "truncated_model":
        dst = tmp / "truncated_model"
        if not dst.exists():
            shutil.copytree(model, dst)
            w = dst / "model.safetensors"
            w.write_bytes(w.read_bytes()[:1000])


def case_argv(case: dict[str, Any], tmp: Path, model: Path, good: Path) -> tuple[list[str], Path, dict[str, str]]:
    """The argv of a corpus case, its output directory and the placeholder values."""
    tmp.mkdir(parents=True, exist_ok=True)
    empty = tmp / "empty.yaml"
    empty.write_text("{}\n")
    subst = {"corpus": str(CORPUS), "model": str(model), "good": str(good), "tmp": str(tmp)}
    subst["data"] = str(CORPUS / case["data"]) if "data" in case else str(good)
    subst["config"] = str(CORPUS / case["config"]) if "config" in case else str(empty)
    out = Path(_fill(case.get("output_dir", "{tmp}/out"), subst))
    if "argv" in case:
        return [_fill(a, subst) for a in case["argv"]], out, subst
    overrides = tiny_overrides(model, Path(subst["data"]), **BASE)
    extra = [f"{k}={_fill(str(v), subst)}" for k, v in case.get("set", {}).items()]
    argv = ["train", "--config", subst["config"], "--output-dir", str(out), *overrides, *extra, *case.get("flags", [])]
    return argv, out, subst


def _run_inprocess(argv: list[str], timeout: int) -> tuple[Optional[int], str, str]:
    from repo_rl.cli import main

    err = io.StringIO()
    tb = ""
    rc: Optional[int]
    with contextlib.redirect_stderr(err):
        try:
            with _deadline(timeout):
                rc = main(argv)
        except SystemExit as e:  # argparse usage errors
            rc = e.code if isinstance(e.code, int) else 1
        except CaseTimeout as e:
            rc, tb = None, f"HANG: {e}"
        except BaseException:  # noqa: BLE001 - any escape from main() is a finding
            rc, tb = None, traceback.format_exc()
    return rc, err.getvalue(), tb


def _child_limits() -> None:  # runs in the child: bound memory so a runaway case cannot take the machine
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(REPO)])
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _run_subprocess(argv: list[str], timeout: int) -> tuple[Optional[int], str, str]:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "repo_rl.cli", *argv],
            capture_output=True, text=True, errors="replace", env=cli_env(), cwd=REPO, timeout=timeout,
            preexec_fn=_child_limits,
        )
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return None, stderr, f"HANG: no exit within {timeout} s"
    return proc.returncode, proc.stderr, ""


def check_outcome(rc: Optional[int], stderr: str, tb: str, expect: list[str], out: Path) -> list[str]:
    """Everything wrong with one outcome (empty: handled as required)."""
    problems = []
    if tb:
        problems.append(("escaped main(): " + tb.strip().splitlines()[-1]) if not tb.startswith("HANG") else tb)
    if "Traceback (most recent call last)" in stderr:
        problems.append("traceback on stderr: " + stderr.strip().splitlines()[-1][:300])
    if rc != 2 and not tb:
        problems.append(f"exit code {rc}, expected 2")
    lines = [l for l in stderr.replace("\r", "\n").splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith(ERROR_PREFIX)]
    if not tb:
        if len(errors) != 1:
            problems.append(f"{len(errors)} '{ERROR_PREFIX}' lines: {errors[:3]}")
        elif lines[-1] != errors[0]:
            problems.append(f"the error is not the last stderr line (last: {lines[-1][:200]!r})")
        else:
            missing = [n for n in expect if n not in errors[0]]
            if missing:
                problems.append(f"message {errors[0]!r} does not name {missing}")
    if out.is_dir():
        steps = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
        if steps:
            problems.append(f"left checkpoints {steps}")
        m = out / "metrics.jsonl"
        if m.is_file() and m.read_text(errors="replace").strip():
            problems.append("left metrics rows")
    return problems


def run_case(case: dict[str, Any], tmp: Path, model: Path, good: Path, mode: str = "inprocess",
             timeout: int = CASE_TIMEOUT_S) -> dict[str, Any]:
    """Run one corpus case; returns rc, stderr, problems (empty list: handled) and seconds."""
    _setup(case, tmp, model)
    argv, out, subst = case_argv(case, tmp, model, good)
    t0 = time.monotonic()
    runner = _run_inprocess if mode == "inprocess" else _run_subprocess
    rc, stderr, tb = runner(argv, timeout)
    seconds = time.monotonic() - t0
    expect = [_fill(n, subst) for n in case["expect"]]
    return {"rc": rc, "stderr": stderr, "problems": check_outcome(rc, stderr, tb, expect, out), "seconds": seconds}


def _needs_skip(case: dict[str, Any]) -> Optional[str]:
    if case.get("needs_no_cuda"):
        import torch

        if torch.cuda.is_available():
            return "CUDA is available here"
    return None


# --------------------------------------------------------------------------------------
# 1. The corpus
# --------------------------------------------------------------------------------------


def test_corpus_is_large_and_well_formed():
    ids = [c["id"] for c in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)
    for c in CASES:
        assert c["expect"], c["id"]
        for key in ("data", "config"):
            if key in c and not c["id"].endswith("_missing"):
                assert (CORPUS / c[key]).is_file(), (c["id"], c[key])
    # Nothing big is checked in: the 10 MB row is generated at test time.
    assert sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file()) < 1 << 20


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_malformed_input_fails_cleanly(case, tmp_path, tiny_model_dir, tiny_data):
    why = _needs_skip(case)
    if why:
        pytest.skip(why)
    res = run_case(case, tmp_path, tiny_model_dir, tiny_data)
    assert not res["problems"], f"{case['id']} ({case['what']}): {res['problems']}"


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_malformed_input_in_a_real_process_has_no_traceback(case_id, tmp_path, tiny_model_dir, tiny_data):
    (case,) = [c for c in CASES if c["id"] == case_id]
    res = run_case(case, tmp_path, tiny_model_dir, tiny_data, mode="subprocess", timeout=180)
    assert not res["problems"], f"{case_id}: {res['problems']}\n{res['stderr'][-2000:]}"


def _huge_row_file(tmp_path: Path, mib: int = 10) -> Path:
    unit = "what is 1+1? "
    prompt = unit * ((mib << 20) // len(unit) + 1)
    path = tmp_path / "huge.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "small", "prompt": "what is 2+2?", "answer": "4"}) + "\n")
        fh.write(json.dumps({"id": "huge", "prompt": prompt, "answer": "2"}) + "\n")
    assert path.stat().st_size >= mib << 20
    return path


def test_ten_megabyte_row_is_a_clear_error_before_training(tmp_path, tiny_model_dir):
    """A 10 MB prompt fits no model context. The decided behaviour (docs/RELIABILITY.md): a
    prompt that cannot fit the model's context next to ``algorithm.max_completion_length``
    (or exceeds ``data.max_prompt_length`` when set) is a data error naming the row, raised
    before the first step; it is never truncated silently. Run as a real process with an
    8 GiB address-space limit (a past bug tokenized all 8M tokens and died in the embedding)."""
    data = _huge_row_file(tmp_path)
    case = {"id": "ten_mb_row", "data": str(data), "expect": ["huge"]}
    out = tmp_path / "out"
    argv = ["train", "--config", str(_empty_config(tmp_path)), "--output-dir", str(out),
            *tiny_overrides(tiny_model_dir, data, **BASE)]
    rc, stderr, tb = _run_subprocess(argv, timeout=240)
    problems = check_outcome(rc, stderr, tb, case["expect"], out)
    assert not problems, f"{problems}\n{stderr[-1500:]}"


@pytest.mark.slow
def test_ten_megabyte_row_over_max_prompt_length_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    """With ``data.max_prompt_length`` set the row is refused, after tokenizing all 10 MB
    (about 20 s on 2 cores). Slow: ``python -m pytest -m slow tests/test_reliability.py``."""
    data = _huge_row_file(tmp_path)
    out = tmp_path / "out"
    argv = ["train", "--config", str(_empty_config(tmp_path)), "--output-dir", str(out),
            *tiny_overrides(tiny_model_dir, data, **BASE), "data.max_prompt_length=256"]
    rc, stderr, tb = _run_inprocess(argv, timeout=300)
    problems = check_outcome(rc, stderr, tb, ["huge", "data.max_prompt_length"], out)
    assert not problems, problems


def _empty_config(tmp_path: Path) -> Path:
    p = tmp_path / "empty.yaml"
    p.write_text("{}\n")
    return p


def _read(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _train(tmp_path: Path, name: str, overrides: list[str], *flags: str) -> int:
    from repo_rl.cli import main

    return main(["train", "--config", str(_empty_config(tmp_path)), "--output-dir", str(tmp_path / name), *flags, *overrides])


@pytest.mark.parametrize("fn", ["not_a_number"])
def test_reward_that_breaks_its_contract_is_one_clear_line(fn, tmp_path, tiny_model_dir, tiny_data, capsys):
    """A custom reward returning strings: the run stops with one line naming the reward, no traceback."""
    over = tiny_overrides(tiny_model_dir, tiny_data, **{**BASE, "reward.funcs": f"[tests.helpers.fault_rewards:{fn}]"})
    rc, stderr, tb = _run_inprocess(["train", "--config", str(_empty_config(tmp_path)), "--output-dir",
                                     str(tmp_path / "o"), *over], timeout=CASE_TIMEOUT_S)
    assert not tb, tb.strip().splitlines()[-1]
    lines = [l for l in stderr.splitlines() if l.startswith("repo-rl:") and ("error" in l or "stopped" in l)]
    assert rc in (1, 2) and len(lines) == 1 and fn in lines[0], stderr


# --------------------------------------------------------------------------------------
# Verifier inputs: adversarial answers finish within the per-item timeout
# --------------------------------------------------------------------------------------

ADVERSARIAL = {
    # name: (completion, must time out)
    "power_tower": (r"\boxed{9^{9^{9^{9}}}}", True),
    "huge_exponent": (r"\boxed{10^{10^{10}}}", True),
    "nested_frac_300": (r"\boxed{" + r"\frac{1}{" * 300 + "2" + "}" * 300 + "}", True),
    "nested_sqrt_500": (r"\boxed{" + r"\sqrt{" * 500 + "2" + "}" * 500 + "}", True),
    "nested_boxed_10000": ("\\boxed{" * 10000 + "1" + "}" * 10000, False),
    "boxed_5000_times": (r"\boxed{1} " * 5000, False),
    "unclosed_boxed_5000": ("\\boxed{" * 5000, False),
    "digits_100000": (r"\boxed{" + "7" * 100000 + "}", False),
    "left_unbalanced_5000": (r"\boxed{" + r"\left(" * 5000 + "}", False),
}


def test_adversarial_answers_finish_within_the_timeout_and_count_as_timeouts():
    from repo_rl.rewards import make_math_reward

    timeout = 0.5
    reward = make_math_reward(timeout=timeout, num_workers=2)
    try:
        assert reward(None, [r"\boxed{0.5}"], answer=["1/2"]) == [1.0]  # starts the workers
        before = reward.stats.snapshot()
        names = list(ADVERSARIAL)
        t0 = time.monotonic()
        outcomes = reward.outcomes([ADVERSARIAL[n][0] for n in names], ["1"] * len(names))
        wall = time.monotonic() - t0
        for name, o in zip(names, outcomes):
            assert o.status in ("ok", "error", "timeout"), name
            # The per-item clock: never (much) past the deadline, whatever the input.
            assert o.elapsed <= timeout + 1.0, (name, o.elapsed)
            if ADVERSARIAL[name][1]:
                assert o.status == "timeout" and o.value is None, (name, o)
        after = reward.stats.snapshot()
        assert after["timeouts"] - before["timeouts"] == sum(o.status == "timeout" for o in outcomes)
        assert after["items"] - before["items"] == len(names)
        # Nothing hangs the batch: at worst every item runs to its deadline plus a worker restart.
        assert wall < len(names) * (timeout + 8), wall
        # The reward API gives None (never 0) for them.
        assert reward(None, [ADVERSARIAL["power_tower"][0]], answer=["1"]) == [None]
    finally:
        reward.close()


def test_training_goes_on_when_the_reward_returns_none(tmp_path, tiny_model_dir, tiny_data):
    over = tiny_overrides(tiny_model_dir, tiny_data, **{**BASE, "train.max_steps": 3, "train.prompts_per_step": 3,
                                                        "reward.funcs": "[tests.helpers.fault_rewards:some_none]"})
    assert _train(tmp_path, "none", over) == 0
    rows = _read(tmp_path / "none" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["rewards/invalid"] == 4  # items 0, 3, 6, 9 of 12
        assert r["loss"] is not None and math.isfinite(r["loss"])
    comps = _read(tmp_path / "none" / "completions.jsonl")
    assert sum(c["reward"] is None for c in comps) == 3 * 4
    assert all(c["advantage"] == 0.0 for c in comps if c["reward"] is None)


def test_training_goes_on_through_verifier_timeouts(tmp_path, tiny_model_dir, tiny_data):
    from tests.helpers import fault_rewards

    over = tiny_overrides(tiny_model_dir, tiny_data, **{**BASE, "train.max_steps": 2, "train.prompts_per_step": 2,
                                                        "reward.funcs": "[tests.helpers.fault_rewards:adversarial_math]",
                                                        "reward.timeout": 0.5})
    try:
        assert _train(tmp_path, "adv", over) == 0
    finally:
        fault_rewards.adversarial_math.close()
    rows = _read(tmp_path / "adv" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rewards/verifier_timeouts"] >= 1
        assert r["rewards/invalid"] >= r["rewards/verifier_timeouts"]
        assert r["loss"] is not None and math.isfinite(r["loss"])


# --------------------------------------------------------------------------------------
# 3. Determinism: sampling seeds
# --------------------------------------------------------------------------------------


def _seed_log(tmp_path: Path, model: Path, data: Path, pps: int, steps: int, **extra) -> tuple[Any, list[tuple[int, str, int, int, list[int]]]]:
    """Run ``steps`` steps and return (trainer, [(step, kind, prompt index, seed, completion ids)])."""
    from repo_rl.config import build_config
    from repo_rl.trainer import Trainer

    cfg = build_config({}, tiny_overrides(model, data, **{"train.threads": 1, "train.prompts_per_step": pps,
                                                          "algorithm.max_completion_length": 6, **extra}))
    t = Trainer(cfg, tmp_path / f"pps{pps}", progress=False)
    by_ids = {tuple(t.renderer.ids(ex.prompt)): ("rollout", i) for i, ex in enumerate(t.train_examples)}
    for i, ex in enumerate(t.train_examples):
        if ex.solution is not None:
            rp = t.renderer.rephrase_prompt(ex, cfg.repo.rephrase_template)
            by_ids[tuple(t.renderer.ids(rp))] = ("rephrase", i)
    log: list[tuple[int, str, int, int, list[int]]] = []
    real = t.generator.generate

    def spy(rows, params, seeds, logprobs=False):
        out = real(rows, params, seeds, logprobs=logprobs)
        for r, s, c in zip(rows, seeds, out[0] if logprobs else out):
            kind, idx = by_ids[tuple(r)]
            log.append((t.step, kind, idx, int(s), list(c)))
        return out

    t.generator.generate = spy
    for _ in range(steps):
        t.train_step()
    return t, log


@pytest.mark.parametrize("pps", [2, 4, 8])
def test_rollout_seeds_are_never_reused_for_a_prompt(tmp_path, tiny_model_dir, tiny_data, pps):
    """Seeds derive from (seed, step, prompt, occurrence, sample): whatever train.prompts_per_step
    is, no rollout of a prompt reuses another rollout's seed (across steps and epochs, and when
    a prompt occurs twice in one step because the step straddles an epoch boundary)."""
    steps = 3
    _, log = _seed_log(tmp_path, tiny_model_dir, tiny_data, pps, steps, **{"algorithm.method": "grpo"})
    rollouts = [x for x in log if x[1] == "rollout"]
    assert len(rollouts) == steps * pps * 4
    seeds = [x[3] for x in rollouts]
    assert len(set(seeds)) == len(seeds)
    if pps == 8:  # 8 prompts from 6 rows: two prompts occur twice in step 1
        step0 = [x for x in rollouts if x[0] == 0]
        counts: dict[int, list[list[int]]] = {}
        for _, _, idx, _, comp in step0:
            counts.setdefault(idx, []).append(comp)
        twice = [idx for idx, comps in counts.items() if len(comps) == 8]
        assert len(twice) == 2
        for idx in twice:
            assert counts[idx][:4] != counts[idx][4:], "the second occurrence repeated the first one's samples"


def test_rollout_seeds_do_not_depend_on_the_batch(tmp_path, tiny_model_dir, tiny_data):
    """The same (step, prompt, sample) gets the same seed whatever prompts_per_step is (the
    sample does not depend on the prompt's position in the batch)."""
    maps = {}
    for pps in (2, 3):
        _, log = _seed_log(tmp_path, tiny_model_dir, tiny_data, pps, 2, **{"algorithm.method": "grpo"})
        maps[pps] = {}
        for step, kind, idx, seed, _ in log:
            maps[pps].setdefault((step, idx), []).append(seed)
    common = set(maps[2]) & set(maps[3])
    assert any(k[0] == 1 for k in common), "no prompt shared at step 2 (epoch order changed?)"
    for k in common:
        assert maps[2][k] == maps[3][k], k


def test_rephrase_seeds_do_not_depend_on_the_batch(tmp_path, tiny_model_dir, tiny_data):
    """Same property for rephrase samples (repo.rho=0 gates every group with a solution).
    A past bug seeded rephrases by the prompt's position in the batch instead of its occurrence,
    so changing prompts_per_step changed the rephrase samples of the same prompt at the same step."""
    maps = {}
    for pps in (2, 3):
        _, log = _seed_log(tmp_path, tiny_model_dir, tiny_data, pps, 2,
                           **{"repo.rho": 0.0, "repo.num_attempts": 2})
        maps[pps] = {}
        for step, kind, idx, seed, _ in log:
            if kind == "rephrase":
                maps[pps].setdefault((step, idx), []).append(seed)
    common = set(maps[2]) & set(maps[3])
    assert any(k[0] == 1 for k in common)
    for k in common:
        assert maps[2][k] == maps[3][k], k


# --------------------------------------------------------------------------------------
# 4. Security
# --------------------------------------------------------------------------------------


def test_trust_remote_code_is_false_by_default_and_passed_as_false(tmp_path, tiny_model_dir, monkeypatch):
    import transformers

    from repo_rl.config import build_config
    from repo_rl.models.loading import load_model_and_tokenizer

    assert build_config({}).model.trust_remote_code is False
    # A model directory whose config points at custom code that would leave a mark if run.
    evil = tmp_path / "evil_model"
    shutil.copytree(tiny_model_dir, evil)
    mark = tmp_path / "REMOTE_CODE_RAN"
    (evil / "evil.py").write_text(
        f"open({str(mark)!r}, 'w').write('ran')\n"
        "from transformers import Qwen2Config as EvilConfig, Qwen2ForCausalLM as EvilModel, PreTrainedTokenizerFast as EvilTok\n"
    )
    for name, amap in (("config.json", {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}),
                       ("tokenizer_config.json", {"AutoTokenizer": ["evil.EvilTok", None]})):
        d = json.loads((evil / name).read_text())
        d["auto_map"] = amap
        (evil / name).write_text(json.dumps(d))
    calls: list[tuple[str, Any]] = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *a, _real=real, _name=cls.__name__, **k):
            calls.append((_name, k.get("trust_remote_code", "<not passed>")))
            return _real(klass, *a, **k)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    cfg = build_config({}, [f"model.name_or_path={evil}"])
    load_model_and_tokenizer(cfg.model, None, "cpu")
    assert {n for n, _ in calls} == {"AutoModelForCausalLM", "AutoTokenizer"}
    assert all(v is False for _, v in calls), calls
    assert not mark.exists(), "code from the model directory ran"


def test_checkpoints_hold_only_safe_formats(tmp_path, tiny_model_dir, tiny_data):
    import torch

    over = tiny_overrides(tiny_model_dir, tiny_data, **{**BASE, "train.max_steps": 2, "train.save_every": 1,
                                                        "train.save_total_limit": "null"})
    assert _train(tmp_path, "ck", over) == 0
    root = tmp_path / "ck" / "checkpoints"
    files = [p for p in root.rglob("*") if p.is_file()]
    assert {p.parent.name for p in files} == {"step-1", "step-2"}
    bad = [p.name for p in files if p.suffix not in (".safetensors", ".json", ".pt")]
    assert not bad, bad
    pts = [p for p in files if p.suffix == ".pt"]
    assert {p.name for p in pts} >= {"optimizer.pt", "scheduler.pt", "rng.pt"}
    for p in pts:
        torch.load(p, weights_only=True)  # raises on any pickled object beyond tensors and plain data


def test_custom_reward_modules_are_imported_only_when_named(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    from repo_rl.rewards import load_reward

    name = f"reward_with_side_effect_{os.getpid()}"
    mark = tmp_path / "IMPORTED"
    (tmp_path / f"{name}.py").write_text(
        f"open({str(mark)!r}, 'w').write('imported')\n"
        "def fn(prompts, completions, **kw):\n    return [0.0 for _ in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    over = tiny_overrides(tiny_model_dir, tiny_data, **BASE)
    assert _train(tmp_path, "other", over) == 0
    assert not mark.exists() and name not in sys.modules
    load_reward(f"{name}:fn")  # naming it is what imports it
    assert mark.exists()
    sys.modules.pop(name, None)


def test_a_run_with_a_local_model_never_touches_the_network(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    import socket

    attempts: list[str] = []

    def refuse(what):
        def f(*a, **k):
            attempts.append(f"{what}{a[1:2] if what.startswith('socket.') else a[:1]}")
            raise OSError(f"network access attempted during an offline run: {what}")
        return f

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    # The math verifier too (its worker pool talks over a local socket pair, not the network).
    over = tiny_overrides(tiny_model_dir, tiny_data, **{**BASE, "reward.funcs": "[math]"})
    from repo_rl.rewards import math_reward

    try:
        assert _train(tmp_path, "offline", over) == 0
    finally:
        math_reward.close()
    assert not attempts, attempts
