"""``train.max_staleness: 1``: the next batch is sampled while this one trains, the importance
sampling correction, the pending batch in checkpoints, and the refusals.

The overlap needs an engine with its own weights; here that is the HF sampler over a copy of the
weights (``tests/helpers/copy_sampler.py``), so these run without vLLM. ``tests/test_vllm_overlap.py``
runs the same with the vLLM engine.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal

import pytest
import torch

from repo_rl import algorithms as alg
from repo_rl.config import ConfigError, build_config
from repo_rl.run.directory import StopRequested
from repo_rl.step.pipeline import Batch, batch_from_state, batch_state
from repo_rl.step.types import Group, Sequence_
from repo_rl.trainer import Trainer

from .conftest import tiny_overrides
from .test_trainer import no_time, read
from .helpers import copy_sampler
from .helpers.copy_sampler import fingerprint

copy_sampler.register()


def stop_after(trainer: Trainer, steps: int) -> None:
    """Run ``trainer`` until it has taken ``steps`` steps, then stop it as SIGTERM does (save, then stop)."""
    step = trainer.train_step

    def stepped():
        m = step()
        if trainer.step == steps:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer
        return m

    trainer.train_step = stepped
    with pytest.raises(StopRequested):
        trainer.train()


def overlap(model_dir, data, **extra) -> list[str]:
    base = {"generation.backend": copy_sampler.NAME, "train.max_staleness": 1, "train.max_steps": 4, "train.save_every": 1000,
            "repo.rephrase_batching": "separate", "train.learning_rate": 3e-2, "train.threads": 1}
    base.update(extra)
    return tiny_overrides(model_dir, data, **base)


# ----------------------------------------------------------------------------- the ratio, pure


def test_importance_ratio_by_hand():
    train = torch.tensor([[0.0, -1.0, -2.0]])
    sampler = torch.tensor([[math.log(2.0), -1.0 - math.log(5.0), 0.0]])  # ratios 1/2, 5, e^-2
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the last token is padding: log-ratio 0
    r = alg.sampling_importance_ratio(train, sampler, mask, "token_truncate", None, 3.0)
    assert torch.allclose(r, torch.tensor([[0.5, 3.0, 1.0]]))
    r = alg.sampling_importance_ratio(train, sampler, mask, "token_mask", 0.6, 3.0)
    assert torch.allclose(r, torch.tensor([[0.0, 0.0, 1.0]]))
    # one ratio per row: exp(log 1/2 + log 5) = 2.5
    r = alg.sampling_importance_ratio(train, sampler, mask, "sequence_truncate", None, 3.0)
    assert torch.allclose(r, torch.full((1, 3), 2.5))
    r = alg.sampling_importance_ratio(train, sampler, mask, "sequence_mask", None, 2.0)
    assert torch.equal(r, torch.zeros(1, 3))
    nan = alg.sampling_importance_ratio(train, torch.full_like(train, float("nan")), mask, "token_truncate", None, 3.0)
    assert torch.equal(nan, torch.ones(1, 3))  # a token the sampler could not score is not corrected
    with pytest.raises(ValueError, match="token_truncate"):
        alg.sampling_importance_ratio(train, sampler, mask, "tokens")


@pytest.mark.parametrize("mode", alg.losses.IS_MODES)
def test_importance_ratio_equals_a_plain_loop(mode):
    g = torch.Generator().manual_seed(0)
    train, sampler = -torch.rand(4, 6, generator=g) * 3, -torch.rand(4, 6, generator=g) * 3
    mask = (torch.rand(4, 6, generator=g) > 0.3).float()
    lo, hi = 0.5, 2.0
    got = alg.sampling_importance_ratio(train, sampler, mask, mode, lo, hi)
    for i in range(4):
        seq = math.exp(sum(float(train[i, t] - sampler[i, t]) for t in range(6) if mask[i, t]))
        for t in range(6):
            x = seq if mode.startswith("sequence") else (math.exp(float(train[i, t] - sampler[i, t])) if mask[i, t] else 1.0)
            want = min(max(x, lo), hi) if mode.endswith("truncate") else (x if lo <= x <= hi else 0.0)
            assert abs(float(got[i, t]) - want) < 1e-5 * max(1.0, want), (i, t)


# ----------------------------------------------------------------------------- the update


def test_the_update_weights_each_sampled_token_by_the_capped_ratio(tmp_path, tiny_model_dir, tiny_data):
    """num_iterations 1: pi / pi_old = 1, so the dapo loss is -sum_t w_t A_i / tokens; the sampler's
    log-probs are set so that the weights w are known; an injected row (no sampler log-probs) keeps 1."""
    over = tiny_overrides(tiny_model_dir, tiny_data, **{"algorithm.vllm_importance_sampling_correction": "true",
                                                        "train.max_steps": 1, "train.skip_zero_advantage": "false"})
    tr = Trainer(build_config({}, over), tmp_path / "run")
    try:
        ids = [tr._prompt_ids(i) for i in range(2)]
        seqs = [Sequence_(ids[0], [5, 6, 7], False), Sequence_(ids[1], [8, 9, 10, 11], False), Sequence_(ids[1], [12, 13], False)]
        train_lp = tr.updater.logprobs(tr.core, seqs)
        w = [[0.5, 1.0, 5.0], [2.0, 0.25, 1.0, 1.0]]  # 5 is capped at 3
        for s, lp, ws in zip(seqs, train_lp, w):
            s.sampler_logps = [float(x) - math.log(y) for x, y in zip(lp.tolist(), ws)]
        adv = torch.tensor([1.0, -1.0, 2.0])  # the third row is like an injected rephrase: weight 1
        res = tr.updater(seqs, adv, torch.ones(3, dtype=torch.bool))
        capped = [[min(x, 3.0) for x in ws] for ws in w]
        want = -(sum(capped[0]) * 1.0 + sum(capped[1]) * -1.0 + 2 * 2.0) / 9
        assert res.metrics["loss"] == pytest.approx(want, rel=1e-4, abs=1e-6)
        m = res.metrics
        assert m["sampling/importance_sampling_ratio/max"] == pytest.approx(3.0, rel=1e-4)
        assert m["sampling/importance_sampling_ratio/min"] == pytest.approx(0.25, rel=1e-4)
        assert m["sampling/importance_sampling_ratio/mean"] == pytest.approx(sum(map(sum, capped)) / 7, rel=1e-4)
        assert m["sampling/sampling_logp_difference/max"] == pytest.approx(math.log(5.0), rel=1e-4)
    finally:
        tr.close_engines()


# ----------------------------------------------------------------------------- the overlap


def test_the_next_batch_is_sampled_with_the_weights_this_step_starts_from(tmp_path, tiny_model_dir, tiny_data):
    tr = Trainer(build_config({}, overlap(tiny_model_dir, tiny_data)), tmp_path / "run")
    at_start: list[float] = []
    step = tr.train_step

    def recorded():
        at_start.append(fingerprint(tr.model))
        return step()

    tr.train_step = recorded
    tr.train()
    rows = read(tmp_path / "run" / "metrics.jsonl")
    assert [r["train/staleness"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    assert len(set(at_start)) == 4  # the weights moved at every step: the check below can tell them apart
    # Steps 1 and 2 sampled with the initial weights, step t+1 with those step t started from; the
    # last step's weights sampled nothing (no step after it). Without the overlap this is 0, 1, 2, 3.
    used = [at_start.index(c) for c in tr.generator.calls]
    assert used == sorted(used) and set(used) == {0, 1, 2}, (used, at_start)
    assert tr.generator.syncs == 4
    for r in rows:
        assert 0.0 < r["sampling/importance_sampling_ratio/mean"] < 3.0
        assert r["sampling/importance_sampling_ratio/max"] <= 3.0 + 1e-6
    # The stale batches were sampled by other weights than those that trained on them.
    assert max(r["sampling/sampling_logp_difference/mean"] for r in rows[1:]) > 10 * rows[0]["sampling/sampling_logp_difference/mean"]


def test_injected_rows_log_probs_under_q_come_from_the_weights_that_train_on_them(tmp_path, tiny_model_dir, tiny_data):
    over = overlap(tiny_model_dir, tiny_data, **{"repo.rho": 0.5, "repo.delta": 1.0, "repo.allow_unverified": "true"})
    tr = Trainer(build_config({}, over), tmp_path / "run")
    history: list[torch.nn.Module] = []
    seen: list[tuple[list[Sequence_], dict[int, float], torch.nn.Module, torch.nn.Module]] = []
    upd, step = tr.updater.__call__, tr.train_step

    def recorded_step():
        history.append(copy.deepcopy(tr.core).eval())
        return step()

    class Spy:
        def __getattr__(self, name):
            return getattr(upd.__self__, name)

        def __call__(self, seqs, adv, valid, keep_logp=()):
            now = copy.deepcopy(tr.core).eval()
            res = upd(seqs, adv, valid, keep_logp=keep_logp)
            injected = {i: res.logp_sums[i] for i in keep_logp if seqs[i].kind == alg.KIND_POLICY and i in res.logp_sums}
            seen.append((list(seqs), injected, now, history[-2] if len(history) > 1 else now))
            return res

    tr.train_step, tr.updater = recorded_step, Spy()
    tr.train()
    checked = 0
    for seqs, injected, now, stale in seen[1:]:  # from step 2 on the batch was sampled one update earlier
        for i, logp_sum in injected.items():
            under_now = float(tr.updater.logprobs(now, [seqs[i]])[0].sum())
            under_stale = float(tr.updater.logprobs(stale, [seqs[i]])[0].sum())
            assert logp_sum == pytest.approx(under_now, abs=1e-4)
            assert abs(under_now - under_stale) > 1e-3  # the test can tell the two weights apart
            checked += 1
    assert checked >= 2
    assert read(tmp_path / "run" / "metrics.jsonl")[-1]["repo/replaced"] > 0


def test_an_interrupted_overlapped_run_resumes_on_the_saved_batch(tmp_path, tiny_model_dir, tiny_data):
    over = overlap(tiny_model_dir, tiny_data)
    Trainer(build_config({}, over), tmp_path / "full").train()
    stop_after(Trainer(build_config({}, over), tmp_path / "cut"), 2)
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["pending"] and state["pending"][0]["step"] == 2 and state["pending"][0]["weights_step"] == 1
    resumed = Trainer(build_config({}, over), tmp_path / "cut", resume=True)
    assert resumed._pending is not None and resumed._pending.step == 2
    resumed.train()
    assert no_time(read(tmp_path / "cut" / "metrics.jsonl")) == no_time(read(tmp_path / "full" / "metrics.jsonl"))
    full_c = read(tmp_path / "full" / "completions.jsonl")
    assert read(tmp_path / "cut" / "completions.jsonl") == full_c


def test_without_the_saved_batch_the_resumed_run_differs(tmp_path, tiny_model_dir, tiny_data):
    """The check above can fail: dropping the checkpoint's batch resamples step 3 from newer weights."""
    over = overlap(tiny_model_dir, tiny_data, **{"train.save_every": 2})
    Trainer(build_config({}, over), tmp_path / "full").train()
    Trainer(build_config({}, over + ["train.max_steps=2"]), tmp_path / "cut").train()  # the last step samples nothing ahead
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["pending"] is None
    Trainer(build_config({}, over), tmp_path / "cut", resume=True).train()
    a, b = no_time(read(tmp_path / "cut" / "metrics.jsonl")), no_time(read(tmp_path / "full" / "metrics.jsonl"))
    assert a[:2] == b[:2] and a[2] != b[2] and a[2]["train/staleness"] == 0.0


