"""Bad input at the CLI: one line naming the key/file/row, exit code 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from repo_rl.cli import main

from .conftest import tiny_overrides


def run(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, [l for l in err if not l.startswith(("Loading weights", "repo-rl 0", "data: "))]


def assert_one_line_error(rc, lines, *needles):
    assert rc == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("repo-rl: error:")
    assert "Traceback" not in lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture()
def cfg_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("{}\n")
    return p


@pytest.mark.parametrize(
    "override,needles",
    [
        ("train.learnig_rate=1e-5", ["train.learnig_rate", "train.learning_rate"]),
        ("algoritm.method=repo", ["algoritm", "algorithm"]),
        ("train.max_steps=abc", ["train.max_steps", "integer"]),
        ("algorithm.loss_type=dapoo", ["algorithm.loss_type", "'dapo'"]),
        ("algorithm.method=rep", ["algorithm.method", "'repo'"]),
        ("algorithm.num_generations=1", ["algorithm.num_generations", ">= 2"]),
        ("repo.rho=1.5", ["repo.rho", "[0, 1]"]),
        ("repo.num_replace=8", ["repo.num_replace", "num_generations"]),
        ("algorithm.max_completion_length=-4", ["algorithm.max_completion_length"]),
        ("train.bf16=maybe", ["train.bf16", "true or false"]),
        ("eval.every=5", ["eval.every", "data.eval_files"]),
        ("no_equals_sign", ["no_equals_sign", "key.sub=value"]),
    ],
)
def test_config_errors(capsys, cfg_file, override, needles):
    rc, lines = run(capsys, ["train", "--config", str(cfg_file), override])
    assert_one_line_error(rc, lines, *needles)


def test_missing_and_invalid_config_files(capsys, tmp_path):
    rc, lines = run(capsys, ["train", "--config", str(tmp_path / "nope.yaml")])
    assert_one_line_error(rc, lines, "nope.yaml", "not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1,\n")
    rc, lines = run(capsys, ["train", "--config", str(bad)])
    assert_one_line_error(rc, lines, "bad.yaml", "line")


def test_bad_data_row_names_file_row_and_field(capsys, tmp_path, tiny_model_dir, cfg_file):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "answer": "1"}) + "\n" + json.dumps({"prompt": "q", "answer": ""}) + "\n")
    rc, lines = run(capsys, ["train", "--config", str(cfg_file), "-o", str(tmp_path / "o"), *tiny_overrides(tiny_model_dir, data)])
    assert_one_line_error(rc, lines, f"{data}:2", "'answer'", "empty")
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_model_path_that_is_not_a_model(capsys, tmp_path, tiny_data, cfg_file):
    notmodel = tmp_path / "notmodel"
    notmodel.mkdir()
    (notmodel / "README").write_text("hi")
    rc, lines = run(capsys, ["train", "--config", str(cfg_file), "-o", str(tmp_path / "o"), *tiny_overrides(notmodel, tiny_data)])
    assert_one_line_error(rc, lines, "model.name_or_path", "not a model directory")


def test_reward_path_that_does_not_import(capsys, tmp_path, tiny_model_dir, tiny_data, cfg_file):
    over = tiny_overrides(tiny_model_dir, tiny_data, **{"reward.funcs": "[no_such_pkg.mod:fn]"})
    rc, lines = run(capsys, ["train", "--config", str(cfg_file), "-o", str(tmp_path / "o"), *over])
    assert_one_line_error(rc, lines, "reward.funcs", "no_such_pkg")
    over = tiny_overrides(tiny_model_dir, tiny_data, **{"reward.funcs": "[tests.helpers.rewards:not_callable]"})
    rc, lines = run(capsys, ["train", "--config", str(cfg_file), "-o", str(tmp_path / "o"), *over])
    assert_one_line_error(rc, lines, "reward.funcs", "not_callable")


def test_existing_run_needs_resume_and_resume_needs_dir(capsys, tmp_path, tiny_model_dir, tiny_data, cfg_file):
    over = tiny_overrides(tiny_model_dir, tiny_data, **{"train.max_steps": 1, "algorithm.method": "grpo"})
    assert main(["train", "--config", str(cfg_file), "-o", str(tmp_path / "o"), *over]) == 0
    capsys.readouterr()
    rc, lines = run(capsys, ["train", "--config", str(cfg_file), "-o", str(tmp_path / "o"), *over])
    assert_one_line_error(rc, lines, "--resume")
    rc, lines = run(capsys, ["train", "--config", str(cfg_file), "--resume"])
    assert_one_line_error(rc, lines, "--resume", "--output-dir")


def test_unknown_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--no-such-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-such-flag" in err[0]


def test_config_keys_and_methods_commands(capsys):
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    for key in ["model.name_or_path", "data.train_files", "repo.delta", "repo.rho", "train.prompts_per_step"]:
        assert key in out
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "grpo" in out and "repo" in out and "Replay-Enhanced" in out


def test_subprocess_error_has_no_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  max_stepz: 3\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    proc = subprocess.run([sys.executable, "-m", "repo_rl.cli", "train", "--config", str(cfg)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]]
    assert "train.max_stepz" in proc.stderr and "train.max_steps" in proc.stderr
