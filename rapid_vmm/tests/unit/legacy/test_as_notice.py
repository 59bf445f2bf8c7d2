"""The notice to an AS before a resize, over both protocols."""

import socket
import threading
import time

import oslo_messaging as messaging
import pytest

from rapid_vmm import objects
from rapid_vmm import rpc
from rapid_vmm.legacy import as_notice
from rapid_vmm.legacy import codec
from rapid_vmm.tests import fixtures as rfix
from rapid_vmm.tests.unit.legacy import wire

VECTOR = '/work/shared/legacy-vectors/vmm_migration_as_request.bin'


@pytest.fixture
def conf_fixture():
    fixture = rfix.ConfFixture(**{'legacy.as_notice_timeout': 1})
    fixture.setUp()
    yield fixture
    fixture.cleanUp()


def vm(protocol, ip='127.0.0.1', user_id=7):
    return objects.Vm(user_id=user_id, name='v', vcpus=1, memory_mb=1024,
                      disk_gb=20, ip_address=ip, as_protocol=protocol)


def test_the_frame_is_the_original_one():
    try:
        with open(VECTOR, 'rb') as source:
            expected = source.read()
    except OSError:
        pytest.skip('no legacy vectors')
    assert as_notice.notice_frame(7) == expected


@pytest.mark.parametrize('answer,outcome', [
    (codec.OK, as_notice.Outcome.READY),
    (codec.ERROR, as_notice.Outcome.REFUSED),
    (5, as_notice.Outcome.NO_ANSWER),
])
def test_legacy_as_answers(conf_fixture, answer, outcome):
    with wire.OriginalAs(answer=answer) as fake_as:
        conf_fixture.conf.set_override('as_port', fake_as.port,
                                       group='legacy')
        result = as_notice.notify_migration(conf_fixture.conf,
                                            vm('legacy'))
        assert result is outcome
        assert bool(result) is (outcome is as_notice.Outcome.READY)
        assert fake_as.calls(codec.DS_MIGRATION_VM_AS) == [{'user_id': 7}]


def test_legacy_as_that_is_absent_or_slow_did_not_answer(conf_fixture):
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        free = probe.getsockname()[1]
    conf_fixture.conf.set_override('as_port', free, group='legacy')
    assert as_notice.notify_migration(conf_fixture.conf, vm('legacy')) is \
        as_notice.Outcome.NO_ANSWER
    with wire.OriginalAs(delay=3) as slow:
        conf_fixture.conf.set_override('as_port', slow.port, group='legacy')
        started = time.monotonic()
        assert as_notice.notify_migration(
            conf_fixture.conf, vm('legacy')) is as_notice.Outcome.NO_ANSWER
        assert time.monotonic() - started < 2.5


def test_vm_without_an_address_or_an_as(conf_fixture):
    assert as_notice.notify_migration(conf_fixture.conf,
                                      vm('legacy', ip=None)) is \
        as_notice.Outcome.NO_ANSWER
    outcome = as_notice.notify_migration(conf_fixture.conf, vm(None))
    assert outcome is as_notice.Outcome.NO_AS and bool(outcome)
    # A VM record (dict) works as well as a Vm.
    assert as_notice.notify_migration(
        conf_fixture.conf, {'user_id': 3, 'as_protocol': None}) is \
        as_notice.Outcome.NO_AS


class AsEndpoint:
    """What an AS registered over RPC may serve (the optional API)."""

    target = messaging.Target(version='1.0')

    def __init__(self, answer):
        self.answer = answer
        self.calls = []

    def prepare_migration(self, ctxt, user_id):
        self.calls.append(user_id)
        return self.answer


class Bare:
    target = messaging.Target(version='1.0')

    def ping(self, ctxt):
        return True


def rpc_as(conf, transport, endpoint, user_id=7):
    target = messaging.Target(topic=conf.legacy.as_rpc_topic,
                              server=str(user_id))
    server = messaging.get_rpc_server(
        transport, target, [endpoint],
        access_policy=messaging.DefaultRPCAccessPolicy)
    server.start()
    return server


@pytest.mark.parametrize('answer,outcome', [
    (True, as_notice.Outcome.READY), (False, as_notice.Outcome.REFUSED),
    ('yes', as_notice.Outcome.NO_ANSWER)])
def test_rpc_as(conf_fixture, answer, outcome):
    conf = conf_fixture.conf
    conf.set_override('as_rpc_topic', rfix.unique('as'), group='legacy')
    transport = rpc.get_transport(conf)
    endpoint = AsEndpoint(answer)
    server = rpc_as(conf, transport, endpoint)
    try:
        assert as_notice.notify_migration(conf, vm('rpc'), transport) is \
            outcome
        assert endpoint.calls == [7]
    finally:
        server.stop()
        server.wait()
        transport.cleanup()


def test_rpc_as_without_the_method_or_absent(conf_fixture):
    conf = conf_fixture.conf
    conf.set_override('as_rpc_topic', rfix.unique('as'), group='legacy')
    transport = rpc.get_transport(conf)
    server = rpc_as(conf, transport, Bare())
    try:
        assert as_notice.notify_migration(conf, vm('rpc'), transport) is \
            as_notice.Outcome.NO_ANSWER
        started = time.monotonic()
        assert as_notice.notify_migration(conf, vm('rpc', user_id=8),
                                          transport) is \
            as_notice.Outcome.NO_ANSWER
        assert time.monotonic() - started < 5
        assert as_notice.notify_migration(conf, vm('rpc')) is \
            as_notice.Outcome.NO_ANSWER  # no transport given
    finally:
        server.stop()
        server.wait()
        transport.cleanup()


def test_never_raises(conf_fixture, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError('bug')
    monkeypatch.setattr(as_notice.client, 'exchange', boom)
    assert as_notice.notify_migration(conf_fixture.conf, vm('legacy')) is \
        as_notice.Outcome.NO_ANSWER


def test_notices_run_in_parallel(conf_fixture):
    with wire.OriginalAs(delay=0.5) as fake_as:
        conf_fixture.conf.set_override('as_port', fake_as.port,
                                       group='legacy')
        results = []
        threads = [threading.Thread(target=lambda u=u: results.append(
            as_notice.notify_migration(conf_fixture.conf,
                                       vm('legacy', user_id=u))))
            for u in range(1, 6)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert time.monotonic() - started < 1.5
        assert results == [as_notice.Outcome.READY] * 5
