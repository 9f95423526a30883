"""RePO as a TRL ``rollout_func``: real GRPOTrainer steps on a tiny Qwen2 (CPU, offline).

What is checked inside TRL itself (not only in our function): gated groups receive verified
rephrases, TRL scores them as verified, they reach ``compute_loss`` with a positive advantage
and a nonzero gradient, TRL's completion log carries them with ``origin``, the ``repo/*``
metrics sit beside TRL's own, a prompt without a solution is never rephrased, and with the
importance-sampling correction on, an injected sample's ratio is ~1 (not ~0).
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
import types

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from repo_rl.integrations import trl as repo_trl  # noqa: E402
from repo_rl.integrations.trl import make_repo_rollout_func, prompt_key  # noqa: E402

from .conftest import ROWS, make_tokenizer  # noqa: E402
from .helpers.rewards import contains_answer  # noqa: E402

NO_SOLUTION_PROMPT = next(r["prompt"] for r in ROWS if r["solution"] is None)
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}={% endif %}"


def _dataset(chat: bool = False):
    rows = []
    for r in ROWS:
        p = [{"role": "system", "content": "be brief"}, {"role": "user", "content": r["prompt"]}] if chat else r["prompt"]
        rows.append({"prompt": p, "answer": r["answer"], "solution": r["solution"]})
    return datasets.Dataset.from_list(rows)


def _trainer(model_dir, out, ds, rollout, reward=contains_answer, tokenizer=None, **cfg):
    torch.manual_seed(0)
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=12,
        num_generations=4,
        max_completion_length=8,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    base.update(cfg)
    return GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        reward_funcs=[reward],
        args=GRPOConfig(**base),
        train_dataset=ds,
        processing_class=tokenizer or make_tokenizer(),
        rollout_func=rollout,
    )


def _row_key(inputs, i):
    p = inputs["prompt_ids"][i][inputs["prompt_mask"][i].bool()].tolist()
    c = inputs["completion_ids"][i][inputs["completion_mask"][i].bool()].tolist()
    return tuple(p), tuple(c)


def _spy(trainer, calls):
    """Wrap trainer.compute_loss: record the loss batch, TRL's completion log, and the gradient
    of the loss restricted to the injected rows (other rows' advantages set to 0)."""
    original = trainer.compute_loss
    seen = []

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        last = calls[-1]
        injected = {(tuple(last["prompt_ids"][f]), tuple(last["completion_ids"][f])) for f in last.get("injected", [])}
        rows = [i for i in range(inputs["advantages"].shape[0]) if _row_key(inputs, i) in injected]
        rec = {
            "advantages": inputs["advantages"].detach().clone(),
            "injected_rows": rows,
            "is_ratio": inputs.get("importance_sampling_ratio"),
            "old_logps": inputs.get("old_per_token_logps"),
            "sampling_logps": inputs.get("sampling_per_token_logps"),
            "completion_mask": inputs["completion_mask"].clone(),
            "logs": {
                "completion": list(trainer._logs["completion"]),
                "advantages": list(trainer._logs["advantages"]),
                "origin": list(trainer._logs["extra"]["origin"]),
                "reward": list(trainer._logs["rewards"]["contains_answer"]) if "contains_answer" in trainer._logs["rewards"] else None,
            },
        }
        if rows:
            keep = torch.zeros_like(inputs["advantages"])
            keep[rows] = 1.0
            sub = dict(inputs, advantages=inputs["advantages"] * keep)
            loss = original(model, sub, num_items_in_batch=num_items_in_batch)
            params = [p for p in model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            rec["injected_grad_norm"] = float(sum(g.pow(2).sum() for g in grads if g is not None) ** 0.5)
        seen.append(rec)
        return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    trainer.compute_loss = compute_loss
    return seen


def _recording(rollout):
    calls = []

    def wrapped(prompts, trainer):
        out = rollout(prompts, trainer)
        calls.append(copy.deepcopy(rollout.last))
        return out

    return wrapped, calls


@pytest.fixture(scope="module")
def trl_run(tiny_model_dir, tmp_path_factory):
    ds = _dataset()
    rollout = make_repo_rollout_func(ds, num_attempts=8, verify=("reward",))  # the tiny model boxes nothing
    wrapped, calls = _recording(rollout)
    trainer = _trainer(tiny_model_dir, tmp_path_factory.mktemp("trl-run"), ds, wrapped)
    seen = _spy(trainer, calls)
    trainer.train()
    return types.SimpleNamespace(trainer=trainer, rollout=rollout, calls=calls, seen=seen)


def test_gated_groups_receive_verified_rephrases(trl_run):
    calls = trl_run.calls
    assert len(calls) == 3 and all(c["training"] for c in calls)
    total = 0
    for c in calls:
        G = c["num_generations"]
        injected = set(c["injected"])
        for n, gated in enumerate(c["gated"]):
            group = range(n * G, (n + 1) * G)
            got = [f for f in group if f in injected]
            assert [c["origin"][f] for f in got] == ["rephrased"] * len(got)
            if not gated:
                assert not got
                continue
            r = c["gated"][: n + 1].count(True) - 1  # row of this group among the gated ones
            assert len(got) == (1 if any(c["verified"][r]) else 0)  # num_replace=1
            for f in got:  # the injected completion is the rephrase that verified, under q's ids
                assert c["rewards"][n][f - n * G] >= 0.5
                assert c["prompt_ids"][f] == c["prompt_ids"][n * G]
        total += len(injected)
    assert total > 0, "no rephrase verified in this run: the test needs at least one injection"
    assert trl_run.rollout.stats["replaced"] == total


def test_injected_rows_reach_the_loss_with_advantage_and_gradient(trl_run):
    recs = [r for r in trl_run.seen if r["injected_rows"]]
    assert recs, "no injected row reached compute_loss"
    for r in recs:
        for i in r["injected_rows"]:
            assert r["advantages"][i] > 0.1
        assert r["injected_grad_norm"] > 0


def test_trl_logs_the_injected_completions(trl_run):
    for rec, call in zip(trl_run.seen, trl_run.calls):
        logs = rec["logs"]
        assert logs["origin"] == call["origin"]  # our tag, in TRL's completions log
        assert len(logs["completion"]) == len(call["origin"])
        for f, origin in enumerate(logs["origin"]):
            if origin == "rephrased":
                assert logs["reward"][f] == 1.0  # TRL's own scoring agrees with the verification
                assert logs["advantages"][f] > 0
    assert any("rephrased" in rec["logs"]["origin"] for rec in trl_run.seen)


def test_repo_metrics_in_trl_logs(trl_run):
    steps = [h for h in trl_run.trainer.state.log_history if "loss" in h]
    assert len(steps) == 3
    for h, c in zip(steps, trl_run.calls):
        assert "reward" in h and "entropy" in h  # TRL's own metrics, in the same record
        assert h["repo/gate_rate"] == pytest.approx(sum(c["gated"]) / len(c["gated"]))
        assert h["repo/replaced"] == len(c["injected"])
        assert "repo/rephrase_success_rate" in h and "repo/logp_gap" in h
    assert any(h["repo/replaced"] > 0 and h["repo/rephrase_success_rate"] > 0 for h in steps)


def test_prompt_without_solution_is_never_rephrased(trl_run):
    appeared = 0
    for c in trl_run.calls:
        G = c["num_generations"]
        for n, p in enumerate(c["prompts"]):
            if p == NO_SOLUTION_PROMPT:
                appeared += 1
                assert not c["eligible"][n] and not c["gated"][n]
                assert c["origin"][n * G : (n + 1) * G] == ["on_policy"] * G
        assert all(NO_SOLUTION_PROMPT not in rp for rp in c.get("rephrase_prompts", []))
    assert appeared > 0
    assert trl_run.rollout.stats["no_solution"] == appeared


def _origin_reward(prompts, completions, origin, **kwargs):
    """Deterministic: fails every on-policy rollout, passes every rephrase (origin reaches TRL's reward call)."""
    return [1.0 if o == "rephrased" else 0.0 for o in origin]


ENGINE_SHIFT = -0.125  # the stand-in engine's log-probs differ from the training model's by this much


class StandInVLLMGeneration:
    """Stands in for TRL's ``trainer.vllm_generation`` (same ``generate`` signature and return
    value, same sampling attributes): it samples with the training model through the HF engine
    and reports log-probs shifted by ``ENGINE_SHIFT``, as an engine whose numerics differ would."""

    def __init__(self, trainer, mode="colocate", tensor_parallel_size=1):
        self.trainer, self.mode, self.tensor_parallel_size = trainer, mode, tensor_parallel_size
        self.temperature, self.top_p, self.top_k = trainer.temperature, trainer.top_p, trainer.top_k
        self.max_completion_length = trainer.max_completion_length
        self.calls = []

    def sync_weights(self):
        pass

    def generate(self, prompts, images, num_generations, profiler=None):
        from repo_rl.engines import HFGenerator, SamplingParams

        assert images is None and num_generations == 1
        self.calls.append({"rows": len(prompts), "temperature": self.temperature, "max_tokens": self.max_completion_length})
        t = self.trainer
        gen = HFGenerator(t.model, t.eos_token_ids, t.processing_class.pad_token_id)
        params = SamplingParams(self.max_completion_length, self.temperature, self.top_p or 1.0, self.top_k or 0)
        ids, lps = gen.generate(prompts, params, list(range(len(prompts))), logprobs=True)
        self.calls[-1]["logprobs"] = [[x + ENGINE_SHIFT for x in seq] for seq in lps]
        return prompts, ids, [[[x] for x in seq] for seq in self.calls[-1]["logprobs"]], None


def test_importance_sampling_correction_keeps_injected_ratio_at_one(tiny_model_dir, tmp_path):
    ds = _dataset()
    rollout = make_repo_rollout_func(ds, rephrase_temperature=0.5, verify=("reward",))
    wrapped, calls = _recording(rollout)
    trainer = _trainer(tiny_model_dir, tmp_path, ds, wrapped, reward=_origin_reward, per_device_train_batch_size=8, max_steps=2)
    # TRL applies the sampling-vs-training importance correction only with vLLM: switch that path
    # on with a stand-in for TRL's engine, which the rollout function then generates with.
    trainer.use_vllm = True
    trainer.vllm_importance_sampling_correction = True
    trainer.vllm_generation = engine = StandInVLLMGeneration(trainer)
    trainer._last_loaded_step = -1
    seen = _spy(trainer, calls)
    trainer.train()
    # Rollouts and rephrases went through TRL's engine, each with its own sampling parameters,
    # and the engine's own settings are back afterwards.
    assert [c["rows"] for c in engine.calls[:1]] == [8] and len(engine.calls) == 2 * len(calls)
    assert {c["temperature"] for c in engine.calls} == {trainer.temperature, 0.5}
    assert engine.temperature == trainer.temperature and engine.max_completion_length == trainer.max_completion_length
    rollout_calls = [e for e in engine.calls if e["temperature"] == trainer.temperature]
    assert len(rollout_calls) == len(calls)
    n_injected = 0
    for c, e in zip(calls, rollout_calls):  # on-policy rows keep the engine's sampling log-probs
        for f, lp in enumerate(c["logprobs"]):
            if f in c["injected"]:  # under q from the training model: checked against TRL's old log-probs below
                n_injected += 1
            else:
                assert lp == e["logprobs"][f]
    assert n_injected > 0
    rows = 0
    for rec in seen:
        assert rec["is_ratio"] is not None and rec["sampling_logps"] is not None
        for i in rec["injected_rows"]:
            rows += 1
            m = rec["completion_mask"][i].bool()
            assert float(rec["is_ratio"][i].min()) == pytest.approx(1.0, abs=1e-3)
            assert torch.allclose(rec["sampling_logps"][i][m], rec["old_logps"][i][m], atol=1e-4)
            assert rec["advantages"][i] > 0
        if rec["injected_rows"]:
            assert rec["injected_grad_norm"] > 0
    assert rows > 0
    # Every row's returned log-probs are under q; the injected ones differ from those under P(q, k).
    c = calls[-1]
    f = c["injected"][0]
    under_p = rollout._logprobs(trainer, [c["rephrase_prompt_ids"][0]], [c["completion_ids"][f]])[0]
    assert c["logprobs"][f] != pytest.approx(under_p, abs=1e-6)


@pytest.fixture(scope="module")
def chat_trainer(tiny_model_dir, tmp_path_factory):
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    ds = _dataset(chat=True)
    rollout = make_repo_rollout_func(ds, reward_funcs=[_origin_reward], return_logprobs=True, num_attempts=2, verify=("reward",))
    trainer = _trainer(tiny_model_dir, tmp_path_factory.mktemp("trl-chat"), ds, rollout, reward=_origin_reward, tokenizer=tok)
    return types.SimpleNamespace(trainer=trainer, rollout=rollout, ds=ds, tok=tok)


def test_chat_prompts_rephrased_and_trained_under_q(chat_trainer, monkeypatch):
    trainer, rollout, ds = chat_trainer.trainer, chat_trainer.rollout, chat_trainer.ds
    trainer.model.train()
    prompts = [p for p in ds["prompt"][:3] for _ in range(4)]
    n_calls = []
    import repo_rl.engines.hf

    original_generate = repo_rl.engines.HFGenerator.generate

    def counting_generate(self, rows, params, seeds, logprobs=False):
        n_calls.append(len(rows))
        return original_generate(self, rows, params, seeds, logprobs=logprobs)

    monkeypatch.setattr(repo_rl.engines.HFGenerator, "generate", counting_generate)
    out = rollout(prompts, trainer)
    assert n_calls == [12, 3 * 2]  # rollouts, then all gated groups' rephrases in ONE call
    assert set(out) == {"prompt_ids", "completion_ids", "logprobs", "origin"}
    assert len(out["completion_ids"]) == len(out["logprobs"]) == len(out["origin"]) == 12
    assert out["origin"].count("rephrased") == 3
    q_ids = [list(x) for x in chat_trainer.tok.apply_chat_template(ds["prompt"][:3], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]]
    for f, origin in enumerate(out["origin"]):
        assert out["prompt_ids"][f] == q_ids[f // 4]  # injected rows keep the original prompt q
        assert len(out["logprobs"][f]) == len(out["completion_ids"][f])
    # P(q, k) keeps the system message and replaces the user turn with the template.
    rp = rollout.last["rephrase_prompts"][0]
    assert rp[0] == {"role": "system", "content": "be brief"} and "reference solution" in rp[-1]["content"]
    assert "two plus three is 5" in rp[-1]["content"]
    # The returned log-probs are log pi(o | q), as a direct forward computes them.
    f = rollout.last["injected"][0]
    direct = rollout._logprobs(trainer, [q_ids[f // 4]], [out["completion_ids"][f]])[0]
    assert out["logprobs"][f] == pytest.approx(direct, abs=1e-5)


def test_eval_batches_are_not_rephrased(chat_trainer):
    trainer, rollout, ds = chat_trainer.trainer, chat_trainer.rollout, chat_trainer.ds
    trainer.model.eval()
    try:
        out = rollout([p for p in ds["prompt"][:2] for _ in range(4)], trainer)
    finally:
        trainer.model.train()
    assert out["origin"] == ["on_policy"] * 8 and "gated" not in rollout.last


def test_bad_batches_raise(chat_trainer):
    trainer, rollout, ds = chat_trainer.trainer, chat_trainer.rollout, chat_trainer.ds
    trainer.model.train()
    with pytest.raises(ValueError, match="multiple of num_generations=4"):
        rollout([ds["prompt"][0]] * 3, trainer)
    with pytest.raises(ValueError, match="repeated num_generations=4 times in a row"):
        rollout([ds["prompt"][0]] * 2 + [ds["prompt"][1]] * 2, trainer)
    unknown = [{"role": "user", "content": "what is 9+9?"}]
    with pytest.raises(KeyError, match="not in the training dataset"):
        rollout([unknown] * 4, trainer)


def test_prompt_key_is_hashable_and_canonical():
    a = [{"role": "user", "content": "x"}]
    b = [{"content": "x", "role": "user"}]
    assert prompt_key(a) == prompt_key(b) != prompt_key("x")
    assert {prompt_key(a): 1}[prompt_key(b)] == 1


def test_a_cpu_vllm_engine_without_a_kv_cache_bound_is_named(chat_trainer, monkeypatch):
    import warnings

    t, rollout = chat_trainer.trainer, chat_trainer.rollout
    monkeypatch.setattr(t, "use_vllm", True, raising=False)
    monkeypatch.setattr(t, "vllm_generation", types.SimpleNamespace(mode="colocate"), raising=False)
    monkeypatch.setattr(rollout, "_checked_trainer", None)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    with pytest.warns(UserWarning, match="set VLLM_CPU_KVCACHE_SPACE"):
        rollout._check_trainer(t)
    monkeypatch.setattr(rollout, "_checked_trainer", None)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rollout._check_trainer(t)
    assert not [w for w in seen if "VLLM_CPU_KVCACHE_SPACE" in str(w.message)]


def test_factory_validates_arguments():
    with pytest.raises(ValueError, match="rho"):
        make_repo_rollout_func(None, rho=1.5)
    with pytest.raises(ValueError, match="strip_patterns"):
        make_repo_rollout_func(None, strip_patterns=["("])
    with pytest.raises(ValueError, match="rephrase_template"):
        make_repo_rollout_func(None, rephrase_template="{question} {oops}")
    with pytest.raises(ValueError, match="verify="):
        make_repo_rollout_func(None, verify=("steps",))  # no answer check
    with pytest.raises(ValueError, match="verify="):
        make_repo_rollout_func(None, verify=("strict", "judge"))


def test_wrong_trl_version_raises(monkeypatch):
    import trl

    monkeypatch.setattr(trl, "__version__", "1.15.0")
    monkeypatch.delenv(repo_trl.ALLOW_UNTESTED_ENV, raising=False)
    monkeypatch.delitem(sys.modules, "repo_rl.integrations.trl")
    with pytest.raises(ImportError, match=r"tested against trl==1\.16\.0, but trl==1\.15\.0"):
        importlib.import_module("repo_rl.integrations.trl")
    monkeypatch.setenv(repo_trl.ALLOW_UNTESTED_ENV, "1")
    mod = importlib.import_module("repo_rl.integrations.trl")
    assert mod.TESTED_TRL_VERSION == "1.16.0"


def test_rephrases_are_verified_as_repo_verify_says():
    """The adapter's verify: reward on the whole text, strict on the final boxed answer alone, and
    steps on the expert solution's working numbers (a stand-in trainer: a tokenizer and a reward)."""
    from types import SimpleNamespace

    from repo_rl.data import Example
    from repo_rl.integrations.trl import RepoRolloutFunc
    from repo_rl.models.tiny import make_char_tokenizer
    from repo_rl.rewards import numeric_reward

    tok = make_char_tokenizer()
    trainer = SimpleNamespace(processing_class=tok, state=None)
    texts = ["so 2 x 8 = 16, \\boxed{16}", "the answer is 16", "\\boxed{16}", "2 x 8 = 16 and 99 \\boxed{16}"]  # no '*' in the char set
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    ex = Example("how many in 2?", "16", "a:b = 1:8 => 2*8 = 16. \\boxed{16}", id="0")
    rows = [{"answer": "16"}] * 4

    def verdicts(verify):
        fn = make_repo_rollout_func(None, reward_funcs=[numeric_reward], verify=verify)
        assert isinstance(fn, RepoRolloutFunc)
        r = fn._score(trainer, ["q"] * 4, ids, rows, "rephrased")
        return fn._verify(trainer, ["q"] * 4, ids, rows, r, [ex] * 4)[1].tolist()

    assert verdicts(("reward",)) == [True, True, True, True]  # the whole text: the fallback passes 'the answer is 16'
    assert verdicts(("strict",)) == [True, False, True, True]
    assert verdicts(("strict", "steps")) == [True, False, False, False]  # no working; 99 from nowhere
