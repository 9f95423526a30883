"""Same seeds, same run: a few steps of every method on the tiny model against a recorded run.

``tests/data/method_golden.json`` holds, per method, the metrics (timings aside), every logged
completion (text, origin, reward, advantage) and a digest of the final weights of a 3-step run.
A refactor of the trainer must leave them unchanged (to rounding: see ``_close_weights``). After
a change that is meant to move the numbers, rewrite the file with
``python -m tests.test_method_golden`` and say why in the commit.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from repo_rl.algorithms import METHODS

GOLDEN = Path(__file__).parent / "data" / "method_golden.json"
METHOD_NAMES = sorted(METHODS)


def run_method(method: str, workdir: Path) -> dict:
    from repo_rl.config import build_config
    from repo_rl.trainer import Trainer

    from .conftest import ROWS, make_tiny_model_dir, tiny_overrides

    model_dir = workdir / "model"
    if not model_dir.exists():
        make_tiny_model_dir(model_dir)
    data = workdir / "train.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in ROWS))
    out = workdir / method
    cfg = build_config({}, tiny_overrides(model_dir, data, **{
        "algorithm.method": method, "reward.funcs": "[tests.helpers.rewards:fail_odd_answers]",
        "repo.rho": 0.25, "repo.allow_unverified": "true", "algorithm.num_iterations": 2,
        "algorithm.temperature": 0.9, "baselines.sft_steps": 1, "train.save_every": 0,
    }))
    t = Trainer(cfg, out, progress=False)
    t.train()
    metrics = [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
               for line in (out / "metrics.jsonl").read_text().splitlines()]
    comps = [{k: c[k] for k in ("step", "group", "origin", "reward", "advantage", "in_loss", "text")}
             for c in map(json.loads, (out / "completions.jsonl").read_text().splitlines())]
    digest = {n: [float(p.detach().double().sum()), float(p.detach().double().abs().sum())]
              for n, p in t.model.named_parameters()}
    return {"metrics": metrics, "completions": comps, "weights": digest}


def _close(a, b, path: str) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            assert a == b, f"{path}: {a} != {b}"
        elif math.isnan(a) or math.isnan(b):
            assert math.isnan(a) and math.isnan(b), f"{path}: {a} != {b}"
        else:
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_same_seed_same_run_as_recorded(method, tmp_path_factory):
    golden = json.loads(GOLDEN.read_text())
    assert method in golden, f"no recorded run for {method}: run python -m tests.test_method_golden"
    got = run_method(method, tmp_path_factory.getbasetemp() / "golden")
    got = json.loads(json.dumps(got))  # the same float formatting as the file
    want = golden[method]
    _close({k: v for k, v in got.items() if k != "weights"}, {k: v for k, v in want.items() if k != "weights"}, method)
    _close_weights(got["weights"], want["weights"], f"{method}.weights")


def _close_weights(got: dict, want: dict, path: str, rel: float = 5e-5) -> None:
    """Weight digests ([sum, sum of |w|] per tensor) within ``rel`` of the tensor's sum of |w|.
    A signed sum cancels, so its rounding error scales with the absolute sum, not with itself: the
    same run on another CPU (AMD EPYC against an Intel Xeon with AMX) moves both by up to ~1e-5 of
    it, while metrics and completions still agree to 1e-5."""
    assert set(got) == set(want), f"{path}: keys {sorted(set(got) ^ set(want))}"
    for name, (s, a) in got.items():
        s0, a0 = want[name]
        tol = rel * a0 + 1e-9
        assert abs(s - s0) <= tol and abs(a - a0) <= tol, f"{path}.{name}: [{s}, {a}] != [{s0}, {a0}] (tolerance {tol:.3g})"


if __name__ == "__main__":
    import os
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        result = {m: run_method(m, Path(d)) for m in METHOD_NAMES}
    GOLDEN.write_text(json.dumps(result, indent=0, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN} ({', '.join(METHOD_NAMES)})", file=sys.stderr)
