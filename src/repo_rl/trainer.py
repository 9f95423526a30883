"""The training loop. It owns order, not math: every formula lives in :mod:`repo_rl.algorithms`.

One step::

    prompts -> rollouts (G per prompt) -> rewards
      -> compose groups (method): gate -> rephrase with the current policy -> verify -> replace
      -> log-probs under the ORIGINAL prompt -> advantages -> loss -> optimizer step
      -> metrics / completions log / checkpoint
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from . import algorithms as alg
from .checkpoint import clean_partial, latest_checkpoint, load_model_weights, load_training_state, save_checkpoint
from .config import Config
from .distributed import Dist, deepspeed_engine, deepspeed_full_weights, full_parameters, full_state_dicts, fully_shard_model
from .data import DataError, Example, LoadReport, PromptSampler, load_examples
from .errors import TrainingError, UserError
from .evaluate import pass_at_k
from .logprobs import check_chunkable, completion_logprobs
from .malloc import set_mmap_threshold
from .modeling import apply_lora, eos_token_ids, load_model_and_tokenizer
from .prompts import PromptRenderer, strip_meta
from .rewards.scorer import RewardScorer
from .rollout import BATCHING_TRIALS, HFGenerator, SamplingParams, choose_batching, derive_seed
from .tracking import JsonlWriter, Trackers, check_writable, truncate_jsonl

# Seed streams, so rollouts, rephrases and eval samples never share random numbers.
STREAM_ROLLOUT, STREAM_REPHRASE, STREAM_EVAL, STREAM_STEP = 1, 2, 3, 4


@dataclass
class Sequence_:
    """One training sequence: prompt ids of the ORIGINAL prompt q and completion ids."""

    prompt_ids: list[int]
    completion_ids: list[int]
    truncated: bool
    kind: int = alg.KIND_POLICY
    """Loss applied to the sequence (``algorithms.losses.KIND_*``)."""


@dataclass
class StepBatch:
    """Everything one step produced before the update."""

    examples: list[Example]
    dataset_index: list[int]
    sequences: list[Sequence_] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    rewards: torch.Tensor = None  # type: ignore[assignment]  # [N*G] after composition
    origins: torch.Tensor = None  # type: ignore[assignment]  # [N*G]
    dropped: torch.Tensor = None  # type: ignore[assignment]  # [N*G] rows left out of the loss
    metrics: dict[str, float] = field(default_factory=dict)
    rephrase_pool: Optional[dict[int, list[tuple[list[int], list[int], list[float]]]]] = None
    """Rephrases sampled with the rollouts: prompt position -> ``num_attempts`` (prompt ids, ids, token log-probs)."""
    gap_under_p: dict[int, float] = field(default_factory=dict)
    """Injected rephrase rows (flat position) -> log pi(o_rep | P(q, k)), for ``repo/logp_gap``."""
    batching: str = "separate"
    """Where this step's rephrases were sampled (``repo.rephrase_batching``)."""
    logp_sums: dict[int, float] = field(default_factory=dict)
    """Flat position -> log pi(o | q) before the update, filled by the update for ``gap_under_p`` rows."""


