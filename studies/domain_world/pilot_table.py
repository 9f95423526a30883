"""The pilot table of docs/REAL_MODEL.md from the runs' metrics.jsonl files.

    python studies/domain_world/pilot_table.py runs/domain_world/repo runs/domain_world/grpo ...

One row per run directory: held-out and general accuracy at each evaluation, mean reward of the
on-policy rollouts (``reward/on_policy``),
samples injected (RePO's rephrases, LUFFY's and raw-expert's expert texts), RePO's rephrase success rate
(rephrases that pass ``repo.verify``), ``repo/logp_gap``, ``sdft/reverse_kl`` (SDFT), mean entropy and the
median seconds per step. The summary also keeps the share of rephrases the training reward alone
verifies, the injected rows' log-prob per token under q and their uptake (``repo/uptake_gain``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def _mean(values: list) -> float:
    xs = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return statistics.fmean(xs) if xs else float("nan")


def _fmt(v: float, spec: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _injected(rows: list[dict]) -> float:
    """Samples put into groups over the run (RePO's rephrases, LUFFY's and raw-expert's expert
    texts); nan for a method that injects none."""
    total = sum(r.get("repo/replaced") or 0.0 for r in rows)
    return total if total else float("nan")


def summarize(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{run}: metrics.jsonl is empty")
    evals = {r["step"]: r for r in rows if any(k.startswith("eval/") for k in r)}
    rephrase = [r for r in rows if r.get("repo/rephrase_success_rate") is not None]
    return {
        "name": run.name,
        "method": rows[0].get("phase"),
        "steps": rows[-1]["step"],
        "evals": {s: (r.get("eval/heldout/pass@1"), r.get("eval/general/pass@1")) for s, r in sorted(evals.items())},
        "reward": _mean([r.get("reward/on_policy") for r in rows]),
        "injected": _injected(rows),
        "rephrase_ok": _mean([r.get("repo/rephrase_success_rate") for r in rephrase]),
        "reward_rate": _mean([r.get("repo/rephrase_reward_rate") for r in rephrase]),
        "injected_logp_q": _mean([r.get("repo/injected_logp_q") for r in rows]),
        "uptake_gain": _mean([r.get("repo/uptake_gain") for r in rows]),
        "logp_gap": _mean([r.get("repo/logp_gap") for r in rows]),
        "reverse_kl": _mean([r.get("sdft/reverse_kl") for r in rows]),
        "entropy": _mean([r.get("entropy") for r in rows]),
        "s_per_step": statistics.median(r["time/step"] for r in rows if "time/step" in r),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    args = ap.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "metrics.jsonl").is_file()]
    if missing:
        print(f"no metrics.jsonl in: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs = [summarize(r) for r in args.runs]
    steps = sorted({s for r in runs for s in r["evals"]})
    head = ["run"] + [f"held-out @{s}" for s in steps] + [f"general @{s}" for s in steps] + [
        "rollout reward", "samples injected", "rephrase success", "repo/logp_gap", "sdft/reverse_kl", "entropy", "s/step (median)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in runs:
        cells = [r["name"]]
        cells += [_fmt(r["evals"].get(s, (None, None))[0]) for s in steps]
        cells += [_fmt(r["evals"].get(s, (None, None))[1]) for s in steps]
        cells += [_fmt(r["reward"]), _fmt(r["injected"], ".0f"), _fmt(r["rephrase_ok"], ".2f"), _fmt(r["logp_gap"], ".1f"),
                  _fmt(r["reverse_kl"], ".3f"), _fmt(r["entropy"], ".2f"), _fmt(r["s_per_step"], ".1f")]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
