"""SDFT (on-policy self-distillation): the distill loss by hand, against TRL's own sampled-token
loss, its gradient in expectation against the exact reverse KL, and the method end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from repo_rl import algorithms as alg
from repo_rl.algorithms import KIND_DISTILL, KIND_POLICY, KIND_SFT, METHODS
from repo_rl.config import ConfigError, build_config
from repo_rl.errors import UserError
from repo_rl.trainer import Trainer

from .conftest import tiny_overrides


def test_distill_loss_by_hand():
    # log pi = (-1, -2), log pi_T = (-0.5, -3): A = T - log pi = (0.5, -1).
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    teacher = torch.tensor([[-0.5, -3.0]])
    kinds = torch.tensor([KIND_DISTILL])
    adv = alg.token_advantages(torch.tensor([7.0]), kinds, logp, teacher)  # the row advantage is ignored
    assert adv.tolist() == [[0.5, -1.0]]
    loss, _, _ = alg.mixed_token_loss(logp, logp.detach(), adv, kinds, 0.2, 0.2)
    # -A * log pi = (0.5 * 1, -(-1) * -2) = (0.5, -2); TRL's value (log pi - log pi_T) * log pi is the same.
    assert loss.tolist() == [[0.5, -2.0]]
    loss.sum().backward()
    assert logp.grad.tolist() == [[-0.5, 1.0]]  # -A: up where the teacher is more likely, down where less


def test_distill_ratio_is_capped_and_carries_no_gradient():
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.0 - 0.5, -1.0 + 0.5]])  # ratios e^0.5 = 1.65 and e^-0.5 = 0.61
    adv = torch.tensor([[1.0, 1.0]])
    kinds = torch.tensor([KIND_DISTILL])
    loss, _, _ = alg.mixed_token_loss(logp, old, adv, kinds, 0.2, 0.2, distill_is_clip=1.5)
    w = torch.tensor([1.5, float(torch.exp(torch.tensor(-0.5)))])
    assert torch.allclose(loss[0], -adv[0] * logp[0].detach() * w)
    loss.sum().backward()
    assert torch.allclose(logp.grad[0], -w)  # the ratio is a weight, not a path for the gradient
    free, _, _ = alg.mixed_token_loss(logp.detach(), old, adv, kinds, 0.2, 0.2, distill_is_clip=None)
    assert free.tolist() == [[1.0, 1.0]]


def test_distill_matches_trl_sampled_token_loss_and_gradient():
    """TRL 1.16's ``compute_sampled_token_self_distillation_loss`` times its importance clipping,
    on random logits, with a rollout policy that differs from the current one."""
    loss_utils = pytest.importorskip("trl.experimental.sdft.loss_utils")
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 5, 11
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    teacher_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    old = torch.log_softmax(student + 0.3 * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    old = torch.gather(old, -1, ids.unsqueeze(-1)).squeeze(-1)

    s1 = student.clone().requires_grad_(True)
    trl = loss_utils.compute_sampled_token_self_distillation_loss(s1, teacher_logits, ids, distillation_alpha=1.0)
    logp_trl = torch.gather(torch.log_softmax(s1, -1), -1, ids.unsqueeze(-1)).squeeze(-1)
    trl = loss_utils.apply_importance_sampling_clipping(trl, logp_trl, old, 2.0)
    trl.sum().backward()

    s2 = student.clone().requires_grad_(True)
    logp = alg.token_logprobs(s2, ids)
    t_logp = alg.token_logprobs(teacher_logits, ids)
    kinds = torch.full((B,), KIND_DISTILL)
    adv = alg.token_advantages(torch.zeros(B, dtype=torch.float64), kinds, logp, t_logp)
    ours, _, _ = alg.mixed_token_loss(logp, old, adv, kinds, 0.2, 0.2, distill_is_clip=2.0)
    ours.sum().backward()
    assert torch.allclose(ours, trl, atol=1e-12)
    assert torch.allclose(s2.grad, s1.grad, atol=1e-12)


def test_reverse_kl_against_a_loop_and_trl_full_logits():
    loss_utils = pytest.importorskip("trl.experimental.sdft.loss_utils")
    g = torch.Generator().manual_seed(3)
    B, T, V = 2, 3, 5
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    got = alg.reverse_kl(s, t)
    for b in range(B):
        for i in range(T):
            ps, pt = torch.softmax(s[b, i], -1), torch.softmax(t[b, i], -1)
            want = sum(float(ps[v]) * (math.log(float(ps[v])) - math.log(float(pt[v]))) for v in range(V))
            assert float(got[b, i]) == pytest.approx(want, abs=1e-6)
    trl = loss_utils.compute_full_logit_self_distillation_loss(s, t, distillation_alpha=1.0)
    assert torch.allclose(got, trl.to(got.dtype), atol=1e-6)


def test_full_logits_loss_is_the_reverse_kl_times_the_capped_ratio():
    g = torch.Generator().manual_seed(4)
    B, T, V = 2, 3, 6
    z = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    logp = alg.token_logprobs(z, ids)
    old = logp.detach() + torch.tensor([[0.0, 1.0, -1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    kl = alg.reverse_kl(z, t)
    kinds = torch.tensor([KIND_DISTILL, KIND_POLICY])
    adv = torch.tensor([0.0, 0.5], dtype=torch.float64)
    loss, _ = alg.token_loss(logp, old, adv, kinds, epsilon_low=0.2, epsilon_high=0.2, distill_is_clip=2.0, distill_kl=kl)
    ratio = torch.exp(logp.detach() - old).clamp(max=2.0)
    assert torch.allclose(loss[0], kl[0] * ratio[0])
    policy, _, _ = alg.clipped_surrogate(logp, old, adv.view(-1, 1), 0.2, 0.2)
    assert torch.allclose(loss[1], policy[1])  # other rows keep their loss


def test_sampled_token_gradient_is_the_reverse_kl_gradient_in_expectation():
    """Summing the per-token loss gradient over every token, weighted by pi, gives exactly
    the gradient of KL(pi || pi_T) at that position."""
    g = torch.Generator().manual_seed(1)
    V = 7
    z = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    t_logp = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
    logp = torch.log_softmax(z, -1)
    kl = (logp.exp() * (logp - t_logp)).sum()
    (exact,) = torch.autograd.grad(kl, z)

    logp_rows = torch.log_softmax(z, -1).unsqueeze(-1)  # [V, 1]: one row per possible sampled token
    kinds = torch.full((V,), KIND_DISTILL)
    adv = alg.token_advantages(torch.zeros(V, dtype=torch.float64), kinds, logp_rows, t_logp.unsqueeze(-1))
    per_tok, _, _ = alg.mixed_token_loss(logp_rows, logp_rows.detach(), adv, kinds, 0.2, 0.2)
    expected = (logp_rows.detach().exp() * per_tok).sum()
    (estimate,) = torch.autograd.grad(expected, z)
    assert torch.allclose(estimate, exact, atol=1e-12)
    # full_logits differentiates the same KL directly.
    (direct,) = torch.autograd.grad(alg.reverse_kl(z.view(1, 1, V), t_logp.view(1, 1, V)).sum(), z)
    assert torch.allclose(direct, exact, atol=1e-12)


def test_token_advantages_against_a_loop():
    g = torch.Generator().manual_seed(2)
    B, T = 6, 4
    kinds = torch.tensor([KIND_POLICY, KIND_DISTILL, KIND_SFT, KIND_DISTILL, alg.KIND_SHAPED, KIND_POLICY])
    row_adv = torch.randn(B, generator=g)
    logp = torch.randn(B, T, generator=g)
    teacher = torch.randn(B, T, generator=g)
    got = alg.token_advantages(row_adv, kinds, logp, teacher)
    for b in range(B):
        for t in range(T):
            want = teacher[b, t] - logp[b, t] if int(kinds[b]) == KIND_DISTILL else row_adv[b]
            assert float(got[b, t]) == pytest.approx(float(want))
    assert torch.equal(alg.token_advantages(row_adv, kinds, logp, None), row_adv.view(-1, 1).expand(B, T))


def test_zero_advantage_distill_rows_still_train():
    kinds = torch.tensor([KIND_POLICY, KIND_DISTILL, KIND_SFT, alg.KIND_SHAPED])
    zero = torch.zeros(4)
    assert alg.zero_gradient_rows(zero, kinds, beta=0.0).tolist() == [True, False, False, True]
    assert not alg.zero_gradient_rows(zero, kinds, beta=0.1).any()


def test_sdft_method_declaration():
    m = METHODS["sdft"]
    assert m.rollouts and m.teacher and m.requires_solution and m.injection is None
    assert m.rollout_kind == KIND_DISTILL
    assert not any(METHODS[n].teacher for n in METHODS if n != "sdft")


# ---------------------------------------------------------------------------- end to end
def _trainer(tmp_path, model_dir, data, **extra):
    over = {"algorithm.method": "sdft", "train.save_every": 0, "algorithm.temperature": 0.9, **extra}
    return Trainer(build_config({}, tiny_overrides(model_dir, data, **over)), tmp_path / "out", progress=False)


def _explicit_logprobs(model, prompt, completion, temperature):
    """``[T, V]`` log-probs of the positions that predict ``completion`` after ``prompt``."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double() / temperature
    return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("mode,teacher", [("full_logits", "initial"), ("sampled_token", "initial"), ("full_logits", "live")])
