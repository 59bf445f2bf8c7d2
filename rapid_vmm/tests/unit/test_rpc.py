"""Tests of rapid_vmm.rpc: the ``remotable`` decorator over real RPC.

A tiny endpoint is served on oslo.messaging's in-memory kombu transport
and called with a plain RPC client, as the SLAM or DS would call the VMM.
"""

import logging
import threading
import time

import oslo_messaging as messaging
from oslo_messaging.rpc import dispatcher as rpc_dispatcher
import pytest

from rapid_vmm import exception
from rapid_vmm import rpc
from rapid_vmm.tests import fixtures as rapid_fixtures


class Endpoint:
    """A small VMM-like API; every method records that it ran."""

    target = messaging.Target(version='1.0')

    def __init__(self):
        self.calls = []

    @rpc.remotable
    def echo(self, context, value, repeat=1):
        """Return ``value`` ``repeat`` times."""
        self.calls.append(('echo', value, repeat))
        return {'value': value, 'repeat': repeat,
                'list': [value] * repeat}

    @rpc.remotable
    def nothing(self, context):
        self.calls.append(('nothing',))

    @rpc.remotable
    def fail_typed(self, context, name, kwargs):
        self.calls.append(('fail_typed', name))
        raise getattr(exception, name)(**kwargs)

    @rpc.remotable
    def fail_value(self, context):
        raise ValueError('boom')

    @rpc.remotable
    def fail_type_inside(self, context, value):
        return value + 1  # a TypeError in the body, not in the arguments

    @rpc.remotable
    def fail_unexpected_rapid(self, context):
        raise exception.StateError(path='/x', reason='disk full')


@pytest.fixture(scope='module')
def served():
    """One server on a unique topic for the whole module (start ~0.1 s)."""
    conf_fixture = rapid_fixtures.ConfFixture()
    conf_fixture.setUp()
    conf = conf_fixture.conf
    topic = rapid_fixtures.unique('test_rpc')
    transport = rpc.get_transport(conf)
    endpoint = Endpoint()
    server = rpc.get_server(
        conf, transport, messaging.Target(topic=topic, server=conf.host),
        [endpoint], pool_size=4)
    server.start()
    client = rpc.get_client(
        transport, messaging.Target(topic=topic, server=conf.host,
                                    version='1.0'),
        version_cap='1.0', timeout=15)
    yield endpoint, client, transport, topic, conf
    server.stop()
    server.wait()
    transport.cleanup()
    conf_fixture.cleanUp()


@pytest.fixture
def endpoint(served):
    served[0].calls.clear()
    return served[0]


@pytest.fixture
def client(served):
    return served[1]


# -- results ------------------------------------------------------------


def test_result_passes_through(client, endpoint):
    result = client.call({}, 'echo', value='x', repeat=3)
    assert result == {'value': 'x', 'repeat': 3, 'list': ['x', 'x', 'x']}
    assert endpoint.calls == [('echo', 'x', 3)]


def test_default_argument(client, endpoint):
    assert client.call({}, 'echo', value=5) == {'value': 5, 'repeat': 1,
                                                'list': [5]}


def test_none_result(client, endpoint):
    assert client.call({}, 'nothing') is None
    assert endpoint.calls == [('nothing',)]


def test_cast_runs_the_method(client, endpoint):
    client.cast({}, 'echo', value='cast')
    # A call after the cast on the same single server: the cast ran first
    # or concurrently; wait for it by polling the endpoint.
    for _ in range(200):
        if ('echo', 'cast', 1) in endpoint.calls:
            break
        client.call({}, 'nothing')
    assert ('echo', 'cast', 1) in endpoint.calls


# -- bad arguments --------------------------------------------------------


def test_missing_argument_is_invalid_request(client, endpoint):
    with pytest.raises(exception.InvalidRequest) as info:
        client.call({}, 'echo')
    first = str(info.value).splitlines()[0]
    assert first.startswith('Invalid request: echo: ')
    assert 'value' in first
    assert endpoint.calls == []


