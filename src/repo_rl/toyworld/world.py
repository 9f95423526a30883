"""The toy world: a seeded, procedurally generated task family for RePO.

Task ("easy" and "hard" splits)
    Prompt ``Q<a><op>?`` where ``a`` is a zero-padded ``num_digits`` string and ``op`` one
    operator symbol. Every operator has a secret key ``K_op`` (``num_digits`` digits, 1-9, a
    made-up fact). The answer is digit-wise ``(a_i + K_i) mod 10``.

    * easy operators: their keys are taught in the warm start;
    * hard operators: keys, and even the symbols, never appear in the warm start; a random
      guess of the answer succeeds ~1 time in 10**num_digits.

Native style (what the policy writes), most significant digit first, key first::

    Q3719M?  ->  k4827;3+4=7,7+8=5,1+2=3,9+7=6;=7536.

General family ("general" split, never used by RL): digit-wise subtraction mod 10, in another
format::

    P3719-2046?  ->  3-2=1,7-0=7,1-4=7,9-6=3;=1773.

Expert ("foreign") solutions stand for a stronger model's trace. Two variants:

* ``basic``: units first, brackets, key last; rephrasing is copying::

      [9 7:6][1 2:3][7 8:5][3 4:7]K=4827=>7536

* ``hard_rephrase``: digits written as letters (a=0 ... j=9), entries tagged with their place
  (``@0`` = units) in shuffled order, plus a struck-out wrong entry (``~``) as a distractor.
  A fraction ``implicit_frac`` of traces are *terse*: they give each place's result but never
  the key digits. The warm start teaches the policy to read the explicit traces only, so a
  terse trace on a hard operator (whose key the policy does not know) usually cannot be
  rephrased into a correct native solution: rephrasing succeeds on some hard items and fails
  on others. Example (explicit, then terse)::

      @0(j+h)g;~@2(h+a)h;@2(h+i)f;@3(d+e)h;@1(b+c)d;=>hfdg
      @0(j)g;~@2(h)h;@2(h)f;@3(d)h;@1(b)d;=>hfdg

Rephrase prompt: ``REPHRASE_TEMPLATE.format(question=prompt, solution=expert)``, e.g.
``RQ3719M?|[9 7:6][1 2:3][7 8:5][3 4:7]K=4827=>7536|``; the target is the native solution.

Verification only looks at the final answer (``;=<digits>``), as a math verifier would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = [
    "WORLD_VERSION",
    "ToyWorldConfig",
    "REPHRASE_TEMPLATE",
    "SPLITS",
    "World",
    "get_world",
    "generate_rows",
    "write_datasets",
    "extract_answer",
    "parse_native",
    "parse_expert",
    "toy_reward",
    "native_solution",
    "general_solution",
    "expert_solution",
]

#: Bumped whenever the task formats or the warm start change, so cached models are rebuilt.
WORLD_VERSION = 1

#: Rephrase prompt P(q, k). The target is the native solution of ``question``.
REPHRASE_TEMPLATE = "R{question}|{solution}|"

SPLITS = ("easy", "hard", "hard_heldout", "general")

#: Operator symbols: ASCII capitals that are not markers (K, P, Q, R), then Greek capitals
#: (only used when more than 22 operators are asked for).
OP_POOL_ASCII = tuple(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in "KPQR")
OP_POOL = OP_POOL_ASCII + tuple("ΓΔΘΛΞΠΣΦΨΩ")

#: Letter notation of digits in the hard_rephrase expert style.
LETTERS = "abcdefghij"

# Fields that only size data sets or set run-time resources: they do not change the model and
# are left out of the cache key.
# implicit_frac is one of them: the warm start only ever shows explicit expert traces.
_DATA_ONLY_FIELDS = frozenset({"n_train", "train_easy_frac", "n_eval", "data_seed", "ws_threads",
                               "implicit_frac"})


@dataclass
class ToyWorldConfig:
    """Settings of the toy world, its tiny model and its warm start."""

    # --- world -------------------------------------------------------------------------------
    seed: int = 0
    """World seed: operator symbols, secret keys and held-out values all follow from it."""
    variant: str = "basic"
    """Expert style: "basic" (expert text contains the key) or "hard_rephrase"."""
    n_easy_ops: int = 12
    """Operators whose keys the warm start teaches."""
    n_hard_ops: int = 4
    """Operators never seen in the warm start (the knowledge RePO must inject)."""
    n_throwaway_ops: int = 6
    """Extra symbols used only in warm-start rephrase data, each time with a fresh random key."""
    num_digits: int = 4
    """Digits of ``a`` and of every key and answer."""
    heldout_frac: float = 0.1
    """Fraction of ``a`` values reserved for held-out evaluation (never in train rows)."""
    implicit_frac: float = 0.4
    """hard_rephrase only: fraction of expert traces that omit the key (terse style)."""
    # --- data sets ---------------------------------------------------------------------------
    n_train: int = 2000
    """Rows in the RL train file written by ``write_datasets``."""
    train_easy_frac: float = 0.5
    """Fraction of easy rows in the train file (the rest are hard)."""
    n_eval: int = 200
    """Rows in each eval file (easy, hard, general)."""
    data_seed: int = 0
    """Seed of the rows drawn by ``write_datasets``."""
    # --- model (LlamaForCausalLM) --------------------------------------------------------------
    hidden_size: int = 128
    """Model width."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads (also key/value heads)."""
    intermediate_size: int = 384
    """MLP width."""
    max_position_embeddings: int = 256
    """Longest sequence the model handles (rephrase prompt + solution is ~110 tokens)."""
    # --- warm start ----------------------------------------------------------------------------
    ws_steps: int = 800
    """Warm-start optimizer steps."""
    ws_batch_size: int = 96
    """Sequences per warm-start step."""
    ws_lr: float = 2e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 10%)."""
    ws_warmup: int = 50
    """Warmup steps."""
    ws_weight_decay: float = 0.01
    """AdamW weight decay."""
    ws_seed: int = 0
    """Seed of the warm-start data stream and of the model initialisation."""
    ws_mix: tuple[float, float, float, float] = (0.35, 0.2, 0.15, 0.3)
    """Batch mix: native easy, general, rephrase on easy ops, rephrase on throwaway ops."""
    ws_threads: int = 2
    """torch threads used by the warm start."""
    ws_bf16: bool = True
    """bf16 autocast on CPU during the warm start (faster than fp32 there)."""

    def __post_init__(self) -> None:
        if self.variant not in ("basic", "hard_rephrase"):
            raise ValueError(f"ToyWorldConfig.variant must be 'basic' or 'hard_rephrase', got {self.variant!r}")
        n_ops = self.n_easy_ops + self.n_hard_ops + self.n_throwaway_ops
        if n_ops > len(OP_POOL):
            raise ValueError(
                f"ToyWorldConfig: n_easy_ops + n_hard_ops + n_throwaway_ops = {n_ops} but only "
                f"{len(OP_POOL)} operator symbols exist; lower one of them"
            )
        if self.n_easy_ops < 1 or self.n_hard_ops < 1:
            raise ValueError("ToyWorldConfig: n_easy_ops and n_hard_ops must be >= 1")
        if not 1 <= self.num_digits <= 8:
            raise ValueError(f"ToyWorldConfig.num_digits must be in 1..8, got {self.num_digits}")
        if not 0.0 < self.heldout_frac < 1.0:
            raise ValueError(f"ToyWorldConfig.heldout_frac must be in (0, 1), got {self.heldout_frac}")
        if not 0.0 <= self.implicit_frac <= 1.0:
            raise ValueError(f"ToyWorldConfig.implicit_frac must be in [0, 1], got {self.implicit_frac}")
        if not 0.0 <= self.train_easy_frac <= 1.0:
            raise ValueError(f"ToyWorldConfig.train_easy_frac must be in [0, 1], got {self.train_easy_frac}")
        self.ws_mix = tuple(float(x) for x in self.ws_mix)  # type: ignore[assignment]
        if len(self.ws_mix) != 4 or min(self.ws_mix) < 0 or sum(self.ws_mix) <= 0:
            raise ValueError(f"ToyWorldConfig.ws_mix must be 4 non-negative weights, got {self.ws_mix}")
        if self.hidden_size % self.num_heads:
            raise ValueError("ToyWorldConfig.hidden_size must be divisible by num_heads")

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ws_mix"] = list(self.ws_mix)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ToyWorldConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"ToyWorldConfig: unknown keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    def model_key(self) -> dict[str, Any]:
        """The settings that determine the warm-started weights (world + model + warm start)."""
        d = {k: v for k, v in self.to_dict().items() if k not in _DATA_ONLY_FIELDS}
        d["world_version"] = WORLD_VERSION
        return d

    def model_hash(self) -> str:
        """Short stable hash of :meth:`model_key`, used as the cache directory name."""
        blob = json.dumps(self.model_key(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# The world's hidden facts
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class World:
    """Symbols, keys and value partitions derived from a config (seed + sizes)."""

    num_digits: int
    easy_ops: tuple[str, ...]
    hard_ops: tuple[str, ...]
    throwaway_ops: tuple[str, ...]
    keys: dict = field(hash=False, compare=False)  # op -> tuple of digits (easy and hard ops)
    train_values: tuple[int, ...] = field(hash=False, compare=False)
    heldout_values: tuple[int, ...] = field(hash=False, compare=False)

    def fmt(self, v: int) -> str:
        return str(v).zfill(self.num_digits)


@lru_cache(maxsize=32)
def _world(seed: int, n_easy: int, n_hard: int, n_throw: int, num_digits: int, heldout_frac: float) -> World:
    rng = random.Random(f"toyworld-symbols-{seed}")
    n_ops = n_easy + n_hard + n_throw
    # ASCII symbols first; Greek ones only when the ASCII ones run out.
    pool = list(OP_POOL_ASCII) + list(OP_POOL[len(OP_POOL_ASCII):])
    pool = pool[:max(n_ops, len(OP_POOL_ASCII))]
    rng.shuffle(pool)
    easy = tuple(pool[:n_easy])
    hard = tuple(pool[n_easy:n_easy + n_hard])
    throw = tuple(pool[n_easy + n_hard:n_easy + n_hard + n_throw])
    krng = random.Random(f"toyworld-keys-{seed}")
    keys: dict[str, tuple[int, ...]] = {}
    seen: set[tuple[int, ...]] = set()
    for op in easy + hard:
        while True:
            k = tuple(krng.randint(1, 9) for _ in range(num_digits))
            if k not in seen:
                break
        seen.add(k)
        keys[op] = k
    vrng = random.Random(f"toyworld-heldout-{seed}")
    values = list(range(10 ** num_digits))
    vrng.shuffle(values)
    n_held = max(1, int(round(heldout_frac * len(values))))
    held = tuple(sorted(values[:n_held]))
    train = tuple(sorted(values[n_held:]))
    return World(num_digits, easy, hard, throw, keys, train, held)


def get_world(cfg: ToyWorldConfig) -> World:
    """The hidden facts of ``cfg``'s world (cached)."""
    return _world(cfg.seed, cfg.n_easy_ops, cfg.n_hard_ops, cfg.n_throwaway_ops, cfg.num_digits,
                  float(cfg.heldout_frac))


