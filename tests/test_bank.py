"""The rephrase bank (``repo.fewshot``, :mod:`repo_rl.step.bank`): it fills from verified rephrases, stays
bounded, shows its entries as worked examples, and is saved and restored on resume."""

from __future__ import annotations

import json

import pytest

from repo_rl.step.bank import BankEntry, RephraseBank
from repo_rl.config import load_config
from repo_rl.data import Example
from repo_rl.step.prompts import PromptRenderer
from repo_rl.trainer import Trainer

from .conftest import make_tokenizer, tiny_overrides


def entry(pid: str, step: int = 0, text: str = "t") -> BankEntry:
    return BankEntry(pid, f"question {pid}", f"solution {pid}", text, step)


def test_bank_fills_is_bounded_and_keeps_one_entry_per_prompt():
    bank = RephraseBank(3)
    for i, pid in enumerate(["a", "b", "a", "c", "d"]):
        bank.add(entry(pid, i, f"text {i}"))
    # "a" was replaced by its newer rephrase, then the oldest ("b") left past the bound
    assert [(e.prompt_id, e.text) for e in bank.entries] == [("a", "text 2"), ("c", "text 3"), ("d", "text 4")]
    off = RephraseBank(0)
    off.add(entry("a"))
    assert len(off) == 0


def test_pick_is_seeded_excludes_the_prompt_and_keeps_bank_order():
    bank = RephraseBank(10)
    for pid in "abcdef":
        bank.add(entry(pid))
    one = bank.pick(3, "c", seed=7)
    assert one == bank.pick(3, "c", seed=7) and len(one) == 3
    assert all(e.prompt_id != "c" for e in one)
    order = [e.prompt_id for e in bank.entries]
    assert [order.index(e.prompt_id) for e in one] == sorted(order.index(e.prompt_id) for e in one)
    assert {e.prompt_id for s in range(20) for e in bank.pick(2, None, s)} == set("abcdef")  # the draws vary
    assert bank.pick(9, "a", 0) == [e for e in bank.entries if e.prompt_id != "a"]  # fewer than asked
    assert bank.pick(0, None, 0) == [] and RephraseBank(4).pick(2, None, 0) == []


def test_state_round_trip_and_a_smaller_bound_keeps_the_newest():
    bank = RephraseBank(4)
    for i, pid in enumerate("abcd"):
        bank.add(entry(pid, i))
    state = json.loads(json.dumps(bank.state_dict()))  # as a checkpoint stores it
    again = RephraseBank(4)
    again.load_state_dict(state)
    assert again.entries == bank.entries
    small = RephraseBank(2)
    small.load_state_dict(state)
    assert [e.prompt_id for e in small.entries] == ["c", "d"]
    empty = RephraseBank(4)
    empty.load_state_dict(None)
    assert len(empty) == 0


def test_shots_are_earlier_turns_of_the_rephrase_prompt():
    tok = make_tokenizer()
    r = PromptRenderer(tok, "never")
    ex = Example("what is 2+3?", "5", "two plus three is 5", id="q0")
    shots = [BankEntry("q1", "what is 4+4?", "four plus four is 8", "4 and 4 make 8", 0)]
    t = "q:{question} k:{solution}"
    plain = tok.decode(r.rephrase_ids(ex, t, shots, chat=False))
    assert plain.index("q:what is 4+4? k:four plus four is 8") < plain.index("4 and 4 make 8") < plain.index("q:what is 2+3?")
    assert tok.decode(r.rephrase_ids(ex, t, (), chat=False)) == tok.decode(r.ids("q:what is 2+3? k:two plus three is 5"))
    msgs = PromptRenderer(tok, "never", system_prompt="be brief").rephrase_prompt(ex, t, shots)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[2]["content"] == "4 and 4 make 8" and msgs[3]["content"] == "q:what is 2+3? k:two plus three is 5"
    chat_ex = Example([{"role": "system", "content": "s"}, {"role": "user", "content": "what is 2+3?"}], "5", "k", id="c")
    msgs = r.rephrase_prompt(chat_ex, t, shots)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"] and msgs[-1]["content"] == "q:what is 2+3? k:k"


def _run(tmp_path, name, tiny_model_dir, tiny_data, resume=False, **extra):
    over = tiny_overrides(tiny_model_dir, tiny_data, **{
        "repo.verify": "[reward]", "repo.fewshot": 2, "repo.bank_size": 3, "train.max_steps": 4, "train.save_every": 2,
        "train.save_total_limit": "null", "repo.rephrase_batching": "separate", "repo.rho": 0.0, **extra})
    t = Trainer(load_config(None, over), tmp_path / name, resume=resume, progress=False)
    t.train()
    return t


