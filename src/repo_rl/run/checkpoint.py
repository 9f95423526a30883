"""Atomic checkpoints and exact resume.

A checkpoint ``DIR/checkpoints/step-N/`` holds the model and tokenizer in Hugging Face
format (safetensors), ``optimizer.pt`` and ``scheduler.pt`` (tensors and plain data only,
loaded with ``torch.load(weights_only=True)``), ``rng.pt`` and ``trainer_state.json``.
It is written to a temporary sibling directory, fsynced, and renamed into place, so a run
killed while saving never leaves a directory named ``step-N`` that is incomplete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

STATE_FILE = "trainer_state.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": list(_py_state_to_list(random.getstate()))}


def _py_state_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(
    root: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: Optional[torch.optim.Optimizer],
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep: Optional[int] = None,
    model_state: Optional[dict[str, torch.Tensor]] = None,
    optimizer_state: Optional[dict[str, Any]] = None,
    extra_dirs: Optional[dict[str, Path]] = None,
) -> Path:
    """Write ``root/step-{step}`` atomically and prune old checkpoints to ``keep``.

    ``model_state`` and ``optimizer_state`` replace ``model.state_dict()`` and
    ``optimizer.state_dict()`` (used for the gathered state of a sharded model). With
    ``optimizer=None`` no ``optimizer.pt`` is written (DeepSpeed keeps its own, moved in
    from ``extra_dirs``: name -> directory, moved into the checkpoint before it is published).
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if model_state is None:
        model.save_pretrained(tmp, safe_serialization=True)
    else:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
    tokenizer.save_pretrained(tmp)
    if optimizer is not None:
        torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
    for name, src in (extra_dirs or {}).items():
        os.replace(src, tmp / name)
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1, sort_keys=True))
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        old = root / f".old-step-{step}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if keep is not None:
        for old_step in list_checkpoints(root)[:-keep]:
            shutil.rmtree(root / f"step-{old_step}", ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[int]:
    """Steps of complete checkpoints, ascending. Temporary and partial directories are ignored."""
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_checkpoint(root: Path) -> Optional[Path]:
    steps = list_checkpoints(root)
    return root / f"step-{steps[-1]}" if steps else None


def clean_partial(root: Path) -> int:
    """Remove leftovers of interrupted saves. Returns how many were removed."""
    n = 0
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-step-", ".old-step-", ".ds-step-")):
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n


def load_training_state(ckpt: Path, optimizer: Optional[torch.optim.Optimizer], scheduler: Any, model: Any = None) -> dict[str, Any]:
    """Load optimizer, scheduler and RNG state (no pickled code) and return the trainer state.

    ``optimizer=None`` leaves the optimizer alone (DeepSpeed restores its own).
    """
    if optimizer is not None:
        _load_optimizer_state(ckpt, optimizer, model)
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True))
    return json.loads((ckpt / STATE_FILE).read_text())


def _load_optimizer_state(ckpt: Path, optimizer: torch.optim.Optimizer, model: Any) -> None:
    """``optimizer.pt`` is either ``optimizer.state_dict()`` (keyed by parameter index) or the
    name-keyed full state a sharded run saves; the latter, and any load into a sharded model, need ``model``."""
    from .distributed import fsdp_modules, load_named_optimizer_state

    opt_state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    named = any(isinstance(k, str) for k in opt_state.get("state", {})) or any(
        isinstance(p, str) for g in opt_state.get("param_groups", []) for p in g.get("params", [])
    )
    if named or (model is not None and fsdp_modules(model)):
        if model is None:
            raise ValueError(f"{ckpt}: a name-keyed optimizer state needs the model to load")
        load_named_optimizer_state(model, optimizer, opt_state if named else _index_to_name_keys(opt_state, model))
    else:
        optimizer.load_state_dict(opt_state)


def _index_to_name_keys(opt_state: dict[str, Any], model: Any) -> dict[str, Any]:
    """``optimizer.state_dict()`` of an optimizer over the model's trainable parameters, keyed by name."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {
        "state": {names[i]: v for i, v in opt_state["state"].items()},
        "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in opt_state["param_groups"]],
    }


def load_model_weights(model: Any, ckpt: Path, adapter: bool = False) -> None:
    """Load safetensors weights from a checkpoint into an already-built model (or its LoRA adapter)."""
    from safetensors.torch import load_file

    if adapter:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
        return

    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt}: no safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings are saved once; anything else missing is an error.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    real_missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if real_missing or unexpected:
        raise RuntimeError(f"{ckpt}: checkpoint does not match the model (missing {real_missing[:3]}, unexpected {unexpected[:3]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
