"""A small process pool for verification work with a hard per-item deadline.

Why processes: math-verify's own timeout relies on ``signal.alarm``, which only works on the
main thread and cannot interrupt long C-level computations (e.g. huge integer powers). Here
each item runs in a worker process; if an item overruns its deadline the worker is killed
(SIGKILL), reaped and replaced, the item is reported as a timeout, and the batch goes on.

Workers are fresh interpreters started the way multiprocessing's "spawn" method starts them
(fork+exec through ``subprocess``, safe in a multi-threaded torch parent; never a bare fork),
but without multiprocessing's re-import of the parent's ``__main__`` module, so scripts
without an ``if __name__ == "__main__":`` guard, ``python -`` and notebooks all work. The
parent and a worker talk over a socket pair wrapped in ``multiprocessing.connection``.
Items are sent in chunks (one message for many items) and the worker answers once per
item, so the parent always knows which item is running and since when. The time a worker
needs to start is not charged to any item.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Literal

__all__ = ["Outcome", "PoolCounters", "VerifierPool"]

Status = Literal["ok", "error", "timeout"]

_MAX_STARTUP_FAILURES = 3
_STARTUP_FAILED = "verifier workers failed to start (see the log for their exit codes)"
# Runs in the fresh interpreter: adopt the parent's sys.path, then serve on the inherited socket.
_BOOTSTRAP = (
    "import sys\n"
    "from multiprocessing.connection import Connection\n"
    "conn = Connection(int(sys.argv[1]))\n"
    "sys.path[:], options = conn.recv()\n"
    "from repo_rl.rewards._worker import worker_main\n"
    "worker_main(conn, options)\n"
)
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """Result of one item: ``status`` is "ok" (``value`` holds the result), "error" or "timeout"."""

    status: Status
    value: Any = None
    error: str | None = None
    elapsed: float = 0.0
    """Seconds between the worker starting the item and its result (or the kill); 0 if not pooled."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class PoolCounters:
    """Lifetime counters of a pool (diagnostics)."""

    items: int = 0
    errors: int = 0
    timeouts: int = 0
    crashes: int = 0
    started: int = 0


