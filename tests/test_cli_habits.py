"""Habits of real users at the command line: overrides anywhere, hostile YAML, compare's help,
one-seed tables and torn result files, hub ids offline and the built-in tiny model."""

from __future__ import annotations

import json
import socket
import time

import pytest

from repo_rl.cli import build_parser, main

from .conftest import tiny_overrides
from .test_cli import assert_one_line_error, cfg_file, run  # noqa: F401 - cfg_file is a fixture
from .test_compare import SMALL

# --------------------------------------------------------------------------------------
# 1. Dotted overrides before, between and after the flags
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,flags",
    [
        (["train", "train.max_steps=1", "-o", "X", "train.seed=1", "--no-eval", "repo.rho=0.5"],
         {"output_dir": "X", "no_eval": True}),
        (["config", "train.max_steps=1", "-c", "c.yaml", "train.seed=1", "repo.rho=0.5"], {"config": "c.yaml"}),
        (["compare", "train.max_steps=1", "--seeds", "1", "train.seed=1", "-o", "D", "repo.rho=0.5"],
         {"seeds": 1, "output_dir": "D"}),
    ],
)
def test_overrides_mixed_with_flags_are_all_collected(argv, flags):
    args = build_parser().parse_args(argv)
    assert args.overrides == ["train.max_steps=1", "train.seed=1", "repo.rho=0.5"]
    for k, v in flags.items():
        assert getattr(args, k) == v


