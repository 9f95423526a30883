"""Reward registry: built-in names plus custom rewards given as dotted import paths."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import io
import re
import sys
import threading
from collections.abc import Callable
from typing import Any

__all__ = [
    "RewardSpecError",
    "available_rewards",
    "import_path",
    "import_path_of",
    "load_reward",
    "register_reward",
    "resolve_reward",
]

RewardFn = Callable[..., Any]

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REGISTRY: dict[str, RewardFn | str] = {}
_LAZY_PATHS: dict[str, tuple[Any, str]] = {}  # name -> (object, "module:attr") of a lazy entry, once imported
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
        _LAZY_PATHS.pop(name, None)


def available_rewards() -> list[str]:
    """Sorted names of the registered built-in rewards."""
    with _LOCK:
        return sorted(_REGISTRY)


class _HeldStream:
    """Stands in for ``sys.stderr`` while a user module is imported.

    What the module writes is held back: if the import ends with ``SystemExit`` (argparse's
    usage and error, say) it is not shown, and its last line goes into our one-line message
    instead; otherwise it is written out when the import ends. Anything that kept a reference
    to this object (a logging handler set up at import) writes straight through afterwards.
    """

    _LIMIT = 64 * 1024

    def __init__(self, real: Any) -> None:
        self._real = real
        self._held: io.StringIO | None = io.StringIO()
        self._tail = ""

    def write(self, text: str) -> int:
        if self._held is None:
            return self._real.write(text)
        self._held.write(text)
        lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
        if lines:
            self._tail = lines[-1]
        if self._held.tell() > self._LIMIT:  # a chatty module: stop holding back
            self.release(show=True)
        return len(text)

    def flush(self) -> None:
        if self._held is None:
            self._real.flush()

    def release(self, show: bool) -> None:
        """Stop holding back; write out what was held when ``show``."""
        held, self._held = self._held, None
        if held is not None and show and held.getvalue():
            try:
                self._real.write(held.getvalue())
                self._real.flush()
            except (OSError, ValueError):
                pass

    @property
    def last_line(self) -> str:
        return self._tail

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, isatty, ...
        return getattr(self._real, name)


def _neutral_argv0(module_name: str) -> str:
    """The file of ``module_name`` when it can be found without running any code, else its name."""
    parent = module_name.rpartition(".")[0]
    if parent and parent not in sys.modules:
        return module_name
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError, AttributeError):
        return module_name
    origin = getattr(found, "origin", None) if found is not None else None
    return origin if isinstance(origin, str) and origin not in ("built-in", "frozen") else module_name


def _guarded_import(spec: str, module_name: str) -> Any:
    """``importlib.import_module(module_name)`` for user code, with its side effects contained.

    A reward module is imported with ``sys.argv`` set to ``[its file]`` (so argparse at import
    sees no command line: ours is not meant for it) and with what it prints to stderr held back
    until the import ends. ``sys.exit()`` at import (any ``SystemExit``) and any other
    ``BaseException`` but ``KeyboardInterrupt`` become a one-line :class:`RewardSpecError`.
    ``ModuleNotFoundError`` propagates (callers tell "not found" from "broken").
    """
    if module_name in sys.modules:
        return sys.modules[module_name]
    saved_argv, saved_stderr = getattr(sys, "argv", None), sys.stderr
    held = _HeldStream(saved_stderr)
    show = True
    try:
        sys.stderr = held
        sys.argv = [module_name]
        sys.argv = [_neutral_argv0(module_name)]
        return importlib.import_module(module_name)
    except SystemExit as e:
        show = False
        code = e.code if e.code is None or isinstance(e.code, int) else repr(e.code)
        said = f"; it printed: {held.last_line[:200]!r}" if held.last_line else ""
        raise _fail(
            spec,
            f"importing {module_name} exited (code {code}){said}; a reward module must not call sys.exit() "
            "or parse the command line (argparse) when imported: move that under `if __name__ == \"__main__\":`",
        ) from None
    except (KeyboardInterrupt, ModuleNotFoundError, Exception):
        raise
    except BaseException as e:  # noqa: BLE001 - e.g. GeneratorExit or a custom BaseException at import
        raise _fail(spec, f"importing module {module_name!r} failed: {type(e).__name__}: {e}") from None
    finally:
        if saved_argv is None:
            if hasattr(sys, "argv"):
                del sys.argv
        elif sys.argv is not saved_argv:
            sys.argv = saved_argv
        if sys.stderr is held:
            sys.stderr = saved_stderr
        held.release(show=show)


def _import_module(spec: str, module_name: str) -> Any:
    try:
        return _guarded_import(spec, module_name)
    except RewardSpecError:
        raise
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


def _resolve_path(spec: str) -> tuple[Any, str]:
    """Import the object named by ``"pkg.mod:attr"`` or ``"pkg.mod.attr"``; return it and its
    ``"pkg.mod:attr"`` path (the form a worker process re-imports it by)."""
    if ":" in spec:
        module_name, _, qualname = spec.partition(":")
        parts = qualname.split(".")
        if not module_name or not all(_IDENT_RE.match(p) for p in module_name.split(".")) or not all(
            _IDENT_RE.match(p) for p in parts
        ):
            raise _fail(spec, "expected 'package.module:function'")
        module = _import_module(spec, module_name)
        return _get_attr(spec, module, module_name, qualname), f"{module_name}:{qualname}"

    parts = spec.split(".")
    if len(parts) < 2 or not all(_IDENT_RE.match(p) for p in parts):
        raise _fail(spec, "expected 'package.module.function' or 'package.module:function'")
    # Import the longest importable module prefix, then walk the remaining attributes.
    first_missing: str | None = None
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            module = _guarded_import(spec, module_name)
        except RewardSpecError:
            raise
        except ModuleNotFoundError as e:
            missing = e.name or ""
            if missing == module_name or module_name.startswith(missing + "."):
                first_missing = first_missing or missing
                continue
            raise _fail(spec, f"importing module {module_name!r} failed: {type(e).__name__}: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise _fail(spec, f"importing module {module_name!r} failed: {type(e).__name__}: {e}") from None
        qualname = ".".join(parts[cut:])
        try:
            return _get_attr(spec, module, module_name, qualname), f"{module_name}:{qualname}"
        except RewardSpecError:
            if first_missing is None:
                raise
            break
    raise _fail(spec, f"module {first_missing or parts[0]!r} not found")


def import_path(path: str) -> Any:
    """Import the object named by ``path`` (``"pkg.mod:attr"`` or ``"pkg.mod.attr"``), with the
    import-time guards of :func:`load_reward`; raises :class:`RewardSpecError` (one line)."""
    return _resolve_path(path)[0]


def import_path_of(fn: Any) -> str | None:
    """The ``"module:qualname"`` path that re-imports ``fn`` in a fresh process, or None.

    None for lambdas, closures, objects of ``__main__`` and anything whose module attribute
    walk does not lead back to ``fn`` itself (instances, partials, bound methods, ...).
    """
    module_name = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(module_name, str) or not isinstance(qualname, str) or module_name == "__main__":
        return None
    if not all(_IDENT_RE.match(p) for p in module_name.split(".")) or not all(_IDENT_RE.match(p) for p in qualname.split(".")):
        return None  # "<lambda>", "f.<locals>.g", ...
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return f"{module_name}:{qualname}" if obj is fn else None


def resolve_reward(spec: str) -> tuple[RewardFn, str | None]:
    """:func:`load_reward`, plus the ``"module:qualname"`` path that re-imports the function in
    another process (None when there is none, e.g. a lambda or closure given to
    :func:`register_reward`)."""
    if not isinstance(spec, str):
        raise RewardSpecError(_one_line(f"reward spec must be a string, got {type(spec).__name__}"))
    spec = spec.strip()
    if not spec:
        raise RewardSpecError("reward spec is empty")
    with _LOCK:
        entry = _REGISTRY.get(spec)
        builtins = sorted(_REGISTRY)
        lazy = _LAZY_PATHS.get(spec)
    path: str | None
    if entry is not None:
        if isinstance(entry, str):
            fn, path = _resolve_path(entry)
            if callable(fn):
                with _LOCK:
                    if _REGISTRY.get(spec) == entry:
                        _REGISTRY[spec] = fn
                        _LAZY_PATHS[spec] = (fn, path)
        else:
            fn = entry
            path = lazy[1] if lazy is not None and lazy[0] is fn else import_path_of(fn)
    elif "." not in spec and ":" not in spec:
        close = difflib.get_close_matches(spec.lower(), builtins, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise _fail(
            spec,
            f"unknown reward; {hint}built-in rewards: {', '.join(builtins) or '(none)'}; "
            "custom rewards are given as 'package.module:function'",
        )
    else:
        fn, path = _resolve_path(spec)
    if not callable(fn):
        raise _fail(spec, f"object is not callable (got {type(fn).__name__})")
    return fn, path


def load_reward(spec: str) -> RewardFn:
    """Return the reward function named by ``spec``.

    ``spec`` is a built-in name (``"math"``, ``"numeric"``, ``"choice"``, or any name added
    with :func:`register_reward`) or a dotted import path ``"pkg.mod:func"`` /
    ``"pkg.mod.func"``; custom code is imported only here, when it is named. Raises
    :class:`RewardSpecError` with a one-line message otherwise.

    A module is imported with ``sys.argv`` set to ``[its file]``, so code that parses the
    command line at import does not see repo-rl's; ``sys.exit()`` at import becomes a
    one-line :class:`RewardSpecError` ("importing pkg.mod exited (code 0) ..."), and what the
    module printed to stderr before exiting is summed up in that line rather than shown.
    """
    return resolve_reward(spec)[0]
