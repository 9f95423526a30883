"""Faults: kill -9 at seeded points of real ``repo-rl train`` processes, then ``--resume``.

The final model and metrics.jsonl (without ``time/*``) must equal those of an uninterrupted
run with the same seed; the checkpoints left by a killed run must all be complete and
loadable. The kills land inside the process through a ``sitecustomize`` shim written to a
temporary directory and put first on PYTHONPATH (no change to ``src/``): it is inactive
unless ``REPO_RL_FAULT=<point>@<step>`` is set, and then SIGKILLs its own process at that
point. One scenario kills from outside (the parent sends SIGKILL).

Also here: numerical faults (all-equal and non-finite rewards through the trainer), a full
disk and an ENOSPC during a checkpoint write, and corrupted checkpoints on resume.

``SHIM``, ``SCENARIOS``, ``run_scenario`` and ``compare_runs`` are shared with
``benchmarks/reliability_report.py``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from .conftest import ROWS, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
# Subprocesses import the same repo_rl as this process (src/ or an installed copy).
SRC = Path(__import__("repo_rl").__file__).resolve().parents[1]
SEED = 20261124
STEPS, SAVE_EVERY, PROMPTS_PER_STEP = 6, 2, 3  # 6 rows: an epoch boundary after every 2nd step
RUN = {
    "train.max_steps": STEPS,
    "train.save_every": SAVE_EVERY,
    "train.prompts_per_step": PROMPTS_PER_STEP,
    "train.threads": 1,
    "repo.num_attempts": 2,
    # auto chooses by wall time, which two runs need not agree on (it changes logp_gap's last digits)
    "repo.rephrase_batching": "separate",
}

SHIM = r'''
"""Fault injection for repo-rl processes, written by tests/test_faults.py.

Inactive unless REPO_RL_FAULT="<point>@<step>" is set. Points (step = 1-based training step):
  generate              SIGKILL right after the rollouts of the step were generated
  update                SIGKILL inside the update (after its first backward pass)
  metrics_torn          write half of the step's metrics.jsonl line, fsync, SIGKILL
  save:optimizer_torn   inside save_checkpoint(step): half of optimizer.pt written, SIGKILL
  save:rng_state        inside save_checkpoint(step): weights, tokenizer, optimizer and scheduler written, SIGKILL
  save:before_rename    inside save_checkpoint(step): every file written, SIGKILL before the rename
  save:enospc           inside save_checkpoint(step): writing optimizer.pt fails with ENOSPC (no kill)
  after_save            SIGKILL right after checkpoint <step> was complete
