"""``repo-rl plan``: parameter counts against real models, the memory parts by hand, and the
one-line refusal of a config that cannot fit."""

from __future__ import annotations

import json

import pytest
import torch

from repo_rl.cli import main
from repo_rl.config import load_config
from repo_rl.run.plan import KNOWN_SHAPES, Launch, ModelShape, estimate, refusal

GiB = 1024**3


def _count(config: dict) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    c = AutoConfig.for_model(**config)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(c)
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("config", [
    # Qwen2 (q/k/v biases, untied head) and Llama (SmolLM2's shape, tied head), tiny
    {"model_type": "qwen2", "vocab_size": 97, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
     "num_key_value_heads": 2, "intermediate_size": 128, "tie_word_embeddings": False},
    {"model_type": "llama", "vocab_size": 101, "hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 6,
     "num_key_value_heads": 2, "intermediate_size": 256, "tie_word_embeddings": True},
    {"model_type": "qwen3", "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
     "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 64, "tie_word_embeddings": False},
])
def test_parameter_count_equals_the_model(config):
    shape = ModelShape.from_config(config)
    extra = 2 * config["num_hidden_layers"] * config.get("head_dim", 0) if config["model_type"] == "qwen3" else 0  # q/k norms
    assert shape.params + extra == _count(config)


def test_known_shapes_give_the_published_sizes():
    assert round(ModelShape.from_config(KNOWN_SHAPES["Qwen/Qwen3-8B"]).params / 1e9, 2) == 8.19
    assert round(ModelShape.from_config(KNOWN_SHAPES["Qwen/Qwen2.5-Math-7B"]).params / 1e9, 2) == 7.62


def test_lora_counts_the_adapters_peft_adds(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from repo_rl.config import LoraSettings
    from repo_rl.models.loading import apply_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    shape = ModelShape.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    peft = apply_lora(model, LoraSettings(r=4))
    trained = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert shape.lora_params(4) == trained


def _cfg(*over):
    return load_config(None, ["model.name_or_path=Qwen/Qwen3-8B", "train.bf16=true", "model.dtype=bfloat16",
                              "train.prompts_per_step=64", "train.micro_batch_size=4", "algorithm.max_completion_length=4096",
                              *over])


def test_the_parts_by_hand():
    shape = ModelShape.from_config(KNOWN_SHAPES["Qwen/Qwen3-8B"])
    P = shape.params
    ddp = estimate(_cfg(), shape, Launch(8, "ddp", "cuda", 80), prompt_tokens=512)["memory_gb"]
    assert ddp["parameters"] == pytest.approx(P * 2 / GiB) and ddp["gradients"] == pytest.approx(P * 2 / GiB)
    assert ddp["optimizer (AdamW)"] == pytest.approx(P * 8 / GiB)
    z2 = estimate(_cfg(), shape, Launch(8, "zero2", "cuda", 80), 512)["memory_gb"]
    assert z2["parameters"] == ddp["parameters"] and z2["optimizer (AdamW)"] == pytest.approx(ddp["optimizer (AdamW)"] / 8)
    z3 = estimate(_cfg(), shape, Launch(8, "zero3", "cuda", 80), 512)["memory_gb"]
    assert z3["parameters"] == pytest.approx(ddp["parameters"] / 8)
    ref = estimate(_cfg("algorithm.beta=0.01"), shape, Launch(8, "zero3", "cuda", 80), 512)["memory_gb"]
    assert ref["reference model"] == pytest.approx(z3["parameters"])
    lora = estimate(_cfg("algorithm.beta=0.01", "model.lora.r=16"), shape, Launch(1, "ddp", "cuda", 80), 512)
    assert lora["memory_gb"]["reference model"] == 0  # the adapter-free base is the reference
    assert lora["trainable"] == shape.lora_params(16) < P / 50
    chunked = estimate(_cfg("train.logprob_chunk_size=512"), shape, Launch(8, "zero3", "cuda", 80), 512)["memory_gb"]
    assert chunked["logits"] == pytest.approx(z3["logits"] * 512 / 4096)
    ckpt = estimate(_cfg("train.gradient_checkpointing=true"), shape, Launch(8, "zero3", "cuda", 80), 512)["memory_gb"]
    assert ckpt["activations"] < z3["activations"] / 5


def test_a_config_that_cannot_fit_is_refused_with_its_lever(capsys):
    rc = main(["plan", "model.name_or_path=Qwen/Qwen3-8B", "train.bf16=true", "model.dtype=bfloat16", "data.train_files=x.jsonl",
               "train.prompts_per_step=8", "train.micro_batch_size=1", "train.gradient_checkpointing=true",
               "--processes", "8", "--sharding", "ddp", "--device", "cuda", "--device-memory-gb", "80"])
    out, err = capsys.readouterr()
    assert rc == 2 and "| optimizer (AdamW) | 61.03 |" in out
    line = err.strip().splitlines()[-1]
    assert line.startswith("repo-rl: error: does not fit: about ") and "the largest part is optimizer (AdamW)" in line
    assert "--sharding zero2, zero3 or fsdp" in line and "model.lora.r=16" in line
    assert refusal({"total_gb": 10.0, "memory_gb": {"activations": 6.0, "logits": 4.0}}, 12.0) is None


def test_plan_of_the_toy_world_fits_this_machine(capsys):
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "plan: toyworld" in out and "| **total** |" in out and "rollout tokens per step" in out


def test_cpu_processes_share_the_machine_memory(capsys):
    from repo_rl.run.plan import device_memory_gb

    assert main(["plan", "--device", "cpu", "--processes", "2"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| device memory")]
    assert row and float(row[0].split("|")[2]) == pytest.approx(device_memory_gb("cpu") / 2, abs=0.06)


def test_an_unknown_hub_model_offline_is_one_line(capsys):
    rc = main(["plan", "model.name_or_path=nobody/no-such-model-xyz", "data.train_files=x.jsonl"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and line.startswith("repo-rl: error: model.name_or_path=nobody/no-such-model-xyz: cannot read its config.json")


@pytest.mark.parametrize("flags,said", [(["--processes", "0"], "--processes 0: expected an integer >= 1"),
                                        (["--device-memory-gb", "0"], "--device-memory-gb 0.0: expected a number > 0")])
def test_bad_launch_flags_are_one_line(flags, said, capsys):
    assert main(["plan", *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"repo-rl: error: {said}"
