"""The domain world of the real-model study (studies/domain_world/make_world.py): seeded, its
shipped files equal what the script builds, and the fact never leaks into a question."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "studies" / "domain_world"


def _world():
    spec = importlib.util.spec_from_file_location("make_world", HERE / "make_world.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shipped_files_are_what_the_script_builds():
    w = _world().build(0)
    for split in ("train", "val", "heldout", "general"):
        shipped = [json.loads(line) for line in (HERE / "data" / f"{split}.jsonl").read_text().splitlines()]
        assert shipped == w[split], split
    assert json.loads((HERE / "data" / "facts.json").read_text())["facts"] == w["facts"]


def test_answers_follow_the_facts_and_the_facts_stay_out_of_the_questions():
    mw = _world()
    w = mw.build(0)
    rates = {f["big"]: f["rate"] for f in w["facts"]}
    for split in ("train", "val", "heldout"):
        for r in w[split]:
            _, big, n, _ = r["id"].split("-")
            assert int(r["answer"]) == int(n) * rates[big]
            assert "equals" not in r["prompt"] and r["fact"] not in r["prompt"]
            assert (("solution" in r) == (split != "heldout"))
    train_ns = {r["id"].split("-")[2] for r in w["train"]}
    held_ns = {r["id"].split("-")[2] for r in w["heldout"]}
    assert train_ns == {"1", "2", "3"} and held_ns == {"4", "5"}
    held_words = {re.sub(r"\d+|plims?|tazzes", "", r["prompt"]) for r in w["heldout"] if "plim" in r["prompt"]}
    train_words = {re.sub(r"\d+|plims?|tazzes", "", r["prompt"]) for r in w["train"] if "plim" in r["prompt"]}
    assert not held_words & train_words  # other wording
    assert mw.build(0) == w and mw.build(1) != w
