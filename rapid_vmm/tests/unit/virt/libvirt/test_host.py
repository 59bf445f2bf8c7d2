"""Tests of rapid_vmm.virt.libvirt.host: bounded calls and reconnection.

The first part runs on the in-process ``test:///default``; the second on a
private libvirtd (:mod:`private_libvirtd`, never the system daemon) that
the tests kill, restart and freeze, through ``test+unix://`` where every
call is a real RPC.
"""

import threading
import time
import uuid

import libvirt
import pytest

from rapid_vmm import exception
from rapid_vmm import objects
from rapid_vmm.tests import fixtures as rapid_fixtures
from rapid_vmm.tests import private_libvirtd
from rapid_vmm.virt import driver as virt_driver
from rapid_vmm.virt.libvirt import driver as libvirt_driver
from rapid_vmm.virt.libvirt import host as vhost


def error(code, domain, message='test error'):
    exc = libvirt.libvirtError(message)
    exc.err = (code, domain, message, 2, '', None, None, -1, 0)
    return exc


class Events:
    """Collects ``(name, event)`` from a handler; waits for one."""

    def __init__(self):
        self.items = []
        self._cond = threading.Condition()

    def __call__(self, name, event):
        with self._cond:
            self.items.append((name, event))
            self._cond.notify_all()

    def wait_for(self, item, timeout=30.0, count=1):
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.items.count(item) < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f'{item} not seen: {self.items}'
                self._cond.wait(remaining)


# -- classification -----------------------------------------------------------


def test_connection_errors_are_those_of_the_rpc_layer():
    conn = libvirt.open('test:///default')
    try:
        assert vhost.is_connection_error(
            error(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC), conn)
        assert vhost.is_connection_error(
            error(libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_REMOTE),
            conn)
        # An internal error of a driver on a live connection is not.
        assert not vhost.is_connection_error(
            error(libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU),
            conn)
        assert not vhost.is_connection_error(
            error(libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_DOMAIN), conn)
        assert not vhost.is_connection_error(ValueError('x'), conn)
    finally:
        conn.close()
    # The same internal error on a closed connection is one: isAlive()
    # fails on it.
    assert vhost.is_connection_error(
        error(libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU), conn)


def test_a_driver_error_does_not_drop_the_connection():
    host = vhost.Host('test:///default')
    host.start()
    try:
        first = host.get_connection()

        def internal_error():
            raise error(libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU)

        with pytest.raises(libvirt.libvirtError):
            host.call(internal_error)
        assert host.get_connection() is first

        def rpc_error():
            raise error(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC)

        with pytest.raises(libvirt.libvirtError):
            host.call(rpc_error, conn=first)
        assert host.get_connection() is not first
    finally:
        host.stop()


# -- reconnection -------------------------------------------------------------


def _define(conn, name):
    return conn.defineXML(
        f"<domain type='test'><name>{name}</name><memory>131072</memory>"
        "<os><type>hvm</type></os></domain>")


def test_a_lost_connection_is_retired_with_its_callbacks():
    events = Events()
    host = vhost.Host('test:///default', event_handler=events)
    host.start()
    other = libvirt.open('test:///default')
    try:
        first = host.get_connection()
        host.mark_broken(first, reason='test')
        events.wait_for((None, 'reconnected'))
        second = host.get_connection()
        assert second is not first
        # The old connection was closed (its callbacks deregistered first).
        deadline = time.monotonic() + 5
        while True:
            try:
                first.getURI()
            except libvirt.libvirtError:
                break
            assert time.monotonic() < deadline, 'old connection still open'
            time.sleep(0.05)
        # One lifecycle event per change: only the new connection's
        # callback is registered.
        name = f'rvmm-host-{uuid.uuid4().hex[:8]}'
        dom = _define(other, name)
        dom.create()
        events.wait_for((name, 'started'))
        time.sleep(0.5)
        assert events.items.count((name, 'started')) == 1
        dom.destroy()
        dom.undefine()
    finally:
        other.close()
        host.stop()


def test_open_runs_outside_the_lock_and_has_a_deadline(monkeypatch):
    release = threading.Event()
    real_open = libvirt.open
    opened = []

    def slow_open(uri):
        opened.append(uri)
        release.wait(10)
        return real_open(uri)

    monkeypatch.setattr(vhost.libvirt, 'open', slow_open)
    host = vhost.Host('test:///default', call_timeout=1)
    try:
        errors = []

        def connect():
            try:
                host.get_connection()
            except exception.DriverError as exc:
                errors.append(exc)

        workers = [threading.Thread(target=connect) for _ in range(3)]
        started = time.monotonic()
        for worker in workers:
            worker.start()
        time.sleep(0.2)
        # The lock is free while libvirt.open() runs.
        assert host.state()['state'] == 'connecting'
        assert not host.connected
        assert time.monotonic() - started < 0.5
        for worker in workers:
            worker.join(5)
        # One attempt for all of them, cut at its deadline.
        assert len(opened) == 1
        assert time.monotonic() - started < 2
        assert len(errors) == 3
        assert all('no answer within 1 s' in str(e) for e in errors), errors
        assert not host.connected
    finally:
        release.set()
        host.stop()


