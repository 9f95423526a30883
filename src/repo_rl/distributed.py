"""Multi-process data parallelism through ``accelerate launch`` (or ``torchrun``).

Every rank holds the full model. Prompts are sharded contiguously, so each GRPO group stays
whole on one rank and the RePO gate and rephrase run per rank. Gradients are summed across
ranks with one all-reduce per optimizer step; loss normalisers and metrics use global
totals, so N processes compute the same update as one process over the same global batch.
With one process every operation here is the identity.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch

from .errors import UserError


class Dist:
    """Rank information and the few collectives the trainer needs."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.state = None
        for var, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
            if os.environ.get(var, "").lower() in ("1", "true"):
                raise UserError(
                    f"accelerate launch with {what}: not supported yet. repo-rl shards data, not parameters; "
                    "use a DDP config (configs/accelerate/) with model.lora.r, train.bf16 and train.logprob_chunk_size to fit memory"
                )
        if self.world > 1:
            from accelerate import PartialState

            # gloo on CPU, nccl on GPUs; accelerate reads the launcher's environment.
            self.state = PartialState(cpu=not torch.cuda.is_available())
            self.world, self.rank = self.state.num_processes, self.state.process_index

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        return None if self.state is None else self.state.device

    def shard(self, items: list) -> list:
        """This rank's contiguous share of a list whose length is a multiple of ``world``."""
        k = len(items) // self.world
        return items[self.rank * k : (self.rank + 1) * k]

    def sum_dict(self, values: dict[str, float]) -> dict[str, float]:
        """Sum a dict of numbers over ranks (keys must be the same on every rank)."""
        if self.world == 1 or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def gather(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a tensor's rank shards along dim 0, in rank order."""
        if self.world == 1:
            return t
        return torch.cat([x for x in self.gather(t.cpu())], 0)

    def all_reduce_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum gradients over ranks in one flat buffer."""
        if self.world == 1:
            return
        params = [p for p in params if p.requires_grad]
        for p in params:  # every rank must contribute a buffer of the same layout
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """Tear the process group down; exiting with it alive can abort in gloo's threads."""
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
