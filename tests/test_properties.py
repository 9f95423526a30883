"""Property tests not covered by tests/test_config.py and tests/test_data.py.

test_config.py already checks random keys, short random override values and numeric round
trips; test_data.py checks random JSON rows (written by json.dumps) and the sampler. Here:
YAML tags and deep nesting in config files and overrides, raw bytes and JSON escapes in data
files, the resume-time log truncation, strict JSON in metrics.jsonl, and the checkpoint
listing. The ``@example`` cases are the shortest inputs that break the code of 2026-11-24.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from repo_rl.run.checkpoint import STATE_FILE, list_checkpoints
from repo_rl.config import Config, ConfigError, FieldsConfig, build_config, load_yaml, parse_override
from repo_rl.data import DataError, load_examples
from repo_rl.run.tracking import JsonlWriter, truncate_jsonl

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# YAML fragments that reach PyYAML's constructors and composer: tags with bad payloads,
# anchors, flow collections, nesting.
TAGS = st.sampled_from(["!!int", "!!float", "!!bool", "!!timestamp", "!!binary", "!!str", "!!null", "!!set", "!!omap", "!!map", "!!seq", ""])
SCALARS = st.sampled_from(["abc", "1", "1.5", "2026-13-45", "2001-01-01", "yes", "~", "0x1F", ".nan", "-.inf", "[", "{", "&a 1", "*a", ""])
FRAGMENT = st.builds(lambda t, s: f"{t} {s}".strip(), TAGS, SCALARS)
NESTED = st.sampled_from([1, 50, 400, 800]).map(lambda n: "[" * n + "]" * n)  # PyYAML recurses past ~500
VALUE = FRAGMENT | NESTED | st.text(max_size=20)


def _one_line_naming(err: Exception, *names: str) -> None:
    msg = str(err)
    assert "\n" not in msg, msg
    for n in names:
        assert n in msg, (n, msg)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _stored(key: str, v):
    """The value the config must hold for leaf ``key`` given the parsed YAML value ``v``, for the
    keys the tests below draw; the coercions are the documented ones (integral float -> int,
    number or numeric string -> float, number -> str, one string -> one-element list[str])."""
    if key in ("seed", "max_steps"):  # int
        assert _number(v) and float(v).is_integer(), f"{key}: accepted non-integer {v!r}"
        return int(v)
    if key in ("rho", "learning_rate"):  # float
        assert _number(v) or isinstance(v, str), f"{key}: accepted non-number {v!r}"
        return float(v)
    if key in ("train_files", "funcs"):  # str | list[str], list[str]
        def one(x):
            assert isinstance(x, str) or _number(x), f"{key}: accepted non-string {x!r}"
            return x if isinstance(x, str) else str(x)
        if isinstance(v, list):
            return [one(x) for x in v]
        return [one(v)] if key == "funcs" else one(v)
    raise KeyError(key)


def _assert_built_as_given(cfg: Config, values: dict) -> None:
    """``cfg`` is the default config with exactly ``values`` ({section: {key: parsed value}})
    set, each coerced to its field type; and it survives a round trip through its YAML."""
    want = Config().to_dict()
    for section, sub in values.items():
        for key, v in sub.items():
            want[section][key] = _stored(key, v)
            got = getattr(getattr(cfg, section), key)
            assert type(got) is type(want[section][key]), (section, key, got, v)
    assert cfg.to_dict() == want
    again = build_config(yaml.safe_load(cfg.to_yaml()))
    assert again.to_dict() == cfg.to_dict()


@SETTINGS
@given(section=st.sampled_from(["train", "repo", "algorithm", "data", "nosuch"]),
       key=st.sampled_from(["seed", "rho", "max_steps", "learning_rate", "train_files", "x"]), value=VALUE)
@example(section="train", key="seed", value="[" * 800 + "]" * 800)
@example(section="train", key="seed", value="!!timestamp 2026-13-45")
@example(section="train", key="learning_rate", value="!!float abc")
@example(section="train", key="seed", value="!!timestamp abc")
@example(section="train", key="seed", value="!!bool abc")
@example(section="train", key="seed", value="!!int")
# files that build: the success path must hold the value given
@example(section="train", key="seed", value="3.0")  # integral float -> int 3
@example(section="train", key="learning_rate", value="1e-6")  # YAML 1.1 string "1e-6" -> float
@example(section="repo", key="rho", value="!!float 1")
@example(section="data", key="train_files", value="[a, 1]")  # -> ["a", "1"]
@example(section="data", key="train_files", value="abc")
def test_config_files_load_or_raise_config_error(section, key, value):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.yaml"
        p.write_text(f"{section}:\n  {key}: {value}\n", encoding="utf-8")
        try:
            data = load_yaml(p)
        except ConfigError as e:
            _one_line_naming(e, str(p))
            return
        assert isinstance(data, dict)
        try:
            cfg = build_config(data)
        except ConfigError as e:
            _one_line_naming(e)
            return
        # only mappings of known keys build (a scalar section or an unknown key is an error)
        assert all(isinstance(sub, dict) for sub in data.values()), data
        _assert_built_as_given(cfg, data)


@SETTINGS
@given(key=st.sampled_from(["train.seed", "repo.rho", "train.learning_rate", "data.train_files", "reward.funcs"]), value=VALUE)
@example(key="train.seed", value="!!float abc")
@example(key="train.seed", value="!!timestamp 2026-13-45")
@example(key="train.seed", value="[" * 800)
@example(key="train.seed", value="!!int abc")
@example(key="train.seed", value="!!bool abc")
@example(key="train.seed", value="!!int")
# overrides that build: the success path must hold the value given
@example(key="train.seed", value="7.0")  # -> int 7
@example(key="train.learning_rate", value="1e-6")  # Python literal -> float
@example(key="repo.rho", value="1")  # -> 1.0
@example(key="data.train_files", value="[a, 1]")  # -> ["a", "1"]
@example(key="reward.funcs", value="abc")  # one string -> ["abc"]
def test_overrides_build_or_raise_config_error(key, value):
    try:
        cfg = build_config(overrides=[f"{key}={value}"])
    except ConfigError as e:
        _one_line_naming(e, key)
        return
    # the value as the override parser reads it (YAML; text YAML cannot read stays text; Python
    # numeric literals such as 1e-6 as numbers), stored at that key and nowhere else
    (section, leaf), parsed = parse_override(f"{key}={value}")
    _assert_built_as_given(cfg, {section: {leaf: parsed}})


# Data lines: raw bytes, and JSON text with escapes that decode to unencodable strings.
ESCAPES = st.sampled_from(["\\ud800", "\\udfff", "\\ud83d", "\\u0000", "\\ud83d\\ude00", "\\u00e9", "\\n", ""])
FIELD = st.sampled_from(["prompt", "answer", "solution", "id", "domain"])


@st.composite
def data_line(draw) -> bytes:
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(max_size=40)).replace(b"\n", b" ")
    row = {"prompt": "what is 1+1?", "answer": "2"}
    field = draw(FIELD)
    esc = draw(ESCAPES)  # an escape inside one of the string fields
    text = json.dumps({**row, field: "v"}).replace('"v"', f'"v{esc}v"')
    if kind == 2:
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode("utf-8")


def _all_strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _all_strings(k)
            yield from _all_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _all_strings(v)


@SETTINGS
@given(lines=st.lists(data_line(), min_size=1, max_size=4), skip=st.booleans())
@example(lines=[b'{"prompt": "what is 1+1? \\ud800", "answer": "2"}'], skip=False)
@example(lines=[b'{"prompt": "what is 1+1?", "answer": "2", "id": "\\udfff"}'], skip=True)
def test_data_files_load_clean_text_or_raise_data_error(lines, skip):
    """Whatever the bytes, loading gives a DataError naming the file, or examples whose every
    string can be written as UTF-8 (tokenizers, completions.jsonl and metrics.jsonl need that)."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.jsonl"
        p.write_bytes(b"\n".join(lines) + b"\n")
        try:
            exs = load_examples(str(p), FieldsConfig(), on_bad_row="skip" if skip else "error")
        except DataError as e:
            _one_line_naming(e, str(p))
            return
        for ex in exs:
            for s in _all_strings([ex.prompt, ex.answer, ex.solution, ex.id, ex.domain, ex.extra]):
                s.encode("utf-8")  # raises UnicodeEncodeError on a lone surrogate


