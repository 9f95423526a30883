"""Time ``HFGenerator`` alone on a random Qwen2: median seconds per call and per decoded token.

    python benchmarks/sampler_bench.py --hidden 128 --layers 2 --intermediate 256 --rows 4 --tokens 16
    python benchmarks/sampler_bench.py --hidden 256 --layers 4 --intermediate 1024 --rows 32 --tokens 64

``--no-mask4d`` times the decode path that lets transformers build the causal mask per token.
``--ab-attention`` also times, interleaved, the decode with SDPA at every step (the sampler otherwise
computes the attention of large fp32 CPU buckets over short caches with two matmuls when sampling).
The EOS id is outside the model's vocabulary, so every row decodes ``--tokens`` tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from repo_rl.engines import HFGenerator, SamplingParams  # noqa: E402
from repo_rl.models.tiny import make_char_tokenizer, make_tiny_qwen2  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=40, help="prompts are 40..44 tokens, so rows are left-padded")
    ap.add_argument("--calls", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-mask4d", action="store_true")
    ap.add_argument("--ab-attention", action="store_true",
                    help="interleave calls with and without the matmul decode attention and report both")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = make_char_tokenizer()
    model = make_tiny_qwen2(tok, hidden_size=args.hidden, num_layers=args.layers, intermediate_size=args.intermediate,
                            num_heads=4, num_kv_heads=2, vocab_size=len(tok) - 1).eval()
    gen = HFGenerator(model, [len(tok) - 1], tok.pad_token_id)
    if args.no_mask4d:
        gen._mask4d = False
    import repo_rl.engines.hf as rollout

    default_rule = rollout._matmul_attention_pays
    variants = {"default": default_rule}
    if args.ab_attention:
        variants["sdpa only"] = lambda key: False
    prompts = [[5 + i % 7] * (args.prompt_len + i % 5) for i in range(args.rows)]
    params, seeds = SamplingParams(args.tokens, 1.0, 1.0, 0), list(range(args.rows))
    for _ in range(3):
        gen.generate(prompts, params, seeds)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.calls):  # interleaved, so drift in machine load hits every variant alike
        for name, rule in variants.items():
            rollout._matmul_attention_pays = rule
            t0 = time.perf_counter()
            gen.generate(prompts, params, seeds)
            times[name].append(time.perf_counter() - t0)
    rollout._matmul_attention_pays = default_rule
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"hidden {args.hidden}, {args.layers} layers, {args.rows} rows x {args.tokens} tokens, {args.threads} threads, "
              f"mask4d={gen._mask4d}, attention {name}: median {med:.4f} s per call, {1000 * med / args.tokens:.3f} ms per token step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
