"""The KV-cached sampler: greedy equals ``model.generate``; sampling depends only on (seed, prompt)."""

from __future__ import annotations

import pytest
import torch

from repo_rl.engines.hf import HFGenerator, SamplingParams, _filter_logits, derive_seed

from .conftest import make_tokenizer


@pytest.fixture(scope="module")
def varied_model():
    """A random tiny model with a large init range, so greedy outputs vary between prompts."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = make_tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.6, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(3)
    model = Qwen2ForCausalLM(cfg).eval()
    return model, tok


PROMPTS = ["what is 2+3?", "hi", "a much longer prompt, with 123 digits", "z"]


def hf_greedy(model, tok, prompt: list[int], max_new_tokens: int) -> list[int]:
    """``model.generate(do_sample=False)`` on one unpadded prompt, cut after the first EOS."""
    ref = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
        max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )[0, len(prompt):].tolist()
    return ref[: ref.index(tok.eos_token_id) + 1] if tok.eos_token_id in ref else ref


def test_greedy_matches_generate_token_for_token(varied_model):
    model, tok = varied_model
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    gen = HFGenerator(model, [tok.eos_token_id], tok.pad_token_id)
    ours = gen.generate(ids, SamplingParams(24, temperature=0.0), seeds=[0, 1, 2, 3])
    distinct = {tuple(o) for o in ours}
    assert len(distinct) > 1, "test model too degenerate to compare"
    for p, o in zip(ids, ours):
        assert o == hf_greedy(model, tok, p, 24)


def test_greedy_batched_with_left_padding_matches_unbatched(varied_model):
    model, tok = varied_model
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    gen = HFGenerator(model, [tok.eos_token_id], tok.pad_token_id)
    batched = gen.generate(ids, SamplingParams(16, temperature=0.0), [0] * 4)
    single = [gen.generate([p], SamplingParams(16, temperature=0.0), [0])[0] for p in ids]
    assert batched == single


def test_sampling_depends_only_on_seed_and_prompt(varied_model):
    model, tok = varied_model
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    gen = HFGenerator(model, [tok.eos_token_id], tok.pad_token_id)
    params = SamplingParams(12, temperature=1.0)
    full = gen.generate(ids, params, seeds=[11, 12, 13, 14])
    alone = gen.generate([ids[2]], params, seeds=[13])
    assert alone[0] == full[2]
    other = gen.generate([ids[2]], params, seeds=[99])
    again = gen.generate([ids[2]], params, seeds=[99])
    assert other == again
    # Different seeds give different samples somewhere across a few tries.
    many = gen.generate([ids[0]] * 8, params, seeds=list(range(8)))
    assert len({tuple(m) for m in many}) > 1


def test_eos_stops_and_is_kept():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = make_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # make EOS overwhelmingly likely after any token
        model.lm_head.weight.zero_()
        model.lm_head.bias = None
        model.lm_head.weight[tok.eos_token_id] = 0
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight[tok.eos_token_id, :] = 5.0
    gen = HFGenerator(model, [tok.eos_token_id], tok.pad_token_id)
    out = gen.generate([tok("ab")["input_ids"]], SamplingParams(10, temperature=0.0), [0])[0]
    assert out[-1] == tok.eos_token_id and len(out) < 10


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    k2 = _filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(k2).tolist() == [[True, True, False, False]]
    # softmax([3,2,1,0]) = [0.644, 0.237, 0.087, 0.032]: top_p=0.7 keeps the first two.
    p = _filter_logits(logits, top_k=0, top_p=0.7)
    assert torch.isfinite(p).tolist() == [[True, True, False, False]]
    p1 = _filter_logits(logits, top_k=0, top_p=0.5)
    assert torch.isfinite(p1).tolist() == [[True, False, False, False]]


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    seen = {derive_seed(0, s, p, j) for s in range(5) for p in range(5) for j in range(5)}
    assert len(seen) == 125
    assert derive_seed(1, 2) != derive_seed(2, 1)


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_sampler_logprobs_equal_teacher_forced_logprobs(varied_model, temperature):
    """``generate_with_logprobs`` returns the same ids as ``generate`` and, per token,
    log softmax(logits / T)[token] at the sampling temperature (T = 1 when greedy), as a full
    forward computes it."""
    model, tok = varied_model
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    gen = HFGenerator(model, [tok.eos_token_id], tok.pad_token_id)
    params = SamplingParams(10, temperature=temperature)
    seeds = [5, 6, 7, 8]
    plain = gen.generate(ids, params, seeds)
    comps, lps = gen.generate_with_logprobs(ids, params, seeds)
    assert comps == plain
    for p, c, lp in zip(ids, comps, lps):
        assert len(lp) == len(c) > 0
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) + len(c) - 1]
        scale = temperature if temperature > 0 else 1.0
        ref = torch.log_softmax(logits.float() / scale, -1).gather(-1, torch.tensor(c).unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(torch.tensor(lp), ref, atol=1e-4), (lp, ref.tolist())


def test_preallocated_uniforms_keep_the_per_token_stream(varied_model):
    """Drawing a row's uniforms at once must equal one scalar draw per token from its generator:
    the sampled ids depend only on (seed, prompt), whatever the implementation draws them with."""
    model, tok = varied_model
    p = tok(PROMPTS[0])["input_ids"]
    gen = HFGenerator(model, [tok.eos_token_id], tok.pad_token_id)
    params = SamplingParams(12, temperature=1.0)
    out = gen.generate([p], params, [21])[0]
    # Re-sample by hand with the documented rule: inverse CDF, one torch.rand(()) per token.
    g = torch.Generator().manual_seed(21)
    ctx, ref = list(p), []
    eos = tok.eos_token_id
    for _ in range(12):
        with torch.no_grad():
            logits = model(torch.tensor([ctx])).logits[0, -1].float()
        cdf = torch.softmax(logits, -1).cumsum(-1)
        u = torch.rand((), generator=g) * cdf[-1]
        t = int(torch.searchsorted(cdf, u.unsqueeze(0), right=True).clamp(max=len(cdf) - 1))
        ref.append(t)
        ctx.append(t)
        if t == eos:
            break
    assert out == ref


def test_dropping_finished_rows_changes_no_sample(varied_model):
    """Rows that finish early leave the batch; every row's sample must still equal its sample
    generated alone and a run that never drops rows (ids and log-probs)."""
    model, tok = varied_model
    eos = tok.eos_token_id
    ids = [tok(p)["input_ids"] for p in PROMPTS] * 4
    seeds = list(range(100, 116))
    params = SamplingParams(40, temperature=1.5)
    # Make EOS likely enough that rows finish at different steps.
    with torch.no_grad():
        saved = model.lm_head.weight[eos].clone()
        model.lm_head.weight[eos] += 0.35 * model.lm_head.weight.std()
    try:
        gen = HFGenerator(model, [eos], tok.pad_token_id)
        full = HFGenerator(model, [eos], tok.pad_token_id, compact=False)
        out, lps = gen.generate_with_logprobs(ids, params, seeds)
        ref, ref_lps = full.generate_with_logprobs(ids, params, seeds)
        alone = [gen.generate([p], params, [s])[0] for p, s in zip(ids, seeds)]
    finally:
        with torch.no_grad():
            model.lm_head.weight[eos] = saved
    lengths = sorted(len(o) for o in out)
    assert lengths[3] < 40 and lengths[-1] == 40, lengths  # several rows finished early, some never did
    assert out == ref == alone
    for a, b in zip(lps, ref_lps):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


def test_bf16_greedy_matches_generate_and_sees_weight_updates(varied_model):
    """The sampler casts weights once per call (one autocast region). Greedy bf16 output must
    equal ``model.generate`` under bf16 autocast, and an in-place weight update between calls
    (a training step) must be seen by the next call: no cast copy outlives its call."""
    import copy

    model, tok = varied_model
    model = copy.deepcopy(model)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    gen = HFGenerator(model, [tok.eos_token_id], tok.pad_token_id, autocast_dtype=torch.bfloat16)
    params = SamplingParams(16, temperature=0.0)

    def reference(m):
        out = []
        for p in ids:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                r = m.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                               max_new_tokens=16, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
            out.append(r[: r.index(tok.eos_token_id) + 1] if tok.eos_token_id in r else r)
        return out

    def ours():  # one prompt per call: bf16 results depend on left padding, which generate lacks
        return [gen.generate([p], params, [0])[0] for p in ids]

    before = ours()
    assert before == reference(model)
    with torch.no_grad():  # an optimizer step, in place
        for w in model.parameters():
            w.mul_(-1.0) if w.dim() == 2 and w.shape[0] == len(tok) else None
    after = ours()
    assert after == reference(model)
    assert after != before


def test_bucketed_prefill_changes_no_sample(varied_model):
    """Short and long prompts in one call are prefilled in separate length buckets whose KV
    caches are padded and stacked; samples and log-probs must equal a single padded prefill
    and each row generated alone."""
    model, tok = varied_model
    short = [tok(p)["input_ids"] for p in ["hi", "z", "ok?"]]
    long_ = [tok("a much longer prompt, " * k)["input_ids"] for k in (3, 4)]
    ids = short + long_ + short
    assert len(HFGenerator._buckets([len(p) for p in ids])) >= 2
    seeds = list(range(40, 40 + len(ids)))
    for params in (SamplingParams(12, temperature=0.0), SamplingParams(12, temperature=1.0)):
        bucketed = HFGenerator(model, [tok.eos_token_id], tok.pad_token_id)
        padded = HFGenerator(model, [tok.eos_token_id], tok.pad_token_id, bucket_prefill=False)
        a, alp = bucketed.generate_with_logprobs(ids, params, seeds)
        b, blp = padded.generate_with_logprobs(ids, params, seeds)
        alone = [padded.generate([p], params, [s])[0] for p, s in zip(ids, seeds)]
        assert a == b == alone
        for x, y in zip(alp, blp):
            assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-5)


def test_length_buckets():
    # each bucket's longest prompt is at most 1.5x its shortest; indices keep their identity
    assert HFGenerator._buckets([10, 3, 4, 100, 11, 14]) == [[1, 2], [0, 4, 5], [3]]
    assert HFGenerator._buckets([5, 5, 7]) == [[0, 1, 2]]


def test_preallocated_kv_layer_equals_concatenation_and_grows():
    from repo_rl.engines.hf import _new_cache

    g = torch.Generator().manual_seed(0)
    cache = _new_cache(5)
    ref_k = ref_v = None
    for t in (3, 1, 1, 4, 1):  # fills the 5 slots, then must grow
        k, v = torch.randn(2, 3, t, 4, generator=g), torch.randn(2, 3, t, 4, generator=g)
        ref_k = k if ref_k is None else torch.cat([ref_k, k], -2)
        ref_v = v if ref_v is None else torch.cat([ref_v, v], -2)
        got_k, got_v = cache.update(k, v, 0)
        assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
    assert cache.get_seq_length() == 10
    cache.batch_select_indices(torch.tensor([1]))
    assert torch.equal(cache.layers[0].keys, ref_k[1:]) and cache.get_seq_length() == 10


def test_decode_padding_mask_path_changes_no_sample(varied_model):
    """Decode steps pass the 4D padding mask instead of letting transformers build a causal mask;
    tokens and log-probs must equal the 2D-mask path on left-padded prompts."""
    model, tok = varied_model
    ids = [tok(p)["input_ids"] for p in PROMPTS] * 2
    seeds = list(range(40, 48))
    fast = HFGenerator(model, [tok.eos_token_id], tok.pad_token_id)
    slow = HFGenerator(model, [tok.eos_token_id], tok.pad_token_id)
    assert fast._mask4d
    slow._mask4d = False
    for params in (SamplingParams(20, temperature=0.0), SamplingParams(20, temperature=1.3)):
        a, la = fast.generate_with_logprobs(ids, params, seeds)
        b, lb = slow.generate_with_logprobs(ids, params, seeds)
        assert a == b
        for x, y in zip(la, lb):
            assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-6)


def test_decode_padding_mask_only_for_full_attention_sdpa():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from repo_rl.engines.hf import _full_attention_sdpa

    def model(**kw):
        cfg = Qwen2Config(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, **kw)
        return Qwen2ForCausalLM(cfg)

    assert _full_attention_sdpa(model())
    assert not _full_attention_sdpa(model(use_sliding_window=True, sliding_window=8, max_window_layers=0))
    assert not _full_attention_sdpa(model(attn_implementation="eager"))


def _tiny_causal_lm(kind: str, tok):
    """A random tiny model of architecture ``kind`` (llama, qwen2, qwen3) with a large init range."""
    import transformers

    cls = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[kind]
    cfg = getattr(transformers, f"{cls}Config")(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        initializer_range=0.6, tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(5)
    return getattr(transformers, f"{cls}ForCausalLM")(cfg).eval()


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
def test_bucketed_decode_changes_no_sample(kind, monkeypatch):
    """Short and long prompts decode in one loop with one KV cache per length bucket; tokens and
    log-probs must equal one padded cache and each row generated alone, also when finished rows
    are dropped from the buckets mid-call."""
    tok = make_tokenizer()
    model = _tiny_causal_lm(kind, tok)
    short = [tok(p)["input_ids"] for p in ["hi", "z", "ok?", "what is 2+3?"]]
    long_ = [tok("a much longer prompt, " * k)["input_ids"] for k in (4, 5)]
    ids = short + long_ + short
    seeds = list(range(70, 70 + len(ids)))
    bucketed = HFGenerator(model, [tok.eos_token_id], tok.pad_token_id)
    padded = HFGenerator(model, [tok.eos_token_id], tok.pad_token_id)
    assert bucketed._bucketed_decode
    padded._bucketed_decode = False
    seen = []
    prefill = HFGenerator._prefill

    def spy(self, *a, **kw):
        out = prefill(self, *a, **kw)
        seen.append(out[2] is not None)
        return out

    monkeypatch.setattr(HFGenerator, "_prefill", spy)
    ended_early = False
    for params in (SamplingParams(40, temperature=0.0), SamplingParams(40, temperature=1.0)):
        seen.clear()
        a, alp = bucketed.generate_with_logprobs(ids, params, seeds)
        assert seen == [True], "the bucketed decode path did not run"
        b, blp = padded.generate_with_logprobs(ids, params, seeds)
        alone = [padded.generate([p], params, [s])[0] for p, s in zip(ids, seeds)]
        assert a == b == alone
        for x, y in zip(alp, blp):
            assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-5)
        ended_early |= any(len(o) < 40 for o in a)
    assert model.config._attn_implementation == "sdpa"
    assert ended_early, "no row finished early: row dropping inside buckets was not exercised"


def test_bucketed_decode_only_for_known_attention_layouts():
    from transformers import GPT2Config, GPT2LMHeadModel

    from repo_rl.engines.hf import _supports_bucketed_decode

    tok = make_tokenizer()
    assert _supports_bucketed_decode(_tiny_causal_lm("llama", tok))
    eager = _tiny_causal_lm("qwen2", tok)
    eager.config._attn_implementation = "eager"
    assert not _supports_bucketed_decode(eager)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=128)).eval()
    assert not _supports_bucketed_decode(gpt2)
    # Other architectures still bucket the prefill and decode from one padded cache.
    gen = HFGenerator(gpt2, [tok.eos_token_id], tok.pad_token_id)
    ids = [tok("hi")["input_ids"], tok("a much longer prompt, " * 3)["input_ids"]]
    out = gen.generate(ids, SamplingParams(6, temperature=0.0), [0, 1])
    assert out == [gen.generate([p], SamplingParams(6, temperature=0.0), [0])[0] for p in ids]


def test_select_rows_keeps_bucket_ranges_contiguous():
    from repo_rl.engines.hf import _new_cache

    caches = []
    for n in (3, 2, 2):
        c = _new_cache(4)
        c.update(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 1).contiguous(),
                 torch.zeros(n, 1, 2, 1), 0)
        caches.append(c)
    buckets = [(0, 3, 5, caches[0]), (3, 5, 9, caches[1]), (5, 7, 20, caches[2])]
    out = HFGenerator._select_rows(buckets, torch.tensor([0, 2, 5, 6]))
    assert [(s, e, Lb) for s, e, Lb, _ in out] == [(0, 2, 5), (2, 4, 20)]
    assert out[0][3].layers[0].keys[:, 0, 0, 0].tolist() == [0.0, 2.0]  # rows 0 and 2 of bucket 0


def test_attention_implementation_is_restored_after_an_error():
    from repo_rl.engines.hf import _attention_implementation

    model = _tiny_causal_lm("qwen2", make_tokenizer())
    with pytest.raises(RuntimeError):
        with _attention_implementation(model, "eager"):
            assert model.model.layers[0].self_attn.config._attn_implementation == "eager"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_matmul_decode_attention_equals_sdpa():
    """Grouped-query heads, left padding and a preallocated cache view, against transformers' SDPA."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from repo_rl.engines.hf import _matmul_decode_attention

    g = torch.Generator().manual_seed(1)
    n, H, kvh, D, S = 5, 6, 2, 16, 11
    q = torch.randn(n, H, 1, D, generator=g)
    k = torch.randn(n, kvh, S + 4, D, generator=g)[:, :, :S]
    v = torch.randn(n, kvh, S + 4, D, generator=g)[:, :, :S]
    mask = torch.ones(n, 1, 1, S, dtype=torch.bool)
    for i in range(n):
        mask[i, ..., : i + 1] = False
    module = SimpleNamespace(num_key_value_groups=H // kvh, is_causal=True)
    ref = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)[0]
    got = _matmul_decode_attention(q, k, v, mask, 0.3)
    assert got.shape == ref.shape == (n, 1, H, D)
    assert torch.allclose(got, ref, atol=1e-6)
    # a padded key must not leak into the output
    k2 = k.clone()
    k2[0, :, 0] = 1e4
    assert torch.allclose(_matmul_decode_attention(q, k2, v, mask, 0.3), got, atol=1e-6)


