"""The trainer's loss paths on a tiny model: sampling temperature, the KL term over several
steps, meta-text stripping of rephrases, masked truncated completions, in-training pass@1 and
methods that need expert solutions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from repo_rl import algorithms as alg
from repo_rl.config import build_config
from repo_rl.errors import UserError
from repo_rl.evaluation import pass_at_k
from repo_rl.trainer import Sequence_, Trainer

from .conftest import tiny_overrides


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _trainer(tmp_path, tiny_model_dir, tiny_data, name="run", **over) -> Trainer:
    cfg = build_config({}, tiny_overrides(tiny_model_dir, tiny_data, **over))
    return Trainer(cfg, tmp_path / name, progress=False)


def test_training_logprobs_use_the_rollout_temperature(tmp_path, tiny_model_dir, tiny_data):
    """log-probs for the loss (policy, old, reference) are log softmax(logits / T) at the rollout
    temperature; SFT rows stay at T = 1."""
    t = _trainer(tmp_path, tiny_model_dir, tiny_data, **{"algorithm.temperature": 0.7, "algorithm.beta": 0.04})
    prompt, comp = t._prompt_ids(0), [5, 9, 12, 7]
    with torch.no_grad():
        logits = t.core(torch.tensor([prompt + comp])).logits[0, len(prompt) - 1 : -1].float()
    targets = torch.tensor(comp).unsqueeze(-1)
    at = lambda temp: torch.log_softmax(logits / temp, -1).gather(-1, targets).squeeze(-1)  # noqa: E731
    pol = t.updater.logprobs(t.core, [Sequence_(prompt, comp, False)])[0]
    ref = t.updater.logprobs(t.ref_model, [Sequence_(prompt, comp, False)])[0]
    sft = t.updater.logprobs(t.core, [Sequence_(prompt, comp, False, alg.KIND_SFT)])[0]
    mixed = t.updater.logprobs(t.core, [Sequence_(prompt, comp, False), Sequence_(prompt, comp, False, alg.KIND_SFT)])
    assert torch.allclose(pol, at(0.7), atol=1e-5) and not torch.allclose(pol, at(1.0), atol=1e-3)
    assert torch.allclose(ref, at(0.7), atol=1e-5)  # the reference is the initial policy
    assert torch.allclose(sft, at(1.0), atol=1e-5)
    assert torch.allclose(mixed[0], at(0.7), atol=1e-5) and torch.allclose(mixed[1], at(1.0), atol=1e-5)


def test_greedy_rollouts_train_at_temperature_one(tmp_path, tiny_model_dir, tiny_data):
    t = _trainer(tmp_path, tiny_model_dir, tiny_data, **{"algorithm.temperature": 0.0})
    assert t.updater.temperature() == 1.0


def test_the_kl_term_moves_the_weights_once_policy_and_reference_differ(tmp_path, tiny_model_dir, tiny_data):
    """At step 1 the policy is the reference, so the KL gradient is 0 and beta changes nothing;
    from step 2 on it must change the update (a loss without its KL term fails here)."""
    weights, kls = {}, {}
    for beta in (0.0, 0.5):
        t = _trainer(tmp_path, tiny_model_dir, tiny_data, name=f"b{beta}", **{
            "algorithm.method": "grpo", "algorithm.beta": beta, "reward.funcs": "[tests.helpers.rewards:text_length]",
            "train.max_steps": 2, "train.weight_decay": 0.0})
        snaps, ks = [], []
        for _ in range(2):
            m = t.train_step()
            ks.append(m["kl"])
            snaps.append({n: p.detach().clone() for n, p in t.model.named_parameters()})
        weights[beta], kls[beta] = snaps, ks
    first_same = all(torch.allclose(weights[0.0][0][k], weights[0.5][0][k], atol=1e-6) for k in weights[0.0][0])
    assert first_same, "beta changed the first update, where policy == reference"
    assert kls[0.5][0] == pytest.approx(0.0, abs=1e-9) and kls[0.5][1] > 0
    second_diff = max(float((weights[0.0][1][k] - weights[0.5][1][k]).abs().max()) for k in weights[0.0][1])
    assert second_diff > 1e-6, "the KL term did not reach the gradient"


def test_meta_text_never_reaches_an_injected_completion(tmp_path, tiny_model_dir, tiny_data):
    """repo.strip_patterns are removed from every rephrase before it is verified and trained: with
    a pattern that removes every vowel, no injected completion may hold one."""
    t = _trainer(tmp_path, tiny_model_dir, tiny_data, **{
        "repo.rho": 0.0, "repo.allow_unverified": "true", "repo.strip_patterns": "['[aeiou]']",
        "algorithm.max_completion_length": 24, "train.max_steps": 2})
    t.train()
    rephrased = [c for c in read(tmp_path / "run" / "completions.jsonl") if c["origin"] == "rephrased"]
    assert rephrased, "no rephrase was injected"
    assert not any(re.search("[aeiou]", c["text"]) for c in rephrased), [c["text"] for c in rephrased]
    on_policy = "".join(c["text"] for c in read(tmp_path / "run" / "completions.jsonl") if c["origin"] == "on_policy")
    assert re.search("[aeiou]", on_policy), "the model never samples a vowel: the check above proves nothing"


def test_masked_truncated_completions_leave_the_loss(tmp_path, tiny_model_dir, tiny_data):
    """With every rollout cut at the limit and algorithm.mask_truncated_completions=true, nothing is
    trained: the weights do not move (and they do with the mask off)."""
    from transformers import AutoModelForCausalLM

    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    moved = {}
    for mask in ("true", "false"):
        t = _trainer(tmp_path, tiny_model_dir, tiny_data, name=mask, **{
            "algorithm.method": "grpo", "algorithm.mask_truncated_completions": mask, "algorithm.max_completion_length": 6,
            "reward.funcs": "[tests.helpers.rewards:vowel_share]", "train.weight_decay": 0.0, "train.max_steps": 1})
        real = t.generator.generate
        eos = set(t.eos_ids)

        def no_eos(rows, params, seeds, real=real, eos=eos):  # every rollout runs to the limit
            return [[5 if x in eos else x for x in c] + [5] * (params.max_new_tokens - len(c)) for c in real(rows, params, seeds)]

        t.generator.generate = no_eos
        m = t.train_step()
        assert m["completions/clipped_ratio"] == 1.0
        moved[mask] = any(not torch.equal(p.detach(), initial[n].detach()) for n, p in t.model.named_parameters())
    assert moved == {"true": False, "false": True}


def test_in_training_pass_at_1_is_the_unbiased_mean_over_samples(tmp_path, tiny_model_dir, tiny_data):
    """pass@1 in metrics.jsonl means what ``repo-rl eval`` means: mean over items of c / n."""
    t = _trainer(tmp_path, tiny_model_dir, tiny_data, **{"data.eval_files": f"[{tiny_data}]", "eval.n": 4,
                                                          "eval.temperature": 1.0, "eval.max_items": 3})
    pattern = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0], dtype=torch.float64)

    def scorer(prompts, completions, examples):
        assert len(completions) == 12
        return pattern.clone(), {}

    t.scorer = scorer
    out = t.evaluate()
    name = Path(tiny_data).stem
    expected = (pass_at_k(4, 1, 1) + pass_at_k(4, 0, 1) + pass_at_k(4, 3, 1)) / 3
    assert expected == pytest.approx(1 / 3)
    assert out[f"eval/{name}/pass@1"] == pytest.approx(expected)
    assert out[f"eval/{name}/avg@4"] == pytest.approx(1 / 3)


def test_a_method_that_needs_solutions_refuses_data_without_any(tmp_path, tiny_model_dir):
    data = tmp_path / "nosol.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {i}+1?", "answer": str(i + 1)}) + "\n" for i in range(4)))
    for method in ("repo", "sft_then_grpo"):
        with pytest.raises(UserError, match=f"algorithm.method={method} learns from expert solutions"):
            _trainer(tmp_path, tiny_model_dir, data, name=method, **{"algorithm.method": method})
    _trainer(tmp_path, tiny_model_dir, data, name="grpo", **{"algorithm.method": "grpo"})  # fine without
