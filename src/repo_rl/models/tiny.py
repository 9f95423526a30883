"""Tiny random models and character tokenizers, built offline (no hub access).

For smoke tests, benchmarks and examples that must run offline: a character-level
``PreTrainedTokenizerFast`` built with the ``tokenizers`` library (:func:`make_char_tokenizer`)
and a randomly initialised ``Qwen2ForCausalLM`` built from a config (:func:`make_tiny_qwen2`;
:func:`save_tiny_model_dir` also writes model and tokenizer to a directory that
``from_pretrained`` loads). The weights are random: these models are for timing and plumbing,
not for quality. The same arguments and seed give the same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"

#: Lower-case letters, digits and the punctuation of small arithmetic prompts.
CHARS: tuple[str, ...] = tuple("abcdefghijklmnopqrstuvwxyz0123456789 +-=?.,:;|()[]{}\\\n")


def make_char_tokenizer(
    chars: Iterable[str] = CHARS,
    *,
    eos_last: bool = False,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per character (a BPE model with no merges), built offline.

    Ids: ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, then ``chars`` in order. With ``eos_last=True``
    the order is ``<pad>``, ``<unk>``, ``chars``, ``<eos>``: EOS is the last id, so a model with
    ``len(tok) - 1`` outputs can never sample it (every completion runs to its full length).
    Characters outside ``chars`` map to ``<unk>``; decoding joins tokens without spaces.
    ``model_max_length``: set on the tokenizer when given (else the ``transformers`` default).
    """
    chars = list(chars)
    if eos_last:
        tokens = [PAD_TOKEN, UNK_TOKEN] + chars + [EOS_TOKEN]
    else:
        tokens = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN] + chars
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN)
    if model_max_length is not None:
        out.model_max_length = model_max_length
    return out


def make_tiny_qwen2(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    intermediate_size: int | None = None,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 512,
    vocab_size: int | None = None,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A randomly initialised ``Qwen2ForCausalLM`` sized for ``tokenizer``.

    Tied input/output embeddings, no BOS; ``pad_token_id`` and ``eos_token_id`` come from the
    tokenizer and are also set in the model's generation config. ``intermediate_size`` defaults
    to ``2 * hidden_size``, ``vocab_size`` to ``len(tokenizer)`` (pass ``len(tokenizer) - 1``
    with an ``eos_last`` tokenizer to keep EOS out of the model's outputs). The weights are
    drawn after ``torch.manual_seed(seed)`` (this reseeds torch's global generator).
    """
    cfg = Qwen2Config(
        vocab_size=len(tokenizer) if vocab_size is None else vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size if intermediate_size is None else intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny_model_dir(path: str | Path, tokenizer: PreTrainedTokenizerFast, **model_kwargs) -> Qwen2ForCausalLM:
    """Build :func:`make_tiny_qwen2` ``(tokenizer, **model_kwargs)``, save it and ``tokenizer``
    to ``path`` (loadable with ``from_pretrained``) and return the model."""
    model = make_tiny_qwen2(tokenizer, **model_kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model
