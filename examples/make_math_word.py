"""Generate the small math word-problem set with expert solutions used by configs/smollm2_math.yaml.

    python examples/make_math_word.py            # writes examples/data/math_word.jsonl
    python examples/make_math_word.py --n 60 --seed 1 --exclude examples/data/math_word.jsonl --id-prefix mwe \
        --out examples/data/math_word_eval.jsonl    # the held-out evaluation set

Seeded and deterministic. Each row: id, prompt, answer (an integer), solution (an expert
solution in plain English ending with a boxed answer), domain (the template family).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Sara", "Omar", "Lena", "Ravi", "Mia", "Tom", "Aiko", "Ben", "Nora", "Liam"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells"]


def add_sub(rng):
    n, it = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(5, 40), rng.randint(2, 30), rng.randint(1, 20)
    ans = a + b - c
    q = f"{n} has {a} {it}. {n} gets {b} more and then gives away {c}. How many {it} does {n} have now?"
    s = f"Start with {a} {it}. After getting {b} more there are {a} + {b} = {a + b}. Giving away {c} leaves {a + b} - {c} = {ans}. The answer is \\boxed{{{ans}}}."
    return q, ans, s


def groups(rng):
    n, it = rng.choice(NAMES), rng.choice(ITEMS)
    g, k, extra = rng.randint(3, 12), rng.randint(2, 9), rng.randint(1, 15)
    ans = g * k + extra
    q = f"{n} packs {it} into {g} boxes with {k} {it} in each box, and has {extra} {it} left over. How many {it} did {n} have?"
    s = f"The boxes hold {g} x {k} = {g * k} {it}. Adding the {extra} left over gives {g * k} + {extra} = {ans}. The answer is \\boxed{{{ans}}}."
    return q, ans, s


def share(rng):
    n, it = rng.choice(NAMES), rng.choice(ITEMS)
    people, each = rng.randint(2, 9), rng.randint(3, 12)
    total = people * each
    kept = rng.randint(1, each - 1)
    ans = people * (each - kept)
    q = (f"{n} shares {total} {it} equally among {people} friends. Each friend then gives {kept} {it} back to {n}'s sister. "
         f"How many {it} do the friends have left in total?")
    s = (f"Each friend first gets {total} / {people} = {each}. After giving back {kept}, each has {each} - {kept} = {each - kept}. "
         f"Together the {people} friends have {people} x {each - kept} = {ans}. The answer is \\boxed{{{ans}}}.")
    return q, ans, s


def rate(rng):
    n = rng.choice(NAMES)
    speed, hours, back = rng.randint(3, 15), rng.randint(2, 6), rng.randint(1, 10)
    ans = speed * hours - back
    q = f"{n} walks {speed} km every hour for {hours} hours, then walks {back} km back the way they came. How far from the start is {n}, in km?"
    s = f"In {hours} hours {n} covers {speed} x {hours} = {speed * hours} km. Walking {back} km back leaves {speed * hours} - {back} = {ans} km. The answer is \\boxed{{{ans}}}."
    return q, ans, s


def percent(rng):
    n, it = rng.choice(NAMES), rng.choice(ITEMS)
    base = rng.choice([20, 40, 50, 60, 80, 100, 120, 200])
    pct = rng.choice([10, 25, 50, 75])
    ans = base - base * pct // 100
    q = f"{n} had {base} {it} and lost {pct}% of them. How many {it} does {n} have left?"
    s = f"{pct}% of {base} is {base} x {pct} / 100 = {base * pct // 100}. Then {base} - {base * pct // 100} = {ans} remain. The answer is \\boxed{{{ans}}}."
    return q, ans, s


FAMILIES = {"add_sub": add_sub, "groups": groups, "share": share, "rate": rate, "percent": percent}


def generate(n: int = 100, seed: int = 0, prefix: str = "mw") -> list[dict]:
    rng = random.Random(seed)
    rows = []
    names = sorted(FAMILIES)
    for i in range(n):
        fam = names[i % len(names)]
        q, ans, s = FAMILIES[fam](rng)
        rows.append({"id": f"{prefix}{i:03d}", "prompt": q, "answer": str(ans), "solution": s, "domain": fam})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="rows (default 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "data" / "math_word.jsonl"))
    ap.add_argument("--id-prefix", default="mw")
    ap.add_argument("--exclude", default=None, help="JSONL whose prompts must not appear (a training set)")
    args = ap.parse_args()
    banned = set()
    if args.exclude:
        banned = {json.loads(line)["prompt"] for line in open(args.exclude) if line.strip()}
    rows = [r for r in generate(args.n + len(banned), args.seed, args.id_prefix) if r["prompt"] not in banned][: args.n]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    print(f"{out}: {len(rows)} rows")


if __name__ == "__main__":
    main()
