"""Unit tests for repo_rl.config: schema, YAML + dotted overrides, validation messages."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from repo_rl.config import (
    Config,
    ConfigError,
    build_config,
    field_docs,
    load_config,
    load_yaml,
    parse_override,
)

REQUIRED_KEYS = [
    "model.name_or_path",
    "data.train_files",
    "data.eval_files",
    "algorithm.method",
    "algorithm.num_generations",
    "algorithm.max_completion_length",
    "repo.delta",
    "repo.rho",
    "train.max_steps",
    "train.prompts_per_step",
    "train.learning_rate",
    "train.seed",
    # TRL GRPOConfig names
    "algorithm.temperature",
    "algorithm.beta",
    "algorithm.epsilon",
    "algorithm.epsilon_high",
    "algorithm.loss_type",
    "algorithm.scale_rewards",
    "algorithm.num_iterations",
]

LEAF_KEYS = {k for k, *_ in field_docs()}


def error_of(overrides=None, base=None) -> str:
    """Build a config that must fail; return the one-line ConfigError message."""
    with pytest.raises(ConfigError) as ei:
        build_config(base, overrides)
    msg = str(ei.value)
    assert "\n" not in msg, f"message is not one line: {msg!r}"
    assert msg.strip(), "empty message"
    return msg


# ======================================================================================
# Defaults, keys, docs
# ======================================================================================


def test_defaults_validate():
    cfg = build_config()
    assert cfg == Config()
    assert cfg.algorithm.method == "repo"
    assert load_config(None) == Config()


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_required_keys_exist(key):
    assert key in LEAF_KEYS
    section, name = key.split(".")
    assert hasattr(getattr(Config(), section), name)


def test_field_docs_nonempty_for_every_key():
    docs = field_docs()
    assert len(docs) == len(LEAF_KEYS)  # no duplicates
    # count leaves independently, walking nested sections (data.fields, model.lora)
    def leaves(obj):
        return sum(leaves(getattr(obj, f.name)) if dataclasses.is_dataclass(getattr(obj, f.name)) else 1
                   for f in dataclasses.fields(obj))

    assert len(docs) == leaves(Config())
    for key, tp, default, doc in docs:
        assert doc.strip(), f"{key} has no doc"
        assert "\n" not in doc
        assert tp and default is not None
    assert "data.fields.answer" in LEAF_KEYS


def test_epsilon_high_property():
    assert build_config().epsilon_high == 0.2
    assert build_config(overrides=["algorithm.epsilon=0.1"]).epsilon_high == 0.1
    assert build_config(overrides=["algorithm.epsilon_high=0.28"]).epsilon_high == 0.28


# ======================================================================================
# YAML file + overrides
# ======================================================================================


def test_yaml_file_plus_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "model:\n  name_or_path: /models/x\n"
        "algorithm:\n  method: grpo\n  num_generations: 4\n  loss_type: dr_grpo\n"
        "train:\n  learning_rate: 1e-5\n  max_steps: 10\n"
    )
    cfg = load_config(p, ["train.max_steps=20", "algorithm.num_generations=6"])
    assert cfg.model.name_or_path == "/models/x"
    assert cfg.algorithm.method == "grpo"
    assert cfg.algorithm.loss_type == "dr_grpo"
    # YAML 1.1 reads "1e-5" as a string; it must still become a float
    assert isinstance(cfg.train.learning_rate, float) and cfg.train.learning_rate == 1e-5
    assert cfg.train.max_steps == 20  # override wins over the file
    assert cfg.algorithm.num_generations == 6
    assert cfg.algorithm.temperature == 1.0  # untouched default


def test_override_value_parsing():
    cfg = build_config(
        overrides=[
            "train.learning_rate=1e-6",
            "reward.funcs=[a,b]",
            "reward.weights=[0.5, 2]",
            "data.train_files=x.jsonl",
            "train.bf16=true",
            "algorithm.epsilon_high=null",
            "model.name_or_path=123",
        ]
    )
    assert isinstance(cfg.train.learning_rate, float) and cfg.train.learning_rate == 1e-6
    assert cfg.reward.funcs == ["a", "b"]
    assert cfg.reward.weights == [0.5, 2.0] and all(isinstance(w, float) for w in cfg.reward.weights)
    assert cfg.data.train_files == "x.jsonl"
    assert cfg.train.bf16 is True
    assert cfg.algorithm.epsilon_high is None
    assert cfg.model.name_or_path == "123"
    cfg = build_config(overrides=["data.train_files=[x.jsonl, y.parquet]", "data.eval_files=e.jsonl", "reward.funcs=math"])
    assert cfg.data.train_files == ["x.jsonl", "y.parquet"]
    assert cfg.data.eval_files == "e.jsonl"
    assert cfg.reward.funcs == ["math"]  # a single string becomes a one-element list
    cfg = build_config(overrides=["train.max_steps=1e3", "data.fields.answer=gold"])
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.data.fields.answer == "gold"


def test_parse_override():
    assert parse_override("train.learning_rate=1e-6") == (["train", "learning_rate"], 1e-6)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")
    assert parse_override(" a.b =") == (["a", "b"], "")
    for bad in ["train.max_steps", "=5", "a..b=1", ".a=1"]:
        with pytest.raises(ConfigError):
            parse_override(bad)


def test_overrides_merge_into_base_dict():
    base = {"train": {"max_steps": 3, "seed": 7}}
    cfg = build_config(base, ["train.max_steps=4"])
    assert (cfg.train.max_steps, cfg.train.seed) == (4, 7)
    assert base == {"train": {"max_steps": 3, "seed": 7}}  # base not mutated


def test_to_yaml_round_trip():
    for cfg in [
        Config(),
        build_config(
            overrides=[
                "data.train_files=[a.jsonl, b.jsonl]",
                "data.eval_files=e.jsonl",
                "eval.every=5",
                "algorithm.epsilon_high=0.28",
                "train.learning_rate=3e-7",
                "reward.funcs=[math, numeric]",
                "reward.weights=[1, 0.5]",
                "logging.report_to=[tensorboard]",
                "repo.delta=0.25",
                "model.system_prompt='a: b'",
            ]
        ),
    ]:
        again = build_config(yaml.safe_load(cfg.to_yaml()))
        assert again == cfg


# ======================================================================================
# Errors
# ======================================================================================


def test_unknown_key_with_suggestion():
    msg = error_of(["train.learnig_rate=1e-6"])
    assert "train.learnig_rate" in msg
    assert "train.learning_rate" in msg  # close-match suggestion
    msg = error_of(["trian.max_steps=3"])
    assert "trian" in msg and "train" in msg
    msg = error_of(base={"algorithm": {"num_generation": 4}})
    assert "algorithm.num_generation" in msg and "algorithm.num_generations" in msg
    msg = error_of(["model.nonsense_key_xyz=1"])
    assert "model.nonsense_key_xyz" in msg


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.max_steps=abc", "train.max_steps"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("train.max_steps=true", "train.max_steps"),
        ("train.bf16=maybe", "train.bf16"),
        ("train.bf16=1", "train.bf16"),
        ("train.learning_rate=fast", "train.learning_rate"),
        ("reward.funcs=5", "reward.funcs"),
        ("reward.weights=[a]", "reward.weights"),
        ("data.train_files={a: 1}", "data.train_files"),
        ("train={a: 1}", "train.a"),
        ("train=5", "train"),
        ("data.fields=gold", "data.fields"),
    ],
)
def test_wrong_types(override, key):
    msg = error_of([override])
    assert key in msg


@pytest.mark.parametrize(
    "override,key",
    [
        ("algorithm.num_generations=1", "algorithm.num_generations"),
        ("repo.rho=1.5", "repo.rho"),
        ("repo.rho=-0.1", "repo.rho"),
        ("repo.delta=-0.1", "repo.delta"),
        ("repo.delta=nan", "repo.delta"),
        ("algorithm.max_completion_length=-4", "algorithm.max_completion_length"),
        ("algorithm.max_completion_length=0", "algorithm.max_completion_length"),
        ("repo.num_replace=8", "repo.num_replace"),  # default num_generations is 8
        ("repo.num_replace=0", "repo.num_replace"),
        ("algorithm.epsilon=1.0", "algorithm.epsilon"),
        ("algorithm.top_p=0", "algorithm.top_p"),
        ("algorithm.beta=-1", "algorithm.beta"),
        ("algorithm.temperature=-0.5", "algorithm.temperature"),
        ("train.learning_rate=0", "train.learning_rate"),
        ("train.learning_rate=nan", "train.learning_rate"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.prompts_per_step=0", "train.prompts_per_step"),
        ("train.seed=-1", "train.seed"),
        ("train.device=tpu", "train.device"),
        ("reward.timeout=0", "reward.timeout"),
        ("data.train_files=[]", "data.train_files"),
        ("eval.n=0", "eval.n"),
    ],
)
def test_out_of_range(override, key):
    msg = error_of([override])
    assert key in msg


def test_num_replace_relative_to_num_generations():
    msg = error_of(["algorithm.num_generations=4", "repo.num_replace=4"])
    assert "repo.num_replace" in msg and "4" in msg
    cfg = build_config(overrides=["algorithm.num_generations=4", "repo.num_replace=3"])
    assert cfg.repo.num_replace == 3


def test_eval_max_items_negative_rejected():
    # A negative cap is used as items[:max_items] by the trainer and silently drops the
    # last items of each eval file; it must be rejected like every other count.
    msg = error_of(["eval.max_items=-3"])
    assert "eval.max_items" in msg


def test_boundaries_accepted():
    cfg = build_config(overrides=["repo.rho=0", "repo.delta=1", "algorithm.num_generations=2", "algorithm.epsilon=0"])
    assert (cfg.repo.rho, cfg.repo.delta, cfg.algorithm.num_generations) == (0.0, 1.0, 2)
    cfg = build_config(overrides=["repo.rho=1", "repo.delta=0", "train.device=cuda:1"])
    assert cfg.repo.rho == 1.0 and cfg.train.device == "cuda:1"


def test_literal_with_suggestion():
    msg = error_of(["algorithm.loss_type=dapoo"])
    assert "algorithm.loss_type" in msg and "'dapo'" in msg and "did you mean" in msg
    msg = error_of(["algorithm.scale_rewards=grop"])
    assert "algorithm.scale_rewards" in msg and "'group'" in msg
    msg = error_of(["logging.report_to=[wandbb]"])
    assert "logging.report_to[0]" in msg and "wandb" in msg


def test_unknown_method():
    msg = error_of(["algorithm.method=grpoo"])
    assert "algorithm.method" in msg and "'grpo'" in msg
    msg = error_of(["algorithm.method=zzzzzz"])
    assert "algorithm.method" in msg and "repo" in msg  # lists the known methods


@pytest.mark.parametrize(
    "template",
    [
        "Question: {question}",  # no {solution}
        "Solution: {solution}",  # no {question}
        "{question} {solution} {hint}",  # unknown placeholder
        "{question} {solution} {",  # unbalanced brace
        "{question} {solution} {0}",  # positional field
    ],
)
def test_invalid_rephrase_template(template):
    msg = error_of(base={"repo": {"rephrase_template": template}})
    assert "repo.rephrase_template" in msg


def test_valid_rephrase_template_with_escaped_braces():
    cfg = build_config(base={"repo": {"rephrase_template": "{question}\n{solution}\n\\boxed{{}}"}})
    assert "{{}}" in cfg.repo.rephrase_template


def test_invalid_strip_pattern():
    msg = error_of(base={"repo": {"strip_patterns": ["ok", "(unclosed"]}})
    assert "repo.strip_patterns[1]" in msg


def test_eval_every_requires_eval_files():
    msg = error_of(["eval.every=5"])
    assert "eval.every" in msg and "data.eval_files" in msg
    cfg = build_config(overrides=["eval.every=5", "data.eval_files=[e.jsonl]"])
    assert cfg.eval.every == 5


def test_reward_weights_length_mismatch():
    msg = error_of(["reward.weights=[1, 2]"])  # default funcs = [math]: 1 function, 2 weights
    assert "reward.weights" in msg
    cfg = build_config(overrides=["reward.funcs=[math, numeric]", "reward.weights=[1, 2]"])
    assert cfg.reward.weights == [1.0, 2.0]


def test_invalid_yaml_file_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    # line 1 "train:", line 2 has a second ':' inside a plain scalar -> invalid on line 2
    p.write_text("train:\n  max_steps: 1: 2\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(p) in msg and "line 2" in msg


def test_missing_and_non_mapping_and_non_utf8_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as ei:
        load_config(lst)
    assert "list.yaml" in str(ei.value) and "mapping" in str(ei.value)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError):
        load_yaml(scalar)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"train:\n  seed: \xff\xfe\n")
    with pytest.raises(ConfigError) as ei:
        load_yaml(binary)
    assert "bin.yaml" in str(ei.value) and "\n" not in str(ei.value)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()
    d = tmp_path / "adir"
    d.mkdir()
    with pytest.raises(ConfigError):
        load_config(d)


def test_wrong_type_in_yaml_file_names_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_steps: abc\n")
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        load_config(p)
    p.write_text("trian:\n  max_steps: 3\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert "trian" in str(ei.value) and "train" in str(ei.value)


def test_unhashable_yaml_value_in_override_is_config_error():
    # '{[]: 1}' is not valid YAML (unhashable key) and parse_override then falls back to
    # ast.literal_eval, which raises TypeError ('unhashable type') -- it must surface as a
    # ConfigError naming the key, like any other bad value. (A string key such as
    # model.name_or_path takes the raw text, so only typed keys are checked here.)
    for ov in ["train.seed={[]: 1}", "train.max_steps={[1]: 2}", "train.seed={{}: 1}"]:
        msg = error_of([ov])
        assert ov.split("=")[0] in msg


# ======================================================================================
# Property tests
# ======================================================================================

NUMERIC = {
    "train.learning_rate": st.floats(min_value=1e-12, max_value=10.0, allow_nan=False, allow_infinity=False).filter(lambda x: x > 0),
    "repo.delta": st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
    "repo.rho": st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
    "algorithm.temperature": st.floats(min_value=0.0, max_value=5.0, allow_nan=False),
    "train.seed": st.integers(min_value=0, max_value=2**40),
    "train.max_steps": st.integers(min_value=1, max_value=10**7),
    "algorithm.num_generations": st.integers(min_value=2, max_value=4096),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_numeric_override_round_trips(data):
    key = data.draw(st.sampled_from(sorted(NUMERIC)))
    value = data.draw(NUMERIC[key])
    cfg = build_config(overrides=[f"{key}={value!r}"])
    section, name = key.split(".")
    got = getattr(getattr(cfg, section), name)
    assert got == value and type(got) is type(value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.text(min_size=0, max_size=30))
def test_garbage_keys_raise_config_error(key):
    head = key.split("=", 1)[0].strip()
    assume(head not in LEAF_KEYS)
    with pytest.raises(ConfigError):
        build_config(overrides=[f"{key}=1"])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.text(max_size=30))
def test_garbage_values_never_crash(value):
    try:
        cfg = build_config(overrides=[f"train.seed={value}"])
    except ConfigError as e:
        assert "\n" not in str(e) and "train.seed" in str(e)
    else:
        assert isinstance(cfg.train.seed, int) and cfg.train.seed >= 0
