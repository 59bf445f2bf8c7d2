"""Per-user locks with bounded waits.

Lifecycle operations on one user's VM are serialised by that user's lock.
A wait for it is bounded: a request that cannot get the lock in time gets
:class:`~rapid_vmm.exception.VmStateConflict` ("busy") instead of waiting
forever behind a stuck operation. Periodic work (reconciliation, helpers)
takes locks without waiting and skips a VM that a request is working on.
"""

from collections.abc import Iterator
import contextlib
import threading

from rapid_vmm import exception


class _Entry:
    __slots__ = ('lock', 'users')

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class UserLocks:
    """One lock per user id, created on demand and dropped when unused.

    :param timeout: seconds a request waits for a busy lock by default.
    """

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._entries: dict[int, _Entry] = {}
        self._guard = threading.Lock()

    def _enter(self, user_id: int) -> _Entry:
        with self._guard:
            entry = self._entries.get(user_id)
            if entry is None:
                entry = self._entries[user_id] = _Entry()
            entry.users += 1
            return entry

    def _leave(self, user_id: int, entry: _Entry) -> None:
        with self._guard:
            entry.users -= 1
            if entry.users == 0:
                self._entries.pop(user_id, None)

    @contextlib.contextmanager
    def hold(self, user_id: int, action: str = 'change',
             timeout: float | None = None) -> Iterator[None]:
        """Hold the user's lock, waiting at most ``timeout`` seconds.

        :raises VmStateConflict: when the lock stays busy that long.
        """
        limit = self.timeout if timeout is None else timeout
        entry = self._enter(user_id)
        try:
            if not entry.lock.acquire(timeout=max(limit, 0)):
                raise exception.VmStateConflict(
                    action=action, user_id=user_id,
                    state=f'busy with another request (waited {limit:g} s)')
            try:
                yield
            finally:
                entry.lock.release()
        finally:
            self._leave(user_id, entry)

    @contextlib.contextmanager
    def try_hold(self, user_id: int) -> Iterator[bool]:
        """Hold the lock if it is free: yields True, else False at once."""
        entry = self._enter(user_id)
        try:
            acquired = entry.lock.acquire(blocking=False)
            try:
                yield acquired
            finally:
                if acquired:
                    entry.lock.release()
        finally:
            self._leave(user_id, entry)

    def busy(self, user_id: int) -> bool:
        """Whether a request holds the user's lock now (diagnostics)."""
        with self._guard:
            entry = self._entries.get(user_id)
            return entry is not None and entry.lock.locked()
