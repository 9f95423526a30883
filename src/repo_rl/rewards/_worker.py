"""Code that runs inside verifier worker processes.

Protocol (see :class:`repo_rl.rewards.pool.VerifierPool`): the worker answers ``("ready", pid)``
once set up, then serves ``("run", func_path, [(idx, args), ...])`` messages by calling
``func(*args)`` for each item in order and answering one ``("result", idx, status, value)``
message per item, so the parent always knows which item is in progress and can enforce a
per-item deadline by killing the process. ``("stop",)`` or a closed connection ends it.

This module must stay light to import: heavy libraries are imported by the task functions.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
from collections.abc import Callable
from functools import lru_cache
from multiprocessing.connection import Connection
from typing import Any

_MAX_ERROR_CHARS = 300


def _vm_size_bytes() -> int:
    """Current virtual memory size of this process (Linux), 0 when unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _apply_memory_limit(limit_mb: int | None) -> None:
    """Cap the address space at the current size plus ``limit_mb`` so blow-ups raise MemoryError."""
    if not limit_mb:
        return
    try:
        import resource
    except ImportError:  # pragma: no cover - non-POSIX
        return
    limit = _vm_size_bytes() + int(limit_mb) * 1024 * 1024
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):  # pragma: no cover - platform refuses
        pass


def describe_exception(exc: BaseException) -> str:
    """One-line, bounded description of an exception."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - str() of exotic objects can fail
        text = ""
    text = " ".join(text.split())[:_MAX_ERROR_CHARS]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def resolve_callable(path: str) -> Callable[..., Any]:
    """Import ``"package.module:qualname"`` and return the object it names."""
    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname:
        raise ValueError(f"expected 'module:function', got {path!r}")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{path!r} is not callable")
    return obj


def worker_main(conn: Connection, options: dict[str, Any]) -> None:
    """Entry point of a worker process: set up, report ready, then serve batches until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _apply_memory_limit(options.get("memory_limit_mb"))
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    for module in options.get("preload", ()):
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - reported per item when the task is resolved
            pass
    conn.send(("ready", os.getpid()))
    resolved: dict[str, Callable[..., Any]] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if not message or message[0] == "stop":
            return
        _, func_path, batch = message
        func: Callable[..., Any] | None = resolved.get(func_path)
        resolve_error = ""
        if func is None:
            try:
                func = resolved[func_path] = resolve_callable(func_path)
            except Exception as exc:  # noqa: BLE001
                resolve_error = f"cannot load task {func_path!r}: {describe_exception(exc)}"
        for idx, args in batch:
            if func is None:
                status, value = "error", resolve_error
            else:
                try:
                    status, value = "ok", func(*args)
                except Exception as exc:  # noqa: BLE001 - any failure is reported as a verifier error
                    status, value = "error", describe_exception(exc)
            try:
                conn.send(("result", idx, status, value))
            except (EOFError, OSError, BrokenPipeError):
                return
            except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable result
                conn.send(("result", idx, "error", f"unsendable result: {describe_exception(exc)}"))


# --------------------------------------------------------------------------- math-verify task


@lru_cache(maxsize=1)
def _configs() -> tuple[list[Any], list[Any]]:
    """(boxed-first config, default free-text config) for math_verify.parse."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    boxed = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    plain = [LatexExtractionConfig(), ExprExtractionConfig()]
    return boxed, plain


def _parse(text: str, config: list[Any]) -> list[Any]:
    from math_verify import parse

    return parse(text, extraction_config=config, parsing_timeout=None, raise_on_error=True)


def _has_expression(parsed: list[Any]) -> bool:
    return any(not isinstance(p, str) for p in parsed)


@lru_cache(maxsize=2048)
def _parse_gold(gold: str) -> tuple[Any, ...]:
    """Parse a reference answer (delimiters and boxes already stripped), cached per worker."""
    boxed, plain = _configs()
    parsed = _parse("\\boxed{" + gold + "}", boxed)
    if not _has_expression(parsed):
        alt = _parse(gold, plain)
        if _has_expression(alt):
            parsed = alt
    return tuple(parsed)


def verify_math(prediction: str, is_boxed: bool, gold: str) -> float:
    """Score one prediction against a reference answer with math-verify: 1.0 or 0.0.

    ``prediction`` is the content of the last box when ``is_boxed`` is true, otherwise the
    whole completion, from which math-verify extracts the answer itself. Exceptions propagate
    (the pool reports them as verifier errors).
    """
    from math_verify import verify

    gold_parsed = list(_parse_gold(gold))
    if not gold_parsed:
        raise ValueError("reference answer could not be parsed")
    boxed, plain = _configs()
    if is_boxed:
        pred = _parse("\\boxed{" + prediction + "}", boxed)
        if not _has_expression(pred):
            alt = _parse(prediction, plain)
            if _has_expression(alt):
                pred = alt
    else:
        pred = _parse(prediction, plain)
    if not pred:
        return 0.0
    ok = verify(gold_parsed, pred, timeout_seconds=None, raise_on_error=True)
    return 1.0 if ok else 0.0
