"""A Markdown run report with plots, from ``metrics.jsonl``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from .run.tracking import read_jsonl

PLOTS = [
    ("reward", "reward (after group composition)"),
    ("reward/on_policy", "on-policy reward"),
    ("eval/hard/avg@1", "hard accuracy (held out)"),
    ("reward/domain/hard", "hard-prompt rollout reward"),
    ("repo/gate_rate", "gate rate"),
    ("repo/rephrase_success_rate", "rephrase success rate"),
    ("entropy", "entropy"),
    ("clip_ratio", "clip ratio"),
    ("grad_norm", "gradient norm"),
    ("time/step", "seconds per step"),
]


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def plot_metrics(rows: list[dict[str, Any]], out_png: Path, keys: Optional[list[tuple[str, str]]] = None) -> list[str]:
    """One small panel per metric present in ``rows``; returns the keys plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [(k, t) for k, t in (keys or PLOTS) if _series(rows, k)[0]]
    if not present:
        return []
    cols = 3
    nrows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    for ax, (k, title) in zip(axes.flat, present):
        xs, ys = _series(rows, k)
        ax.plot(xs, ys, marker="." if len(xs) < 40 else None, lw=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return [k for k, _ in present]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.3f}"
    return str(v)


def write_report(run_dir: Path, extra_tables: Optional[dict[str, tuple[dict[str, float], dict[str, float]]]] = None,
                 notes: Optional[list[str]] = None) -> Path:
    """Write ``run_dir/report.md`` and ``run_dir/metrics.png``."""
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    lines = [f"# Run report: {run_dir.name}", ""]
    cfg = run_dir / "config.yaml"
    if cfg.exists():
        lines += [f"Config: `{cfg.name}` in this directory.", ""]
    for title, (before, after) in (extra_tables or {}).items():
        lines += [f"## {title}", "", "| split | before | after |", "|---|---|---|"]
        for k in before:
            lines.append(f"| {k} | {_fmt(before[k])} | {_fmt(after.get(k, float('nan')))} |")
        lines.append("")
    for note in notes or []:
        lines += [note, ""]
    if rows:
        plotted = plot_metrics(rows, run_dir / "metrics.png")
        if plotted:
            lines += ["## Curves", "", "![metrics](metrics.png)", ""]
        last = rows[-1]
        keys = ["step", "reward", "reward_std", "frac_reward_zero_std", "repo/gate_rate", "repo/rephrase_success_rate",
                "repo/replaced", "repo/logp_gap", "clip_ratio", "entropy", "kl", "completions/mean_length", "time/step"]
        lines += ["## Last step", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(last.get(k))} |" for k in keys if k in last]
        lines.append("")
        times = [k for k in last if k.startswith("time/") and k != "time/step"]
        if times:
            import statistics

            lines += ["## Median time per phase (s)", "", "| phase | median |", "|---|---|"]
            for k in times:
                vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
                lines.append(f"| {k[5:]} | {statistics.median(vals):.3f} |")
            lines.append("")
    out = run_dir / "report.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out
