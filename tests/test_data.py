"""Unit tests for repo_rl.data: loaders, row validation, error messages, PromptSampler."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repo_rl.config import FieldsConfig
from repo_rl.data import DataError, Example, LoadReport, PromptSampler, load_examples

F = FieldsConfig()


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def load_error(path, fields=F, **kw) -> str:
    with pytest.raises(DataError) as ei:
        load_examples(path if isinstance(path, list) else str(path), fields, **kw)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


GOOD = {"prompt": "what is 1+1?", "answer": "2"}


# ======================================================================================
# Loading: formats and layouts
# ======================================================================================


def test_jsonl_basic(tmp_path):
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"id": "a", "prompt": "what is 2+3?", "answer": " 5 ", "solution": "2+3=5", "domain": "math", "level": 3},
            "",  # blank line is skipped
            {"prompt": "what is 4+4?", "answer": 8},  # numeric answer, no id, no solution
        ],
    )
    reports: list[LoadReport] = []
    exs = load_examples(str(p), F, reports=reports)
    assert len(exs) == 2
    a, b = exs
    assert isinstance(a, Example)
    assert (a.id, a.prompt, a.answer, a.solution, a.domain) == ("a", "what is 2+3?", "5", "2+3=5", "math")
    assert a.extra is not None and a.extra["level"] == 3
    assert b.answer == "8" and b.solution is None and b.domain is None
    assert b.id == f"{p}:3"  # default id: <file>:<line>, line 3 (line 2 is blank)
    assert b.question_text == "what is 4+4?"
    (rep,) = reports
    assert (rep.source, rep.loaded, rep.bad, rep.without_solution) == (str(p), 2, 0, 1)


def test_json_list_and_wrapped(tmp_path):
    rows = [{"prompt": "p1", "answer": "1", "solution": "s"}, {"prompt": "p2", "answer": "2"}]
    p = tmp_path / "d.json"
    p.write_text(json.dumps(rows))
    exs = load_examples(str(p), F)
    assert [e.prompt for e in exs] == ["p1", "p2"]
    assert [e.solution for e in exs] == ["s", None]
    q = tmp_path / "w.json"
    q.write_text(json.dumps({"data": rows}))
    assert [e.answer for e in load_examples(str(q), F)] == ["1", "2"]
    r = tmp_path / "obj.json"
    r.write_text(json.dumps({"prompt": "p", "answer": "1"}))
    assert "obj.json" in load_error(r)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "prompt": ["what is 1+1?", "what is 2+2?", "what is 3+3?"],
            "answer": ["2", "4", "6"],
            "solution": ["1+1=2", None, "3+3=6"],
        }
    )
    p = tmp_path / "d.parquet"
    pq.write_table(table, p)
    reports: list[LoadReport] = []
    exs = load_examples(str(p), F, reports=reports)
    assert [e.answer for e in exs] == ["2", "4", "6"]
    assert [e.solution for e in exs] == ["1+1=2", None, "3+3=6"]
    assert reports[0].without_solution == 1
    # a bad parquet row names the file, the row and the field
    bad = pa.table({"prompt": ["ok", "ok too"], "answer": ["1", ""]})
    q = tmp_path / "bad.parquet"
    pq.write_table(bad, q)
    msg = load_error(q)
    assert str(q) in msg and "row1" in msg and "'answer'" in msg
    assert [e.answer for e in load_examples(str(q), F, on_bad_row="skip")] == ["1"]
    # not a parquet file at all
    z = tmp_path / "junk.parquet"
    z.write_bytes(b"not parquet")
    assert "junk.parquet" in load_error(z)


def test_chat_message_prompts(tmp_path):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "what is 3+3?"},
    ]
    p = write_jsonl(tmp_path / "c.jsonl", [{"prompt": msgs, "answer": "6"}])
    (ex,) = load_examples(str(p), F)
    assert ex.prompt == msgs
    assert ex.question_text == "what is 3+3?"  # last user message


def test_field_mapping(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"question": "q?", "gold": "7", "ref": "because 7", "uid": 12}])
    fields = FieldsConfig(prompt="question", answer="gold", solution="ref", id="uid")
    (ex,) = load_examples(str(p), fields)
    assert (ex.prompt, ex.answer, ex.solution, ex.id) == ("q?", "7", "because 7", "12")
    # an explicitly mapped field does not fall back to other columns
    q = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "q?", "answer": "7"}])
    msg = load_error(q, FieldsConfig(answer="gold"))
    assert "'gold'" in msg and str(q) in msg and ":1" in msg


def test_dotted_nested_fields(tmp_path):
    p = write_jsonl(
        tmp_path / "n.jsonl",
        [{"q": {"text": "nested?"}, "meta": {"gold": {"value": 3}, "sol": "x"}}],
    )
    fields = FieldsConfig(prompt="q.text", answer="meta.gold.value", solution="meta.sol")
    (ex,) = load_examples(str(p), fields)
    assert (ex.prompt, ex.answer, ex.solution) == ("nested?", "3", "x")
    # a missing nested path names the dotted field
    q = write_jsonl(tmp_path / "m.jsonl", [{"q": {"text": "nested?"}, "meta": {}}])
    msg = load_error(q, fields)
    assert "'meta.gold.value'" in msg and ":1" in msg


def test_verl_luffy_layout_default_fields(tmp_path):
    rows = [
        {
            "data_source": "openr1",
            "prompt": [{"role": "user", "content": "Solve x+1=3."}],
            "reward_model": {"ground_truth": "2", "style": "rule"},
            "target": [{"role": "assistant", "content": "x = 3 - 1 = 2"}],
            "extra_info": {"index": 0, "split": "train"},
        },
        {
            "data_source": "openr1",
            "prompt": [{"role": "user", "content": "Solve 2x=8."}],
            "reward_model": {"ground_truth": "4", "style": "rule"},
            "target": "x = 8 / 2 = 4",
            "extra_info": {"index": 1, "split": "train"},
        },
        {
            "data_source": "aime",
            "prompt": [{"role": "user", "content": "Solve y-1=0."}],
            "reward_model": {"ground_truth": "1", "style": "rule"},
            "extra_info": {"index": 2, "split": "train"},
        },
    ]
    p = write_jsonl(tmp_path / "luffy.jsonl", rows)
    reports: list[LoadReport] = []
    exs = load_examples(str(p), FieldsConfig(), reports=reports)
    assert [e.answer for e in exs] == ["2", "4", "1"]
    assert [e.solution for e in exs] == ["x = 3 - 1 = 2", "x = 8 / 2 = 4", None]
    assert [e.domain for e in exs] == ["openr1", "openr1", "aime"]
    assert [e.id for e in exs] == ["0", "1", "2"]
    assert exs[0].question_text == "Solve x+1=3."
    assert reports[0].without_solution == 1
    # the same layout in Parquet
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    q = tmp_path / "luffy.parquet"
    pq.write_table(pa.Table.from_pylist([rows[0], rows[2]]), q)  # target: messages / absent (null)
    exs = load_examples(str(q), FieldsConfig())
    assert [e.answer for e in exs] == ["2", "1"]
    assert [e.solution for e in exs] == ["x = 3 - 1 = 2", None]
    assert [e.id for e in exs] == ["0", "2"]


def test_multiple_sources_and_without_solution(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "answer": "1", "solution": "s"}, GOOD])
    b = write_jsonl(tmp_path / "b.jsonl", [GOOD, GOOD, {**GOOD, "solution": "   "}])  # blank solution -> None
    reports: list[LoadReport] = []
    exs = load_examples([str(a), str(b)], F, reports=reports)
    assert len(exs) == 5
    assert [(r.loaded, r.without_solution) for r in reports] == [(2, 1), (3, 3)]


# ======================================================================================
# Bad rows: DataError names file, row and field
# ======================================================================================

BAD_ROWS = [
    # (row as a JSON object or a raw line, field or phrase that must be in the message)
    ('{"prompt": "p", "answer": ', "invalid JSON"),
    ({"answer": "1"}, "'prompt'"),
    ({"prompt": "p"}, "'answer'"),
    ({"prompt": "p", "answer": ""}, "'answer'"),
    ({"prompt": "p", "answer": "   "}, "'answer'"),
    ({"prompt": "p", "answer": None}, "'answer'"),
    ({"prompt": "p", "answer": True}, "'answer'"),
    ({"prompt": "p", "answer": {"x": 1}}, "'answer'"),
    ({"prompt": "", "answer": "1"}, "'prompt'"),
    ({"prompt": " \n ", "answer": "1"}, "'prompt'"),
    ({"prompt": 42, "answer": "1"}, "'prompt'"),
    ({"prompt": {"text": "p"}, "answer": "1"}, "'prompt'"),
    ({"prompt": [], "answer": "1"}, "'prompt'"),
    ({"prompt": [{"role": "wizard", "content": "hi"}], "answer": "1"}, "'prompt'"),
    ({"prompt": [{"role": "user"}], "answer": "1"}, "'prompt'"),
    ({"prompt": [{"role": "user", "content": 5}], "answer": "1"}, "'prompt'"),
    ({"prompt": ["just a string"], "answer": "1"}, "'prompt'"),
    ({"prompt": [{"role": "system", "content": "s"}], "answer": "1"}, "'prompt'"),  # no user message
    ({"prompt": [{"role": "user", "content": "  "}], "answer": "1"}, "'prompt'"),
    ({"prompt": "p", "answer": "1", "solution": {"a": 1}}, "'solution'"),
    ({"prompt": "p", "answer": "1", "id": [1]}, "'id'"),
    ("[1, 2]", "JSON object"),
]


@pytest.mark.parametrize("row,needle", BAD_ROWS)
def test_bad_row_message_names_file_line_field(tmp_path, row, needle):
    # bad row on line 2, between two good rows
    p = write_jsonl(tmp_path / "bad.jsonl", [GOOD, row, {"prompt": "other", "answer": "3"}])
    msg = load_error(p)
    assert str(p) in msg
    assert f"{p}:2" in msg
    assert needle in msg
    # skip mode keeps the good rows of the same file and counts the bad one
    reports: list[LoadReport] = []
    exs = load_examples(str(p), F, on_bad_row="skip", reports=reports)
    assert [e.answer for e in exs] == ["2", "3"]
    assert (reports[0].rows, reports[0].bad, reports[0].loaded) == (3, 1, 2)
    assert f"{p}:2" in reports[0].first_errors[0]


def test_unknown_role_lists_roles(tmp_path):
    p = write_jsonl(tmp_path / "r.jsonl", [{"prompt": [{"role": "wizard", "content": "hi"}], "answer": "1"}])
    msg = load_error(p)
    assert "'wizard'" in msg and "user" in msg and f"{p}:1" in msg


def test_non_utf8_line(tmp_path):
    p = tmp_path / "enc.jsonl"
    p.write_bytes(
        json.dumps(GOOD).encode() + b"\n"
        + json.dumps({"prompt": "p2", "answer": "3"}).encode() + b"\n"
        + b'{"prompt": "caf\xe9", "answer": "1"}\n'
    )
    msg = load_error(p)
    assert f"{p}:3" in msg and "UTF-8" in msg
    exs = load_examples(str(p), F, on_bad_row="skip")
    assert [e.answer for e in exs] == ["2", "3"]


def test_duplicate_ids(tmp_path):
    p = write_jsonl(
        tmp_path / "dup.jsonl",
        [{**GOOD, "id": "x"}, {"prompt": "q", "answer": "5", "id": "y"}, {"prompt": "r", "answer": "6", "id": "x"}],
    )
    msg = load_error(p)
    assert f"{p}:3" in msg and "'x'" in msg and "id" in msg and f"{p}:1" in msg  # names the first occurrence
    exs = load_examples(str(p), F, on_bad_row="skip")
    assert [e.answer for e in exs] == ["2", "5"]
    # duplicates across files are detected too
    q = write_jsonl(tmp_path / "dup2.jsonl", [{"prompt": "z", "answer": "9", "id": "y"}])
    msg = load_error([str(p), str(q)], on_bad_row="skip")
    assert str(q) in msg and "no valid rows" in msg


def test_file_level_errors(tmp_path):
    d = tmp_path / "adir.jsonl"
    d.mkdir()
    assert str(d) in load_error(d) and "directory" in load_error(d)
    missing = tmp_path / "missing.jsonl"
    msg = load_error(missing)
    assert str(missing) in msg and "not found" in msg
    txt = tmp_path / "data.txt"
    txt.write_text(json.dumps(GOOD) + "\n")
    msg = load_error(txt)
    assert str(txt) in msg and "'.txt'" in msg
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    msg = load_error(empty)
    assert str(empty) in msg and "no valid rows" in msg
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n  \n")
    assert "no valid rows" in load_error(blank, on_bad_row="skip")
    bad_json = tmp_path / "broken.json"
    bad_json.write_text('[{"prompt": "p", "answer": "1"},\n {"prompt": ')
    msg = load_error(bad_json)
    assert str(bad_json) in msg and ":2" in msg
    with pytest.raises(DataError):
        load_examples("toyworld:train", F)


def test_skip_mode_all_bad_is_still_an_error(tmp_path):
    p = write_jsonl(tmp_path / "allbad.jsonl", [{"prompt": "p"}, "{oops", {"answer": "1"}])
    msg = load_error(p, on_bad_row="skip")
    assert str(p) in msg and "no valid rows" in msg and "3 read" in msg and "3 bad" in msg
    assert f"{p}:1" in msg  # first error is quoted


def test_skip_mode_counts_and_keeps_first_errors(tmp_path):
    rows = []
    for i in range(10):
        rows.append({"prompt": f"p{i}", "answer": str(i)})
        rows.append({"prompt": f"p{i}"})  # bad: no answer
    p = write_jsonl(tmp_path / "mixed.jsonl", rows)
    reports: list[LoadReport] = []
    exs = load_examples(str(p), F, on_bad_row="skip", reports=reports)
    assert [e.answer for e in exs] == [str(i) for i in range(10)]
    rep = reports[0]
    assert (rep.rows, rep.loaded, rep.bad) == (20, 10, 10)
    assert 1 <= len(rep.first_errors) <= 5
    assert rep.first_errors[0].startswith(f"{p}:2:")


def test_huge_integer_is_a_row_error(tmp_path):
    # Python refuses to convert integers of more than 4300 digits (ValueError, not
    # JSONDecodeError). One such row must be a DataError naming the file and line, and in
    # skip mode must not take down the good rows of the same file.
    p = tmp_path / "big.jsonl"
    p.write_text(json.dumps(GOOD) + "\n" + '{"prompt": "p", "answer": ' + "9" * 5000 + "}\n")
    msg = load_error(p)
    assert f"{p}:2" in msg
    exs = load_examples(str(p), F, on_bad_row="skip")
    assert [e.answer for e in exs] == ["2"]


# ======================================================================================
# Property test: arbitrary JSON rows load or raise DataError
# ======================================================================================

KEYS = st.sampled_from(
    ["prompt", "answer", "solution", "id", "domain", "target", "reward_model", "ground_truth", "role", "content", "data_source", "extra_info", "index"]
) | st.text(max_size=5)
JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
JSON = st.recursive(
    JSON_LEAF,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(KEYS, c, max_size=4),
    max_leaves=12,
)
MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bot"]), "content": JSON}),
    max_size=3,
)
ROW = st.dictionaries(KEYS, JSON | MESSAGES, max_size=6) | JSON


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(ROW, min_size=1, max_size=4), skip=st.booleans())
def test_random_rows_load_or_raise_data_error(rows, skip):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        try:
            exs = load_examples(str(p), F, on_bad_row="skip" if skip else "error")
        except DataError as e:
            assert "\n" not in str(e)
            assert str(p) in str(e)
        else:
            assert 1 <= len(exs) <= len(rows)
            for ex in exs:
                assert isinstance(ex.answer, str) and ex.answer.strip()
                assert isinstance(ex.prompt, (str, list))


# ======================================================================================
# PromptSampler
# ======================================================================================


def test_sampler_deterministic_for_seed():
    a, b = PromptSampler(13, seed=5), PromptSampler(13, seed=5)
    assert a.take(40) == b.take(40)
    c = PromptSampler(13, seed=6)
    assert PromptSampler(13, seed=5).take(13) != c.take(13)


def test_sampler_covers_each_example_once_per_epoch():
    s = PromptSampler(7, seed=1)
    seq = s.take(21)
    for e in range(3):
        assert sorted(seq[7 * e : 7 * e + 7]) == list(range(7))
    # uneven takes straddling epoch boundaries still cover each epoch exactly once
    s = PromptSampler(5, seed=2)
    seq = s.take(3) + s.take(4) + s.take(3)  # 10 = two epochs
    assert sorted(seq[:5]) == list(range(5)) and sorted(seq[5:]) == list(range(5))


def test_sampler_shuffles_differently_across_epochs():
    s = PromptSampler(20, seed=0)
    e0, e1, e2 = s.take(20), s.take(20), s.take(20)
    assert sorted(e0) == sorted(e1) == list(range(20))
    assert e0 != e1 and e1 != e2
    assert e0 != list(range(20))


def test_sampler_no_shuffle():
    s = PromptSampler(4, seed=3, shuffle=False)
    assert s.take(10) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("first", [0, 3, 8, 9, 10, 18, 20, 27])
def test_sampler_resume_exact(first):
    # n = 9: first = 9 / 18 / 27 stop exactly at an epoch boundary
    ref = PromptSampler(9, seed=11)
    ref.take(first)
    state = json.loads(json.dumps(ref.state_dict()))  # as saved in a checkpoint
    expected = ref.take(25)
    resumed = PromptSampler(9, seed=11)
    resumed.load_state_dict(state)
    assert resumed.take(25) == expected
    # the uninterrupted sequence agrees too
    whole = PromptSampler(9, seed=11).take(first + 25)
    assert whole[first:] == expected


def test_sampler_state_mismatch_and_empty():
    s = PromptSampler(9, seed=0)
    s.take(4)
    state = s.state_dict()
    with pytest.raises(DataError):
        PromptSampler(10, seed=0).load_state_dict(state)
    with pytest.raises(ValueError):
        PromptSampler(0, seed=0)