"""
import os

_SPEC = os.environ.get("REPO_RL_FAULT")
if _SPEC:
    import io
    import json
    import signal
    import sys

    import torch

    import repo_rl.run.checkpoint as _ck
    import repo_rl.engines.hf as _ro
    import repo_rl.run.tracking as _tk
    import repo_rl.run.state as _rs
    import repo_rl.trainer as _tr
    import repo_rl.step.update as _up

    _POINT, _, _AT = _SPEC.partition("@")
    _AT = int(_AT)
    _NOW = {"step": 0, "saving": None}

    def _die(what):
        sys.stderr.write(f"fault injected: SIGKILL {what} (step {_AT})\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    _train_step = _tr.Trainer.train_step

    def _patched_train_step(self, *a, **k):
        _NOW["step"] = self.step + 1
        return _train_step(self, *a, **k)

    _tr.Trainer.train_step = _patched_train_step

    if _POINT == "generate":
        _generate = _ro.HFGenerator._generate  # behind generate and generate_with_logprobs

        def _patched_generate(self, *a, **k):
            out = _generate(self, *a, **k)
            if _NOW["step"] == _AT:
                _die("after generation")
            return out

        _ro.HFGenerator._generate = _patched_generate
    elif _POINT == "update":
        _backward = _up.PolicyUpdate.backward  # every update runs one (a zero-loss filler when no row has a gradient)

        def _patched_backward(self, *a, **k):
            out = _backward(self, *a, **k)
            if _NOW["step"] == _AT:
                _die("inside the update")
            return out

        _up.PolicyUpdate.backward = _patched_backward
    elif _POINT == "metrics_torn":
        _write = _tk.JsonlWriter.write

        def _patched_write(self, obj):
            if self.path.name == "metrics.jsonl" and obj.get("step") == _AT:
                line = json.dumps(obj, default=str)
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(line[: len(line) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                _die("half-way through a metrics.jsonl line")
            return _write(self, obj)

        _tk.JsonlWriter.write = _patched_write
    elif _POINT.startswith("save:") or _POINT == "after_save":
        _save = _ck.save_checkpoint

        def _patched_save(root, step, *a, **k):
            _NOW["saving"] = step
            try:
                out = _save(root, step, *a, **k)
            finally:
                _NOW["saving"] = None
            if _POINT == "after_save" and step == _AT:
                _die("right after the checkpoint")
            return out

        _ck.save_checkpoint = _patched_save
        _rs.save_checkpoint = _patched_save
        _sub = _POINT.partition(":")[2]
        if _sub == "optimizer_torn":
            _tsave = torch.save

            def _patched_tsave(obj, f, *a, **k):
                if _NOW["saving"] == _AT and str(f).endswith("optimizer.pt"):
                    buf = io.BytesIO()
                    _tsave(obj, buf, *a, **k)
                    data = buf.getvalue()
                    with open(f, "wb") as fh:
                        fh.write(data[: len(data) // 2])
                        fh.flush()
                        os.fsync(fh.fileno())
                    _die("half-way through optimizer.pt")
                return _tsave(obj, f, *a, **k)

            torch.save = _patched_tsave
        elif _sub == "rng_state":
            _rng = _ck.rng_state

            def _patched_rng():
                if _NOW["saving"] == _AT:
                    _die("while saving the RNG state")
                return _rng()

            _ck.rng_state = _patched_rng
        elif _sub == "enospc":  # a full disk: the optimizer state cannot be written
            import errno

            _tsave2 = torch.save

            def _patched_enospc(obj, f, *a, **k):
                if _NOW["saving"] == _AT and str(f).endswith("optimizer.pt"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
                return _tsave2(obj, f, *a, **k)

            torch.save = _patched_enospc
        elif _sub == "before_rename":
            _replace = os.replace

            def _patched_replace(src, dst, *a, **k):
                if _NOW["saving"] == _AT and os.path.basename(str(dst)) == f"step-{_AT}":
                    _die("before the checkpoint rename")
                return _replace(src, dst, *a, **k)

            os.replace = _patched_replace
    elif _POINT != "none":
        raise SystemExit(f"REPO_RL_FAULT: unknown point {_POINT!r}")
'''


def _scenarios() -> list[dict[str, Any]]:
    """The kill plan: points drawn with a fixed seed, so every run of the suite is the same."""
    rng = random.Random(SEED)
    steps_after_first_save = list(range(SAVE_EVERY + 1, STEPS + 1))
    save_steps = list(range(2 * SAVE_EVERY, STEPS + 1, SAVE_EVERY))  # a save with an earlier one before it
    out = [
        {"id": "generation", "fault": f"generate@{rng.choice(steps_after_first_save)}"},
        {"id": "update", "fault": f"update@{rng.choice(steps_after_first_save)}"},
        {"id": "torn_metrics_line", "fault": f"metrics_torn@{rng.choice(steps_after_first_save)}"},
    ]
    for sub in ("optimizer_torn", "rng_state", "before_rename"):
        out.append({"id": f"checkpoint_{sub}", "fault": f"save:{sub}@{rng.choice(save_steps)}", "save": True})
    out.append({"id": "epoch_boundary", "fault": f"after_save@{2 * SAVE_EVERY}"})  # resume exactly at step 4 = end of epoch 2
    out.append({"id": "external_kill", "external_after_step": rng.choice(steps_after_first_save[:-2]),
                "delay": round(rng.uniform(0.0, 0.1), 3)})
    # Checkpoints every step: the resume lands mid-epoch (odd step).
    mid = rng.choice([s for s in range(3, STEPS + 1) if s % 2 == 0])
    out.append({"id": "mid_epoch", "fault": f"generate@{mid}", "extra": {"train.save_every": 1}})
    return out


SCENARIOS = _scenarios()


# --------------------------------------------------------------------------------------
# Helpers (shared with benchmarks/reliability_report.py)
# --------------------------------------------------------------------------------------


def write_world(root: Path, model_dir: Path) -> dict[str, Path]:
    """Data, empty config and the shim directory for subprocess runs."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in ROWS))
    cfg = root / "empty.yaml"
    cfg.write_text("{}\n")
    shim = root / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(SHIM)
    return {"data": data, "config": cfg, "shim": shim, "model": model_dir}


