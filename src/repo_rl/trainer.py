"""The training loop. It owns order, not math: every formula lives in :mod:`repo_rl.algorithms`.

One step (:meth:`Trainer.train_step`)::

    prompts -> rollouts (G per prompt) -> rewards
      -> compose groups (the method): gate -> rephrase with the current policy -> verify -> inject
      -> advantages -> update (log-probs under the ORIGINAL prompt, loss, optimizer step)
      -> metrics / completions log

Where the stages live: :mod:`repo_rl.step.sampling` (rollouts, candidates, composition),
:mod:`repo_rl.step.update` (the update), :mod:`repo_rl.step.metrics` (metrics),
:mod:`repo_rl.run.state` (checkpoints and resume), :mod:`repo_rl.run.preflight` (checks at start).
"""

from __future__ import annotations

import contextlib
import copy
import math
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from . import algorithms as alg
from .run.checkpoint import latest_checkpoint, list_checkpoints
from .config import Config
from .config.checks import check_launch
from .data import DataError, Example, LoadReport, PromptSampler, load_examples
from .run.distributed import Dist, deepspeed_engine, full_parameters, fully_shard_model
from .errors import TrainingError, UserError
from .evaluation import pass_at_k
from .step.logprobs import check_chunkable
from .step.pipeline import Batch, Prefetch, batch_from_state, batch_state
from .run.malloc import set_mmap_threshold
from .models.loading import apply_lora, eos_token_ids, load_model_and_tokenizer
from .step.bank import RephraseBank, warmup_rows
from .run.preflight import check_prompt_lengths, check_rephrase_lengths, check_solutions, context_limit, resolve_data
from .step.prompts import PromptRenderer
from .rewards.scorer import RewardScorer
from .engines import BATCHING_TRIALS, SamplingParams, derive_seed, make_generator
from .run.health import default_threads, exploded, good_checkpoint_hint, resolve_bf16, weight_norm, weights_finite
from .run.directory import RunLock, StopRequested, StopSignals, absolute_paths, data_fingerprint
from .run.state import RunState, apply_hyperparameters, find_resume_checkpoint, load_run, load_weights, save_run
from .step.sampling import STREAM_EVAL, STREAM_REPHRASE, STREAM_ROLLOUT, STREAM_STEP, STREAM_WARMUP, StepSampler  # noqa: F401
from .step.types import Group, Sequence_
from .step.metrics import (
    completion_records,
    log_line,
    counter_metrics,
    length_counters,
    merge_counters,
    reward_metrics,
    track_hard_prompts,
    write_completions,
)
from .run.tracking import JsonlWriter, Trackers, check_writable
from .step.update import PolicyUpdate, lr_factor
from .step.verify import RephraseVerifier, check_verify


