"""``repo-rl plan``: the memory and tokens of a run per rank, before the run, from its config alone.

For the config and a launch (processes, sharding) it estimates, per rank:

* parameters, gradients and AdamW state (sharded by FSDP or ZeRO as the launch says; LoRA trains
  only its adapters, and the reference model is then the adapter-free base, no second copy);
* a reference copy of the weights (``algorithm.beta > 0``, or SDFT's initial teacher);
* activations at ``train.micro_batch_size`` (all layers' saved tensors, or, with
  ``train.gradient_checkpointing``, each layer's input plus one layer's tensors), and the
  log-prob pass's logits (``train.logprob_chunk_size`` bounds them);
* the KV cache the generation engine gets (vLLM: its share of the device or
  ``generation.vllm_kv_cache_gb``; the HF sampler: the step's rollouts and rephrases at full length);
* the process's own overhead (runtime, libraries), measured on CPU (:data:`CPU_OVERHEAD_GB`);
* rollout and rephrase tokens per step (rephrases counted as if every group were gated).

A config that cannot fit the device is refused in one line naming its largest part and the
setting that shrinks it. The estimate is checked against measured peaks on CPU in
docs/SCALING.md (``benchmarks/plan_check.py``).

The model's shape comes from its ``config.json`` (a local directory, a built-in name, a cached hub
model) or, offline, from :data:`KNOWN_SHAPES` for the paper's models. No weights are loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError

GiB = 1024**3
CPU_OVERHEAD_GB = 0.6
"""Resident memory of a training process before its model: Python, torch, transformers, the
tokenizer and the data (measured on CPU; see docs/SCALING.md)."""
GPU_OVERHEAD_GB = 1.0
"""CUDA context and allocator slack on a GPU (a rule of thumb, not measured here)."""


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> "ModelShape":
        try:
            heads = int(c["num_attention_heads"])
            hidden = int(c["hidden_size"])
            return cls(
                vocab=int(c["vocab_size"]), hidden=hidden, layers=int(c["num_hidden_layers"]), heads=heads,
                kv_heads=int(c.get("num_key_value_heads") or heads), head_dim=int(c.get("head_dim") or hidden // heads),
                intermediate=int(c["intermediate_size"]), tied=bool(c.get("tie_word_embeddings", False)),
                qkv_bias=c.get("model_type") == "qwen2" or bool(c.get("attention_bias", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"model config: cannot read the model's shape ({type(e).__name__}: {e}); "
                            "repo-rl plan knows decoder-only models with a Llama/Qwen-style config.json") from None

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def params(self) -> int:
        """Parameter count (embedding, decoder layers with their norms, final norm, output head)."""
        per_layer = sum(a * b for a, b in self.linear_shapes()) + 2 * self.hidden
        if self.qkv_bias:
            per_layer += self.heads * self.head_dim + 2 * self.kv_heads * self.head_dim
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * per_layer + self.hidden

    def lora_params(self, r: int) -> int:
        """Adapter parameters of LoRA rank ``r`` on every linear layer (``all-linear``)."""
        return self.layers * sum(r * (a + b) for a, b in self.linear_shapes())


KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    # From the models' published config.json, for planning the paper's recipes without a download.
    "Qwen/Qwen3-8B": {"vocab_size": 151936, "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
                      "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288, "tie_word_embeddings": False,
                      "model_type": "qwen3"},
    "Qwen/Qwen3-4B": {"vocab_size": 151936, "hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32,
                      "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 9728, "tie_word_embeddings": True,
                      "model_type": "qwen3"},
    "Qwen/Qwen2.5-Math-7B": {"vocab_size": 152064, "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                             "num_key_value_heads": 4, "intermediate_size": 18944, "tie_word_embeddings": False,
                             "model_type": "qwen2"},
}


def model_shape(cfg: Any) -> ModelShape:
    """The shape of ``model.name_or_path`` from its config.json (never its weights)."""
    name = cfg.model.name_or_path
    if name in KNOWN_SHAPES:
        return ModelShape.from_config(KNOWN_SHAPES[name])
    from ..models.loading import resolve_model_path

    path = Path(resolve_model_path(name, cfg.toyworld)).expanduser()
    if (path / "config.json").is_file():
        return ModelShape.from_config(json.loads((path / "config.json").read_text()))
    try:
        from transformers import AutoConfig

        return ModelShape.from_config(AutoConfig.from_pretrained(name, revision=cfg.model.revision).to_dict())
    except Exception as e:  # noqa: BLE001 - offline, unknown id, remote code ...
        raise UserError(f"model.name_or_path={name}: cannot read its config.json here ({type(e).__name__}); give a local "
                        f"model directory, or one of {', '.join(KNOWN_SHAPES)}") from None


@dataclass
class Launch:
    processes: int = 1
    sharding: str = "ddp"
    """``ddp`` (no sharding), ``fsdp`` (parameters, gradients and optimizer sharded), ``zero2``
    (gradients and optimizer) or ``zero3`` (all three)."""
    device: str = "cpu"
    device_memory_gb: Optional[float] = None


def _bytes_of(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16") else 4


def estimate(cfg: Any, shape: ModelShape, launch: Launch, prompt_tokens: int) -> dict[str, Any]:
    """Per-rank memory (GiB) and tokens of one step; pure arithmetic (see the module docstring)."""
    from ..algorithms import METHODS
    from .health import resolve_bf16

    W = max(1, launch.processes)
    sh = launch.sharding
    a, t, r, g = cfg.algorithm, cfg.train, cfg.repo, cfg.generation
    method = METHODS[a.method]
    phases = [METHODS[p] for p in method.phases] if method.phases else [method]
    P = shape.params
    wbytes = 4 if cfg.model.dtype in ("float32", "auto") else _bytes_of(cfg.model.dtype)
    lora = cfg.model.lora.r > 0
    T = shape.lora_params(cfg.model.lora.r) if lora else P
    shard_w = W if sh in ("fsdp", "zero3") else 1
    shard_g = W if sh in ("fsdp", "zero2", "zero3") else 1
    bf16, _ = resolve_bf16(t.bf16, launch.device)
    abytes = 2 if bf16 else 4
    mem: dict[str, float] = {}
    mem["parameters"] = P * wbytes / shard_w
    if lora:
        mem["parameters"] += T * 4
    mem["gradients"] = T * (4 if lora else wbytes) / shard_g
    mem["optimizer (AdamW)"] = 2 * T * 4 / shard_g
    need_ref = (a.beta > 0 or any(p.teacher for p in phases) and cfg.baselines.sdft_teacher == "initial") and not lora
    mem["reference model"] = P * wbytes / shard_w if need_ref else 0.0
    seq = prompt_tokens + a.max_completion_length
    tokens_mb = t.micro_batch_size * seq
    h, i, L = shape.hidden, shape.intermediate, shape.layers
    per_layer_token = (8 * h + 4 * i) * abytes  # tensors a decoder layer keeps for its backward pass
    attn_scores = shape.heads * seq * seq * abytes * t.micro_batch_size if launch.device == "cpu" else 0
    if t.gradient_checkpointing:
        acts = L * tokens_mb * h * abytes + tokens_mb * per_layer_token + attn_scores
    else:
        acts = L * (tokens_mb * per_layer_token + attn_scores)
    mem["activations"] = acts
    positions = min(t.logprob_chunk_size, a.max_completion_length) if t.logprob_chunk_size else a.max_completion_length
    teacher_logits = 2 if any(p.teacher for p in phases) and cfg.baselines.sdft_mode == "full_logits" else 1
    mem["logits"] = t.micro_batch_size * positions * shape.vocab * 4 * 3 * teacher_logits  # logits, log-softmax, its grad
    rephrases = any(p.rephrases for p in phases)
    prompts_rank = t.prompts_per_step // W
    rollout_rows = prompts_rank * a.num_generations
    rephrase_new = r.max_new_tokens or a.max_completion_length
    rephrase_rows = prompts_rank * r.num_attempts if rephrases else 0
    kv_per_token = 2 * L * shape.kv_heads * shape.head_dim * (2 if bf16 else 4)
    if g.backend == "vllm":
        if launch.device == "cuda" and launch.device_memory_gb:
            mem["KV cache (vLLM)"] = g.vllm_gpu_memory_utilization * launch.device_memory_gb * GiB
            mem["KV cache (vLLM)"] -= min(mem["KV cache (vLLM)"], P * 2)  # vLLM's share includes its weights
            mem["engine weights (vLLM)"] = P * 2
        else:
            engine_weights = P * (2 if bf16 else 4)
            mem["KV cache (vLLM)"] = g.vllm_kv_cache_gb * GiB
            mem["engine weights (vLLM)"] = engine_weights
            # Each sync writes the weights to a file the engines read back: in /dev/shm, so in RAM;
            # one file per machine, and a CPU launch is one machine, so each rank's share of it.
            if not g.vllm_in_process:  # in process, the weights are handed over in memory
                mem["weights file for the engine sync"] = engine_weights / W
        if sh in ("fsdp", "zero3"):
            # The sync gathers the whole model on every rank (after the update, so the sum is on the safe side).
            mem["weights gathered for the engine sync"] = P * wbytes * (1 - 1 / W)
    else:
        rephrase_prompt = prompt_tokens + (r.fewshot + 1) * 64 + 2 * (r.fewshot * rephrase_new)  # template, solution, shots
        mem["KV cache (HF sampler)"] = kv_per_token * (rollout_rows * seq + rephrase_rows * (rephrase_prompt + rephrase_new))
    overhead = (GPU_OVERHEAD_GB if launch.device == "cuda" else CPU_OVERHEAD_GB) * GiB
    mem["runtime overhead"] = overhead
    total = sum(mem.values())
    return {
        "memory_gb": {k: v / GiB for k, v in mem.items()},
        "total_gb": total / GiB,
        "params": P,
        "trainable": T,
        "tokens": {"rollout tokens per step (this rank)": rollout_rows * a.max_completion_length,
                   "rephrase tokens per step, at most (this rank)": rephrase_rows * rephrase_new,
                   "tokens per micro-batch": tokens_mb},
        "bf16": bf16,
        "prompt_tokens": prompt_tokens,
    }


LEVERS = {
    "parameters": "shard them (--sharding fsdp or zero3) or keep them in bf16 (model.dtype=bfloat16)",
    "gradients": "shard them (--sharding zero2, zero3 or fsdp) or train LoRA (model.lora.r=16)",
    "optimizer (AdamW)": "shard it (--sharding zero2, zero3 or fsdp) or train LoRA (model.lora.r=16)",
    "reference model": "train LoRA (model.lora.r=16: the reference is the adapter-free base) or set algorithm.beta=0",
    "activations": "lower train.micro_batch_size or turn on train.gradient_checkpointing",
    "logits": "set train.logprob_chunk_size (e.g. 1024) or lower train.micro_batch_size",
    "KV cache (vLLM)": "lower generation.vllm_gpu_memory_utilization (GPU) or generation.vllm_kv_cache_gb (CPU)",
    "engine weights (vLLM)": "shard the training side harder: the engine keeps a full bf16 copy",
    "weights gathered for the engine sync": "train LoRA (model.lora.r=16): the sync gathers the whole model on every rank",
    "weights file for the engine sync": "use a machine with more memory: the sync writes the whole model to /dev/shm",
    "KV cache (HF sampler)": "use generation.backend=vllm, or lower train.prompts_per_step or algorithm.max_completion_length",
    "runtime overhead": "use a machine with more memory",
}


def refusal(est: dict[str, Any], available_gb: float) -> Optional[str]:
    """One line when the estimate does not fit ``available_gb``: the largest part and its lever."""
    if est["total_gb"] <= available_gb:
        return None
    part, gb = max(est["memory_gb"].items(), key=lambda kv: kv[1])
    return (f"does not fit: about {est['total_gb']:.1f} GiB per rank against {available_gb:.1f} GiB; the largest part is "
            f"{part} ({gb:.1f} GiB): {LEVERS[part]}")


def device_memory_gb(device: str) -> Optional[float]:
    """Memory of one device: the first GPU's, or this machine's RAM for the CPU."""
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / GiB
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    except (ValueError, OSError, AttributeError):
        return None


def prompt_length(cfg: Any, out: Path) -> int:
    """The longest training prompt in tokens (the first 2000 rows), or ``data.max_prompt_length``."""
    if cfg.data.max_prompt_length:
        return int(cfg.data.max_prompt_length)
    from ..data import load_examples
    from ..models.loading import resolve_model_path
    from ..step.prompts import PromptRenderer
    from .distributed import Dist
    from .preflight import resolve_data

    try:
        rows = load_examples(resolve_data(cfg.data.train_files, cfg, out, Dist()), cfg.data.fields, cfg.data.on_bad_row,
                             cfg.data.split)[:2000]
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.name_or_path, cfg.toyworld))
    except Exception:  # noqa: BLE001 - no data or tokenizer here (a hub model offline): the default guess
        return 512
    renderer = PromptRenderer(tok, cfg.model.chat_template, cfg.model.system_prompt)
    return max((len(renderer.ids(e.prompt)) for e in rows), default=512)


def format_plan(cfg: Any, est: dict[str, Any], launch: Launch, available_gb: Optional[float]) -> str:
    lines = [f"plan: {cfg.model.name_or_path} ({est['params'] / 1e6:,.1f}M parameters, {est['trainable'] / 1e6:,.1f}M trained), "
             f"{launch.processes} process(es), sharding {launch.sharding}, {launch.device}, "
             f"{'bf16 autocast' if est['bf16'] else 'float32'}; longest prompt {est['prompt_tokens']} tokens",
             "", "| per rank | GiB |", "|---|---|"]
    for k, v in est["memory_gb"].items():
        lines.append(f"| {k} | {v:.2f} |")
    lines.append(f"| **total** | **{est['total_gb']:.2f}** |")
    if available_gb is not None:
        lines.append(f"| device memory | {available_gb:.1f} |")
    lines += ["", "| per step | tokens |", "|---|---|"]
    for k, v in est["tokens"].items():
        lines.append(f"| {k} | {v:,} |")
    return "\n".join(lines) + "\n"


__all__ = ["KNOWN_SHAPES", "LEVERS", "Launch", "ModelShape", "device_memory_gb", "estimate", "format_plan", "model_shape",
           "prompt_length", "refusal"]