# ----------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------
def _digits(s: str) -> list[int]:
    return [int(c) for c in s]


def key_answer(a: str, key: Sequence[int]) -> str:
    return "".join(str((int(x) + k) % 10) for x, k in zip(a, key))


def native_solution(a: str, key: Sequence[int]) -> str:
    """Native style: ``k4827;3+4=7,7+8=5,1+2=3,9+7=6;=7536.``"""
    ans = key_answer(a, key)
    steps = ",".join(f"{x}+{k}={r}" for x, k, r in zip(a, key, ans))
    return f"k{''.join(map(str, key))};{steps};={ans}."


def general_answer(a: str, b: str) -> str:
    return "".join(str((int(x) - int(y)) % 10) for x, y in zip(a, b))


def general_solution(a: str, b: str) -> str:
    """Native style of the general family: ``3-2=1,7-0=7,1-4=7,9-6=3;=1773.``"""
    ans = general_answer(a, b)
    steps = ",".join(f"{x}-{y}={r}" for x, y, r in zip(a, b, ans))
    return f"{steps};={ans}."


def general_expert(a: str, b: str) -> str:
    """Foreign style of the general family (units first): ``[9-6:3][1-4:7][7-0:7][3-2:1]=>1773``"""
    ans = general_answer(a, b)
    body = "".join(f"[{x}-{y}:{r}]" for x, y, r in reversed(list(zip(a, b, ans))))
    return f"{body}=>{ans}"


