"""Where the time of one vLLM weight sync goes, on SmolLM2-135M-Instruct (bf16 engine).

Run it in the vLLM environment (``.venv-vllm``), with the SmolLM2 weights installed::

    python benchmarks/sync_breakdown.py [--repeats 5]

Each repeat times the parts of :meth:`repo_rl.engines.vllm.VLLMGenerator.sync_weights` one by one
(the merged state dict, the cast to bf16, the safetensors file, the engine's reload, the prefix
cache reset), then the whole call. Prints the medians in seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from repo_rl.engines.vllm import VLLMGenerator, merged_state_dict
    from repo_rl.models.smollm import ensure_smollm2

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(ensure_smollm2(), dtype=torch.float32)
    gen = VLLMGenerator(model, [2], 2, autocast_dtype=torch.bfloat16, kv_cache_gb=1, max_model_len=1024)
    parts: dict[str, list[float]] = {}
    try:
        for _ in range(args.repeats):
            marks = [("start", time.perf_counter())]
            sd = merged_state_dict(model)
            marks.append(("state dict", time.perf_counter()))
            sd = {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}
            marks.append(("cast to bf16", time.perf_counter()))
            path, tmp = gen.dir / "model.safetensors", gen.dir / "model.safetensors.tmp"
            save_file(sd, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, path)
            marks.append(("safetensors file", time.perf_counter()))
            gen.llm.collective_rpc("repo_rl_load_weights", args=(str(path), gen.tied))
            marks.append(("engine reload", time.perf_counter()))
            gen.llm.reset_prefix_cache()
            marks.append(("prefix cache reset", time.perf_counter()))
            for (_, a), (name, b) in zip(marks, marks[1:]):
                parts.setdefault(name, []).append(b - a)
            parts.setdefault("sum of the parts", []).append(marks[-1][1] - marks[0][1])
            t0 = time.perf_counter()
            gen.sync_weights(model)
            parts.setdefault("sync_weights() as the trainer calls it", []).append(time.perf_counter() - t0)
    finally:
        gen.close()
    size = sum(v.numel() * v.element_size() for v in sd.values())
    print(f"weights file {size / 1e6:.0f} MB in {gen.dir.parent}; medians over {args.repeats} repeats, 1 thread:")
    for name, vals in parts.items():
        print(f"  {name:<40} {statistics.median(vals):.3f} s")


if __name__ == "__main__":
    main()