# Resume-time truncation of metrics.jsonl / completions.jsonl.
ROW = st.fixed_dictionaries({"step": st.integers(0, 12)}, optional={"reward": st.floats(allow_nan=False, allow_infinity=False), "text": st.text(max_size=10)})
LINE = st.one_of(ROW.map(lambda r: ("row", r)), st.sampled_from(['{"step": 3, "rew', "[1, 2]", "null", "", "garbage"]).map(lambda g: ("junk", g)))


@SETTINGS
@given(items=st.lists(LINE, max_size=12), keep=st.integers(0, 12), torn=st.text(max_size=12))
def test_truncate_jsonl_keeps_exactly_the_rows_up_to_the_checkpoint(items, keep, torn):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "metrics.jsonl"
        body = "".join((json.dumps(v) if k == "row" else v) + "\n" for k, v in items)
        p.write_text(body + (('{"step": 1, ' + torn) if torn else ""), encoding="utf-8")
        truncate_jsonl(p, keep)
        expected = [v for k, v in items if k == "row" and v["step"] <= keep]
        text = p.read_text(encoding="utf-8")
        assert text == "" or text.endswith("\n")
        assert [json.loads(l) for l in text.splitlines()] == expected
        truncate_jsonl(p, keep)  # idempotent
        assert p.read_text(encoding="utf-8") == text


