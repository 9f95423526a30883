"""Inputs that must be refused or named at start: a completion limit with no room, a huge expert
solution, remote code, chat messages without a template."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from repo_rl.cli import main
from repo_rl.step.prompts import PromptRenderer

from .conftest import make_tokenizer, tiny_overrides


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


@pytest.mark.parametrize("limit", [512, 600])
def test_a_completion_limit_that_leaves_no_room_is_refused(tmp_path, tiny_model_dir, tiny_data, capsys, limit):
    capsys.readouterr()
    rc = main(["train", "-o", str(tmp_path / "r"), *tiny_overrides(tiny_model_dir, tiny_data, **{"algorithm.max_completion_length": limit})])
    line = _err_line(capsys)
    assert rc == 2 and "algorithm.max_completion_length" in line and "expected at most 511" in line and "-" + str(limit - 512) not in line


def test_a_huge_expert_solution_is_refused_at_start(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "train.jsonl"
    rows = [{"id": "ok", "prompt": "what is 1+1?", "answer": "2", "solution": "one plus one is 2"},
            {"id": "huge", "prompt": "what is 2+2?", "answer": "4", "solution": "four " * 200_000}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["train", "-o", str(tmp_path / "r"), *tiny_overrides(tiny_model_dir, data, **{"train.prompts_per_step": 2})])
    line = _err_line(capsys)
    assert rc == 2 and line.startswith("repo-rl: error: huge: the rephrase prompt") and "does not fit" in line
    # GRPO never rephrases: the same data trains.
    rc = main(["train", "-o", str(tmp_path / "g"), *tiny_overrides(tiny_model_dir, data, **{"train.prompts_per_step": 2, "train.max_steps": 1,
                                                                                       "algorithm.method": "grpo"})])
    assert rc == 0


def test_remote_code_is_named_before_it_runs(tmp_path, tiny_model_dir, capsys):
    from repo_rl.config import ModelConfig
    from repo_rl.models.loading import load_model_and_tokenizer

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "modeling_custom.py").write_text("# custom code\n")
    load_model_and_tokenizer(ModelConfig(name_or_path=str(model_dir), trust_remote_code=True))
    err = capsys.readouterr().err
    assert "trust_remote_code=true" in err and "modeling_custom.py" in err
    load_model_and_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    assert "trust_remote_code" not in capsys.readouterr().err


def test_chat_messages_without_a_template_warn_once(caplog):
    tok = make_tokenizer()
    tok.chat_template = None
    r = PromptRenderer(tok)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    with caplog.at_level(logging.WARNING, logger="repo_rl"):
        assert r.text(msgs) == "be brief\n\n2+2?"
        r.text(msgs)
    warnings = [rec.getMessage() for rec in caplog.records if "chat template" in rec.getMessage()]
    assert len(warnings) == 1 and "joined with a blank line" in warnings[0]


def test_a_model_directory_without_a_tokenizer_says_so(tmp_path, tiny_model_dir, capsys):
    from repo_rl.models.loading import TOKENIZER_FILES

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir)
    for f in model_dir.iterdir():
        if f.name in TOKENIZER_FILES or f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    data = tmp_path / "e.jsonl"
    data.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--n", "1", "--no-progress", "--output", str(tmp_path / "r.json")]) == 2
    line = _err_line(capsys)
    assert "has no tokenizer" in line and "tokenizer.json" in line
    assert main(["train", "-o", str(tmp_path / "t"), f"model.name_or_path={model_dir}"]) == 2
    assert "has no tokenizer" in _err_line(capsys)


def test_out_of_memory_is_one_line_naming_the_keys(tmp_path, tiny_model_dir, tiny_data, capsys, monkeypatch):
    from repo_rl.trainer import Trainer

    def boom(self):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB")

    monkeypatch.setattr(Trainer, "train", boom)
    capsys.readouterr()
    assert main(["train", "-o", str(tmp_path / "r"), *tiny_overrides(tiny_model_dir, tiny_data)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "out of memory" in err[-1] and "train.micro_batch_size" in err[-1] and "Traceback" not in "\n".join(err)


def test_own_data_without_a_config_gets_general_defaults_not_the_toy_worlds(tmp_path, tiny_model_dir, tiny_data, capsys):
    out = tmp_path / "r"
    over = [f"model.name_or_path={tiny_model_dir}", f"data.train_files={tiny_data}", "reward.funcs=[tests.helpers.rewards:contains_answer]",
            "train.max_steps=1", "train.prompts_per_step=2", "algorithm.num_generations=2", "algorithm.max_completion_length=4",
            "logging.progress=false"]
    assert main(["train", "-o", str(out), *over]) == 0
    saved = __import__("yaml").safe_load((out / "config.yaml").read_text())
    assert saved["train"]["learning_rate"] == 1e-6 and saved["eval"]["every"] == 0 and saved["repo"]["rephrase_template"] != "R{question}|{solution}|"
    assert "general defaults" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,own", [
    (["data.train_files=my.jsonl"], True),
    (["data.train_files=[a.jsonl, toyworld:basic]"], True),
    (["data.train_files='toyworld:basic'"], False),
    (["data.train_files=[toyworld:basic]"], False),
    (["model.name_or_path=some/model"], False),
    (["data.train_files"], False),  # malformed: load_config names it
])
def test_which_overrides_name_data_of_ones_own(overrides, own):
    from repo_rl.cli import _own_data

    assert _own_data(overrides) is own
