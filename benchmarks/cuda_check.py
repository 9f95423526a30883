"""The trainer on an NVIDIA GPU with the built-in HF sampler (``generation.backend=hf``).

    python benchmarks/cuda_check.py [--out cuda_check] [--steps 4] [--timing-steps 4]

Needs only what ``repo-rl`` itself needs (no vLLM, no network: models are built from a config).
Three checks, each reported as PASS or FAIL, and one timing:

1. ``repo-rl train`` with ``train.device=cuda`` and bf16 runs ``--steps`` RePO steps on a tiny
   Qwen2 model, saves checkpoints, and every logged loss is finite.
2. The same run stopped after half the steps and resumed with ``--resume`` reaches the same
   metrics as the uninterrupted run (the largest difference over the compared keys is printed;
   CUDA kernels need not be bitwise deterministic, so a difference under 1e-3 passes).
3. The checkpoint reloads with ``from_pretrained`` and its weights are finite.
4. Timing: a SmolLM2-135M-shaped model (hidden 576, 30 layers, 9 heads, 3 KV heads, random
   weights, the tiny character vocabulary), GRPO and RePO, 8 prompts x 8 rollouts x 128 tokens,
   median ``time/step`` and its phases over the steps after the first.

Writes ``summary.json`` and the run directories under ``--out``. Exit code 0 when checks 1-3 pass.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("loss", "reward", "repo/gate_rate", "grad_norm", "kl", "entropy")


def make_assets(out: Path) -> dict[str, Path]:
    from repo_rl.models.tiny import make_char_tokenizer, save_tiny_model_dir

    tok = make_char_tokenizer()
    tiny, shaped = out / "tiny-model", out / "smollm2-shaped"
    save_tiny_model_dir(tiny, tok, hidden_size=128, num_heads=2, num_kv_heads=1)
    save_tiny_model_dir(shaped, tok, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                        max_position_embeddings=2048)
    data = out / "train.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"what is {i} + {i}?", "answer": str(2 * i), "solution": f"{i} plus {i} is {2 * i}."}
            for i in range(64)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"tiny": tiny, "shaped": shaped, "data": data}


def train(out: Path, overrides: list[str], resume: bool = False) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "repo_rl.cli", "train", "-o", str(out), *(["--resume"] if resume else []), *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (out.parent / f"{out.name}{'-resume' if resume else ''}.log").write_text(p.stdout + p.stderr)
    return p.returncode, p.stderr[-1500:]


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "cuda_check")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--timing-steps", type=int, default=4, help="0: skip the timing")
    ap.add_argument("--device", default="cuda", help="cpu: rehearse the checks on a machine without a GPU")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("cuda_check: no CUDA device", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "none"
    summary: dict = {"date": time.strftime("%Y-%m-%d"), "gpu": gpu, "torch": torch.__version__}
    import transformers

    summary["transformers"] = transformers.__version__
    assets = make_assets(out)
    common = [f"model.name_or_path={assets['tiny']}", f"data.train_files={assets['data']}",
              "reward.funcs=[tests.helpers.rewards:contains_answer]", "algorithm.method=repo", "algorithm.num_generations=4",
              "algorithm.max_completion_length=16", "train.prompts_per_step=4", f"train.device={args.device}", "train.bf16=true",
              "logging.progress=false", "eval.every=0", "train.save_every=1", "train.save_total_limit=null"]
    checks: dict[str, str] = {}

    # 1. A RePO run on the GPU.
    rc, err = train(out / "full", [*common, f"train.max_steps={args.steps}"])
    full = metrics(out / "full")
    ok = rc == 0 and len(full) == args.steps and all(math.isfinite(r["loss"]) for r in full)
    checks[f"1 train on {args.device}"] = "PASS" if ok else f"FAIL (rc={rc}, {len(full)} rows): {err[-400:]}"

    # 2. Stop half-way, resume, compare.
    half = max(1, args.steps // 2)
    rc1, err1 = train(out / "split", [*common, f"train.max_steps={half}"])
    rc2, err2 = train(out / "split", [*common, f"train.max_steps={args.steps}"], resume=True)
    split = metrics(out / "split")
    diffs = [abs(a[k] - b[k]) for a, b in zip(full, split) for k in COMPARED
             if isinstance(a.get(k), float) and isinstance(b.get(k), float) and math.isfinite(a[k]) and math.isfinite(b[k])]
    worst = max(diffs) if diffs else float("nan")
    summary["resume_max_abs_diff"] = worst
    ok = rc1 == 0 and rc2 == 0 and len(split) == args.steps and len(full) == args.steps and worst < 1e-3
    checks["2 exact resume"] = "PASS" if ok else f"FAIL (rc={rc1},{rc2}, rows {len(split)}, max diff {worst}): {(err1 + err2)[-400:]}"

    # 3. The last checkpoint reloads.
    try:
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(out / "full" / "checkpoints" / f"step-{args.steps}")
        finite = all(bool(torch.isfinite(p).all()) for p in m.parameters())
        checks["3 checkpoint reloads"] = "PASS" if finite else "FAIL (non-finite weights)"
    except Exception as e:  # noqa: BLE001 - reported, not raised
        checks["3 checkpoint reloads"] = f"FAIL ({type(e).__name__}: {str(e)[:200]})"

    # 4. Step time on a SmolLM2-135M-shaped model.
    timing = {}
    for method in ("grpo", "repo") if args.timing_steps else ():
        run = out / f"timing-{method}"
        over = [f"model.name_or_path={assets['shaped']}", f"data.train_files={assets['data']}",
                "reward.funcs=[tests.helpers.rewards:contains_answer]", f"algorithm.method={method}", "algorithm.num_generations=8",
                "algorithm.max_completion_length=128", "train.prompts_per_step=8", "train.micro_batch_size=64", f"train.device={args.device}",
                "train.bf16=true", "logging.progress=false", "eval.every=0", f"train.save_every={10 * args.timing_steps}",
                f"train.max_steps={args.timing_steps}", "repo.rho=1.0", "repo.allow_unverified=true"]
        rc, err = train(run, over)
        rows = metrics(run)[1:]
        if rc != 0 or not rows:
            timing[method] = {"error": err[-400:]}
            continue
        phases = sorted({k for r in rows for k in r if k.startswith("time/")})
        timing[method] = {k: statistics.median(r[k] for r in rows if k in r) for k in phases}
        timing[method]["completions/mean_length"] = statistics.median(r.get("completions/mean_length", float("nan")) for r in rows)
    summary["timing"] = timing
    summary["checks"] = checks
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for name, verdict in checks.items():
        print(f"{name}: {verdict}")
    print(f"resume: largest difference over {', '.join(COMPARED)}: {worst:.3g}")
    for method, t in timing.items():
        print(f"timing {method}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in t.items()))
    return 0 if all(v == "PASS" for v in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
