"""A natural-language domain world for SmolLM2-135M-Instruct: made-up units it cannot know.

    python studies/domain_world/make_world.py [--seed 0] [--out studies/domain_world/data]

The land of Quorvia measures with invented units (plims, tazzes, vorns ...). Each *fact* is one
conversion rate, "1 plim = 4 tazzes", with a rate from 2 to 9. A question asks how many of the
small unit make ``n`` of the large one; the answer is ``n x rate``.

Why this world:

- **The fact cannot be guessed.** The unit names are invented and the rates random, so without the
  fact the model can only guess a number (accuracy near the chance of guessing ``n x rate``).
- **The reasoning around the fact is within reach.** With the fact in the prompt, ``n = 1`` is a
  copy and ``n <= 3`` a one-digit product, which a 135M instruct model partly manages.
- **The expert text is foreign.** Solutions are terse notation ("plim:tazz = 1:4 => 3*4 = 12"), not
  the model's chatty register, as real expert traces are.
- **Held-out items test the fact, not the item.** They use other numbers (``n`` = 4, 5) and other
  wording, and carry no expert text.

Files (JSONL rows ``{id, prompt, answer, solution?, fact, domain}``):

- ``train.jsonl``: every fact x n in {1, 2, 3} x 2 train wordings, with expert solutions;
- ``val.jsonl``: every fact x n in {2, 3}, a third wording (for learning-rate sweeps);
- ``heldout.jsonl``: every fact x n in {4, 5} x 2 held-out wordings, no solutions;
- ``general.jsonl``: one-step arithmetic word problems about ordinary things (apples, books ...),
  which the model partly solves before training, to show forgetting;
- ``facts.json``: the facts, and ``fact`` on every row, for the pre-training checks.

The version string is written to ``facts.json``; change it when the world changes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

VERSION = "domain-world-1"
UNITS = [("plim", "tazz", "tazzes"), ("vorn", "skell", "skells"), ("quade", "drib", "dribs"), ("marrel", "fenn", "fenns"),
         ("grost", "lune", "lunes"), ("bodkin", "pell", "pells"), ("carrow", "zint", "zints"), ("hask", "mote", "motes"),
         ("dwell", "ferrit", "ferrits"), ("yoller", "brim", "brims"), ("trask", "nib", "nibs"), ("wemble", "clot", "clots")]
TRAIN_WORDINGS = ["In Quorvia, how many {small} are in {n} {big}?",
                  "A Quorvian market sells {n} {big}. How many {small} is that?"]
VAL_WORDINGS = ["Convert {n} {big} to {small}, using Quorvian units."]
HELDOUT_WORDINGS = ["A traveller in Quorvia carries {n} {big}. Expressed in {small}, how much is that?",
                    "How many {small} does a Quorvian need to make {n} {big}?"]


def plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def fact_text(f: dict) -> str:
    return f"In Quorvia, 1 {f['big']} equals {f['rate']} {f['small_pl']}."


def solution(f: dict, n: int) -> str:
    """Terse expert notation, unlike the model's own register."""
    return f"{f['big']}:{f['small']} = 1:{f['rate']} => {n}*{f['rate']} = {n * f['rate']}. \\boxed{{{n * f['rate']}}}"


def rows_for(facts: list[dict], ns: list[int], wordings: list[str], split: str, with_solution: bool) -> list[dict]:
    rows = []
    for f in facts:
        for n in ns:
            for w, wording in enumerate(wordings):
                q = wording.format(n=n, big=plural(f["big"], n), small=f["small_pl"])
                row = {"id": f"{split}-{f['big']}-{n}-{w}", "prompt": q, "answer": str(n * f["rate"]), "fact": fact_text(f),
                       "domain": "quorvia"}
                if with_solution:
                    row["solution"] = solution(f, n)
                rows.append(row)
    return rows


def general_rows(rng: random.Random, count: int = 40) -> list[dict]:
    things = ["apples", "books", "pencils", "marbles", "cookies", "stamps", "shells", "coins"]
    names = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ravi", "Eva"]
    rows = []
    for i in range(count):
        a, b, name, thing = rng.randint(2, 9), rng.randint(2, 9), rng.choice(names), rng.choice(things)
        if i % 2 == 0:
            q, ans = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b
        else:
            a = a + b  # keep the difference positive
            q, ans = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?", a - b
        rows.append({"id": f"general-{i}", "prompt": q, "answer": str(ans), "domain": "general"})
    return rows


def build(seed: int = 0, n_facts: int | None = None) -> dict[str, list[dict]]:
    """The world of ``seed``; ``n_facts`` keeps its first facts only (the overfit check's small world:
    the same rates, fewer facts)."""
    rng = random.Random(seed)
    facts = [{"big": big, "small": small, "small_pl": small_pl, "rate": rng.randint(2, 9)} for big, small, small_pl in UNITS]
    facts = facts[:n_facts]
    return {
        "facts": facts,
        "train": rows_for(facts, [1, 2, 3], TRAIN_WORDINGS, "train", True),
        "val": rows_for(facts, [2, 3], VAL_WORDINGS, "val", True),
        "heldout": rows_for(facts, [4, 5], HELDOUT_WORDINGS, "heldout", False),
        "general": general_rows(rng),  # drawn after every fact's rate, so the same for any n_facts
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "data"))
    ap.add_argument("--facts", type=int, default=None, help="keep the first N facts only (default: all 12)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = build(args.seed, args.facts)
    (out / "facts.json").write_text(json.dumps({"version": VERSION, "seed": args.seed, "facts": world["facts"]}, indent=1) + "\n")
    for split in ("train", "val", "heldout", "general"):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in world[split]))
        print(f"{split}: {len(world[split])} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