def test_matmul_attention_only_where_measured_faster():
    from repo_rl.engines.hf import _matmul_attention_pays

    assert _matmul_attention_pays(torch.zeros(16, 2, 100, 64))
    assert not _matmul_attention_pays(torch.zeros(8, 2, 100, 64))  # few rows
    assert not _matmul_attention_pays(torch.zeros(32, 2, 400, 64))  # long cache
    assert not _matmul_attention_pays(torch.zeros(32, 2, 100, 64, dtype=torch.bfloat16))


def test_large_sampled_batch_depends_only_on_seed_and_prompt(varied_model):
    """24 rows sample through the matmul attention; each row alone goes through SDPA.

    The two round differently; this model's large weights (init range 0.6) amplify that to
    ~1e-4 in log-probs, so tokens must match exactly and log-probs to 5e-4."""
    model, tok = varied_model
    ids = [tok(p)["input_ids"] for p in PROMPTS] * 6
    seeds = list(range(100, 124))
    gen = HFGenerator(model, [tok.eos_token_id], tok.pad_token_id)
    params = SamplingParams(20, temperature=1.0)
    batched, blp = gen.generate_with_logprobs(ids, params, seeds)
    alone = [gen.generate_with_logprobs([p], params, [s]) for p, s in zip(ids, seeds)]
    assert batched == [a[0][0] for a in alone]
    for x, (_, lp) in zip(blp, alone):
        assert torch.allclose(torch.tensor(x), torch.tensor(lp[0]), atol=5e-4)
    assert len({tuple(b) for b in batched}) > 4


def test_large_greedy_batch_matches_generate(varied_model):
    model, tok = varied_model
    ids = [tok(p)["input_ids"] for p in PROMPTS] * 5
    gen = HFGenerator(model, [tok.eos_token_id], tok.pad_token_id)
    ours = gen.generate(ids, SamplingParams(16, temperature=0.0), seeds=list(range(len(ids))))
    for p, o in zip(ids[:4], ours[:4]):
        assert o == hf_greedy(model, tok, p, 16)
    assert ours == ours[:4] * 5
