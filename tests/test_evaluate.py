"""Tests of repo_rl.evaluation (through the repo_rl.evaluation compatibility names): metrics, benchmark
layouts, prompt formatting, the eval command."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from repo_rl import evaluation as ev
from repo_rl.errors import UserError
from repo_rl.rewards import Outcome

from .conftest import make_tokenizer

DATA = Path(__file__).parent / "data" / "eval"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="repo-rl")
    sub = p.add_subparsers(dest="command")
    ev.add_eval_parser(sub)
    return p.parse_args(["eval", *argv])


def comb_pass_at_k(n: int, c: int, k: int) -> float:
    """Reference: the textbook formula with exact binomials."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# ======================================================================================
# Metrics
# ======================================================================================


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (4, 1, 1, 0.25),  # c/n
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (4, 2, 2, 5 / 6),  # 1 - C(2,2)/C(4,2) = 1 - 1/6
        (4, 0, 4, 0.0),
        (4, 1, 4, 1.0),  # n - c < k
        (5, 3, 3, 1.0),  # n - c = 2 < 3
        (10, 3, 5, 11 / 12),  # 1 - C(7,5)/C(10,5) = 1 - 21/252
        (8, 2, 3, 9 / 14),  # 1 - C(6,3)/C(8,3) = 1 - 20/56
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert ev.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    # 1 - C(999, 500) / C(1000, 500) = 1 - 500/1000; the binomials themselves overflow a float.
    assert ev.pass_at_k(1000, 1, 500) == pytest.approx(0.5, abs=1e-12)
    assert ev.pass_at_k(5000, 2500, 64) == pytest.approx(1.0, abs=1e-12)
    for n, c, k in [(50, 7, 10), (200, 13, 16), (64, 1, 64), (64, 63, 1)]:
        assert ev.pass_at_k(n, c, k) == pytest.approx(comb_pass_at_k(n, c, k), abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        ev.pass_at_k(n, c, k)


def test_avg_at_k_counts_none_and_nan_as_wrong():
    assert ev.avg_at_k([1.0, 0.0, 1.0, None]) == 0.5
    assert ev.avg_at_k([1.0, float("nan")]) == 0.5
    assert ev.avg_at_k([0.0, 0.0]) == 0.0
    with pytest.raises(ValueError):
        ev.avg_at_k([])


def test_default_ks():
    assert ev.default_ks(1) == [1]
    assert ev.default_ks(4) == [1, 2, 4]
    assert ev.default_ks(6) == [1, 2, 4, 6]
    assert ev.default_ks(16) == [1, 2, 4, 8, 16]


def test_aggregate_hand_computed():
    # Three items, n = 4: c = 1, 0, 3.
    scores = [[1.0, 0.0, 0.0, 0.0], [0.0, None, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]]
    out = ev.aggregate(scores)
    assert out["items"] == 3 and out["n"] == 4 and out["k"] == 4
    # pass@1 = avg@4 = (1/4 + 0 + 3/4) / 3 = 1/3
    assert out["pass@1"] == pytest.approx(1 / 3)
    assert out["avg@k"] == pytest.approx(1 / 3)
    # pass@2: (1 - C(3,2)/C(4,2)) = 1/2; 0; (1 - C(1,2)/C(4,2)) = 1  -> 1.5 / 3
    assert out["pass_at"]["2"] == pytest.approx(0.5)
    # pass@4: 1, 0, 1 -> 2/3
    assert out["pass@k"] == pytest.approx(2 / 3)
    assert out["pass_at"]["4"] == out["pass@k"]
    assert out["correct_samples"] == 4 and out["solved_items"] == 2


def test_aggregate_rejects_ragged_or_empty():
    with pytest.raises(ValueError):
        ev.aggregate([])
    with pytest.raises(ValueError):
        ev.aggregate([[1.0, 0.0], [1.0]])


def test_summarize_counts_verifier_errors_and_timeouts():
    class FakeReward:
        def outcomes(self, completions, answer):
            table = {"good": Outcome("ok", 1.0), "bad": Outcome("ok", 0.0), "err": Outcome("error", None, "boom"), "slow": Outcome("timeout", None, "late")}
            return [table[c] for c in completions]

    items = [ev.EvalItem(0, "a", "q", "1", "math"), ev.EvalItem(1, "b", "q", "B", "choice")]
    texts = [["good", "err", "slow"], ["bad", "good", "err"]]
    outcomes = ev.score(items, texts, {"math": FakeReward(), "choice": FakeReward()})
    samples = [[([5, 1], 7)] * 3, [([5, 6, 7], 8)] * 3]
    recs = [ev.item_record(it, s, t, o, eos={1}, max_new_tokens=3) for it, s, t, o in zip(items, samples, texts, outcomes)]
    assert [c["status"] for c in recs[0]["completions"]] == ["ok", "error", "timeout"]
    assert recs[0]["completions"][1]["error"] == "boom" and recs[0]["completions"][1]["score"] is None
    assert recs[0]["completions"][0]["truncated"] is False  # ended with eos
    assert recs[1]["completions"][0]["truncated"] is True  # 3 tokens, no eos
    out = ev.summarize(recs)
    assert out["verifier_errors"] == 2 and out["verifier_timeouts"] == 1
    assert out["pass@1"] == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert out["pass@k"] == 1.0
    assert out["mean_completion_tokens"] == pytest.approx(2.5)


# ======================================================================================
# Layouts
# ======================================================================================

INSTR = ev.MATH_INSTRUCTION


@pytest.mark.parametrize(
    "fname,layout,prompt_key,answer_key,golds,first_id",
    [
        ("aime24.jsonl", "math", "problem", "answer", ["168", "24", "1"], "60"),
        ("math500.jsonl", "math", "problem", "answer", ["\\frac{3}{4}", "3", "\\left( 2, \\frac{\\pi}{2} \\right)"], "test/prealgebra/1.json"),
        ("minerva.jsonl", "math", "question", "answer", ["20", "2"], None),
        ("amc23.jsonl", "math", "question", "answer", ["2.0", "27.0"], "0"),
        ("olympiadbench.jsonl", "math", "question", "final_answer", ["$8$", "2, 3"], "1606"),
        ("prompt_answer.json", "math", "prompt", "answer", ["\\boxed{121}", "\\frac{3}{4}", "6"], None),
        ("math_train.jsonl", "math-boxed-solution", "problem", "solution", ["7", "10"], None),
    ],
)
def test_math_layouts(fname, layout, prompt_key, answer_key, golds, first_id):
    b = ev.load_benchmark(str(DATA / fname))
    assert b.layout.name == layout
    assert (b.layout.prompt, b.layout.answer) == (prompt_key, answer_key)
    assert b.kind == "math"
    assert [it.gold for it in b.items] == golds
    assert [it.index for it in b.items] == list(range(len(golds)))
    if first_id is not None:
        assert b.items[0].id == first_id
    else:
        assert b.items[0].id.startswith(str(DATA / fname))  # file:row when the row has no id
    rows = ev.read_rows(str(DATA / fname))
    first_prompt = rows[0][1][prompt_key]
    assert b.items[0].prompt == f"{first_prompt}\n\n{INSTR}"


def test_math_instruction_not_added_twice_and_configurable():
    b = ev.load_benchmark(str(DATA / "prompt_answer.json"))
    assert b.items[2].prompt == "How many sides does a hexagon have? Put the answer in \\boxed{}."
    b = ev.load_benchmark(str(DATA / "prompt_answer.json"), math_instruction="Box it.")
    assert b.items[0].prompt.endswith("\n\nBox it.")
    b = ev.load_benchmark(str(DATA / "prompt_answer.json"), math_instruction=None)
    assert b.items[0].prompt == "Compute $11 \\cdot 11$."


def test_limit_keeps_first_rows():
    b = ev.load_benchmark(str(DATA / "aime24.jsonl"), limit=2)
    assert [it.id for it in b.items] == ["60", "61"]


def _option_lines(prompt: str) -> dict[str, str]:
    return {line[0]: line[3:] for line in prompt.splitlines() if len(line) > 3 and line[1:3] == ". " and line[0] in ev.LETTERS}


def test_gpqa_layout_shuffles_deterministically_and_records_gold_letter():
    src = str(DATA / "gpqa_diamond.csv")
    b = ev.load_benchmark(src, seed=0)
    assert b.layout.name == "gpqa" and b.kind == "choice"
    assert [it.id for it in b.items] == ["recA1", "recB2", "recC3"]
    assert [it.domain for it in b.items] == ["Physics", "Chemistry", "Biology"]
    correct = ["Electron", "Nitrogen", "Thymine"]
    for it, right in zip(b.items, correct):
        opts = _option_lines(it.prompt)
        assert list(opts) == ["A", "B", "C", "D"]
        assert opts[it.gold] == right == it.gold_text  # the gold letter points at the correct answer
        assert it.options == list(opts.values())
        assert it.prompt.endswith(ev.CHOICE_INSTRUCTION)
        assert it.prompt.startswith(("Which", "What"))
    assert "Argon" in b.items[1].options  # whitespace around an option is stripped
    # Same seed, same order; some other seed gives another order.
    again = ev.load_benchmark(src, seed=0)
    assert [it.options for it in again.items] == [it.options for it in b.items]
    orders = {tuple(tuple(it.options) for it in ev.load_benchmark(src, seed=s).items) for s in range(6)}
    assert len(orders) > 1
    # The shuffle of a row does not depend on --limit.
    assert ev.load_benchmark(src, seed=0, limit=1).items[0].options == b.items[0].options


def test_mmlu_pro_layout():
    b = ev.load_benchmark(str(DATA / "mmlu_pro.jsonl"))
    assert b.layout.name == "mmlu-pro" and b.kind == "choice"
    assert [it.gold for it in b.items] == ["C", "B"]
    assert [it.gold_text for it in b.items] == ["42", "Mercury"]
    assert [it.id for it in b.items] == ["70", "71"]
    assert [it.domain for it in b.items] == ["math", "physics"]
    assert list(_option_lines(b.items[0].prompt)) == list("ABCDEFGHIJ")
    assert list(_option_lines(b.items[1].prompt)) == list("ABCD")


def test_mmlu_pro_disagreeing_answer_fields(tmp_path):
    p = tmp_path / "mmlu.jsonl"
    p.write_text(json.dumps({"question": "q?", "options": ["a", "b", "c"], "answer": "A", "answer_index": 2}) + "\n")
    with pytest.raises(UserError, match="disagree"):
        ev.load_benchmark(str(p))


def test_arc_layout_maps_numeric_labels_to_letters():
    b = ev.load_benchmark(str(DATA / "arc_challenge.jsonl"))
    assert b.layout.name == "arc" and b.kind == "choice"
    assert [it.gold for it in b.items] == ["B", "C"]
    assert [it.gold_text for it in b.items] == ["elastic potential", "balance"]
    assert _option_lines(b.items[1].prompt) == {"A": "ruler", "B": "thermometer", "C": "balance", "D": "graduated cylinder"}


def test_arc_original_layout(tmp_path):
    p = tmp_path / "arc.jsonl"
    row = {"id": "x1", "question": {"stem": "Which is a mammal?", "choices": [{"text": "shark", "label": "A"}, {"text": "whale", "label": "B"}]}, "answerKey": "B"}
    p.write_text(json.dumps(row) + "\n")
    b = ev.load_benchmark(str(p))
    assert b.layout.name == "arc-original"
    assert b.items[0].gold == "B" and b.items[0].gold_text == "whale"
    assert b.items[0].prompt.startswith("Which is a mammal?\n\nA. shark\nB. whale")


def test_verl_luffy_parquet_layout():
    b = ev.load_benchmark(str(DATA / "verl_luffy.parquet"))
    assert b.layout.name == "verl"
    assert b.layout.answer == "reward_model.ground_truth"
    assert [it.id for it in b.items] == ["0", "1", "2"]
    assert [it.domain for it in b.items] == ["math", "aime", "gpqa"]
    assert [it.kind for it in b.items] == ["math", "math", "choice"]  # per row, from data_source
    assert [it.gold for it in b.items] == ["5", "20", "B"]
    assert b.kind == "mixed"
    first = b.items[0].prompt
    assert isinstance(first, list) and first[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert first[1]["content"].endswith("within \\boxed{}.")  # already asks for \boxed: unchanged
    assert INSTR not in first[1]["content"]
    assert b.items[1].prompt == [{"role": "user", "content": f"Compute $4\\cdot 5$.\n\n{INSTR}"}]


def test_verl_layout_agrees_with_training_loader():
    """repo_rl.data.load_examples reads the same file to the same prompts and answers."""
    from repo_rl.config import FieldsConfig
    from repo_rl.data import load_examples

    exs = load_examples(str(DATA / "verl_luffy.parquet"), FieldsConfig())
    b = ev.load_benchmark(str(DATA / "verl_luffy.parquet"), math_instruction=None, choice_instruction=None)
    assert [e.answer for e in exs] == [it.gold for it in b.items]
    assert [e.prompt for e in exs] == [it.prompt for it in b.items]
    assert [e.id for e in exs] == [it.id for it in b.items]


def test_kind_choice_on_plain_layout(tmp_path):
    p = tmp_path / "mc.jsonl"
    p.write_text(json.dumps({"prompt": "Pick one.\nA. x\nB. y", "answer": "(B)"}) + "\n")
    b = ev.load_benchmark(str(p), kind="choice")
    assert b.kind == "choice" and b.items[0].gold == "B"
    assert b.items[0].prompt.endswith(ev.CHOICE_INSTRUCTION)
    with pytest.raises(UserError, match="not an option letter"):
        ev.load_benchmark(str(DATA / "aime24.jsonl"), kind="choice")


def test_kind_math_on_choice_layout_is_an_error():
    with pytest.raises(UserError, match="--kind math"):
        ev.load_benchmark(str(DATA / "mmlu_pro.jsonl"), kind="math")


def test_unknown_layout_names_fields_and_flag():
    with pytest.raises(UserError) as ei:
        ev.load_benchmark(str(DATA / "unknown_layout.jsonl"))
    msg = str(ei.value)
    assert "\n" not in msg
    assert "unknown layout" in msg and "fields found: label, text" in msg and "--field prompt=" in msg


def test_field_mapping():
    fields = ev.parse_field_args(["prompt=text", "answer=label"])
    assert fields == {"prompt": "text", "answer": "label"}
    b = ev.load_benchmark(str(DATA / "unknown_layout.jsonl"), fields=fields)
    assert b.layout.name == "fields" and b.kind == "math"
    assert [it.gold for it in b.items] == ["2", "4"]
    assert b.items[0].prompt == f"What is 1+1?\n\n{INSTR}"
    # Only one key mapped: the other is detected. Nested paths work.
    b = ev.load_benchmark(str(DATA / "verl_luffy.parquet"), fields={"answer": "reward_model.ground_truth"})
    assert [it.gold for it in b.items] == ["5", "20", "B"]


def test_field_mapping_with_options(tmp_path):
    p = tmp_path / "custom_mc.jsonl"
    rows = [
        {"q": "Capital of France?", "opts": ["Rome", "Paris"], "right": "Paris"},
        {"q": "2+2?", "opts": ["3", "4", "5"], "right": 1},
        {"q": "Color of grass?", "opts": ["green", "blue"], "right": "A"},
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    b = ev.load_benchmark(str(p), fields=ev.parse_field_args(["prompt=q", "answer=right", "options=opts"]))
    assert b.kind == "choice"
    assert [it.gold for it in b.items] == ["B", "B", "A"]
    bad = tmp_path / "bad_mc.jsonl"
    bad.write_text(json.dumps({"q": "x?", "opts": ["a", "b"], "right": "zzz"}) + "\n")
    with pytest.raises(UserError, match=r"bad_mc.jsonl:1: field 'right'"):
        ev.load_benchmark(str(bad), fields={"prompt": "q", "answer": "right", "options": "opts"})


@pytest.mark.parametrize(
    "spec,match",
    [(["prompt"], "KEY=COLUMN"), (["=x"], "KEY=COLUMN"), (["question=q"], "unknown key 'question'")],
)
def test_bad_field_flags(spec, match):
    with pytest.raises(UserError, match=match):
        ev.parse_field_args(spec)


def test_field_naming_a_missing_column():
    with pytest.raises(UserError, match="--field answer=gold names a column"):
        ev.load_benchmark(str(DATA / "unknown_layout.jsonl"), fields={"prompt": "text", "answer": "gold"})


def test_bad_row_names_file_and_row(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text(json.dumps({"problem": "ok?", "answer": "1"}) + "\n" + json.dumps({"problem": "", "answer": "2"}) + "\n")
    with pytest.raises(UserError, match=r"b.jsonl:2: field 'problem' is empty"):
        ev.load_benchmark(str(p))
    p.write_text(json.dumps({"problem": "ok?", "answer": "1"}) + "\n{not json\n")
    with pytest.raises(UserError, match=r"b.jsonl:2: invalid JSON"):
        ev.load_benchmark(str(p))


def test_datasets_names(monkeypatch):
    """A hub name goes to datasets.load_dataset (NAME:CONFIG picks a config); offline it fails in one line."""
    import datasets

    calls = []
    rows = [{"Question": "Which is heavier?", "Correct Answer": "iron", "Incorrect Answer 1": "air", "Incorrect Answer 2": "foam", "Incorrect Answer 3": "paper"}]

    def fake_load(*a, **kw):
        calls.append((a, kw))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    b = ev.load_benchmark("org/gpqa:gpqa_diamond", split="train")
    assert calls == [(("org/gpqa", "gpqa_diamond"), {"split": "train"})]
    assert b.name == "org_gpqa_gpqa_diamond" and b.layout.name == "gpqa" and b.items[0].gold_text == "iron"
    calls.clear()
    b = ev.load_benchmark("org/gpqa")
    assert calls == [(("org/gpqa",), {"split": "test"})]
    monkeypatch.undo()
    with pytest.raises(UserError, match="not a readable file or datasets name"):
        ev.load_benchmark("someone/surely-not-a-dataset")


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.csv", "missing.parquet"])
def test_missing_file(tmp_path, name):
    with pytest.raises(UserError, match="file not found"):
        ev.load_benchmark(str(tmp_path / name))


# ======================================================================================
# Prompt rendering and generation
# ======================================================================================


class RecordingGenerator:
    """Returns a fixed completion and records what it was asked."""

    def __init__(self, completion: list[int]):
        self.completion = completion
        self.calls: list[tuple[list[list[int]], list[int]]] = []

    def generate(self, prompts, params, seeds):
        self.calls.append(([list(p) for p in prompts], list(seeds)))
        return [list(self.completion) for _ in prompts]


def test_generate_batches_seeds_and_chat_template():
    from repo_rl.step.prompts import PromptRenderer
    from repo_rl.engines import SamplingParams

    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    renderer = PromptRenderer(tok, "auto", system_prompt="be brief")
    items = [ev.EvalItem(i, str(i), f"what is {i}+{i}?", str(2 * i), "math") for i in range(3)]
    gen = RecordingGenerator([1])
    out = ev.generate(items, 2, gen, renderer, SamplingParams(4), seed=7, batch_size=4, progress=False)
    assert [len(c[0]) for c in gen.calls] == [4, 2]  # 6 rows in batches of 4
    texts = [tok.decode(p) for call in gen.calls for p in call[0]]
    assert "system: be brief\nuser: what is 0+0?\nassistant:" in texts
    seeds = [sd for row in out for _, sd in row]
    assert len(set(seeds)) == 6
    assert out[1][0][1] == ev.sample_seed(7, 1, 0)
    # No chat template: the raw text.
    tok.chat_template = None
    gen = RecordingGenerator([1])
    ev.generate(items[:1], 1, gen, PromptRenderer(tok), SamplingParams(4), seed=7, batch_size=4, progress=False)
    assert tok.decode(gen.calls[0][0][0]) == "what is 0+0?"


def test_samples_do_not_depend_on_batch_size(tiny_model_dir):
    from repo_rl.config import ModelConfig
    from repo_rl.models.loading import eos_token_ids, load_model_and_tokenizer
    from repo_rl.step.prompts import PromptRenderer
    from repo_rl.engines import HFGenerator, SamplingParams

    model, tok, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    gen = HFGenerator(model, eos_token_ids(model, tok), tok.pad_token_id)
    items = ev.load_benchmark(str(DATA / "minerva.jsonl")).items
    params = SamplingParams(6, temperature=1.0)
    a = ev.generate(items, 3, gen, PromptRenderer(tok), params, seed=1, batch_size=2, progress=False)
    b = ev.generate(items, 3, gen, PromptRenderer(tok), params, seed=1, batch_size=6, progress=False)
    c = ev.generate(items, 3, gen, PromptRenderer(tok), params, seed=2, batch_size=6, progress=False)
    assert a == b
    assert a != c


# ======================================================================================
# The eval command
# ======================================================================================


def check_report_against_jsonl(report: dict, n: int) -> None:
    """Every number of each benchmark equals what the per-item JSONL gives, recomputed here."""
    for name, r in report["benchmarks"].items():
        recs = [json.loads(line) for line in Path(r["completions_file"]).read_text().splitlines()]
        assert len(recs) == r["items"]
        counts = []
        for rec in recs:
            assert set(rec) >= {"index", "id", "kind", "prompt", "gold", "n", "num_correct", "avg", "completions"}
            assert rec["n"] == n == len(rec["completions"])
            for c in rec["completions"]:
                assert set(c) >= {"text", "score", "correct", "status", "tokens", "truncated", "seed"}
                assert c["correct"] == (c["score"] == 1.0)
            c = sum(x["correct"] for x in rec["completions"])
            assert rec["num_correct"] == c
            counts.append(c)
        m = len(recs)
        assert r["n"] == r["k"] == n
        assert r["pass@1"] == pytest.approx(sum(c / n for c in counts) / m)
        assert r["avg@k"] == pytest.approx(sum(c / n for c in counts) / m)
        assert r["pass@k"] == pytest.approx(sum(comb_pass_at_k(n, c, n) for c in counts) / m)
        for k, v in r["pass_at"].items():
            assert v == pytest.approx(sum(comb_pass_at_k(n, c, int(k)) for c in counts) / m)
        comps = [c for rec in recs for c in rec["completions"]]
        assert r["verifier_errors"] == sum(c["status"] == "error" for c in comps)
        assert r["verifier_timeouts"] == sum(c["status"] == "timeout" for c in comps)
        assert r["wall_time_s"] >= r["generation_time_s"] >= 0
        assert r["correct_samples"] == sum(counts)


def test_eval_command_end_to_end_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "res" / "results.json"
    args = parse([
        "--model", str(tiny_model_dir),
        "--data", str(DATA / "aime24.jsonl"),
        "--data", str(DATA / "mmlu_pro.jsonl"),
        "--data", str(DATA / "verl_luffy.parquet"),
        "--n", "2", "--max-new-tokens", "6", "--limit", "3", "--batch-size", "3",
        "--output", str(out), "--threads", "1", "--no-progress",
    ])
    assert args.func is ev.run_eval_command
    assert ev.run_eval_command(args) == 0
    report = json.loads(out.read_text())
    assert list(report["benchmarks"]) == ["aime24", "mmlu_pro", "verl_luffy"]
    assert report["settings"]["n"] == 2 and report["settings"]["max_new_tokens"] == 6
    assert report["model_path"] == str(tiny_model_dir)
    for name, r in report["benchmarks"].items():
        for key in ("pass@1", "avg@k", "pass@k", "items", "verifier_errors", "verifier_timeouts", "completions_file", "wall_time_s"):
            assert key in r, (name, key)
        assert r["items"] == {"aime24": 3, "mmlu_pro": 2, "verl_luffy": 3}[name]
        assert Path(r["completions_file"]) == (tmp_path / "res" / f"results.{name}.jsonl").resolve()
        assert 0 < r["mean_completion_tokens"] <= 6
    assert report["benchmarks"]["verl_luffy"]["kind"] == "mixed"
    assert set(report["average"]) == {"pass@1", "avg@k", "pass@k"}
    check_report_against_jsonl(report, 2)
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[0].split() == ["benchmark", "kind", "items", "n", "pass@1", "avg@2", "pass@2", "errors", "timeouts", "time"]
    assert "aime24" in stdout and "average" in stdout


class ScriptedGenerator:
    """An engine (registered as ``scripted``) standing in for HFGenerator: answers by a tag in the prompt.

    ``always`` items get the right answer, ``never`` a wrong one, ``half`` the right one when
    the sample seed is even. Multiple-choice items (their question says "pick") get a letter.
    """

    right = {"always": ("\\boxed{5}", "\\boxed{b}"), "half": ("\\boxed{7}", "\\boxed{c}"), "never": ("\\boxed{2}", "\\boxed{a}")}
    wrong = ("\\boxed{0}", "\\boxed{d}")

    def __init__(self, model, eos_token_ids, pad_token_id, batch_size=None, autocast_dtype=None):
        self.tok = make_tokenizer()
        self.eos = list(eos_token_ids)

    def generate(self, prompts, params, seeds, logprobs=False):
        out = []
        for ids, sd in zip(prompts, seeds):
            text = self.tok.decode(ids, skip_special_tokens=True)
            tag = next(t for t in self.right if text.startswith(t))
            mc = "pick" in text
            good = tag == "always" or (tag == "half" and sd % 2 == 0)
            ans = (self.right[tag] if good else self.wrong)[1 if mc else 0]
            out.append(self.tok(f"so {ans}", add_special_tokens=False)["input_ids"] + self.eos)
        return out


def test_eval_command_scripted_answers(tiny_model_dir, tmp_path, monkeypatch):
    import repo_rl.engines.hf

    monkeypatch.setitem(repo_rl.engines.GENERATORS, "scripted", ScriptedGenerator)
    math_rows = [
        {"problem": "always: what is 2+3?", "answer": "5"},
        {"problem": "never: what is 1+1?", "answer": "2"},
        {"problem": "half: what is 3+4?", "answer": "7"},
    ]
    mc_rows = [
        {"question": "always: pick b", "options": ["x", "y", "z", "w"], "answer": "B"},
        {"question": "half: pick c", "options": ["x", "y", "z", "w"], "answer": "C"},
    ]
    (tmp_path / "toy_math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in math_rows))
    (tmp_path / "toy_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc_rows))
    out = tmp_path / "r.json"
    n = 4
    args = parse(["--model", str(tiny_model_dir), "--data", str(tmp_path / "toy_math.jsonl"), "--data", str(tmp_path / "toy_mc.jsonl"),
                  "--n", str(n), "--output", str(out), "--no-progress", "--backend", "scripted"])
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["backend"] == "scripted"
    check_report_against_jsonl(report, n)
    for name in ("toy_math", "toy_mc"):
        r = report["benchmarks"][name]
        recs = {rec["prompt"].split(":")[0]: rec for rec in map(json.loads, Path(r["completions_file"]).read_text().splitlines())}
        assert recs["always"]["num_correct"] == n
        half = recs["half"]
        assert [c["correct"] for c in half["completions"]] == [c["seed"] % 2 == 0 for c in half["completions"]]
        c_half = half["num_correct"]
        c_never = recs["never"]["num_correct"] if "never" in recs else None
        if c_never is not None:
            assert c_never == 0
            m = 3
            expected_p1 = (1 + 0 + c_half / n) / m
            expected_pk = (1 + 0 + (c_half > 0)) / m
        else:
            m = 2
            expected_p1 = (1 + c_half / n) / m
            expected_pk = (1 + (c_half > 0)) / m
        assert r["pass@1"] == pytest.approx(expected_p1)
        assert r["pass@k"] == pytest.approx(expected_pk)
        assert r["pass_at"]["2"] == pytest.approx((1 + comb_pass_at_k(n, c_half, 2)) / m)
        assert r["verifier_errors"] == 0 and r["verifier_timeouts"] == 0
    mc = [json.loads(x) for x in Path(report["benchmarks"]["toy_mc"]["completions_file"]).read_text().splitlines()]
    assert [rec["gold"] for rec in mc] == ["B", "C"] and mc[0]["options"] == ["x", "y", "z", "w"]
    assert report["benchmarks"]["toy_mc"]["kind"] == "choice"


def test_eval_command_missing_data_file(tmp_path, tiny_model_dir):
    args = parse(["--model", str(tiny_model_dir), "--data", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "r.json")])
    with pytest.raises(UserError, match="nope.jsonl: file not found") as ei:
        ev.run_eval_command(args)
    assert "\n" not in str(ei.value)
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("model", ["does/not/exist/here", "./no-such-model-dir"])
def test_eval_command_bad_model_path(tmp_path, model):
    args = parse(["--model", model, "--data", str(DATA / "aime24.jsonl"), "--output", str(tmp_path / "r.json")])
    with pytest.raises(UserError) as ei:
        ev.run_eval_command(args)
    msg = str(ei.value)
    assert msg.startswith(f"--model {model}") and "\n" not in msg


def test_eval_command_model_dir_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    args = parse(["--model", str(tmp_path / "m"), "--data", str(DATA / "aime24.jsonl"), "--output", str(tmp_path / "r.json")])
    with pytest.raises(UserError, match="no config.json"):
        ev.run_eval_command(args)


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--n", "0"], "--n 0"),
        (["--top-p", "0"], "--top-p"),
        (["--batch-size", "0"], "--batch-size"),
        (["--field", "nope=x"], "unknown key"),
    ],
)
def test_eval_command_bad_flags(tmp_path, flags, match):
    args = parse(["--model", "x", "--data", str(DATA / "aime24.jsonl"), "--output", str(tmp_path / "r.json"), *flags])
    with pytest.raises(UserError, match=match):
        ev.run_eval_command(args)


def test_backend_flag_lists_registered_engines_and_refuses_unknown(monkeypatch, capsys):
    """--backend offers sorted(repo_rl.engines.GENERATORS), read when needed, and nothing else."""
    import repo_rl.engines.hf
    from repo_rl.cli import build_parser

    assert parse(["--model", "m", "--data", "a.jsonl"]).backend == "hf"
    monkeypatch.setitem(repo_rl.engines.GENERATORS, "zztestengine", ScriptedGenerator)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    help_text = capsys.readouterr().out
    assert "generation engine" in help_text and ", ".join(sorted(repo_rl.engines.GENERATORS)) in " ".join(help_text.split())
    assert parse(["--model", "m", "--data", "a.jsonl", "--backend", "zztestengine"]).backend == "zztestengine"
    with pytest.raises(SystemExit) as ei:
        build_parser().parse_args(["eval", "--model", "m", "--data", "a.jsonl", "--backend", "no-such-engine"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "--backend" in err and "'no-such-engine'" in err and "'hf'" in err and "'zztestengine'" in err
    # A namespace built without argparse is checked too.
    args = parse(["--model", "m", "--data", str(DATA / "aime24.jsonl")])
    args.backend = "no-such-engine"
    with pytest.raises(UserError, match="--backend no-such-engine: unknown engine; expected one of " + ", ".join(sorted(repo_rl.engines.GENERATORS))):
        ev.run_eval_command(args)


def test_parser_defaults():
    args = parse(["--model", "m", "--data", "a.jsonl", "--data", "b.json"])
    assert args.data == ["a.jsonl", "b.json"]
    assert (args.n, args.temperature, args.top_p, args.max_new_tokens, args.seed, args.batch_size) == (4, 0.6, 0.95, None, 0, 32)
    assert args.kind == "auto" and args.bf16 is False and args.output is None and args.limit is None
    with pytest.raises(SystemExit):
        parse(["--data", "a.jsonl"])  # --model is required


def test_new_tokens_fit_the_context(capsys):
    from repo_rl.evaluation.cli import DEFAULT_MAX_NEW_TOKENS, fit_new_tokens

    assert fit_new_tokens(None, None, [10]) == DEFAULT_MAX_NEW_TOKENS  # no known context: the default
    assert fit_new_tokens(None, 4096, [100, 300]) == DEFAULT_MAX_NEW_TOKENS
    assert fit_new_tokens(None, 512, [100, 300]) == 212  # the default does not fit: what is left, with a note
    assert "--max-new-tokens 212" in capsys.readouterr().err
    assert fit_new_tokens(200, 512, [100, 300, 350]) == 200
    assert "1 items' prompts leave fewer than --max-new-tokens 200" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"^--max-new-tokens 1024: the model's context is 256 tokens"):
        fit_new_tokens(1024, 256, [40])
    with pytest.raises(UserError, match=r"^the longest prompt is 300 tokens, which fills the model's 256-token context"):
        fit_new_tokens(None, 256, [40, 300])  # no room for an answer, whatever --max-new-tokens says
