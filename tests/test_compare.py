"""Smoke test of ``repo-rl compare`` on a very small budget (the full comparison is a benchmark)."""

from __future__ import annotations

import json

from repo_rl.cli import main

SMALL = ["train.max_steps=2", "train.prompts_per_step=4", "algorithm.num_generations=4", "eval.every=1",
         "eval.max_items=8", "train.save_every=0", "toyworld.n_train=64", "toyworld.n_eval=16", "train.threads=1",
         "algorithm.max_completion_length=40"]


def test_compare_smoke(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--methods", "repo,sft", "--seeds", "1", "-o", str(out), "--eval-n", "4", "--no-progress", *SMALL])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    methods = {r["method"] for r in res["results"]}
    assert methods == {"repo", "sft"}
    for r in res["results"]:
        assert r["steps"] == 2
        assert set(r["after"]) >= {"easy", "hard", "general"}
        assert all(0.0 <= v <= 1.0 for v in r["after"].values())
    report = (out / "report.md").read_text()
    assert "| repo |" in report and "| sft |" in report and "Command:" in report
    assert (out / "curves.png").stat().st_size > 1000
    # Same budget: every run made the same number of policy updates.
    for m in methods:
        rows = [json.loads(l) for l in (out / "runs" / f"{m}-seed0" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert "eval/hard/avg@1" in rows[0]
    # Resumable: a second call reuses the finished runs instead of training again.
    before = (out / "runs" / "repo-seed0" / "result.json").stat().st_mtime
    assert main(["compare", "--methods", "repo", "--seeds", "1", "-o", str(out), "--no-progress", *SMALL]) == 0
    assert (out / "runs" / "repo-seed0" / "result.json").stat().st_mtime == before


def test_compare_writes_plain_lines_without_a_terminal(tmp_path, capsys):
    """Output to a log file: one plain line per run, and no progress bar (its carriage returns), not
    even the libraries' weight-loading bars."""
    rc = main(["compare", "--methods", "sft", "--seeds", "1", "-o", str(tmp_path / "cmp"), "--eval-n", "4", *SMALL])
    err = capsys.readouterr().err
    assert rc == 0
    assert "compare: run 1/1 done (sft, seed 0," in err
    assert "\r" not in err and "Loading weights" not in err
