"""The ``judge`` reward against a real HTTP server on loopback (tests/helpers/judge_server.py),
and reward routing by domain (``reward.by_domain``)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch

from repo_rl.config import load_config
from repo_rl.data import Example
from repo_rl.errors import ConfigError, UserError
from repo_rl.rewards.judge import JudgeReward, parse_verdict, question_text
from repo_rl.rewards.scorer import RewardScorer

from .conftest import tiny_overrides
from .helpers.judge_server import JudgeServer

Q = ["What is the capital of France?", "How many legs has a spider?", "Name the largest planet."]
REF = ["Paris", "8", "Jupiter"]
GOOD = ["It is Paris.", "A spider has 8 legs.", "Jupiter"]
BAD = ["Lyon", "six", "Mars"]


def judge(server: JudgeServer, tmp_path=None, **kw) -> JudgeReward:
    kw.setdefault("backoff", 0.01)
    kw.setdefault("cache", None if tmp_path is None else str(tmp_path / "cache.sqlite"))
    return JudgeReward(server.url, server.model, **kw)


def test_parse_verdict_by_hand():
    assert parse_verdict("YES") == 1.0 and parse_verdict("no.") == 0.0
    assert parse_verdict("Yes, well... actually NO") == 0.0  # the last verdict counts
    assert parse_verdict("noisy yesterday") is None  # words that contain yes/no are not verdicts
    assert parse_verdict("Score: 7", "score", 10) == 0.7 and parse_verdict("Score: 7/10", "score", 10) == 0.7
    assert parse_verdict("step 2 ... Rating: [[4]] of 5 facts", "score", 10) == 0.4
    assert parse_verdict("11 out of 10", "score", 10) is None and parse_verdict("nothing", "score") is None
    with pytest.raises(ValueError):
        parse_verdict("YES", "maybe")


def test_question_text_of_chat_prompts():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"}, {"role": "user", "content": "the q"}]
    assert question_text(msgs) == "the q" and question_text("plain") == "plain"


def test_scores_batches_concurrently_and_sends_the_template():
    with JudgeServer(mode="slow:1.0") as srv:
        j = judge(srv, concurrency=6)
        got = j(prompts=Q * 2, completions=GOOD + BAD, answer=REF * 2)
        assert got == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
        assert srv.max_in_flight >= 3, srv.max_in_flight  # the server held several requests at once
        bodies = [r["body"] for r in srv.chat_requests()]
        assert len(bodies) == 6
        assert all(b["model"] == "stub-judge" and b["temperature"] == 0.0 and b["max_tokens"] == 16 for b in bodies)
        texts = [b["messages"][-1]["content"] for b in bodies]
        assert sum(Q[0] in t and "Reference answer:\nParis" in t for t in texts) == 2


def test_concurrency_bounds_the_requests_in_flight():
    with JudgeServer(mode="slow:0.5") as srv:
        judge(srv, concurrency=2)(prompts=Q * 2, completions=GOOD * 2, answer=REF * 2)
        assert srv.max_in_flight == 2


def test_timeouts_are_none_and_counted_never_zero():
    with JudgeServer(mode="slow:2") as srv:
        j = judge(srv, timeout=0.2, retries=1)
        assert j(prompts=Q[:2], completions=GOOD[:2], answer=REF[:2]) == [None, None]
        s = j.stats.snapshot()
        assert s["judge_timeouts"] == 2 and s["timeouts"] == 2 and s["requests"] == 4  # one retry each


@pytest.mark.parametrize("mode,counted", [("fail", "judge_errors"), ("garbage", "judge_errors")])
def test_errors_and_unparseable_replies_are_none_and_counted(mode, counted):
    with JudgeServer(mode=mode) as srv:
        j = judge(srv, retries=2)
        assert j(prompts=Q, completions=GOOD, answer=REF) == [None, None, None]
        s = j.stats.snapshot()
        assert s[counted] == 3 and s["errors"] == 3
        # A 500 is retried (3 attempts each); a reply without a verdict is not asked again.
        assert s["requests"] == (9 if mode == "fail" else 3)
        assert j.last_error


def test_retries_with_backoff_recover_from_a_busy_server():
    with JudgeServer(mode="fail_first:2") as srv:
        j = judge(srv, retries=2, concurrency=1, backoff=0.05)
        t0 = time.perf_counter()
        assert j(prompts=Q[:1], completions=GOOD[:1], answer=REF[:1]) == [1.0]
        assert len(srv.chat_requests()) == 3 and time.perf_counter() - t0 >= 0.05 + 0.1  # waited 0.05 then 0.1


def test_cache_hits_cost_no_request_and_survive_a_new_object(tmp_path):
    with JudgeServer() as srv:
        a = judge(srv, tmp_path)
        assert a(prompts=Q, completions=GOOD, answer=REF) == [1.0] * 3
        assert len(srv.chat_requests()) == 3
        b = judge(srv, tmp_path)  # a resumed run: a new object, the same file
        assert b(prompts=Q, completions=GOOD, answer=REF) == [1.0] * 3
        assert len(srv.chat_requests()) == 3 and b.stats.snapshot()["cache_hits"] == 3
        # Another judge model or template is another key.
        c = judge(srv, tmp_path, template="Q: {question}\nRef: {reference}\nAns: {answer}\nYES or NO?")
        c(prompts=Q[:1], completions=GOOD[:1], answer=REF[:1])
        assert len(srv.chat_requests()) == 4
    # Failures are not cached: asked again next time.
    with JudgeServer(mode="fail") as srv2:
        d = JudgeReward(srv2.url, "stub-judge", cache=str(tmp_path / "c2.sqlite"), retries=0)
        d(prompts=Q[:1], completions=GOOD[:1], answer=REF[:1])
        d(prompts=Q[:1], completions=GOOD[:1], answer=REF[:1])
        assert len(srv2.chat_requests()) == 2


def test_the_key_is_sent_but_never_logged_stored_or_shown(tmp_path, monkeypatch, caplog):
    secret = "sk-test-5f1d2c9a"
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", secret)
    with JudgeServer(key=secret) as srv:
        j = judge(srv, tmp_path, api_key_env="JUDGE_KEY_FOR_TEST")
        j.check()
        with caplog.at_level("DEBUG"):
            assert j(prompts=Q, completions=GOOD, answer=REF) == [1.0] * 3
        assert all(r["headers"].get("Authorization") == f"Bearer {secret}" for r in srv.chat_requests())
        assert secret not in repr(j) and secret not in caplog.text
        assert secret.encode() not in (tmp_path / "cache.sqlite").read_bytes()
        monkeypatch.setenv("JUDGE_KEY_FOR_TEST", "wrong")
        with pytest.raises(UserError, match="refused the key") as e:
            j.check()
        assert "wrong" not in str(e.value)


def test_a_server_that_is_down_or_serves_another_model_is_one_line_at_start():
    with JudgeServer() as srv:
        url = srv.url
        with pytest.raises(UserError, match="serves stub-judge, not this model"):
            JudgeReward(url, "other-model").check()
    with pytest.raises(UserError, match="no server answers") as e:
        JudgeReward(url, "stub-judge").check()
    assert "\n" not in str(e.value)


def test_async_form_for_trl():
    from trl.trainer.utils import is_async_callable

    with JudgeServer() as srv:
        fn = judge(srv).as_async()
        assert is_async_callable(fn)
        got = asyncio.run(fn(prompts=Q, completions=BAD, answer=REF, completion_ids=None))
        assert got == [0.0] * 3
        # The sync form also works from inside a running event loop (a notebook).
        j = judge(srv)

        async def inside():
            return j(prompts=Q, completions=GOOD, answer=REF)

        assert asyncio.run(inside()) == [1.0] * 3


def test_config_keys_and_their_errors():
    cfg = load_config(None, ["reward.funcs=[math,judge]", "reward.judge.model=m", "reward.by_domain={math: [math], fin: [judge]}"])
    assert cfg.reward.by_domain == {"math": ["math"], "fin": ["judge"]} and cfg.reward.judge.model == "m"
    with pytest.raises(ConfigError, match="reward.judge.model"):
        load_config(None, ["reward.funcs=[judge]"])
    with pytest.raises(ConfigError, match="reward.by_domain.fin"):
        load_config(None, ["reward.funcs=[math]", "reward.by_domain={fin: [judge]}"])
    with pytest.raises(ConfigError, match="reward.funcs"):  # a function no domain routes to
        load_config(None, ["reward.funcs=[math,choice]", "reward.by_domain={math: [math]}"])
    with pytest.raises(ConfigError, match="reward.by_domain"):
        load_config(None, ["reward.by_domain=[math]"])


def _ex(i: int, domain: str, answer: str) -> Example:
    return Example(id=f"r{i}", prompt=f"question {i}", answer=answer, domain=domain)


def test_routing_scores_each_row_by_its_domain_only():
    with JudgeServer() as srv:
        s = RewardScorer(["math", "choice", "judge"], None, 5.0, judge=judge(srv),
                         by_domain={"math": ["math"], "mcq": ["choice"], "open": ["judge"]})
        rows = [_ex(0, "math", "4"), _ex(1, "mcq", "B"), _ex(2, "open", "Paris"), _ex(3, "open", "Paris"), _ex(4, "math", "4")]
        texts = [r"\boxed{4}", "The answer is (B)", "Paris", "London", r"\boxed{5}"]
        total, m = s([r.prompt for r in rows], texts, rows)
        assert total.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
        asked = [r["body"]["messages"][-1]["content"] for r in srv.chat_requests()]
        assert len(asked) == 2 and all("question 2" in a or "question 3" in a for a in asked)  # judge rows only
        assert m["rewards/math_reward/count"] == 2 and m["rewards/math_reward/sum"] == 1  # its own rows only
        assert m["rewards/judge/count"] == 2 and m["rewards/judge/sum"] == 1 and m["rewards/invalid"] == 0
        assert m["rewards/judge_requests"] == 2 and m["rewards/judge_errors"] == 0
        with pytest.raises(UserError, match="row r9 has domain 'news'"):
            s.check_domains([_ex(9, "news", "x")])


def test_judge_failures_leave_only_the_judge_rows_unscored():
    with JudgeServer(mode="fail") as srv:
        s = RewardScorer(["math", "judge"], None, 5.0, judge=judge(srv, retries=0), by_domain={"m": ["math"], "o": ["judge"]})
        rows = [_ex(0, "m", "4"), _ex(1, "o", "Paris")]
        total, m = s([r.prompt for r in rows], [r"\boxed{4}", "Paris"], rows)
        assert total[0].item() == 1.0 and torch.isnan(total[1])
        assert m["rewards/judge_errors"] == 1 and m["rewards/unscored"] == 1


def _mixed_data(path):
    rows = []
    for i in range(4):
        rows.append({"id": f"m{i}", "prompt": f"what is {i}+{i}?", "answer": str(2 * i), "solution": f"{i}+{i} is {2 * i}", "domain": "math"})
        rows.append({"id": f"c{i}", "prompt": f"pick one: (A) {i} (B) {i + 1}", "answer": "A", "solution": "The answer is (A)", "domain": "mcq"})
        rows.append({"id": f"f{i}", "prompt": f"which ledger holds asset {i}?", "answer": f"L{i}", "solution": f"It is L{i}.", "domain": "finance"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mixed_domain_training_run_scores_each_route_and_logs_per_domain(tmp_path, tiny_model_dir):
    from repo_rl.cli import main

    data = _mixed_data(tmp_path / "mixed.jsonl")
    with JudgeServer(mode="no") as srv:  # every open answer fails: RePO rephrases, verified by the judge too
        out = tmp_path / "run"
        over = tiny_overrides(tiny_model_dir, data, **{
            "reward.funcs": "[math,choice,judge]", "reward.by_domain": "{math: [math], mcq: [choice], finance: [judge]}",
            "reward.judge.base_url": srv.url, "reward.judge.model": srv.model, "reward.judge.cache": "null",
            "algorithm.method": "repo", "repo.rho": 1.0, "train.prompts_per_step": 6, "train.max_steps": 2,
            "train.save_every": 2, "eval.every": 0, "data.shuffle": "false"})
        assert main(["train", "-o", str(out), *over]) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        comps = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
        asked = srv.chat_requests()
    assert all(k in rows[-1] for k in ("reward/domain/math", "reward/domain/mcq", "reward/domain/finance", "rewards/judge_errors"))
    fin_prompts = {c["prompt"] for c in comps if c["prompt_id"].startswith("f")}
    finance_rollouts = sum(c["prompt_id"].startswith("f") for c in comps)
    questions = [r["body"]["messages"][-1]["content"] for r in asked]
    # The judge saw finance questions only: every rollout of them, plus the rephrases it verified.
    assert questions and all(any(p in q for p in fin_prompts) for q in questions)
    assert sum(r["rewards/judge_requests"] for r in rows) == len(asked) >= finance_rollouts
    assert all(c["reward"] in (0.0, None) for c in comps if c["prompt_id"].startswith("f") and c["origin"] == "on_policy")


class _Answerer:
    """An engine answering 'paris' to prompts that start with 'always', 'lyon' otherwise (the tiny
    tokenizer has lower-case letters only)."""

    def __init__(self, model, eos_token_ids, pad_token_id, batch_size=None, autocast_dtype=None):
        from .conftest import make_tokenizer

        self.tok, self.eos = make_tokenizer(), list(eos_token_ids)

    def generate(self, prompts, params, seeds, logprobs=False):
        texts = [self.tok.decode(ids, skip_special_tokens=True) for ids in prompts]
        return [self.tok("so paris" if t.startswith("always") else "so lyon", add_special_tokens=False)["input_ids"] + self.eos
                for t in texts]


def test_eval_scores_open_answers_with_the_judge(tiny_model_dir, tmp_path, monkeypatch):
    import repo_rl.engines.hf
    from repo_rl.cli import main

    monkeypatch.setitem(repo_rl.engines.GENERATORS, "answerer", _Answerer)
    rows = [{"problem": "always: capital of france?", "answer": "paris"}, {"problem": "never: capital of france?", "answer": "paris"}]
    data = tmp_path / "open.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.json"
    with JudgeServer() as srv:
        argv = ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--kind", "judge", "--n", "2", "--backend", "answerer",
                "--judge-url", srv.url, "--judge-model", srv.model, "--judge-cache", "", "--output", str(out), "--no-progress"]
        assert main(argv) == 0
        asked = [r["body"]["messages"][-1]["content"] for r in srv.chat_requests()]
    report = json.loads(out.read_text())
    r = report["benchmarks"]["open"]
    assert r["kind"] == "judge" and r["pass@1"] == pytest.approx(0.5) and r["verifier_errors"] == 0
    assert len(asked) == 4 and all("capital of france?" in q for q in asked)
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--kind", "judge"]) == 2  # no --judge-url