class _Worker:
    """One worker process plus the parent's bookkeeping for it."""

    def __init__(self, options: dict[str, Any]) -> None:
        parent_sock, child_sock = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, str(child_sock.fileno())],
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.sentinel = _open_pidfd(self.process.pid)
        self.ready = False
        self.started_at = time.monotonic()
        self.item_started = 0.0
        self.inflight: deque[int] = deque()
        try:
            self.conn.send((list(sys.path), options))
        except OSError:
            pass  # the worker already died; noticed on the first read

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def handles(self) -> list[Any]:
        """Objects to wait on: the connection and, where supported, a pidfd that fires on exit."""
        return [self.conn] if self.sentinel is None else [self.conn, self.sentinel]

    def drain(self, on_result: Callable[[_Worker, int, str, Any], None]) -> bool:
        """Handle every message waiting on the connection. Returns False once the worker is gone."""
        try:
            while self.conn.poll():
                message = self.conn.recv()
                if message[0] == "ready":
                    self.ready = True
                elif message[0] == "result":
                    _, idx, status, value = message
                    on_result(self, idx, status, value)
        except (EOFError, OSError):
            return False
        except Exception:  # noqa: BLE001 - an unreadable message: treat the worker as broken
            logger.warning("unreadable message from a verifier worker", exc_info=True)
            return False
        return self.is_alive()

    def kill(self) -> None:
        """SIGKILL the process (if still running), reap it and release its handles."""
        try:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self._close_handles()

    def request_stop(self) -> None:
        """Ask the worker to exit after its current item."""
        try:
            self.conn.send(("stop",))
        except (OSError, ValueError):
            pass

    def join(self, timeout: float) -> None:
        try:
            self.process.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            pass

    def exit_description(self) -> str:
        try:
            code = self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            code = None
        return f"verifier worker died (exit code {code})"

    def _close_handles(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        if self.sentinel is not None:
            try:
                os.close(self.sentinel)
            except OSError:
                pass
            self.sentinel = None


def _open_pidfd(pid: int) -> int | None:
    """A pidfd for ``pid`` (Linux >= 5.3), readable once the process exits; None if unsupported."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return opener(pid)
    except OSError:
        return None


def _shutdown(workers: list[_Worker], grace: float = 1.0) -> None:
    """Stop every worker in ``workers`` (emptied in place); used by close(), GC and interpreter exit."""
    stopping = list(workers)
    workers.clear()
    for worker in stopping:
        worker.request_stop()
    deadline = time.monotonic() + grace
    for worker in stopping:
        worker.join(deadline - time.monotonic())
        worker.kill()


_POOLS: weakref.WeakSet[VerifierPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child must not touch its parent's workers: forget them and renew the locks."""
    for pool in list(_POOLS):
        pool._forget_workers()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class VerifierPool:
    """Runs ``module:function`` tasks in worker processes with a hard deadline per item.

    Args:
        num_workers: number of worker processes (started lazily, at most one per pending item).
        timeout: default per-item deadline in seconds.
        chunk_size: maximum number of items sent to a worker in one message.
        startup_timeout: seconds a new worker may take to become ready (not charged to items).
        memory_limit_mb: extra address space a worker may allocate beyond its size at start
            (Linux/POSIX); a blow-up then raises MemoryError (reported as an error). None: no cap.
        preload: modules each worker imports before reporting ready.

    The pool is thread-safe (calls are serialised) and may be used from any thread. It is shut
    down by :meth:`close`, when it is garbage collected, and at interpreter exit; a closed pool
    restarts its workers on the next call.
    """

    def __init__(
        self,
        num_workers: int = 1,
        timeout: float = 5.0,
        *,
        chunk_size: int = 16,
        startup_timeout: float = 60.0,
        memory_limit_mb: int | None = 4096,
        preload: Sequence[str] = (),
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.num_workers = int(num_workers)
        self.timeout = timeout
        self.chunk_size = int(chunk_size)
        self.startup_timeout = float(startup_timeout)
        self.memory_limit_mb = memory_limit_mb
        self.preload = tuple(preload)
        self.counters = PoolCounters()
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        _POOLS.add(self)

    # ----------------------------------------------------------------------------- properties

    @property
    def timeout(self) -> float:
        """Default per-item deadline in seconds."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        value = float(value)
        if not value > 0 or math.isinf(value):
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {value}")
        self._timeout = value

    def worker_pids(self) -> list[int]:
        """PIDs of the live worker processes."""
        with self._lock:
            return [w.pid for w in self._workers if w.is_alive()]

    # ----------------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop all workers. The pool stays usable: a later call starts new ones."""
        with self._lock:
            _shutdown(self._workers)

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle the configuration only; the copy starts its own workers."""
        return (
            _rebuild_pool,
            (
                self.num_workers,
                self.timeout,
                self.chunk_size,
                self.startup_timeout,
                self.memory_limit_mb,
                self.preload,
            ),
        )

    def _forget_workers(self) -> None:
        self._workers.clear()
        self._lock = threading.Lock()

    def _spawn(self) -> _Worker:
        worker = _Worker({"memory_limit_mb": self.memory_limit_mb, "preload": self.preload})
        self.counters.started += 1
        return worker

    # ----------------------------------------------------------------------------- running

    def run(self, func: str, items: Sequence[Sequence[Any]], *, timeout: float | None = None) -> list[Outcome]:
        """Run ``func(*item)`` for every item; return one :class:`Outcome` per item, in order.

        ``func`` is a ``"module:qualname"`` path importable in the workers. Each item gets at
        most ``timeout`` seconds (default: the pool's) from the moment the worker starts it.
        """
        deadline = self.timeout if timeout is None else float(timeout)
        if not deadline > 0:
            raise ValueError(f"timeout must be > 0, got {deadline}")
        payload = [tuple(item) for item in items]
        if not payload:
            return []
        with self._lock:
            try:
                results = self._run_locked(func, payload, deadline)
            except BaseException:
                # Interrupted mid-batch (e.g. KeyboardInterrupt): busy workers would later answer
                # items of this batch, so they are discarded.
                for worker in [w for w in self._workers if w.inflight]:
                    worker.inflight.clear()
                    worker.kill()
                    self._workers.remove(worker)
                raise
            self.counters.items += len(results)
            self.counters.errors += sum(r.status == "error" for r in results)
            self.counters.timeouts += sum(r.status == "timeout" for r in results)
        return results

    def _run_locked(self, func: str, payload: list[tuple[Any, ...]], deadline: float) -> list[Outcome]:
        n = len(payload)
        results: list[Outcome | None] = [None] * n
        pending: deque[int] = deque(range(n))
        for stale in [w for w in self._workers if not w.is_alive()]:
            stale.kill()
            self._workers.remove(stale)
        want = min(self.num_workers, n)
        while len(self._workers) < want:
            self._workers.append(self._spawn())
        active: list[_Worker] = self._workers[:want]
        startup_failures = 0

        def on_result(worker: _Worker, idx: int, status: str, value: Any) -> None:
            now = time.monotonic()
            elapsed = now - worker.item_started
            if idx in worker.inflight:
                worker.inflight.remove(idx)
            worker.item_started = now
            if status == "ok":
                results[idx] = Outcome("ok", value, None, elapsed)
            else:
                results[idx] = Outcome("error", None, str(value), elapsed)

        def replace(worker: _Worker, requeue: bool) -> None:
            """Kill ``worker``; requeue its unfinished items; start a substitute when still useful."""
            if requeue:
                pending.extendleft(reversed(worker.inflight))
            worker.inflight.clear()
            worker.kill()
            pos = active.index(worker)
            if worker in self._workers:
                self._workers.remove(worker)
            if startup_failures >= _MAX_STARTUP_FAILURES and not worker.ready:
                active.pop(pos)
                return
            substitute = self._spawn()
            self._workers.append(substitute)
            active[pos] = substitute

        def fail_head(worker: _Worker, status: Status, message: str) -> None:
            if worker.inflight:
                elapsed = time.monotonic() - worker.item_started
                results[worker.inflight.popleft()] = Outcome(status, None, message, elapsed)

        while pending or any(w.inflight for w in active):
            if not active:
                while pending:
                    results[pending.popleft()] = Outcome("error", None, _STARTUP_FAILED)
                break
            # Hand work to idle, ready workers.
            for worker in active:
                if not pending:
                    break
                if not worker.ready or worker.inflight:
                    continue
                size = min(self.chunk_size, max(1, math.ceil(len(pending) / len(active))), len(pending))
                chunk = [pending.popleft() for _ in range(size)]
                try:
                    worker.conn.send(("run", func, [(i, payload[i]) for i in chunk]))
                except (OSError, ValueError):
                    pending.extendleft(reversed(chunk))
                    replace(worker, requeue=False)
                    break
                except Exception as exc:  # noqa: BLE001 - unpicklable arguments: nothing was sent
                    for i in chunk:
                        results[i] = Outcome("error", None, f"cannot send item: {type(exc).__name__}: {exc}")
                    continue
                worker.inflight.extend(chunk)
                worker.item_started = time.monotonic()

            # Wait for messages, deaths, or the nearest deadline.
            due = [w.started_at + self.startup_timeout for w in active if not w.ready]
            due += [w.item_started + deadline for w in active if w.ready and w.inflight]
            if not due:
                continue
            wait_s = max(0.0, min(due) - time.monotonic())
            handles = {h: w for w in active for h in w.handles()}
            fired = {handles[h] for h in wait(list(handles), timeout=wait_s)}

            for worker in list(active):
                if worker not in fired and worker.ready and not worker.inflight:
                    continue
                alive = worker.drain(on_result)
                now = time.monotonic()
                if not alive:
                    if not worker.ready:
                        startup_failures += 1
                        logger.warning("%s during startup", worker.exit_description())
                    elif worker.inflight:
                        self.counters.crashes += 1
                        message = worker.exit_description()
                        logger.warning("%s while verifying an item", message)
                        fail_head(worker, "error", message)
                    replace(worker, requeue=True)
                elif not worker.ready and now >= worker.started_at + self.startup_timeout:
                    startup_failures += 1
                    logger.warning("verifier worker not ready after %gs", self.startup_timeout)
                    replace(worker, requeue=True)
                elif worker.inflight and now >= worker.item_started + deadline:
                    fail_head(worker, "timeout", f"exceeded the {deadline:g}s deadline")
                    replace(worker, requeue=True)

        return [r if r is not None else Outcome("error", None, "no result") for r in results]


def _rebuild_pool(
    num_workers: int,
    timeout: float,
    chunk_size: int,
    startup_timeout: float,
    memory_limit_mb: int | None,
    preload: tuple[str, ...],
) -> VerifierPool:
    return VerifierPool(
        num_workers,
        timeout,
        chunk_size=chunk_size,
        startup_timeout=startup_timeout,
        memory_limit_mb=memory_limit_mb,
        preload=preload,
    )