def test_sdft_teacher_is_the_model_with_the_expert_solution_in_context(tmp_path, tiny_model_dir, tiny_data, mode, teacher):
    """At the second step (the policy has moved once): sdft/reverse_kl must equal the per-token
    KL(pi(. | q) || pi_T(. | P(q, k))) from plain forwards (full_logits), or its sampled-token estimate
    log pi(o | q) - log pi_T(o | P(q, k)) (sampled_token), over the rows in the loss; pi is the policy
    before that update, pi_T the starting model (initial) or that same policy (live)."""
    import copy

    t = _trainer(tmp_path, tiny_model_dir, tiny_data, **{"train.max_steps": 2, "algorithm.mask_truncated_completions": "false",
                                                          "baselines.sdft_mode": mode, "baselines.sdft_teacher": teacher})
    start = copy.deepcopy(t.core)
    seen = {}
    inner = t.updater

    def spy(seqs, adv, valid, keep_logp=()):
        seen["seqs"], seen["valid"], seen["policy"] = list(seqs), valid.clone(), copy.deepcopy(t.core)
        return inner(seqs, adv, valid, keep_logp)

    t.updater = spy
    t.train()
    m = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()][-1]
    seqs, valid, policy = seen["seqs"], seen["valid"], seen["policy"]
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), start.parameters()))  # it has moved
    teacher_model = start if teacher == "initial" else policy
    assert all(s.kind == KIND_DISTILL for s in seqs)
    num = den = 0.0
    for s, v in zip(seqs, valid.tolist()):
        if s.teacher_prompt_ids is None:  # a prompt without an expert solution: no teacher, not counted
            continue
        assert s.teacher_prompt_ids != s.prompt_ids
        if not v or not s.completion_ids:
            continue
        lq = _explicit_logprobs(policy, s.prompt_ids, s.completion_ids, 0.9)
        lt = _explicit_logprobs(teacher_model, s.teacher_prompt_ids, s.completion_ids, 0.9)
        if mode == "full_logits":
            num += float((lq.exp() * (lq - lt)).sum())
        else:
            c = torch.tensor(s.completion_ids).unsqueeze(-1)
            num += float((lq.gather(-1, c) - lt.gather(-1, c)).sum())
        den += len(s.completion_ids)
    assert den > 0 and m["sdft/reverse_kl"] == pytest.approx(num / den, abs=1e-4)
    # The teacher prompt is the rephrase context: it holds the expert solution.
    ex = t.train_examples[0]
    text = t.tokenizer.decode(t.stages.teacher_prompt_ids(ex))
    assert ex.solution.replace(" ", "") in text.replace(" ", "")  # the tiny tokenizer has no spaces


