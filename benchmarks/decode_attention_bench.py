"""One-token decode attention on CPU: SDPA against the sampler's two-matmul form.

    python benchmarks/decode_attention_bench.py [--threads 2] [--repeats 300]

Queries ``[rows, 4 heads, 1, 64]`` packed as transformers does for 2 key/value heads, a left-padded
boolean mask, and keys/values that are views of a longer preallocated cache, as in
``repo_rl.engines.HFGenerator``. Prints the median microseconds of each and their ratio for every
(cache length, rows) pair, and whether ``_matmul_attention_pays`` picks the matmuls there.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from repo_rl.engines.hf import _matmul_attention_pays, _matmul_decode_attention


def _median_us(fn, repeats: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kvh, heads, dim = 2, 4, 64
    g = torch.Generator().manual_seed(0)
    print("| cache positions | rows | SDPA (us) | matmuls (us) | ratio | sampler uses matmuls |")
    print("|---|---|---|---|---|---|")
    for span in (30, 110, 400):
        for rows in (2, 8, 16, 32, 64):
            q = torch.randn(rows, heads, 1, dim, generator=g)
            k = torch.randn(rows, kvh, span + 64, dim, generator=g)[:, :, :span]
            v = torch.randn(rows, kvh, span + 64, dim, generator=g)[:, :, :span]
            mask = torch.ones(rows, 1, 1, span, dtype=torch.bool)
            mask[..., :3] = False
            packed = q.reshape(rows, kvh, heads // kvh, dim)  # transformers' pack_gqa for one query token
            sdpa = _median_us(lambda: F.scaled_dot_product_attention(packed, k, v, attn_mask=mask, scale=dim**-0.5), args.repeats)
            mm = _median_us(lambda: _matmul_decode_attention(q, k, v, mask, dim**-0.5), args.repeats)
            print(f"| {span} | {rows} | {sdpa:.0f} | {mm:.0f} | {mm / sdpa:.2f} | {'yes' if _matmul_attention_pays(k) else 'no'} |")


if __name__ == "__main__":
    main()