def _metrics(path):
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_bank_fills_in_training_is_saved_and_restored_on_resume(tmp_path, tiny_model_dir, tiny_data):
    full = _run(tmp_path, "full", tiny_model_dir, tiny_data)
    assert 1 <= len(full.bank) <= 3  # filled from verified rephrases, never past repo.bank_size
    saved = json.loads((tmp_path / "full" / "checkpoints" / "step-4" / "trainer_state.json").read_text())["bank"]
    assert saved == full.bank.state_dict()
    assert all(e["text"] and e["prompt_id"].startswith("q") for e in saved["entries"])
    # stop after step 2, resume to step 4: the bank is restored, and the run is the uninterrupted one
    _run(tmp_path, "cut", tiny_model_dir, tiny_data, **{"train.max_steps": 2})
    at2 = json.loads((tmp_path / "cut" / "checkpoints" / "step-2" / "trainer_state.json").read_text())["bank"]
    resumed = Trainer(load_config(tmp_path / "cut" / "config.yaml", ["train.max_steps=4"]), tmp_path / "cut", resume=True,
                      progress=False)
    assert resumed.bank.state_dict() == at2
    resumed.train()
    assert resumed.bank.state_dict() == full.bank.state_dict()
    assert _metrics(tmp_path / "cut" / "metrics.jsonl") == _metrics(tmp_path / "full" / "metrics.jsonl")


def test_a_shot_that_does_not_fit_the_context_is_left_out(tmp_path, tiny_model_dir, tiny_data):
    t = _run(tmp_path, "r", tiny_model_dir, tiny_data, **{"train.max_steps": 1})
    t.bank.add(BankEntry("zz", "q " * 10, "k " * 10, "x" * 4000, 0))  # a rephrase longer than the tiny context
    rows, _ = t.stages.rephrase_rows(t.train_examples[:1], [0], [0], step=5)
    limit = t.stages.context_length - t.stages.rephrase_params().max_new_tokens
    assert all(len(r) <= limit for r in rows)


@pytest.mark.parametrize("fewshot", [0, 2])
def test_metrics_of_verification_and_the_injected_rows(tmp_path, tiny_model_dir, tiny_data, fewshot):
    t = _run(tmp_path, f"m{fewshot}", tiny_model_dir, tiny_data, **{"repo.fewshot": fewshot, "train.max_steps": 3})
    rows = _metrics(tmp_path / f"m{fewshot}" / "metrics.jsonl")
    for key in ("repo/rephrase_success_rate", "repo/rephrase_reward_rate", "repo/rephrase_fallback_rate", "repo/verify/strict",
                "repo/verify/steps", "repo/verify/reward", "repo/injected_logp_q"):
        assert key in rows[-1], key
    assert any(r["repo/replaced"] > 0 for r in rows)
    # repo.verify=[reward]: what is injected is what the reward verifies
    assert all(r["repo/rephrase_success_rate"] == r["repo/rephrase_reward_rate"] for r in rows)
    inj = [r["repo/injected_logp_q"] for r in rows if r["repo/replaced"] > 0]
    assert all(v < 0 for v in inj)
    assert t.bank.size == (3 if fewshot else 0)


def test_warmup_rows_are_seeded_and_go_round():
    from repo_rl.step.bank import warmup_rows

    assert warmup_rows([3, 5, 7], 7, seed=1) == warmup_rows([3, 5, 7], 7, seed=1)
    rows = warmup_rows([3, 5, 7], 7, seed=1)
    assert len(rows) == 7 and rows[:3] == rows[3:6] and sorted(rows[:3]) == [3, 5, 7]
    assert warmup_rows([], 5, 0) == [] and warmup_rows([1, 2], 0, 0) == []


def test_the_bank_is_seeded_before_the_first_step_and_not_again_on_resume(tmp_path, tiny_model_dir, tiny_data, capsys):
    over = tiny_overrides(tiny_model_dir, tiny_data, **{  # a reward every text passes: the warm-up's rephrases all verify
        "repo.verify": "[reward]", "repo.fewshot": 2, "repo.bank_size": 8, "repo.bank_warmup": 16, "train.max_steps": 1,
        "train.save_every": 1, "repo.rephrase_batching": "separate", "reward.funcs": "[tests.helpers.rewards:always_one]"})
    t = Trainer(load_config(None, over), tmp_path / "w", progress=False)
    t._warm_bank()
    assert len(t.bank) == 5 and all(e.step == -1 for e in t.bank.entries)  # one per row with a solution (5 of 6)
    assert "repo.bank_warmup: 16 zero-shot rephrases verified" in capsys.readouterr().err
    again = Trainer(load_config(None, over), tmp_path / "w2", progress=False)
    again._warm_bank()
    assert again.bank.state_dict() == t.bank.state_dict()  # the same rows and seeds: the same bank
    t.train()
    capsys.readouterr()
    resumed = Trainer(load_config(tmp_path / "w" / "config.yaml", ["train.max_steps=2"]), tmp_path / "w", resume=True, progress=False)
    kept = resumed.bank.state_dict()
    resumed._warm_bank()
    assert resumed.bank.state_dict() == kept and "repo.bank_warmup" not in capsys.readouterr().err  # not again after step 1
