"""The RPC endpoint: only the 13 API methods, typed errors, fuzzed calls.

The real service in this process (libvirt ``test:///default``, in-memory
kombu transport, simulated DS and SLAM) is called with a plain
oslo.messaging client, as an outside caller would.
"""

import inspect
import logging

import hypothesis
from hypothesis import strategies as st
from oslo_context import context as oslo_context
import oslo_messaging as messaging
import pytest

from rapid_vmm import endpoint
from rapid_vmm import exception
from rapid_vmm.tests import fixtures as rfix

#: Everything else a caller might try: the manager's and the endpoint's
#: attributes and methods, dunders, private names.
NOT_API = ('conf', 'driver', 'store', 'manager', 'init_host', 'stop',
           'cleanup_host', 'user_lock', 'before_resize', 'delete_vm',
           'limits', 'reporter', 'lifecycle', 'reconciler', 'outbox',
           'target', '_VmmEndpoint__manager', '__init__', '__class__',
           '__dict__', 'ensure_helpers', 'periodic_report', 'diagnostics',
           'run_registration', 'scan_orphan_disks', '_record', 'grid', '')


@pytest.fixture(scope='module')
def agent():
    fixture = rfix.ServiceFixture(helper_vm_count=0)
    fixture.setUp()
    try:
        yield fixture
    finally:
        fixture.cleanUp()


def call(agent, method, **kwargs):
    return agent.api.client.prepare(timeout=15).call({}, method, **kwargs)


def start(agent, user_id):
    return agent.api.start_vm({}, user_id=user_id, os_type=0, vcpus=1,
                              memory_mb=1024)


def test_endpoint_has_exactly_the_api_methods():
    public = {name for name in dir(endpoint.VmmEndpoint)
              if not name.startswith('_') and
              inspect.isfunction(getattr(endpoint.VmmEndpoint, name))}
    assert public == set(endpoint.API_METHODS)
    assert len(endpoint.API_METHODS) == 13
    for name in endpoint.API_METHODS:
        assert getattr(endpoint.VmmEndpoint, name).exposed


@pytest.mark.parametrize('name', NOT_API)
def test_nothing_else_is_reachable(agent, name, caplog):
    caplog.set_level(logging.DEBUG)
    before = agent.api.get_vm_info({})
    with pytest.raises(exception.InvalidRequest):
        call(agent, name)
    assert agent.api.get_vm_info({}) == before
    assert agent.manager.conf.host == agent.conf.host
    assert not [r for r in caplog.records if r.exc_info]


def test_unsupported_version_is_typed(agent):
    # The VmmAPI's version cap refuses it before sending: a plain client.
    client = messaging.get_rpc_client(
        agent.transport, messaging.Target(topic=agent.conf.vmm_topic,
                                          server=agent.conf.host,
                                          version='2.0'), timeout=10)
    with pytest.raises(exception.InvalidRequest):
        client.call({}, 'get_host_status')


@pytest.mark.parametrize('method', endpoint.API_METHODS)
@pytest.mark.parametrize('name', ['context', 'user_context'])
def test_a_keyword_named_like_the_context_is_invalid(agent, method, name):
    with pytest.raises(exception.InvalidRequest):
        call(agent, method, **{name: {}})


class ContextCapture(logging.Handler):
    """Notes the current oslo.context request id of every record, which
    is what oslo.log's ContextFormatter writes on the line."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[str, str | None]] = []

    def emit(self, record):
        current = oslo_context.get_current()
        self.seen.append((record.getMessage(),
                          getattr(current, 'request_id', None)))


def test_the_request_id_travels_to_the_log(agent):
    capture = ContextCapture()
    logger = logging.getLogger('rapid_vmm')
    logger.addHandler(capture)
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with pytest.raises(exception.VmNotFound):
            agent.api.client.prepare(timeout=10).call(
                {'request_id': 'req-0123-test'}, 'resume_vm',
                user_id=424242)
    finally:
        logger.removeHandler(capture)
        logger.setLevel(previous)
    refused = [rid for message, rid in capture.seen
               if 'resume_vm refused' in message]
    assert refused == ['req-0123-test']


VALUES = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-2 ** 70, max_value=2 ** 70),
    st.floats(allow_nan=True), st.text(max_size=30),
    st.binary(max_size=10).map(lambda b: b.hex()),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.sampled_from(['cpu', 'memory', 'suspend', 'remove', '10.0.0.1',
                     '::1', 'x' * 5000]))
ARG_NAMES = st.sampled_from(['user_id', 'os_type', 'vcpus', 'memory_mb',
                             'gpu_cores', 'disk_gb', 'resource', 'action',
                             'ip_address', 'ready', 'colour', 'verbose'])
METHODS = st.sampled_from(list(endpoint.API_METHODS) + list(NOT_API[:8]))


@hypothesis.settings(max_examples=150, deadline=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(method=METHODS,
                  kwargs=st.dictionaries(ARG_NAMES, VALUES, max_size=5))
def test_fuzzed_calls_get_typed_errors_and_change_nothing(agent, method,
                                                          kwargs):
    # Keep the fuzz from removing or resizing the probe VM on purpose.
    if kwargs.get('user_id') == 4100:
        kwargs['user_id'] = 4101
    before = agent.manager.store.get_vm(4100)
    try:
        call(agent, method, **kwargs)
    except exception.InternalError as exc:  # a bug: never for bad input
        pytest.fail(f'{method}({kwargs!r:.200}) -> {exc}')
    except exception.RapidVmmException:
        pass
    except messaging.MessagingTimeout:
        pytest.fail(f'{method}({kwargs!r:.200}) got no answer')
    after = agent.manager.store.get_vm(4100)
    assert (before.status, before.vcpus, before.task_state) == (
        after.status, after.vcpus, after.task_state)


@pytest.fixture(autouse=True)
def probe_vm(agent, request):
    if 'fuzzed' in request.node.name and \
            agent.manager.store.get_vm(4100) is None:
        start(agent, 4100)


def test_agent_still_serves_after_the_fuzz(agent, caplog):
    caplog.set_level(logging.DEBUG)
    status = agent.api.get_host_status({})
    assert status['host'] == agent.conf.host
    vm = start(agent, 4102)
    assert vm['status'] == 1
    assert not [r for r in caplog.records if r.exc_info]
