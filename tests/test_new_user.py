"""What a new user meets on a fresh clone on a common CPU: two fault cases (a damaged verdict cache,
a custom reward that raises) and small mismatches with the tools they know, each with a test."""

from __future__ import annotations

import json
import logging
import os

import pytest
from pathlib import Path

from repo_rl.data import Example
from repo_rl.rewards.judge import JudgeReward, VerdictCache
from repo_rl.rewards.scorer import RewardScorer

from .helpers.judge_server import JudgeServer


# --------------------------------------------------------------------------- a corrupt verdict cache


def test_a_corrupt_verdict_cache_is_moved_aside_and_a_new_one_started(tmp_path, caplog):
    path = tmp_path / "judge.sqlite"
    path.write_bytes(os.urandom(4096))
    with caplog.at_level(logging.WARNING, logger="repo_rl.rewards"), JudgeServer() as srv:
        j = JudgeReward(srv.url, srv.model, cache=str(path), backoff=0.01)
        assert j(prompts=["q"], completions=["it is 5"], answer=["5"]) == [1.0]
        assert j(prompts=["q"], completions=["it is 5"], answer=["5"]) == [1.0]
        assert len(srv.chat_requests()) == 1  # the new cache works: the second call is a hit
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "not a usable database" in said[0] and "started a new one" in said[0]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("judge.sqlite.corrupt-")]
    assert len(aside) == 1 and aside[0].stat().st_size == 4096


def test_a_cache_that_cannot_be_opened_is_switched_off_not_moved_aside(tmp_path, caplog):
    path = tmp_path / "judge.sqlite"
    path.mkdir()  # sqlite cannot open it (as a cache locked by another run): nothing about it says it is damaged
    with caplog.at_level(logging.WARNING, logger="repo_rl.rewards"):
        cache = VerdictCache(path)
    assert not cache.enabled and path.is_dir() and [p.name for p in tmp_path.iterdir()] == ["judge.sqlite"]
    assert len(caplog.records) == 1 and "cannot be opened" in caplog.records[0].getMessage()


def test_a_cache_that_fails_later_is_switched_off_with_one_warning(tmp_path, caplog):
    cache = VerdictCache(tmp_path / "c.sqlite")
    (tmp_path / "c.sqlite").write_bytes(b"garbage, not sqlite" * 100)  # damaged while the run goes on
    with caplog.at_level(logging.WARNING, logger="repo_rl.rewards"):
        assert cache.get_many(["a", "b"]) == {}
        cache.put_many([("a", 1.0, "YES")])
        assert cache.get_many(["a"]) == {}
    assert not cache.enabled and len(caplog.records) == 1 and "not cached for the rest of this run" in caplog.records[0].getMessage()


# --------------------------------------------------------------------------- a reward that raises on batches


def test_a_reward_that_raises_on_every_batch_is_named_once_and_counted(caplog):
    scorer = RewardScorer(["tests.helpers.fault_rewards:raises_on_batches"], None, 5.0)
    exs = [Example("q", a, None, id=f"r{i}") for i, a in enumerate(["5", "7", "9"])]
    with caplog.at_level(logging.WARNING, logger="repo_rl.rewards"):
        for _ in range(2):
            r, m = scorer([e.prompt for e in exs], ["it is 5", "it is 6", "9!"], exs)
            assert r.tolist() == [1.0, 0.0, 1.0]  # the fallback still scores every item
            assert m["rewards/raises_on_batches/batch_errors"] == 1.0 and m["rewards/verifier_errors"] == 0.0
    said = [rec.getMessage() for rec in caplog.records]
    assert len(said) == 1, said
    assert "raises_on_batches" in said[0] and "ValueError: expected one completion, got 3" in said[0]
    (line,) = scorer.summary()
    assert "raised on 2 of its 2 calls" in line and "ValueError" in line
    scorer.close()
    assert RewardScorer(["numeric"], None, 5.0).summary() == []


def test_batch_errors_reach_the_step_metrics(tmp_path, tiny_model_dir, tiny_data, capsys):
    from repo_rl.cli import main

    from .conftest import tiny_overrides

    over = tiny_overrides(tiny_model_dir, tiny_data, **{"reward.funcs": "[tests.helpers.fault_rewards:raises_on_batches]",
                                                        "train.max_steps": 2, "algorithm.method": "grpo"})
    assert main(["train", "-o", str(tmp_path / "r"), *over]) == 0
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rewards/raises_on_batches/batch_errors"] == 1.0 for r in rows)
    err = capsys.readouterr().err
    assert "reward tests.helpers.fault_rewards:raises_on_batches raised on 2 of its 2 calls" in err


