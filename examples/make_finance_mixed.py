"""Build examples/data/finance_mixed.jsonl: math, multiple-choice and open finance questions in one
file, each row tagged with its ``domain`` for ``reward.by_domain``.

    python examples/make_finance_mixed.py [--rows-per-domain 20] [--seed 0] [--out examples/data/finance_mixed.jsonl]

- ``math``: interest arithmetic with a number as the answer (scored by ``math``);
- ``mcq``: which instrument or ratio fits a description, four options, a letter as the answer
  (scored by ``choice``);
- ``finance``: open questions whose answer is a short phrase or a sentence, which no rule-based
  verifier can check (scored by ``judge``).

Every row has an expert ``solution`` for RePO. The rows are made up for the example; they are
not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

MCQ = [
    ("A debt security whose holder receives fixed coupons and the face value at maturity.", "bond",
     ["bond", "common share", "call option", "futures contract"]),
    ("The right, but not the obligation, to buy an asset at a set price before a set date.", "call option",
     ["put option", "call option", "forward contract", "preferred share"]),
    ("Net income divided by shareholders' equity.", "return on equity",
     ["return on assets", "return on equity", "current ratio", "price-to-earnings ratio"]),
    ("Current assets divided by current liabilities.", "current ratio",
     ["quick ratio", "debt-to-equity ratio", "current ratio", "interest coverage ratio"]),
    ("A fund whose shares trade on an exchange throughout the day and usually track an index.", "exchange-traded fund",
     ["mutual fund", "hedge fund", "exchange-traded fund", "money market account"]),
]

OPEN = [
    ("Why does a bond's price fall when market interest rates rise?",
     "Its fixed coupons are worth less than new bonds paying the higher rate, so its price falls until its yield matches the market.",
     "New bonds pay the higher rate. An old bond's fixed coupons are then less attractive, so buyers pay less for it: "
     "the price drops until its yield to maturity equals the market rate."),
    ("What does diversification reduce in a portfolio, and what does it not reduce?",
     "It reduces unsystematic (company-specific) risk but not systematic (market) risk.",
     "Holding many assets averages away risks specific to one company (unsystematic risk). Risk common to the whole "
     "market (systematic risk) remains whatever the number of holdings."),
    ("What is the main difference between a forward contract and a futures contract?",
     "A futures contract is standardised and traded on an exchange with daily settlement; a forward is a private over-the-counter agreement.",
     "Both fix a price today for a later trade. Futures are standardised, exchange-traded and marked to market daily "
     "through a clearing house; forwards are customised bilateral contracts settled at the end."),
    ("What does a company's free cash flow measure?",
     "The cash from operations left after capital expenditures, available to pay investors.",
     "Free cash flow = operating cash flow - capital expenditure: the cash the business generates that it can pay out to "
     "debt and equity holders without harming its operations."),
    ("Why is inflation bad for holders of long-term fixed-rate bonds?",
     "It erodes the real value of the fixed coupons and principal, and usually raises interest rates, lowering the bond's price.",
     "Fixed nominal payments buy less when prices rise, and higher expected inflation pushes rates up, which lowers the "
     "price of existing long bonds."),
]


def math_row(rng: random.Random, i: int) -> dict:
    p, r, t = rng.choice([500, 800, 1000, 1200, 2000, 2500]), rng.choice([2, 3, 4, 5, 6]), rng.choice([2, 3, 4, 5])
    interest = p * r * t // 100
    return {"id": f"math-{i}", "domain": "math",
            "prompt": f"A deposit of ${p} earns simple interest at {r}% per year. How many dollars of interest does it earn in {t} years?",
            "answer": str(interest),
            "solution": f"I = P r t = {p} x {r}/100 x {t} = {interest}. The answer is \\boxed{{{interest}}}."}


def mcq_row(rng: random.Random, i: int) -> dict:
    desc, right, options = MCQ[i % len(MCQ)]
    opts = options[:]
    rng.shuffle(opts)
    letter = "ABCD"[opts.index(right)]
    lines = "\n".join(f"({'ABCD'[k]}) {o}" for k, o in enumerate(opts))
    return {"id": f"mcq-{i}", "domain": "mcq", "prompt": f"Which term fits this description?\n{desc}\n{lines}\nAnswer with the letter.",
            "answer": letter, "solution": f"It describes a {right}, option ({letter}). The answer is ({letter})."}


def open_row(rng: random.Random, i: int) -> dict:
    q, a, s = OPEN[i % len(OPEN)]
    return {"id": f"fin-{i}", "domain": "finance", "prompt": q, "answer": a, "solution": s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows-per-domain", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "data" / "finance_mixed.jsonl"))
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    rows = []
    for i in range(args.rows_per_domain):
        rows += [math_row(rng, i), mcq_row(rng, i), open_row(rng, i)]
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
