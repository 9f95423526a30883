"""End-to-end training on a tiny model: GRPO, RePO, resume equivalence, determinism, guards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from repo_rl.cli import main
from repo_rl.config import build_config
from repo_rl.errors import TrainingError
from repo_rl.trainer import Trainer

from .conftest import tiny_overrides

REQUIRED_METRICS = [
    "step", "reward", "reward_std", "frac_reward_zero_std", "repo/gate_rate", "repo/rephrase_success_rate",
    "repo/replaced", "repo/logp_gap", "clip_ratio", "entropy", "kl", "completions/mean_length",
    "time/generation", "time/rephrase", "time/reward", "time/logprobs", "time/update",
]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def no_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def run_cli(tmp_path: Path, out: str, overrides: list[str], *flags: str) -> int:
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    return main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / out), *flags, *overrides])


def test_grpo_end_to_end(tmp_path, tiny_model_dir, tiny_data):
    rc = run_cli(tmp_path, "grpo", tiny_overrides(tiny_model_dir, tiny_data, **{"algorithm.method": "grpo"}))
    assert rc == 0
    out = tmp_path / "grpo"
    rows = read(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in REQUIRED_METRICS:
        assert key in rows[0], key
    assert all(r["repo/gate_rate"] == 0.0 and r["repo/replaced"] == 0 for r in rows)
    comps = read(out / "completions.jsonl")
    assert len(comps) == 3 * 3 * 4
    assert {c["origin"] for c in comps} == {"on_policy"}
    assert (out / "config.yaml").is_file()
    saved = build_config(__import__("yaml").safe_load((out / "config.yaml").read_text()))
    assert saved.algorithm.method == "grpo" and saved.algorithm.num_generations == 4
    # Checkpoints: step-2 and the final step-3, loadable by transformers.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ck = out / "checkpoints" / "step-3"
    assert ck.is_dir() and (out / "checkpoints" / "step-2").is_dir()
    assert (ck / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(ck)
    AutoTokenizer.from_pretrained(ck)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), initial.state_dict().values()))
    assert changed, "training did not change the weights"


def test_repo_end_to_end_injects_verified_rephrases(tmp_path, tiny_model_dir, tiny_data):
    rc = run_cli(tmp_path, "repo", tiny_overrides(tiny_model_dir, tiny_data, **{"train.max_steps": 4}))
    assert rc == 0
    out = tmp_path / "repo"
    rows = read(out / "metrics.jsonl")
    assert any(r["repo/gate_rate"] > 0 for r in rows)
    comps = read(out / "completions.jsonl")
    rephrased = [c for c in comps if c["origin"] == "rephrased"]
    assert rephrased, "no gated group received a verified rephrase"
    assert sum(r["repo/replaced"] for r in rows) == len(rephrased)
    for c in rephrased:
        assert c["reward"] >= 0.5  # only verified rephrasings are injected (delta = 0.5)
        assert c["advantage"] > 0  # the injected success carries a learning signal
        assert c["prompt_id"] != "q5"  # the row without a solution is never rephrased
    # One rephrase per gated group at most (num_replace = 1).
    per_group = {}
    for c in rephrased:
        per_group[(c["step"], c["group"])] = per_group.get((c["step"], c["group"]), 0) + 1
    assert max(per_group.values()) == 1
    assert all(r["repo/logp_gap"] is not None for r in rows if r["repo/replaced"] > 0)


def test_unverified_rephrases_are_injected_only_when_allowed(tmp_path, tiny_model_dir, tiny_data):
    over = tiny_overrides(tiny_model_dir, tiny_data, **{"repo.allow_unverified": "true", "train.max_steps": 2,
                                                        "repo.num_attempts": 1, "repo.rho": 0.0})
    assert run_cli(tmp_path, "unv", over) == 0
    comps = read(tmp_path / "unv" / "completions.jsonl")
    rephrased = [c for c in comps if c["origin"] == "rephrased"]
    # rho = 0 gates every group with a solution: 2 steps x 3 prompts, minus rows without solution.
    assert len(rephrased) >= 4
    assert any(c["reward"] == 0.0 for c in rephrased)


def test_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_model_dir, tiny_data):
    # 5 steps over 6 prompts at 3 per step: crosses an epoch boundary at step 2 -> 3.
    # A fixed rephrase batching: auto picks by wall time after four trial steps, and the two runs
    # may pick differently at step 5, which changes logp_gap in the last digits (samples do not change).
    common = {"train.save_every": 2, "train.save_total_limit": "null", "repo.rephrase_batching": "separate"}
    assert run_cli(tmp_path, "full", tiny_overrides(tiny_model_dir, tiny_data, **common, **{"train.max_steps": 5})) == 0
    assert run_cli(tmp_path, "part", tiny_overrides(tiny_model_dir, tiny_data, **common, **{"train.max_steps": 2})) == 0
    assert run_cli(tmp_path, "part", tiny_overrides(tiny_model_dir, tiny_data, **common, **{"train.max_steps": 5}), "--resume") == 0
    full, part = read(tmp_path / "full" / "metrics.jsonl"), read(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in part] == [1, 2, 3, 4, 5]
    assert no_time(full) == no_time(part)
    assert read(tmp_path / "full" / "completions.jsonl") == read(tmp_path / "part" / "completions.jsonl")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "checkpoints" / "step-5" / "model.safetensors")
    b = load_file(tmp_path / "part" / "checkpoints" / "step-5" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_seed_same_metrics_different_seed_differs(tmp_path, tiny_model_dir, tiny_data):
    over = tiny_overrides(tiny_model_dir, tiny_data, **{"train.max_steps": 2})
    assert run_cli(tmp_path, "a", over) == 0
    assert run_cli(tmp_path, "b", over) == 0
    assert run_cli(tmp_path, "c", over + ["train.seed=7"]) == 0
    a, b, c = (no_time(read(tmp_path / d / "metrics.jsonl")) for d in "abc")
    assert a == b
    ca, cc = read(tmp_path / "a" / "completions.jsonl"), read(tmp_path / "c" / "completions.jsonl")
    assert [x["text"] for x in ca] != [x["text"] for x in cc]


def test_non_finite_loss_never_reaches_weights(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    import repo_rl.algorithms.losses as losses

    cfg = build_config({}, tiny_overrides(tiny_model_dir, tiny_data, **{"train.max_bad_steps": 2, "algorithm.method": "grpo"}))
    trainer = Trainer(cfg, tmp_path / "nan", progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    real = losses.mixed_token_loss

    def poisoned(*args, **kwargs):
        loss, low, high = real(*args, **kwargs)
        return loss * float("nan"), low, high

    monkeypatch.setattr(losses, "mixed_token_loss", poisoned)  # what token_loss calls
    m1 = trainer.train_step()
    assert m1["train/skipped_step"] == 1.0 and m1["train/bad_steps"] == 1.0
    with pytest.raises(TrainingError, match="consecutive"):
        trainer.train_step()
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # Optimizer state was never touched either.
    assert not trainer.optimizer.state


def test_verifier_failures_are_counted_not_zeroed(tmp_path, tiny_model_dir, tiny_data):
    over = tiny_overrides(tiny_model_dir, tiny_data, **{"train.max_steps": 1, "algorithm.method": "grpo",
                                                        "reward.funcs": "[tests.helpers.rewards:always_none]"})
    assert run_cli(tmp_path, "none", over) == 0
    (row,) = read(tmp_path / "none" / "metrics.jsonl")
    assert row["rewards/invalid"] == 3 * 4
    assert row["reward"] is None  # no valid reward: reported as missing, not 0
    comps = read(tmp_path / "none" / "completions.jsonl")
    assert all(c["reward"] is None and c["advantage"] == 0.0 for c in comps)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_model_dir, tiny_data):
    """micro_batch_size only changes how the step's gradient is computed, not its value."""
    grads = []
    for mb in (1, 5, 12):
        cfg = build_config({}, tiny_overrides(tiny_model_dir, tiny_data, **{"train.micro_batch_size": mb, "algorithm.method": "grpo",
                                                                           "train.max_grad_norm": 0}))
        t = Trainer(cfg, tmp_path / f"mb{mb}", progress=False)
        captured = {}

        def record(*a, _t=t, _c=captured, **k):
            for n, p in _t.model.named_parameters():
                if p.grad is not None:
                    _c[n] = p.grad.clone()

        t.optimizer.step = record
        t.train_step()
        assert captured
        grads.append(captured)
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for k in grads[0]:
            assert torch.allclose(grads[0][k], other[k], atol=1e-6, rtol=1e-4), k


