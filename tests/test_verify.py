"""RePO's rephrase verification (``repo.verify``, :mod:`repo_rl.step.verify`): the strict final-answer
rule, the steps check, copy share, row and custom checks, the faithfulness judge against the
loopback stub, and the checks at start."""

from __future__ import annotations

import json

import pytest
import torch

from repo_rl.config import build_config, load_config
from repo_rl.data import Example
from repo_rl.errors import ConfigError, UserError
from repo_rl.step.verify import check_verify
from repo_rl.rewards.scorer import RewardScorer
from repo_rl.step.verify import (
    FAITHFUL_TEMPLATE,
    RephraseVerifier,
    boxed_only,
    check_label,
    copy_share,
    numbers_in,
    reference_steps,
    steps_share,
    working,
)

from .helpers.judge_server import JudgeServer

WEMBLE_1 = Example("In Quorvia, how many clots are in 1 wemble?", "6", "wemble:clot = 1:6 => 1*6 = 6. \\boxed{6}", id="w1")
WEMBLE_3 = Example("In Quorvia, how many clots are in 3 wembles?", "18", "wemble:clot = 1:6 => 3*6 = 18. \\boxed{18}", id="w3")
GROST_1 = Example("In Quorvia, how many lunes are in 1 grost?", "9", "grost:lune = 1:9 => 1*9 = 9. \\boxed{9}", id="g1")
CAR = Example("A Quorvian market sells 1 marrel. How many fenns is that?", "6", "marrel:fenn = 1:6 => 1*6 = 6. \\boxed{6}", id="m1")
ADD = Example("What is 8 + 1?", "9", "8 + 1 = 9. \\boxed{9}", id="a1")

# (example, rephrase, lax reward passes, strict passes, steps passes): texts like SmolLM2's
# rephrases on the domain world (docs/REAL_MODEL.md), judged as a careful reader judges them.
CASES = [
    # states the fact, derives the answer, boxes it: faithful
    (WEMBLE_3, "1 wemble is 6 clots, so 3 wembles are 3 * 6 = 18 clots. \\boxed{18}", True, True, True),
    (WEMBLE_1, "1 wemble = 6 clots, so 1 * 6 = 6. \\boxed{6}", True, True, True),
    # faithful working but no box: the lax reward takes its last number, the strict rule does not
    (WEMBLE_1, "1 wemble = 1:6 = 6, 1 * 6 = 6. Therefore, there are 6 clots in a wemble.", True, False, True),
    # the bare answer without the fact: right number, boxed, but no working at all
    (WEMBLE_3, "The answer is \\boxed{18}.", True, True, False),
    # incoherent text whose last number happens to be right (verified for 9 by the lax reward)
    (GROST_1, "1:9 = 9*9 = 81. So there is a Tribblonmax of 1:9.", True, False, False),  # 81 comes from nowhere
    (CAR, "be it is possible to meet 6 people all in one car", True, False, True),
    # gibberish whose last number is the answer, under the math reward
    (ADD, "k99999999999999999=9;9+9=k99999,", False, False, False),
    # a box with the wrong number, the right one copied into the text after it: the box wins
    (WEMBLE_3, "3 * 6 = \\boxed{17}. The reference says 18", False, False, False),
    # the right number boxed, then a wrong box last: the last box counts
    (WEMBLE_3, "3 * 6 = 18, \\boxed{18}, no wait \\boxed{20}", False, False, True),
    # a truncated box is no box
    (WEMBLE_3, "3 * 6 = 18 so \\boxed{18", True, False, True),
]


