"""Character-level tokenizer of the toy world, built offline with ``tokenizers``.

One token per character (a BPE model with no merges), plus ``<pad>`` (id 0) and ``<eos>``
(id 1). No BOS, no chat template, no post-processor: ``tokenizer(text)`` gives exactly one id
per character, so prompt and completion ids can be concatenated freely.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from .world import OP_POOL

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)

#: Every printable ASCII character, then the non-ASCII operator symbols.
CHARS: tuple[str, ...] = tuple(chr(c) for c in range(32, 127)) + tuple(
    c for c in OP_POOL if ord(c) > 127
)


def vocab() -> dict[str, int]:
    v = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for c in CHARS:
        v[c] = len(v)
    return v


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The toy world's tokenizer as a ``PreTrainedTokenizerFast`` (left padding for generation)."""
    tok = Tokenizer(models.BPE(vocab=vocab(), merges=[], unk_token=UNK_TOKEN))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
    return fast


class CharCodec:
    """Fast pure-Python char <-> id mapping, identical to :func:`build_tokenizer` (used for the
    warm start, where calling the tokenizer per sample would be the bottleneck)."""

    def __init__(self) -> None:
        self.stoi = vocab()
        self.itos = {i: s for s, i in self.stoi.items()}
        self.pad_id = self.stoi[PAD_TOKEN]
        self.eos_id = self.stoi[EOS_TOKEN]

    def encode(self, text: str) -> list[int]:
        return [self.stoi[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[i] for i in ids if i >= len(SPECIAL_TOKENS))
