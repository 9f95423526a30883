"""The shipped word-problem files are what examples/make_math_word.py writes, and the eval set is held out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


def _rows(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def test_shipped_files_are_reproducible_and_the_eval_set_is_disjoint(tmp_path):
    script = ROOT / "examples" / "make_math_word.py"
    train, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    subprocess.run([sys.executable, str(script), "--out", str(train)], check=True, capture_output=True)
    subprocess.run([sys.executable, str(script), "--n", "60", "--seed", "1", "--exclude", str(DATA / "math_word.jsonl"),
                    "--id-prefix", "mwe", "--out", str(ev)], check=True, capture_output=True)
    assert train.read_bytes() == (DATA / "math_word.jsonl").read_bytes()
    assert ev.read_bytes() == (DATA / "math_word_eval.jsonl").read_bytes()
    tr, held = _rows(train), _rows(ev)
    assert len(tr) == 100 and len(held) == 60
    assert not {r["prompt"] for r in tr} & {r["prompt"] for r in held}
    assert not {r["id"] for r in tr} & {r["id"] for r in held}
    for r in held:  # the expert solution's boxed answer is the gold answer
        assert r["solution"].endswith(f"\\boxed{{{r['answer']}}}.")
