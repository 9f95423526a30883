"""Range and combination checks of a built :class:`~repo_rl.config.Config` (which this module does
not import: the schema imports the checks, not the other way round)."""

from __future__ import annotations

import difflib
from typing import Any

from ..errors import ConfigError, UserError


MMAP_MAX_KB = 32 * 1024
"""Largest ``train.mmap_threshold_kb``: glibc refuses larger thresholds (HEAP_MAX_SIZE / 2 on 64-bit)."""

ANSWER_CHECKS = ("reward", "strict")
"""``repo.verify`` checks that score the answer; the list must hold one (the injected row's reward is its score)."""
BUILTIN_CHECKS = ("reward", "strict", "steps", "judge", "row")
"""``repo.verify``'s built-in checks (:mod:`repo_rl.step.verify`); anything else is a ``pkg.mod:fn``."""


def check_label(spec: str) -> str:
    """The metric name of a ``repo.verify`` check (``repo/verify/<label>``): the built-in name, or the
    function's name."""
    return spec if spec in BUILTIN_CHECKS else spec.replace(":", ".").rsplit(".", 1)[-1]


def check(cond: bool, key: str, expected: str, value: Any) -> None:
    """A :class:`ConfigError` ``"<key>: expected <expected>, got <value>"`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def check_template(template: str, key: str) -> None:
    """``template`` is a format string with ``{question}`` and ``{solution}`` and no other field."""
    for name in ("{question}", "{solution}"):
        check(name in template, key, f"a format string containing {name}", template[:40] + "...")
    try:
        template.format(question="q", solution="s")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"{key}: expected a format string with only {{question}} and {{solution}} "
            f"(escape literal braces as {{{{ }}}}), failed with {e!r}"
        ) from None


def validate(cfg: Any) -> None:
    """Check ranges and combinations. Raises ConfigError naming the key."""
    from ..algorithms.methods import METHODS  # local import: registry depends on nothing here

    a, r, t = cfg.algorithm, cfg.repo, cfg.train
    if a.method not in METHODS:
        close = difflib.get_close_matches(a.method, list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"algorithm.method: unknown method {a.method!r}{hint}; expected one of {', '.join(METHODS)}"
        )

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
    check_template(r.rephrase_template, "repo.rephrase_template")
    _check_verify(cfg)
    if cfg.baselines.sdft_template is not None:
        check_template(cfg.baselines.sdft_template, "baselines.sdft_template")
    if cfg.baselines.sdft_mode == "full_logits" and METHODS[a.method].teacher and t.logprob_chunk_size:
        raise ConfigError("baselines.sdft_mode=full_logits needs whole logits, which train.logprob_chunk_size avoids; "
                          "use baselines.sdft_mode=sampled_token or leave train.logprob_chunk_size unset")
    if cfg.baselines.sdft_is_clip is not None:
        check(cfg.baselines.sdft_is_clip > 0, "baselines.sdft_is_clip", "a number > 0 or null", cfg.baselines.sdft_is_clip)
    import re

    for i, pat in enumerate(r.strip_patterns):
        try:
            re.compile(pat)
        except re.error as e:
            raise ConfigError(f"repo.strip_patterns[{i}]: invalid regular expression ({e})") from None

    check(cfg.baselines.luffy_gamma > 0, "baselines.luffy_gamma", "a number > 0", cfg.baselines.luffy_gamma)
    if cfg.baselines.sft_steps is not None:
        check(0 <= cfg.baselines.sft_steps <= t.max_steps, "baselines.sft_steps", f"an integer in [0, train.max_steps={t.max_steps}]", cfg.baselines.sft_steps)
    from ..engines import GENERATORS

    g = cfg.generation
    check(g.vllm_kv_cache_gb > 0, "generation.vllm_kv_cache_gb", "a number > 0", g.vllm_kv_cache_gb)
    check(0 < g.vllm_gpu_memory_utilization <= 1, "generation.vllm_gpu_memory_utilization", "a number in (0, 1]", g.vllm_gpu_memory_utilization)
    check(g.vllm_tensor_parallel_size >= 1, "generation.vllm_tensor_parallel_size", "an integer >= 1", g.vllm_tensor_parallel_size)
    check(g.vllm_max_model_len is None or g.vllm_max_model_len >= 2, "generation.vllm_max_model_len", "null or an integer >= 2", g.vllm_max_model_len)
    if g.backend == "vllm" and g.vllm_mode == "server":
        raise ConfigError("generation.vllm_mode=server: not supported yet; use colocate (the engine runs beside the trainer)")
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
    _check_routing_and_judge(cfg)

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
    check(cfg.logging.logging_steps >= 0, "logging.logging_steps", "an integer >= 0", cfg.logging.logging_steps)
    check(t.max_bad_steps >= 1, "train.max_bad_steps", "an integer >= 1", t.max_bad_steps)
    check(t.max_weight_growth is None or t.max_weight_growth > 1, "train.max_weight_growth", "null or a number > 1", t.max_weight_growth)
    check(0 <= t.mmap_threshold_kb <= MMAP_MAX_KB, "train.mmap_threshold_kb", f"an integer in [0, {MMAP_MAX_KB}]", t.mmap_threshold_kb)
    check(0 <= t.seed < 2**63, "train.seed", "an integer in [0, 2**63)", t.seed)
    if cfg.data.max_prompt_length is not None:
        check(cfg.data.max_prompt_length >= 1, "data.max_prompt_length", "a positive integer or null", cfg.data.max_prompt_length)
    if t.threads is not None:
        check(t.threads >= 1, "train.threads", "an integer >= 1", t.threads)
    check(t.max_staleness in (0, 1), "train.max_staleness",
          "0 (sample, then train) or 1 (sample the next batch while this one trains); more lag is not supported", t.max_staleness)
    if not METHODS[a.method].rollouts and not METHODS[a.method].phases and t.max_staleness:
        raise ConfigError(f"train.max_staleness={t.max_staleness}: method {a.method} samples no rollouts, so there is no "
                          "generation to overlap; set it to 0")
    if t.max_staleness and cfg.generation.backend == "vllm" and cfg.generation.vllm_in_process:
        raise ConfigError(f"train.max_staleness={t.max_staleness} with generation.vllm_in_process: an engine inside the training "
                          "process cannot sample beside the update; set generation.vllm_in_process=false (the engine in its own process)")
    for key in ("vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min"):
        v = getattr(a, key)
        check(v is None or v > 0, f"algorithm.{key}", "a number > 0 or null", v)
    if a.vllm_importance_sampling_clip_max is not None and a.vllm_importance_sampling_clip_min is not None:
        check(a.vllm_importance_sampling_clip_min <= a.vllm_importance_sampling_clip_max, "algorithm.vllm_importance_sampling_clip_min",
              f"at most vllm_importance_sampling_clip_max ({a.vllm_importance_sampling_clip_max})", a.vllm_importance_sampling_clip_min)
    check(t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"), "train.device", "auto, cpu, cuda or cuda:N", t.device)
    check(cfg.eval.every >= 0, "eval.every", "an integer >= 0", cfg.eval.every)
    check(cfg.eval.n >= 1, "eval.n", "an integer >= 1", cfg.eval.n)
    if cfg.eval.max_items is not None:
        check(cfg.eval.max_items >= 1, "eval.max_items", "an integer >= 1 or null", cfg.eval.max_items)
    if cfg.eval.every > 0 and not cfg.data.eval_files:
        raise ConfigError("eval.every: periodic evaluation needs data.eval_files")
    if isinstance(cfg.data.train_files, list) and not cfg.data.train_files:
        raise ConfigError("data.train_files: expected at least one file")


def check_launch(cfg: Any, world: int) -> None:
    """What the config asks of a launch with ``world`` processes."""
    if cfg.train.prompts_per_step % world:
        raise UserError(
            f"train.prompts_per_step={cfg.train.prompts_per_step}: expected a multiple of the {world} processes "
            "(each process takes whole groups)"
        )
    tp = cfg.generation.vllm_tensor_parallel_size
    if cfg.generation.backend == "vllm" and world > 1 and tp > 1:
        raise UserError(
            f"generation.vllm_tensor_parallel_size={tp} with {world} processes: not supported; each process runs its own "
            "engine with the whole model (keep it 1), or launch one process for one tensor-parallel engine"
        )


def _check_verify(cfg: Any) -> None:
    r = cfg.repo
    check(bool(r.verify), "repo.verify", "at least one check (reward, strict, steps, judge, row or pkg.mod:fn)", r.verify)
    for spec in r.verify:
        if spec not in BUILTIN_CHECKS and ":" not in spec and "." not in spec:
            close = difflib.get_close_matches(spec, list(BUILTIN_CHECKS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"repo.verify: unknown check {spec!r}{hint}; expected {', '.join(BUILTIN_CHECKS)} or pkg.mod:fn")
    check(len(set(r.verify)) == len(r.verify), "repo.verify", "each check once", r.verify)
    labels = [check_label(c) for c in r.verify]
    check(len(set(labels)) == len(labels), "repo.verify",
          "checks with different names (a custom check's metric is repo/verify/<function name>)", r.verify)
    check(any(c in ANSWER_CHECKS for c in r.verify), "repo.verify",
          "reward or strict among the checks (the injected rephrase's reward is that check's score)", r.verify)
    check(0 < r.steps_min <= 1, "repo.steps_min", "a number in (0, 1]", r.steps_min)
    check(0 <= r.steps_precision <= 1, "repo.steps_precision", "a number in [0, 1]", r.steps_precision)
    check(r.fewshot >= 0, "repo.fewshot", "an integer >= 0 (0: off)", r.fewshot)
    check(r.bank_size >= r.fewshot, "repo.bank_size", f"an integer >= repo.fewshot ({r.fewshot})", r.bank_size)
    check(r.bank_warmup >= 0, "repo.bank_warmup", "an integer >= 0 (0: no warm-up)", r.bank_warmup)
    check(r.uptake_after >= 0, "repo.uptake_after", "an integer >= 0 (0: off)", r.uptake_after)
    check(bool(r.row_check_column.strip()), "repo.row_check_column", "a column name", r.row_check_column)
    if "judge" in r.verify:
        _check_judge(r.judge, "repo.judge")


def _check_judge(j: Any, key: str) -> None:
    check(bool(j.model.strip()), f"{key}.model", "the model name the judge server serves", j.model)
    check(j.base_url.startswith(("http://", "https://")), f"{key}.base_url", "an http:// or https:// URL", j.base_url)
    check(j.concurrency >= 1, f"{key}.concurrency", "an integer >= 1", j.concurrency)
    check(0 < j.timeout < float("inf"), f"{key}.timeout", "a finite number of seconds > 0", j.timeout)
    check(j.retries >= 0, f"{key}.retries", "an integer >= 0", j.retries)
    check(j.backoff >= 0, f"{key}.backoff", "a number of seconds >= 0", j.backoff)
    check(j.max_tokens >= 1, f"{key}.max_tokens", "an integer >= 1", j.max_tokens)
    check(j.max_score > 0, f"{key}.max_score", "a number > 0", j.max_score)
    check(j.max_answer_chars >= 1, f"{key}.max_answer_chars", "an integer >= 1", j.max_answer_chars)


def _check_routing_and_judge(cfg: Any) -> None:
    rw = cfg.reward
    if rw.by_domain is not None:
        check(len(rw.by_domain) >= 1, "reward.by_domain", "a mapping of at least one domain to reward.funcs entries, or null", rw.by_domain)
        names = set(rw.funcs)
        for domain, funcs in rw.by_domain.items():
            unknown = [f for f in funcs if f not in names]
            check(bool(funcs) and not unknown, f"reward.by_domain.{domain}",
                  f"a non-empty list of reward.funcs entries ({', '.join(rw.funcs)})", funcs)
        used = {f for funcs in rw.by_domain.values() for f in funcs}
        unused = [f for f in rw.funcs if f not in used]
        check(not unused, "reward.funcs", "only functions some reward.by_domain entry routes to", unused)
    if "judge" in rw.funcs:
        _check_judge(rw.judge, "reward.judge")
