"""``train.max_staleness: 1`` with the vLLM engine: the next batch is sampled by the engine (in its
own process) while this step trains, and an interrupted run resumes on the batch it had sampled.

Needs the vLLM environment (``vllm`` marker; ``.ci/run`` runs it there). ``tests/test_overlap.py``
covers the same logic without vLLM.
"""

from __future__ import annotations

import json
import math

import pytest

from .conftest import ROWS, make_tokenizer, tiny_overrides
from .test_overlap import stop_after
from .test_trainer import no_time, read

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")


def test_overlapped_vllm_run_samples_one_step_behind_and_resumes_exactly(tmp_path):
    from repo_rl.config import build_config
    from repo_rl.models.tiny import save_tiny_model_dir
    from repo_rl.trainer import Trainer

    save_tiny_model_dir(tmp_path / "model", make_tokenizer(), hidden_size=128, num_heads=2, num_kv_heads=1)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in ROWS))
    over = tiny_overrides(tmp_path / "model", data, **{
        "generation.backend": "vllm", "generation.vllm_kv_cache_gb": 1, "algorithm.method": "repo", "train.max_staleness": 1,
        "train.max_steps": 4, "train.save_every": 1000, "train.threads": 1, "repo.rephrase_batching": "separate",
        "train.learning_rate": 3e-2})
    full = Trainer(build_config({}, over), tmp_path / "full")
    full.train()
    rows = read(tmp_path / "full" / "metrics.jsonl")
    assert [r["train/staleness"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    assert full.generator.syncs == 4
    for r in rows:
        assert 0.0 < r["sampling/importance_sampling_ratio/mean"] <= 3.0 and math.isfinite(r["loss"])
    # Step 1 trains on samples of the weights it starts from; later steps on samples one update older.
    assert rows[0]["sampling/sampling_logp_difference/mean"] < 1e-3
    assert max(r["sampling/sampling_logp_difference/mean"] for r in rows[1:]) > 1e-2

    stop_after(Trainer(build_config({}, over), tmp_path / "cut"), 2)
    resumed = Trainer(build_config({}, over), tmp_path / "cut", resume=True)
    assert resumed._pending is not None and resumed._pending.step == 2
    resumed.train()
    assert no_time(read(tmp_path / "cut" / "metrics.jsonl")) == no_time(rows)
    assert read(tmp_path / "cut" / "completions.jsonl") == read(tmp_path / "full" / "completions.jsonl")
