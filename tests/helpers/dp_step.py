"""Run one training step and save the summed gradient and the step metrics (rank 0).

Used by tests/test_distributed.py, launched with one process or with ``accelerate launch``.
Usage: python dp_step.py OUT_DIR key=value ...
"""

import json
import sys
from pathlib import Path

import torch

from repo_rl.config import build_config
from repo_rl.trainer import Trainer


def main() -> None:
    out = Path(sys.argv[1])
    trainer = Trainer(build_config({}, sys.argv[2:]), out / "run", progress=False)
    grads = {}

    def record(*args, **kwargs):  # replaces optimizer.step: capture the all-reduced gradient
        for name, p in trainer.model.named_parameters():
            if p.grad is not None:
                g = p.grad.detach()
                # FSDP holds each rank's shard of the summed gradient; gathering is collective.
                grads[name] = g.full_tensor() if hasattr(g, "full_tensor") else g.clone()

    engine = trainer.dist.engine
    if engine is None:
        trainer.optimizer.step = record
    else:  # DeepSpeed: read the reduced gradient before the engine steps (collective under ZeRO-3)
        from deepspeed.utils import safe_get_full_grad

        step = engine.step

        def record_then_step():
            for name, p in trainer.model.named_parameters():
                g = safe_get_full_grad(p)
                if g is not None:
                    grads[name] = g.detach().clone()
            step()

        engine.step = record_then_step
    metrics = trainer.train_step()
    if trainer.dist.is_main:
        torch.save(grads, out / "grads.pt")
        (out / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if not k.startswith("time/")}))
    trainer.dist.close()
    trainer.dist.exit_process()


if __name__ == "__main__":
    main()