@pytest.mark.parametrize("loss_type,num_iterations,beta", [("grpo", 2, 0.0), ("dr_grpo", 1, 0.1), ("dapo", 2, 0.05)])
def test_loss_variants_kl_and_ppo_epochs_run(tmp_path, tiny_model_dir, tiny_data, loss_type, num_iterations, beta):
    over = tiny_overrides(tiny_model_dir, tiny_data, **{"train.max_steps": 1, "algorithm.loss_type": loss_type,
                                                        "algorithm.num_iterations": num_iterations, "algorithm.beta": beta})
    assert run_cli(tmp_path, "v", over) == 0
    (row,) = read(tmp_path / "v" / "metrics.jsonl")
    assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
    assert row["train/skipped_step"] == 0.0
    # The policy equals the reference before the first update: k3 is exactly 0 there.
    assert row["kl"] == pytest.approx(0.0, abs=1e-7)


def test_rephrasing_with_the_rollouts_changes_nothing_but_cost(tmp_path, tiny_model_dir, tiny_data):
    """repo.rephrase_batching=with_rollouts samples rephrases in the rollout call; per-row seeds make
    the run identical to rephrasing after the gate (and to auto, which switches between the two):
    same completions, rewards, advantages, weights."""
    runs = {}
    for flag in ("with_rollouts", "separate", "auto"):
        over = tiny_overrides(tiny_model_dir, tiny_data, **{"repo.rephrase_batching": flag, "repo.rho": 0.0,
                                                           "repo.num_attempts": 2, "train.max_steps": 3,
                                                           "repo.allow_unverified": "true"})
        assert run_cli(tmp_path, flag, over) == 0
        runs[flag] = tmp_path / flag
    a, b = read(runs["with_rollouts"] / "completions.jsonl"), read(runs["separate"] / "completions.jsonl")
    assert any(c["origin"] == "rephrased" for c in a)
    assert a == b == read(runs["auto"] / "completions.jsonl")
    ma, mb = read(runs["with_rollouts"] / "metrics.jsonl"), read(runs["separate"] / "metrics.jsonl")
    for x, y in zip(ma, mb):
        for k in ("repo/gated", "repo/attempts", "repo/verified", "repo/replaced", "loss", "grad_norm"):
            assert x.get(k) == y.get(k), k
        if x["repo/replaced"]:
            assert x["repo/logp_gap"] == pytest.approx(y["repo/logp_gap"], abs=1e-3)
    from safetensors.torch import load_file

    wa = load_file(str(runs["with_rollouts"] / "checkpoints" / "step-3" / "model.safetensors"))
    wb = load_file(str(runs["separate"] / "checkpoints" / "step-3" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("mode", ["with_rollouts", "separate"])
def test_logp_gap_equals_two_explicit_forwards(tmp_path, tiny_model_dir, tiny_data, mode):
    """repo/logp_gap is taken from the sampler and the update's forward pass; it must equal
    log pi(o|P(q,k)) - log pi(o|q) computed by two forwards under the pre-update weights."""
    import copy

    cfg = build_config({}, tiny_overrides(tiny_model_dir, tiny_data, **{
        "repo.rho": 0.0, "repo.allow_unverified": "true", "train.threads": 1,
        "repo.rephrase_batching": mode}))
    t = Trainer(cfg, tmp_path / "gap", progress=False)
    before = copy.deepcopy(t.core)
    seen = {}
    real = t.stages.compose

    def spy(*args, **kw):
        seen["batch"] = real(*args, **kw)
        return seen["batch"]

    t.stages.compose = spy
    m = t.train_step()
    batch = seen["batch"]
    assert batch.gap_under_p, "no rephrase was injected"
    G = cfg.algorithm.num_generations
    from repo_rl.trainer import Sequence_

    gaps = []
    for f in batch.gap_under_p:
        s = batch.sequences[f]
        ex = batch.examples[f // G]
        rp = t.renderer.ids(t.renderer.rephrase_prompt(ex, cfg.repo.rephrase_template))
        q = t.updater.logprobs(before, [s])[0].sum()
        p = t.updater.logprobs(before, [Sequence_(rp, s.completion_ids, False)])[0].sum()
        gaps.append(float(p - q))
    assert m["repo/logp_gap"] == pytest.approx(sum(gaps) / len(gaps), abs=1e-3)


def test_choose_batching_needs_every_trial_and_picks_the_faster():
    from repo_rl.engines import BATCHING_TRIALS, choose_batching

    assert BATCHING_TRIALS == ("separate", "with_rollouts", "with_rollouts", "separate")
    assert choose_batching([("separate", 1.0), ("with_rollouts", 0.1), ("with_rollouts", 0.1)]) is None
    # separate 1.0 + 1.2 = 2.2 s against with_rollouts 0.9 + 1.4 = 2.3 s: separate is faster
    assert choose_batching([("separate", 1.0), ("with_rollouts", 0.9), ("with_rollouts", 1.4), ("separate", 1.2)]) == "separate"
    assert choose_batching([("separate", 1.0), ("with_rollouts", 0.9), ("with_rollouts", 1.0), ("separate", 1.2)]) == "with_rollouts"
    assert choose_batching([("separate", 1.0), ("with_rollouts", 1.0), ("with_rollouts", 1.0), ("separate", 1.0)]) == "separate"


def test_auto_rephrase_batching_times_both_modes_then_keeps_the_faster(tmp_path, tiny_model_dir, tiny_data, capsys):
    """auto runs the ABBA trials on the first four steps with gated groups (one generation call
    in with_rollouts mode, two in separate mode), then keeps the faster mode for good."""
    cfg = build_config({}, tiny_overrides(tiny_model_dir, tiny_data, **{
        "repo.rho": 0.0, "repo.allow_unverified": "true", "train.threads": 1, "repo.rephrase_batching": "auto",
        "train.max_steps": 7}))
    t = Trainer(cfg, tmp_path / "auto", progress=False)
    calls = []
    real = t.generator.generate

    def spy(*a, **k):
        calls[-1] += 1
        return real(*a, **k)

    t.generator.generate = spy
    modes = []
    for _ in range(7):
        calls.append(0)
        m = t.train_step()
        assert m["repo/gate_rate"] > 0  # rho = 0: every step has gated groups, so every step is a trial
        modes.append("with_rollouts" if m["repo/rephrase_with_rollouts"] else "separate")
    assert modes[:4] == ["separate", "with_rollouts", "with_rollouts", "separate"]
    assert calls[:4] == [2, 1, 1, 2]
    chosen = t.run.batching
    assert chosen in ("separate", "with_rollouts")
    assert len(t.run.batching_trials) == 4
    assert modes[4:] == [chosen] * 3 and calls[4:] == [1 if chosen == "with_rollouts" else 2] * 3
    assert f"repo.rephrase_batching=auto: {chosen}" in capsys.readouterr().err


def test_clip_ratio_counts_every_ppo_iteration(tmp_path, tiny_model_dir, tiny_data):
    """With num_iterations=1 the ratio is exactly 1, so nothing clips. With 2 iterations, a large
    step and a tight epsilon, the second iteration's ratios leave the trust region and the
    logged clip ratio must show it (it used to be counted on the first iteration only)."""
    ratios = {}
    for iters in (1, 2):
        over = tiny_overrides(tiny_model_dir, tiny_data, **{
            "algorithm.method": "grpo", "algorithm.num_iterations": iters, "algorithm.epsilon": 0.01,
            "reward.funcs": "[tests.helpers.rewards:text_length]", "train.learning_rate": 3e-2,
            "train.max_grad_norm": 0, "train.max_steps": 2, "train.threads": 1})
        assert run_cli(tmp_path, f"it{iters}", over) == 0
        rows = read(tmp_path / f"it{iters}" / "metrics.jsonl")
        ratios[iters] = [r["clip_ratio"] for r in rows]
    assert ratios[1] == [0.0, 0.0]
    assert all(0 < c <= 0.5 for c in ratios[2]), ratios[2]  # at most the second half of the passes


def _step_with_grads(trainer):
    grads = {}
    step = trainer.optimizer.step

    def record(*a, **k):
        for n, p in trainer.model.named_parameters():
            if p.grad is not None:
                grads[n] = p.grad.clone()
        return step(*a, **k)

    trainer.optimizer.step = record
    return trainer.train_step(), grads


@pytest.mark.parametrize("method", ["grpo", "repo"])
def test_skipping_zero_advantage_rows_changes_no_loss_gradient_or_weight(tmp_path, tiny_model_dir, tiny_data, method):
    """Groups with equal rewards (and masked rows) are not forwarded; the normalisers still count
    them, so loss, gradient and weights equal a run that forwards every row."""
    out = {}
    for skip in ("true", "false"):
        cfg = build_config({}, tiny_overrides(tiny_model_dir, tiny_data, **{
            "algorithm.method": method, "reward.funcs": "[tests.helpers.rewards:flat_for_even_answers]",
            "train.skip_zero_advantage": skip, "train.max_grad_norm": 0, "train.prompts_per_step": 6,
            "repo.rho": 0.0, "repo.allow_unverified": "true", "train.seed": 3}))
        t = Trainer(cfg, tmp_path / f"{method}-{skip}", progress=False)
        out[skip] = [_step_with_grads(t) for _ in range(2)], {n: p.detach().clone() for n, p in t.model.named_parameters()}
    (steps_skip, w_skip), (steps_all, w_all) = out["true"], out["false"]
    for (m_skip, g_skip), (m_all, g_all) in zip(steps_skip, steps_all):
        assert m_skip["frac_reward_zero_std"] == m_all["frac_reward_zero_std"] > 0
        assert m_skip["train/rows_not_forwarded"] > 0 and m_all["train/rows_not_forwarded"] == 0
        assert m_skip["loss"] == pytest.approx(m_all["loss"], abs=1e-6)
        assert g_skip.keys() == g_all.keys() and g_skip
        for k in g_skip:
            assert torch.allclose(g_skip[k], g_all[k], atol=1e-6, rtol=1e-4), k
    for k in w_skip:
        assert torch.allclose(w_skip[k], w_all[k], atol=1e-6), k


def test_a_step_with_only_zero_advantage_rows_still_steps_the_optimizer(tmp_path, tiny_model_dir, tiny_data):
    """With nothing to forward, a zero-loss filler pass gives every parameter a zero gradient, so
    AdamW still applies its decoupled weight decay, exactly as when every row is forwarded."""
    weights = {}
    for skip in ("true", "false"):
        cfg = build_config({}, tiny_overrides(tiny_model_dir, tiny_data, **{
            "algorithm.method": "grpo", "reward.funcs": "[tests.helpers.rewards:always_one]",
            "train.skip_zero_advantage": skip, "train.weight_decay": 0.5, "train.max_steps": 1}))
        t = Trainer(cfg, tmp_path / skip, progress=False)
        m = t.train_step()
        assert m["frac_reward_zero_std"] == 1.0 and m["loss"] == 0.0
        weights[skip] = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        if skip == "true":
            assert m["train/rows_not_forwarded"] == 12
            assert m["entropy"] != m["entropy"]  # NaN: no trained token to average over
    from transformers import AutoModelForCausalLM

    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    for k, w in weights["true"].items():
        assert torch.equal(w, weights["false"][k]), k
    assert any(not torch.equal(w, initial[k].detach()) for k, w in weights["true"].items()), "weight decay was not applied"
