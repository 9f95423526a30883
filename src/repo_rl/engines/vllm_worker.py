"""Runs inside vLLM's worker process (``worker_extension_cls``): in-place weight reload.

vLLM imports this module by name in its own process, so it must not import torch-heavy parts of
repo_rl. Tensors cannot travel as RPC arguments (they arrive as lists), so the trainer writes a
safetensors file and passes its path. :func:`reload_into` is also what
:func:`repo_rl.integrations.trl.sync_colocated_by_reload` calls in the trainer's own process.
"""

from __future__ import annotations

from typing import Any, Iterable


def in_process_runner(llm: Any) -> Any:
    """The model runner of an ``LLM`` whose engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    driver = llm.llm_engine.model_executor.driver_worker
    return getattr(driver, "worker", driver).model_runner


def reload_into(model_runner: Any, weights: Iterable[tuple[str, Any]], tied_embeddings: bool) -> None:
    """Load ``(Hugging Face name, tensor)`` pairs into a vLLM model runner in place."""
    # The model runner's layer-wise reload writes each tensor and re-packs the layers (on CPU the
    # linear layers keep a packed copy of their weight, which a plain ``model.load_weights`` misses).
    model_runner.reload_weights(weights_iterator=iter(weights))
    if tied_embeddings:
        # A tied lm_head shares the embedding's parameter but keeps its own packed copy until
        # it is processed again; without this the logits come from the old weights.
        model = model_runner.get_model()
        lm_head = getattr(model, "lm_head", None)
        method = getattr(lm_head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(lm_head)


class WeightSync:
    """Mixed into vLLM's worker class; called with ``llm.collective_rpc("repo_rl_load_weights", args=(path, tied))``."""

    def repo_rl_load_weights(self, path: str, tied_embeddings: bool) -> int:
        from safetensors.torch import load_file

        weights = load_file(path)
        reload_into(self.model_runner, weights.items(), tied_embeddings)
        return len(weights)
