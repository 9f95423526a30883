"""RePO's diagnostics: the gated-negatives ablation (a pure function, by hand and against a loop),
uptake of injected rephrases under q, and ``repo-rl audit-rephrases``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from repo_rl import algorithms as alg
from repo_rl.audit import summarize, table
from repo_rl.cli import main
from repo_rl.config import load_config
from repo_rl.trainer import Trainer

from .conftest import ROWS, tiny_overrides

P, R = alg.ORIGIN_ON_POLICY, alg.ORIGIN_REPHRASED


def test_drop_negatives_beside_injected_by_hand():
    adv = torch.tensor([2.0, -0.5, -0.5, -1.0, 0.75, -0.75, 0.0, 0.0])
    org = torch.tensor([R, P, P, P, P, P, P, P])
    out = alg.drop_negatives_beside_injected(adv, org, 4)
    # group 0 holds an injected row: its rollouts' negative advantages go; group 1 is untouched
    assert out.tolist() == [2.0, 0.0, 0.0, 0.0, 0.75, -0.75, 0.0, 0.0]
    # a successful rollout beside the injected row keeps its positive advantage
    got = alg.drop_negatives_beside_injected(torch.tensor([1.0, 0.5, -1.5, 0.0]), torch.tensor([P, R, P, P]), 4)
    assert got.tolist() == [1.0, 0.5, 0.0, 0.0]


def test_drop_negatives_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        G, N = 4, 5
        adv = torch.randn(N * G, generator=g)
        org = torch.where(torch.rand(N * G, generator=g) < 0.15, torch.tensor(R), torch.tensor(P))
        want = adv.clone()
        for n in range(N):
            rows = range(n * G, (n + 1) * G)
            if any(int(org[i]) != P for i in rows):
                for i in rows:
                    if int(org[i]) == P and want[i] < 0:
                        want[i] = 0.0
        assert torch.equal(alg.drop_negatives_beside_injected(adv, org, G), want)


def _train(tmp_path, name, tiny_model_dir, tiny_data, **extra):
    over = tiny_overrides(tiny_model_dir, tiny_data, **{"repo.verify": "[reward]", "repo.rho": 0.0,
                                                        "repo.rephrase_batching": "separate", **extra})
    t = Trainer(load_config(None, over), tmp_path / name, progress=False)
    t.train()
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    comps = [json.loads(x) for x in (tmp_path / name / "completions.jsonl").read_text().splitlines()]
    return t, rows, comps


def test_gated_negatives_off_zeroes_the_failed_rollouts_of_injected_groups(tmp_path, tiny_model_dir, tiny_data):
    _, _, comps = _train(tmp_path, "abl", tiny_model_dir, tiny_data, **{"repo.gated_negatives": "false"})
    groups: dict[tuple, list] = {}
    for c in comps:
        groups.setdefault((c["step"], c["group"]), []).append(c)
    injected = [g for g in groups.values() if any(c["origin"] == "rephrased" for c in g)]
    assert injected, "no group received a rephrase"
    for g in injected:
        assert all(c["advantage"] >= 0 for c in g if c["origin"] == "on_policy")
        assert any(c["advantage"] > 0 for c in g if c["origin"] == "rephrased")
    _, _, base = _train(tmp_path, "base", tiny_model_dir, tiny_data)
    assert any(c["advantage"] < 0 for c in base if c["origin"] == "on_policy")  # the default keeps them


def test_uptake_rescores_injected_rephrases_later(tmp_path, tiny_model_dir, tiny_data):
    t, rows, _ = _train(tmp_path, "up", tiny_model_dir, tiny_data, **{"repo.uptake_after": 1, "train.max_steps": 4})
    assert rows[0]["repo/uptake_logp_then"] is None and rows[0]["repo/uptake_n"] == 0  # nothing due yet (NaN, written as null)
    later = [r for r in rows[1:] if r["repo/uptake_n"] > 0]
    assert later, rows
    # what was injected at step s is looked at again at step s + 1, with its log-prob under q then
    for prev, r in zip(rows, rows[1:]):
        if r["repo/uptake_n"]:
            assert r["repo/uptake_n"] == prev["repo/replaced"]
            assert r["repo/uptake_logp_then"] == pytest.approx(prev["repo/injected_logp_q"], rel=1e-6)
            assert r["repo/uptake_gain"] == pytest.approx(r["repo/uptake_logp_now"] - r["repo/uptake_logp_then"], rel=1e-6, abs=1e-9)
    state = json.loads((tmp_path / "up" / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert len(state["uptake"]) == rows[-1]["repo/replaced"]  # the last step's rows wait for the next look


def test_audit_summary_from_hand_made_records():
    def rec(reward, strict, steps, passed, copy=0.0, shots=0):
        return {"id": f"r{reward}{strict}{steps}", "checks": {"reward": reward, "strict": strict, "steps": steps}, "passed": passed,
                "via": "-" if not reward else ("boxed" if strict else "fallback"), "copy_share": copy, "logp_p": -1.0,
                "logp_q": -3.0 if passed else -5.0, "tokens": 10, "shots": shots}
    recs = [rec(True, True, True, True, shots=2), rec(True, False, True, False, copy=0.8), rec(True, True, False, False),
            rec(False, False, False, False, shots=2)]
    s = summarize(recs, ["strict", "steps"], fewshot=2)
    assert s["verified_rate"] == 0.75 and s["via_boxed"] == pytest.approx(2 / 3) and s["via_fallback"] == pytest.approx(1 / 3)
    assert s["faithful_rate"] == 0.25 and s["checks"] == {"reward": 0.75, "strict": 0.5, "steps": 0.5}
    assert s["copy_rate"] == 0.25 and s["faithful_logp_q"] == -3.0 and s["logp_q"] == -4.5
    assert s["faithful_rate_full_bank"] == 0.5 and s["rephrases_full_bank"] == 2
    assert "| faithful: pass repo.verify = ['strict', 'steps'] | 0.250 |" in table(s)


def test_audit_command_writes_the_table_and_the_examples(tmp_path, tiny_model_dir, tiny_data, capsys):
    out = tmp_path / "audit"
    over = [o for o in tiny_overrides(tiny_model_dir, tiny_data) if not o.startswith("repo.num_attempts")]
    rc = main(["audit-rephrases", "-n", "3", "--samples", "2", "--batch", "2", "-o", str(out), *over,
               "repo.verify=[reward]", "repo.fewshot=1"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-600:]
    assert "| verified by the training reward |" in cap.out
    assert "6 training rows, 5 with an expert solution, 1 without (never rephrased)" in cap.err
    recs = [json.loads(x) for x in (out / "rephrases.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and len({r["id"] for r in recs}) == 3
    sols = {r["id"]: r["solution"] for r in ROWS}
    assert all(r["solution"] == sols[r["id"]] for r in recs)
    assert all(set(r["checks"]) >= {"reward", "strict", "steps"} and math.isfinite(r["logp_q"]) for r in recs)
    s = json.loads((out / "audit.json").read_text())
    assert s["rephrases"] == 6 and s["verified_rate"] == sum(r["checks"]["reward"] for r in recs) / 6
    assert (out / "audit.md").read_text().startswith("| measure | value |")


def test_audit_on_rows_without_solutions_is_a_count_not_a_crash(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "nosol.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {i}+1?", "answer": str(i + 1)}) + "\n" for i in range(4)))
    rc = main(["audit-rephrases", "-o", str(tmp_path / "a"), *tiny_overrides(tiny_model_dir, data)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "4 training rows, 0 with an expert solution, 4 without" in err
    assert err.strip().splitlines()[-1].startswith("repo-rl: error: no training row has an expert solution")
