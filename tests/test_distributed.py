"""Two CPU processes (gloo) through ``accelerate launch`` match one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = {
    "data.train_files": None,
    "model.name_or_path": None,
    "reward.funcs": "[tests.helpers.rewards:contains_answer]",
    "algorithm.num_generations": 4,
    "algorithm.max_completion_length": 8,
    "train.prompts_per_step": 4,
    "train.learning_rate": 1e-3,
    "train.micro_batch_size": 5,
    "train.threads": 1,
    "train.save_every": 2,
    "train.save_total_limit": "null",
    "repo.num_attempts": 4,
    "logging.progress": "false",
}


def _env():
    return dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{ROOT}", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _launch(args: list[str], procs: int) -> None:
    """Run ``python ARGS`` in one process, or under ``accelerate launch`` with ``procs`` gloo processes."""
    if procs == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "multi_cpu.yaml"), "--num_processes", str(procs), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _train(tmp_path, out, model, data, steps, procs, *extra):
    over = dict(OVERRIDES, **{"model.name_or_path": model, "data.train_files": data, "train.max_steps": steps})
    args = ["-m", "repo_rl.cli", "train", "--config", str(tmp_path / "c.yaml"), "-o", str(tmp_path / out), *extra]
    args += [f"{k}={v}" for k, v in over.items()]
    _launch(args, procs)
    return tmp_path / out


def _metrics(run):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float) and isinstance(b[k], float):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6, nan_ok=True), k
        else:
            assert a[k] == b[k], k


def _weights(run, step):
    from safetensors.torch import load_file

    return load_file(run / "checkpoints" / f"step-{step}" / "model.safetensors")


@pytest.fixture()
def setup(tmp_path, tiny_model_dir, tiny_data):
    (tmp_path / "c.yaml").write_text("{}\n")
    return tmp_path, str(tiny_model_dir), str(tiny_data)


def _step(tmp_path, out, model, data, procs):
    over = dict(OVERRIDES, **{"model.name_or_path": model, "data.train_files": data, "train.max_steps": 1})
    script = [str(ROOT / "tests" / "helpers" / "dp_step.py"), str(tmp_path / out)] + [f"{k}={v}" for k, v in over.items()]
    _launch(script, procs)
    return torch.load(tmp_path / out / "grads.pt", weights_only=True), json.loads((tmp_path / out / "metrics.json").read_text())


def test_two_processes_give_the_loss_and_gradient_of_one(setup):
    tmp_path, model, data = setup
    g1, m1 = _step(tmp_path, "one", model, data, 1)
    g2, m2 = _step(tmp_path, "two", model, data, 2)
    _close(m1, m2)  # loss, rewards, gate rate, clip ratio, entropy ... over the global batch
    assert m2["repo/replaced"] > 0 or m2["repo/gate_rate"] > 0  # the RePO gate ran per rank
    assert g1.keys() == g2.keys() and g1
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-6, rtol=1e-4), k


def test_two_process_resume_equals_uninterrupted_two_process_run(setup):
    tmp_path, model, data = setup
    full = _train(tmp_path, "full", model, data, 4, 2)
    part = _train(tmp_path, "part", model, data, 2, 2)
    _train(tmp_path, "part", model, data, 4, 2, "--resume")
    mf, mp = _metrics(full), _metrics(part)
    assert [r["step"] for r in mp] == [1, 2, 3, 4]
    assert mf == mp
    assert (full / "completions.jsonl").read_text() == (part / "completions.jsonl").read_text()
    wf, wp = _weights(full, 4), _weights(part, 4)
    for k in wf:
        assert torch.equal(wf[k], wp[k]), k


def test_prompts_per_step_must_split_over_processes(setup):
    tmp_path, model, data = setup
    over = dict(OVERRIDES, **{"model.name_or_path": model, "data.train_files": data, "train.prompts_per_step": 3, "train.max_steps": 1})
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "multi_cpu.yaml"),
           "-m", "repo_rl.cli", "train", "--config", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "bad")]
    cmd += [f"{k}={v}" for k, v in over.items()]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "train.prompts_per_step=3" in proc.stderr and "multiple of the 2 processes" in proc.stderr


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "accelerate").glob("*.yaml")))
def test_accelerate_configs_are_valid(name):
    """Each shipped accelerate config loads with accelerate's own config class and is data parallel."""
    from accelerate.commands.config.config_args import ClusterConfig

    path = ROOT / "configs" / "accelerate" / name
    raw = yaml.safe_load(path.read_text())
    cfg = ClusterConfig.from_yaml_file(str(path))
    assert str(cfg.distributed_type).split(".")[-1] == "MULTI_GPU"  # the torchrun launcher
    assert cfg.num_processes >= 2 and cfg.num_processes % cfg.num_machines == 0
    assert raw["mixed_precision"] == "no"  # precision is repo-rl's train.bf16, not accelerate's


def test_fsdp_and_deepspeed_launches_are_refused_clearly(monkeypatch):
    from repo_rl.distributed import Dist
    from repo_rl.errors import UserError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="FSDP: not supported yet"):
        Dist()
