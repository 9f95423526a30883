"""Two CPU processes (gloo) through ``accelerate launch`` match one process on the same global batch.

Every shipped way to hold the model is run for real: data parallel (``multi_cpu.yaml``), FSDP2
(``fsdp.yaml``) and DeepSpeed ZeRO-2/3 (``deepspeed_zero{2,3}.yaml``), the last three with the same
files a GPU machine uses, with ``--num_processes 2``.
"""

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
    "repo.verify": "[reward]",  # the tiny model never boxes an answer
    "train.bf16": "false",  # exact float32 on every CPU
    "logging.progress": "false",
}


def _env(config: str = "multi_cpu"):
    path = [ROOT / "src", ROOT] + ([ROOT / "tests" / "helpers" / "no_shm"] if config.startswith("deepspeed") else [])
    return dict(os.environ, PYTHONPATH=":".join(map(str, path)), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _run(args: list[str], procs: int, config: str = "multi_cpu") -> subprocess.CompletedProcess:
    """Run ``python ARGS`` in one process, or under ``accelerate launch`` with ``procs`` gloo processes."""
    if procs == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / f"{config}.yaml"), "--num_processes", str(procs), *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(config), capture_output=True, text=True, timeout=300)


def _launch(args: list[str], procs: int, config: str = "multi_cpu") -> None:
    proc = _run(args, procs, config)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _train_args(tmp_path, out, over: dict, *extra) -> list[str]:
    """``repo-rl train`` arguments writing to ``tmp_path/out`` with overrides ``over``."""
    args = ["-m", "repo_rl.cli", "train", "--config", str(tmp_path / "c.yaml"), "-o", str(tmp_path / out), *extra]
    return args + [f"{k}={v}" for k, v in over.items()]


def _train(tmp_path, out, model, data, steps, procs, *extra, config="multi_cpu"):
    over = dict(OVERRIDES, **{"model.name_or_path": model, "data.train_files": data, "train.max_steps": steps})
    _launch(_train_args(tmp_path, out, over, *extra), procs, config)
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


def _step(tmp_path, out, model, data, procs, config="multi_cpu", **extra):
    over = dict(OVERRIDES, **{"model.name_or_path": model, "data.train_files": data, "train.max_steps": 1}, **extra)
    script = [str(ROOT / "tests" / "helpers" / "dp_step.py"), str(tmp_path / out)] + [f"{k}={v}" for k, v in over.items()]
    _launch(script, procs, config)
    return torch.load(tmp_path / out / "grads.pt", weights_only=True), json.loads((tmp_path / out / "metrics.json").read_text())


_ONE_PROCESS: dict = {}
"""Reference runs shared by this module's tests: one-process steps by case, the data-parallel run."""


def _one_process(tmp_path, model, data, **extra):
    """The one-process reference step of a case, run once per case for the whole module (every
    test's ``tiny_data`` holds the same rows)."""
    key = (model, tuple(sorted(extra.items())))
    if key not in _ONE_PROCESS:
        _ONE_PROCESS[key] = _step(tmp_path, "one", model, data, 1, **extra)
    return _ONE_PROCESS[key]


def test_two_processes_give_the_loss_and_gradient_of_one(setup):
    tmp_path, model, data = setup
    g1, m1 = _one_process(tmp_path, model, data)
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
    proc = _run(_train_args(tmp_path, "bad", over), 2)
    assert proc.returncode != 0
    assert "train.prompts_per_step=3" in proc.stderr and "multiple of the 2 processes" in proc.stderr


def test_an_engine_that_fails_on_one_rank_stops_every_rank_with_its_error(setup):
    tmp_path, model, data = setup
    over = dict(OVERRIDES, **{"model.name_or_path": model, "data.train_files": data, "train.max_steps": 1})
    args = _train_args(tmp_path, "bad", over)
    helper = str(ROOT / "tests" / "helpers" / "engine_fails_on_rank1.py")
    proc = _run([helper, *args[2:]], 2)  # _run's timeout turns a hang into a failure
    assert proc.returncode != 0
    # Rank 0 stops with rank 1's error in one line; rank 1 raises its own exception.
    assert "the generation engine failed to start on rank 1 of 2: RuntimeError: no engine here (on purpose)" in proc.stderr
    assert "RuntimeError: no engine here (on purpose)" in proc.stderr.replace("failed to start on rank 1 of 2: ", "", 1)


# ------------------------------------------------------------------------------------- FSDP
FSDP_CASES = {
    "repo": {},
    # a KL term: the reference model is sharded too
    "kl": {"algorithm.beta": 0.1},
    # SFT drops the prompt without a solution, so the ranks have 3 and 2 micro-batches and
    # the shorter rank runs a zero-weight filler pass to keep FSDP's collectives matched
    "uneven": {"algorithm.method": "sft", "train.micro_batch_size": 1, "train.prompts_per_step": 6, "data.shuffle": "false"},
}


