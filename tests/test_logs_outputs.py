"""What a run leaves for its user: plain log lines without a terminal, report.md for every run,
completions that carry their prompt and reference answer."""

from __future__ import annotations

import json

from repo_rl.cli import main
from repo_rl.step.metrics import as_prompt_text, log_line

from .conftest import tiny_overrides


def test_a_run_without_a_terminal_logs_plain_lines_and_writes_a_report(tmp_path, tiny_model_dir, tiny_data, capsys):
    out = tmp_path / "run"
    # logging.progress stays true: stderr is captured (not a terminal), so lines replace the bar.
    over = tiny_overrides(tiny_model_dir, tiny_data, **{"train.max_steps": 4, "logging.progress": True, "logging.logging_steps": 2})
    assert main(["train", "-o", str(out), *over]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "4/4"]
    assert all("loss" in line and "reward" in line and "s/step" in line for line in lines)
    report = (out / "report.md").read_text()
    assert "## Last step" in report and (out / "metrics.png").is_file()

    rows = [json.loads(line) for line in tiny_data.read_text().splitlines()]
    by_id = {r["id"]: r for r in rows}
    comps = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert comps
    for c in comps:
        assert c["prompt"] == by_id[c["prompt_id"]]["prompt"] and c["answer"] == by_id[c["prompt_id"]]["answer"]


def test_log_line_and_prompt_text():
    line = log_line({"step": 3, "loss": 0.5, "reward": float("nan"), "time/step": 1.25}, 10)
    assert line.startswith("step 3/10 | loss 0.5000 | reward -") and line.endswith("1.25 s/step")
    assert as_prompt_text([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]) == "system: s\nuser: q"


def test_evaluation_docs_name_the_real_checkpoint_layout():
    import re
    from pathlib import Path

    import repo_rl.run.checkpoint as ck

    text = (Path(__file__).resolve().parents[1] / "docs" / "EVALUATION.md").read_text()
    paths = re.findall(r"checkpoints/(step-[0-9]+)(\S*)", text)
    assert paths
    src = Path(ck.__file__).read_text()
    assert 'f"step-{step}"' in src  # step-N, no zero padding, weights at the top of the directory
    for name, rest in paths:
        assert not name.startswith("step-0") and rest in ("", "/"), (name, rest)


def test_the_toy_report_puts_table_and_curves_on_the_same_items_and_says_how_they_differ(tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["train", "-o", str(out), "train.max_steps=1", "eval.every=1", "eval.max_items=6", "train.save_every=1"]) == 0
    report = (out / "report.md").read_text()
    assert "Accuracy before and after training" in report
    assert "greedy decoding on 6 items per split" in report and "first 6 items" in report and "so the two can differ" in report
