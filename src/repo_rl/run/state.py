"""The state of a run that a checkpoint carries beyond model and optimizer, and the save and
resume of a whole run (FSDP and DeepSpeed included) around :mod:`repo_rl.run.checkpoint`."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .checkpoint import clean_partial, latest_checkpoint, load_model_weights, load_training_state, save_checkpoint
from ..data import DataError, PromptSampler
from .distributed import Dist, deepspeed_full_weights, full_state_dicts
from ..errors import UserError
from ..engines import choose_batching
from .tracking import truncate_jsonl

LOGS = ("metrics.jsonl", "completions.jsonl")


@dataclass
class RunState:
    """Counters that must survive a resume for it to reproduce the uninterrupted run."""

    step: int = 0
    bad_steps_total: int = 0
    bad_steps_consecutive: int = 0
    unscored_steps: int = 0
    """Consecutive steps in which no rollout got a reward (``reward.max_unscored_steps``)."""
    first_seen_all_fail: dict[str, bool] = field(default_factory=dict)
    last_solved: dict[str, bool] = field(default_factory=dict)
    batching_trials: list[tuple[str, float]] = field(default_factory=list)
    """``repo.rephrase_batching=auto``: (mode, seconds) of the trial steps."""
    data_fingerprint: Optional[str] = None
    """:func:`repo_rl.run.directory.data_fingerprint` of the training data the run started on."""
    good_weight_norm: Optional[float] = None
    """L2 norm of the weights after the last good step (``train.max_weight_growth``)."""
    first_bad_step: Optional[int] = None
    """The first step of the current streak of non-finite steps (None: the last step was good)."""
    bank: Optional[dict[str, Any]] = None
    """The rephrase bank (:meth:`repo_rl.step.bank.RephraseBank.state_dict`), taken at save time."""
    uptake: list[dict[str, Any]] = field(default_factory=list)
    """``repo.uptake_after``: injected rephrases waiting to be re-scored under q
    (``step``, ``prompt_ids``, ``completion_ids``, ``logp_then`` per token)."""
    pending: Optional[list[Any]] = None
    """``train.max_staleness`` 1: the batch each rank sampled for the next step
    (:func:`repo_rl.step.pipeline.batch_state`, rank order), taken at save time."""

    @property
    def batching(self) -> Optional[str]:
        """The rephrase batching chosen by the trials (None while they run)."""
        return choose_batching(self.batching_trials)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "bad_steps_total": self.bad_steps_total,
            "bad_steps_consecutive": self.bad_steps_consecutive,
            "unscored_steps": self.unscored_steps,
            "first_seen_all_fail": self.first_seen_all_fail,
            "last_solved": self.last_solved,
            "batching_trials": [list(x) for x in self.batching_trials],
            "data_fingerprint": self.data_fingerprint,
            "first_bad_step": self.first_bad_step,
            "good_weight_norm": self.good_weight_norm,
            "bank": self.bank,
            "uptake": self.uptake,
            "pending": self.pending,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any], keep_trials: bool) -> "RunState":
        return cls(
            step=int(state["step"]),
            bad_steps_total=int(state.get("bad_steps_total", 0)),
            bad_steps_consecutive=int(state.get("bad_steps_consecutive", 0)),
            unscored_steps=int(state.get("unscored_steps", 0)),
            first_seen_all_fail=dict(state.get("first_seen_all_fail", {})),
            last_solved=dict(state.get("last_solved", {})),
            batching_trials=[(str(m), float(t)) for m, t in state.get("batching_trials", [])] if keep_trials else [],
            data_fingerprint=state.get("data_fingerprint"),
            first_bad_step=state.get("first_bad_step"),
            good_weight_norm=state.get("good_weight_norm"),
            bank=state.get("bank"),
            uptake=list(state.get("uptake", [])),
            pending=state.get("pending"),
        )


def find_resume_checkpoint(out: Path, dist: Dist) -> Optional[Path]:
    root = out / "checkpoints"
    if dist.is_main:
        clean_partial(root)
    dist.barrier()
    return latest_checkpoint(root)


def cannot_resume(ckpt: Path, e: Exception) -> UserError:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return UserError(
        f"{ckpt}: cannot resume from this checkpoint ({type(e).__name__}: {first}); it does not fit the model "
        "and settings of this run (check model.* and model.lora.* against the run's config.yaml), or it is damaged"
    )


def apply_hyperparameters(optimizer: Any, scheduler: Any, train_cfg: Any) -> None:
    """Make the optimizer use the config's learning rate, betas and weight decay after its state
    was loaded from a checkpoint (the loaded state carries the values the run started with)."""
    lr = float(train_cfg.learning_rate)
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for i, g in enumerate(optimizer.param_groups):
        g["initial_lr"] = lr
        g["betas"] = (train_cfg.adam_beta1, train_cfg.adam_beta2)
        g["weight_decay"] = train_cfg.weight_decay
        lam = scheduler.lr_lambdas[i] if hasattr(scheduler, "lr_lambdas") else None
        g["lr"] = lr * lam(scheduler.last_epoch) if lam is not None else lr
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def load_weights(model: Any, ckpt: Path, lora: bool) -> None:
    try:
        load_model_weights(model, ckpt, adapter=lora)
    except Exception as e:  # noqa: BLE001 - torch, safetensors and json raise many types
        raise cannot_resume(ckpt, e) from None


def load_run(
    ckpt: Optional[Path], out: Path, dist: Dist, model: Any, optimizer: Any, scheduler: Any, sampler: PromptSampler,
    keep_trials: bool,
) -> RunState:
    """Optimizer, scheduler, sampler and counters of ``ckpt`` (the weights were loaded before
    sharding); logs are cut back to its step. No checkpoint: a fresh state, logs emptied."""
    engine = dist.engine
    if ckpt is not None and (engine is not None) != (ckpt / "deepspeed").is_dir():
        saved, now = ("DeepSpeed", "this launch") if engine is None else ("without DeepSpeed", "a DeepSpeed launch")
        raise UserError(
            f"{ckpt}: its optimizer state was saved {saved} and cannot be loaded under {now}; resume with the launcher "
            "that wrote it (the weights, model.safetensors, load anywhere: start a new run from them with model.name_or_path)"
        )
    if ckpt is None:
        # Nothing to resume (killed before the first checkpoint): start from scratch, and
        # drop the rows the killed run logged, or they would appear twice.
        if dist.is_main:
            for name in LOGS:
                truncate_jsonl(out / name, 0)
        return RunState()
    try:
        if engine is not None:
            engine.load_checkpoint(str(ckpt / "deepspeed"), tag="state", load_optimizer_states=True,
                                   load_lr_scheduler_states=False, load_module_strict=False)
        state = load_training_state(ckpt, None if engine is not None else optimizer, scheduler, model)
        sampler_state = state["sampler"]
        run = RunState.from_dict(state, keep_trials)
    except Exception as e:  # noqa: BLE001 - torch, json and pickle raise many types
        raise cannot_resume(ckpt, e) from None
    try:
        sampler.load_state_dict(sampler_state)
    except DataError as e:
        raise UserError(str(e)) from None
    if dist.is_main:
        for name in LOGS:
            truncate_jsonl(out / name, run.step)
    return run


def save_run(
    out: Path, dist: Dist, run: RunState, model: Any, tokenizer: Any, optimizer: Any, scheduler: Any,
    sampler: PromptSampler, extra_state: dict[str, Any], save_total_limit: Optional[int], logs: list[Any],
) -> None:
    """A checkpoint of the run at ``run.step`` (collective: every rank calls it)."""
    dist.barrier()
    gathered: tuple[Optional[dict], Optional[dict]] = (None, None)
    extra: Optional[dict[str, Path]] = None
    if dist.fsdp is not None:
        gathered = full_state_dicts(model, optimizer)  # collective
    elif dist.engine is not None:
        # DeepSpeed writes its partitioned optimizer state from every rank; rank 0 then moves it
        # into the checkpoint before the atomic rename.
        root = out / "checkpoints"
        ds_dir = root / f".ds-step-{run.step}"
        if dist.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(ds_dir, ignore_errors=True)
        dist.barrier()
        dist.engine.save_checkpoint(str(ds_dir), tag="state", save_latest=False)
        gathered = (deepspeed_full_weights(dist.engine, dist.is_main), None)
        extra = {"deepspeed": ds_dir}
        dist.barrier()
    if dist.is_main:
        state = {**run.to_dict(), "sampler": sampler.state_dict(), **extra_state, "world_size": dist.world}
        for log in logs:
            if log is not None:
                log.sync()
        model_state, optimizer_state = gathered
        save_checkpoint(
            out / "checkpoints", run.step, model, tokenizer, None if extra else optimizer, scheduler, state, save_total_limit,
            model_state=model_state, optimizer_state=optimizer_state, extra_dirs=extra,
        )
    dist.barrier()