def _env(world: dict[str, Path], fault: Optional[str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(world["shim"]), str(SRC), str(REPO)])
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.pop("REPO_RL_FAULT", None)
    if fault:
        env["REPO_RL_FAULT"] = fault
    return env


def _cmd(world: dict[str, Path], out: Path, resume: bool, extra: Optional[dict[str, Any]]) -> list[str]:
    over = tiny_overrides(world["model"], world["data"], **{**RUN, **(extra or {})})
    return [sys.executable, "-m", "repo_rl.cli", "train", "--config", str(world["config"]), "--output-dir", str(out),
            *(["--resume"] if resume else []), *over]


def cli(world: dict[str, Path], out: Path, fault: Optional[str] = None, resume: bool = False,
        extra: Optional[dict[str, Any]] = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(world, out, resume, extra), env=_env(world, fault), cwd=REPO, capture_output=True,
                          text=True, errors="replace", timeout=timeout)


def cli_killed_from_outside(world: dict[str, Path], out: Path, after_step: int, delay: float,
                            timeout: int = 300) -> int:
    """Start a run and SIGKILL it from this process once metrics.jsonl has the row of ``after_step``."""
    proc = subprocess.Popen(_cmd(world, out, False, None), env=_env(world, None), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and any(r.get("step") == after_step for r in _read(metrics)):
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _read(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def _no_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-", 1)[1]) for p in (out / "checkpoints").glob("step-*") if p.is_dir())


def assert_checkpoints_usable(out: Path) -> list[int]:
    """Every ``step-N`` left on disk is complete: state JSON, safetensors and weights-only .pt files load."""
    import torch
    from safetensors.torch import load_file

    steps = checkpoint_steps(out)
    for s in steps:
        ck = out / "checkpoints" / f"step-{s}"
        state = json.loads((ck / "trainer_state.json").read_text())
        assert state["step"] == s, (ck, state["step"])
        assert load_file(str(ck / "model.safetensors")), ck
        for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
            torch.load(ck / name, weights_only=True)
    return steps


def compare_runs(ref: Path, out: Path) -> list[str]:
    """Differences between an interrupted-and-resumed run and the uninterrupted one (empty: equal)."""
    import torch
    from safetensors.torch import load_file

    problems = []
    a, b = _read(ref / "metrics.jsonl"), _read(out / "metrics.jsonl")
    steps = [r.get("step") for r in b]
    if steps != list(range(1, STEPS + 1)):
        problems.append(f"metrics steps {steps}")
    elif _no_time(a) != _no_time(b):
        diff = [r["step"] for r, s in zip(_no_time(a), _no_time(b)) if r != s]
        problems.append(f"metrics differ at steps {diff}")
    if _read(ref / "completions.jsonl") != _read(out / "completions.jsonl"):
        problems.append("completions.jsonl differs")
    final = f"step-{STEPS}"
    if not (out / "checkpoints" / final / "model.safetensors").is_file():
        problems.append(f"no final checkpoint {final}")
    else:
        ta = load_file(str(ref / "checkpoints" / final / "model.safetensors"))
        tb = load_file(str(out / "checkpoints" / final / "model.safetensors"))
        if ta.keys() != tb.keys() or any(not torch.equal(ta[k], tb[k]) for k in ta):
            problems.append("final weights differ")
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    if leftovers:
        problems.append(f"partial checkpoint directories left after the resume: {leftovers}")
    return problems


def run_scenario(sc: dict[str, Any], world: dict[str, Path], ref: Path, out: Path) -> dict[str, Any]:
    """Kill one run as planned, check what it left, resume it to the end, compare with ``ref``."""
    res: dict[str, Any] = {"id": sc["id"], "problems": []}
    extra = sc.get("extra")
    if "external_after_step" in sc:
        rc = cli_killed_from_outside(world, out, sc["external_after_step"], sc["delay"])
        res["kill"] = f"external SIGKILL {sc['delay']} s after the metrics row of step {sc['external_after_step']}"
    else:
        p = cli(world, out, fault=sc["fault"], extra=extra)
        rc = p.returncode
        res["kill"] = sc["fault"]
        if rc != -signal.SIGKILL:
            res["problems"].append(f"the fault did not kill the run (rc {rc}): {p.stderr[-800:]}")
            return res
    if rc != -signal.SIGKILL:
        res["problems"].append(f"run ended with rc {rc} before the external kill")
        return res
    rows_before = len([r for r in _read(out / "metrics.jsonl")])
    try:
        steps = assert_checkpoints_usable(out)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the finding
        res["problems"].append(f"an unusable checkpoint was left: {type(e).__name__}: {e}")
        return res
    res["checkpoints_after_kill"] = steps
    if sc.get("save"):
        at = int(sc["fault"].rsplit("@", 1)[1])
        if at in steps:
            res["problems"].append(f"the interrupted save left step-{at}")
        if at - SAVE_EVERY not in steps:
            res["problems"].append(f"the previous checkpoint step-{at - SAVE_EVERY} is gone: {steps}")
    last = steps[-1] if steps else 0
    res["steps_redone"] = max(rows_before - last, 0)
    p = cli(world, out, resume=True, extra=extra)
    if p.returncode != 0:
        res["problems"].append(f"resume failed (rc {p.returncode}): {p.stderr[-800:]}")
        return res
    res["problems"] += compare_runs(ref, out)
    return res


# --------------------------------------------------------------------------------------
# 2. kill -9 and resume
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    return write_world(tmp_path_factory.mktemp("faults"), tiny_model_dir)


@pytest.fixture(scope="module")
def reference(world) -> Path:
    out = world["data"].parent / "reference"
    p = cli(world, out)
    assert p.returncode == 0, p.stderr[-2000:]
    assert checkpoint_steps(out) == [STEPS - SAVE_EVERY, STEPS]  # save_total_limit=2 pruned step-2
    return out


def test_kill_plan_covers_every_phase():
    ids = {s["id"] for s in SCENARIOS}
    assert {"generation", "update", "checkpoint_optimizer_torn", "checkpoint_rng_state", "checkpoint_before_rename",
            "epoch_boundary", "external_kill", "mid_epoch", "torn_metrics_line"} <= ids
    assert SCENARIOS == _scenarios()  # seeded: the same plan every time


SLOW_SCENARIOS = {"checkpoint_rng_state"}  # same property as the other two kills inside save_checkpoint


@pytest.mark.parametrize(
    "sc",
    [pytest.param(s, marks=pytest.mark.slow) if s["id"] in SLOW_SCENARIOS else s for s in SCENARIOS],
    ids=[s["id"] for s in SCENARIOS],
)
def test_kill_and_resume_equals_the_uninterrupted_run(sc, world, reference, tmp_path):
    res = run_scenario(sc, world, reference, tmp_path / "run")
    assert not res["problems"], f"{res.get('kill')}: {res['problems']}"


def test_kill_before_the_first_checkpoint_then_resume(world, reference, tmp_path):
    """Killed in step 2, before any checkpoint: metrics.jsonl already holds step 1. ``--resume``
    finds no checkpoint and starts over; it must drop the old rows (a past bug logged step 1 twice)."""
    out = tmp_path / "run"
    p = cli(world, out, fault=f"generate@{SAVE_EVERY}")
    assert p.returncode == -signal.SIGKILL, p.stderr[-800:]
    assert checkpoint_steps(out) == [] and [r["step"] for r in _read(out / "metrics.jsonl")] == [1]
    p = cli(world, out, resume=True)
    assert p.returncode == 0, p.stderr[-800:]
    assert not compare_runs(reference, out), compare_runs(reference, out)


# --------------------------------------------------------------------------------------
# Numerical faults through the trainer
# --------------------------------------------------------------------------------------


def _train(tmp_path: Path, name: str, overrides: list[str], *flags: str) -> int:
    from repo_rl.cli import main

    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    return main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / name), *flags, *overrides])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_all_equal_reward_groups_give_zero_advantage_not_nan(scale, tmp_path, tiny_model_dir, tiny_data):
    import torch
    from safetensors.torch import load_file

    over = tiny_overrides(tiny_model_dir, tiny_data, **{"train.max_steps": 2, "train.threads": 1, "algorithm.method": "grpo",
                                                        "algorithm.scale_rewards": scale,
                                                        "reward.funcs": "[tests.helpers.fault_rewards:constant_one]"})
    assert _train(tmp_path, "eq", over) == 0
    rows = _read(tmp_path / "eq" / "metrics.jsonl")
    for r in rows:
        assert r["reward"] == 1.0 and r["reward_std"] == 0.0 and r["frac_reward_zero_std"] == 1.0
        assert r["loss"] == 0.0 and r["train/skipped_step"] == 0.0
        assert r["grad_norm"] is not None and math.isfinite(r["grad_norm"])
    comps = _read(tmp_path / "eq" / "completions.jsonl")
    assert comps and all(c["advantage"] == 0.0 for c in comps)
    # Zero advantage, no KL: the update is exactly zero and the weights are untouched.
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "eq" / "checkpoints" / "step-2" / "model.safetensors"))
    for k in after:
        assert torch.equal(before[k], after[k]), k