def test_unknown_argument_is_invalid_request(client, endpoint):
    with pytest.raises(exception.InvalidRequest) as info:
        client.call({}, 'echo', value=1, colour='red')
    first = str(info.value).splitlines()[0]
    assert first.startswith('Invalid request: echo: ')
    assert 'colour' in first
    assert endpoint.calls == []


def test_argument_to_method_without_arguments(client, endpoint):
    with pytest.raises(exception.InvalidRequest, match='nothing'):
        client.call({}, 'nothing', user_id=1)
    assert endpoint.calls == []


def test_unknown_method_is_oslo_messaging_remote_error(client):
    # Outside remotable's reach: the dispatcher refuses it before any
    # endpoint method runs, as an untyped RemoteError.
    with pytest.raises(messaging.RemoteError) as info:
        client.call({}, 'no_such_method')
    assert info.value.exc_type == 'NoSuchMethod'


# -- errors ---------------------------------------------------------------


@pytest.mark.parametrize('name, kwargs', [
    ('InvalidRequest', {'reason': 'bad'}),
    ('VmNotFound', {'user_id': 3}),
    ('VmStateConflict', {'action': 'resume', 'user_id': 3,
                         'state': 'stopped'}),
    ('NoCapacity', {'request': '[1, 1024, 20]', 'reason': 'full'}),
    ('DriverError', {'action': 'create', 'reason': 'libvirt'}),
    ('AsRegistrationTimeout', {'user_id': 3, 'timeout': 1}),
    ('AsNotReady', {'user_id': 3}),
    ('InternalError', {'action': 'x', 'reason': 'y'}),
])
def test_typed_error_reaches_caller_as_itself(client, endpoint, name,
                                              kwargs, caplog):
    caplog.set_level(logging.DEBUG)
    cls = getattr(exception, name)
    with pytest.raises(cls) as info:
        client.call({}, 'fail_typed', name=name, kwargs=kwargs)
    assert str(info.value).splitlines()[0] == str(cls(**kwargs))
    assert info.value.kwargs == kwargs
    assert endpoint.calls == [('fail_typed', name)]
    refused = [r for r in caplog.records
               if r.name == 'rapid_vmm.rpc' and 'refused' in r.getMessage()]
    assert len(refused) == 1
    assert refused[0].levelno == logging.WARNING
    assert refused[0].exc_info is None
    assert 'fail_typed' in refused[0].getMessage()


def test_unexpected_error_is_internal_error(client, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(exception.InternalError) as info:
        client.call({}, 'fail_value')
    assert isinstance(info.value, exception.DriverError)
    first = str(info.value).splitlines()[0]
    assert first == ('Internal error during fail_value: ValueError: boom')
    logged = [r for r in caplog.records
              if r.name == 'rapid_vmm.rpc' and
              'failed unexpectedly' in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].levelno == logging.ERROR
    assert logged[0].exc_info is not None
    assert logged[0].exc_info[0] is ValueError


def test_type_error_in_the_body_is_internal_not_invalid(client):
    with pytest.raises(exception.InternalError, match='TypeError'):
        client.call({}, 'fail_type_inside', value='text')
    assert client.call({}, 'fail_type_inside', value=1) == 2


def test_unexpected_rapid_error_is_internal_error(client):
    with pytest.raises(exception.InternalError) as info:
        client.call({}, 'fail_unexpected_rapid')
    assert 'StateError' in str(info.value).splitlines()[0]


def test_caller_without_allowed_module_gets_remote_error(served):
    _endpoint, _client, _transport, topic, conf = served
    plain = messaging.get_rpc_transport(conf)
    try:
        client = messaging.get_rpc_client(
            plain, messaging.Target(topic=topic, server=conf.host),
            timeout=15)
        with pytest.raises(messaging.RemoteError) as info:
            client.call({}, 'fail_typed', name='VmNotFound',
                        kwargs={'user_id': 9})
        assert info.value.exc_type == 'VmNotFound'
        assert info.value.value == 'User 9 has no VM on this host.'
    finally:
        plain.cleanup()


# -- worker pool ----------------------------------------------------------


class SlowEndpoint:
    """``slow`` waits until ``together`` calls run at once (or a timeout)."""

    target = messaging.Target(version='1.0')

    def __init__(self):
        self.condition = threading.Condition()
        self.running = 0
        self.most = 0

    @rpc.remotable
    def slow(self, context, together, timeout):
        with self.condition:
            self.running += 1
            self.most = max(self.most, self.running)
            self.condition.notify_all()
            self.condition.wait_for(lambda: self.running >= together,
                                    timeout=timeout)
        time.sleep(0.05)
        with self.condition:
            self.running -= 1
        return True


@pytest.mark.parametrize('pool_size, together, timeout, expected', [
    (1, 2, 0.4, 1),     # never two at once: each call waits in vain
    (3, 3, 20, 3),      # all three at once: they release each other
])
def test_pool_size_bounds_concurrent_requests(served, pool_size, together,
                                              timeout, expected):
    _endpoint, _client, transport, _topic, conf = served
    topic = rapid_fixtures.unique('test_pool')
    endpoint = SlowEndpoint()
    server = rpc.get_server(
        conf, transport, messaging.Target(topic=topic, server=conf.host),
        [endpoint], pool_size=pool_size)
    server.start()
    try:
        client = rpc.get_client(
            transport, messaging.Target(topic=topic, server=conf.host,
                                        version='1.0'),
            version_cap='1.0', timeout=30)
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            client.call({}, 'slow', together=together, timeout=timeout)))
            for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert results == [True, True, True]
        assert endpoint.most == expected
    finally:
        server.stop()
        server.wait()


