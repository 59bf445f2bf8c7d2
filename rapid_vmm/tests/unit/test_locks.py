"""Tests of rapid_vmm.locks and rapid_vmm.handshake: bounded waits."""

import threading
import time

import pytest

from rapid_vmm import exception
from rapid_vmm import handshake
from rapid_vmm import locks


def test_a_busy_lock_is_a_typed_conflict_after_the_bound():
    user_locks = locks.UserLocks(timeout=0.2)
    held = threading.Event()
    release = threading.Event()

    def hold():
        with user_locks.hold(7):
            held.set()
            release.wait(5)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(5)
    started = time.monotonic()
    with pytest.raises(exception.VmStateConflict, match='busy'):
        with user_locks.hold(7, 'resize'):
            pass
    assert 0.15 < time.monotonic() - started < 2
    assert user_locks.busy(7)
    with user_locks.try_hold(7) as got:
        assert got is False
    with user_locks.hold(8):  # another user is not held up
        pass
    release.set()
    thread.join(5)
    with user_locks.try_hold(7) as got:
        assert got is True
    assert user_locks._entries == {}


def test_the_handshake_keeps_an_early_answer_and_times_out():
    stopping = threading.Event()
    hs = handshake.AsHandshake(stopping)
    hs.arm(5)
    assert hs.confirm(5, True) is True  # before the wait: kept
    hs.wait(5, 1)
    hs.disarm(5)
    assert hs.confirm(5, True) is False  # nobody waits
    hs.arm(6)
    with pytest.raises(exception.AsRegistrationTimeout):
        hs.wait(6, 0.1)
    hs.arm(6)
    hs.confirm(6, False)
    with pytest.raises(exception.AsNotReady):
        hs.wait(6, 1)


def test_the_agent_stop_wakes_a_wait():
    stopping = threading.Event()
    hs = handshake.AsHandshake(stopping)
    hs.arm(9)
    threading.Timer(0.1, lambda: (stopping.set(), hs.stop())).start()
    started = time.monotonic()
    with pytest.raises(exception.DriverError, match='stopping'):
        hs.wait(9, 30)
    assert time.monotonic() - started < 5
