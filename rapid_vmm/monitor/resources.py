"""Pieces shared by the host and GPU monitors.

Units; :class:`ErrorLog`, which keeps a periodic sampler from filling the
log: a failure is logged when it starts (or changes), its recovery once, and
nothing in between, however many report cycles it lasts; and
:class:`DeadlineWorker`, which gives calls that may hang in a driver (NVML)
a deadline.
"""

from collections.abc import Callable
from collections.abc import Hashable
import logging as std_logging
import queue
import threading
import time
from typing import Any

MIB = 1024 * 1024
GIB = 1024 * MIB


def to_mib(n_bytes: int) -> int:
    """Whole MiB in ``n_bytes`` (what the agent calls ``_mb``)."""
    return int(n_bytes) // MIB


def to_gib(n_bytes: int) -> float:
    """GiB in ``n_bytes``, rounded to 2 decimals (what ``_gb`` means)."""
    return round(int(n_bytes) / GIB, 2)


class ErrorLog:
    """Logs each failure once per episode, and its recovery once.

    A failure is identified by a ``key`` (e.g. ``(gpu_index, 'power')``)
    and described by a short ``reason`` (e.g. the NVML error string). The
    first failure for a key is logged; the same reason again is not; a
    different reason is logged again; :meth:`recovered` logs once when a
    failing key works again, so an operator sees when it started and ended.

    Not thread-safe: each monitor calls it under its own lock.
    """

    def __init__(self, logger: std_logging.LoggerAdapter) -> None:
        self._logger = logger
        self._active: dict[Hashable, str] = {}

    def failed(self, key: Hashable, reason: str, msg: str, *args: object,
               level: int = std_logging.WARNING,
               exc_info: bool = False) -> bool:
        """Record a failure; log ``msg % args`` unless already logged.

        Returns True when the message was logged.
        """
        if self._active.get(key) == reason:
            return False
        self._active[key] = reason
        self._logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def recovered(self, key: Hashable, msg: str | None = None,
                  *args: object) -> bool:
        """Forget a failure of ``key``; log ``msg`` if it was failing."""
        if not self._active or key not in self._active:
            return False
        del self._active[key]
        if msg is not None:
            self._logger.info(msg, *args)
        return True

    def is_failing(self, key: Hashable) -> bool:
        return key in self._active

    @property
    def any_failing(self) -> bool:
        """True while some failure is active (a cheap test for hot paths:
        nothing to recover otherwise)."""
        return bool(self._active)

    def forget(self,
               predicate: Callable[[Hashable], bool] | None = None) -> None:
        """Forget failures (all, or those whose key matches predicate)."""
        if predicate is None:
            self._active.clear()
            return
        for key in [k for k in self._active if predicate(k)]:
            del self._active[key]


class CallTimeout(Exception):
    """A call did not return within its deadline; it may still be running
    on the worker thread."""


class _Job:
    __slots__ = ('args', 'done', 'error', 'fn', 'result')

    def __init__(self, fn: Callable, args: tuple) -> None:
        self.fn = fn
        self.args = args
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class DeadlineWorker:
    """Runs calls that may hang on one daemon thread, each with a deadline.

    A C call stuck in a driver cannot be interrupted from Python: it is
    left to finish on the worker thread, and until it returns every further
    :meth:`call` fails at once with :class:`CallTimeout` instead of queueing
    behind it (no pile of stuck threads, no caller waiting twice). The
    thread is a daemon, so a hung call never keeps the process from
    exiting. Thread-safe; one call runs at a time.
    """

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self._name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._busy_since: float | None = None

    def busy_for(self) -> float | None:
        """Seconds the running call has taken so far; None when idle."""
        since = self._busy_since
        return None if since is None else self._clock() - since

    def call(self, fn: Callable, timeout: float, *args: object) -> Any:
        """``fn(*args)`` on the worker thread, within ``timeout`` seconds.

        Returns its result or raises its exception.

        :raises CallTimeout: when it did not return in time (it goes on in
            the background), or when a previous call still runs.
        """
        with self._lock:
            busy = self.busy_for()
            if busy is not None:
                raise CallTimeout(f'the previous call has not returned '
                                  f'after {busy:.0f} s')
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            job = _Job(fn, args)
            self._busy_since = self._clock()
            self._jobs.put(job)
        if not job.done.wait(timeout):
            raise CallTimeout(f'no answer within {timeout:g} s')
        if job.error is not None:
            raise job.error
        return job.result

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job.result = job.fn(*job.args)
            except BaseException as exc:  # noqa: BLE001 - handed to caller
                job.error = exc
            finally:
                with self._lock:
                    self._busy_since = None
                job.done.set()
