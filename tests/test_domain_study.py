"""The real-model study's driver (studies/domain_world/study.py): the learning-rate choice, the
table, and which runs it starts, resumes or skips. Training itself is replaced by a fake that
writes a metrics file, so these tests need neither vLLM nor a model."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "studies" / "domain_world"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("domain_study", HERE / "study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _summary(val: dict[int, float], heldout: float = 0.0, general: float = 0.5) -> dict:
    return {"evals": {"val": val, "heldout": {max(val): heldout}, "general": {max(val): general}},
            "reward": 0.1, "injected": float("nan"), "rephrase_ok": float("nan"), "logp_gap": float("nan"),
            "reverse_kl": float("nan"), "entropy": 1.0, "s_per_step": 10.0, "wall_s": 120.0}


def test_the_rate_with_the_best_final_val_accuracy_is_kept(study):
    sweep = {1e-5: _summary({10: 0.2, 20: 0.1}), 1e-4: _summary({10: 0.0, 20: 0.3})}
    assert study.pick_lr(sweep) == 1e-4


def test_ties_go_to_the_mean_over_evaluations_then_to_the_lower_rate(study):
    by_mean = {1e-5: _summary({10: 0.0, 20: 0.2}), 1e-4: _summary({10: 0.1, 20: 0.2})}
    assert study.pick_lr(by_mean) == 1e-4
    all_zero = {1e-4: _summary({10: 0.0, 20: 0.0}), 1e-5: _summary({10: 0.0, 20: 0.0}), 3e-5: _summary({10: 0.0, 20: 0.0})}
    assert study.pick_lr(all_zero) == 1e-5


def test_held_out_and_general_accuracy_play_no_part_in_the_choice(study):
    sweep = {1e-5: _summary({20: 0.1}, heldout=0.9, general=0.9), 1e-4: _summary({20: 0.2}, heldout=0.0, general=0.0)}
    assert study.pick_lr(sweep) == 1e-4


def test_table_gives_mean_and_sd_over_seeds(study):
    runs = {"grpo": [_summary({20: 0.1}, heldout=0.25), _summary({20: 0.3}, heldout=0.75)]}
    md = study.table({"val": 0.0, "heldout": 0.02, "general": 0.4}, {"grpo": 1e-5}, runs, {"grpo": {1e-5: runs["grpo"][0]}})
    row = next(line for line in md.splitlines() if line.startswith("| grpo"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "grpo (2 seeds)" and cells[1] == "1e-05"
    assert cells[2] == "0.200 ± 0.141 (1e-05 → 0.100)"
    assert cells[3] == f"0.500 ± {math.sqrt(0.125):.3f}"
    assert cells[6] == "-"  # no rephrases for grpo: a dash, not nan
    assert md.startswith("Before training: val 0.000, held-out 0.020, general 0.400.")


def test_table_lists_every_sweep_run_and_marks_the_kept_rate(study):
    sweep = {1e-5: _summary({20: 0.1}, general=0.4), 1e-4: _summary({20: 0.3}, general=0.05)}
    md = study.table({"val": 0.0, "heldout": 0.0, "general": 0.4}, {"sft": 1e-4}, {"sft": [sweep[1e-4]]}, {"sft": sweep})
    rows = [line for line in md.splitlines() if line.startswith("| sft |")]
    assert [[c.strip() for c in r.strip("|").split("|")][1:5] for r in rows] == [
        ["1e-05", "0.100", "0.000", "0.400"], ["**0.0001**", "0.300", "0.000", "0.050"]]


def _fake_train(calls: list[list[str]], fail: bool = False):
    """Stands in for ``repo-rl train``: records the command and writes a two-evaluation metrics file."""

    def call(cmd, stdout=None, stderr=None, env=None):
        calls.append(cmd)
        if fail:
            return 1
        out = Path(cmd[cmd.index("-o") + 1])
        out.mkdir(parents=True, exist_ok=True)
        lr = float(next(a for a in cmd if a.startswith("train.learning_rate=")).split("=")[1])
        rows = []
        for step in (1, 2):
            r = {"step": step, "phase": "grpo", "reward/on_policy": 0.0, "entropy": 1.0, "time/step": 3.0}
            if step == 2:
                r.update({"eval/val/pass@1": lr * 1000, "eval/heldout/pass@1": 0.1, "eval/general/pass@1": 0.4})
            rows.append(r)
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / "checkpoints" / "step-2").mkdir(parents=True, exist_ok=True)
        return 0

    return call


def _args(study, out: Path, *extra: str):
    import argparse

    ns = argparse.Namespace(config=HERE / "pilot.yaml", output_dir=str(out), methods=["grpo"], lrs=[1e-5, 1e-4], seeds=2,
                            steps=2, eval_every=None, jobs=1, keep_checkpoints=False, before_only=None, overrides=list(extra),
                            data=HERE / "data", splits=study.SPLITS)
    return ns


def test_study_sweeps_keeps_a_rate_runs_more_seeds_and_writes_its_report(study, tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(study.subprocess, "call", _fake_train(calls))
    out = tmp_path / "s"
    (out).mkdir()
    (out / "before.json").write_text(json.dumps({"eval/val/pass@1": 0.0, "eval/heldout/pass@1": 0.02, "eval/general/pass@1": 0.4}))
    assert study.Study(_args(study, out, "train.bf16=false")).run() == 0
    names = [Path(c[c.index("-o") + 1]).name for c in calls]
    assert names == ["grpo-lr1e-05-seed0", "grpo-lr0.0001-seed0", "grpo-lr0.0001-seed1"]  # 1e-4 has the higher val
    first = calls[0]
    assert "train.max_steps=2" in first and "eval.every=1" in first and "train.bf16=false" in first
    assert "--resume" not in first
    result = json.loads((out / "study.json").read_text())
    assert result["chosen_lr"] == {"grpo": 1e-4}
    assert (out / "curves.png").stat().st_size > 0
    assert "| grpo (2 seeds) | 0.0001 |" in (out / "study.md").read_text()
    assert not (out / "runs" / "grpo-lr0.0001-seed1" / "checkpoints").exists()  # removed once the run is done

    calls.clear()
    assert study.Study(_args(study, out)).run() == 0
    assert calls == []  # every run finished: nothing trains again


def test_an_interrupted_run_resumes_and_a_run_without_checkpoints_starts_over(study, tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(study.subprocess, "call", _fake_train(calls))
    s = study.Study(_args(study, tmp_path))
    ckpt = tmp_path / "runs" / "grpo-lr1e-05-seed0" / "checkpoints" / "step-1"  # the trainer's checkpoint names
    ckpt.mkdir(parents=True)
    s.train("grpo", 1e-5, 0)
    assert "--resume" in calls[-1]
    stale = tmp_path / "runs" / "grpo-lr1e-05-seed1"
    stale.mkdir()
    (stale / "metrics.jsonl").write_text('{"step": 1}\n')
    s.train("grpo", 1e-5, 1)
    assert "--resume" not in calls[-1]
    assert json.loads((stale / "metrics.jsonl").read_text().splitlines()[0])["phase"] == "grpo"  # rewritten from the start


def test_a_failed_run_stops_the_study_with_its_log(study, tmp_path, monkeypatch):
    monkeypatch.setattr(study.subprocess, "call", _fake_train([], fail=True))
    with pytest.raises(SystemExit, match=r"grpo-lr1e-05-seed0 failed \(exit 1\); see .*grpo-lr1e-05-seed0.log"):
        study.Study(_args(study, tmp_path)).train("grpo", 1e-5, 0)
    assert not (tmp_path / "runs" / "grpo-lr1e-05-seed0" / "done.json").exists()


def test_bad_arguments_are_refused_in_one_line(study, capsys):
    with pytest.raises(SystemExit) as e:
        study.main(["--methods", "repo,nope"])
    assert e.value.code == 2 and "unknown method(s) nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--lrs", "1e-5,x"])
    assert "expected comma-separated numbers" in capsys.readouterr().err


def test_another_world_and_other_splits_reach_every_run(study, tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(study.subprocess, "call", _fake_train(calls))
    args = _args(study, tmp_path)
    args.data, args.splits = tmp_path / "world", ["train", "val"]
    study.Study(args).train("grpo", 1e-5, 0)
    assert f"data.train_files={tmp_path / 'world' / 'train.jsonl'}" in calls[-1]
    assert f"data.eval_files=[{tmp_path / 'world' / 'train.jsonl'},{tmp_path / 'world' / 'val.jsonl'}]" in calls[-1]


def test_a_variant_label_runs_its_method_with_its_settings(study, tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(study.subprocess, "call", _fake_train(calls))
    study.Study(_args(study, tmp_path)).train("repo_noneg", 1e-5, 0)
    assert "algorithm.method=repo" in calls[-1] and "repo.gated_negatives=false" in calls[-1]
    assert calls[-1][calls[-1].index("-o") + 1].endswith("repo_noneg-lr1e-05-seed0")
    with pytest.raises(SystemExit):  # argparse: one line naming the unknown label
        study.main(["--methods", "repo,nonesuch"])