def test_non_finite_rewards_are_left_out_and_counted(tmp_path, tiny_model_dir, tiny_data):
    """inf, -inf and NaN from a reward are all verifier failures: out of the loss and counted
    in rewards/invalid (a past bug counted only NaN and dropped +-inf from the loss silently)."""
    over = tiny_overrides(tiny_model_dir, tiny_data, **{"train.max_steps": 2, "train.threads": 1, "algorithm.method": "grpo",
                                                        "reward.funcs": "[tests.helpers.fault_rewards:some_nonfinite]"})
    assert _train(tmp_path, "nf", over) == 0
    for r in _read(tmp_path / "nf" / "metrics.jsonl"):
        assert r["loss"] is not None and math.isfinite(r["loss"]) and r["train/skipped_step"] == 0.0
        assert r["reward"] is not None and math.isfinite(r["reward"])
        assert r["rewards/invalid"] == 3, r["rewards/invalid"]  # items 0 (inf), 5 (-inf), 10 (NaN) of 12


# --------------------------------------------------------------------------------------
# Full disk, unwritable output, ENOSPC mid-run, corrupted checkpoints
# --------------------------------------------------------------------------------------


def _run_main(argv: list[str]) -> tuple[Optional[int], str, Optional[BaseException]]:
    from repo_rl.cli import main

    err = io.StringIO()
    exc = None
    rc: Optional[int] = None
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException as e:  # noqa: BLE001
            exc = e
    return rc, err.getvalue(), exc


