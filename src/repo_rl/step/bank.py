"""The rephrase bank: earlier verified rephrases of the same run, shown as worked examples in the
rephrase prompt (``repo.fewshot``).

A small model often cannot follow a rephrase instruction it has never seen answered: left alone,
SmolLM2-135M writes long, drifting text around a copied number. Shown two of its own earlier
rephrases that passed ``repo.verify`` (as earlier chat turns, or earlier blocks of a plain-text
prompt), it answers in their short form. The bank holds no hand-written text: it starts empty
(the first rephrases are zero-shot) and the policy fills it. It keeps at most ``repo.bank_size``
entries, one per training prompt (a newer rephrase of the same prompt replaces the older one;
past the bound the oldest entry goes), and it is saved in every checkpoint, so a resumed run
shows the same examples.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class BankEntry:
    prompt_id: str
    """Id of the training row the rephrase answered."""
    question: str
    """Its question text (the ``{question}`` of the template)."""
    solution: str
    """Its expert solution (the ``{solution}`` of the template)."""
    text: str
    """The verified rephrase, as it was injected (meta text stripped)."""
    step: int
    """The step that sampled it."""


class RephraseBank:
    """Bounded, insertion-ordered store of :class:`BankEntry` (see the module docstring)."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"bank size must be >= 0, got {size}")
        self.size = int(size)
        self.entries: list[BankEntry] = []

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: BankEntry) -> None:
        """Keep ``entry``: it replaces an entry of the same prompt, and the oldest entry leaves past the bound."""
        if self.size == 0:
            return
        self.entries = [e for e in self.entries if e.prompt_id != entry.prompt_id]
        self.entries.append(entry)
        del self.entries[: max(0, len(self.entries) - self.size)]

    def pick(self, k: int, exclude_id: Optional[str], seed: int) -> list[BankEntry]:
        """``k`` entries of other prompts than ``exclude_id``, drawn with ``seed`` (fewer when the bank
        holds fewer), in bank order: the same seed and bank give the same examples."""
        pool = [i for i, e in enumerate(self.entries) if e.prompt_id != exclude_id]
        if k <= 0 or not pool:
            return []
        chosen = sorted(random.Random(seed).sample(pool, min(k, len(pool))))
        return [self.entries[i] for i in chosen]

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "entries": [asdict(e) for e in self.entries]}

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """Restore saved entries (a checkpoint without a bank leaves it empty); a smaller
        ``repo.bank_size`` than the run saved keeps the newest entries."""
        self.entries = []
        for e in (state or {}).get("entries", []):
            self.add(BankEntry(str(e["prompt_id"]), str(e["question"]), str(e["solution"]), str(e["text"]), int(e["step"])))


def warmup_rows(pool: list[int], count: int, seed: int) -> list[int]:
    """The rows ``repo.bank_warmup`` rephrases: ``count`` of ``pool`` (rows with a solution) in a
    seeded order, going round again when the pool is smaller."""
    order = list(pool)
    random.Random(seed).shuffle(order)
    return (order * (count // len(order) + 1))[:count] if order and count > 0 else []


__all__ = ["BankEntry", "RephraseBank", "warmup_rows"]
