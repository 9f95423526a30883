"""``train.share_prompt``: the update runs each distinct prompt of a micro-batch once; the rows'
log-probs, entropies and gradients equal the per-row forward up to float rounding."""

from __future__ import annotations

import pytest
import torch

from repo_rl import algorithms as alg
from repo_rl.config import build_config
from repo_rl.step.types import Sequence_
from repo_rl.trainer import Trainer

from .conftest import tiny_overrides


def _pass(tmp_path, tiny_model_dir, tiny_data, share: bool, seqs_of, **extra):
    over = tiny_overrides(tiny_model_dir, tiny_data, **{"train.share_prompt": str(share).lower(), "train.max_steps": 1,
                                                        "algorithm.temperature": 0.7, **extra})
    torch.manual_seed(0)
    tr = Trainer(build_config({}, over), tmp_path / f"run-{share}")
    try:
        seqs = seqs_of(tr)
        used = []
        inner = tr.updater.shared_prompt_forward
        tr.updater.shared_prompt_forward = lambda *a, **k: used.append(1) or inner(*a, **k)
        logp, mask, ent, _ = tr.updater.forward_logprobs(tr.core, seqs, with_grad=True, want_entropy=True)
        (logp * mask).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in tr.model.parameters() if p.grad is not None])
        return (logp * mask).detach(), ent * mask, grads, bool(used)
    finally:
        tr.close_engines()


def _groups(tr):
    """3 prompts of different lengths (left padding), 4 rows each, completions of 1-8 tokens, and an
    SFT row (temperature 1 while the others train at 0.7)."""
    g = torch.Generator().manual_seed(1)
    base = [tr._prompt_ids(i) for i in range(3)]
    ids = [base[0], base[1][3:], base[2] + [11, 12]]
    seqs = [Sequence_(ids[i % 3], torch.randint(5, 30, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist(), False)
            for i in range(12)]
    seqs.append(Sequence_(ids[0], [7, 8, 9], False, alg.KIND_SFT))
    return seqs


def test_shared_prompts_give_the_per_row_log_probs_entropies_and_gradient(tmp_path, tiny_model_dir, tiny_data):
    a = _pass(tmp_path, tiny_model_dir, tiny_data, True, _groups)
    b = _pass(tmp_path, tiny_model_dir, tiny_data, False, _groups)
    assert a[3] and not b[3]  # the first went through the shared path, the second did not
    assert float((a[0] - b[0]).abs().max()) < 1e-5
    assert float((a[1] - b[1]).abs().max()) < 1e-4
    assert float((a[2] - b[2]).abs().max()) < 1e-5 * max(1.0, float(b[2].abs().max()))
    assert float(b[2].abs().max()) > 1e-3


@pytest.mark.parametrize("extra", [{"train.gradient_checkpointing": "true"}, {"train.logprob_chunk_size": 4}])
def test_the_per_row_forward_where_sharing_does_not_apply(tmp_path, tiny_model_dir, tiny_data, extra):
    assert not _pass(tmp_path, tiny_model_dir, tiny_data, True, _groups, **extra)[3]


def test_distinct_prompts_take_the_per_row_forward(tmp_path, tiny_model_dir, tiny_data):
    def distinct(tr):
        return [Sequence_(tr._prompt_ids(i), [5, 6, 7], False) for i in range(3)]

    assert not _pass(tmp_path, tiny_model_dir, tiny_data, True, distinct)[3]


def test_a_training_run_is_the_same_with_and_without_sharing(tmp_path, tiny_model_dir, tiny_data):
    import json

    rows = {}
    for share in ("true", "false"):
        over = tiny_overrides(tiny_model_dir, tiny_data, **{"train.share_prompt": share, "repo.rephrase_batching": "separate"})
        Trainer(build_config({}, over), tmp_path / share).train()
        rows[share] = [json.loads(x) for x in (tmp_path / share / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows["true"], rows["false"]):
        for k in ("loss", "reward", "entropy", "grad_norm", "repo/logp_gap"):
            assert a[k] == b[k] if a[k] is None or b[k] is None else a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
        assert a["reward"] is not None and a["loss"] is not None
