"""repo_rl.models.tiny: the offline character tokenizer and tiny random Qwen2 used by tests, benchmarks and examples."""

from __future__ import annotations

import torch

from repo_rl.models.tiny import CHARS, make_char_tokenizer, make_tiny_qwen2, save_tiny_model_dir


def test_tokenizer_round_trips_and_has_pad_and_eos():
    tok = make_char_tokenizer()
    text = "what is 2+3? two plus three is 5."
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one id per character, no BOS/EOS added
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == 3 + len(CHARS)


def test_eos_last_tokenizer_puts_eos_outside_a_smaller_model():
    tok = make_char_tokenizer(eos_last=True, model_max_length=4096)
    assert tok.pad_token_id == 0 and tok.eos_token_id == len(tok) - 1
    assert tok.model_max_length == 4096
    model = make_tiny_qwen2(tok, hidden_size=16, num_layers=1, vocab_size=len(tok) - 1)
    assert model.get_output_embeddings().weight.shape[0] == tok.eos_token_id


def test_parameter_count_matches_the_config():
    tok = make_char_tokenizer()
    V, h, i, heads, kv = len(tok), 16, 32, 2, 1
    model = make_tiny_qwen2(tok, hidden_size=h, intermediate_size=i, num_layers=1, num_heads=heads, num_kv_heads=kv)
    d_kv = kv * (h // heads)
    attn = (h * h + h) + 2 * (h * d_kv + d_kv) + h * h  # q, k, v with bias; o without
    mlp = 3 * h * i  # gate, up, down
    layer = attn + mlp + 2 * h  # two RMSNorms
    expected = V * h + layer + h  # tied embeddings counted once, final norm
    assert expected == 57 * 16 + 2368 + 16 == 3296
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.config.tie_word_embeddings and model.config.bos_token_id is None
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_same_seed_same_weights(tmp_path):
    tok = make_char_tokenizer()
    a = make_tiny_qwen2(tok, hidden_size=16, num_layers=1, seed=3).state_dict()
    b = save_tiny_model_dir(tmp_path, tok, hidden_size=16, num_layers=1, seed=3).state_dict()
    c = make_tiny_qwen2(tok, hidden_size=16, num_layers=1, seed=4).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "tokenizer.json").is_file()
