"""Generation cost of RePO's rephrase rows: a second call against one merged call.

Case (b) of perf_vs_trl.py (random Qwen2, hidden 256, 4 layers): 32 rollout rows with 20-token
prompts plus 2 rephrase rows with 350-token prompts, 64 new tokens each, 2 threads, fp32.

    python benchmarks/rephrase_batching_bench.py [--repeats 5]

Prints the median seconds of: the rollouts alone; rollouts then a separate rephrase call; one
merged call decoded in length buckets, each with its own KV cache (the default); one merged call
prefilled in buckets but decoded from one padded cache; one merged call with a single padded
prefill and cache.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from repo_rl.engines import HFGenerator, SamplingParams
from repo_rl.models.tiny import make_char_tokenizer, make_tiny_qwen2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = make_char_tokenizer(eos_last=True)
    vocab = len(tok) - 1  # EOS is outside the model's vocabulary: every row runs the full 64 tokens
    model = make_tiny_qwen2(tok, hidden_size=256, intermediate_size=1024, num_layers=4,
                            max_position_embeddings=1024, vocab_size=vocab).eval()
    rng = random.Random(0)
    questions = [[rng.randrange(3, vocab) for _ in range(20)] for _ in range(4)]
    rollouts = [q for q in questions for _ in range(8)]
    rephrases = [[rng.randrange(3, vocab) for _ in range(350)] for _ in range(2)]
    params = SamplingParams(64, temperature=1.0)
    eos = [vocab]
    bucketed = HFGenerator(model, eos, 0)
    one_cache = HFGenerator(model, eos, 0)
    one_cache._bucketed_decode = False  # bucketed prefill, then one cache padded to the longest prompt
    padded = HFGenerator(model, eos, 0, bucket_prefill=False)
    seeds = list(range(len(rollouts) + len(rephrases)))
    runs = {
        "rollouts alone": lambda: bucketed.generate(rollouts, params, seeds[:32]),
        "rollouts + separate rephrase call": lambda: (bucketed.generate(rollouts, params, seeds[:32]),
                                                      bucketed.generate(rephrases, params, seeds[32:])),
        "one merged call, bucketed decode": lambda: bucketed.generate(rollouts + rephrases, params, seeds),
        "one merged call, one padded cache": lambda: one_cache.generate(rollouts + rephrases, params, seeds),
        "one merged call, one padded prefill": lambda: padded.generate(rollouts + rephrases, params, seeds),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"{name:<38} {statistics.median(ts):.3f} s (median of {len(ts)})")


if __name__ == "__main__":
    main()