def make_verifier(checks=("strict",), **repo) -> RephraseVerifier:
    over = [f"repo.verify={json.dumps(list(checks))}", "reward.funcs=[numeric]", "algorithm.method=repo"]
    over += [f"repo.{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in repo.items()]
    cfg = build_config({}, over)
    return RephraseVerifier(cfg, RewardScorer(["numeric"], None, 5.0))


def test_working_numbers_and_reference_steps_by_hand():
    assert working("a 1:8 => 3*8 = 24. \\boxed{24}") == "a 1:8 => 3*8 = 24. "
    assert working("no box 5") == "no box 5"
    assert numbers_in("1:8 => 3*8 = 24.") == {1.0, 8.0, 3.0, 24.0}
    assert numbers_in("1,200 apples and 0.5 pears, x2") == {1200.0, 0.5, 2.0}
    assert reference_steps("plim:tazz = 1:8 => 3*8 = 24. \\boxed{24}") == {8.0, 3.0, 24.0}  # 0 and 1 aside
    assert steps_share("3 plims are 3 x 8 = 24 tazzes. \\boxed{24}", "plim:tazz = 1:8 => 3*8 = 24. \\boxed{24}") == 1.0
    # the boxed number does not count as working: 8 is missing, and 24 only sits in the box
    assert steps_share("3 of them. \\boxed{24}", "plim:tazz = 1:8 => 3*8 = 24. \\boxed{24}") == pytest.approx(1 / 3)
    assert steps_share("anything", "no numbers here") == 1.0


def test_boxed_only_and_copy_share_by_hand():
    assert boxed_only("so \\boxed{\\boxed{6}} ok") == "\\boxed{6}"
    assert boxed_only("no box") is None and boxed_only("\\boxed{6") is None
    ref = "a b c d e f g"  # 7 words: two 6-grams
    assert copy_share("x a b c d e f y", ref) == 0.5
    assert copy_share("a b c d e f g", ref) == 1.0
    assert copy_share("g f e d c b a", ref) == 0.0
    assert copy_share("so: 1:8 => 8", "1:8 => 8") == 1.0  # shorter than 6 words: the whole of it
    assert copy_share("text", "") == 0.0


@pytest.mark.parametrize("example,text,lax,strict,steps", CASES)
def test_each_check_on_hand_made_rephrases(example, text, lax, strict, steps):
    v = make_verifier(["strict", "steps"])(  # both checks of the faithful setting
        [example], [text]
    )
    assert bool(v.checks["reward"][0]) == lax
    assert bool(v.checks["strict"][0]) == strict
    assert bool(v.checks["steps"][0]) == steps
    assert bool(v.passed[0]) == (strict and steps)
    assert v.via(0) == ("-" if not lax else ("boxed" if strict else "fallback"))


def test_the_read_sample_under_each_verifier():
    """Of the texts above a careful reader accepts only the first two; the lax reward accepts seven,
    strict three, strict + steps exactly those two."""
    exs, texts = [c[0] for c in CASES], [c[1] for c in CASES]
    for checks, accepted in ((["reward"], 7), (["strict"], 3), (["strict", "steps"], 2)):
        v = make_verifier(checks)(exs, texts)
        assert int(v.passed.sum()) == accepted, (checks, v.passed.tolist())
    v = make_verifier(["strict", "steps"])(exs, texts)
    assert v.passed.tolist()[:2] == [True, True] and not any(v.passed.tolist()[2:])
    c = v.counters
    assert c["repo/reward_ok"] == 7 and c["repo/verify/strict"] == 3 and c["repo/fallback"] == 4
    assert set(make_verifier(["strict", "steps"]).zero_counters()) >= {k for k in c if k.startswith("repo/")}


def test_score_is_the_strict_reward_when_strict_is_configured():
    exs, texts = [WEMBLE_1, WEMBLE_1], ["the answer is 6", "1 * 6 = 6 \\boxed{6}"]
    strict = make_verifier(["strict"])(exs, texts)
    assert torch.isnan(strict.score[0]) and strict.score[1] == 1.0  # no box: no strict score at all
    lax = make_verifier(["reward"])(exs, texts)
    assert lax.score.tolist() == [1.0, 1.0] and lax.passed.tolist() == [True, True]


PLIM_1 = Example("In Quorvia, how many tazzes are in 1 plim?", "8", "plim:tazz = 1:8 => 1*8 = 8. \\boxed{8}", id="p1")
VORN_3 = Example("In Quorvia, how many skells are in 3 vorns?", "24", "vorn:skell = 1:8 => 3*8 = 24. \\boxed{24}", id="v3")


@pytest.mark.parametrize("example,text,ok", [
    # what SmolLM2 wrote once the bank held a garbled example: the fact, then numbers from nowhere
    (PLIM_1, "Plim:tazz = 1:8\n88 = 1:7\n\nSolved: 1:7 = 2:4. \\boxed{8}", False),
    (PLIM_1, "1:8 = 2*8 = 12. \\boxed{8}", False),
    (VORN_3, "Think of this: 3 vorns equals 3*8 = 24. \\boxed{24}", True),
    (VORN_3, "vorn:skell = 1:8, so 3 vorns are 3 x 8 = 24 skells. \\boxed{24}", True),
])
def test_steps_refuses_numbers_from_nowhere(example, text, ok):
    from repo_rl.step.verify import steps_precision

    v = make_verifier(["strict", "steps"])([example], [text])
    assert bool(v.checks["steps"][0]) == ok
    assert (steps_precision(text, example.solution, example.question_text) == 1.0) == ok
    assert bool(make_verifier(["strict", "steps"], steps_precision=0.3)([example], [text]).checks["steps"][0])  # lowered: all pass


def test_steps_min_lowers_the_bar():
    text = "3 wembles: \\boxed{18}"  # shows 3 of the reference's {6, 3, 18}; 18 only in the box
    assert not bool(make_verifier(["strict", "steps"])([WEMBLE_3], [text]).passed[0])
    assert bool(make_verifier(["strict", "steps"], steps_min=0.3)([WEMBLE_3], [text]).passed[0])


def test_row_check_from_the_rows_own_column():
    a = Example("q", "6", "1:6 \\boxed{6}", id="r1", extra={"verify": ["(?i)wemble", "6 clots"]})
    b = Example("q", "6", "1:6 \\boxed{6}", id="r2", extra={"verify": "fenn"})
    c = Example("q", "6", "1:6 \\boxed{6}", id="r3")  # no check of its own: passes it
    text = "1 Wemble is 6 clots. \\boxed{6}"
    v = make_verifier(["strict", "row"])([a, b, c], [text] * 3)
    assert v.checks["row"].tolist() == [True, False, True]
    assert v.passed.tolist() == [True, False, True]


def test_custom_check_with_trl_signature_sees_the_solution_column():
    v = make_verifier(["strict", "tests.helpers.rewards:mentions_solution_word"])
    out = v([WEMBLE_3, WEMBLE_3], ["wemble 3*6 \\boxed{18}", "3*6 \\boxed{18}"])
    assert check_label("tests.helpers.rewards:mentions_solution_word") == "mentions_solution_word"
    assert out.checks["mentions_solution_word"].tolist() == [True, False]
    assert out.passed.tolist() == [True, False]
    v.close()


def test_faithfulness_judge_against_the_loopback_stub(tmp_path):
    with JudgeServer(mode="faithful") as srv:
        v = make_verifier(["strict", "judge"], judge={"base_url": srv.url, "model": srv.model, "cache": str(tmp_path / "c.sqlite"),
                                                     "backoff": 0.01})
        texts = ["three plus two: \\boxed{5}", "I know it: \\boxed{5}", "three plus two is \\boxed{4}"]
        ex = Example("what is 2+3?", "5", "two plus three is 5", id="q0")
        out = v([ex] * 3, texts)
        assert out.checks["judge"].tolist() == [True, False, True]  # the stub judges the working, not the answer
        assert out.passed.tolist() == [True, False, False]
        bodies = sorted(r["body"]["messages"][-1]["content"] for r in srv.chat_requests())  # sent concurrently, any order
        # the faithfulness template, with the expert solution as the reference and the question
        assert bodies == sorted(FAITHFUL_TEMPLATE.format(question="what is 2+3?", reference="two plus three is 5", answer=t)
                                for t in texts)
        assert out.counters["repo/judge_requests"] == 3 and out.counters["repo/judge_errors"] == 0
        again = v([ex], texts[:1])  # cached verdict
        assert again.counters["repo/judge_cache_hits"] == 1 and again.counters["repo/judge_requests"] == 0


def test_faithfulness_judge_that_is_down_is_one_line_at_start():
    cfg = build_config({}, ["repo.verify=[strict,judge]", "repo.judge.base_url=http://127.0.0.1:9/v1", "repo.judge.model=m",
                            "reward.funcs=[numeric]"])
    with pytest.raises(UserError, match=r"^repo\.judge\.base_url=http://127\.0\.0\.1:9/v1: no server answers"):
        RephraseVerifier(cfg, RewardScorer(["numeric"], None, 5.0))


@pytest.mark.parametrize("over,needle", [
    (["repo.verify=[]"], "repo.verify: expected at least one check"),
    (["repo.verify=[stirct]"], "did you mean 'strict'"),
    (["repo.verify=[steps]"], "reward or strict among the checks"),
    (["repo.verify=[strict,strict]"], "each check once"),
    (["repo.verify=[strict,a.b:check,c.d:check]"], "checks with different names"),
    (["repo.verify=[strict,steps,mymod:steps]"], "checks with different names"),
    (["repo.verify=[strict,judge]"], "repo.judge.model"),
    (["repo.steps_min=0"], "repo.steps_min"),
    (["repo.steps_precision=1.5"], "repo.steps_precision"),
    (["repo.fewshot=3", "repo.bank_size=2"], "repo.bank_size"),
    (["repo.uptake_after=-1"], "repo.uptake_after"),
])
def test_bad_verify_settings_are_one_line(over, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(None, over)


def _said():
    lines: list[str] = []
    return lines, lines.append


def test_strict_rule_on_data_without_any_box_is_one_line_at_start():
    rows = [Example("what is 2+3?", "5", "two plus three is 5", id="q0"), Example("what is 4+4?", "8", "four and four: 8", id="q1")]
    scorer = RewardScorer(["numeric"], None, 5.0)
    no_box = build_config({}, ["repo.rephrase_template='{question} {solution} answer:'"])
    with pytest.raises(UserError, match=r"none of the 2 expert solutions has a \\boxed\{\} answer.*could ever verify"):
        check_verify(no_box, rows, scorer)
    check_verify(build_config({}, []), rows, scorer)  # the default template asks for a box: the rephrase can box it
    check_verify(build_config({}, ["repo.verify=[reward]", "repo.rephrase_template='{question} {solution}'"]), rows, scorer)


def test_strict_rule_that_no_reference_passes_is_one_line_at_start():
    rows = [WEMBLE_1, WEMBLE_3]
    # a reward that needs the whole text: the reference's boxed answer alone never passes it
    scorer = RewardScorer(["tests.helpers.rewards:needs_working"], None, 5.0)
    with pytest.raises(UserError, match=r"none of 2 expert solutions passes the strict rule"):
        check_verify(build_config({}, []), rows, scorer)
    check_verify(build_config({}, []), rows, RewardScorer(["numeric"], None, 5.0))


def test_row_check_with_a_bad_pattern_or_no_column_at_start():
    lines, say = _said()
    bad = [Example("q", "1", "s \\boxed{1}", id="bad-row", extra={"verify": "(unclosed"})]
    with pytest.raises(UserError, match=r"^bad-row: column 'verify' holds an invalid regular expression"):
        check_verify(build_config({}, ["repo.verify=[reward,row]"]), bad, RewardScorer(["numeric"], None, 5.0), say)
    check_verify(build_config({}, ["repo.verify=[reward,row]"]), [WEMBLE_1], RewardScorer(["numeric"], None, 5.0), say)
    assert len(lines) == 1 and "passes every rephrase" in lines[0]


@pytest.mark.parametrize("text,want", [
    ("1:4 = 3*4 = 12\n\nThe correct answer is \\boxed{12}. I forgot to adjust it in my final solution.",
     "1:4 = 3*4 = 12\n\nThe correct answer is \\boxed{12}."),
    ("so $\\boxed{4}$. Rewrite: more text", "so $\\boxed{4}$."),
    ("\\boxed{7} = 7\n\nThe correct answer is \\boxed{7}. In reality", "\\boxed{7} = 7\n\nThe correct answer is \\boxed{7}."),
    ("\\boxed{7} then \\boxed{8", "\\boxed{7}"),  # a truncated box is no box: the last complete one ends it
    ("no box, answer 5. more", "no box, answer 5. more"),
    ("\\[\\boxed{x^{2}}\\]\nand so on", "\\[\\boxed{x^{2}}\\]"),
])
def test_a_rephrase_ends_at_its_last_boxed_answer(text, want):
    from repo_rl.rewards.extract import end_at_answer

    assert end_at_answer(text) == want


def test_clean_rephrase_cuts_after_the_answer_and_appends_eos():
    from repo_rl.step.prompts import clean_rephrase

    from .conftest import make_tokenizer

    tok = make_tokenizer()
    raw = tok("so \\boxed{5}. and then more words", add_special_tokens=False)["input_ids"]
    ids, text, changed, cut = clean_rephrase(raw, tok, [], 200, tok.eos_token_id, answer_ends=True)
    assert text == "so \\boxed{5}." and changed and not cut
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[:-1]) == text
    same, text2, changed2, _ = clean_rephrase(raw, tok, [], 200, tok.eos_token_id)  # off: the text as sampled
    assert same == raw and not changed2


def test_a_bank_behind_an_answer_check_alone_is_a_notice():
    lines, say = _said()
    scorer = RewardScorer(["numeric"], None, 5.0)
    check_verify(build_config({}, ["repo.fewshot=2"]), [WEMBLE_1, WEMBLE_3], scorer, say)
    assert len(lines) == 1 and "repo.fewshot=2 with repo.verify=['strict']" in lines[0] and "steps or judge" in lines[0]
    lines.clear()
    check_verify(build_config({}, ["repo.fewshot=2", "repo.verify=[strict,steps]"]), [WEMBLE_1, WEMBLE_3], scorer, say)
    assert lines == []
