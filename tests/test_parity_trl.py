"""Our GRPO numerics against TRL 1.16's own code, on the same inputs.

The TRL side of every comparison is TRL's real code: ``GRPOTrainer._compute_loss`` (with its
fused, temperature-scaled LM head) on a real ``GRPOTrainer``, and ``trl.trainer.utils.nanstd``
for the advantages. Our side uses only the public pure functions (``repo_rl.step.logprobs``,
``repo_rl.algorithms``), so a redesign of the trainer cannot quietly change these numbers.

``python -m pytest tests/test_parity_trl.py -q -s -k table`` prints the parity table.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from transformers import AutoModelForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head, nanstd  # noqa: E402

from repo_rl.algorithms import KIND_POLICY, aggregate, group_advantages, token_loss  # noqa: E402
from repo_rl.step.logprobs import completion_logprobs  # noqa: E402

from .conftest import ROWS, make_tokenizer  # noqa: E402
from .helpers.rewards import contains_answer  # noqa: E402

B, P, T = 6, 5, 8  # rows, prompt length (no left padding: TRL derives positions from the columns), max completion
LENGTHS = [8, 5, 3, 8, 1, 6]
ADVANTAGES = [1.5, -0.7, 0.0, -1.2, 0.9, 0.3]
EPSILON = 0.2
TEMPERATURES = (1.0, 0.7)
CASES = list(itertools.product(("grpo", "dapo", "dr_grpo"), (0.0, 0.04), (None, 0.28), TEMPERATURES, (True, False)))


def _case_id(case) -> str:
    lt, beta, eh, temp, bc = case
    return f"{lt}-beta{beta}-eh{eh}-T{temp}-bc{int(bc)}"


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    """One real GRPOTrainer per temperature, a shared batch, and a perturbed reference model."""
    torch.manual_seed(0)
    ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in ROWS])
    trainers = {}
    for temp in TEMPERATURES:
        args = GRPOConfig(
            output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=B, num_generations=2,
            max_completion_length=T, temperature=temp, epsilon=EPSILON, report_to=[], use_cpu=True,
            save_strategy="no", disable_tqdm=True, logging_steps=1, gradient_checkpointing=False, bf16=False,
        )
        tr = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), reward_funcs=[contains_answer],
                         args=args, train_dataset=ds, processing_class=make_tokenizer())
        tr.model.train()
        tr.current_gradient_accumulation_steps = 1
        ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()  # not a copy: TRL patched tr.model's forward
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.05 * torch.randn_like(p))
        add_fused_lm_head(ref, temperature=temp)  # how TRL patches its own reference model
        trainers[temp] = (tr, ref)
    g = torch.Generator().manual_seed(1)
    vocab = trainers[1.0][0].model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g)
    completion_ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    completion_ids = completion_ids.masked_fill(mask == 0, 0)
    noise = 0.6 * torch.randn(B, T, generator=g)  # ratios far from 1: clipping is active on both sides
    noise[0, 1] = -torch.log(torch.tensor(1.24))  # A > 0 between 1 + epsilon and 1 + epsilon_high
    return trainers, prompt_ids, completion_ids, mask, noise


def _trl_logps(tr, model, ids, attn):
    logp, _, _ = tr._get_per_token_logps_and_entropies(model, ids, attn, T)
    return logp


def _ours_logps(model, ids, attn, temp):
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logp, _ = completion_logprobs(model, ids, attn, pos, P, T, temperature=temp)
    return logp


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def run_case(world, case) -> tuple[float, float, float]:
    """(|loss difference|, max |gradient difference|, max |gradient|) for one case."""
    loss_type, beta, eps_high, temp, bias_correction = case
    trainers, prompt_ids, completion_ids, mask, noise = world
    tr, ref = trainers[temp]
    model = tr.model
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attn = torch.cat([torch.ones_like(prompt_ids), mask], 1)
    with torch.no_grad():
        old = _trl_logps(tr, model, ids, attn) + noise
        ref_trl = _trl_logps(tr, ref, ids, attn)
        ref_ours = _ours_logps(ref, ids, attn, temp)
    adv = torch.tensor(ADVANTAGES)

    # TRL: its own loss on its own trainer.
    tr.loss_type, tr.beta = loss_type, beta
    tr.epsilon_low, tr.epsilon_high = EPSILON, EPSILON if eps_high is None else eps_high
    tr.args.use_bias_correction_kl = bias_correction
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
        "completion_mask": mask, "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref_trl,
        "num_items_in_batch": mask.sum(),
    }
    model.zero_grad(set_to_none=True)
    loss_trl = tr._compute_loss(model, inputs)
    loss_trl.backward()
    g_trl = _grads(model)

    # Ours: the public pure functions.
    model.zero_grad(set_to_none=True)
    logp = _ours_logps(model, ids, attn, temp)
    per_tok, _ = token_loss(
        logp, old, adv, torch.full((B,), KIND_POLICY), epsilon_low=EPSILON,
        epsilon_high=EPSILON if eps_high is None else eps_high, beta=beta, ref_logp=ref_ours if beta else None,
        use_bias_correction_kl=bias_correction,
    )
    loss = aggregate(per_tok, mask, loss_type, num_sequences=B, num_tokens=int(mask.sum()), max_completion_length=T)
    loss.backward()
    g_ours = _grads(model)
    model.zero_grad(set_to_none=True)
    return abs(float(loss) - float(loss_trl)), float((g_ours - g_trl).abs().max()), float(g_trl.abs().max())


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_loss_and_gradient_equal_trl(world, case):
    dloss, dgrad, gmax = run_case(world, case)
    assert gmax > 1e-4, "the case has no gradient to compare"
    assert dloss <= 1e-6, (case, dloss)
    assert dgrad <= 1e-6 * max(gmax, 1.0), (case, dgrad, gmax)


def test_the_batch_reaches_every_clipping_branch(world):
    """Ratios far from 1: low clipping (A < 0), high clipping beyond 1.28 and between 1.2 and 1.28
    (where epsilon_high = 0.28 and None differ), so every case above exercises them."""
    _, _, _, mask, noise = world
    ratio = torch.exp(-noise)  # old = logp + noise, so r = exp(-noise) before any update
    adv = torch.tensor(ADVANTAGES).unsqueeze(1).expand_as(ratio)
    m = mask.bool()
    assert bool(((ratio < 1 - EPSILON) & (adv < 0) & m).any())
    assert bool(((ratio > 1.28) & (adv > 0) & m).any())
    assert bool(((ratio > 1.2) & (ratio < 1.28) & (adv > 0) & m).any())


def test_the_comparison_tells_the_temperature_apart(world):
    """At T = 0.7, log-probs at T = 1 (the pre-fix behaviour) are far from TRL's: the table above
    fails if our side ignores the temperature."""
    trainers, prompt_ids, completion_ids, mask, _ = world
    tr, _ = trainers[0.7]
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attn = torch.cat([torch.ones_like(prompt_ids), mask], 1)
    with torch.no_grad():
        trl = _trl_logps(tr, tr.model, ids, attn)
        at_t = _ours_logps(tr.model, ids, attn, 0.7)
        at_1 = _ours_logps(tr.model, ids, attn, 1.0)
    m = mask.bool()
    assert float((at_t - trl)[m].abs().max()) < 1e-5
    assert float((at_1 - trl)[m].abs().max()) > 1e-2


@pytest.mark.parametrize("temp", TEMPERATURES)
def test_shared_prompt_log_probs_and_their_gradient_equal_trl(world, temp):
    """``train.share_prompt``: rows in groups of 2 share a prompt, which runs once; log-probs and the
    gradient of the dapo loss equal TRL's, which runs every row's prompt."""
    from repo_rl.step.logprobs import shared_prompt_logprobs

    trainers, prompt_ids, completion_ids, mask, noise = world
    tr, _ = trainers[temp]
    model = tr.model
    rows = torch.arange(B) // 2
    prompts = prompt_ids[::2]  # 3 distinct prompts, each the prompt of 2 rows
    ids = torch.cat([prompts.index_select(0, rows), completion_ids], 1)
    attn = torch.cat([torch.ones(B, P, dtype=torch.long), mask], 1)
    adv = torch.tensor(ADVANTAGES)
    with torch.no_grad():
        old = _trl_logps(tr, model, ids, attn) + noise
    inputs = {"prompt_ids": ids[:, :P], "prompt_mask": attn[:, :P], "completion_ids": completion_ids, "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": None, "num_items_in_batch": mask.sum()}
    tr.loss_type, tr.beta, tr.epsilon_low, tr.epsilon_high = "dapo", 0.0, EPSILON, EPSILON
    model.zero_grad(set_to_none=True)
    loss_trl = tr._compute_loss(model, inputs)
    loss_trl.backward()
    g_trl = _grads(model)
    model.zero_grad(set_to_none=True)
    logp, _ = shared_prompt_logprobs(model, prompts, torch.ones(3, P, dtype=torch.long), rows, completion_ids, mask, temperature=temp)
    with torch.no_grad():
        trl = _trl_logps(tr, model, ids, attn)
    m = mask.bool()
    assert float((logp.detach() - trl)[m].abs().max()) < 1e-5
    per_tok, _ = token_loss(logp, old, adv, torch.full((B,), KIND_POLICY), epsilon_low=EPSILON, epsilon_high=EPSILON)
    loss = aggregate(per_tok, mask, "dapo", num_sequences=B, num_tokens=int(mask.sum()))
    loss.backward()
    g_ours = _grads(model)
    model.zero_grad(set_to_none=True)
    assert abs(float(loss) - float(loss_trl)) <= 1e-6
    assert float((g_ours - g_trl).abs().max()) <= 1e-5 * max(float(g_trl.abs().max()), 1.0)


def test_adapter_logprobs_under_q_equal_trl_at_its_temperature(world):
    """The TRL adapter's log pi(o | q) (returned for TRL's importance-sampling correction and used
    for repo/logp_gap) equal TRL's own old log-probs at TRL's temperature."""
    from repo_rl.integrations.trl import make_repo_rollout_func

    trainers, prompt_ids, completion_ids, mask, _ = world
    tr, _ = trainers[0.7]
    rows = [list(map(int, p)) for p in prompt_ids]
    comps = [list(map(int, c[: int(m.sum())])) for c, m in zip(completion_ids, mask)]
    fn = make_repo_rollout_func(datasets.Dataset.from_list([{"prompt": "x", "solution": "y"}]))
    with torch.no_grad():
        ours = fn._logprobs(tr, rows, comps)
        ids = torch.cat([prompt_ids, completion_ids], 1)
        trl = _trl_logps(tr, tr.model, ids, torch.cat([torch.ones_like(prompt_ids), mask], 1))
    for i, lp in enumerate(ours):
        assert len(lp) == LENGTHS[i]
        assert torch.allclose(torch.tensor(lp), trl[i, : LENGTHS[i]], atol=1e-6)


def test_table(world, capsys):
    """Prints case -> max difference of loss and gradient against TRL (run with -s)."""
    lines = [f"{'case':<34} {'|dloss|':>10} {'max|dgrad|':>11} {'max|grad|':>10}"]
    worst = 0.0
    for case in CASES:
        dl, dg, gm = run_case(world, case)
        worst = max(worst, dl, dg / max(gm, 1.0))
        lines.append(f"{_case_id(case):<34} {dl:>10.2e} {dg:>11.2e} {gm:>10.2e}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert worst <= 1e-6


def test_masked_rows_divide_by_rows_in_the_loss_not_all_rows(world):
    """``mask_truncated_completions``: for grpo and dr_grpo we divide by the rows left in the loss
    (as verl does); TRL divides by every row, so its loss is ours x (rows in loss / all rows)."""
    trainers, prompt_ids, completion_ids, mask, noise = world
    tr, _ = trainers[1.0]
    masked = mask.clone()
    masked[[1, 4]] = 0  # two rows out of the loss entirely
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attn = torch.cat([torch.ones_like(prompt_ids), mask], 1)
    with torch.no_grad():
        old = _trl_logps(tr, tr.model, ids, attn) + noise
    adv = torch.tensor(ADVANTAGES)
    for loss_type in ("grpo", "dr_grpo"):
        tr.loss_type, tr.beta, tr.epsilon_low, tr.epsilon_high = loss_type, 0.0, EPSILON, EPSILON
        inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
                  "completion_mask": masked, "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": masked.sum()}
        with torch.no_grad():
            loss_trl = float(tr._compute_loss(tr.model, inputs))
            logp = _ours_logps(tr.model, ids, attn, 1.0)
        per_tok, _ = token_loss(logp, old, adv, torch.full((B,), KIND_POLICY), epsilon_low=EPSILON, epsilon_high=EPSILON)
        ours = float(aggregate(per_tok, masked, loss_type, num_sequences=B - 2, max_completion_length=T))
        assert abs(ours * (B - 2) / B - loss_trl) < 1e-6, loss_type
        assert abs(ours - loss_trl) > 1e-4


# --------------------------------------------------------------------------------------
# Advantages: against TRL's formula (grpo_trainer.py, _generate_and_score_completions, 1.16)
# --------------------------------------------------------------------------------------


def trl_advantages(rewards: torch.Tensor, G: int, scale: str) -> torch.Tensor:
    """TRL 1.16's ``sum_then_normalize`` advantages, line for line, with TRL's own ``nanstd``."""
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


NAN = float("nan")
REWARD_SETS = {
    "mixed": [1.0, 0.0, 0.0, 1.0, 0.2, 0.9, 0.4, 0.4],
    "all_equal_groups": [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0],
    "none_rewards": [1.0, NAN, 0.0, 0.5, NAN, 0.3, 0.8, 0.1],
    "one_valid_in_a_group": [NAN, NAN, NAN, 1.0, 0.0, 1.0, 0.5, 0.25],
    "all_none_group": [NAN, NAN, NAN, NAN, 0.0, 1.0, 1.0, 0.0],
}


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("name", list(REWARD_SETS))
def test_advantages_equal_trl(name, scale):
    r = torch.tensor(REWARD_SETS[name], dtype=torch.float32)
    ours = group_advantages(r, 4, scale)
    theirs = trl_advantages(r, 4, scale)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-6), (ours.tolist(), theirs.tolist())