# -- a private libvirtd: restarted, killed, frozen ----------------------------


pytestmark_libvirtd = pytest.mark.skipif(
    private_libvirtd.libvirtd_binary() is None,
    reason='libvirtd is not installed (tools/system/setup-host.sh)')


@pytest.fixture
def daemon():
    fixture = private_libvirtd.PrivateLibvirtd()
    fixture.setUp()
    yield fixture
    fixture.cleanUp()


@pytest.fixture
def driver_on(daemon):
    conf_fixture = rapid_fixtures.ConfFixture(**{
        'libvirt.connection_uri': daemon.uri,
        'libvirt.call_timeout': 2,
        'libvirt.reconnect_max_interval': 1})
    conf_fixture.setUp()
    events = Events()
    driver = libvirt_driver.LibvirtDriver(conf_fixture.conf)
    driver.set_event_callback(events)
    driver.init_host()
    driver.events = events
    yield driver
    driver.cleanup_host()
    conf_fixture.cleanUp()


def _vm(user_id):
    return objects.Vm(user_id=user_id,
                      name=f'rapid-vm-{user_id}-{uuid.uuid4().hex[:8]}',
                      vcpus=1, memory_mb=128, disk_gb=1)


def _create(driver, user_id):
    vm = _vm(user_id)
    made = driver.create(vm)
    return vm.copy(driver_id=made.driver_id, disk_path=made.disk_path)


@pytestmark_libvirtd
def test_events_arrive_after_libvirtd_restarts(daemon, driver_on):
    driver = driver_on
    first = _create(driver, 1)
    driver.events.wait_for((first.name, 'started'))
    assert driver.connection_state().startswith(f'connected to {daemon.uri}')
    daemon.kill()
    driver.events.wait_for((None, 'disconnected'), timeout=15)
    # While it is gone every call is answered at once with a typed error.
    for call in (lambda: driver.observe([first]), driver.list_instances,
                 driver.host_capacity, lambda: driver.suspend(first)):
        started = time.monotonic()
        with pytest.raises(exception.DriverError):
            call()
        assert time.monotonic() - started < 3
    assert driver.connection_state().startswith(
        f'reconnecting to {daemon.uri}')
    daemon.start()
    driver.events.wait_for((None, 'reconnected'), timeout=30)
    assert driver.connection_state().startswith(f'connected to {daemon.uri}')
    # The restarted test driver starts afresh: the record's domain is gone,
    # and libvirt says so by UUID.
    assert driver.observe([first])[first.name].presence == \
        virt_driver.Presence.ABSENT
    # Lifecycle events of the new connection reach the driver's callback.
    second = _create(driver, 2)
    driver.events.wait_for((second.name, 'started'))
    driver.suspend(second)
    driver.events.wait_for((second.name, 'suspended'))
    # A second restart works the same way.
    daemon.restart()
    driver.events.wait_for((None, 'reconnected'), timeout=30, count=2)
    third = _create(driver, 3)
    driver.events.wait_for((third.name, 'started'))


@pytestmark_libvirtd
def test_calls_never_hang_on_a_frozen_libvirtd(daemon, driver_on):
    driver = driver_on
    vm = _create(driver, 1)
    daemon.freeze()
    try:
        for name, call in (
                ('observe', lambda: driver.observe([vm])),
                ('list_instances', driver.list_instances),
                ('host_capacity', driver.host_capacity),
                ('suspend', lambda: driver.suspend(vm)),
                ('update_metadata',
                 lambda: driver.update_metadata(vm, {'vmm_id': 1})),
                ('destroy', lambda: driver.destroy(vm)),
                ('create', lambda: driver.create(_vm(2))),
                ('cleanup_orphans', lambda: driver.cleanup_orphans(set()))):
            started = time.monotonic()
            try:
                call()
            except exception.DriverError:
                pass
            else:
                assert name == 'cleanup_orphans', f'{name} answered'
            elapsed = time.monotonic() - started
            assert elapsed < 2 + 1.5, f'{name} took {elapsed:.1f} s'
        # Opening a connection has a deadline too.
        host = vhost.Host(daemon.uri, call_timeout=1)
        started = time.monotonic()
        with pytest.raises(exception.DriverError, match='no answer'):
            host.get_connection()
        assert time.monotonic() - started < 2.5
        host.stop()
    finally:
        daemon.thaw()
    deadline = time.monotonic() + 30
    while True:
        try:
            seen = driver.observe([vm])[vm.name]
            break
        except exception.DriverError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert seen.presence == virt_driver.Presence.OURS
    other = _create(driver, 3)
    driver.events.wait_for((other.name, 'started'))
