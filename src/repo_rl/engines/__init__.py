"""Inference engines behind one protocol: the built-in HF sampler (:mod:`.hf`) and vLLM (:mod:`.vllm`).

Each engine implements :class:`Generator` and is registered by name in :data:`GENERATORS`
(``generation.backend``); :func:`make_generator` builds one. An engine's heavy imports happen only
when it is built. The protocol, the registry and the per-row seeds live in :mod:`.hf` beside the
HF sampler; they are re-exported here.
"""

from .hf import (
    BATCHING_TRIALS,
    GENERATORS,
    Generator,
    HFGenerator,
    LogprobGenerator,
    SamplingParams,
    choose_batching,
    derive_seed,
    make_generator,
    register_generator,
)

__all__ = [
    "BATCHING_TRIALS",
    "GENERATORS",
    "Generator",
    "HFGenerator",
    "LogprobGenerator",
    "SamplingParams",
    "choose_batching",
    "derive_seed",
    "make_generator",
    "register_generator",
]