# -- the decorator without a transport -----------------------------------


def test_wraps_keeps_name_and_doc():
    assert Endpoint.echo.__name__ == 'echo'
    assert Endpoint.echo.__doc__ == 'Return ``value`` ``repeat`` times.'


def test_direct_call_result():
    assert Endpoint().echo({}, value=1) == {'value': 1, 'repeat': 1,
                                            'list': [1]}


def test_direct_call_wraps_errors_for_the_dispatcher():
    endpoint = Endpoint()
    with pytest.raises(rpc_dispatcher.ExpectedException) as info:
        endpoint.echo({})
    assert isinstance(info.value.exc_info[1], exception.InvalidRequest)
    with pytest.raises(rpc_dispatcher.ExpectedException) as info:
        endpoint.fail_typed({}, name='VmNotFound', kwargs={'user_id': 1})
    assert type(info.value.exc_info[1]) is exception.VmNotFound
    with pytest.raises(rpc_dispatcher.ExpectedException) as info:
        endpoint.fail_value({})
    error = info.value.exc_info[1]
    assert type(error) is exception.InternalError
    assert error.kwargs == {'action': 'fail_value',
                            'reason': 'ValueError: boom'}
    assert isinstance(error.__cause__, ValueError)


def test_the_worker_pool_shrinks_when_idle():
    pool = rpc.worker_pool(max_workers=20)
    try:
        assert isinstance(pool, rpc.ShrinkingThreadPool)
        gate = threading.Event()
        futures = [pool.submit(gate.wait, 5) for _ in range(20)]
        deadline = time.monotonic() + 5
        while pool.num_workers < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.num_workers == 20
        gate.set()
        for future in futures:
            future.result(5)
        for _ in range(40):
            rpc.maintain_pools()
        assert pool.num_workers < 20
    finally:
        pool.shutdown()
    single = rpc.worker_pool(max_workers=1)
    assert not isinstance(single, rpc.ShrinkingThreadPool)
    single.shutdown()


def test_rpc_servers_get_the_shrinking_pool():
    conf_fixture = rapid_fixtures.ConfFixture()
    conf_fixture.setUp()
    try:
        transport = rpc.get_transport(conf_fixture.conf)
        server = rpc.get_server(
            conf_fixture.conf, transport,
            messaging.Target(topic=rapid_fixtures.unique('pool'),
                             server='s'), [],
            pool_size=7)
        # oslo.messaging offers no public way to choose the pool: if a
        # release renames this attribute, this test says so.
        assert server._executor_cls is rpc.worker_pool
        assert conf_fixture.conf.executor_thread_pool_size == 7
        transport.cleanup()
    finally:
        conf_fixture.cleanUp()
