"""Tests of the embedded toy world: generator, formats, reward, tokenizer, shipped model, cache."""

from __future__ import annotations

import json
import os
import random
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")

from repo_rl import toyworld as tw  # noqa: E402
from repo_rl.toyworld import world as W  # noqa: E402
from repo_rl.toyworld.tokenizer import CHARS, CharCodec, build_tokenizer  # noqa: E402
from repo_rl.toyworld.warmstart import (  # noqa: E402
    META_FILE,
    ensure_model,
    shipped_weights,
    warm_start,
    warmstart_batch,
    warmstart_example,
)

VARIANTS = ("basic", "hard_rephrase")
Q_RE = re.compile(r"Q(\d{4})(.)\?")

# Documented accuracies of the shipped warm-started models (greedy, small samples here, so the
# bounds leave room for sampling noise; toyworld.json next to the weights holds n=400 numbers).
TARGETS = {
    "basic": {"easy": (0.95, 1.0), "hard": (0.0, 0.03), "general": (0.95, 1.0), "rephrase_hard": (0.95, 1.0)},
    "hard_rephrase": {"easy": (0.95, 1.0), "hard": (0.0, 0.03), "general": (0.95, 1.0),
                      "rephrase_hard": (0.3, 0.8)},
}


def _cfg(variant="basic", **kw):
    return tw.ToyWorldConfig(variant=variant, **kw)


# ----------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("split", W.SPLITS)
def test_rows_deterministic_and_seed_dependent(variant, split):
    cfg = _cfg(variant)
    a = tw.generate_rows(cfg, split, 50, seed=1)
    b = tw.generate_rows(cfg, split, 50, seed=1)
    c = tw.generate_rows(cfg, split, 50, seed=2)
    assert a == b
    assert [r["prompt"] for r in a] != [r["prompt"] for r in c]
    assert all(set(r) == {"id", "prompt", "answer", "solution", "domain"} for r in a)
    assert len({r["id"] for r in a}) == 50
    assert {r["domain"] for r in a} == {"hard" if split == "hard_heldout" else split}


def test_world_seed_changes_keys_and_symbols():
    w0, w1 = tw.get_world(_cfg(seed=0)), tw.get_world(_cfg(seed=1))
    assert w0.keys != w1.keys
    for w in (w0, w1):
        ops = w.easy_ops + w.hard_ops + w.throwaway_ops
        assert len(set(ops)) == len(ops)  # roles never share a symbol
        assert len(set(w.keys.values())) == len(w.keys)  # every key differs
        assert not set(w.train_values) & set(w.heldout_values)
    rows0 = tw.generate_rows(_cfg(seed=0), "hard", 20, seed=0)
    rows1 = tw.generate_rows(_cfg(seed=1), "hard", 20, seed=0)
    assert [r["answer"] for r in rows0] != [r["answer"] for r in rows1]


def test_heldout_values_never_in_train(tmp_path):
    cfg = _cfg("hard_rephrase", n_train=600, n_eval=150)
    w = tw.get_world(cfg)
    held = {w.fmt(v) for v in w.heldout_values}
    paths = tw.write_datasets(cfg, tmp_path)
    assert set(paths) == {"train", "easy", "hard", "general"}
    rows = {k: [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()] for k, p in paths.items()}
    train_hard = [r for r in rows["train"] if r["domain"] == "hard"]
    assert 0.4 < len(train_hard) / len(rows["train"]) < 0.6
    assert {r["domain"] for r in rows["train"]} == {"easy", "hard"}
    assert all(Q_RE.match(r["prompt"]).group(1) not in held for r in train_hard)
    assert all(Q_RE.match(r["prompt"]).group(1) in held for r in rows["hard"])
    assert all(Q_RE.match(r["prompt"]).group(2) in w.hard_ops for r in rows["hard"])
    assert len(rows["hard"]) == len(rows["easy"]) == len(rows["general"]) == 150
    # the generator's own hard / hard_heldout splits are disjoint in values too
    vals = {Q_RE.match(r["prompt"]).group(1) for r in tw.generate_rows(cfg, "hard", 2000, seed=5)}
    assert not vals & held
    # eval prompts do not repeat train prompts
    train_prompts = {r["prompt"] for r in rows["train"]}
    assert not train_prompts & {r["prompt"] for r in rows["hard"]}
    # deterministic
    again = tw.write_datasets(cfg, tmp_path / "again")
    assert all(again[k].read_bytes() == paths[k].read_bytes() for k in paths)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gold_answers_and_expert_solutions_agree(variant):
    cfg = _cfg(variant)
    w = tw.get_world(cfg)
    terse = 0
    n_key_rows = 0
    for split in W.SPLITS:
        for r in tw.generate_rows(cfg, split, 300, seed=3):
            native = W.native_for_prompt(cfg, r["prompt"])
            assert tw.toy_reward([r["prompt"]], [native], [r["answer"]]) == [1.0]
            parsed = tw.parse_native(native)
            assert parsed["answer"] == r["answer"]
            q = W.parse_question(r["prompt"])
            # recompute the answer independently of the module's helpers
            if "b" in q:
                want = "".join(str((int(x) - int(y)) % 10) for x, y in zip(q["a"], q["b"]))
            else:
                key = w.keys[q["op"]]
                want = "".join(str((int(x) + k) % 10) for x, k in zip(q["a"], key))
                assert parsed["key"] == "".join(map(str, key))
            assert r["answer"] == want
            # the expert text encodes the same answer, in its final part and in its entries
            e = tw.parse_expert(r["solution"])
            assert e["answer"] == r["answer"] and e["digits"] == r["answer"]
            assert r["solution"] != native  # foreign style
            if "b" not in q:
                n_key_rows += 1
                if e["key"] is None:
                    terse += 1
                else:
                    assert e["key"] == "".join(map(str, w.keys[q["op"]]))
    if variant == "basic":
        assert terse == 0
    else:
        assert 0.3 < terse / n_key_rows < 0.5  # implicit_frac = 0.4


