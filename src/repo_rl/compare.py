"""``repo-rl compare``: every method on the same world, budget and seeds, side by side.

Each (method, seed) run is an ordinary training run in ``OUT/runs/<method>-seed<k>/`` with the
same number of policy updates and rollouts per step. Finished runs are skipped and unfinished
ones resumed, so an interrupted comparison continues where it stopped (a torn ``result.json``
counts as unfinished, with a notice on stderr). The results go to
``OUT/results.json`` and ``OUT/report.md`` (table and curves).
"""

from __future__ import annotations

import json
import time
import math
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .config import Config, load_config
from .errors import UserError
from .run.tracking import read_jsonl

CURVES = [
    ("eval/hard/avg@1", "hard accuracy (held out)"),
    ("reward/domain/easy", "easy-prompt rollout reward"),
    ("clip_ratio", "clip ratio"),
    ("entropy", "entropy"),
    ("grad_norm", "gradient norm"),
    ("repo/gate_rate", "gate rate"),
]


def _evaluate(trainer: Any, cfg: Config, n: Optional[int]) -> dict[str, float]:
    from . import toyworld

    kwargs = {} if n is None else {"n": n}
    return toyworld.evaluate_splits(trainer.core, trainer.tokenizer, cfg.toyworld.world_config(), **kwargs)


def _write_json(path: Path, data: Any, indent: Optional[int] = None) -> None:
    """Write atomically (temporary file, then rename): a kill leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=indent), encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path, valid: Callable[[Any], bool], then: str) -> Optional[Any]:
    """The JSON in ``path``, or None when it is missing, or torn or malformed (an interrupted run
    of an older version, a full disk): then one line on stderr saying what happens (``then``)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if valid(data):
            return data
        problem = "not the expected JSON object"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"repo-rl: compare: {path}: unreadable ({problem}), left by an interrupted run; {then}", file=sys.stderr)
    return None


def _valid_result(method: str, seed: int) -> Callable[[Any], bool]:
    def valid(r: Any) -> bool:
        return (isinstance(r, dict) and r.get("method") == method and r.get("seed") == seed
                and isinstance(r.get("before"), dict) and isinstance(r.get("after"), dict))
    return valid


def _valid_splits(d: Any) -> bool:
    return isinstance(d, dict) and all(isinstance(v, (int, float)) for v in d.values())


def run_one(config_path: Path, overrides: list[str], method: str, seed: int, run_dir: Path, eval_n: Optional[int]) -> dict[str, Any]:
    """Train one (method, seed) and evaluate the toy splits before and after. Resumable; a torn
    ``result.json`` or ``before.json`` (an interrupted write) counts as an unfinished run."""
    from .run.checkpoint import latest_checkpoint
    from .trainer import Trainer

    done = run_dir / "result.json"
    result = _read_json(done, _valid_result(method, seed), f"finishing {method} seed {seed} again")
    if result is not None:
        return result
    cfg = load_config(config_path, [*overrides, f"algorithm.method={method}", f"train.seed={seed}"])
    if cfg.model.name_or_path != "toyworld":
        raise UserError("compare: model.name_or_path must be toyworld (the comparison scores the toy-world splits)")
    before_file = run_dir / "before.json"
    resume = latest_checkpoint(run_dir / "checkpoints") is not None
    before = None
    if before_file.exists() or resume:
        before = _read_json(before_file, _valid_splits, f"training {method} seed {seed} again from the start")
        if before is None and resume:
            # The accuracy before training cannot be measured on trained weights: start over.
            if not before_file.exists():
                print(f"repo-rl: compare: {before_file}: missing; training {method} seed {seed} again from the start",
                      file=sys.stderr)
            shutil.rmtree(run_dir)
            resume = False
    trainer = Trainer(cfg, run_dir, resume=resume, progress=False)
    if before is None:
        before = _evaluate(trainer, cfg, eval_n)
        _write_json(before_file, before)
    trainer.train()
    after = _evaluate(trainer, cfg, eval_n)
    result = {"method": method, "seed": seed, "before": before, "after": after, "steps": trainer.step}
    _write_json(done, result, indent=1)
    return result