def _basic_expert(a: str, key: Sequence[int]) -> str:
    ans = key_answer(a, key)
    body = "".join(f"[{x} {k}:{r}]" for x, k, r in reversed(list(zip(a, key, ans))))
    return f"{body}K={''.join(map(str, key))}=>{ans}"


def _hard_expert(a: str, key: Sequence[int], rng: random.Random, implicit: bool) -> str:
    n = len(a)
    ans = key_answer(a, key)
    L = LETTERS
    entries = []
    for i, (x, k, r) in enumerate(zip(a, key, ans)):
        place = n - 1 - i  # @0 = units
        if implicit:
            entries.append(f"@{place}({L[int(x)]}){L[int(r)]};")
        else:
            entries.append(f"@{place}({L[int(x)]}+{L[k]}){L[int(r)]};")
    # one struck-out distractor: a wrong key digit / wrong result for a random place
    i = rng.randrange(n)
    x, k, r = int(a[i]), key[i], int(ans[i])
    k_bad = (k + rng.randint(1, 8)) % 10
    r_bad = (x + k_bad) % 10
    if implicit:
        entries.append(f"~@{n - 1 - i}({L[x]}){L[r_bad]};")
    else:
        entries.append(f"~@{n - 1 - i}({L[x]}+{L[k_bad]}){L[r_bad]};")
    rng.shuffle(entries)
    return "".join(entries) + "=>" + "".join(L[int(c)] for c in ans)