def test_expert_styles_look_as_documented():
    cfg_b, cfg_h = _cfg("basic"), _cfg("hard_rephrase")
    assert W.expert_solution(cfg_b, "3719", (4, 8, 2, 7), random.Random(0)) == \
        "[9 7:6][1 2:3][7 8:5][3 4:7]K=4827=>7536"
    assert W.native_solution("3719", (4, 8, 2, 7)) == "k4827;3+4=7,7+8=5,1+2=3,9+7=6;=7536."
    assert W.general_solution("3719", "2046") == "3-2=1,7-0=7,1-4=7,9-6=3;=1773."
    for implicit in (False, True):
        text = W.expert_solution(cfg_h, "3719", (4, 8, 2, 7), random.Random(1), implicit=implicit)
        assert text.endswith("=>hfdg") and not re.search(r"\d{2}", text)
        assert text.count("~") == 1
        e = tw.parse_expert(text)
        assert e["answer"] == "7536" and e["key"] == (None if implicit else "4827")


def test_toy_reward():
    r = tw.toy_reward
    assert r(["q"] * 5, ["k1;1+1=2;=7536.", "junk;=7536", "=7536.", "k;=7535.", ";=75360."],
             ["7536"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    # last ;= wins, conversational completions work, kwargs are accepted
    assert r(None, [";=1111.;=2222.", [{"role": "assistant", "content": "x;=0042."}]], ["2222", "0042"],
             trainer_state=None) == [1.0, 1.0]
    with pytest.raises(ValueError):
        r(None, ["a"], ["1", "2"])


def test_reward_registered_when_registry_exists():
    try:
        from repo_rl.rewards import load_reward  # noqa: F401
    except ImportError:
        pytest.skip("rewards registry not available")
    from repo_rl.rewards import available_rewards

    assert "toy" in available_rewards()


# ----------------------------------------------------------------------------------------------
# Warm-start data
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_hard_ops_and_heldout_values_never_in_warmstart_data(variant):
    cfg = _cfg(variant)
    w = tw.get_world(cfg)
    held = {w.fmt(v) for v in w.heldout_values}
    rng = random.Random(0)
    codec = CharCodec()
    seen_kinds = set()
    texts = []
    for _ in range(30):
        chunks = warmstart_batch(cfg, w, rng, codec, 64, n_buckets=2)
        assert sum(x.shape[0] for x, _y in chunks) == 64
        for x, y in chunks:
            assert x.shape == y.shape
            texts += [codec.decode(row.tolist()) for row in x]
    for kind in range(4):
        for _ in range(200):
            p, t = warmstart_example(cfg, w, rng, kind)
            texts.append(p + t)
            seen_kinds.add(p[0])
    assert seen_kinds == {"Q", "P", "R"}
    hard = set(w.hard_ops)
    for text in texts:
        assert not hard & set(text), text
        m = Q_RE.search(text)
        if m:
            assert m.group(1) not in held
            assert m.group(2) in w.easy_ops + w.throwaway_ops
        if variant == "hard_rephrase" and text.startswith("R"):
            expert = text.split("|")[1]
            assert tw.parse_expert(expert)["key"] is not None  # terse traces are never taught


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------
def test_tokenizer_round_trips_every_character(tmp_path):
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    codec = CharCodec()
    used = set()
    for variant in VARIANTS:
        cfg = _cfg(variant)
        for split in W.SPLITS:
            for r in tw.generate_rows(cfg, split, 100, seed=0):
                rp = tw.REPHRASE_TEMPLATE.format(question=r["prompt"], solution=r["solution"])
                for text in (r["prompt"], r["solution"], rp, W.native_for_prompt(cfg, r["prompt"])):
                    used |= set(text)
    assert used <= set(CHARS)
    all_text = "".join(CHARS)
    for t in (tok, tok2):
        ids = t(all_text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(all_text)  # one token per character
        assert ids == codec.encode(all_text)
        assert t.unk_token_id not in ids
        assert t.decode(ids + [t.eos_token_id, t.pad_token_id], skip_special_tokens=True) == all_text
    assert tok2.eos_token == "<eos>" and tok2.pad_token == "<pad>"
    assert tok2.eos_token_id != tok2.pad_token_id
    assert not getattr(tok2, "chat_template", None)


# ----------------------------------------------------------------------------------------------
# Model, shipped weights, cache
# ----------------------------------------------------------------------------------------------
def test_config_hash_and_validation():
    base = _cfg()
    assert base.model_hash() == _cfg().model_hash()
    assert base.model_hash() != _cfg(variant="hard_rephrase").model_hash()
    assert base.model_hash() != _cfg(seed=1).model_hash()
    assert base.model_hash() != _cfg(ws_steps=10).model_hash()
    assert base.model_hash() != _cfg(hidden_size=64).model_hash()
    assert base.model_hash() == _cfg(n_train=5, n_eval=7, ws_threads=1).model_hash()  # data / run-time
    hr = _cfg(variant="hard_rephrase")
    assert hr.model_hash() == _cfg(variant="hard_rephrase", implicit_frac=0.9).model_hash()  # not in the warm start
    assert tw.ToyWorldConfig.from_dict(base.to_dict()) == base
    with pytest.raises(ValueError, match="variant"):
        _cfg(variant="nope")
    with pytest.raises(ValueError, match="operator symbols"):
        _cfg(n_easy_ops=40)


@pytest.mark.parametrize("variant", VARIANTS)
def test_default_weights_are_shipped(variant):
    cfg = _cfg(variant)
    d = shipped_weights(cfg)
    assert d is not None, (f"no shipped weights for the default {variant} settings (hash {cfg.model_hash()}); "
                           f"rebuild: python -m repo_rl.toyworld build-weights --variant {variant}")
    meta = json.loads((d / META_FILE).read_text())
    assert meta["model_hash"] == cfg.model_hash()
    assert (d / "model.safetensors").stat().st_size < 3_000_000
    lo, hi = TARGETS[variant]["rephrase_hard"]
    assert lo <= meta["eval"]["rephrase_hard"] <= hi


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two OpenMP threads are often much slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("toycache")


@pytest.mark.parametrize("variant", VARIANTS)
def test_shipped_model_loads_generates_and_reaches_targets(variant, cache_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _cfg(variant)
    path = ensure_model(cfg, cache_dir=cache_dir, progress=False)
    assert path == cache_dir / cfg.model_hash()
    assert ensure_model(cfg, cache_dir=cache_dir, progress=False) == path  # cache hit
    assert [p.name for p in cache_dir.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.dtype == torch.float32
    # AutoTokenizer must load the char-level tokenizer as saved (not a model-type default)
    text = "".join(CHARS)
    assert tok(text, add_special_tokens=False)["input_ids"] == CharCodec().encode(text)
    assert 500_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    row = tw.generate_rows(cfg, "easy", 1, seed=11)[0]
    enc = tok(row["prompt"], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, do_sample=False, max_new_tokens=48)
    assert out[0, -1].item() == tok.eos_token_id  # stops at eos
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text == W.native_for_prompt(cfg, row["prompt"])

    res = tw.evaluate_splits(model, tok, cfg, n=48, seed=123)
    for split, (lo, hi) in TARGETS[variant].items():
        assert lo <= res[split] <= hi, (variant, split, res)


def test_rephrase_fails_mostly_on_terse_traces(cache_dir):
    """hard_rephrase: rephrasing works from explicit expert traces, not from terse ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _cfg("hard_rephrase")
    path = ensure_model(cfg, cache_dir=cache_dir, progress=False)
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    rows = tw.rephrase_rows(tw.generate_rows(cfg, "hard", 96, seed=9))
    explicit = [r for r in rows if "+" in r["solution"]]
    terse = [r for r in rows if "+" not in r["solution"]]
    assert tw.accuracy(model, tok, explicit) >= 0.8
    assert tw.accuracy(model, tok, terse) <= 0.3


def test_implicit_frac_sets_the_rephrase_success_rate(cache_dir):
    """implicit_frac only changes the expert texts (not the model): with no terse traces every
    hard item rephrases; with only terse ones almost none does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_model(_cfg("hard_rephrase"), cache_dir=cache_dir, progress=False)
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    acc = {}
    for frac in (0.0, 1.0):
        cfg = _cfg("hard_rephrase", implicit_frac=frac)
        assert ensure_model(cfg, cache_dir=cache_dir, progress=False) == path
        acc[frac] = tw.accuracy(model, tok, tw.rephrase_rows(tw.generate_rows(cfg, "hard", 48, seed=4)))
    assert acc[0.0] >= 0.9 and acc[1.0] <= 0.2, acc


def test_short_warm_start_runs_and_learns(tmp_path):
    """A few steps of the real warm start on a small model: the loss falls, and a config with
    no shipped weights is warm-started by ensure_model into a loadable, cached HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # one thread: on a busy 2-core machine two OpenMP threads can be ten times slower
    cfg = _cfg(hidden_size=64, num_layers=2, intermediate_size=128, ws_steps=30, ws_batch_size=32,
               ws_warmup=5, ws_threads=1)
    losses = []
    model, tok, info = warm_start(cfg, progress=False, callback=lambda s, m, l: losses.append(l))
    assert len(losses) == 30 and info["steps"] == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5

    small = _cfg(hidden_size=32, num_layers=1, intermediate_size=64, ws_steps=3, ws_batch_size=8,
                 ws_threads=1)
    assert shipped_weights(small) is None
    d = ensure_model(small, cache_dir=tmp_path, progress=False)
    assert d == tmp_path / small.model_hash()
    meta = json.loads((d / META_FILE).read_text())
    assert meta["source"] == "warm_start" and meta["model_hash"] == small.model_hash()
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert ensure_model(small, cache_dir=tmp_path, progress=False) == d
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime  # served from the cache
    m2 = AutoModelForCausalLM.from_pretrained(d)
    tok2 = AutoTokenizer.from_pretrained(d)
    x = tok2(["Q1234A?"], return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert x.shape == (1, 7)
    out = m2.generate(x, do_sample=False, max_new_tokens=5)
    assert out.shape[1] <= 12
    # REPO_RL_CACHE is honoured when no cache_dir is given
    os.environ["REPO_RL_CACHE"] = str(tmp_path / "env")
    try:
        assert tw.cache_root() == tmp_path / "env" / "toyworld"
    finally:
        del os.environ["REPO_RL_CACHE"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_full_rebuild_matches_shipped_targets(variant):
    """The documented rebuild (`python -m repo_rl.toyworld build-weights --variant V`) reaches the
    shipped targets. About 5-8 minutes per variant on 2 busy cores: `pytest -m slow`."""
    cfg = _cfg(variant, ws_threads=1)
    model, tok, info = warm_start(cfg, progress=False)
    res = tw.evaluate_splits(model, tok, cfg, n=100, seed=321)
    for split, (lo, hi) in TARGETS[variant].items():
        assert lo <= res[split] <= hi, (variant, split, res, info)


@pytest.mark.slow
def test_short_rebuild_reaches_documented_smaller_targets():
    """A short rebuild (300 steps, 1.5-2 minutes on 2 busy cores) has learnt to rephrase -- it
    copies the key from the expert text -- before it solves easy items natively (easy is still
    ~0 then), and never solves hard items: rephrase_hard >= 0.9, hard == 0 (basic variant)."""
    cfg = _cfg("basic", ws_steps=300, ws_threads=1)
    model, tok, info = warm_start(cfg, progress=False)
    res = tw.evaluate_splits(model, tok, cfg, n=100, seed=321)
    assert res["rephrase_hard"] >= 0.9, (res, info)
    assert res["hard"] == 0.0, (res, info)