def test_sdft_trains_with_a_live_and_an_initial_teacher(tmp_path, tiny_model_dir, tiny_data):
    for teacher, mode in (("live", "full_logits"), ("initial", "sampled_token"), ("initial", "full_logits")):
        t = _trainer(tmp_path / teacher / mode, tiny_model_dir, tiny_data, **{
            "train.max_steps": 2, "baselines.sdft_teacher": teacher, "baselines.sdft_mode": mode,
            "baselines.sdft_template": "{question}\nSolution: {solution}\n"})
        before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        t.train()
        rows = [json.loads(x) for x in (tmp_path / teacher / mode / "out" / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(torch.isfinite(torch.tensor([r["loss"], r["sdft/reverse_kl"]])).all() for r in rows)
        assert any(not torch.equal(before[n], p) for n, p in t.model.named_parameters())
        assert (t.ref_model is not None) == (teacher == "initial")
        if teacher == "initial":  # the teacher's weights stay the starting ones
            assert all(torch.equal(before[n], p) for n, p in t.ref_model.named_parameters())


@pytest.mark.parametrize("key,value,message", [
    ("baselines.sdft_template", "{question} only", "baselines.sdft_template: expected a format string containing {solution}"),
    ("baselines.sdft_is_clip", 0, "baselines.sdft_is_clip: expected a number > 0 or null"),
    ("baselines.sdft_teacher", "ema", "baselines.sdft_teacher"),
    ("train.logprob_chunk_size", 4, "baselines.sdft_mode=full_logits needs whole logits"),
])
def test_bad_sdft_settings_are_named(tmp_path, tiny_model_dir, tiny_data, key, value, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        build_config({}, tiny_overrides(tiny_model_dir, tiny_data, **{"algorithm.method": "sdft", key: value}))


def test_a_teacher_prompt_over_the_context_is_refused_at_start(tmp_path, tiny_model_dir):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"id": "x", "prompt": "1+1?", "answer": "2", "solution": "two " * 4000}) + "\n")
    with pytest.raises(UserError, match="the SDFT teacher prompt .* does not fit"):
        _trainer(tmp_path, tiny_model_dir, data)


def test_the_log_line_of_an_sdft_step_shows_the_reverse_kl_not_the_gate():
    from repo_rl.step.metrics import log_line

    line = log_line({"step": 1, "loss": 0.5, "reward": 0.25, "sdft/reverse_kl": 0.0123, "repo/gate_rate": 0.0}, 4)
    assert "reverse kl 0.0123" in line and "gate" not in line
    assert "gate 0.00" in log_line({"step": 1, "repo/gate_rate": 0.0}, 4)