def test_overrides_mixed_with_flags_reach_the_config(capsys, cfg_file):
    assert main(["config", "train.max_steps=7", "--config", str(cfg_file), "train.seed=5"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "seed: 5" in out


def test_flag_errors_stay_one_line_naming_the_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "train.max_steps=1", "--no-such-flag", "train.seed=1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-such-flag" in err[0] and "repo-rl train --help" in err[0], err
    with pytest.raises(SystemExit) as e:
        main(["compare", "train.max_steps=1", "-o"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--output-dir" in err[0], err
    # A positional without '=' is still an override, rejected by the config with its usual message.
    rc, lines = run(capsys, ["config", "train.max_steps=1", "no_equals_sign"])
    assert_one_line_error(rc, lines, "no_equals_sign", "key.sub=value")


# --------------------------------------------------------------------------------------
# 2. Nested aliases ("billion laughs") stop at load time, duplicate keys still do
# --------------------------------------------------------------------------------------


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A valid-looking config whose value expands to width**levels strings (9**9 = 387M)."""
    items = ["&a [" + ", ".join(["lol"] * width) + "]"]
    for prev, name in zip("abcdefghijklmnop", "bcdefghijklmnopq"[: levels - 1]):
        items.append(f"&{name} [" + ", ".join([f"*{prev}"] * width) + "]")
    return "# nested aliases\ntrain:\n  max_steps: [" + ", ".join(items) + "]\n"


@pytest.fixture()
def alias_bomb(tmp_path):
    p = tmp_path / "laughs.yaml"
    p.write_text(_alias_bomb())
    assert 300 < p.stat().st_size < 600
    return p


def test_alias_bomb_config_is_a_quick_one_line_error(capsys, alias_bomb):
    from repo_rl.config import ConfigError, load_yaml

    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="laughs.yaml.*(100000|alias)"):
        load_yaml(alias_bomb)
    assert time.perf_counter() - t0 < 1.0
    for cmd in (["config", "-c", str(alias_bomb)], ["train", "--config", str(alias_bomb), "-o", str(alias_bomb.parent / "o")]):
        t0 = time.perf_counter()
        rc, lines = run(capsys, cmd)
        assert time.perf_counter() - t0 < 2.0
        assert_one_line_error(rc, lines, str(alias_bomb), "nodes", "aliases")
    assert not (alias_bomb.parent / "o").exists()


def test_alias_bomb_in_an_override_does_not_expand(capsys, cfg_file):
    bomb = _alias_bomb().split("max_steps: ", 1)[1].strip()
    t0 = time.perf_counter()
    rc, lines = run(capsys, ["config", "-c", str(cfg_file), f"train.max_steps={bomb}"])
    assert time.perf_counter() - t0 < 2.0
    assert_one_line_error(rc, lines, "train.max_steps", "integer")


def test_safe_yaml_counts_alias_expansions_and_keeps_duplicate_key_checks(tmp_path, capsys):
    import yaml

    from repo_rl.config import safe_yaml
    from repo_rl.config import load_yaml

    # Aliases used a few times (shared settings) load as before.
    ok = tmp_path / "ok.yaml"
    ok.write_text("x: &lr 1.0e-4\ntrain:\n  learning_rate: *lr\nrepo: &r {rho: 0.5}\n")
    assert load_yaml(ok)["train"]["learning_rate"] == 1.0e-4
    # The bound is on the expanded size, not the text: 3 levels of 60 = 216,000 scalars.
    wide = "a: &a [" + ", ".join(["1"] * 60) + "]\nb: &b [" + ", ".join(["*a"] * 60) + "]\nc: [" + ", ".join(["*b"] * 60) + "]\n"
    assert len(safe_yaml.safe_load("a: &a [" + ", ".join(["1"] * 60) + "]\nb: [" + ", ".join(["*a"] * 60) + "]\n")["b"]) == 60
    with pytest.raises(safe_yaml.YAMLExpansionError, match="100000 nodes"):
        safe_yaml.safe_load(wide)
    with pytest.raises(yaml.YAMLError, match="contains it"):
        safe_yaml.safe_load("a: &a [1, *a]\n")
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  max_steps: 1\n  max_steps: 2\n")
    rc, lines = run(capsys, ["config", "-c", str(dup)])
    assert_one_line_error(rc, lines, "dup.yaml", "duplicate key 'max_steps'")


# --------------------------------------------------------------------------------------
# 3. compare: --help names the methods; one seed prints no "± 0.000"
# --------------------------------------------------------------------------------------


def test_compare_help_lists_the_methods_and_the_default(capsys):
    from repo_rl.algorithms import METHODS

    default = build_parser().parse_args(["compare"]).methods
    with pytest.raises(SystemExit) as e:
        main(["compare", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    helptext = text[text.index("--methods"):text.index("--seeds SEEDS number")].replace(", ", ",")
    for name in METHODS:
        assert name in helptext, name
    assert f"default: {default})" in helptext
    assert "repo-rl methods" in text


def _result(method, seed, hard):
    return {"method": method, "seed": seed, "before": {"easy": 1.0, "hard": 0.0},
            "after": {"easy": 1.0, "hard": hard}, "steps": 2}


def test_compare_table_with_one_seed_has_no_zero_spread(tmp_path):
    from repo_rl.compare import summarize, write_report

    one = summarize([_result("repo", 0, 0.5), _result("grpo", 0, 0.0)], ["repo", "grpo"])
    text = write_report(tmp_path, one, "repo-rl compare --seeds 1", "Seeds: 1.").read_text()
    assert "| repo | 1.000 | 0.500 |" in text and "| grpo | 1.000 | 0.000 |" in text
    assert "±" not in text.split("| method |", 1)[1].split("\n\n", 1)[0], text
    assert "± 0.000" not in text and "One seed" in text
    two = summarize([_result("repo", 0, 0.5), _result("repo", 1, 0.7)], ["repo"])
    text = write_report(tmp_path, two, "repo-rl compare --seeds 2", "Seeds: 2.").read_text()
    assert "| repo | 1.000 ± 0.000 | 0.600 ± 0.141 |" in text and "standard deviation" in text


# --------------------------------------------------------------------------------------
# 4. compare: a torn result.json / before.json is an unfinished run, redone
# --------------------------------------------------------------------------------------


def test_compare_redoes_a_run_whose_result_file_is_torn(tmp_path, capsys, monkeypatch):
    import repo_rl.compare

    monkeypatch.setattr(repo_rl.compare, "plot_curves", lambda *a, **k: None)  # 3 s a call; test_compare plots
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "sft", "--seeds", "1", "-o", str(out), "--eval-n", "4", "--no-progress", *SMALL]
    assert main(argv) == 0
    run_dir = out / "runs" / "sft-seed0"
    good = json.loads((run_dir / "result.json").read_text())
    capsys.readouterr()
    # Killed while writing: half a JSON object.
    text = (run_dir / "result.json").read_text()
    (run_dir / "result.json").write_text(text[: len(text) // 2])
    assert main(argv) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "result.json" in line]
    assert len(err) == 1 and "interrupted" in err[0] and "again" in err[0], err
    redone = json.loads((run_dir / "result.json").read_text())
    assert redone["steps"] == good["steps"] == 2 and redone["before"] == good["before"]
    assert json.loads((out / "results.json").read_text())["results"][0]["method"] == "sft"
    # A torn before.json (no checkpoint to resume: save_every=0) starts the run over.
    (run_dir / "result.json").unlink()
    (run_dir / "before.json").write_text('{"easy": 1.0, "ha')
    assert main(argv) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "before.json" in line]
    assert len(err) == 1 and "from the start" in err[0], err
    assert json.loads((run_dir / "before.json").read_text()) == good["before"]
    assert not list(run_dir.glob(".*.tmp"))


# --------------------------------------------------------------------------------------
# 5. A hub id on an offline machine fails at once with the fixes
# --------------------------------------------------------------------------------------

FAKE_HUB_ID = "nobody-here/no-such-model-xyz"


def test_hub_id_with_hf_hub_offline_fails_fast_naming_the_fixes(capsys, tmp_path, tiny_data, cfg_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = []
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: attempts.append(a) or (_ for _ in ()).throw(OSError("no")))
    over = tiny_overrides("unused", tiny_data, **{"model.name_or_path": FAKE_HUB_ID})
    t0 = time.perf_counter()
    rc, lines = run(capsys, ["train", "--config", str(cfg_file), "-o", str(tmp_path / "o"), *over])
    assert time.perf_counter() - t0 < 5.0
    assert_one_line_error(rc, lines, f"model.name_or_path={FAKE_HUB_ID}", "HF_HUB_OFFLINE=1", "local model directory",
                          "toyworld", "smollm2-135m-instruct", "tiny")
    assert not attempts  # offline means no probe of the network either


def test_hub_id_with_an_unreachable_hub_fails_fast_naming_the_fixes(capsys, tmp_path, tiny_data, cfg_file, monkeypatch):
    from repo_rl.models import loading as modeling

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)

    def hang(*a, **k):  # a firewall that drops packets: the connect never returns by itself
        time.sleep(3)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(modeling, "HUB_CONNECT_TIMEOUT", 0.3)
    over = tiny_overrides("unused", tiny_data, **{"model.name_or_path": FAKE_HUB_ID})
    t0 = time.perf_counter()
    rc, lines = run(capsys, ["train", "--config", str(cfg_file), "-o", str(tmp_path / "o"), *over])
    assert time.perf_counter() - t0 < 5.0
    assert_one_line_error(rc, lines, f"model.name_or_path={FAKE_HUB_ID}", "cannot be reached", "set HF_HUB_OFFLINE=1",
                          "local model directory", "built-in model (toyworld, smollm2-135m-instruct, tiny)")
    t0 = time.perf_counter()
    assert "within 0.3 s" in modeling._hub_unreachable()  # a hanging connect is cut at the timeout
    assert time.perf_counter() - t0 < 1.5
    # With a copy in the Hugging Face cache, an unreachable hub means: load the cached copy only.
    monkeypatch.setattr(modeling, "_in_hub_cache", lambda repo_id, revision: True)
    assert modeling._check_hub_reachable(FAKE_HUB_ID, None) is True


# --------------------------------------------------------------------------------------
# 6. model.name_or_path=tiny: the offline tiny model of repo_rl.models.tiny
# --------------------------------------------------------------------------------------


def test_tiny_is_a_builtin_model_name(capsys, tmp_path, tiny_data, cfg_file, monkeypatch):
    monkeypatch.setenv("REPO_RL_CACHE", str(tmp_path / "cache"))
    over = tiny_overrides("tiny", tiny_data, **{"train.max_steps": 1, "train.save_every": 0})
    assert main(["train", "--config", str(cfg_file), "-o", str(tmp_path / "o"), *over]) == 0
    built = tmp_path / "cache" / "tiny"
    assert (built / "config.json").is_file() and (built / "tokenizer.json").is_file()
    rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    stamp = (built / "config.json").stat().st_mtime_ns
    from repo_rl.models.loading import resolve_model_path

    assert resolve_model_path("tiny") == str(built)  # built once, then reused
    assert (built / "config.json").stat().st_mtime_ns == stamp
