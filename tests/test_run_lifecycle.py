"""A run directory's life: resume from its own config, refused changes, the lock, SIGTERM,
failed starts, divergence, the default thread count."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repo_rl.cli import main
from repo_rl.run.directory import RunLock, identity_changes

from .conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(out: Path, *args: str) -> int:
    return main(["train", "-o", str(out), *args])


def test_resume_takes_the_runs_own_config_and_applies_a_new_learning_rate(tmp_path, tiny_model_dir, tiny_data, capsys):
    out = tmp_path / "run"
    assert train(out, *tiny_overrides(tiny_model_dir, tiny_data, **{"train.max_steps": 1, "train.learning_rate": 1e-3})) == 0
    # No --config, no model or data on the line: everything comes from run/config.yaml.
    assert train(out, "--resume", "train.max_steps=2", "train.learning_rate=5e-4") == 0
    rows = read(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["learning_rate"] == pytest.approx(1e-3) and rows[1]["learning_rate"] == pytest.approx(5e-4)
    saved = __import__("yaml").safe_load((out / "config.yaml").read_text())
    assert saved["train"]["learning_rate"] == 5e-4 and saved["train"]["max_steps"] == 2
    assert saved["model"]["name_or_path"] == str(tiny_model_dir)
    assert "damaged" not in capsys.readouterr().err


def test_resume_without_a_run_is_an_error(tmp_path, capsys):
    capsys.readouterr()
    assert train(tmp_path / "nothing", "--resume") == 2
    err = capsys.readouterr().err
    assert "holds no run" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "nothing").exists()


def test_resume_refuses_a_change_that_makes_another_run(tmp_path, tiny_model_dir, tiny_data, capsys):
    out = tmp_path / "run"
    assert train(out, *tiny_overrides(tiny_model_dir, tiny_data, **{"train.max_steps": 1})) == 0
    before = (out / "config.yaml").read_text()
    capsys.readouterr()
    assert train(out, "--resume", "train.max_steps=2", "algorithm.num_generations=6") == 2
    err = capsys.readouterr().err
    assert "algorithm.num_generations" in err and "--allow-config-change" in err and len(err.strip().splitlines()) == 1
    assert (out / "config.yaml").read_text() == before  # the refused config is not written
    # The data file edited in place (same row count, other rows) is caught too.
    rows = [json.loads(line) for line in tiny_data.read_text().splitlines()]
    rows[0]["answer"], rows[1]["answer"] = rows[1]["answer"], rows[0]["answer"]
    tiny_data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert train(out, "--resume", "train.max_steps=2") == 2
    assert "training data differs" in capsys.readouterr().err
    assert train(out, "--resume", "--allow-config-change", "train.max_steps=2") == 0
    assert [r["step"] for r in read(out / "metrics.jsonl")] == [1, 2]


def test_identity_changes_lists_only_identity_keys():
    a = {"train": {"seed": 0, "max_steps": 5}, "model": {"lora": {"r": 0}}}
    b = {"train": {"seed": 1, "max_steps": 9}, "model": {"lora": {"r": 8}}}
    assert identity_changes(a, b) == ["model.lora.r", "train.seed"]


def test_a_second_run_on_the_same_directory_stops(tmp_path, tiny_model_dir, tiny_data, capsys):
    out = tmp_path / "run"
    lock = RunLock(out)
    lock.acquire()  # a run in progress
    try:
        assert train(out, *tiny_overrides(tiny_model_dir, tiny_data)) == 2
        assert "another run is writing to it" in capsys.readouterr().err
    finally:
        lock.release()
    # A killed holder leaves no stuck lock: the OS drops it with the process.
    code = f"from repo_rl.run.directory import RunLock; from pathlib import Path; RunLock(Path({str(out)!r})).acquire(); print('held', flush=True); import time; time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(Exception, match="another run"):
        RunLock(out).acquire()
    p.kill()
    p.wait()
    again = RunLock(out)
    again.acquire()
    again.release()


def test_a_failed_start_leaves_no_directory(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train(tmp_path / "new", f"model.name_or_path={tiny_model_dir}", "data.train_files=missing.jsonl") == 2
    assert not (tmp_path / "new").exists()
    assert main(["train", f"model.name_or_path={tiny_model_dir}", "data.train_files=missing.jsonl"]) == 2
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "repo_rl.cli", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigterm_saves_the_completed_steps_and_resumes_exactly(tmp_path, tiny_model_dir, tiny_data):
    # auto batching chooses by wall time, which the two runs need not agree on (README, resume)
    over = tiny_overrides(tiny_model_dir, tiny_data, **{"train.max_steps": 40, "train.save_every": 1000,
                                                        "train.save_total_limit": "null", "repo.rephrase_batching": "separate"})
    full = _cli(["-o", str(tmp_path / "full"), *over, "train.max_steps=6"])
    assert full.wait(timeout=600) == 0, full.stderr.read()[-800:]
    p = _cli(["-o", str(tmp_path / "cut"), *over])
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(read(metrics)) < 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=300)
    err = p.stderr.read()
    assert rc == 128 + signal.SIGTERM, err[-800:]
    steps = len(read(metrics))
    assert 2 <= steps < 40 and "SIGTERM" in err and "resume with --resume" in err
    assert (tmp_path / "cut" / "checkpoints" / f"step-{steps}").is_dir()
    q = _cli(["-o", str(tmp_path / "cut"), "--resume", "train.max_steps=6", "logging.progress=false"])
    assert q.wait(timeout=600) == 0, q.stderr.read()[-800:]
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    if steps <= 6:
        assert strip(read(metrics)) == strip(read(tmp_path / "full" / "metrics.jsonl"))


def test_a_diverging_run_never_saves_blown_weights(tmp_path, tiny_model_dir, tiny_data, capsys):
    out = tmp_path / "run"
    over = tiny_overrides(tiny_model_dir, tiny_data, **{"train.max_steps": 8, "train.save_every": 1, "train.save_total_limit": "null",
                                                       "train.learning_rate": 1e6, "train.max_bad_steps": 2})
    rc = train(out, *over)
    err = capsys.readouterr().err
    assert rc == 1 and "first at step" in err, err[-600:]
    from safetensors.torch import load_file

    for ck in sorted((out / "checkpoints").glob("step-*")):
        weights = load_file(str(ck / "model.safetensors"))
        assert all(bool(torch.isfinite(w).all()) for w in weights.values()), ck


def test_default_threads_is_one_on_cpu_unless_the_environment_says(monkeypatch):
    from repo_rl.run.health import default_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads("cpu") == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert default_threads("cpu") is None


def test_exploded_by_hand():
    from repo_rl.run.health import exploded

    assert not exploded(10.0, None, 2.0)  # no reference yet: only a non-finite norm counts
    assert exploded(float("inf"), None, 2.0) and exploded(float("nan"), 10.0, 2.0)
    assert not exploded(20.0, 10.0, 2.0)  # exactly the limit is allowed
    assert exploded(20.001, 10.0, 2.0)


def test_weight_norm_and_finiteness_against_a_plain_sum():
    from repo_rl.run.health import weight_norm, weights_finite

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    plain = sum(float((p.detach() ** 2).sum()) for p in model.parameters()) ** 0.5
    assert abs(weight_norm(model) - plain) < 1e-5 and weights_finite(model)
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    assert not weights_finite(model)


def test_good_checkpoint_hint_skips_the_checkpoint_of_the_update_before_the_first_bad_step(tmp_path):
    from repo_rl.run.health import good_checkpoint_hint

    ckpts = [tmp_path / f"step-{i}" for i in (1, 2, 3, 4)]
    hint = good_checkpoint_hint(ckpts, first_bad_step=5)  # update 4 may have blown the weights up: step-3 is the last safe one
    assert "step-3 " in hint and "step-4" not in hint
    assert "no checkpoint predates it" in good_checkpoint_hint(ckpts, first_bad_step=2)
