"""Time per step of the default run on an idle machine and beside one busy process.

    python benchmarks/busy_machine.py [--steps 8] [--threads 2,default,2/active] [--out busy_machine.json]

For each thread setting (``2``: the former default; ``default``: ``train.threads`` unset, 1 on
CPU; a ``/active`` suffix runs it with ``OMP_WAIT_POLICY=ACTIVE``, OpenMP threads that spin while
they wait, instead of the passive policy the CLI sets by default), the default toy-world run (``repo-rl train``, no before/after table) trains ``--steps``
steps twice: alone, and beside a process that spins on one core (``while True: pass``, the
kind of neighbour a shared machine has). The median ``time/step`` of each run (the first step
left out) and the busy / idle ratio are printed as a table and written as JSON. Goal: the
default's busy / idle ratio <= 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _spinner() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run_once(setting: str, steps: int, busy: bool) -> dict:
    threads, _, wait = setting.partition("/")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        over = [f"train.max_steps={steps}", "logging.progress=false", "eval.every=0", f"train.save_every={10 * steps}"]
        if threads != "default":
            over.append(f"train.threads={threads}")
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
        if wait:
            env["OMP_WAIT_POLICY"] = wait.upper()
        spin = _spinner() if busy else None
        try:
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "repo_rl.cli", "train", "--no-eval", "-o", str(out), *over],
                               env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
        finally:
            if spin is not None:
                spin.kill()
                spin.wait()
        if p.returncode != 0:
            raise SystemExit(f"run failed ({p.returncode}): {p.stderr[-600:]}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        per_step = [r["time/step"] for r in rows[1:]]
        return {"threads": setting, "busy": busy, "median_step_s": statistics.median(per_step), "wall_s": wall, "steps": len(rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", default="2,default,2/active",
                    help="comma-separated train.threads settings ('default': unset; '/active': OMP_WAIT_POLICY=ACTIVE)")
    ap.add_argument("--out", default="busy_machine.json")
    args = ap.parse_args(argv)
    results = []
    for threads in args.threads.split(","):
        idle = run_once(threads, args.steps, busy=False)
        busy = run_once(threads, args.steps, busy=True)
        results.append({"threads": threads, "idle": idle, "busy": busy, "ratio": busy["median_step_s"] / idle["median_step_s"]})
    print("| train.threads | idle s/step (median) | busy s/step (median) | busy / idle |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['threads']} | {r['idle']['median_step_s']:.3f} | {r['busy']['median_step_s']:.3f} | {r['ratio']:.2f} |")
    default = [r for r in results if r["threads"] == "default"]
    if default:
        print(("PASS" if default[0]["ratio"] <= 2 else "MISS") + f": default busy/idle = {default[0]['ratio']:.2f} (goal <= 2)")
    env = {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0]}
    Path(args.out).write_text(json.dumps({"environment": env, "steps": args.steps, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