SHARDED_RUNS = [("fsdp", c) for c in sorted(FSDP_CASES)] + [("deepspeed_zero3", c) for c in sorted(FSDP_CASES)] + [("deepspeed_zero2", "repo")]


@pytest.mark.parametrize("config,case", SHARDED_RUNS)
def test_sharded_two_processes_give_the_loss_and_gradient_of_one(setup, config, case):
    tmp_path, model, data = setup
    extra = dict(FSDP_CASES[case])
    if config.startswith("deepspeed"):
        # DeepSpeed clips inside engine.step, after the helper has read the gradient; compare unclipped
        # gradients (the pre-clip norm is compared in the metrics either way).
        extra["train.max_grad_norm"] = 0
    g1, m1 = _one_process(tmp_path, model, data, **extra)
    g2, m2 = _step(tmp_path, "sharded", model, data, 2, config=config, **extra)
    _close(m1, m2)
    assert g1.keys() == g2.keys() and g1
    assert any(float(g.abs().max()) > 0 for g in g1.values())
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-6, rtol=1e-4), k


# ZeRO-2's resume is the slowest test here and reads the same DeepSpeed checkpoint files as ZeRO-3's.
@pytest.mark.parametrize("config", ["fsdp", pytest.param("deepspeed_zero2", marks=pytest.mark.slow), "deepspeed_zero3"])
def test_sharded_resume_equals_uninterrupted_run(setup, config):
    tmp_path, model, data = setup
    full = _train(tmp_path, "full", model, data, 4, 2, config=config)
    part = _train(tmp_path, "part", model, data, 2, 2, config=config)
    _train(tmp_path, "part", model, data, 4, 2, "--resume", config=config)
    assert _metrics(full) == _metrics(part)
    wf, wp = _weights(full, 4), _weights(part, 4)
    assert wf.keys() == wp.keys()
    for k in wf:
        assert torch.equal(wf[k], wp[k]), k
    if config.startswith("deepspeed"):
        # DeepSpeed's partitioned optimizer state only loads under DeepSpeed: a clear error elsewhere.
        over = dict(OVERRIDES, **{"model.name_or_path": model, "data.train_files": data, "train.max_steps": 5})
        proc = _run(_train_args(tmp_path, "part", over, "--resume"), 1)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "optimizer state was saved DeepSpeed and cannot be loaded under this launch" in proc.stderr