class Trainer:
    """GRPO-family trainer with RePO group composition. See the module docstring."""

    def __init__(self, cfg: Config, output_dir: str | Path, resume: bool = False, progress: Optional[bool] = None) -> None:
        self.cfg = cfg
        self.out = Path(output_dir)
        self.resume = resume
        self.show_progress = cfg.logging.progress if progress is None else progress
        self.method = alg.METHODS[cfg.algorithm.method]
        self._setup()

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg = self.cfg
        ckroot = self.out / "checkpoints"
        self.dist = Dist()
        if cfg.train.prompts_per_step % self.dist.world:
            raise UserError(
                f"train.prompts_per_step={cfg.train.prompts_per_step}: expected a multiple of the {self.dist.world} processes "
                "(each process takes whole groups)"
            )
        if self.dist.is_main:
            check_writable(self.out)
        self.dist.barrier()
        if not self.resume and latest_checkpoint(ckroot) is not None:
            raise UserError(f"--output-dir {self.out}: already holds a run with checkpoints; pass --resume to continue it or choose another directory")
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        set_mmap_threshold(cfg.train.mmap_threshold_kb)
        torch.manual_seed(cfg.train.seed)
        dev = cfg.train.device
        self.device = torch.device("cuda" if dev == "auto" and torch.cuda.is_available() else ("cpu" if dev == "auto" else dev))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"train.device={dev}: CUDA is not available here (torch {torch.__version__}); use train.device=cpu or auto")
        if self.dist.device is not None and self.device.type == "cuda":
            self.device = self.dist.device  # one GPU per process

        # Data first: a bad row should fail before a model is loaded.
        self.load_reports: list[LoadReport] = []
        train_src = self._resolve_data(cfg.data.train_files)
        try:
            self.train_examples = load_examples(train_src, cfg.data.fields, cfg.data.on_bad_row, cfg.data.split, self.load_reports)
            self.eval_examples: dict[str, list[Example]] = {}
            if cfg.data.eval_files:
                for src in self._resolve_data(cfg.data.eval_files):
                    name = Path(src).stem if not src.startswith("toyworld") else src.split(":", 1)[1]
                    self.eval_examples[name] = load_examples(src, cfg.data.fields, cfg.data.on_bad_row, cfg.data.split)[: cfg.eval.max_items]
        except DataError as e:
            raise UserError(str(e)) from None
        self._check_solutions()
        self.scorer = RewardScorer(cfg.reward.funcs, cfg.reward.weights, cfg.reward.timeout)

        self.model, self.tokenizer, self.model_path = load_model_and_tokenizer(cfg.model, cfg.toyworld, str(self.device))
        self.model.config.use_cache = False
        if cfg.train.logprob_chunk_size:
            check_chunkable(self.model)
        fsdp = self.dist.fsdp
        if (fsdp is not None or self.dist.deepspeed is not None) and cfg.model.lora.r > 0:
            what = "FSDP" if fsdp is not None else "DeepSpeed"
            raise UserError(
                f"model.lora.r with a {what} launch: not supported; LoRA already keeps the trainable state small, "
                "so launch it with a data-parallel config (configs/accelerate/multi_gpu_ddp.yaml)"
            )
        if cfg.train.gradient_checkpointing or (fsdp is not None and fsdp.activation_checkpointing):
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.lora = cfg.model.lora.r > 0
        if self.lora:
            self.model = apply_lora(self.model, cfg.model.lora)
        # Forward passes go to the transformers model (with LoRA layers injected in place).
        self.core = self.model.get_base_model() if self.lora else self.model
        self.model.train()
        self.renderer = PromptRenderer(self.tokenizer, cfg.model.chat_template, cfg.model.system_prompt)
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        self.autocast_dtype = torch.bfloat16 if cfg.train.bf16 else None
        gen_bf16 = cfg.train.bf16 if cfg.train.bf16_generation is None else cfg.train.bf16_generation
        self.generator = HFGenerator(
            self.core, self.eos_ids, self.tokenizer.pad_token_id, autocast_dtype=torch.bfloat16 if gen_bf16 else None
        )
        self.ref_model = None
        if cfg.algorithm.beta > 0 and not self.lora:
            self.ref_model = copy.deepcopy(self.model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        # Weights of a resumed run load before sharding (the reference above stays the initial model).
        self._resume_from = self._find_resume_checkpoint() if self.resume else None
        if self._resume_from is not None:
            self._load_weights(self._resume_from)
        if fsdp is not None:
            fully_shard_model(self.model, fsdp)
            if self.ref_model is not None:
                fully_shard_model(self.ref_model, fsdp)

        self._prompt_cache: dict[int, list[int]] = {}
        # repo.rephrase_batching=auto: (mode, seconds) of the trial steps, then the mode chosen.
        self._batching_trials: list[tuple[str, float]] = []
        self._batching = None if cfg.repo.rephrase_batching == "auto" else cfg.repo.rephrase_batching
        self._check_prompt_lengths()

        t = cfg.train
        # The fused kernel is ~10x faster than the per-tensor loop on CPU (3.4 ms vs 34 ms at 4M params).
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=t.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.weight_decay,
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        if self.dist.deepspeed is not None:
            # ZeRO partitions the optimizer state (and, at stage 3, the weights); the scheduler keeps
            # driving the wrapped AdamW's learning rate.
            self.dist.engine = deepspeed_engine(self.model, self.optimizer, self.dist.deepspeed, self.dist.world, t.max_grad_norm)
        self.sampler = PromptSampler(len(self.train_examples), t.seed, cfg.data.shuffle)
        self.step = 0
        self.bad_steps_total = 0
        self.bad_steps_consecutive = 0
        self.first_seen_all_fail: dict[str, bool] = {}
        self.last_solved: dict[str, bool] = {}

        main = self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        if self.resume:
            self._load_latest()
        elif main and (self.out / "metrics.jsonl").exists():
            # A fresh run in a directory with metrics but no checkpoint: start the logs over.
            for name in ("metrics.jsonl", "completions.jsonl"):
                (self.out / name).unlink(missing_ok=True)
        self.dist.barrier()
        self.metrics_log = JsonlWriter(self.out / "metrics.jsonl") if main else None
        self.completions_log = JsonlWriter(self.out / "completions.jsonl") if t.log_completions and main else None
        self.trackers = Trackers(cfg.logging.report_to if main else [], self.out, cfg.logging.run_name or self.out.name, cfg.to_dict())

    def _check_solutions(self) -> None:
        """A method that learns from expert solutions needs at least one training row with one."""
        specs = [alg.METHODS[p] for p in self.method.phases] if self.method.phases else [self.method]
        if any(s.requires_solution for s in specs) and not any(e.solution is not None for e in self.train_examples):
            raise UserError(
                f"algorithm.method={self.method.name} learns from expert solutions, but none of the "
                f"{len(self.train_examples)} training rows has one (set data.fields.solution to the column that "
                "holds them, or use algorithm.method=grpo)"
            )

    def _check_prompt_lengths(self) -> None:
        """Every training prompt must tokenize to at least one token and fit: at most
        ``data.max_prompt_length`` tokens, and room left in the model's context
        (``max_position_embeddings``) for ``algorithm.max_completion_length`` new tokens.
        A huge text is refused from a prefix, without tokenizing all of it."""
        cfg = self.cfg
        limit = cfg.data.max_prompt_length
        ctx = getattr(getattr(self.core, "config", None), "max_position_embeddings", None)
        room = ctx - cfg.algorithm.max_completion_length if isinstance(ctx, int) and ctx > 0 else None
        bound = min(x for x in (limit, room) if x is not None) if (limit or room) else None
        for i, ex in enumerate(self.train_examples):
            if bound is not None:
                text = self.renderer.text(ex.prompt)
                cut = 64 * (bound + 1)  # no tokenizer packs 64 characters into one token
                if len(text) > cut and len(self.tokenizer(text[:cut], add_special_tokens=False)["input_ids"]) > bound:
                    n = f"more than {bound}"
                    raise UserError(self._too_long(ex, n, limit, room, ctx))
            n_ids = len(self._prompt_ids(i))
            if n_ids == 0:
                raise UserError(f"{ex.id}: prompt has no tokens after tokenization (characters the tokenizer drops?)")
            if bound is not None and n_ids > bound:
                raise UserError(self._too_long(ex, str(n_ids), limit, room, ctx))

    def _too_long(self, ex: Example, n: str, limit: Optional[int], room: Optional[int], ctx: Any) -> str:
        if limit is not None and (room is None or limit <= room):
            return f"{ex.id}: prompt has {n} tokens, more than data.max_prompt_length={limit}"
        return (
            f"{ex.id}: prompt has {n} tokens; with algorithm.max_completion_length={self.cfg.algorithm.max_completion_length} "
            f"it does not fit the model's context of {ctx} tokens (max_position_embeddings)"
        )

    def _resolve_data(self, files: str | list[str]) -> list[str]:
        srcs = [files] if isinstance(files, str) else list(files)
        out = []
        for s in srcs:
            if s.startswith("toyworld:"):
                from . import toyworld

                split = s.split(":", 1)[1]
                tw = self.cfg.toyworld.world_config()
                paths = toyworld.write_datasets(tw, self.out / "data") if self.dist.is_main else None
                paths = self.dist.gather(paths)[0]  # rank 0 writes, every rank reads
                if split not in paths:
                    raise UserError(f"data: unknown toy-world split {split!r}; expected one of {', '.join(sorted(paths))}")
                out.append(str(paths[split]))
            else:
                out.append(s)
        return out

    def _lr_lambda(self, step: int) -> float:
        t = self.cfg.train
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_scheduler == "constant":
            return 1.0
        span = max(t.max_steps - t.warmup_steps, 1)
        frac = min(max(step - t.warmup_steps, 0) / span, 1.0)
        if t.lr_scheduler == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    def _find_resume_checkpoint(self) -> Optional[Path]:
        root = self.out / "checkpoints"
        if self.dist.is_main:
            clean_partial(root)
        self.dist.barrier()
        return latest_checkpoint(root)

    @staticmethod
    def _cannot_resume(ckpt: Path, e: Exception) -> UserError:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return UserError(
            f"{ckpt}: cannot resume from this checkpoint ({type(e).__name__}: {first}); it is damaged or "
            "from another model. Move it aside to resume from the one before it"
        )

    def _load_weights(self, ckpt: Path) -> None:
        try:
            load_model_weights(self.model, ckpt, adapter=self.lora)
        except Exception as e:  # noqa: BLE001 - torch, safetensors and json raise many types
            raise self._cannot_resume(ckpt, e) from None

    def _load_latest(self) -> None:
        ckpt = self._resume_from
        engine = self.dist.engine
        if ckpt is not None and (engine is not None) != (ckpt / "deepspeed").is_dir():
            saved, now = ("DeepSpeed", "this launch") if engine is None else ("without DeepSpeed", "a DeepSpeed launch")
            raise UserError(
                f"{ckpt}: its optimizer state was saved {saved} and cannot be loaded under {now}; resume with the launcher "
                "that wrote it (the weights, model.safetensors, load anywhere: start a new run from them with model.name_or_path)"
            )
        if ckpt is None:
            # Nothing to resume (killed before the first checkpoint): start from scratch, and
            # drop the rows the killed run logged, or they would appear twice.
            if self.dist.is_main:
                for name in ("metrics.jsonl", "completions.jsonl"):
                    truncate_jsonl(self.out / name, 0)
            return
        try:
            if engine is not None:
                engine.load_checkpoint(str(ckpt / "deepspeed"), tag="state", load_optimizer_states=True,
                                       load_lr_scheduler_states=False, load_module_strict=False)
            state = load_training_state(ckpt, None if engine is not None else self.optimizer, self.scheduler, self.model)
            sampler_state = state["sampler"]
            step = int(state["step"])
        except Exception as e:  # noqa: BLE001 - torch, json and pickle raise many types
            raise self._cannot_resume(ckpt, e) from None
        try:
            self.sampler.load_state_dict(sampler_state)
        except DataError as e:
            raise UserError(str(e)) from None
        self.step = step
        self.bad_steps_total = int(state.get("bad_steps_total", 0))
        self.bad_steps_consecutive = int(state.get("bad_steps_consecutive", 0))
        self.first_seen_all_fail = dict(state.get("first_seen_all_fail", {}))
        self.last_solved = dict(state.get("last_solved", {}))
        if self.cfg.repo.rephrase_batching == "auto":
            self._batching_trials = [(str(m), float(t)) for m, t in state.get("batching_trials", [])]
            self._batching = choose_batching(self._batching_trials)
        if self.dist.is_main:
            for name in ("metrics.jsonl", "completions.jsonl"):
                truncate_jsonl(self.out / name, self.step)

    def _save(self) -> None:
        self.dist.barrier()
        gathered: tuple[Optional[dict], Optional[dict]] = (None, None)
        extra: Optional[dict[str, Path]] = None
        if self.dist.fsdp is not None:
            gathered = full_state_dicts(self.model, self.optimizer)  # collective
        elif self.dist.engine is not None:
            # DeepSpeed writes its partitioned optimizer state from every rank; rank 0 then moves it
            # into the checkpoint before the atomic rename.
            root = self.out / "checkpoints"
            ds_dir = root / f".ds-step-{self.step}"
            if self.dist.is_main:
                root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(ds_dir, ignore_errors=True)
            self.dist.barrier()
            self.dist.engine.save_checkpoint(str(ds_dir), tag="state", save_latest=False)
            gathered = (deepspeed_full_weights(self.dist.engine, self.dist.is_main), None)
            extra = {"deepspeed": ds_dir}
            self.dist.barrier()
        if self.dist.is_main:
            self._save_main(*gathered, extra=extra)
        self.dist.barrier()

    def _save_main(
        self, model_state: Optional[dict] = None, optimizer_state: Optional[dict] = None, extra: Optional[dict[str, Path]] = None
    ) -> Path:
        state = {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "bad_steps_total": self.bad_steps_total,
            "bad_steps_consecutive": self.bad_steps_consecutive,
            "first_seen_all_fail": self.first_seen_all_fail,
            "last_solved": self.last_solved,
            "batching_trials": [list(x) for x in self._batching_trials],
            "model_path": self.model_path,
            "world_size": self.dist.world,
        }
        if self.metrics_log is not None:
            self.metrics_log.sync()
        if self.completions_log is not None:
            self.completions_log.sync()
        return save_checkpoint(
            self.out / "checkpoints", self.step, self.model, self.tokenizer, None if extra else self.optimizer, self.scheduler,
            state, self.cfg.train.save_total_limit, model_state=model_state, optimizer_state=optimizer_state, extra_dirs=extra,
        )

    # ------------------------------------------------------------------ helpers
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _prompt_ids(self, idx: int) -> list[int]:
        ids = self._prompt_cache.get(idx)
        if ids is None:
            ids = self.renderer.ids(self.train_examples[idx].prompt)
            self._prompt_cache[idx] = ids
        return ids

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _encode_completion(self, text: str) -> list[int]:
        """Token ids of a text completion plus EOS, cut to ``max_completion_length``."""
        eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.eos_ids[0]
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos]
        return ids[: self.cfg.algorithm.max_completion_length]

    def _is_truncated(self, ids: Sequence[int], limit: int) -> bool:
        return len(ids) >= limit and (not ids or ids[-1] not in self.eos_ids)

    # ------------------------------------------------------------------ log-probs
    def _forward_logprobs(
        self,
        model: Any,
        seqs: Sequence[Sequence_],
        with_grad: bool,
        want_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Per-token log-probs of each completion under its prompt: ``[B, T]``, mask ``[B, T]``."""
        B = len(seqs)
        T = max(max(len(s.completion_ids) for s in seqs), 1)
        P = max(len(s.prompt_ids) for s in seqs)
        L = P + T
        pad = self.tokenizer.pad_token_id
        ids = torch.full((B, L), pad, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        cmask = torch.zeros((B, T), dtype=torch.float32)
        for i, s in enumerate(seqs):
            # Left-pad prompts so every completion starts at column P.
            p, c = s.prompt_ids, s.completion_ids
            ids[i, P - len(p) : P] = torch.tensor(p)
            attn[i, P - len(p) : P] = 1
            if c:
                ids[i, P : P + len(c)] = torch.tensor(c)
                attn[i, P : P + len(c)] = 1
                cmask[i, : len(c)] = 1
        ids, attn, cmask = ids.to(self.device), attn.to(self.device), cmask.to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
        temps = [1.0 if s.kind == alg.KIND_SFT else self._train_temperature() for s in seqs]
        temperature = temps[0] if len(set(temps)) == 1 else torch.tensor(temps)
        with ctx, self._autocast():
            logp, ent = completion_logprobs(
                model, ids, attn, pos, P, T, self.cfg.train.logprob_chunk_size, want_entropy, temperature
            )
        return logp, cmask, ent

    def _train_temperature(self) -> float:
        """Temperature of the training, old and reference log-probs: the rollouts' (1 for greedy)."""
        t = self.cfg.algorithm.temperature
        return t if t > 0 else 1.0

    def _micro_batches(self, seqs: Sequence[Sequence_], rows: Optional[Sequence[int]] = None) -> list[Optional[list[int]]]:
        """Indices of ``rows`` (default: all) grouped by total length (less padding); the loss normalisers are global.

        Under FSDP and DeepSpeed every rank must run the same number of forward and backward
        passes, so a rank with fewer micro-batches gets ``None`` entries: a one-token forward
        whose loss is multiplied by zero (see :meth:`_filler`).
        """
        rows = range(len(seqs)) if rows is None else rows
        order = sorted(rows, key=lambda i: (len(seqs[i].prompt_ids) + len(seqs[i].completion_ids), i))
        mb = self.cfg.train.micro_batch_size
        chunks: list[Optional[list[int]]] = [order[s : s + mb] for s in range(0, len(order), mb)]
        if self.dist.sharded:
            chunks += [None] * (self.dist.max_int(len(chunks)) - len(chunks))
        return chunks

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch; under DeepSpeed, gradients are reduced at the last one."""
        engine = self.dist.engine
        if engine is None:
            loss.backward()
            return
        # engine.forward would mark a new micro-step; repo-rl calls the module directly, so it
        # does it here, or ZeRO-3 overwrites instead of accumulating the earlier micro-batches.
        engine.optimizer.clear_backward_seen_flag()
        engine.set_gradient_accumulation_boundary(last)
        engine.backward(loss * self.dist.world)  # DeepSpeed averages over ranks; repo-rl sums

    def _filler(self) -> list[Sequence_]:
        pad = self.tokenizer.pad_token_id
        return [Sequence_([pad], [pad], truncated=False)]

    @torch.no_grad()
    def _logprobs_all(self, model: Any, seqs: Sequence[Sequence_], rows: Optional[Sequence[int]] = None) -> list[torch.Tensor]:
        """Log-probs of the completions of ``rows`` (default: all); None for the others."""
        out: list[torch.Tensor] = [None] * len(seqs)  # type: ignore[list-item]
        for chunk in self._micro_batches(seqs, rows):
            if chunk is None:
                self._forward_logprobs(model, self._filler(), with_grad=False)
                continue
            logp, mask, _ = self._forward_logprobs(model, [seqs[i] for i in chunk], with_grad=False)
            for j, i in enumerate(chunk):
                out[i] = logp[j, : int(mask[j].sum())].cpu()
        return out

    # ------------------------------------------------------------------ one step
    def _rollout_params(self) -> SamplingParams:
        a = self.cfg.algorithm
        return SamplingParams(a.max_completion_length, a.temperature, a.top_p, a.top_k)

    def _rephrase_params(self) -> SamplingParams:
        a, r = self.cfg.algorithm, self.cfg.repo
        return SamplingParams(
            r.max_new_tokens or a.max_completion_length,
            a.temperature if r.temperature is None else r.temperature,
            a.top_p if r.top_p is None else r.top_p,
            a.top_k,
        )

    def _rephrase_rows(self, batch: StepBatch, positions: Sequence[int]) -> tuple[list[list[int]], list[int]]:
        """Rephrase prompts P(q, k) and seeds: ``num_attempts`` rows per prompt position, in order."""
        cfg = self.cfg
        rows, seeds = [], []
        for n in positions:
            ex = batch.examples[n]
            ids = self.renderer.ids(self.renderer.rephrase_prompt(ex, cfg.repo.rephrase_template))
            occurrence = batch.dataset_index[:n].count(batch.dataset_index[n])
            for a in range(cfg.repo.num_attempts):
                rows.append(ids)
                seeds.append(derive_seed(cfg.train.seed, STREAM_REPHRASE, self.step, batch.dataset_index[n], occurrence, a))
        return rows, seeds

    def _sample(self, rows: list[list[int]], params: SamplingParams, seeds: list[int], want_logprobs: bool):
        """Generate; token log-probs too when asked and the generator can give them (else None)."""
        with full_parameters(self.model, self.dist.engine):
            if want_logprobs and hasattr(self.generator, "generate_with_logprobs"):
                return self.generator.generate_with_logprobs(rows, params, seeds)
            return self.generator.generate(rows, params, seeds), None

    def _rollouts(self, batch: StepBatch, spec: alg.MethodSpec) -> None:
        cfg = self.cfg
        G = cfg.algorithm.num_generations
        rows, seeds = [], []
        for n, di in enumerate(batch.dataset_index):
            occurrence = batch.dataset_index[:n].count(di)
            for j in range(G):
                rows.append(self._prompt_ids(di))
                seeds.append(derive_seed(cfg.train.seed, STREAM_ROLLOUT, self.step, di, occurrence, j))
        params = self._rollout_params()
        rp_rows: list[list[int]] = []
        eligible: list[int] = []
        batch.batching = "separate"
        if spec.injection == "rephrase" and self._rephrase_params() == params:
            batch.batching = self._batching or BATCHING_TRIALS[len(self._batching_trials)]
        if batch.batching == "with_rollouts":
            # One decode loop for rollouts and rephrases; the gate decides later which are used.
            eligible = [n for n, e in enumerate(batch.examples) if e.solution is not None]
            rp_rows, rp_seeds = self._rephrase_rows(batch, eligible)
            rows, seeds = rows + rp_rows, seeds + rp_seeds
        comps, lps = self._sample(rows, params, seeds, bool(rp_rows) and cfg.repo.log_prob_gap)
        if rp_rows:
            A, base = cfg.repo.num_attempts, len(rows) - len(rp_rows)
            batch.rephrase_pool = {
                n: [(rows[base + i * A + a], comps[base + i * A + a], lps[base + i * A + a] if lps is not None else []) for a in range(A)]
                for i, n in enumerate(eligible)
            }
            rows, comps = rows[:base], comps[:base]
        batch.sequences = [Sequence_(r, c, self._is_truncated(c, params.max_new_tokens)) for r, c in zip(rows, comps)]
        batch.texts = [self._decode(c) for c in comps]

    def _gated(self, spec: alg.MethodSpec, R: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
        if not spec.injection:
            return torch.zeros(R.shape[0], dtype=torch.bool)
        if spec.gate == "rho":
            return alg.gate(R, self.cfg.repo.delta, self.cfg.repo.rho, eligible)
        if spec.gate == "all_fail":
            return alg.all_failed(R, self.cfg.repo.delta) & eligible
        return eligible.clone()  # "always"

    def _compose(self, batch: StepBatch, rewards: torch.Tensor, timings: dict[str, float], spec: alg.MethodSpec) -> None:
        """Apply the method's group composition (gate -> candidates -> verify -> replace)."""
        cfg = self.cfg
        G, N = cfg.algorithm.num_generations, len(batch.examples)
        R = rewards.view(N, G)
        m = batch.metrics
        origins = torch.zeros(N * G, dtype=torch.long)
        batch.dropped = torch.zeros(N * G, dtype=torch.bool)
        eligible = torch.tensor([e.solution is not None for e in batch.examples])
        gated = self._gated(spec, R, eligible)
        # Counters (summed across ranks, turned into rates by train_step).
        for key in ("attempts", "verified", "replaced", "positive"):
            m[f"repo/{key}"] = 0.0
        m["repo/groups"] = float(N)
        m["repo/gated"] = float(gated.sum())
        if not spec.injection or not bool(gated.any()):
            batch.rewards, batch.origins = rewards, origins
            return
        k, A = cfg.repo.num_replace, cfg.repo.num_attempts
        gidx = gated.nonzero().flatten().tolist()
        t0 = time.perf_counter()
        cand_seqs: list[Sequence_] = []  # [len(gidx) * A]
        cand_texts: list[str] = []
        rp_prompt_ids: list[list[int]] = []
        rp_logp: list[Optional[float]] = []  # log pi(candidate | P(q, k)) from the sampler, when known
        if spec.injection == "rephrase":
            params = self._rephrase_params()
            if batch.rephrase_pool is not None:  # sampled with the rollouts
                rows, outs, lps = (list(x) for x in zip(*(batch.rephrase_pool[n][a] for n in gidx for a in range(A))))
            else:
                rows, seeds = self._rephrase_rows(batch, gidx)
                outs, lps = self._sample(rows, params, seeds, cfg.repo.log_prob_gap)  # all gated groups in one call
            for c, (r, ids) in enumerate(zip(rows, outs)):
                raw = self._decode(ids)
                text = strip_meta(raw, cfg.repo.strip_patterns)
                comp = ids if text == raw else self._encode_completion(text)
                truncated = self._is_truncated(ids, params.max_new_tokens) and text == raw
                limit = cfg.algorithm.max_completion_length
                if len(comp) > limit:
                    # Injected text must fit a rollout; verify exactly what would be trained.
                    comp, truncated = comp[:limit], True
                    text = self._decode(comp)
                cand_texts.append(text)
                cand_seqs.append(Sequence_([], comp, truncated))
                rp_prompt_ids.append(r)
                # The sampler's log-probs describe the sampled ids at the rephrase temperature; a
                # stripped text is new ids, and another temperature than the rollouts' is recomputed.
                same_t = (params.temperature if params.temperature > 0 else 1.0) == self._train_temperature()
                sampled = same_t and lps is not None and len(lps[c]) == len(ids) and comp == ids[: len(comp)]
                rp_logp.append(float(sum(lps[c][: len(comp)])) if sampled else None)
        else:  # the expert solution itself, trained under q
            for n in gidx:
                ex = batch.examples[n]
                for _ in range(A):
                    cand_texts.append(ex.solution or "")
                    comp = self._encode_completion(ex.solution or "")
                    cand_seqs.append(Sequence_([], comp, self._is_truncated(comp, cfg.algorithm.max_completion_length)))
        timings["rephrase"] = time.perf_counter() - t0
        if spec.injection == "rephrase":
            t0 = time.perf_counter()
            cand_examples = [batch.examples[n] for n in gidx for _ in range(A)]
            cand_prompts = [batch.examples[n].prompt for n in gidx for _ in range(A)]
            cand_r, rmetrics = self.scorer(cand_prompts, cand_texts, cand_examples)
            timings["reward"] = timings.get("reward", 0.0) + time.perf_counter() - t0
            for key in ("rewards/verifier_errors", "rewards/verifier_timeouts"):
                m[key] = m.get(key, 0.0) + rmetrics[key]
            verified = (cand_r >= cfg.repo.delta).view(len(gidx), A)
            m["repo/attempts"] = float(verified.numel())
            m["repo/verified"] = float(verified.sum())
        else:
            # The expert solution is the reference: it is taken as correct (reward 1) whether or
            # not the verifier can parse its foreign format.
            cand_r = torch.ones(len(gidx) * A, dtype=torch.float64)
            verified = torch.ones(len(gidx), A, dtype=torch.bool)
        choice, ok = alg.assign_candidates(verified, k if spec.injection == "rephrase" else 1, cfg.repo.allow_unverified)
        k = choice.shape[1]

        # Lay candidates out as [N, k] for the pure composition function.
        slots = alg.replacement_slots(R, k)
        cand_rewards, accept, attempt = alg.layout_candidates(torch.tensor(gidx), choice, ok, cand_r, N, A, dtype=R.dtype)
        pool_extra = attempt.view(-1).tolist()  # pool position -> candidate index
        new_R, origin, source = alg.compose_groups(R, slots, cand_rewards, accept, alg.ORIGIN_EXPERT if spec.injection == "expert" else alg.ORIGIN_REPHRASED)
        seqs, texts = list(batch.sequences), list(batch.texts)
        injected: list[tuple[int, int]] = []  # (flat position, candidate index)
        for flat, src in enumerate(source.view(-1).tolist()):
            if src >= N * G:
                c = pool_extra[src - N * G]
                n = flat // G
                seqs[flat] = Sequence_(batch.sequences[n * G].prompt_ids, cand_seqs[c].completion_ids, cand_seqs[c].truncated, spec.injected_kind)
                texts[flat] = cand_texts[c]
                injected.append((flat, c))
        batch.sequences, batch.texts = seqs, texts
        batch.rewards, batch.origins = new_R.view(-1), origin.view(-1)
        if spec.drop_group:
            got = (origin != alg.ORIGIN_ON_POLICY).any(1, keepdim=True)
            batch.dropped = (got & (origin == alg.ORIGIN_ON_POLICY)).view(-1)
        m["repo/replaced"] = float(len(injected))
        # Hard-sample utilisation, part (a): gated groups that got a positive learning signal.
        positive = (accept & (cand_rewards >= cfg.repo.delta)).any(1)
        m["repo/positive"] = float(positive[gated].sum())
        if injected and spec.injection == "rephrase" and cfg.repo.log_prob_gap:
            # log pi(o|P(q,k)) comes from the sampler; log pi(o|q) from the update's forward pass.
            missing = [(f, c) for f, c in injected if rp_logp[c] is None]
            if missing:
                under_p = self._logprobs_all(self.core, [Sequence_(rp_prompt_ids[c], cand_seqs[c].completion_ids, False) for _, c in missing])
                for (_, c), lp in zip(missing, under_p):
                    rp_logp[c] = float(lp.sum())
            batch.gap_under_p = {f: float(rp_logp[c]) for f, c in injected}  # type: ignore[arg-type]

    def _update(self, batch: StepBatch, advantages: torch.Tensor, valid: torch.Tensor, timings: dict[str, float]) -> dict[str, float]:
        cfg = self.cfg
        a = cfg.algorithm
        seqs = batch.sequences
        loss_mask_seq = valid.clone()
        if a.mask_truncated_completions:
            # Only sampled completions are masked; expert/SFT text cut to the limit still trains.
            loss_mask_seq &= torch.tensor([not (s.truncated and s.kind == alg.KIND_POLICY) for s in seqs])
        # Loss normalisers are totals over the global batch (all micro-batches, all ranks).
        totals = self.dist.sum_dict({
            "seq": float(loss_mask_seq.sum()),
            "tok": float(sum(len(s.completion_ids) for s, v in zip(seqs, loss_mask_seq.tolist()) if v)),
        })
        n_seq, n_tok = int(totals["seq"]), int(totals["tok"])
        # train.skip_zero_advantage: rows with zero loss and gradient (masked out, or zero advantage
        # without a KL term) are not forwarded; the normalisers above still count them, so loss and
        # gradient are unchanged. Injected rephrasings are forwarded anyway, for repo/logp_gap.
        rows = list(range(len(seqs)))
        if cfg.train.skip_zero_advantage:
            kinds_all = torch.tensor([s.kind for s in seqs], dtype=torch.long)
            trained = loss_mask_seq & ~alg.zero_gradient_rows(advantages.cpu(), kinds_all, a.beta)
            trained[list(batch.gap_under_p)] = loss_mask_seq[list(batch.gap_under_p)]
            rows = trained.nonzero().squeeze(-1).tolist()
        t0 = time.perf_counter()
        old_logps = self._logprobs_all(self.core, seqs, rows) if a.num_iterations > 1 else None
        ref_logps = None
        if self.ref_model is not None:
            ref_logps = self._logprobs_all(self.ref_model, seqs, rows)
        elif self.lora and a.beta > 0:
            with self.model.disable_adapter():  # the reference is the base model: no second copy
                ref_logps = self._logprobs_all(self.core, seqs, rows)
        timings["logprobs"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = {"loss": 0.0, "clip_low": 0.0, "clip_high": 0.0, "clip_tokens": 0.0, "kl": 0.0, "entropy": 0.0, "tokens": 0.0,
                 "rows_not_forwarded": float(len(seqs) - len(rows))}
        grad_norms: list[float] = []
        skipped = False
        engine = self.dist.engine
        for it in range(a.num_iterations):
            if engine is None:
                self.optimizer.zero_grad(set_to_none=True)
            loss_total = 0.0
            chunks = self._micro_batches(seqs, rows)
            if not chunks and n_seq > 0:
                # Every row here has zero gradient: a zero-loss filler pass still gives every
                # parameter a (zero) gradient, so the optimizer steps exactly as without skipping.
                chunks = [None]
            for ci, chunk in enumerate(chunks):
                last = ci == len(chunks) - 1
                if chunk is None:  # a filler (see above, and _micro_batches); adds nothing to the gradient
                    logp, _, _ = self._forward_logprobs(self.core, self._filler(), with_grad=True)
                    if n_seq > 0:
                        self._backward(logp.sum() * 0.0, last)
                    continue
                mb = [seqs[i] for i in chunk]
                logp, mask, ent = self._forward_logprobs(self.core, mb, with_grad=True, want_entropy=(it == 0))
                if it == 0 and batch.gap_under_p:
                    for j, i in enumerate(chunk):
                        if i in batch.gap_under_p:
                            batch.logp_sums[i] = float((logp[j].detach() * mask[j]).sum())
                seq_w = loss_mask_seq[chunk].to(mask.device, mask.dtype)
                mask = mask * seq_w.unsqueeze(-1)
                T = logp.shape[1]

                def stack(vals: Optional[list[torch.Tensor]]) -> Optional[torch.Tensor]:
                    if vals is None:
                        return None
                    out = torch.zeros(len(chunk), T)
                    for j, i in enumerate(chunk):
                        out[j, : vals[i].numel()] = vals[i]
                    return out.to(logp.device)

                old = stack(old_logps)
                old = logp.detach() if old is None else old
                adv = advantages[chunk].to(logp.device, logp.dtype)
                kinds = torch.tensor([seqs[i].kind for i in chunk], device=logp.device)
                per_tok, parts = alg.token_loss(
                    logp, old, adv, kinds, epsilon_low=a.epsilon, epsilon_high=self.cfg.epsilon_high,
                    gamma=cfg.baselines.luffy_gamma, beta=a.beta, ref_logp=stack(ref_logps),
                    use_bias_correction_kl=a.use_bias_correction_kl, clip_ratio_c=a.clip_ratio_c,
                    log_ratio_bound=a.log_ratio_bound,
                )
                low, high = parts["clip_low"], parts["clip_high"]
                if "kl" in parts and it == 0:
                    stats["kl"] += float((parts["kl"] * mask).sum())
                loss = alg.aggregate(per_tok, mask, a.loss_type, num_sequences=n_seq, num_tokens=n_tok, max_completion_length=a.max_completion_length)
                if n_seq > 0:
                    self._backward(loss, last)
                loss_total += float(loss.detach())  # this rank's share of the global loss
                # Clipping is counted over every iteration: with num_iterations=1 the ratio is 1
                # by construction, and only later iterations can leave the trust region.
                stats["clip_tokens"] += float(mask.sum())
                stats["clip_low"] += float((low.float() * mask).sum())
                stats["clip_high"] += float((high.float() * mask).sum())
                if it == 0:
                    stats["tokens"] += float(mask.sum())
                    if ent is not None:
                        stats["entropy"] += float((ent * mask).sum())
            loss_total = self.dist.sum_dict({"loss": loss_total})["loss"]
            if engine is not None:
                # DeepSpeed clips (train.max_grad_norm) and steps, and skips the update itself when
                # the gradient norm is not finite.
                gn = 0.0
                if n_seq > 0:
                    engine.step()
                    norm = engine.get_global_grad_norm()
                    gn = float(norm) if norm is not None else float("nan")
                if not math.isfinite(gn):
                    skipped = True
                    break
                grad_norms.append(gn)
                stats["loss"] += loss_total / a.num_iterations
                continue
            self.dist.all_reduce_grads(self.model.parameters())
            params = [p for p in self.model.parameters() if p.grad is not None]
            if params:
                gn = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf"))
                gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)  # a DTensor under FSDP
            else:
                gn = 0.0
            if not math.isfinite(loss_total) or not math.isfinite(gn):
                self.optimizer.zero_grad(set_to_none=True)
                skipped = True
                break
            grad_norms.append(gn)
            stats["loss"] += loss_total / a.num_iterations
            self.optimizer.step()
            # Free the gradients now rather than at the next zero_grad: they are a model-sized
            # buffer that would otherwise sit through the next step's generation.
            self.optimizer.zero_grad(set_to_none=True)
        if not skipped:
            self.scheduler.step()
        timings["update"] = time.perf_counter() - t0
        loss_sum = stats.pop("loss")
        stats = self.dist.sum_dict(stats)
        tok = max(stats["tokens"], 1.0)
        ctok = max(stats["clip_tokens"], 1.0)
        out = {
            "loss": loss_sum if not skipped else float("nan"),
            "grad_norm": (sum(grad_norms) / len(grad_norms)) if grad_norms else float("nan"),
            "clip_ratio/low_mean": stats["clip_low"] / ctok,
            "clip_ratio/high_mean": stats["clip_high"] / ctok,
            "clip_ratio/region_mean": (stats["clip_low"] + stats["clip_high"]) / ctok,
            "entropy": stats["entropy"] / stats["tokens"] if stats["tokens"] else float("nan"),
            "kl": stats["kl"] / tok if a.beta > 0 else 0.0,
            "learning_rate": self.scheduler.get_last_lr()[0],
        }
        out["clip_ratio"] = out["clip_ratio/region_mean"]
        if skipped:
            self.bad_steps_total += 1
            self.bad_steps_consecutive += 1
        else:
            self.bad_steps_consecutive = 0
        out["train/skipped_step"] = float(skipped)
        out["train/rows_not_forwarded"] = stats["rows_not_forwarded"]
        out["train/bad_steps"] = float(self.bad_steps_total)
        return out

    def _spec_for_step(self) -> alg.MethodSpec:
        """The method in force at this step (composite methods switch phase)."""
        spec = self.method
        if not spec.phases:
            return spec
        first, second = spec.phases
        n = self.cfg.baselines.sft_steps
        n = self.cfg.train.max_steps // 2 if n is None else n
        return alg.METHODS[first] if self.step < n else alg.METHODS[second]

    def _sft_batch(self, batch: StepBatch) -> None:
        """Pure SFT: the expert solution of each prompt under q, no rollouts."""
        seqs, texts, keep = [], [], []
        for n, ex in enumerate(batch.examples):
            if ex.solution is None:
                continue
            comp = self._encode_completion(ex.solution)
            seqs.append(Sequence_(self._prompt_ids(batch.dataset_index[n]), comp, self._is_truncated(comp, self.cfg.algorithm.max_completion_length), alg.KIND_SFT))
            texts.append(ex.solution)
            keep.append(n)
        batch.examples = [batch.examples[n] for n in keep]
        batch.dataset_index = [batch.dataset_index[n] for n in keep]
        batch.sequences, batch.texts = seqs, texts
        batch.rewards = torch.full((len(seqs),), float("nan"), dtype=torch.float64)
        batch.origins = torch.full((len(seqs),), alg.ORIGIN_EXPERT, dtype=torch.long)
        batch.dropped = torch.zeros(len(seqs), dtype=torch.bool)

    def train_step(self) -> dict[str, Any]:
        """Run one full step and return its metrics (also written to metrics.jsonl on rank 0)."""
        cfg, d = self.cfg, self.dist
        G = cfg.algorithm.num_generations
        spec = self._spec_for_step()
        torch.manual_seed(derive_seed(cfg.train.seed, STREAM_STEP, self.step))
        t_step = time.perf_counter()
        timings = {"generation": 0.0, "rephrase": 0.0, "reward": 0.0, "logprobs": 0.0, "update": 0.0}
        idx = d.shard(self.sampler.take(cfg.train.prompts_per_step))  # same global order on every rank
        batch = StepBatch(examples=[self.train_examples[i] for i in idx], dataset_index=idx)
        m: dict[str, Any] = {"step": self.step + 1, "epoch": self.sampler.epoch, "phase": spec.name}
        gsize = G if spec.rollouts else 1

        if spec.rollouts:
            t0 = time.perf_counter()
            self._rollouts(batch, spec)
            timings["generation"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            rep_examples = [e for e in batch.examples for _ in range(G)]
            rewards, rcounts = self.scorer([e.prompt for e in rep_examples], batch.texts, rep_examples)
            timings["reward"] = time.perf_counter() - t0
            batch.metrics.update(rcounts)
            self._compose(batch, rewards, timings, spec)
        else:
            self._sft_batch(batch)
            rewards = batch.rewards
            for key in ("groups", "gated", "attempts", "verified", "replaced", "positive"):
                batch.metrics[f"repo/{key}"] = 0.0

        # Everything below that mixes groups uses the global batch, gathered in rank order.
        shards = d.gather(
            (rewards, batch.rewards, batch.origins, batch.dropped, [e.id for e in batch.examples],
             [e.domain for e in batch.examples], [s.kind for s in batch.sequences])
        )
        on_policy_all = torch.cat([x[0] for x in shards])
        rewards_all = torch.cat([x[1] for x in shards])
        origins_all = torch.cat([x[2] for x in shards])
        dropped_all = torch.cat([x[3] for x in shards])
        ids_all = [i for x in shards for i in x[4]]
        domains_all = [dm for x in shards for dm in x[5]]
        sft_all = torch.tensor([k == alg.KIND_SFT for x in shards for k in x[6]], dtype=torch.bool)
        # SFT rows have no reward; they are trained whatever it is.
        valid_all = (torch.isfinite(rewards_all) & ~dropped_all) | sft_all
        if spec.rollouts:
            stats_mask = None
            if spec.injected_kind == alg.KIND_SHAPED and cfg.baselines.luffy_on_policy_stats:
                stats_mask = origins_all == alg.ORIGIN_ON_POLICY
            adv_all = alg.group_advantages(rewards_all.float(), G, cfg.algorithm.scale_rewards, valid_all, stats_mask=stats_mask)
            m.update(alg.group_reward_stats(rewards_all.float(), G))
            m["reward/on_policy"] = alg.group_reward_stats(on_policy_all.float(), G)["reward"]
            for dm in sorted({x for x in domains_all if x}):
                sel = torch.tensor([x == dm for x in domains_all]).repeat_interleave(G)
                vals = on_policy_all[sel]
                vals = vals[torch.isfinite(vals)]
                m[f"reward/domain/{dm}"] = float(vals.mean()) if vals.numel() else float("nan")
            m.update(self._track_hard_prompts(ids_all, alg.all_failed(on_policy_all.view(-1, G), cfg.repo.delta).tolist()))
        else:
            adv_all = torch.zeros(len(rewards_all))
            m.update({"reward": float("nan"), "reward_std": float("nan"), "frac_reward_zero_std": float("nan"), "reward/on_policy": float("nan")})
        lo = sum(len(x[1]) for x in shards[: d.rank])
        hi = lo + len(batch.sequences)
        adv, valid = adv_all[lo:hi], valid_all[lo:hi]

        if batch.sequences or d.world > 1:
            upd = self._update(batch, adv, valid, timings)
        else:
            upd = {"loss": float("nan"), "train/skipped_step": 1.0}
        gaps = [batch.gap_under_p[f] - batch.logp_sums[f] for f in batch.gap_under_p if f in batch.logp_sums]
        batch.metrics["repo/gap_sum"] = float(sum(gaps))
        batch.metrics["repo/gap_n"] = float(len(gaps))
        self.step += 1

        c = d.sum_dict({k: v for k, v in batch.metrics.items()})
        c.update(d.sum_dict({
            "len_sum": float(sum(len(s.completion_ids) for s in batch.sequences)),
            "len_n": float(len(batch.sequences)),
            "truncated": float(sum(s.truncated for s in batch.sequences)),
        }))
        ratio = lambda a, b: c[a] / c[b] if c.get(b) else float("nan")  # noqa: E731
        for key in sorted(c):
            if key.startswith("rewards/") and key.endswith("/count"):
                base = key[: -len("/count")]
                m[f"{base}/mean"] = ratio(f"{base}/sum", key)
        for key in ("rewards/verifier_errors", "rewards/verifier_timeouts", "rewards/invalid"):
            m[key] = c.get(key, 0.0)
        m["repo/gate_rate"] = ratio("repo/gated", "repo/groups") if c["repo/groups"] else 0.0
        m["repo/rephrase_success_rate"] = ratio("repo/verified", "repo/attempts")
        m["repo/replaced"] = c["repo/replaced"]
        m["repo/utilization"] = ratio("repo/positive", "repo/gated")
        m["repo/logp_gap"] = ratio("repo/gap_sum", "repo/gap_n")
        m.update(upd)
        m["completions/mean_length"] = ratio("len_sum", "len_n")
        local_max = max((len(s.completion_ids) for s in batch.sequences), default=0)
        m["completions/max_length"] = float(max(d.gather(local_max)))
        m["completions/clipped_ratio"] = ratio("truncated", "len_n")
        inj = origins_all != alg.ORIGIN_ON_POLICY
        m["advantage/injected_mean"] = float(adv_all[inj].mean()) if bool(inj.any()) and spec.rollouts else float("nan")
        for k, v in timings.items():
            m[f"time/{k}"] = v
        m["time/step"] = time.perf_counter() - t_step
        if spec.injection == "rephrase":
            m["repo/rephrase_with_rollouts"] = float(batch.batching == "with_rollouts")
            if self._batching is None and c["repo/gated"] > 0:
                # A trial counts only when some rank rephrased; every rank records the slowest
                # rank's time, so all ranks (and a resumed run) make the same choice.
                sec = max(self.dist.gather(timings["generation"] + timings["rephrase"]))
                self._batching_trials.append((batch.batching, float(sec)))
                self._batching = choose_batching(self._batching_trials)
                if self._batching is not None and self.dist.is_main:
                    secs = {k: sum(t for mm, t in self._batching_trials if mm == k) for k in ("separate", "with_rollouts")}
                    self._say(
                        f"repo.rephrase_batching=auto: {self._batching} "
                        f"(generation + rephrase over 2 trial steps each: separate {secs['separate']:.2f}s, "
                        f"with rollouts {secs['with_rollouts']:.2f}s)"
                    )
        self._log_completions(batch, adv, gsize)
        if self.bad_steps_consecutive >= cfg.train.max_bad_steps:
            if self.metrics_log is not None:
                self.metrics_log.write(m)
            raise TrainingError(
                f"stopped after {self.bad_steps_consecutive} consecutive steps with a non-finite loss or gradient "
                f"(train.max_bad_steps={cfg.train.max_bad_steps}); try a lower train.learning_rate or train.bf16=false"
            )
        return m

    def _track_hard_prompts(self, ids: list[str], all_fail: list[bool]) -> dict[str, float]:
        """Hard-sample utilisation, part (b): prompts that were all-fail when first seen and
        whose latest on-policy group had at least one success (see docs/EVALUATION.md)."""
        for pid, failed in zip(ids, all_fail):
            self.first_seen_all_fail.setdefault(pid, bool(failed))
            self.last_solved[pid] = not bool(failed)
        hard = [k for k, v in self.first_seen_all_fail.items() if v]
        solved = sum(self.last_solved.get(k, False) for k in hard)
        return {
            "hard/first_seen_all_fail": float(len(hard)),
            "hard/solved": float(solved),
            "hard/solved_frac": solved / len(hard) if hard else float("nan"),
        }

    def _log_completions(self, batch: StepBatch, adv: torch.Tensor, group_size: int) -> None:
        if not self.cfg.train.log_completions:
            return
        rank_groups = len(batch.examples)
        records = []
        for i, (text, r, o) in enumerate(zip(batch.texts, batch.rewards.tolist(), batch.origins.tolist())):
            ex = batch.examples[i // group_size]
            records.append(
                {
                    "step": self.step,
                    "prompt_id": ex.id,
                    "group": i // group_size,
                    "origin": alg.ORIGIN_NAMES[o],
                    "reward": None if math.isnan(r) else r,
                    "advantage": float(adv[i]),
                    "in_loss": not bool(batch.dropped[i]),
                    "text": text,
                }
            )
        shards = self.dist.gather((records, rank_groups))
        if self.completions_log is None:
            return
        offset = 0
        for rank_records, n_groups in shards:
            for rec in rank_records:
                rec["group"] += offset
                self.completions_log.write(rec)
            offset += n_groups

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """avg@n and pass@1 of the current policy on each eval split."""
        cfg = self.cfg
        out: dict[str, float] = {}
        params = SamplingParams(cfg.algorithm.max_completion_length, cfg.eval.temperature, 1.0, 0)
        for name, exs in self.eval_examples.items():
            rows, seeds, rep = [], [], []
            for i, ex in enumerate(exs):
                ids = self.renderer.ids(ex.prompt)
                for j in range(cfg.eval.n):
                    rows.append(ids)
                    seeds.append(derive_seed(cfg.train.seed, STREAM_EVAL, i, j))
                    rep.append(ex)
            comps, _ = self._sample(rows, params, seeds, want_logprobs=False)
            texts = [self._decode(c) for c in comps]
            r, _ = self.scorer([e.prompt for e in rep], texts, rep)
            correct = (torch.nan_to_num(r, nan=0.0) >= cfg.repo.delta).view(len(exs), cfg.eval.n)
            counts = correct.sum(1).tolist()
            n = cfg.eval.n
            # The same estimators as ``repo-rl eval``: pass@1 is the unbiased mean over the n samples.
            out[f"eval/{name}/avg@{n}"] = float(correct.float().mean())
            out[f"eval/{name}/pass@1"] = sum(pass_at_k(n, c, 1) for c in counts) / len(counts)
        return out

    @staticmethod
    def _say(msg: str) -> None:
        """One line to stderr that does not break a progress bar."""
        from tqdm.auto import tqdm

        tqdm.write(msg, file=sys.stderr)

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        t = cfg.train
        bar = None
        if self.show_progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=t.max_steps, initial=self.step, desc=f"{cfg.algorithm.method}", unit="step", dynamic_ncols=True)
        last: dict[str, Any] = {}
        try:
            while self.step < t.max_steps:
                m = self.train_step()
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    m.update(self.evaluate())
                if self.metrics_log is not None:
                    self.metrics_log.write(m)
                self.trackers.log(m, self.step)
                last = m
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        reward=f"{m['reward']:.3f}",
                        gate=f"{m['repo/gate_rate']:.2f}",
                        rephr=("-" if math.isnan(m["repo/rephrase_success_rate"]) else f"{m['repo/rephrase_success_rate']:.2f}"),
                        s=f"{m['time/step']:.2f}",
                    )
                if (t.save_every and self.step % t.save_every == 0) or self.step == t.max_steps:
                    self._save()
        finally:
            if bar is not None:
                bar.close()
            if self.metrics_log is not None:
                self.metrics_log.close()
            if self.completions_log is not None:
                self.completions_log.close()
            self.trackers.close()
        self.dist.close()
        return {"steps": self.step, "last": last}
