"""Memory levers on a tiny model: chunked log-probs, LoRA, gradient checkpointing, bf16."""

from __future__ import annotations

import json

import pytest
import torch

from repo_rl.config import build_config
from repo_rl.step.logprobs import completion_logprobs
from repo_rl.trainer import Trainer

from .conftest import tiny_overrides


def _batch(tok, n=3, P=7, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tok), (n, P + T), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :3] = 0  # a left-padded row
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids, attn, pos, P, T


@pytest.mark.parametrize("chunk", [1, 4, 9, 50])
def test_chunked_logprobs_equal_plain_values_and_gradients(tiny_model_dir, chunk):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, attn, pos, P, T = _batch(tok)
    results = []
    for c in (None, chunk):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        lp, ent = completion_logprobs(model, ids, attn, pos, P, T, c, want_entropy=True)
        (lp * torch.linspace(-1, 1, T)).sum().backward()
        results.append((lp.detach(), ent, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, ea, ga), (b, eb, gb) = results
    assert a.shape == (3, T)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(ea, eb, atol=1e-5)
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-6, rtol=1e-4), n


def test_plain_logprobs_match_full_logits_reference(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids, attn, pos, P, T = _batch(tok)
    lp, _ = completion_logprobs(model, ids, attn, pos, P, T)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.log_softmax(-1)
    ref = torch.gather(full[:, P - 1 : P - 1 + T], -1, ids[:, P:].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(lp.detach(), ref, atol=1e-5)


def _captured_grads(trainer):
    grads = {}

    def record(*a, **k):
        for n, p in trainer.model.named_parameters():
            if p.grad is not None:
                grads[n] = p.grad.clone()

    trainer.optimizer.step = record
    trainer.train_step()
    return grads


@pytest.mark.parametrize("lever", [{"train.gradient_checkpointing": "true"}, {"train.logprob_chunk_size": 3}])
def test_levers_leave_the_gradient_unchanged(tmp_path, tiny_model_dir, tiny_data, lever):
    base = {"algorithm.method": "grpo", "train.max_grad_norm": 0}
    g0 = _captured_grads(Trainer(build_config({}, tiny_overrides(tiny_model_dir, tiny_data, **base)), tmp_path / "a", progress=False))
    g1 = _captured_grads(Trainer(build_config({}, tiny_overrides(tiny_model_dir, tiny_data, **base, **lever)), tmp_path / "b", progress=False))
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        assert torch.allclose(g0[k], g1[k], atol=1e-6, rtol=1e-4), k


def test_bf16_autocast_trains_with_finite_metrics(tmp_path, tiny_model_dir, tiny_data):
    cfg = build_config({}, tiny_overrides(tiny_model_dir, tiny_data, **{"train.bf16": "true", "train.max_steps": 2}))
    t = Trainer(cfg, tmp_path / "bf16", progress=False)
    t.train()
    rows = [json.loads(l) for l in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert all(r["loss"] is not None and r["grad_norm"] is not None for r in rows)
    # Weights stay fp32 (autocast only changes the compute dtype).
    assert all(p.dtype == torch.float32 for p in t.model.parameters())


def test_lora_trains_only_adapters_uses_base_as_reference_and_resumes(tmp_path, tiny_model_dir, tiny_data):
    over = tiny_overrides(tiny_model_dir, tiny_data, **{"model.lora.r": 4, "algorithm.beta": 0.1, "train.max_steps": 2,
                                                        "train.save_every": 1, "train.save_total_limit": "null"})
    t = Trainer(build_config({}, over), tmp_path / "lora", progress=False)
    assert t.ref_model is None  # no second copy of the model
    base_before = {n: p.detach().clone() for n, p in t.model.named_parameters() if "lora_" not in n}
    trainable = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    t.train()
    for n, p in t.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p.detach(), base_before[n]), n
    rows = [json.loads(l) for l in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    # Before any update the adapters are zero-initialised on one side: policy == base, KL ~ 0.
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    ck = tmp_path / "lora" / "checkpoints" / "step-2"
    assert (ck / "adapter_model.safetensors").is_file() and (ck / "adapter_config.json").is_file()
    # Resume from step 1 reproduces step 2.
    import shutil

    shutil.rmtree(ck)
    over2 = [o for o in over if not o.startswith("train.max_steps")] + ["train.max_steps=2"]
    t2 = Trainer(build_config({}, over2), tmp_path / "lora", resume=True, progress=False)
    assert t2.step == 1
    t2.train()
    rows2 = [json.loads(l) for l in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rs]
    assert strip(rows2) == strip(rows)