@pytest.mark.parametrize("first,then", [("fsdp", "multi_cpu"), ("multi_cpu", "fsdp")])
def test_checkpoints_resume_under_the_other_launcher(setup, first, then):
    """Checkpoints hold full weights and name-keyed optimizer state: FSDP and DDP read each other's."""
    tmp_path, model, data = setup
    if "ddp_3_steps" not in _ONE_PROCESS:  # the data-parallel reference, run once for both directions
        _ONE_PROCESS["ddp_3_steps"] = _train(tmp_path, "ref", model, data, 3, 2)
    ref = _ONE_PROCESS["ddp_3_steps"]
    run = _train(tmp_path, "run", model, data, 2, 2, config=first)
    _train(tmp_path, "run", model, data, 3, 2, "--resume", config=then)
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3]
    for a, b in zip(_metrics(ref), _metrics(run)):
        _close(a, b)
    wr, wx = _weights(ref, 3), _weights(run, 3)
    for k in wr:
        assert torch.allclose(wr[k], wx[k], atol=1e-5), k
    state = json.loads((run / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["step"] == 3


# ---------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "accelerate").glob("*.yaml")))
def test_accelerate_configs_are_valid(name):
    """Each shipped config loads with accelerate's own config class, and repo-rl accepts its launch environment."""
    from accelerate.commands.config.config_args import ClusterConfig

    from repo_rl.run.distributed import DeepSpeedSettings, FsdpSettings, _check_launcher_env

    path = ROOT / "configs" / "accelerate" / name
    raw = yaml.safe_load(path.read_text())
    cfg = ClusterConfig.from_yaml_file(str(path))
    kind = str(cfg.distributed_type).split(".")[-1]
    assert kind in ("MULTI_GPU", "FSDP", "DEEPSPEED")  # torchrun-based launchers
    assert cfg.num_processes >= 2 and cfg.num_processes % cfg.num_machines == 0
    assert raw["mixed_precision"] == "no"  # precision is repo-rl's train.bf16, not accelerate's
    env = _launch_env(path)
    _check_launcher_env(env)
    assert (FsdpSettings.from_env(env) is not None) == (kind == "FSDP")
    ds = DeepSpeedSettings.from_env(env)
    assert (ds is not None) == (kind == "DEEPSPEED")
    if ds is not None:
        assert ds.stage == int(name[-len("N.yaml")])


def _launch_env(path: Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file PATH`` gives the training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    import socket

    with socket.socket() as sock:  # the config's own port may be taken on a shared test machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = launch_command_parser().parse_args(["--config_file", str(path), "--main_process_port", str(port), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        # accelerate's launch_command sets this field before it builds the environment.
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config.keys() if defaults else [])
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def test_fsdp_settings_from_the_launch_environment():
    from repo_rl.run.distributed import FsdpSettings
    from repo_rl.errors import UserError

    env = _launch_env(ROOT / "configs" / "accelerate" / "fsdp.yaml")
    s = FsdpSettings.from_env(env)
    assert s == FsdpSettings(reshard_after_forward=True, wrap_classes=(), wrap=True, activation_checkpointing=False)
    assert FsdpSettings.from_env({}) is None
    assert FsdpSettings.from_env(dict(env, FSDP_TRANSFORMER_CLS_TO_WRAP="A, B")).wrap_classes == ("A", "B")
    assert FsdpSettings.from_env(dict(env, FSDP_AUTO_WRAP_POLICY="NO_WRAP")).wrap is False
    assert FsdpSettings.from_env(dict(env, FSDP_RESHARD_AFTER_FORWARD="false")).reshard_after_forward is False
    assert FsdpSettings.from_env(dict(env, FSDP_ACTIVATION_CHECKPOINTING="true")).activation_checkpointing is True
    for key, value, match in [
        ("FSDP_VERSION", "1", "fsdp_version=1: repo-rl uses FSDP2"),
        ("FSDP_OFFLOAD_PARAMS", "true", "fsdp_offload_params=true: not supported"),
        ("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP", "fsdp_auto_wrap_policy=SIZE_BASED_WRAP"),
    ]:
        with pytest.raises(UserError, match=match):
            FsdpSettings.from_env(dict(env, **{key: value}))


def test_deepspeed_settings_from_the_launch_environment(tmp_path):
    from repo_rl.run.distributed import DeepSpeedSettings
    from repo_rl.errors import UserError

    env = _launch_env(ROOT / "configs" / "accelerate" / "deepspeed_zero3.yaml")
    s = DeepSpeedSettings.from_env(env)
    assert s == DeepSpeedSettings(stage=3, config={})
    assert DeepSpeedSettings.from_env({}) is None
    cfg = s.engine_config(world=2, max_grad_norm=0.5, hidden_size=64)
    assert cfg["train_batch_size"] == 2 and cfg["gradient_accumulation_steps"] == 1 and cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 640  # small tensors stay whole
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"] == {"enabled": False}
    assert DeepSpeedSettings.from_env(dict(env, ACCELERATE_DEEPSPEED_ZERO_STAGE="2")).engine_config(2, 1.0, 64)["zero_optimization"] == {"stage": 2}
    js = tmp_path / "ds.json"
    js.write_text('{"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": "auto"}}')
    from_file = DeepSpeedSettings.from_env({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(js)})
    zero = from_file.engine_config(2, 1.0, 64)["zero_optimization"]
    assert from_file.stage == 3 and zero["stage3_param_persistence_threshold"] == 0 and zero["reduce_bucket_size"] == 64 * 64
    bad_json = tmp_path / "bad.json"
    for key, value, match in [
        ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1", "zero_stage=1: expected 2 or 3"),
        ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu", "offload_optimizer_device=cpu: offloading is not supported"),
        ("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true", "zero3_init_flag=true: not supported"),
        ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4", "gradient_accumulation_steps=4: set it to 1"),
        ("ACCELERATE_GRADIENT_CLIPPING", "1.0", "gradient_clipping=1.0: leave it unset; use train.max_grad_norm"),
        ("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "missing.json"), "cannot read it"),
        ("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(bad_json), "remove the 'optimizer' section"),
    ]:
        bad_json.write_text('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}')
        with pytest.raises(UserError, match=match):
            DeepSpeedSettings.from_env(dict(env, **{key: value}))


def test_accelerate_mixed_precision_is_refused_clearly(monkeypatch):
    from repo_rl.run.distributed import Dist
    from repo_rl.errors import UserError

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(UserError, match="mixed_precision=bf16: set mixed_precision: 'no'"):
        Dist()


@pytest.mark.parametrize("config", ["fsdp", "deepspeed_zero2"])
def test_sharded_launch_with_lora_is_refused(setup, config):
    tmp_path, model, data = setup
    over = dict(OVERRIDES, **{"model.name_or_path": model, "data.train_files": data, "train.max_steps": 1, "model.lora.r": 4})
    proc = _run(_train_args(tmp_path, "bad", over), 2, config)
    assert proc.returncode != 0
    what = "FSDP" if config == "fsdp" else "DeepSpeed"
    assert f"model.lora.r with a {what} launch: not supported" in proc.stderr
