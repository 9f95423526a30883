"""A run directory's life: which config a resume uses, which changes it refuses, the lock that
keeps a second run out, the fingerprint of the training data, and stopping at a step boundary
on SIGTERM / Ctrl-C.

Resume follows TRL's ``resume_from_checkpoint=True``: ``repo-rl train -o DIR --resume`` takes
``DIR/config.yaml`` (the config the run was started with) as its base, with ``--config`` and the
command-line overrides on top. A change to a key that says what the run *is*
(:data:`IDENTITY_KEYS`: the model, the method, the group size, the data, the seed ...) is refused
unless ``--allow-config-change`` says it is meant; other keys (``train.max_steps``, the learning
rate, logging, evaluation ...) may change and take effect, and ``config.yaml`` is rewritten with
what the run now uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from ..errors import UserError

#: Config keys (or whole sections) whose change makes a resumed run another run.
IDENTITY_KEYS = (
    "model.name_or_path",
    "model.lora",
    "model.dtype",
    "model.chat_template",
    "model.system_prompt",
    "algorithm.method",
    "algorithm.num_generations",
    "algorithm.loss_type",
    "train.prompts_per_step",
    "train.seed",
    "data.train_files",
    "data.fields",
    "data.split",
    "data.shuffle",
    "reward.funcs",
    "reward.weights",
    "reward.by_domain",
    "reward.judge.model",
    "reward.judge.template",
    "reward.judge.template_file",
    "reward.judge.verdict",
    "toyworld",
)

ALLOW_FLAG = "--allow-config-change"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def identity_changes(saved: dict[str, Any], now: dict[str, Any], keys: Iterable[str] = IDENTITY_KEYS) -> list[str]:
    """Dotted keys under ``keys`` whose value differs between two config dicts (sorted)."""
    a, b = _flatten(saved), _flatten(now)
    prefixes = tuple(keys)
    changed = []
    for k in sorted(set(a) | set(b)):
        if any(k == p or k.startswith(p + ".") for p in prefixes) and a.get(k) != b.get(k):
            changed.append(k)
    return changed


def saved_config(out: Path) -> Optional[dict[str, Any]]:
    """``DIR/config.yaml`` as a dict, or None when the directory holds no run."""
    path = out / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read the run's config ({type(e).__name__}); fix or remove the file") from None
    return data if isinstance(data, dict) else None


def _absolute(value: Any) -> Any:
    """A path (or a list of them) made absolute when it names an existing local file or directory;
    anything else (``toyworld:train``, a hub id, a ``datasets`` name) unchanged."""
    if isinstance(value, list):
        return [_absolute(v) for v in value]
    if isinstance(value, str) and value and ":" not in value.split("/")[0]:
        p = Path(value).expanduser()
        if not p.is_absolute() and p.exists():
            return str(p.resolve())
    return value


def absolute_paths(cfg: Any) -> Any:
    """A copy of ``cfg`` whose local paths (data files, model directory, judge template files) are
    absolute, as the run directory's ``config.yaml`` keeps them: a run then resumes from any working
    directory. Dotted ``pkg.mod:fn`` rewards still import from the Python path."""
    import copy

    out = copy.deepcopy(cfg)
    out.data.train_files = _absolute(out.data.train_files)
    out.data.eval_files = _absolute(out.data.eval_files)
    out.model.name_or_path = _absolute(out.model.name_or_path)
    for judge in (out.reward.judge, out.repo.judge):
        judge.template_file = _absolute(judge.template_file)
    return out


def load_resume_config(out: Path, config_path: Optional[str], overrides: list[str], allow_change: bool):
    """The config of ``repo-rl train -o OUT --resume``: ``OUT/config.yaml``, then ``--config``
    (when given), then the overrides; identity changes refused unless ``allow_change``."""
    from ..config import build_config, load_yaml, merge_config

    saved = saved_config(out)
    if saved is None:
        raise UserError(f"--resume: {out} holds no run (no config.yaml); start it without --resume")
    base = saved
    if config_path:
        base = merge_config(saved, load_yaml(config_path))
    cfg = build_config(base, overrides)
    if not allow_change:
        # A relative path given again is the same run when it names the same file from here.
        # (config.yaml of runs from before paths were saved absolute is read from here too.)
        changed = identity_changes(absolute_paths(build_config(saved)).to_dict(), absolute_paths(cfg).to_dict())
        if changed:
            shown = ", ".join(f"{k} ({_flatten(saved).get(k)!r} -> {_flatten(cfg.to_dict()).get(k)!r})" for k in changed[:3])
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            raise UserError(
                f"--resume: {shown}{more} differ from the run in {out}; that makes it another run. "
                f"Start a new output directory, or pass {ALLOW_FLAG} if the change is meant"
            )
    return cfg


def data_fingerprint(examples: Iterable[Any]) -> str:
    """SHA-256 over the training examples' contents (id, prompt, answer, solution, domain), in order."""
    h = hashlib.sha256()
    for e in examples:
        row = [getattr(e, k, None) for k in ("id", "prompt", "answer", "solution", "domain")]
        h.update(json.dumps(row, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


class RunLock:
    """An exclusive ``flock`` on ``DIR/.lock``: a second run on the same directory stops at once.

    The OS drops the lock when the process ends, however it ends, so a killed run never leaves
    it stuck."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".lock"
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = ""
            try:
                holder = self.path.read_text().strip()
            except OSError:
                pass
            who = f" (process {holder})" if holder else ""
            raise UserError(f"--output-dir {self.path.parent}: another run is writing to it{who}; wait for it or choose another directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class StopSignals:
    """SIGTERM (how clusters preempt) and Ctrl-C: the first one asks the run to stop after the
    step in progress (it then saves a checkpoint of the completed steps); a second one stops at
    once, as before. Installed only in the main thread."""

    NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self, say=None) -> None:
        self.requested: Optional[int] = None
        self._old: dict[int, Any] = {}
        self._say = say

    def __enter__(self) -> "StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.NAMES:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signum
        if self._say is not None:
            self._say(f"repo-rl: {self.NAMES[signum]}: stopping after the current step with a checkpoint (again: stop now)")

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


class StopRequested(Exception):
    """The run stopped at a step boundary on a signal, after saving a checkpoint."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum = signum
        self.step = step
        super().__init__(f"stopped on {StopSignals.NAMES.get(signum, signum)} after step {step}")
