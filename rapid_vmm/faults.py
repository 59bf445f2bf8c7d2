"""Fault-injection points for the crash tests; off unless a test sets them.

``RAPID_VMM_FAULT_POINT=<name>[,<name>...]`` in the agent's environment
makes it kill itself with SIGKILL when it reaches one of those points, as a
power cut would at that moment. The names are listed in :data:`POINTS`;
the tests start the agent with the variable set, restart it without, and
check that nothing was lost or leaked.
"""

import os
import signal

ENV = 'RAPID_VMM_FAULT_POINT'

#: Every point, in the order an operation reaches them.
POINTS = (
    'start.recorded',      # record (building) written, nothing made yet
    'start.created',       # instance created, id not yet recorded
    'start.addressed',     # IP found, DS registration queued
    'start.confirmed',     # AS confirmed, completion not yet recorded
    'resize.recorded',     # resize intent written, driver not called
    'resize.resized',      # driver resized, new size not yet recorded
    'remove.recorded',     # delete intent written, driver not called
    'remove.destroyed',    # instance destroyed, record not yet deleted
)

_armed = frozenset(name.strip() for name in os.environ.get(ENV, '').split(',')
                   if name.strip())


def point(name: str) -> None:
    """Die here (SIGKILL) if the point ``name`` is armed."""
    if name in _armed:
        os.kill(os.getpid(), signal.SIGKILL)
