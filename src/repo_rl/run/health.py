"""A run's health: the thread count on shared CPUs, updates that blow the weights up, weights
checked before a save, and where to resume after a divergence."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch


def default_threads(device: str) -> Optional[int]:
    """``train.threads`` when unset: 1 on CPU, where small models lose nothing with one thread and
    two threads on shared cores were measured 10-30x slower when another process is busy (see
    BENCHMARKS.md); None (torch's choice) on a GPU or when ``OMP_NUM_THREADS`` is set."""
    if os.environ.get("OMP_NUM_THREADS") or device not in ("cpu", "auto") or (device == "auto" and torch.cuda.is_available()):
        return None
    return 1


def weight_norm(model: Any) -> float:
    """The L2 norm of all parameters (inf or NaN when a weight is)."""
    with torch.no_grad():
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.float()) for p in model.parameters()])))


def weights_finite(model: Any) -> bool:
    """No NaN or inf in any parameter."""
    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def exploded(norm: float, good_norm: Optional[float], limit: float) -> bool:
    """An update blew the weights up: a non-finite norm, or one above ``limit`` times the norm
    after the last good step (``train.max_weight_growth``; no reference yet: only non-finite)."""
    return not math.isfinite(norm) or (good_norm is not None and norm > limit * good_norm)


def _step_of(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[-1])


def good_checkpoint_hint(checkpoints: list[Path], first_bad_step: int) -> str:
    """Where to resume after a divergence: the latest checkpoint saved before the update that
    preceded the first bad step (that update may be the one that blew the weights up)."""
    good = [c for c in checkpoints if _step_of(c) <= first_bad_step - 2]
    fix = "a lower train.learning_rate or train.bf16=false"
    if not good:
        return f"no checkpoint predates it: start again with {fix}"
    return f"resume from the last good checkpoint, {good[-1]} (move the later ones aside), with --resume and {fix}"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve_bf16(setting: Any, device: Any) -> tuple[bool, str]:
    """``train.bf16`` in force on ``device`` and why, for the start line. ``auto`` is on where bf16
    is native: a CUDA device that supports it, or a CPU with avx512_bf16 or AMX (AVX2 alone
    emulates bf16, and an update ran ~9x slower there than in fp32)."""
    if isinstance(setting, bool):
        return setting, f"train.bf16={str(setting).lower()}"
    dev = getattr(device, "type", str(device))
    if dev == "cuda":
        ok = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        return ok, f"train.bf16=auto: this GPU {'supports' if ok else 'does not support'} bf16"
    flags = cpu_flags()
    native = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if native:
        return True, f"train.bf16=auto: this CPU has {' and '.join(native)}"
    if not flags:
        return False, "train.bf16=auto: the CPU's features are unknown here, so fp32 (set train.bf16=true to try bf16)"
    return False, "train.bf16=auto: this CPU has neither avx512_bf16 nor AMX, and emulated bf16 is much slower than fp32"


def quiet_deepspeed_probe() -> None:
    """On a Linux machine with no GPU device, tell DeepSpeed (imported by accelerate when installed)
    that it runs on the CPU, so it does not warn at every run that it could not find one. Call it
    before accelerate or transformers import DeepSpeed."""
    gpu_nodes = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dri/renderD128")
    if sys.platform.startswith("linux") and not any(os.path.exists(p) for p in gpu_nodes):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