def expert_solution(cfg: ToyWorldConfig, a: str, key: Sequence[int], rng: random.Random,
                    implicit: bool | None = None) -> str:
    """Expert (foreign-style) solution of ``Q<a><op>?`` for the config's variant."""
    if cfg.variant == "basic":
        return _basic_expert(a, key)
    if implicit is None:
        implicit = rng.random() < cfg.implicit_frac
    return _hard_expert(a, key, rng, implicit)


# ----------------------------------------------------------------------------------------------
# Parsers
# ----------------------------------------------------------------------------------------------
_FINAL_RE = re.compile(r";=(\d+)")
_NATIVE_RE = re.compile(r"^k(\d+);((?:\d\+\d=\d,?)+);=(\d+)\.$")
_GENERAL_RE = re.compile(r"^((?:\d-\d=\d,?)+);=(\d+)\.$")
_QUESTION_RE = re.compile(r"^Q(\d+)(.)\?$")
_GENERAL_Q_RE = re.compile(r"^P(\d+)-(\d+)\?$")


def extract_answer(completion: str) -> str | None:
    """Final answer of a native-style completion: the digits after the last ``;=``."""
    m = _FINAL_RE.findall(completion)
    return m[-1] if m else None


def parse_native(text: str) -> dict[str, Any] | None:
    """Parse a complete native solution (key family or general family); None if malformed."""
    m = _NATIVE_RE.match(text)
    if m:
        steps = [s for s in m.group(2).split(",") if s]
        return {"key": m.group(1), "steps": steps, "answer": m.group(3)}
    m = _GENERAL_RE.match(text)
    if m:
        steps = [s for s in m.group(1).split(",") if s]
        return {"key": None, "steps": steps, "answer": m.group(2)}
    return None