@pytest.mark.parametrize("key", ["algorithm.method"])
def test_config_keys_list_every_method(key, capsys):
    from repo_rl.algorithms import METHODS
    from repo_rl.cli import main

    assert main(["config", "--keys"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(key + " "))
    assert all(m in line for m in METHODS), line


def test_every_cache_lives_under_one_directory():
    from repo_rl.config import Config
    from repo_rl.models.smollm import cache_root

    cfg = Config()
    assert cfg.reward.judge.cache == cfg.repo.judge.cache == "~/.cache/repo-rl/judge.sqlite"
    assert cache_root().name == "repo-rl" or "REPO_RL_CACHE" in os.environ


# --------------------------------------------------------------------------- bf16 follows the hardware


@pytest.mark.parametrize("flags,want,needle", [
    ({"avx2", "avx512f", "avx512_bf16"}, True, "this CPU has avx512_bf16"),
    ({"avx2", "amx_bf16", "amx_tile"}, True, "this CPU has amx_bf16"),
    ({"avx2", "fma"}, False, "neither avx512_bf16 nor AMX"),
    (set(), False, "unknown"),
])
def test_bf16_auto_follows_the_cpu(monkeypatch, flags, want, needle):
    from repo_rl.run import health

    monkeypatch.setattr(health, "cpu_flags", lambda: flags)
    on, why = health.resolve_bf16("auto", "cpu")
    assert on is want and needle in why
    assert health.resolve_bf16(True, "cpu") == (True, "train.bf16=true")  # an explicit setting wins
    assert health.resolve_bf16(False, "cpu") == (False, "train.bf16=false")


def test_the_start_line_says_which_precision_and_why(monkeypatch, tmp_path, tiny_model_dir, tiny_data, capsys):
    from repo_rl.run import health
    from repo_rl.cli import main

    from .conftest import tiny_overrides

    monkeypatch.setattr(health, "cpu_flags", lambda: {"avx2"})
    over = [o for o in tiny_overrides(tiny_model_dir, tiny_data, **{"train.max_steps": 1}) if not o.startswith("train.bf16")]
    assert main(["train", "-o", str(tmp_path / "r"), *over]) == 0
    err = capsys.readouterr().err
    assert "precision: float32 (train.bf16=auto: this CPU has neither avx512_bf16 nor AMX" in err
    assert "bf16: auto" in (tmp_path / "r" / "config.yaml").read_text()  # the setting, resolved again on resume


# --------------------------------------------------------------------------- own data on a small-context model


def _rows(tmp_path, n=4):
    data = tmp_path / "own.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"what is {i}+1?", "answer": str(i + 1),
                                        "solution": f"{i} plus one is {i + 1}"}) + "\n" for i in range(n)))
    return data


def test_a_rephrase_prompt_over_the_context_names_the_template_and_counts_the_rows(tmp_path, tiny_model_dir, capsys):
    from repo_rl.cli import main

    from .conftest import tiny_overrides

    long_template = "{question} {solution} " + "please read the reference carefully. " * 16
    over = tiny_overrides(tiny_model_dir, _rows(tmp_path), **{"repo.rephrase_template": json.dumps(long_template),
                                                              "repo.max_new_tokens": 100})
    rc = main(["train", "-o", str(tmp_path / "r"), *over])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and line.startswith("repo-rl: error: r0: the rephrase prompt has ")
    assert "(4 of 4 rows with a solution do not fit)" in line
    assert "the largest part is the template and question (repo.rephrase_template): shorten repo.rephrase_template" in line
    # the solution is named only when it is the long part
    assert "shorten the solutions" not in line


def test_new_tokens_named_when_they_overflow_and_skip_counts_the_rows(tmp_path, tiny_model_dir, capsys):
    from repo_rl.cli import main

    from .conftest import tiny_overrides

    over = tiny_overrides(tiny_model_dir, _rows(tmp_path), **{"repo.max_new_tokens": 500, "train.max_steps": 1})
    rc = main(["train", "-o", str(tmp_path / "r"), *over])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "the largest part is the 500 new tokens (repo.max_new_tokens): lower repo.max_new_tokens" in line
    rc = main(["train", "-o", str(tmp_path / "s"), *over, "data.on_bad_row=skip"])
    err = capsys.readouterr().err
    assert rc == 0 and "data: 4 rows whose rephrase prompt does not fit the model's context are never rephrased" in err
    rows = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["repo/gate_rate"] == 0.0 and rows[0]["repo/rephrase_success_rate"] is None  # no row is ever rephrased


def test_own_data_on_the_toy_model_gets_no_toy_table(tmp_path, capsys, monkeypatch):
    """The toy world's easy / hard / general table is about the toy world: a run of the toy model on
    other data neither prints nor saves it (its evaluation takes about 20 s)."""
    from repo_rl import cli

    called = []
    monkeypatch.setattr(cli, "_toy_eval", lambda trainer, cfg: called.append(1) or {"easy": 1.0})
    data = tmp_path / "own.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"W{i}=", "answer": str(i), "solution": f"A{i}"}) + "\n" for i in range(8)))
    rc = cli.main(["train", "-o", str(tmp_path / "r"), f"data.train_files={data}", "data.eval_files=null", "eval.every=0",
                   "model.name_or_path=toyworld", "reward.funcs=[tests.helpers.rewards:contains_answer]", "repo.verify=[reward]",
                   "train.max_steps=1", "train.prompts_per_step=2", "algorithm.max_completion_length=4", "logging.progress=false",
                   "repo.rephrase_template=R{question}|{solution}|", "repo.max_new_tokens=4"])
    err = capsys.readouterr().err
    assert rc == 0, err[-500:]
    assert not called and "before  after" not in err
    report = (tmp_path / "r" / "report.md").read_text()
    assert "Accuracy before and after" not in report and "data.eval_files" not in report


