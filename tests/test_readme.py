"""The README's two set-up commands stay true: CI runs the test one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = _bash_blocks(setup)
    assert len(blocks) == 2, blocks
    main_cmd, test_cmd = blocks
    assert main_cmd.endswith("repo-rl train")
    assert test_cmd.endswith("python -m pytest")  # no -q: a line per test file shows how far it is
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci
    # Both pin torch in the same pip command, so a CPU machine never pulls a CUDA build.
    for cmd in (main_cmd, test_cmd):
        assert "torch==2.13.0" in cmd and "-c requirements-cpu.txt" in cmd


def test_default_command_runs_the_packaged_toy_config():
    from repo_rl.cli import default_config_path
    from repo_rl.config import load_config

    cfg = load_config(default_config_path())
    assert cfg.model.name_or_path == "toyworld" and cfg.data.train_files == "toyworld:train"
    assert "toy" in cfg.reward.funcs
