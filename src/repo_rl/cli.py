"""The ``repo-rl`` command line tool.

RePO here is Rephrasing Policy Optimization (arXiv 2602.10819), not Replay-Enhanced
Policy Optimization (arXiv 2506.09340).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .config import default_config_path

EXIT_USAGE = 2

DESCRIPTION = (
    "RL fine-tuning of causal LMs with verifiable rewards: RePO (Rephrasing Policy Optimization, "
    "arXiv 2602.10819 - not Replay-Enhanced Policy Optimization, arXiv 2506.09340), GRPO and baselines."
)


class _Parser(argparse.ArgumentParser):
    """One-line errors. ``intermixed=True`` (subcommands with ``key.sub=value`` overrides): the
    overrides may come before, between and after the flags (``train a.b=1 -o DIR c.d=2``);
    plain argparse stops collecting a ``nargs="*"`` positional at the first flag."""

    def __init__(self, *args, intermixed: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._intermixed = intermixed
        self._in_intermixed = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        # A subcommand's parser is reached through parse_known_args; parse_known_intermixed_args
        # calls parse_known_args again itself (Python < 3.13), hence the guard.
        if not self._intermixed or self._in_intermixed:
            return super().parse_known_args(args, namespace)
        self._in_intermixed = True
        try:
            namespace, extras = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._in_intermixed = False
        if extras:  # report here, naming this subcommand's --help
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def format_help(self) -> str:
        # Help text computed only when shown (e.g. --methods lists the method registry, whose
        # import pulls in torch): an action's ``lazy_help`` callable replaces its help.
        for action in self._actions:
            lazy = getattr(action, "lazy_help", None)
            if callable(lazy):
                action.help = lazy()
        return super().format_help()

    def error(self, message: str) -> None:  # one line, exit 2, like every other usage error
        self.exit(EXIT_USAGE, f"repo-rl: error: {message} (see {self.prog} --help)\n")


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _info(msg: str) -> None:
    """Progress messages go to stderr, once per run (rank 0 of a multi-process launch)."""
    if _is_main_process():
        print(msg, file=sys.stderr)


def _fail(msg: str) -> int:
    print(f"repo-rl: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _quiet_library_bars() -> None:
    """Without a terminal, the libraries' own progress bars (loading, saving) would fill log files
    with carriage returns: turn them off."""
    if sys.stderr.isatty():
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging

        disable_progress_bars()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config

    _quiet_library_bars()

    if args.resume and not args.output_dir:
        return _fail("--resume needs --output-dir DIR (the run to continue)")
    if args.resume:
        from .run.directory import load_resume_config

        out = Path(args.output_dir)
        cfg = load_resume_config(out, args.config, args.overrides, args.allow_config_change)
    else:
        cfg_path = args.config or default_config_path()
        if not args.config and _own_data(args.overrides):
            # The toy world's settings (reward toy, its learning rate, toy evaluation) would leak
            # into a run on the user's model or data: start from the general defaults instead.
            cfg_path = None
            _info("no --config: general defaults (repo-rl config --keys) with your overrides; the toy world's settings "
                  "apply only to the toy world")
        cfg = load_config(cfg_path, args.overrides)
        if args.output_dir:
            out = Path(args.output_dir)
        else:
            stem = Path(cfg_path).stem if args.config else ("toy" if cfg_path else "run")
            out = Path("runs") / f"{stem}-{cfg.algorithm.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    from .trainer import Trainer

    _info(f"repo-rl {__version__}: {cfg.algorithm.method} on {cfg.model.name_or_path}, output in {out}")
    existed = out.exists()
    try:
        trainer = Trainer(cfg, out, resume=args.resume, allow_config_change=args.allow_config_change)
    except BaseException:
        _remove_if_empty_run(out, existed)
        raise
    for rep in trainer.load_reports:
        msg = f"data: {rep.source}: {rep.loaded} rows"
        if rep.bad:
            msg += f", {rep.bad} bad rows skipped (first: {rep.first_errors[0]})"
        if rep.without_solution:
            msg += f", {rep.without_solution} without an expert solution (never rephrased)"
        _info(msg)
    if trainer.unfit_rephrase_rows:
        _info(f"data: {trainer.unfit_rephrase_rows} rows whose rephrase prompt does not fit the model's context are never "
              "rephrased (data.on_bad_row=skip)")
    if trainer.step:
        _info(f"resuming from step {trainer.step}")
    before = None
    if _toy_run(cfg) and not args.no_eval and _is_main_process():
        before = _toy_eval(trainer, cfg)
    summary = trainer.train()
    tables, notes = {}, []
    if before is not None:
        after = _toy_eval(trainer, cfg)
        _print_before_after(before, after)
        tables["Accuracy before and after training"] = (before, after)
        n = cfg.eval.max_items or 200
        note = f"The table is greedy decoding on {n} items per split."
        if cfg.data.eval_files and cfg.eval.every:
            note += (f" The in-training curves (`eval/<split>/avg@{cfg.eval.n}`) sample {cfg.eval.n} completion(s) per item at "
                     f"eval.temperature={cfg.eval.temperature} on the first {cfg.eval.max_items or 'all'} items of "
                     "data.eval_files, so the two can differ.")
        notes.append(note)
    if _is_main_process():
        from .report import write_report

        write_report(out, extra_tables=tables, notes=notes)
        print(f"report: {out / 'report.md'}", file=sys.stderr)
    last = summary.get("last") or {}
    if last:
        _info(f"done: {summary['steps']} steps, reward {last.get('reward', float('nan')):.3f}, checkpoint {out / 'checkpoints'}")
    if trainer.dist.world > 1:
        trainer.scorer.close()  # exit_process skips the atexit handlers that would stop its workers
        trainer.dist.exit_process()
    return 0


def _own_data(overrides: Sequence[str]) -> bool:
    """Overrides that name training data other than the toy world's (another model alone still
    trains on the toy world, with its settings)."""
    from .config.parse import parse_override
    from .errors import ConfigError

    for item in overrides:
        try:
            keys, value = parse_override(item)
        except ConfigError:
            continue  # load_config names the bad override
        if keys == ["data", "train_files"]:
            values = value if isinstance(value, list) else [value]
            if any(not str(v).startswith("toyworld:") for v in values):
                return True
    return False


def _toy_run(cfg) -> bool:
    """The toy world's model on the toy world's data: only then is its easy / hard / general table
    about the run (another model, or your own data, gets no such table)."""
    files = cfg.data.train_files if isinstance(cfg.data.train_files, list) else [cfg.data.train_files]
    return cfg.model.name_or_path == "toyworld" and all(str(f).startswith("toyworld:") for f in files)


def _remove_if_empty_run(out: Path, existed: bool) -> None:
    """A start that failed leaves no directory behind that it created and wrote no run into."""
    if existed or not out.is_dir() or not _is_main_process():
        return
    if (out / "checkpoints").exists() or (out / "metrics.jsonl").exists():
        return
    import shutil

    shutil.rmtree(out, ignore_errors=True)


def _toy_eval(trainer, cfg) -> dict[str, float]:
    from . import toyworld

    n = cfg.eval.max_items or 200  # items per split of the before/after table
    return toyworld.evaluate_splits(trainer.core, trainer.tokenizer, cfg.toyworld.world_config(), n=n)


def _print_before_after(before: dict[str, float], after: dict[str, float]) -> None:
    keys = [k for k in before if k in after]
    w = max(len(k) for k in keys) if keys else 6
    print(f"\n{'split':<{w}}  before  after", file=sys.stderr)
    for k in keys:
        print(f"{k:<{w}}  {before[k]:6.3f}  {after[k]:5.3f}", file=sys.stderr)


def _cmd_methods(args: argparse.Namespace) -> int:
    from .algorithms import METHODS

    for name, spec in METHODS.items():
        print(f"{name:<14} {spec.summary}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from .config import field_docs, load_config

    if args.keys:
        for key, tp, default, doc in field_docs():
            print(f"{key} ({tp}, default {default}): {doc}")
        return 0
    cfg = load_config(args.config or default_config_path(), args.overrides)
    sys.stdout.write(cfg.to_yaml())
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import main_compare

    _quiet_library_bars()  # no "Loading weights" bars in a log file

    return main_compare(args)


def _cmd_audit(args: argparse.Namespace) -> int:
    from .audit import run_audit, table
    from .config import load_config

    _quiet_library_bars()
    if args.rows < 1 or args.samples < 1 or args.batch < 1:
        return _fail("-n, --samples and --batch must be >= 1")
    cfg_path = args.config or (None if _own_data(args.overrides) else default_config_path())
    cfg = load_config(cfg_path, args.overrides)
    stem = Path(args.config).stem if args.config else "toy"
    out = Path(args.output_dir) if args.output_dir else Path("runs") / f"audit-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    s = run_audit(cfg, out, args.rows, args.samples, args.batch)
    if s is None:
        return _fail("no training row has an expert solution (data.fields.solution), so there is nothing to rephrase")
    print(table(s))
    print(f"wrote {out / 'audit.md'}, {out / 'audit.json'} and {out / 'rephrases.jsonl'} ({s['wall_s']:.0f} s)", file=sys.stderr)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import tempfile

    from .config import load_config
    from .errors import UserError
    from .run.distributed import DeepSpeedSettings, FsdpSettings
    from .run.plan import Launch, device_memory_gb, estimate, format_plan, model_shape, prompt_length, refusal

    cfg_path = args.config or (None if _own_data(args.overrides) else default_config_path())
    cfg = load_config(cfg_path, args.overrides)
    sharding = args.sharding
    if sharding is None:  # the accelerate launch's settings, read from its environment
        fsdp, ds = FsdpSettings.from_env(os.environ), DeepSpeedSettings.from_env(os.environ)
        sharding = "fsdp" if fsdp is not None else (f"zero{ds.stage}" if ds is not None else "ddp")
    processes = args.processes if args.processes is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if processes < 1:
        return _fail(f"--processes {processes}: expected an integer >= 1")
    if args.device_memory_gb is not None and args.device_memory_gb <= 0:
        return _fail(f"--device-memory-gb {args.device_memory_gb}: expected a number > 0")
    if cfg.train.prompts_per_step % processes:
        return _fail(f"train.prompts_per_step={cfg.train.prompts_per_step}: expected a multiple of --processes {processes}")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    available = args.device_memory_gb if args.device_memory_gb else device_memory_gb(device)
    if device == "cpu" and not args.device_memory_gb and available:
        available /= processes  # the processes of a CPU launch share this machine's RAM
    launch = Launch(processes, sharding, device, available)
    with tempfile.TemporaryDirectory() as tmp:
        est = estimate(cfg, model_shape(cfg), launch, prompt_length(cfg, Path(tmp)))
    print(format_plan(cfg, est, launch, available))
    why = refusal(est, available) if available else None
    if why:
        raise UserError(why)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    run = Path(args.run_dir)
    if not (run / "metrics.jsonl").is_file():
        return _fail(f"{run}: no metrics.jsonl (not a training run directory)")
    path = write_report(run)
    print(path)
    return 0


COMPARE_METHODS = "repo,grpo,luffy,sft,sft_then_grpo,hpt_switch,raw_expert"


def _methods_help() -> str:
    from .algorithms import METHODS

    return (f"comma-separated training methods to compare, any of: {', '.join(METHODS)} "
            f"(`repo-rl methods` describes them; default: {COMPARE_METHODS})")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="repo-rl", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"repo-rl {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    t = sub.add_parser(
        "train", intermixed=True,
        help="train with GRPO, RePO or a baseline",
        description="Train from a YAML config with dotted overrides (key.sub=value). With no --config, "
        "runs the embedded toy world.",
    )
    t.add_argument("--config", "-c", help="YAML config file (default: the embedded toy world)")
    t.add_argument("--output-dir", "-o", help="directory for config.yaml, metrics, completions and checkpoints")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir from its latest checkpoint, with its config.yaml as the base config "
                        "(--config and overrides on top)")
    t.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept changes to keys that define the run (model, method, group size, data, seed)")
    t.add_argument("--no-eval", action="store_true", help="skip the before/after accuracy table of the toy world")
    t.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (before, between or after the flags)")
    t.set_defaults(func=_cmd_train)

    m = sub.add_parser("methods", help="list the training methods")
    m.set_defaults(func=_cmd_methods)

    c = sub.add_parser("config", help="print the resolved config, or every key with --keys", intermixed=True)
    c.add_argument("--config", "-c")
    c.add_argument("--keys", action="store_true", help="list every config key with its type, default and meaning")
    c.add_argument("overrides", nargs="*", metavar="key.sub=value")
    c.set_defaults(func=_cmd_config)

    from .evaluation import add_eval_parser

    add_eval_parser(sub)

    a = sub.add_parser(
        "audit-rephrases", intermixed=True,
        help="sample rephrases of training rows with a run's settings and measure what would be injected",
        description="Sample rephrases for N training rows with the config's template, engine, bank and repo.verify, "
        "and write a table and a file of examples (verified and faithful rates, how each passed, copy rate, "
        "log-prob per token under P(q,k) and q).",
    )
    a.add_argument("--config", "-c", help="YAML config file (default: the embedded toy world)")
    a.add_argument("-n", "--rows", type=int, default=64, help="training rows to rephrase (default 64)")
    a.add_argument("--samples", type=int, default=4, help="rephrases per row (default 4)")
    a.add_argument("--batch", type=int, default=8, help="rows per generation call; the bank grows between calls (default 8)")
    a.add_argument("--output-dir", "-o", help="where to write audit.md, audit.json and rephrases.jsonl "
                   "(default runs/audit-<config>-<time>)")
    a.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    a.set_defaults(func=_cmd_audit)

    pl = sub.add_parser(
        "plan", intermixed=True,
        help="memory and tokens per rank for a config and a launch, before the run; refuses what cannot fit",
        description="Estimate parameters, gradients, optimizer state, activations, logits, the engine's KV cache and "
        "the tokens of a step per rank, from the config and the model's config.json (no weights are loaded).",
    )
    pl.add_argument("--config", "-c", help="YAML config file (default: the embedded toy world)")
    pl.add_argument("--processes", type=int, default=None, help="processes (ranks); default: the launch's WORLD_SIZE, else 1")
    pl.add_argument("--sharding", choices=["ddp", "fsdp", "zero2", "zero3"], default=None,
                    help="how the ranks share the training state (default: the accelerate launch's, else ddp)")
    pl.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when one is visible, else cpu")
    pl.add_argument("--device-memory-gb", type=float, default=None,
                    help="memory of one device (default: the visible GPU's, or this machine's RAM over the processes)")
    pl.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    pl.set_defaults(func=_cmd_plan)

    cp = sub.add_parser(
        "compare", intermixed=True,
        help="train several methods on the toy world with the same budget and seeds, then tabulate and plot",
    )
    methods = cp.add_argument("--methods", default=COMPARE_METHODS, metavar="NAME,NAME,...")
    methods.lazy_help = _methods_help  # type: ignore[attr-defined]
    cp.add_argument("--seeds", type=int, default=3, help="number of seeds per method")
    cp.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed+seeds-1 (split a comparison over processes)")
    cp.add_argument("--config", "-c", help="base config (default: the embedded toy world)")
    cp.add_argument("--output-dir", "-o", default="runs/compare")
    cp.add_argument("--eval-n", type=int, default=None, help="items per split in the before/after evaluation")
    cp.add_argument("--no-progress", action="store_true")
    cp.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides applied to every run")
    cp.set_defaults(func=_cmd_compare)

    r = sub.add_parser("report", help="write report.md with plots for a run directory")
    r.add_argument("run_dir")
    r.set_defaults(func=_cmd_report)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .config import ConfigError
    from .errors import TrainingError, UserError

    # OpenMP threads that spin while waiting steal a shared core from other work; set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .run.health import quiet_deepspeed_probe

    quiet_deepspeed_probe()
    from .run.directory import StopRequested

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UserError) as e:
        return _fail(str(e))
    except TrainingError as e:
        print(f"repo-rl: training stopped: {e}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        text = str(e)
        if not isinstance(e, MemoryError) and "out of memory" not in text and "can't allocate memory" not in text:
            raise
        print(
            "repo-rl: error: out of memory"
            f"{' (' + text.splitlines()[0][:160] + ')' if text else ''}; lower train.micro_batch_size, "
            "algorithm.num_generations, train.prompts_per_step or algorithm.max_completion_length, set "
            "train.logprob_chunk_size, or turn on train.gradient_checkpointing; completed checkpoints are intact (--resume)",
            file=sys.stderr,
        )
        return 1
    except StopRequested as e:
        import signal

        saved = f"checkpoint of step {e.step} saved; " if e.step else ""
        print(f"repo-rl: {e}; {saved}resume with --resume", file=sys.stderr)
        return 128 + int(e.signum) if e.signum in (signal.SIGINT, signal.SIGTERM) else 1
    except KeyboardInterrupt:
        print("repo-rl: interrupted; resume with --resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # disk full, I/O error, permissions while writing the run
        where = f" on {e.filename}" if e.filename else ""
        print(
            f"repo-rl: error: I/O error{where}: {e.strerror or e}; completed checkpoints are intact, "
            "fix the cause (e.g. free disk space) and continue with --resume",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
