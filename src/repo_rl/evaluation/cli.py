"""The ``repo-rl eval`` command: its arguments, their checks, the run and the stdout table.

Every benchmark is read and checked before the model is loaded; the model comes from
:func:`repo_rl.models.loading.load_model_and_tokenizer` and the engine from
:func:`repo_rl.engines.make_generator` (``--backend``), as in training.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from ..config import JudgeConfig
from ..errors import UserError
from .benchmarks import CHOICE_INSTRUCTION, MATH_INSTRUCTION, Benchmark, load_benchmark
from .layouts import FIELD_KEYS, parse_field_args
from .metrics import macro_average
from .runner import evaluate_benchmark, write_results

__all__ = ["BackendChoices", "add_eval_parser", "check_args", "format_table", "load_benchmarks", "output_path", "run_eval_command"]


class BackendChoices:
    """``sorted(repo_rl.engines.GENERATORS)``, read when argparse needs it (a given ``--backend``,
    ``--help``), so building the parser does not import torch and late registrations count."""

    @staticmethod
    def names() -> list[str]:
        from ..engines import GENERATORS  # lazy: the engines import torch

        return sorted(GENERATORS)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return repr(self.names())


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on benchmarks (pass@1, avg@k, pass@k)",
        description="Sample --n completions per item, verify them with the training verifiers and report "
        "pass@1, avg@k and the unbiased pass@k per benchmark. Layouts are detected from field names "
        "(see docs/EVALUATION.md) or set with --field.",
    )
    p.add_argument("--model", "-m", required=True, help="model directory, hub id, or a built-in name (smollm2-135m-instruct, toyworld)")
    p.add_argument("--data", "-d", action="append", required=True, metavar="FILE_OR_NAME",
                   help="benchmark file (.jsonl, .json, .parquet, .csv) or datasets name (NAME or NAME:CONFIG); repeatable")
    p.add_argument("--n", type=int, default=4, help="samples per item (default 4)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature, 0 = greedy (default 0.6)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"completion length limit (default {DEFAULT_MAX_NEW_TOKENS}, or what the model's context leaves "
                        "after the longest prompt when that is less)")
    p.add_argument("--output", "-o", help="results JSON (default runs/eval-<model>-<time>/results.json); "
                   "per-item completions go next to it as <stem>.<benchmark>.jsonl")
    p.add_argument("--limit", type=int, help="evaluate only the first N items of each benchmark")
    p.add_argument("--seed", type=int, default=0, help="sampling and option-shuffling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per generation batch (default 32)")
    p.add_argument("--backend", choices=BackendChoices(), default="hf", metavar="ENGINE",
                   help="generation engine, as generation.backend in training: %(choices)s (default hf)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward passes")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--field", action="append", metavar="KEY=COLUMN",
                   help=f"column mapping, KEY in {', '.join(FIELD_KEYS)} (dots reach nested fields); repeatable")
    p.add_argument("--judge-url", help="--kind judge: the judge server's OpenAI-compatible root, e.g. http://host:8000/v1")
    p.add_argument("--judge-model", help="--kind judge: the model name the judge server serves")
    jd = JudgeConfig()  # the training reward's defaults
    p.add_argument("--judge-api-key-env", default=jd.api_key_env, help="--kind judge: environment variable with the API key")
    p.add_argument("--judge-template-file", help="--kind judge: prompt template file ({question}, {reference}, {answer})")
    p.add_argument("--judge-verdict", choices=("yes_no", "score"), default=jd.verdict, help="--kind judge: how replies are read")
    p.add_argument("--judge-concurrency", type=int, default=jd.concurrency, help="--kind judge: requests in flight (default %(default)s)")
    p.add_argument("--judge-timeout", type=float, default=jd.timeout, help="--kind judge: seconds per request (default %(default)s)")
    p.add_argument("--judge-cache", default=jd.cache, help="--kind judge: verdict cache file ('' : off)")
    p.add_argument("--kind", choices=("auto", "math", "choice", "judge"), default="auto",
                   help="scoring: math (math-verify) or choice (option letter); auto follows the layout")
    p.add_argument("--split", default="test", help="split of a datasets name (default test)")
    p.add_argument("--system-prompt", help="system message for text prompts (with a chat template)")
    p.add_argument("--no-chat-template", action="store_true", help="feed raw text even when the tokenizer has a chat template")
    p.add_argument("--math-instruction", default=MATH_INSTRUCTION, help="appended to math prompts ('' for none)")
    p.add_argument("--choice-instruction", default=CHOICE_INSTRUCTION, help="appended to multiple-choice prompts ('' for none)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--verifier-workers", type=int, default=1, help="math verifier worker processes (default 1)")
    p.add_argument("--verifier-timeout", type=float, default=5.0, help="per-item verifier timeout in seconds (default 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_eval_command)
    return p


def check_args(args: argparse.Namespace) -> None:
    """One-line UserError for the first flag out of range (argparse checks only the types)."""
    backend = getattr(args, "backend", "hf")
    checks = [
        (args.n >= 1, f"--n {args.n}: must be >= 1"),
        (args.temperature >= 0, f"--temperature {args.temperature}: must be >= 0"),
        (0 < args.top_p <= 1, f"--top-p {args.top_p}: must be in (0, 1]"),
        (args.top_k >= 0, f"--top-k {args.top_k}: must be >= 0"),
        (args.max_new_tokens is None or args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens}: must be >= 1"),
        (args.batch_size >= 1, f"--batch-size {args.batch_size}: must be >= 1"),
        (args.limit is None or args.limit >= 1, f"--limit {args.limit}: must be >= 1"),
        (args.threads is None or args.threads >= 1, f"--threads {args.threads}: must be >= 1"),
        (args.verifier_workers >= 1, f"--verifier-workers {args.verifier_workers}: must be >= 1"),
        (0 < args.verifier_timeout < float("inf"), f"--verifier-timeout {args.verifier_timeout}: must be > 0"),
        (backend in BackendChoices(), f"--backend {backend}: unknown engine; expected one of {', '.join(BackendChoices())}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


def output_path(args: argparse.Namespace) -> Path:
    """``--output``, or ``runs/eval-<model>-<time>/results.json``; its folder created and writable."""
    if args.output:
        out = Path(args.output).expanduser()
        if out.is_dir():
            raise UserError(f"--output {args.output}: is a directory; give a file name such as results.json")
    else:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.model.rstrip("/")).name) or "model"
        out = Path("runs") / f"eval-{stem}-{time.strftime('%Y%m%d-%H%M%S')}" / "results.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output {out}: cannot create its folder ({e.strerror or e})") from None
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"--output {out}: folder is not writable")
    return out


def load_benchmarks(args: argparse.Namespace, fields: dict[str, str]) -> list[Benchmark]:
    """Every ``--data`` source, read and checked; a clashing name gets a ``-2`` (``-3``, ...) suffix."""
    benches: list[Benchmark] = []
    names: set[str] = set()
    for src in args.data:
        b = load_benchmark(src, fields=fields, kind=args.kind, split=args.split, seed=int(args.seed), limit=args.limit,
                           math_instruction=args.math_instruction or None, choice_instruction=args.choice_instruction or None)
        base, j = b.name, 2
        while b.name in names:
            b.name, j = f"{base}-{j}", j + 1
        names.add(b.name)
        benches.append(b)
        print(f"data: {src}: {len(b.items)} items, layout {b.layout.describe()}, scored as {b.kind}", file=sys.stderr)
    return benches


DEFAULT_MAX_NEW_TOKENS = 1024


def fit_new_tokens(asked: Optional[int], ctx: Optional[int], prompt_lengths: list[int]) -> int:
    """``--max-new-tokens`` against the model's context (``ctx`` tokens): a value at or past it is a
    one-line error; the default becomes what the context leaves after the longest prompt when that is
    less (with a note); prompts that leave less than an asked value are counted in a note."""
    longest = max(prompt_lengths, default=0)
    if ctx is None:
        return asked or DEFAULT_MAX_NEW_TOKENS
    if longest >= ctx:
        raise UserError(f"the longest prompt is {longest} tokens, which fills the model's {ctx}-token context "
                        "(max_position_embeddings) and leaves no room for an answer; shorten it or use a model with a longer context")
    if asked is not None and asked >= ctx:
        raise UserError(f"--max-new-tokens {asked}: the model's context is {ctx} tokens (max_position_embeddings), which "
                        f"leaves no room for a prompt; expected at most {ctx - 1}, and less than {ctx - longest} to fit "
                        "the longest prompt")
    if asked is None:
        room = ctx - longest
        if room >= DEFAULT_MAX_NEW_TOKENS:
            return DEFAULT_MAX_NEW_TOKENS
        print(f"note: --max-new-tokens {room} (the default {DEFAULT_MAX_NEW_TOKENS} does not fit the model's {ctx}-token "
              f"context after the longest prompt, {longest} tokens)", file=sys.stderr)
        return room
    over = sum(n + asked > ctx for n in prompt_lengths)
    if over:
        print(f"note: {over} items' prompts leave fewer than --max-new-tokens {asked} tokens of the model's {ctx}-token "
              "context; their completions may run past what the model was trained on", file=sys.stderr)
    return asked


def make_judge(args: argparse.Namespace) -> Any:
    """The judge reward of ``--kind judge``, checked against its server."""
    from ..rewards.judge import JudgeReward

    if not args.judge_url or not args.judge_model:
        raise UserError("--kind judge: needs --judge-url and --judge-model (an OpenAI-compatible server, e.g. `vllm serve MODEL`)")
    if args.judge_concurrency < 1 or not 0 < args.judge_timeout < float("inf"):
        raise UserError("--judge-concurrency must be >= 1 and --judge-timeout a number of seconds > 0")
    judge = JudgeReward(args.judge_url, args.judge_model, api_key_env=args.judge_api_key_env or None,
                        template_file=args.judge_template_file, verdict=args.judge_verdict, concurrency=args.judge_concurrency,
                        timeout=args.judge_timeout, cache=args.judge_cache or None)
    judge.check()
    return judge


def run_eval_command(args: argparse.Namespace) -> int:
    """Run ``repo-rl eval``: load every benchmark, then the model, evaluate, write JSON and print a table."""
    t_start = time.perf_counter()
    check_args(args)
    fields = parse_field_args(args.field)
    seed = int(args.seed)
    backend = getattr(args, "backend", "hf")
    benches = load_benchmarks(args, fields)  # data first: a bad file fails before a model is loaded
    judge = make_judge(args) if args.kind == "judge" else None  # a judge that is down fails before the model loads too
    out = output_path(args)

    import torch

    from .. import __version__
    from ..config import ModelConfig
    from ..models.loading import eos_token_ids, load_model_and_tokenizer
    from ..step.prompts import PromptRenderer
    from ..rewards import choice_reward, make_math_reward
    from ..engines import SamplingParams, make_generator

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(seed)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    mcfg = ModelConfig(
        name_or_path=args.model,
        chat_template="never" if args.no_chat_template else "auto",
        system_prompt=args.system_prompt,
    )
    try:
        model, tokenizer, model_path = load_model_and_tokenizer(mcfg, device=device)
    except UserError as e:
        raise UserError(str(e).replace("model.name_or_path=", "--model ", 1)) from None
    model.eval()
    ctx = getattr(model.config, "max_position_embeddings", None)
    renderer = PromptRenderer(tokenizer, mcfg.chat_template, mcfg.system_prompt)
    args.max_new_tokens = fit_new_tokens(args.max_new_tokens, ctx if isinstance(ctx, int) and ctx > 0 else None,
                                         [len(renderer.ids(it.prompt)) for b in benches for it in b.items])
    eos = eos_token_ids(model, tokenizer)
    options = {"autocast_dtype": torch.bfloat16} if args.bf16 else {}
    generator = make_generator(model, eos, tokenizer.pad_token_id, backend=backend, **options)
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    if args.temperature == 0 and args.n > 1:
        print(f"note: --temperature 0 is greedy decoding; the {args.n} samples of an item are identical", file=sys.stderr)
    math_reward = make_math_reward(timeout=args.verifier_timeout, num_workers=args.verifier_workers)
    rewards = {"math": math_reward, "choice": choice_reward, "judge": judge}

    report: dict[str, Any] = {
        "repo_rl_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": args.model,
        "model_path": str(model_path),
        "settings": {
            "n": args.n, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "max_new_tokens": args.max_new_tokens, "seed": seed, "batch_size": args.batch_size, "bf16": bool(args.bf16),
            "backend": backend, "device": device, "kind": args.kind, "limit": args.limit, "split": args.split, "fields": fields,
            "chat_template": renderer.use_chat, "system_prompt": args.system_prompt,
            "math_instruction": args.math_instruction or None, "choice_instruction": args.choice_instruction or None,
            "verifier_timeout": args.verifier_timeout,
        },
        "benchmarks": {},
    }
    try:
        for b in benches:
            comp_file = out.with_name(f"{out.stem}.{b.name}.jsonl")
            report["benchmarks"][b.name] = evaluate_benchmark(
                b, n=args.n, generator=generator, renderer=renderer, tokenizer=tokenizer, params=params,
                rewards=rewards, eos=eos, seed=seed, batch_size=args.batch_size, completions_file=comp_file,
                progress=not args.no_progress,
            )
            report["wall_time_s"] = time.perf_counter() - t_start
            write_results(out, report)  # partial results survive a crash
    finally:
        math_reward.close()
        close = getattr(generator, "close", None)  # an engine with its own process (vllm)
        if callable(close):
            close()
    if len(benches) > 1:
        report["average"] = macro_average(report["benchmarks"])
    report["wall_time_s"] = time.perf_counter() - t_start
    write_results(out, report)
    print(format_table(report["benchmarks"]))
    print(f"results: {out}", file=sys.stderr)
    return 0


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The stdout table: one row per benchmark (and the macro average when there are several)."""
    ns = sorted({r["n"] for r in results.values()})
    kcol = f"@{ns[0]}" if len(ns) == 1 else "@k"
    head = ["benchmark", "kind", "items", "n", "pass@1", f"avg{kcol}", f"pass{kcol}", "errors", "timeouts", "time"]
    rows = [
        [name, r["kind"], str(r["items"]), str(r["n"]), f"{r['pass@1']:.4f}", f"{r['avg@k']:.4f}", f"{r['pass@k']:.4f}",
         str(r["verifier_errors"]), str(r["verifier_timeouts"]), f"{r['wall_time_s']:.1f}s"]
        for name, r in results.items()
    ]
    if len(results) > 1:
        avg = macro_average(results)
        rows.append(["average", "", str(sum(r["items"] for r in results.values())), "", f"{avg['pass@1']:.4f}",
                     f"{avg['avg@k']:.4f}", f"{avg['pass@k']:.4f}", "", "", ""])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])
