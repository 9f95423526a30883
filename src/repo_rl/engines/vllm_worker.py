"""Runs inside vLLM's worker process (``worker_extension_cls``): in-place weight reload.

vLLM imports this module by name in its own process, so it must not import torch-heavy parts of
repo_rl. Tensors cannot travel as RPC arguments (they arrive as lists), so the trainer writes a
safetensors file and passes its path.
"""

from __future__ import annotations


class WeightSync:
    """Mixed into vLLM's worker class; called with ``llm.collective_rpc("repo_rl_load_weights", args=(path, tied))``."""

    def repo_rl_load_weights(self, path: str, tied_embeddings: bool) -> int:
        from safetensors.torch import load_file

        weights = load_file(path)
        # The model runner's layer-wise reload writes each tensor and re-packs the layers
        # (on CPU the linear layers keep a packed copy of their weight).
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        if tied_embeddings:
            # A tied lm_head shares the embedding's parameter but keeps its own packed copy until
            # it is processed again; without this the logits come from the old weights.
            model = self.model_runner.get_model()
            lm_head = getattr(model, "lm_head", None)
            method = getattr(lm_head, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(lm_head)
        return len(weights)
