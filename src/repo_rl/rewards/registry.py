"""Reward registry: built-in names plus custom rewards given as dotted import paths."""

from __future__ import annotations

import difflib
import importlib
import re
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["RewardSpecError", "available_rewards", "load_reward", "register_reward"]

RewardFn = Callable[..., Any]

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REGISTRY: dict[str, RewardFn | str] = {}
_LOCK = threading.Lock()


class RewardSpecError(ValueError):
    """A reward spec that cannot be resolved. The message is one line naming the spec and the problem."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(spec: str, problem: str) -> RewardSpecError:
    return RewardSpecError(_one_line(f"reward {spec!r}: {problem}"))


def register_reward(name: str, fn: RewardFn | str, *, overwrite: bool = False) -> None:
    """Register ``fn`` under the built-in name ``name`` (e.g. ``"toy"``).

    ``fn`` is a callable, or a ``"module:attr"`` path that is imported on the first
    :func:`load_reward` of ``name``. Re-registering a name raises unless ``overwrite`` is set
    (registering the very same object again is a no-op).
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"invalid reward name {name!r}: use letters, digits, '_' or '-' (no dots or colons)")
    if not callable(fn) and not isinstance(fn, str):
        raise TypeError(f"reward {name!r} must be callable or a 'module:attr' string, got {type(fn).__name__}")
    with _LOCK:
        current = _REGISTRY.get(name)
        if current is not None and current is not fn and not overwrite:
            raise ValueError(f"reward {name!r} is already registered (pass overwrite=True to replace it)")
        _REGISTRY[name] = fn


def available_rewards() -> list[str]:
    """Sorted names of the registered built-in rewards."""
    with _LOCK:
        return sorted(_REGISTRY)


def _import_module(spec: str, module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise _fail(spec, f"module {missing!r} not found") from None
        raise _fail(spec, f"importing module {module_name!r} failed: {type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any failure of user code at import time
        raise _fail(spec, f"importing module {module_name!r} failed: {type(e).__name__}: {e}") from None


def _get_attr(spec: str, module: Any, module_name: str, qualname: str) -> Any:
    obj = module
    owner = module_name
    for part in qualname.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise _fail(spec, f"{owner!r} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
        owner = f"{owner}.{part}"
    return obj


def _resolve_path(spec: str) -> Any:
    """Import the object named by ``"pkg.mod:attr"`` or ``"pkg.mod.attr"``."""
    if ":" in spec:
        module_name, _, qualname = spec.partition(":")
        parts = qualname.split(".")
        if not module_name or not all(_IDENT_RE.match(p) for p in module_name.split(".")) or not all(
            _IDENT_RE.match(p) for p in parts
        ):
            raise _fail(spec, "expected 'package.module:function'")
        module = _import_module(spec, module_name)
        return _get_attr(spec, module, module_name, qualname)

    parts = spec.split(".")
    if len(parts) < 2 or not all(_IDENT_RE.match(p) for p in parts):
        raise _fail(spec, "expected 'package.module.function' or 'package.module:function'")
    # Import the longest importable module prefix, then walk the remaining attributes.
    first_missing: str | None = None
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            missing = e.name or ""
            if missing == module_name or module_name.startswith(missing + "."):
                first_missing = first_missing or missing
                continue
            raise _fail(spec, f"importing module {module_name!r} failed: {type(e).__name__}: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise _fail(spec, f"importing module {module_name!r} failed: {type(e).__name__}: {e}") from None
        try:
            return _get_attr(spec, module, module_name, ".".join(parts[cut:]))
        except RewardSpecError:
            if first_missing is None:
                raise
            break
    raise _fail(spec, f"module {first_missing or parts[0]!r} not found")


def load_reward(spec: str) -> RewardFn:
    """Return the reward function named by ``spec``.

    ``spec`` is a built-in name (``"math"``, ``"numeric"``, ``"choice"``, or any name added
    with :func:`register_reward`) or a dotted import path ``"pkg.mod:func"`` /
    ``"pkg.mod.func"``; custom code is imported only here, when it is named. Raises
    :class:`RewardSpecError` with a one-line message otherwise.
    """
    if not isinstance(spec, str):
        raise RewardSpecError(_one_line(f"reward spec must be a string, got {type(spec).__name__}"))
    spec = spec.strip()
    if not spec:
        raise RewardSpecError("reward spec is empty")
    with _LOCK:
        entry = _REGISTRY.get(spec)
        builtins = sorted(_REGISTRY)
    if entry is not None:
        if isinstance(entry, str):
            fn = _resolve_path(entry)
            if callable(fn):
                with _LOCK:
                    if _REGISTRY.get(spec) == entry:
                        _REGISTRY[spec] = fn
        else:
            fn = entry
    elif "." not in spec and ":" not in spec:
        close = difflib.get_close_matches(spec.lower(), builtins, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise _fail(
            spec,
            f"unknown reward; {hint}built-in rewards: {', '.join(builtins) or '(none)'}; "
            "custom rewards are given as 'package.module:function'",
        )
    else:
        fn = _resolve_path(spec)
    if not callable(fn):
        raise _fail(spec, f"object is not callable (got {type(fn).__name__})")
    return fn