def _mean_sd(vals: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _curve(rows: list[list[dict]], key: str) -> tuple[list[int], list[float]]:
    """Mean over seeds of ``key`` at each step where it was logged."""
    by_step: dict[int, list[float]] = {}
    for run in rows:
        for r in run:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                by_step.setdefault(r["step"], []).append(float(v))
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def plot_curves(metrics: dict[str, list[list[dict]]], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (key, title) in zip(axes.flat, CURVES):
        for method, runs in metrics.items():
            xs, ys = _curve(runs, key)
            if xs:
                ax.plot(xs, ys, label=method, lw=1.3, marker="." if len(xs) < 25 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if not handles:
        for ax in axes.flat:
            handles, labels = ax.get_legend_handles_labels()
            if handles:
                break
    fig.legend(handles, labels, loc="lower center", ncol=max(len(labels), 1), fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def summarize(results: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    splits = sorted({k for r in results for k in r["after"]})
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        table[m] = {"seeds": [r["seed"] for r in rs]}
        for s in splits:
            mean, sd = _mean_sd([r["after"].get(s, float("nan")) for r in rs])
            table[m][s] = {"mean": mean, "sd": sd, "per_seed": [r["after"].get(s) for r in rs]}
    before = {s: _mean_sd([r["before"].get(s, float("nan")) for r in results])[0] for s in splits}
    return {"splits": splits, "before": before, "methods": table}


def _n_finite(vals: Sequence[Any]) -> int:
    return sum(1 for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))


def write_report(out: Path, summary: dict[str, Any], command: str, header: str) -> Path:
    splits = summary["splits"]
    lines = ["# repo-rl compare", "", header, "", f"Command: `{command}`", ""]
    lines += ["| method | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    lines.append("| (before training) | " + " | ".join(f"{summary['before'][s]:.3f}" for s in splits) + " |")
    most = 0
    for m, row in summary["methods"].items():
        cells = []
        for s in splits:
            c = row[s]
            n = _n_finite(c.get("per_seed", []))
            most = max(most, n)
            if not math.isfinite(c["mean"]):
                cells.append("n/a")
            elif n < 2:  # one seed: no spread to report (never "± 0.000")
                cells.append(f"{c['mean']:.3f}")
            else:
                cells.append(f"{c['mean']:.3f} ± {c['sd']:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    what = ("One seed per method (no standard deviation)" if most < 2
            else "Mean ± standard deviation over seeds (a value without ±: one seed)")
    lines += ["", f"{what}, greedy decoding. `hard` is measured on held-out values of",
              "the hard operators without the expert text; `rephrase_hard` is the policy's rephrase success on them.",
              "", "![curves](curves.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def compare(
    methods: Sequence[str],
    seeds: int,
    out: Path,
    config_path: Optional[Path] = None,
    overrides: Sequence[str] = (),
    eval_n: Optional[int] = None,
    progress: bool = True,
    first_seed: int = 0,
) -> dict[str, Any]:
    from .algorithms import METHODS
    from .config import default_config_path

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"--methods: unknown method {unknown[0]!r}; expected names from: {', '.join(METHODS)}")
    if seeds < 1:
        raise UserError(f"--seeds: expected an integer >= 1, got {seeds}")
    config_path = Path(config_path or default_config_path())
    load_config(config_path, list(overrides))  # fail fast on a bad config before any training
    out.mkdir(parents=True, exist_ok=True)
    seed_list = list(range(first_seed, first_seed + seeds))
    jobs = [(m, s) for s in seed_list for m in methods]
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="compare", unit="run", dynamic_ncols=True)
    results = []
    for i, (m, s) in enumerate(jobs):
        if bar is not None:
            bar.set_postfix(method=m, seed=s)
        t0 = time.perf_counter()
        results.append(run_one(config_path, list(overrides), m, s, out / "runs" / f"{m}-seed{s}", eval_n))
        if bar is not None:
            bar.update(1)
        elif progress:  # a log file: one plain line per run, no carriage returns
            print(f"compare: run {i + 1}/{len(jobs)} done ({m}, seed {s}, {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if bar is not None:
        bar.close()
    metrics = {m: [read_jsonl(out / "runs" / f"{m}-seed{s}" / "metrics.jsonl") for s in seed_list] for m in methods}
    plot_curves(metrics, out / "curves.png")
    summary = summarize(results, methods)
    summary["curves"] = {
        m: {k: dict(zip(*_curve(metrics[m], k))) for k, _ in CURVES} for m in methods
    }
    (out / "results.json").write_text(json.dumps({"results": results, "summary": summary}, indent=1))
    return summary


def main_compare(args: Any) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    out = Path(args.output_dir)
    summary = compare(methods, args.seeds, out, args.config, args.overrides, args.eval_n, progress=not args.no_progress,
                      first_seed=args.first_seed)
    import platform
    import time

    header = (f"Date: {time.strftime('%Y-%m-%d')}. Machine: {platform.machine()}, {__import__('os').cpu_count()} CPU cores. "
              f"Seeds: {args.seeds}.")
    command = "repo-rl compare " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "repo-rl compare"
    path = write_report(out, summary, command, header)
    print(path.read_text())
    return 0