def _error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.startswith("repo-rl:") and ("error" in l or "stopped" in l)]


def test_full_disk_is_refused_before_training(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    import repo_rl.run.tracking as tracking

    real = os.statvfs

    def nearly_full(path):
        st = real(path)
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 1, 1, st.f_files, st.f_ffree, st.f_favail,
                                  st.f_flag, st.f_namemax))

    monkeypatch.setattr(tracking.os, "statvfs", nearly_full)
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    out = tmp_path / "o"
    rc, stderr, exc = _run_main(["train", "--config", str(cfg), "--output-dir", str(out),
                                 *tiny_overrides(tiny_model_dir, tiny_data, **{"train.threads": 1})])
    assert exc is None, repr(exc)
    assert rc == 2
    (line,) = _error_lines(stderr)
    assert "--output-dir" in line and "MiB free" in line
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_unwritable_output_directory_is_refused_before_training(tmp_path, tiny_model_dir, tiny_data):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    # Tests run as root, which ignores chmod: a path below a regular file is unwritable for anyone.
    rc, stderr, exc = _run_main(["train", "--config", str(cfg), "--output-dir", str(blocker / "run"),
                                 *tiny_overrides(tiny_model_dir, tiny_data, **{"train.threads": 1})])
    assert exc is None and rc == 2
    (line,) = _error_lines(stderr)
    assert str(blocker / "run") in line and "not writable" in line


