"""The Acceleration Server hand-shake: start_vm waits for the VM's AS.

The AS in a new VM registers (``as_register`` by its IP, which tells it
its user) and then confirms (``as_confirm``, ready or not). A start arms a
wait for its user before it boots the VM, so a confirmation that arrives
early is not lost, and waits for it with a bound; the agent's stop wakes
every wait.
"""

import threading

from rapid_vmm import exception


class AsHandshake:
    """Waits of starts for their AS, keyed by user id."""

    def __init__(self, stopping: threading.Event):
        self._stopping = stopping
        self._events: dict[int, threading.Event] = {}
        self._results: dict[int, bool] = {}
        self._lock = threading.Lock()

    def arm(self, user_id: int) -> None:
        """Expect a confirmation for ``user_id`` from now on."""
        with self._lock:
            self._results.pop(user_id, None)
            self._events[user_id] = threading.Event()

    def disarm(self, user_id: int) -> None:
        with self._lock:
            self._events.pop(user_id, None)
            self._results.pop(user_id, None)

    def confirm(self, user_id: int, ready: bool) -> bool:
        """Record the AS's answer; True when a start was waiting for it."""
        with self._lock:
            event = self._events.get(user_id)
            if event is None:
                return False
            self._results[user_id] = ready
        event.set()
        return True

    def waiting(self) -> list[int]:
        with self._lock:
            return sorted(self._events)

    def wait(self, user_id: int, timeout: float) -> None:
        """Wait up to ``timeout`` s for the AS of ``user_id``.

        :raises AsRegistrationTimeout: when it did not confirm in time.
        :raises AsNotReady: when it confirmed that it is not ready.
        :raises DriverError: when the agent stops meanwhile.
        """
        with self._lock:
            event = self._events.get(user_id)
        if event is None:
            raise exception.InternalError(
                action='wait for the Acceleration Server',
                reason=f'no wait armed for user {user_id}')
        event.wait(timeout)
        if self._stopping.is_set():
            raise exception.DriverError(action='start VM',
                                        reason='the agent is stopping')
        with self._lock:
            result = self._results.get(user_id)
        if result is None:
            raise exception.AsRegistrationTimeout(user_id=user_id,
                                                  timeout=timeout)
        if not result:
            raise exception.AsNotReady(user_id=user_id)

    def stop(self) -> None:
        """Wake every wait (the agent stops)."""
        with self._lock:
            events = list(self._events.values())
        for event in events:
            event.set()
