"""Every shipped config parses, validates and resolves to a consistent setup."""

from __future__ import annotations

from pathlib import Path

import pytest

from repo_rl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)
PACKAGED = ROOT / "src" / "repo_rl" / "toyworld" / "config.yaml"


@pytest.mark.parametrize("path", RECIPES + [PACKAGED], ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_validates(path):
    cfg = load_config(path)
    assert cfg.algorithm.method in ("repo", "grpo")
    assert cfg.repo.num_replace < cfg.algorithm.num_generations


@pytest.mark.parametrize("name", ["qwen2.5-math-7b_openr1.yaml", "qwen3-8b_supergpqa.yaml", "qwen3-8b_finance_mixed.yaml"])
def test_paper_recipes_match_the_reported_setup(name):
    cfg = load_config(ROOT / "configs" / "paper" / name)
    # PAPER.md: verl, G = 8, batch 512, learning rate 1e-6.
    assert cfg.algorithm.num_generations == 8
    assert cfg.train.prompts_per_step * cfg.algorithm.num_generations == 512
    assert cfg.train.learning_rate == pytest.approx(1e-6)
    assert cfg.repo.max_new_tokens == cfg.algorithm.max_completion_length
    assert cfg.model.dtype == "bfloat16" and cfg.train.bf16


def test_openr1_recipe_reads_the_verl_layout():
    cfg = load_config(ROOT / "configs" / "paper" / "qwen2.5-math-7b_openr1.yaml")
    assert cfg.data.fields.answer == "reward_model.ground_truth"
    assert cfg.data.fields.solution == "target"
    assert cfg.reward.funcs == ["math"]


def test_example_data_referenced_by_recipes_exists():
    for path in RECIPES:
        cfg = load_config(path)
        files = [cfg.data.train_files] if isinstance(cfg.data.train_files, str) else cfg.data.train_files
        for f in files:
            if f.startswith("examples/"):
                assert (ROOT / f).is_file(), (path, f)


def test_finance_recipe_routes_every_domain_of_its_example_data():
    import json

    cfg = load_config(ROOT / "configs" / "paper" / "qwen3-8b_finance_mixed.yaml")
    domains = {json.loads(line)["domain"] for line in (ROOT / cfg.data.train_files).read_text().splitlines()}
    assert domains == set(cfg.reward.by_domain) == {"math", "mcq", "finance"}
    assert cfg.reward.by_domain["finance"] == ["judge"] and cfg.reward.judge.api_key_env == "JUDGE_API_KEY"