def test_disk_full_while_writing_a_checkpoint(world, reference, tmp_path, monkeypatch):
    """ENOSPC in the middle of the step-4 save: step-2 stays usable, no step-4 appears, --resume
    reproduces the uninterrupted run. The error itself should be one line (no traceback)."""
    import torch

    import repo_rl.run.checkpoint as ck

    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt") and f".tmp-step-{2 * SAVE_EVERY}-" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **k)

    out = tmp_path / "run"
    argv = ["train", "--config", str(world["config"]), "--output-dir", str(out),
            *tiny_overrides(world["model"], world["data"], **RUN)]
    monkeypatch.setattr(ck.torch, "save", full_disk)
    rc, stderr, exc = _run_main(argv)
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert assert_checkpoints_usable(out) == [SAVE_EVERY]
    rc2, stderr2, exc2 = _run_main(argv[:5] + ["--resume"] + argv[5:])
    assert exc2 is None and rc2 == 0, stderr2[-1000:]
    assert not compare_runs(reference, out), compare_runs(reference, out)
    # Reported as one line, not a traceback (checked last so the checks above always run).
    assert exc is None, f"OSError escaped main(): {exc!r}"
    assert rc == 1 and len(_error_lines(stderr)) == 1, stderr[-1000:]


def _corrupt_state(ck: Path) -> None:
    (ck / "trainer_state.json").write_text("{not json")


def _truncate(name: str, keep: int):
    def f(ck: Path) -> None:
        p = ck / name
        p.write_bytes(p.read_bytes()[:keep])
    return f


def _pickled_object(ck: Path) -> None:
    import collections

    import torch

    torch.save({"state": collections.OrderedDict(hook=os.system)}, ck / "scheduler.pt")


CORRUPTIONS = {
    "state_not_json": _corrupt_state,
    "state_without_sampler": lambda ck: (ck / "trainer_state.json").write_text("{}"),
    "optimizer_truncated": _truncate("optimizer.pt", 100),
    "rng_empty": _truncate("rng.pt", 0),
    "weights_truncated": _truncate("model.safetensors", 500),
    "weights_missing": lambda ck: (ck / "model.safetensors").unlink(),
    "pickled_code_in_scheduler": _pickled_object,
}


@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory, tiny_model_dir) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("corrupt")
    world = write_world(root, tiny_model_dir)
    out = root / "src"
    rc, stderr, exc = _run_main(["train", "--config", str(world["config"]), "--output-dir", str(out),
                                 *tiny_overrides(tiny_model_dir, world["data"], **{"train.threads": 1, "train.max_steps": 1})])
    assert rc == 0 and exc is None, stderr
    return out, world


@pytest.mark.parametrize("what", list(CORRUPTIONS) + ["other_model"])
def test_corrupted_checkpoint_on_resume_is_one_clear_line(what, one_checkpoint, tmp_path):
    """A damaged latest checkpoint (disk error, manual edit, another model): ``--resume`` stops
    with exit 2 and one line naming the checkpoint, never a traceback (and never unpickles code)."""
    from .conftest import make_tiny_model_dir

    src, world = one_checkpoint
    out = tmp_path / "run"
    shutil.copytree(src, out)
    model = world["model"]
    if what == "other_model":
        model = make_tiny_model_dir(tmp_path / "other_model", hidden=32)
    else:
        CORRUPTIONS[what](out / "checkpoints" / "step-1")
    argv = ["train", "--config", str(world["config"]), "--output-dir", str(out), "--resume",
            *tiny_overrides(model, world["data"], **{"train.threads": 1, "train.max_steps": 2})]
    if what == "other_model":
        # Another model is another run: refused by name before any checkpoint is read ...
        rc, stderr, exc = _run_main(argv)
        assert exc is None and rc == 2, stderr[-800:]
        (line,) = _error_lines(stderr)
        assert "model.name_or_path" in line and "--allow-config-change" in line, line
        argv.insert(5, "--allow-config-change")  # ... and when the change is meant, the checkpoint does not fit
    rc, stderr, exc = _run_main(argv)
    assert exc is None, f"escaped main(): {type(exc).__name__}: {str(exc)[:200]}"
    assert rc == 2, stderr[-800:]
    (line,) = _error_lines(stderr)
    assert "step-1" in line, line
