"""A test engine: the built-in HF sampler over its own copy of the weights, synced after every
optimizer step like vLLM's. It lets the overlap (``train.max_staleness: 1``) run without vLLM, and
it records a fingerprint of the weights it sampled with at every call."""

from __future__ import annotations

import copy
from typing import Any

import torch

from repo_rl.engines import GENERATORS, HFGenerator, register_generator

NAME = "copy_hf"


def fingerprint(model: Any) -> float:
    """A number that changes with any optimizer step: the sum of every weight."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in model.parameters()))


class CopySampler:
    needs_weights = True

    def __init__(self, model: Any, eos_token_ids, pad_token_id: int, **options: Any) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.inner = HFGenerator(self.model, eos_token_ids, pad_token_id, **options)
        self.syncs = 0
        self.calls: list[float] = []
        """The weights' fingerprint at each generate call."""

    def generate(self, prompts, params, seeds, logprobs: bool = False):
        self.calls.append(fingerprint(self.model))
        return self.inner.generate(prompts, params, seeds, logprobs=logprobs)

    def sync_weights(self, model: Any) -> None:
        with torch.no_grad():
            self.model.load_state_dict(model.state_dict())
        self.syncs += 1


def register() -> None:
    if NAME not in GENERATORS:
        register_generator(NAME, CopySampler)
