"""Command line of the toy world.

    python -m repo_rl.toyworld build-weights --variant basic        # rebuild shipped weights
    python -m repo_rl.toyworld build-weights --variant hard_rephrase
    python -m repo_rl.toyworld warm-start --variant basic --steps 300 --eval-every 100
    python -m repo_rl.toyworld eval --variant hard_rephrase          # eval the ensure_model() dir
    python -m repo_rl.toyworld ensure --variant basic                # print the model dir
    python -m repo_rl.toyworld write-data --out data/toy              # JSONL train/eval files
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _cfg(args):
    from .world import ToyWorldConfig

    kw = {"variant": args.variant, "seed": args.seed}
    if getattr(args, "steps", None):
        kw["ws_steps"] = args.steps
    if getattr(args, "threads", None):
        kw["ws_threads"] = args.threads
    return ToyWorldConfig(**kw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m repo_rl.toyworld", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("build-weights", "warm-start", "eval", "ensure", "write-data"):
        sp = sub.add_parser(name)
        sp.add_argument("--variant", default="basic", choices=["basic", "hard_rephrase"])
        sp.add_argument("--seed", type=int, default=0, help="world seed")
        sp.add_argument("--threads", type=int, default=None,
                        help="torch threads (default 2; 1 is faster on a busy machine)")
        if name in ("build-weights", "warm-start"):
            sp.add_argument("--steps", type=int, default=None, help="warm-start steps")
        if name == "warm-start":
            sp.add_argument("--eval-every", type=int, default=0)
            sp.add_argument("--out", default=None, help="save the HF model dir here")
        if name in ("warm-start", "eval", "build-weights"):
            sp.add_argument("--n", type=int, default=200, help="eval rows per split")
        if name == "eval":
            sp.add_argument("--model-dir", default=None)
        if name == "write-data":
            sp.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch

    from .evaluate import evaluate_splits
    from .warmstart import build_shipped, ensure_model, save_model_dir, warm_start
    from .world import write_datasets

    cfg = _cfg(args)
    if args.cmd == "write-data":
        paths = write_datasets(cfg, args.out)
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    elif args.cmd == "ensure":
        print(ensure_model(cfg))
    elif args.cmd == "build-weights":
        out = build_shipped(cfg, eval_n=args.n)
        print((out / "toyworld.json").read_text())
    elif args.cmd == "eval":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(cfg.ws_threads)
        d = args.model_dir or ensure_model(cfg)
        model = AutoModelForCausalLM.from_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        t0 = time.perf_counter()
        res = evaluate_splits(model, tok, cfg, n=args.n)
        print(json.dumps({"model_dir": str(d), **res, "eval_seconds": round(time.perf_counter() - t0, 1)}))
    elif args.cmd == "warm-start":
        tok_holder = {}

        def cb(step, model, loss):
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < cfg.ws_steps:
                if "tok" not in tok_holder:
                    from .tokenizer import build_tokenizer
                    tok_holder["tok"] = build_tokenizer()
                res = evaluate_splits(model, tok_holder["tok"], cfg, n=args.n)
                print(json.dumps({"step": step + 1, "loss": round(loss, 4), **res}), flush=True)

        model, tok, info = warm_start(cfg, callback=cb, progress=sys.stderr.isatty())
        torch.set_num_threads(cfg.ws_threads)
        res = evaluate_splits(model, tok, cfg, n=args.n)
        print(json.dumps({"step": info["steps"], "warmstart_seconds": info["seconds"], **res}), flush=True)
        if args.out:
            save_model_dir(model, tok, cfg, args.out, {"source": "warm_start", "warmstart": info, "eval": res})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