def parse_question(prompt: str) -> dict[str, str] | None:
    m = _QUESTION_RE.match(prompt)
    if m:
        return {"a": m.group(1), "op": m.group(2)}
    m = _GENERAL_Q_RE.match(prompt)
    if m:
        return {"a": m.group(1), "b": m.group(2)}
    return None


_BASIC_ENTRY = re.compile(r"\[(\d) (\d):(\d)\]")
_GENERAL_ENTRY = re.compile(r"\[(\d)-(\d):(\d)\]")
_HARD_ENTRY = re.compile(r"(~?)@(\d+)\(([a-j])(?:\+([a-j]))?\)([a-j]);")


def parse_expert(text: str) -> dict[str, Any]:
    """Read an expert (foreign-style) solution.

    Returns ``{"answer", "digits", "key"}``: ``answer`` from the final ``=>`` part, ``digits``
    the answer rebuilt from the per-place entries (most significant first), ``key`` the key
    digits when the trace states them (else None). Raises ValueError on unknown text.
    """
    if "=>" not in text:
        raise ValueError(f"not an expert solution: {text!r}")
    body, final = text.rsplit("=>", 1)
    if final and set(final) <= set(LETTERS):  # hard_rephrase style
        answer = "".join(str(LETTERS.index(c)) for c in final)
        places: dict[int, tuple[str, str | None]] = {}
        pos = 0
        for m in _HARD_ENTRY.finditer(body):
            if m.start() != pos:
                raise ValueError(f"unparsable expert entry at {pos} in {text!r}")
            pos = m.end()
            struck, place, _x, k, r = m.groups()
            if struck:
                continue
            places[int(place)] = (str(LETTERS.index(r)), None if k is None else str(LETTERS.index(k)))
        if pos != len(body):
            raise ValueError(f"trailing text in expert solution {text!r}")
        n = len(final)
        if sorted(places) != list(range(n)):
            raise ValueError(f"expert solution lacks places: {text!r}")
        digits = "".join(places[p][0] for p in reversed(range(n)))
        keys = [places[p][1] for p in reversed(range(n))]
        key = None if any(k is None for k in keys) else "".join(keys)  # type: ignore[arg-type]
        return {"answer": answer, "digits": digits, "key": key}
    if not final.isdigit():
        raise ValueError(f"not an expert solution: {text!r}")
    key = None
    if "K=" in body:
        body, key = body.split("K=", 1)
    entries = _BASIC_ENTRY.findall(body) or _GENERAL_ENTRY.findall(body)
    digits = "".join(r for _x, _k, r in reversed(entries))
    return {"answer": final, "digits": digits, "key": key}


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------
def _split_rng(cfg: ToyWorldConfig, split: str, seed: int) -> random.Random:
    return random.Random(f"toyworld-rows-{cfg.seed}-{split}-{seed}")


