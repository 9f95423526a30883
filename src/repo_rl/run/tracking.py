"""Metric sinks: ``metrics.jsonl`` (always), tensorboard / wandb / trackio (optional)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from ..errors import UserError


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class JsonlWriter:
    """Appends one JSON object per line and flushes it to disk at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = open(path, "a", encoding="utf-8")

    def write(self, obj: dict[str, Any]) -> None:
        self._fh.write(json.dumps({k: _clean(v) for k, v in obj.items()}, ensure_ascii=False) + "\n")
        self._fh.flush()

    def sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self.sync()
            self._fh.close()


def truncate_jsonl(path: Path, max_step: int) -> int:
    """Keep only rows with ``step <= max_step`` (used on resume). Returns rows dropped.

    A torn last line (a run killed mid-write) is dropped too.
    """
    if not path.exists():
        return 0
    kept, dropped = [], 0
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if isinstance(row, dict) and row.get("step", 0) <= max_step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)
    return dropped


class Trackers:
    """Optional experiment trackers, each imported only when asked for."""

    def __init__(self, names: Iterable[str], output_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        self._tb = self._wandb = self._trackio = None
        for name in names:
            if name == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise UserError("logging.report_to=tensorboard: install tensorboard (pip install tensorboard)") from None
                self._tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
            elif name == "wandb":
                try:
                    import wandb
                except ImportError:
                    raise UserError("logging.report_to=wandb: install wandb (pip install wandb)") from None
                self._wandb = wandb.init(name=run_name, config=config, dir=str(output_dir), resume="allow")
            elif name == "trackio":
                try:
                    import trackio
                except ImportError:
                    raise UserError("logging.report_to=trackio: install trackio (pip install trackio)") from None
                trackio.init(project="repo-rl", name=run_name, config=config)
                self._trackio = trackio

    def log(self, metrics: dict[str, Any], step: int) -> None:
        nums = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in nums.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(nums, step=step)
        if self._trackio is not None:
            self._trackio.log(nums, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._trackio is not None:
            self._trackio.finish()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue
    return rows


def check_writable(directory: Path, min_free_mb: Optional[int] = 50) -> None:
    """Fail early (before training) when the output directory cannot take our files."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--output-dir {directory}: not writable ({e.strerror or e})") from None
    if min_free_mb:
        st = os.statvfs(directory)
        free_mb = st.f_bavail * st.f_frsize / 2**20
        if free_mb < min_free_mb:
            raise UserError(f"--output-dir {directory}: only {free_mb:.0f} MiB free, need at least {min_free_mb} MiB")
