"""The toy world's tiny causal LM: a ``LlamaForCausalLM`` built from a config (~0.85M params).

Llama rather than Qwen2: for ``model_type: qwen2`` transformers 5's ``AutoTokenizer`` forces its
byte-level ``Qwen2Tokenizer`` onto any ``tokenizer.json``, which would silently break this
character-level tokenizer (spaces and non-ASCII symbols). For ``llama`` it loads the saved
tokenizer as it is.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from .tokenizer import EOS_TOKEN, PAD_TOKEN, vocab
from .world import ToyWorldConfig


def model_config(cfg: ToyWorldConfig) -> LlamaConfig:
    v = vocab()
    return LlamaConfig(
        vocab_size=len(v),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        eos_token_id=v[EOS_TOKEN],
        pad_token_id=v[PAD_TOKEN],
        bos_token_id=None,
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
    )


def build_model(cfg: ToyWorldConfig, seed: int | None = None) -> LlamaForCausalLM:
    """A freshly initialised model (fp32) for ``cfg``; ``seed`` defaults to ``cfg.ws_seed``."""
    torch.manual_seed(cfg.ws_seed if seed is None else seed)
    mc = model_config(cfg)
    model = LlamaForCausalLM(mc)
    v = vocab()
    model.generation_config = GenerationConfig(
        eos_token_id=v[EOS_TOKEN], pad_token_id=v[PAD_TOKEN], do_sample=False,
        max_new_tokens=64,
    )
    return model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
