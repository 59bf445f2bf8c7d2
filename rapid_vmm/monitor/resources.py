"""Pieces shared by the host and GPU monitors.

Units, and :class:`ErrorLog`, which keeps a periodic sampler from filling the
log: a failure is logged when it starts (or changes), its recovery once, and
nothing in between, however many report cycles it lasts.
"""

from collections.abc import Callable
from collections.abc import Hashable
import logging as std_logging

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

    def forget(self,
               predicate: Callable[[Hashable], bool] | None = None) -> None:
        """Forget failures (all, or those whose key matches predicate)."""
        if predicate is None:
            self._active.clear()
            return
        for key in [k for k in self._active if predicate(k)]:
            del self._active[key]