def test_a_run_resumes_from_any_working_directory(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from repo_rl.cli import main

    from .conftest import tiny_overrides

    start = tmp_path / "project"
    (start / "data").mkdir(parents=True)
    _rows(start / "data")
    monkeypatch.chdir(start)
    over = tiny_overrides(tiny_model_dir, "data/own.jsonl", **{"train.max_steps": 2, "train.save_every": 1})
    assert main(["train", "-o", "runs/r", *over]) == 0
    saved = (start / "runs" / "r" / "config.yaml").read_text()
    assert f"train_files: {start / 'data' / 'own.jsonl'}" in saved  # kept absolute
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", "-o", str(start / "runs" / "r"), "--resume", "train.max_steps=3"]) == 0, capsys.readouterr().err[-500:]
    monkeypatch.chdir(start)  # the same relative path typed again from the start directory is the same run
    assert main(["train", "-o", "runs/r", "--resume", "train.max_steps=4", "data.train_files=data/own.jsonl"]) == 0
    rows = [json.loads(x) for x in (start / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_eval_refuses_more_new_tokens_than_the_context(tmp_path, tiny_model_dir, capsys):
    from repo_rl.cli import main

    data = Path(__file__).parent / "data" / "eval" / "aime24.jsonl"
    rc = main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--max-new-tokens", "1024",
               "--output", str(tmp_path / "r.json")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and line.startswith("repo-rl: error: --max-new-tokens 1024: the model's context is 512 tokens")
    assert not (tmp_path / "r.json").exists()


# --------------------------------------------------------------------------- strict rewards

STRICT_CASES = [
    # (completion, answer, math, math_strict, numeric, numeric_strict)
    ("k99999999999999999=9;9+9=k99999,", "9", 1.0, 0.0, 0.0, 0.0),  # the lax math reward finds a 9 in the noise
    ("so 8 + 1 = 9, and \\boxed{9}", "9", 1.0, 1.0, 1.0, 1.0),
    ("The answer is 9.", "9", 1.0, 0.0, 1.0, 0.0),  # right, but not in a final box: only the lax modes accept it
    ("\\boxed{9} ... no, 10", "9", 1.0, 1.0, 1.0, 1.0),  # the last box counts, not the last number
    ("\\boxed{10}. Reference: 9", "9", 0.0, 0.0, 0.0, 0.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0, 1.0, 1.0, 1.0),
    ("the answer is \\boxed{9", "9", 0.0, 0.0, 1.0, 0.0),  # a truncated box is no box (math-verify finds nothing)
]


@pytest.mark.parametrize("text,answer,lax_math,strict_math,lax_num,strict_num", STRICT_CASES)
def test_strict_modes_accept_only_a_final_boxed_answer(text, answer, lax_math, strict_math, lax_num, strict_num):
    from repo_rl.rewards import load_reward

    got = {name: load_reward(name)(prompts=["q"], completions=[text], answer=[answer])[0]
           for name in ("math", "math_strict", "numeric", "numeric_strict")}
    assert got["math_strict"] == strict_math and got["numeric"] == lax_num and got["numeric_strict"] == strict_num
    if lax_math is not None:
        assert got["math"] == lax_math


def test_a_json_line_missing_its_closing_brace_is_reported_where_it_ends(tmp_path):
    from repo_rl.config import FieldsConfig
    from repo_rl.data import DataError, load_examples

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "2"\n')
    with pytest.raises(DataError) as ei:
        load_examples(str(path), FieldsConfig())
    msg = str(ei.value)
    assert msg.startswith(f"{path}:2: invalid JSON") and "column 30" in msg and "closing brace" in msg
    path.write_text('{"prompt": "a", "answer": 1 2}\n')
    with pytest.raises(DataError, match="column 29") as ei:
        load_examples(str(path), FieldsConfig())
    assert "closing brace" not in str(ei.value)  # an error inside the line gets no end-of-line hint


def test_the_trl_example_runs_quietly(tmp_path):
    """examples/trl_repo.py, as the docs run it: it finishes and prints no warning (from the deprecated
    gradient-checkpointing names or DeepSpeed's GPU probe, for example)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=f"{root / 'src'}:{root}")
    p = subprocess.run([sys.executable, str(root / "examples" / "trl_repo.py"), "--max-steps", "1", "--output-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-800:]
    assert "totals:" in p.stdout
    assert "Warning" not in p.stderr and "WARNING" not in p.stderr, p.stderr[-800:]