def _strict(s: str):
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(s, parse_constant=bad)


@SETTINGS
@given(metrics=st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda k: k.isprintable()),
                               st.floats() | st.integers(-10**6, 10**6) | st.none() | st.booleans(), max_size=8))
def test_metrics_lines_are_strict_json(metrics):
    """NaN and infinities never reach metrics.jsonl as the non-JSON tokens NaN / Infinity."""
    with tempfile.TemporaryDirectory() as d:
        w = JsonlWriter(Path(d) / "metrics.jsonl")
        w.write(metrics)
        w.close()
        (line,) = (Path(d) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        got = _strict(line)
        for k, v in metrics.items():
            if isinstance(v, float) and math.isnan(v):
                assert got[k] is None
            elif isinstance(v, float) and math.isinf(v):
                assert math.isfinite(got[k]) and (got[k] > 0) == (v > 0)
            else:
                assert got[k] == v


NAMES = st.sampled_from(["step-1", "step-2", "step-10", "step-007", "step-", "step-x", ".tmp-step-3-99", ".old-step-2-7",
                         "step-3.bak", "Step-4", "step--1", "step-5"])


@SETTINGS
@given(dirs=st.lists(st.tuples(NAMES, st.booleans()), max_size=8), files=st.lists(NAMES, max_size=3))
def test_only_complete_step_directories_are_checkpoints(dirs, files):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        complete = set()
        for name, has_state in dirs:
            (root / name).mkdir(exist_ok=True)
            if has_state:
                (root / name / STATE_FILE).write_text("{}")
        for name in files:
            if not (root / name).exists():
                (root / name).write_text("not a directory")
        for p in root.iterdir():
            if p.is_dir() and (p / STATE_FILE).is_file() and p.name.startswith("step-") and p.name[5:].isdigit():
                complete.add(int(p.name[5:]))
        assert list_checkpoints(root) == sorted(complete)


def test_checkpoint_listing_of_a_missing_directory_is_empty(tmp_path):
    assert list_checkpoints(tmp_path / "nope") == []