class Trainer:
    """GRPO-family trainer with RePO group composition. See the module docstring."""

    def __init__(self, cfg: Config, output_dir: str | Path, resume: bool = False, progress: Optional[bool] = None,
                 allow_config_change: bool = False) -> None:
        self.cfg = cfg
        self.out = Path(output_dir)
        self.resume = resume
        self.allow_config_change = allow_config_change
        self.lock: Optional[RunLock] = None
        self.show_progress = cfg.logging.progress if progress is None else progress
        self.method = alg.METHODS[cfg.algorithm.method]
        self.dist = Dist()
        try:
            self._check_launch()
            self._load_data()
            self._load_model()
            self._make_optimizer()
            self._open_run()
        except BaseException:
            self.close_engines()
            raise

    def close_engines(self) -> None:
        """Release the run directory's lock and stop helper processes (an engine, reward workers);
        :meth:`train` does this when it ends, a failed start here."""
        if self.lock is not None:
            self.lock.release()
        for name in ("scorer", "verifier", "generator"):
            close = getattr(getattr(self, name, None), "close", None)
            if callable(close):
                close()

    # ------------------------------------------------------------------ setup
    def _check_launch(self) -> None:
        cfg = self.cfg
        check_launch(cfg, self.dist.world)
        if self.dist.is_main:
            check_writable(self.out)
            self.lock = RunLock(self.out)
            self.lock.acquire()
        self.dist.barrier()
        if not self.resume and latest_checkpoint(self.out / "checkpoints") is not None:
            raise UserError(f"--output-dir {self.out}: already holds a run with checkpoints; pass --resume to continue it or choose another directory")
        threads = cfg.train.threads if cfg.train.threads else default_threads(self.cfg.train.device)
        if threads:
            torch.set_num_threads(threads)
        set_mmap_threshold(cfg.train.mmap_threshold_kb)
        torch.manual_seed(cfg.train.seed)
        dev = cfg.train.device
        self.device = torch.device("cuda" if dev == "auto" and torch.cuda.is_available() else ("cpu" if dev == "auto" else dev))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"train.device={dev}: CUDA is not available here (torch {torch.__version__}); use train.device=cpu or auto")
        if self.dist.device is not None and self.device.type == "cuda":
            self.device = self.dist.device  # one GPU per process

    def _load_data(self) -> None:
        """Data first: a bad row should fail before a model is loaded."""
        cfg = self.cfg
        self.load_reports: list[LoadReport] = []
        try:
            srcs = resolve_data(cfg.data.train_files, cfg, self.out, self.dist)
            self.train_examples = load_examples(srcs, cfg.data.fields, cfg.data.on_bad_row, cfg.data.split, self.load_reports)
            self.eval_examples: dict[str, list[Example]] = {}
            for src in resolve_data(cfg.data.eval_files, cfg, self.out, self.dist) if cfg.data.eval_files else []:
                name = Path(src).stem if not src.startswith("toyworld") else src.split(":", 1)[1]
                self.eval_examples[name] = load_examples(src, cfg.data.fields, cfg.data.on_bad_row, cfg.data.split)[: cfg.eval.max_items]
        except DataError as e:
            raise UserError(str(e)) from None
        check_solutions(self.method, self.train_examples)
        self.scorer = RewardScorer(cfg.reward.funcs, cfg.reward.weights, cfg.reward.timeout, judge=cfg.reward.judge,
                                   by_domain=cfg.reward.by_domain)
        self.scorer.check_domains(self.train_examples, "data.train_files")
        phases = [alg.METHODS[p] for p in self.method.phases] if self.method.phases else [self.method]
        self.verifier = None
        if any(p.rephrases for p in phases):
            check_verify(cfg, self.train_examples, self.scorer, self._say if self.dist.is_main else (lambda msg: None))
            self.verifier = RephraseVerifier(cfg, self.scorer)
        for name, rows in self.eval_examples.items():
            self.scorer.check_domains(rows, f"data.eval_files ({name})")

    def _load_model(self) -> None:
        cfg, fsdp = self.cfg, self.dist.fsdp
        self.model, self.tokenizer, self.model_path = load_model_and_tokenizer(cfg.model, cfg.toyworld, str(self.device))
        self.model.config.use_cache = False
        if cfg.train.logprob_chunk_size:
            check_chunkable(self.model)
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
        self.bf16, why = resolve_bf16(cfg.train.bf16, self.device)
        if self.dist.is_main:
            self._say(f"precision: {'bf16 autocast' if self.bf16 else 'float32'} ({why})")
        self.autocast_dtype = torch.bfloat16 if self.bf16 else None
        gen_bf16 = self.bf16 if cfg.train.bf16_generation is None else cfg.train.bf16_generation
        self.generator = self.dist.on_every_rank(
            "the generation engine", lambda: make_generator(self.core, self.eos_ids, self.tokenizer.pad_token_id, cfg.generation.backend,
                                                            autocast_dtype=torch.bfloat16 if gen_bf16 else None,
                                                            **cfg.generation.engine_options()),
            close=lambda g: getattr(g, "close", lambda: None)(),
        )
        if self.dist.world > 1 and hasattr(self.generator, "share_weights_file") and not self.generator.in_process:
            # One weights file per machine for the syncs: its lowest rank writes, all its engines read.
            host = socket.gethostname()
            dirs = self.dist.gather((host, str(self.generator.dir)))
            writer = min(r for r, (h, _) in enumerate(dirs) if h == host)
            self.generator.share_weights_file(Path(dirs[writer][1]) / "model.safetensors", self.dist.rank == writer, self.dist.barrier)
        self.ref_model = None
        initial_teacher = self.method.teacher and cfg.baselines.sdft_teacher == "initial"
        if (cfg.algorithm.beta > 0 or initial_teacher) and not self.lora:
            self.ref_model = copy.deepcopy(self.model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        # Weights of a resumed run load before sharding (the reference above stays the initial model).
        self._resume_from = find_resume_checkpoint(self.out, self.dist) if self.resume else None
        if self._resume_from is not None:
            load_weights(self.model, self._resume_from, self.lora)
            self.generator.sync_weights(self.core)  # an engine with its own copy starts from the checkpoint
        if fsdp is not None:
            fully_shard_model(self.model, fsdp)
            if self.ref_model is not None:
                fully_shard_model(self.ref_model, fsdp)
        self._prompt_cache: dict[int, list[int]] = {}
        check_prompt_lengths(cfg, self.train_examples, self.renderer, self.tokenizer, self.core, self._prompt_ids)
        self.unfit_rephrase_rows = check_rephrase_lengths(cfg, self.method, self.train_examples, self.renderer, self.tokenizer,
                                                          self.core)

    def _make_optimizer(self) -> None:
        t = self.cfg.train
        # The fused kernel is ~10x faster than the per-tensor loop on CPU (3.4 ms vs 34 ms at 4M params).
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay,
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(t, step))
        if self.dist.deepspeed is not None:
            # ZeRO partitions the optimizer state (and, at stage 3, the weights); the scheduler keeps
            # driving the wrapped AdamW's learning rate.
            self.dist.engine = deepspeed_engine(self.model, self.optimizer, self.dist.deepspeed, self.dist.world, t.max_grad_norm)
        self.updater = PolicyUpdate(self.cfg, self.dist, self.model, self.core, self.ref_model, self.optimizer, self.scheduler,
                                    self.device, self.tokenizer.pad_token_id, self.autocast_dtype, self.lora)
        self.sampler = PromptSampler(len(self.train_examples), t.seed, self.cfg.data.shuffle)
        self.bank = RephraseBank(self.cfg.repo.bank_size if self.cfg.repo.fewshot else 0)
        self.stages = StepSampler(self.cfg, self.tokenizer, self.renderer, self.eos_ids, lambda *a: self.scorer(*a), self._sample,
                                  lambda seqs: self.updater.logprobs(self.core, seqs), self._prompt_ids,
                                  verifier=self.verifier, bank=self.bank, context_length=context_limit(self.cfg, self.core))
        # train.max_staleness: the next step's batch is sampled in a thread while this step trains.
        self._pending: Optional[Batch] = None
        self._prefetch = Prefetch()
        self.overlap = bool(self.cfg.train.max_staleness)
        if self.overlap and not getattr(self.generator, "needs_weights", False):
            self.overlap = False
            if self.dist.is_main:
                self._say(f"train.max_staleness={self.cfg.train.max_staleness}: generation.backend={self.cfg.generation.backend} samples "
                          "with the training weights themselves, so sampling cannot overlap the update; this run samples, then "
                          "trains (generation.backend=vllm overlaps)")
        self.stages.sampler_logps = self.updater.importance_sampling()
        self.stages.defer_gap = True  # log pi(o | P) the sampler did not give: taken in train_step, beside the update's passes

    def _open_run(self) -> None:
        cfg, main = self.cfg, self.dist.is_main
        self.run = RunState()
        fingerprint = data_fingerprint(self.train_examples)
        if self.resume:
            keep = cfg.repo.rephrase_batching == "auto"
            self.run = load_run(self._resume_from, self.out, self.dist, self.model, self.optimizer, self.scheduler, self.sampler, keep)
            if self._resume_from is not None:
                apply_hyperparameters(self.optimizer, self.scheduler, cfg.train)  # the config's, not the checkpoint's
            self.bank.load_state_dict(self.run.bank)
            self._pending = self._saved_batch()
            saved = self.run.data_fingerprint
            if saved is not None and saved != fingerprint and not self.allow_config_change:
                raise UserError(
                    f"--resume: the training data differs from the data the run in {self.out} started on (same files, other "
                    "content); start a new output directory, or pass --allow-config-change if the change is meant"
                )
        self.run.data_fingerprint = fingerprint
        if self.run.good_weight_norm is None:
            self._exploded()  # the initial weights' norm is the first reference
        if main:  # what the run uses from now on (a resume may have changed some keys)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(absolute_paths(cfg).to_yaml(), encoding="utf-8")  # resumable from anywhere
            if not self.resume:  # a fresh run in a directory with logs but no checkpoint: start the logs over
                for name in ("metrics.jsonl", "completions.jsonl"):
                    (self.out / name).unlink(missing_ok=True)
        self.dist.barrier()
        self.metrics_log = JsonlWriter(self.out / "metrics.jsonl") if main else None
        self.completions_log = JsonlWriter(self.out / "completions.jsonl") if cfg.train.log_completions and main else None
        self.trackers = Trackers(cfg.logging.report_to if main else [], self.out, cfg.logging.run_name or self.out.name, cfg.to_dict())

    @property
    def step(self) -> int:
        return self.run.step

    def _batching(self) -> Optional[str]:
        """``repo.rephrase_batching`` in force: the setting, or (``auto``) the mode the trials chose."""
        setting = self.cfg.repo.rephrase_batching
        return self.run.batching if setting == "auto" else setting

    # ------------------------------------------------------------------ helpers
    def _prompt_ids(self, idx: int) -> list[int]:
        ids = self._prompt_cache.get(idx)
        if ids is None:
            ids = self.renderer.ids(self.train_examples[idx].prompt)
            self._prompt_cache[idx] = ids
        return ids

    def _sample(self, rows: list[list[int]], params: SamplingParams, seeds: list[int], want_logprobs: bool):
        """Generate; ``(ids, token log-probs or None)``. An engine with its own weights needs no
        gathered training weights (and must not: it may sample in a thread beside the update)."""
        own = getattr(self.generator, "needs_weights", False)
        with contextlib.nullcontext() if own else full_parameters(self.model, self.dist.engine):
            if want_logprobs:
                return self.generator.generate(rows, params, seeds, logprobs=True)
            return self.generator.generate(rows, params, seeds), None

    def _sync_engine(self) -> bool:
        """Give an engine with its own copy of the weights the updated ones (gathered where sharded);
        False when the engine samples from the training model itself."""
        if not getattr(self.generator, "needs_weights", False):
            return False
        with full_parameters(self.model, self.dist.engine):
            self.generator.sync_weights(self.core)
        return True

    def _saved_batch(self) -> Optional[Batch]:
        """The batch a resumed run had sampled for its next step (``train.max_staleness`` 1), if its
        checkpoint carries one for this launch's ranks."""
        saved = self.run.pending
        self.run.pending = None
        if not saved:
            return None
        if len(saved) != self.dist.world:
            if self.dist.is_main:
                self._say(f"--resume: the checkpoint holds the next batch of {len(saved)} process(es), this launch has "
                          f"{self.dist.world}; it is sampled again")
            return None
        try:
            batch = batch_from_state(saved[self.dist.rank], self.train_examples)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise UserError(f"--resume: the checkpoint's pending batch cannot be read ({type(e).__name__}: {e})") from None
        return batch if batch.step == self.run.step else None

    def _save(self) -> None:
        shards = self.dist.gather(batch_state(self._pending) if self._pending is not None else None)
        self.run.pending = shards if any(x is not None for x in shards) else None
        save_run(self.out, self.dist, self.run, self.model, self.tokenizer, self.optimizer, self.scheduler, self.sampler,
                 {"model_path": self.model_path}, self.cfg.train.save_total_limit, [self.metrics_log, self.completions_log])
        self.run.pending = None

    # ------------------------------------------------------------------ one step
    def _take(self, in_flight: int = 0) -> tuple[list[int], int, str]:
        """The main thread's part of sampling a step: this rank's prompts (the prompt sampler moves
        on), its epoch, and the rephrase batching (``in_flight``: batches sampled whose batching
        trial is not recorded yet)."""
        idx = self.dist.shard(self.sampler.take(self.cfg.train.prompts_per_step))  # same global order on every rank
        trial = min(len(self.run.batching_trials) + in_flight, len(BATCHING_TRIALS) - 1)
        return idx, self.sampler.epoch, self._batching() or BATCHING_TRIALS[trial]

    def _sample_batch(self, step: int, idx: list[int], epoch: int, batching: str, weights_step: int) -> Batch:
        """The sampling half of step ``step`` on this rank's prompts: rollouts, rewards, the method's
        groups. With ``train.max_staleness`` 1 it runs in a thread beside the update, so it touches the
        engine, the scorer, the verifier and the bank, never the training model."""
        cfg = self.cfg
        G = cfg.algorithm.num_generations
        method = self.method.phase_at(step, cfg.baselines.sft_steps, cfg.train.max_steps)
        timings = {"generation": 0.0, "rephrase": 0.0, "reward": 0.0}
        examples = [self.train_examples[i] for i in idx]
        if method.rollouts:
            t0 = time.perf_counter()
            rollouts = self.stages.rollouts(examples, idx, method, step, batching)
            timings["generation"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            rep = [e for e in examples for _ in range(G)]
            rewards, reward_counts = self.scorer([e.prompt for e in rep], rollouts.texts, rep)
            timings["reward"] = time.perf_counter() - t0
            group = self.stages.compose(examples, idx, rollouts, rewards, method, step, timings)
        else:
            group = self.stages.sft_group(examples, idx)
            rewards, reward_counts = group.rewards, {}
        return Batch(step, idx, epoch, group, rewards, reward_counts, timings, weights_step)

    def train_step(self) -> dict[str, Any]:
        """Run one full step and return its metrics (also written to metrics.jsonl on rank 0)."""
        cfg, d, run = self.cfg, self.dist, self.run
        method = self.method.phase_at(run.step, cfg.baselines.sft_steps, cfg.train.max_steps)
        torch.manual_seed(derive_seed(cfg.train.seed, STREAM_STEP, run.step))
        t_step = time.perf_counter()
        batch, self._pending = self._pending, None
        if batch is None:  # sampled now (always without overlap; the first step and after a plain resume with it)
            batch = self._sample_batch(run.step, *self._take(), weights_step=run.step)
        if self.overlap and run.step + 1 < cfg.train.max_steps:
            # The next step's batch, sampled by the engine with the weights this step starts from,
            # while this step's update runs.
            nxt, args = run.step + 1, self._take(in_flight=1)
            self._prefetch.start(lambda: self._sample_batch(nxt, *args, weights_step=nxt - 1))
        group, rewards, reward_counts = batch.group, batch.on_policy, batch.reward_counts
        timings = {"generation": 0.0, "rephrase": 0.0, "reward": 0.0, "logprobs": 0.0, "update": 0.0, **batch.timings}
        m: dict[str, Any] = {"step": run.step + 1, "epoch": batch.epoch, "phase": method.name}
        if self.overlap:
            m["train/staleness"] = float(run.step - batch.weights_step)
        if cfg.repo.uptake_after and method.rephrases:
            m.update(self._uptake())
        if group.gap_missing or (d.sharded and method.rephrases and cfg.repo.log_prob_gap):
            # log pi(o | P(q, k)) of injected rephrases the sampler gave no log-probs for, with the
            # weights that train on them (every rank runs the passes when the weights are sharded).
            lps = self.updater.logprobs(self.core, [sq for _, sq in group.gap_missing])
            group.gap_under_p.update({f: float(lp.sum()) for (f, _), lp in zip(group.gap_missing, lps)})

        adv, valid, adv_all, injected_all, reward_m = self._advantages(group, rewards, method)
        m.update(reward_m)

        injected = [i for i, o in enumerate(group.origins.tolist()) if o == alg.ORIGIN_REPHRASED] if method.rephrases else []
        if group.sequences or d.world > 1:
            res = self.updater(group.sequences, adv, valid, keep_logp=sorted(set(group.gap_under_p) | set(injected)))
            upd, logp_sums = res.metrics, res.logp_sums
            timings.update(res.timings)
            bad = res.skipped or self._exploded()
            run.bad_steps_total += int(bad)
            run.bad_steps_consecutive = run.bad_steps_consecutive + 1 if bad else 0
            run.first_bad_step = (run.first_bad_step or run.step + 1) if bad else None
            upd["train/bad_steps"] = float(run.bad_steps_total)
        else:
            upd, logp_sums = {"loss": float("nan"), "train/skipped_step": 1.0}, {}
        if self._prefetch.running:
            t0 = time.perf_counter()
            self._pending = self._prefetch.wait()
            timings["wait"] = time.perf_counter() - t0  # the update waited this long for the next batch
        if group.sequences or d.world > 1:
            t0 = time.perf_counter()
            if self._sync_engine():
                timings["sync"] = time.perf_counter() - t0
        gaps = [group.gap_under_p[f] - logp_sums[f] for f in group.gap_under_p if f in logp_sums]
        # log pi(o_rep | q) per token of the injected rephrases, from the update's forward (before its step).
        inj_logp = {f: logp_sums[f] / max(len(group.sequences[f].completion_ids), 1) for f in injected if f in logp_sums}
        if cfg.repo.uptake_after and method.rephrases:
            mine = [{"step": run.step, "prompt_ids": group.sequences[f].prompt_ids,
                     "completion_ids": group.sequences[f].completion_ids, "logp_then": v} for f, v in inj_logp.items()]
            for shard in d.gather(mine):  # every rank holds the whole list, as the checkpoint does
                run.uptake += shard
        if method.rephrases:
            for shard in d.gather(group.bank_candidates):  # rank order: every rank keeps the same bank
                for entry in shard:
                    self.bank.add(entry)
            run.bank = self.bank.state_dict()
        run.step += 1

        counts = merge_counters(reward_counts, group.counters, {"repo/gap_sum": float(sum(gaps)), "repo/gap_n": float(len(gaps)),
                                                               "repo/inj_logp_sum": float(sum(inj_logp.values())),
                                                               "repo/inj_logp_n": float(len(inj_logp))})
        c = d.sum_dict(counts)
        c.update(d.sum_dict(length_counters(group)))
        if method.rollouts:
            items, unscored = c.get("rewards/items", 0.0), c.get("rewards/unscored", 0.0)
            run.unscored_steps = run.unscored_steps + 1 if items > 0 and unscored >= items else 0
        m.update(counter_metrics(c))
        m.update(upd)
        m["completions/mean_length"] = c["len_sum"] / c["len_n"] if c.get("len_n") else float("nan")
        m["completions/max_length"] = float(max(d.gather(max((len(s.completion_ids) for s in group.sequences), default=0))))
        m["completions/clipped_ratio"] = c["truncated"] / c["len_n"] if c.get("len_n") else float("nan")
        m["advantage/injected_mean"] = float(adv_all[injected_all].mean()) if bool(injected_all.any()) and method.rollouts else float("nan")
        for k, v in timings.items():
            m[f"time/{k}"] = v
        m["time/step"] = time.perf_counter() - t_step
        if method.rephrases:
            m["repo/rephrase_with_rollouts"] = float(group.batching == "with_rollouts")
            self._record_batching_trial(group.batching, c["repo/gated"], timings)
        self._log_completions(group, adv, cfg.algorithm.num_generations if method.rollouts else 1)
        stop = None
        if run.bad_steps_consecutive >= cfg.train.max_bad_steps:
            stop = (f"stopped after {run.bad_steps_consecutive} consecutive steps with a non-finite loss or gradient "
                    f"(train.max_bad_steps={cfg.train.max_bad_steps}), the first at step {run.first_bad_step}; "
                    + good_checkpoint_hint(list_checkpoints(self.out / "checkpoints"), run.first_bad_step or run.step))
        elif run.unscored_steps >= cfg.reward.max_unscored_steps:
            describe = getattr(self.scorer, "unscored_message", None)
            stop = describe(run.unscored_steps) if describe else (
                f"no completion got a reward in {run.unscored_steps} consecutive steps; check reward.funcs")
        if stop is not None:
            if self.metrics_log is not None:
                self.metrics_log.write(m)
            raise TrainingError(stop)
        return m

    def _warm_bank(self) -> None:
        """``repo.bank_warmup``: before the first step of a run with ``repo.fewshot``, one zero-shot
        rephrase of each of that many training rows (seeded order), verified; those that pass seed
        the bank. Every rank samples its share and all keep the same bank."""
        cfg, d = self.cfg, self.dist
        phases = [alg.METHODS[p] for p in self.method.phases] if self.method.phases else [self.method]
        if self.step or not cfg.repo.fewshot or not cfg.repo.bank_warmup or len(self.bank) or not any(p.rephrases for p in phases):
            return
        pool = [i for i, e in enumerate(self.train_examples) if e.solution is not None]
        chosen = warmup_rows(pool, cfg.repo.bank_warmup, derive_seed(cfg.train.seed, STREAM_WARMUP))
        mine = chosen[d.rank::d.world]
        t0 = time.perf_counter()
        entries = self.stages.bank_warmup([self.train_examples[i] for i in mine], mine)
        for shard in d.gather(entries):
            for entry in shard:
                self.bank.add(entry)
        self.run.bank = self.bank.state_dict()
        if d.is_main:
            self._say(f"repo.bank_warmup: {len(chosen)} zero-shot rephrases verified, {len(self.bank)} put in the bank "
                      f"({time.perf_counter() - t0:.0f} s)")

    def _uptake(self) -> dict[str, float]:
        """``repo.uptake_after``: the injected rephrases due for a second look, re-scored under q with the
        current weights; their mean log-prob per token at injection (``repo/uptake_logp_then``), now
        (``repo/uptake_logp_now``) and the difference (``repo/uptake_gain``). NaN when none is due."""
        run, lag = self.run, self.cfg.repo.uptake_after
        due = [e for e in run.uptake if run.step - e["step"] >= lag]
        run.uptake = [e for e in run.uptake if run.step - e["step"] < lag]
        then = now = 0.0
        mine = due[self.dist.rank::self.dist.world]  # each rank re-scores its share
        if mine or self.dist.sharded:
            seqs = [Sequence_(list(e["prompt_ids"]), list(e["completion_ids"]), False) for e in mine]
            lps = self.updater.logprobs(self.core, seqs)
            then = sum(e["logp_then"] for e in mine)
            now = sum(float(lp.sum()) / max(len(e["completion_ids"]), 1) for e, lp in zip(mine, lps))
        c = self.dist.sum_dict({"then": then, "now": now, "n": float(len(mine))})
        nan = float("nan")
        return {"repo/uptake_logp_then": c["then"] / c["n"] if c["n"] else nan,
                "repo/uptake_logp_now": c["now"] / c["n"] if c["n"] else nan,
                "repo/uptake_gain": (c["now"] - c["then"]) / c["n"] if c["n"] else nan,
                "repo/uptake_n": c["n"]}

    def _exploded(self) -> bool:
        """:func:`~repo_rl.run.health.exploded` after an update (the norm of a good step becomes the
        next reference); not checked when the weights are sharded."""
        limit = self.cfg.train.max_weight_growth
        if limit is None or self.dist.sharded:
            return False
        norm = weight_norm(self.model)
        if exploded(norm, self.run.good_weight_norm, limit):
            return True
        self.run.good_weight_norm = norm
        return False

    def _advantages(self, group: Group, on_policy: torch.Tensor, method: alg.Method):
        """Group-relative advantages over the global batch (gathered in rank order), sliced back
        to this rank: ``(adv, valid, adv_all, injected_all, reward metrics)``."""
        cfg, d, G = self.cfg, self.dist, self.cfg.algorithm.num_generations
        shards = d.gather((on_policy, group.rewards, group.origins, group.dropped, [e.id for e in group.examples],
                           [e.domain for e in group.examples], [s.kind for s in group.sequences]))
        on_policy_all = torch.cat([x[0] for x in shards])
        rewards_all = torch.cat([x[1] for x in shards])
        origins_all = torch.cat([x[2] for x in shards])
        dropped_all = torch.cat([x[3] for x in shards])
        sft_all = torch.tensor([k == alg.KIND_SFT for x in shards for k in x[6]], dtype=torch.bool)
        # SFT rows have no reward; they are trained whatever it is.
        valid_all = (torch.isfinite(rewards_all) & ~dropped_all) | sft_all
        if method.rollouts:
            stats_mask = None
            if method.advantage_stats == "on_policy" and cfg.baselines.luffy_on_policy_stats:
                stats_mask = origins_all == alg.ORIGIN_ON_POLICY
            adv_all = alg.group_advantages(rewards_all.float(), G, cfg.algorithm.scale_rewards, valid_all, stats_mask=stats_mask)
            if method.rephrases and not cfg.repo.gated_negatives:
                adv_all = alg.drop_negatives_beside_injected(adv_all, origins_all, G)
            m = reward_metrics(rewards_all, on_policy_all, [dm for x in shards for dm in x[5]], G)
            all_fail = alg.all_failed(on_policy_all.view(-1, G), cfg.repo.delta).tolist()
            m.update(track_hard_prompts(self.run.first_seen_all_fail, self.run.last_solved, [i for x in shards for i in x[4]], all_fail))
        else:
            adv_all = torch.zeros(len(rewards_all))
            m = {"reward": float("nan"), "reward_std": float("nan"), "frac_reward_zero_std": float("nan"), "reward/on_policy": float("nan")}
        lo = sum(len(x[1]) for x in shards[: d.rank])
        hi = lo + len(group.sequences)
        return adv_all[lo:hi], valid_all[lo:hi], adv_all, origins_all != alg.ORIGIN_ON_POLICY, m

    def _record_batching_trial(self, batching: str, gated: float, timings: dict[str, float]) -> None:
        """``repo.rephrase_batching=auto``: time the trial steps, then keep the faster mode."""
        run = self.run
        if self._batching() is not None or gated <= 0:
            return
        # A trial counts only when some rank rephrased; every rank records the slowest rank's time,
        # so all ranks (and a resumed run) make the same choice.
        sec = max(self.dist.gather(timings["generation"] + timings["rephrase"]))
        run.batching_trials.append((batching, float(sec)))
        chosen = run.batching
        if chosen is not None and self.dist.is_main:
            secs = {k: sum(t for mm, t in run.batching_trials if mm == k) for k in ("separate", "with_rollouts")}
            self._say(
                f"repo.rephrase_batching=auto: {chosen} (generation + rephrase over 2 trial steps each: "
                f"separate {secs['separate']:.2f}s, with rollouts {secs['with_rollouts']:.2f}s)"
            )

    def _log_completions(self, group: Group, adv: torch.Tensor, group_size: int) -> None:
        if not self.cfg.train.log_completions:
            return
        shards = self.dist.gather((completion_records(group, adv, self.run.step, group_size), len(group.examples)))
        if self.completions_log is not None:
            write_completions(shards, self.completions_log.write)

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """avg@n and pass@1 of the current policy on each eval split, as ``repo-rl eval`` computes them."""
        cfg = self.cfg
        out: dict[str, float] = {}
        n = cfg.eval.n
        params = SamplingParams(cfg.algorithm.max_completion_length, cfg.eval.temperature, 1.0, 0)
        for name, exs in self.eval_examples.items():
            rows, seeds, rep = [], [], []
            for i, ex in enumerate(exs):
                ids = self.renderer.ids(ex.prompt)
                for j in range(n):
                    rows.append(ids)
                    seeds.append(derive_seed(cfg.train.seed, STREAM_EVAL, i, j))
                    rep.append(ex)
            comps, _ = self._sample(rows, params, seeds, want_logprobs=False)
            r, _ = self.scorer([e.prompt for e in rep], [self.stages.decode(c) for c in comps], rep)
            correct = (torch.nan_to_num(r, nan=0.0) >= cfg.repo.delta).view(len(exs), n)
            counts = correct.sum(1).tolist()
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
        every = cfg.logging.logging_steps
        if self.show_progress and self.dist.is_main and sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=t.max_steps, initial=self.step, desc=f"{cfg.algorithm.method}", unit="step", dynamic_ncols=True)
        last: dict[str, Any] = {}
        signals = StopSignals(self._say if self.dist.is_main else None)
        last_saved = self.step
        try:
            self._warm_bank()  # inside the try: an interrupted warm-up still closes the engines and logs
            with signals:
                while self.step < t.max_steps:
                    m = self.train_step()
                    if cfg.eval.every and self.step % cfg.eval.every == 0:
                        m.update(self.evaluate())
                    if self.metrics_log is not None:
                        self.metrics_log.write(m)
                    self.trackers.log(m, self.step)
                    last = m
                    if bar is None and self.dist.is_main and every and (self.step % every == 0 or self.step in (1, t.max_steps)):
                        self._say(log_line(m, t.max_steps))
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(
                            reward=f"{m['reward']:.3f}",
                            gate=f"{m['repo/gate_rate']:.2f}",
                            rephr=("-" if math.isnan(m["repo/rephrase_success_rate"]) else f"{m['repo/rephrase_success_rate']:.2f}"),
                            s=f"{m['time/step']:.2f}",
                        )
                    # A step that went non-finite, or weights that did, are never saved over a good checkpoint.
                    due = (t.save_every and self.step % t.save_every == 0) or self.step == t.max_steps
                    requested = max(self.dist.gather(signals.requested or 0))  # every rank stops at the same step
                    if (due or requested) and self.step != last_saved:
                        if self.run.bad_steps_consecutive == 0 and (self.dist.sharded or weights_finite(self.model)):
                            self._save()
                            last_saved = self.step
                        elif self.dist.is_main:
                            self._say(f"step {self.step}: not saved (non-finite loss, gradient or weights); the last checkpoint is kept")
                    if requested:
                        raise StopRequested(int(requested), last_saved)
        finally:
            self._prefetch.cancel()  # a batch still being sampled finishes before the engine closes
            if bar is not None:
                bar.close()
            summary = getattr(self.scorer, "summary", None)  # a scorer stand-in may have none
            if self.dist.is_main and callable(summary):
                for line in summary():
                    self._say(line)
            if self.metrics_log is not None:
                self.metrics_log.close()
            if self.completions_log is not None:
                self.completions_log.close()
            self.trackers.close()
            self.close_engines()
        self.dist.close()
        return {"steps": self.step, "last": last}


__all__ = ["Sequence_", "Trainer"]
