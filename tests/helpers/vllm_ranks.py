"""Train with the vLLM engine, then check the engine against the trainer's weights on this rank.

Used by tests/test_vllm_ranks.py, launched with one process or with ``accelerate launch``.
After training, each rank samples a few tokens with its engine (with their log-probs) and scores
the same tokens with its training model (gathered where sharded); it writes the largest
difference to ``OUT/engine-rank<r>.json``.
Usage: python vllm_ranks.py OUT [--resume] key=value ...
"""

import json
import sys
from pathlib import Path

import torch

from repo_rl.config import build_config
from repo_rl.engines import SamplingParams
from repo_rl.run.distributed import full_parameters
from repo_rl.trainer import Trainer


def main() -> None:
    out = Path(sys.argv[1])
    resume = "--resume" in sys.argv[2:]
    trainer = Trainer(build_config({}, [a for a in sys.argv[2:] if a != "--resume"]), out, resume=resume, progress=False)
    generator, dist = trainer.generator, trainer.dist
    close_generator, close_dist = generator.close, dist.close
    generator.close, dist.close = (lambda: None), (lambda: None)  # kept open for the check below
    trainer.train()
    prompts = [trainer._prompt_ids(i) for i in range(2)]  # noqa: SLF001
    ids, lps = generator.generate(prompts, SamplingParams(max_new_tokens=6, temperature=1.0), [11, 12], logprobs=True)
    worst = 0.0
    with torch.no_grad(), full_parameters(trainer.model, dist.engine):
        for p, c, lp in zip(prompts, ids, lps):
            x = torch.tensor([list(p) + list(c)])
            logits = trainer.core(x).logits[0, len(p) - 1 : len(p) - 1 + len(c)].float()
            mine = torch.log_softmax(logits, -1).gather(1, torch.tensor(c)[:, None])[:, 0]
            worst = max(worst, float((mine - torch.tensor(lp)).abs().max()))
    (out / f"engine-rank{dist.rank}.json").write_text(json.dumps({"max_abs_diff": worst, "syncs": generator.syncs, "writes": generator.writes, "tokens": ids}))
    close_generator()
    close_dist()
    dist.exit_process()


if __name__ == "__main__":
    main()