def test_batch_state_round_trips_through_json(tmp_path, tiny_model_dir, tiny_data):
    from repo_rl.data import load_examples
    from repo_rl.step.bank import BankEntry

    rows = load_examples(str(tiny_data), build_config({}, []).data.fields)
    seqs = [Sequence_([1, 2], [3, 4], False, sampler_logps=[-0.1, -2.5e-9]), Sequence_([1, 2], [5], True, alg.KIND_SFT)]
    group = Group([rows[1]], [1], seqs, ["a", "b"], torch.tensor([1.0, float("nan")], dtype=torch.float64),
                  torch.tensor([0, 1]), torch.tensor([False, True]), {"repo/gated": 1.0}, gap_under_p={1: -3.25},
                  batching="with_rollouts", bank_candidates=[BankEntry("q1", "q?", "s", "t", 3)],
                  gap_missing=[(0, Sequence_([9], [8], False))])
    b = Batch(3, [1, 0], 2, group, torch.tensor([0.5, 0.0], dtype=torch.float64), {"rewards/items": 2.0}, {"generation": 0.1}, 2)
    back = batch_from_state(json.loads(json.dumps(batch_state(b))), rows)
    assert back.group.sequences == seqs and back.group.examples == [rows[1]] and back.group.gap_missing == group.gap_missing
    assert torch.equal(back.group.rewards[:1], group.rewards[:1]) and math.isnan(float(back.group.rewards[1]))
    assert back.group.rewards.dtype == torch.float64 and back.group.origins.dtype == group.origins.dtype
    assert back.group.bank_candidates == group.bank_candidates and back.group.gap_under_p == {1: -3.25}
    assert (back.step, back.dataset_index, back.epoch, back.weights_step) == (3, [1, 0], 2, 2)
    assert torch.equal(back.on_policy, b.on_policy) and back.reward_counts == b.reward_counts


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("extra, match", [
    ({"train.max_staleness": 2}, "train.max_staleness: expected 0 .* or 1"),
    ({"train.max_staleness": 1, "algorithm.method": "sft"}, "method sft samples no rollouts"),
    ({"train.max_staleness": 1, "generation.backend": "vllm", "generation.vllm_in_process": "true"}, "vllm_in_process=false"),
    ({"algorithm.vllm_importance_sampling_clip_max": 0}, "clip_max: expected a number > 0"),
])
def test_refused_settings_are_one_line(extra, match, tiny_model_dir, tiny_data):
    with pytest.raises(ConfigError, match=match) as e:
        build_config({}, tiny_overrides(tiny_model_dir, tiny_data, **extra))
    assert "\n" not in str(e.value)


def test_the_hf_sampler_says_it_cannot_overlap_and_samples_then_trains(tmp_path, tiny_model_dir, tiny_data, capsys):
    over = tiny_overrides(tiny_model_dir, tiny_data, **{"train.max_staleness": 1, "train.max_steps": 2})
    tr = Trainer(build_config({}, over), tmp_path / "run")
    tr.train()
    err = capsys.readouterr().err
    assert "cannot overlap" in err and err.count("generation.backend=hf") == 1
    rows = read(tmp_path / "run" / "metrics.jsonl")
    assert "train/staleness" not in rows[0] and "sampling/importance_sampling_ratio/mean" in rows[0]
