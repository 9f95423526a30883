"""Multi-process training through ``accelerate launch`` (or ``torchrun``).

Prompts are sharded contiguously, so each GRPO group stays whole on one rank and the RePO
gate and rephrase run per rank. Loss normalisers and metrics use global totals, so N
processes compute the same update as one process over the same global batch. With one
process every operation here is the identity.

Two ways to hold the model:

* data parallel (the default): every rank holds the full model and gradients are summed
  with one all-reduce per optimizer step;
* FSDP (an accelerate config with ``distributed_type: FSDP``, ``fsdp_version: 2``): torch's
  ``fully_shard`` shards parameters, gradients and optimizer state over the ranks. Each
  decoder layer is one shard unit. Generation runs on all-gathered parameters, so ranks
  may sample different lengths without lock-step collectives; checkpoints hold full
  (unsharded) weights and optimizer state, so a run resumes under any launcher;
* DeepSpeed ZeRO-2/3 (``distributed_type: DEEPSPEED``): the trainer wraps model and AdamW in a
  DeepSpeed engine and keeps driving forward, backward and step; ZeRO-3 generation runs on
  gathered parameters too. Checkpoints add DeepSpeed's own optimizer partitions.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch

from ..errors import UserError

_TRUE = ("1", "true", "yes")


def _flag(env: Mapping[str, str], key: str, default: bool = False) -> bool:
    v = env.get(key)
    return default if v is None or v == "" else v.strip().lower() in _TRUE


@dataclass(frozen=True)
class FsdpSettings:
    """The FSDP options repo-rl honours, read from the environment ``accelerate launch`` sets."""

    reshard_after_forward: bool = True
    wrap_classes: tuple[str, ...] = ()
    """Module class names that become shard units; empty: the model's ``_no_split_modules``."""
    wrap: bool = True
    """False for ``fsdp_auto_wrap_policy: NO_WRAP`` (one unit, the whole model)."""
    activation_checkpointing: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Optional["FsdpSettings"]:
        """None unless the launcher asked for FSDP; a UserError for options not supported."""
        if not _flag(env, "ACCELERATE_USE_FSDP"):
            return None
        where = "accelerate FSDP config"
        version = env.get("FSDP_VERSION", "1").strip()
        if version != "2":
            raise UserError(
                f"{where}: fsdp_version={version}: repo-rl uses FSDP2 (torch fully_shard); set fsdp_version: 2 "
                "(configs/accelerate/fsdp.yaml)"
            )
        if _flag(env, "FSDP_OFFLOAD_PARAMS"):
            raise UserError(f"{where}: fsdp_offload_params=true: not supported; use model.lora.r or train.gradient_checkpointing to save memory")
        policy = env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").strip() or "TRANSFORMER_BASED_WRAP"
        if policy not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP"):
            raise UserError(f"{where}: fsdp_auto_wrap_policy={policy}: expected TRANSFORMER_BASED_WRAP or NO_WRAP")
        classes = tuple(c.strip() for c in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
        return cls(
            reshard_after_forward=_flag(env, "FSDP_RESHARD_AFTER_FORWARD", True),
            wrap_classes=classes,
            wrap=policy != "NO_WRAP",
            activation_checkpointing=_flag(env, "FSDP_ACTIVATION_CHECKPOINTING"),
        )


@dataclass(frozen=True)
class DeepSpeedSettings:
    """The DeepSpeed options repo-rl honours, read from the environment ``accelerate launch`` sets."""

    stage: int
    config: dict
    """The DeepSpeed JSON config from ``deepspeed_config_file``, or {} for an inline accelerate config."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Optional["DeepSpeedSettings"]:
        """None unless the launcher asked for DeepSpeed; a UserError for options not supported."""
        if not _flag(env, "ACCELERATE_USE_DEEPSPEED"):
            return None
        where = "accelerate DeepSpeed config"
        config: dict = {}
        path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "").strip()
        if path and path.lower() != "none":
            import json

            try:
                config = json.loads(open(path, encoding="utf-8").read())
            except (OSError, ValueError) as e:
                raise UserError(f"{where}: deepspeed_config_file={path}: cannot read it ({e})") from None
            stage = config.get("zero_optimization", {}).get("stage", 0)
            for key in ("optimizer", "scheduler"):
                if key in config:
                    raise UserError(f"{where}: {path}: remove the {key!r} section; repo-rl's AdamW and train.lr_scheduler are used")
            for key in ("bf16", "fp16"):
                if config.get(key, {}).get("enabled") not in (None, False, "auto"):
                    raise UserError(f"{where}: {path}: {key}.enabled must be false or auto; repo-rl's precision is train.bf16")
        else:
            stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2").strip() or "2"
        try:
            stage = int(stage)
        except ValueError:
            raise UserError(f"{where}: zero_stage={stage}: expected 2 or 3") from None
        if stage not in (2, 3):
            raise UserError(f"{where}: zero_stage={stage}: expected 2 or 3 (for plain data parallel use configs/accelerate/multi_gpu_ddp.yaml)")
        for var, key in (("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "offload_optimizer_device"),
                         ("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "offload_param_device")):
            if env.get(var, "none").strip().lower() not in ("", "none"):
                raise UserError(f"{where}: {key}={env[var]}: offloading is not supported")
        if _flag(env, "ACCELERATE_DEEPSPEED_ZERO3_INIT"):
            raise UserError(f"{where}: zero3_init_flag=true: not supported; repo-rl loads the model, then DeepSpeed partitions it")
        if env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1").strip() not in ("", "1"):
            raise UserError(
                f"{where}: gradient_accumulation_steps={env['ACCELERATE_GRADIENT_ACCUMULATION_STEPS']}: set it to 1; "
                "repo-rl accumulates over the whole step (train.micro_batch_size)"
            )
        if env.get("ACCELERATE_GRADIENT_CLIPPING", "none").strip().lower() not in ("", "none"):
            raise UserError(f"{where}: gradient_clipping={env['ACCELERATE_GRADIENT_CLIPPING']}: leave it unset; use train.max_grad_norm")
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError("accelerate launch with DeepSpeed: deepspeed is not installed (pip install deepspeed)") from None
        return cls(stage=stage, config=config)

    def engine_config(self, world: int, max_grad_norm: float, hidden_size: Optional[int]) -> dict:
        """The config passed to ``deepspeed.initialize``: repo-rl calls forward, backward and step itself."""
        import copy as _copy

        cfg = _copy.deepcopy(self.config)
        cfg["train_micro_batch_size_per_gpu"] = 1  # unused: repo-rl builds its own micro-batches
        cfg["gradient_accumulation_steps"] = 1  # boundaries are set by hand, once per optimizer step
        cfg["train_batch_size"] = world
        cfg["gradient_clipping"] = float(max_grad_norm)
        cfg["bf16"], cfg["fp16"] = {"enabled": False}, {"enabled": False}
        cfg.setdefault("steps_per_print", 10**12)
        zero = cfg.setdefault("zero_optimization", {})
        zero["stage"] = self.stage
        if self.stage == 3 and hidden_size:
            # transformers' "auto" values: small tensors (norms, biases) stay whole on every rank.
            for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                               ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                               ("stage3_param_persistence_threshold", 10 * hidden_size)):
                if zero.get(key, "auto") == "auto":
                    zero[key] = value
        for key, value in list(zero.items()):
            if value == "auto":
                del zero[key]
        return cfg


def _check_launcher_env(env: Mapping[str, str]) -> None:
    mp = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower() or "no"
    if mp != "no":
        raise UserError(
            f"accelerate config: mixed_precision={mp}: set mixed_precision: 'no' in the accelerate config; "
            "repo-rl's precision is train.bf16 (and train.bf16_generation)"
        )


class Dist:
    """Rank information and the few collectives the trainer needs."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.state = None
        _check_launcher_env(os.environ)
        self.fsdp = FsdpSettings.from_env(os.environ)
        self.deepspeed = DeepSpeedSettings.from_env(os.environ)
        self.engine: Any = None
        """The DeepSpeed engine, once the trainer has built it."""
        if self.world > 1:
            from accelerate import PartialState

            # gloo on CPU, nccl on GPUs; accelerate reads the launcher's environment.
            self.state = PartialState(cpu=not torch.cuda.is_available())
            self.world, self.rank = self.state.num_processes, self.state.process_index

    @property
    def sharded(self) -> bool:
        """True when every rank must run the same forward/backward passes: FSDP and ZeRO-3 gather
        parameters per forward, and DeepSpeed's gradient reduction counts micro-steps."""
        return self.fsdp is not None or self.deepspeed is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        return None if self.state is None else self.state.device

    def shard(self, items: list) -> list:
        """This rank's contiguous share of a list whose length is a multiple of ``world``."""
        k = len(items) // self.world
        return items[self.rank * k : (self.rank + 1) * k]

    def sum_dict(self, values: dict[str, float]) -> dict[str, float]:
        """Sum a dict of numbers over ranks (keys must be the same on every rank)."""
        if self.world == 1 or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def gather(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a tensor's rank shards along dim 0, in rank order."""
        if self.world == 1:
            return t
        return torch.cat([x for x in self.gather(t.cpu())], 0)

    def max_int(self, n: int) -> int:
        """The largest of one integer over ranks."""
        if self.world == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def all_reduce_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum gradients over ranks in one flat buffer (FSDP and DeepSpeed reduce their own)."""
        if self.world == 1 or self.sharded:
            return
        params = [p for p in params if p.requires_grad]
        for p in params:  # every rank must contribute a buffer of the same layout
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    def on_every_rank(self, what: str, build: Callable[[], Any], close: Callable[[Any], None] = lambda _: None) -> Any:
        """``build()`` on every rank; when it fails on any rank, every rank stops with that rank's
        error (the failing rank re-raises its own exception), rather than the others waiting at
        their next collective. ``close`` releases what the ranks that succeeded built."""
        if self.world == 1:
            return build()
        built, error, failure = None, None, None
        try:
            built = build()
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            error, failure = f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e), e
        errors = self.gather(error)
        bad = [(r, msg) for r, msg in enumerate(errors) if msg is not None]
        if not bad:
            return built
        if built is not None:
            close(built)
        if failure is not None:
            raise failure
        rank, msg = bad[0]
        raise UserError(f"{what} failed to start on rank {rank} of {self.world}: {msg}")

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def exit_process(self) -> None:
        """After :meth:`close`, end a multi-process worker at once (no-op with one process).

        Every rank has passed the final barrier and destroyed its process group. Leaving without
        C++ static teardown avoids gloo's threads aborting an otherwise finished process
        ("terminate called without an active exception", seen occasionally on CPU).
        """
        if self.world > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    def close(self) -> None:
        """Tear the process group down; exiting with it alive can abort in gloo's threads."""
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------- FSDP
def fsdp_modules(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def fully_shard_model(model: torch.nn.Module, settings: FsdpSettings) -> torch.nn.Module:
    """Shard ``model`` in place with torch's ``fully_shard``: each wrap-class module, then the root.

    Gradients are summed over ranks, not averaged: the loss is already normalised by
    global totals (see :class:`Dist`).
    """
    from torch.distributed.fsdp import fully_shard

    units: list[torch.nn.Module] = []
    if settings.wrap:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        names = set(settings.wrap_classes or getattr(base, "_no_split_modules", None) or ())
        units = [m for m in model.modules() if type(m).__name__ in names]
        if settings.wrap_classes and not units:
            layers = sorted({type(m).__name__ for m in model.modules() if "Layer" in type(m).__name__})
            raise UserError(
                f"accelerate FSDP config: fsdp_transformer_layer_cls_to_wrap={','.join(settings.wrap_classes)}: "
                f"no such module in the model (its layer classes: {', '.join(layers) or 'none'})"
            )
    for m in units:
        fully_shard(m, reshard_after_forward=settings.reshard_after_forward)
    fully_shard(model, reshard_after_forward=settings.reshard_after_forward)
    for m in fsdp_modules(model):
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has neither AVG nor PREMUL_SUM
    return model


def _zero3_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


@contextlib.contextmanager
def _zero3_gathered(engine: Any, params: list[torch.nn.Parameter]) -> Iterator[None]:
    import deepspeed

    offload = getattr(engine.optimizer, "parameter_offload", None) or engine.optimizer
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        # ZeRO-3's per-module hooks fetch (and prefetch) parameters at every forward. With all of
        # them gathered the hooks have nothing to do, and would leave parameters "in flight" when
        # the block ends, so they are taken off while sampling and registered again after.
        for p in params:
            p.ds_active_sub_modules.clear()
        for hook in list(offload.forward_hooks) + list(offload.backward_hooks):
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            coordinator = getattr(offload, "param_coordinator", None)
            if coordinator is not None and not coordinator.is_invalid_trace():
                coordinator._invalidate_trace()  # noqa: SLF001 - the recorded fetch order no longer holds
            offload._register_deepspeed_module(offload.module)  # noqa: SLF001


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module, engine: Any = None) -> Iterator[None]:
    """All-gather a sharded model's parameters for the duration of the block (no-op otherwise).

    Inside, forward passes run no collectives, so each rank may call the model a different
    number of times (sampling stops when this rank's rows are done). Works for FSDP2 and,
    given its ``engine``, DeepSpeed ZeRO-3.
    """
    ds_params = _zero3_params(model)
    if ds_params:
        if engine is None:
            raise ValueError("a ZeRO-3 model needs its DeepSpeed engine to gather parameters")
        with _zero3_gathered(engine, ds_params):
            yield
        return
    mods = fsdp_modules(model)
    if not mods:
        yield
        return
    # The root is chosen at its first forward; settle it now, so the settings saved below
    # are the ones training runs with.
    model._get_fsdp_state()._lazy_init()  # noqa: SLF001
    states = [m._get_fsdp_state() for m in mods]  # noqa: SLF001
    saved = [(st._auto_reshard_after_forward, [g.post_forward_mesh_info for g in st._fsdp_param_groups]) for st in states]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
    for m in mods:
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
        for st, (auto, infos) in zip(states, saved):
            st._auto_reshard_after_forward = auto
            for g, info in zip(st._fsdp_param_groups, infos):
                g.post_forward_mesh_info = info


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state on rank 0 (empty dicts elsewhere); collective.

    The optimizer state is keyed by parameter name, so it loads under any parallel layout.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_named_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full, name-keyed optimizer state (see :func:`full_state_dicts`) into a sharded or plain model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------------- DeepSpeed
def deepspeed_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, settings: DeepSpeedSettings, world: int,
                     max_grad_norm: float) -> Any:
    """Wrap ``model`` and ``optimizer`` in a DeepSpeed ZeRO engine on the existing process group.

    Gradients are averaged over ranks by DeepSpeed; the trainer scales its loss by the world
    size so they are summed, as in data parallel and FSDP.
    """
    import deepspeed

    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=settings.engine_config(world, max_grad_norm, hidden), dist_init_required=False
    )
    return engine


def deepspeed_full_weights(engine: Any, is_main: bool) -> Optional[dict]:
    """The model's full state dict on rank 0 (gathered under ZeRO-3); collective."""
    model = engine.module
    params = _zero3_params(model)
    if not params:
        return None  # ZeRO-2: every rank holds the full, current weights
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()} if is_main else None