def generate_rows(cfg: ToyWorldConfig, split: str, n: int, seed: int) -> list[dict]:
    """``n`` rows of ``split`` ("easy", "hard", "hard_heldout" or "general"), deterministic in
    ``(cfg world settings, split, seed)``.

    Each row is ``{"id", "prompt", "answer", "solution", "domain"}``; ``solution`` is the expert
    (foreign-style) solution. "hard" rows use training values of ``a``; "hard_heldout" rows use
    the held-out values, which never appear in "hard" rows. ``domain`` is the task family
    ("easy", "hard" or "general"), so hard_heldout rows have domain "hard" (their id says
    ``hard_heldout-...``).
    """
    if split not in SPLITS:
        raise ValueError(f"generate_rows: split must be one of {SPLITS}, got {split!r}")
    w = get_world(cfg)
    rng = _split_rng(cfg, split, seed)
    rows = []
    all_values = range(10 ** cfg.num_digits)
    for i in range(n):
        rid = f"{split}-{seed}-{i}"
        if split == "general":
            a = w.fmt(rng.choice(all_values))
            b = w.fmt(rng.choice(all_values))
            rows.append({"id": rid, "prompt": f"P{a}-{b}?", "answer": general_answer(a, b),
                         "solution": general_expert(a, b), "domain": "general"})
            continue
        if split == "easy":
            op = rng.choice(w.easy_ops)
            a = w.fmt(rng.choice(all_values))
            domain = "easy"
        else:
            op = rng.choice(w.hard_ops)
            a = w.fmt(rng.choice(w.heldout_values if split == "hard_heldout" else w.train_values))
            domain = "hard"
        key = w.keys[op]
        rows.append({"id": rid, "prompt": f"Q{a}{op}?", "answer": key_answer(a, key),
                     "solution": expert_solution(cfg, a, key, rng), "domain": domain})
    return rows


def native_for_prompt(cfg: ToyWorldConfig, prompt: str) -> str:
    """The gold native solution of a question prompt (key or general family)."""
    q = parse_question(prompt)
    if q is None:
        raise ValueError(f"not a toy-world question: {prompt!r}")
    if "b" in q:
        return general_solution(q["a"], q["b"])
    w = get_world(cfg)
    if q["op"] not in w.keys:
        raise ValueError(f"operator {q['op']!r} has no key in this world")
    return native_solution(q["a"], w.keys[q["op"]])


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def write_datasets(cfg: ToyWorldConfig, out_dir: str | Path) -> dict[str, Path]:
    """Write ``train.jsonl`` (seeded mix of easy and hard rows) and eval files ``easy.jsonl``,
    ``hard.jsonl`` (held-out values of ``a``) and ``general.jsonl``. Returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = cfg.data_seed
    n_easy = int(round(cfg.n_train * cfg.train_easy_frac))
    train = generate_rows(cfg, "easy", n_easy, seed=1000 + s) + \
        generate_rows(cfg, "hard", cfg.n_train - n_easy, seed=2000 + s)
    random.Random(f"toyworld-train-mix-{cfg.seed}-{s}").shuffle(train)
    files = {
        "train": train,
        "easy": generate_rows(cfg, "easy", cfg.n_eval, seed=3000 + s),
        "hard": generate_rows(cfg, "hard_heldout", cfg.n_eval, seed=4000 + s),
        "general": generate_rows(cfg, "general", cfg.n_eval, seed=5000 + s),
    }
    paths = {}
    for name, rows in files.items():
        p = out / f"{name}.jsonl"
        _write_jsonl(p, rows)
        paths[name] = p
    return paths


# ----------------------------------------------------------------------------------------------
# Reward
# ----------------------------------------------------------------------------------------------
def _completion_text(c: Any) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict):  # conversational format
        return str(c[-1].get("content", ""))
    if isinstance(c, dict):
        return str(c.get("content", ""))
    return str(c)


def toy_reward(prompts: Sequence[Any] | None, completions: Sequence[Any], answer: Sequence[str],
               **kwargs: Any) -> list[float]:
    """TRL-style reward: 1.0 when the completion's final answer (``;=<digits>``) equals the gold
    ``answer`` exactly, else 0.0."""
    if len(completions) != len(answer):
        raise ValueError(f"toy_reward: {len(completions)} completions but {len(answer)} answers")
    out = []
    for c, gold in zip(completions, answer):
        got = extract_answer(_completion_text(c))
        out.append(1.0 if got is not None and got == str(gold).strip() else 0.0)
    return out
