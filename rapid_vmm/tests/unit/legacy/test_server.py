"""The legacy front end over real TCP, in front of the real service.

The service runs in this process (in-memory transport, libvirt's
``test:///default``, simulated DS and SLAM over RPC); the tests connect to
``[legacy] port`` as the original SLAM, AS and DS do and send the frames
of SPEC section 7.
"""

import logging
import socket
import threading
import time

from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import pytest

from rapid_vmm.legacy import codec
from rapid_vmm.legacy import server as legacy_server
from rapid_vmm.tests import fixtures as rfix
from rapid_vmm.tests.unit.legacy import wire

ERROR = [codec.ERROR]


def service(**overrides):
    values = {'legacy.enabled': True, 'legacy.bind_host': '127.0.0.1',
              'legacy.port': 0, 'legacy.read_timeout': 2,
              'legacy.as_register_wait': 0.5}
    values.update(overrides)
    fixture = rfix.ServiceFixture(**values)
    fixture.setUp()
    return fixture


@pytest.fixture
def agent():
    fixture = service()
    yield fixture
    fixture.cleanUp()


def address(fixture):
    return fixture.service.legacy_server.address


def start_over_tcp(fixture, user_id, **kwargs):
    slam = wire.OriginalSlam()
    return slam.start_vm(address(fixture), user_id, **kwargs)


def query(fixture, command, user_id=0):
    frame = wire.request(command, user_id=user_id)
    reply = wire.call(address(fixture), frame, ['byte'], read_header=True)
    if reply == ERROR:
        return reply
    return wire.call(address(fixture), frame, ['byte', 'list'])


def records(fixture):
    return sorted((vm['user_id'], vm['status'], vm['vcpus'])
                  for vm in fixture.api.get_vm_info({}))


def test_start_vm_and_every_query(agent):
    reply = start_over_tcp(agent, 7, vcpus=2, memory_mb=2048)
    vm = agent.api.get_vm_info({}, user_id=7)[0]
    assert reply == [codec.OK, 7, vm['ip_address']]
    # The SLAM's second request for a running VM: the same VM.
    assert start_over_tcp(agent, 7) == reply
    info = query(agent, codec.SLAM_GET_VMINFO_VMM, 0)
    assert info == [codec.OK, ['7', str(vm['vm_id']), '2', '2048', '20',
                               '0']]
    assert query(agent, codec.SLAM_GET_VMINFO_VMM, 7) == info
    assert query(agent, codec.SLAM_GET_VMINFO_VMM, 8) == ERROR
    disk = query(agent, codec.SLAM_GET_VMDISK_VMM, 7)
    assert disk[1][:3] == ['7', str(vm['vm_id']), str(20 * 2 ** 30)]
    assert float(disk[1][3]) >= 0
    assert query(agent, codec.SLAM_GET_VMDISK_VMM, 0) == disk
    # test:///default has no CPU or memory statistics: no figure, which
    # the original answers with ERROR for one VM, an empty list for all.
    assert query(agent, codec.SLAM_GET_VMCPU_VMM, 7) == ERROR
    assert query(agent, codec.SLAM_GET_VMCPU_VMM, 0) == [codec.OK, []]
    assert query(agent, codec.SLAM_GET_VMMEM_VMM, 0) == [codec.OK, []]


def test_usage_figures_as_the_original_writes_them():
    cpu = {'user_id': 7, 'vm_id': 1001, 'cpu_util_percent': 12.5}
    assert legacy_server._usage_figures('cpu', cpu) == ['12.5']
    memory = {'memory_mb': 2048, 'memory_used_mb': 1536}
    assert legacy_server._usage_figures('memory', memory) == ['2048',
                                                              '1536.0']
    disk = {'capacity_bytes': 21474836480, 'allocation_bytes': 1073741824}
    assert legacy_server._usage_figures('disk', disk) == [
        '21474836480', '1073741824.0']
    assert legacy_server._usage_figures('cpu', {'cpu_util_percent': None}) \
        is None


def test_resize_confirm_suspend_resume_remove(agent):
    start_over_tcp(agent, 7)
    change = wire.request(codec.SLAM_CHANGE_VMFLV_VMM, user_id=7, vcpus=4,
                          memory_mb=0, disk_gb=0)
    assert wire.call(address(agent), change, ['byte']) == [codec.OK]
    record = agent.api.get_vm_info({}, user_id=7)[0]
    assert (record['vcpus'], record['resize_pending']) == (4, True)
    confirm = wire.request(codec.SLAM_CONFIRM_VMFLV_VMM, user_id=7)
    assert wire.call(address(agent), confirm, ['byte']) == [codec.OK]
    assert not agent.api.get_vm_info({}, user_id=7)[0]['resize_pending']
    # The original SLAM sends CONFIRM with three more ints: still read.
    buggy = confirm + codec.Writer(header=False).write_int(4).write_int(
        0).write_int(0).getvalue()
    assert wire.call(address(agent), buggy, ['byte']) == [codec.OK]
    # A resize to nothing the grid knows: refused with ERROR.
    bad = wire.request(codec.SLAM_CHANGE_VMFLV_VMM, user_id=7, vcpus=-4,
                       memory_mb=0, disk_gb=0)
    assert wire.call(address(agent), bad, ['byte']) == ERROR

    suspend = wire.request(codec.AS_RM_NOTIFY_VMM, user_id=7, type=1)
    assert wire.call(address(agent), suspend) == []
    wait_until(lambda: agent.api.get_vm_info({}, user_id=7)[0]['status']
               == 2)
    agent.ds.recorder.wait_for('notify_vm', lambda kw: kw['status'] == 2)
    # A start of the suspended VM resumes it (its AS already registered).
    assert start_over_tcp(agent, 7)[0] == codec.OK
    assert agent.api.get_vm_info({}, user_id=7)[0]['status'] == 3
    remove = wire.request(codec.AS_RM_NOTIFY_VMM, user_id=7, type=2)
    assert wire.call(address(agent), remove) == []
    wait_until(lambda: agent.api.get_vm_info({}) == [])
    agent.ds.recorder.wait_for('notify_vm', lambda kw: kw['status'] == 4)


def test_ds_deregistration_removes_the_vm(agent):
    start_over_tcp(agent, 9)
    wire.OriginalDirectoryServer().deregister(address(agent), 9)
    wait_until(lambda: agent.api.get_vm_info({}) == [])


def wait_until(predicate, timeout=15):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, 'condition not reached'
        time.sleep(0.05)


# -- the AS hand-shake -----------------------------------------------------

@pytest.fixture
def as_agent():
    fixture = service(as_register_timeout=20)
    yield fixture
    fixture.cleanUp()


def start_in_thread(fixture, user_id):
    result = {}

    def run():
        try:
            result['reply'] = start_over_tcp(fixture, user_id)
        except (OSError, codec.CodecError) as exc:
            result['error'] = exc
    thread = threading.Thread(target=run)
    thread.start()
    ip = None

    def known():
        nonlocal ip
        vms = [vm for vm in fixture.api.get_vm_info({})
               if vm['user_id'] == user_id]
        ip = vms[0]['ip_address'] if vms else None
        return ip
    wait_until(known)
    return thread, result, ip


def test_start_waits_for_the_as_registering_over_tcp(as_agent):
    thread, result, ip = start_in_thread(as_agent, 7)
    time.sleep(0.5)
    assert 'reply' not in result  # waiting for the AS
    assert wire.as_register(address(as_agent), ip) == [codec.OK, 7]
    thread.join(20)
    assert result['reply'] == [codec.OK, 7, ip]
    assert as_agent.api.get_vm_info({}, user_id=7)[0]['as_ready'] is True


def test_as_status_sent_with_the_request_in_one_write(as_agent):
    # A shell AS (printf | nc) writes the request and its status at once.
    thread, result, ip = start_in_thread(as_agent, 8)
    frame = wire.request(codec.AS_RM_REGISTER_VMM, ip_address=ip) + \
        codec.Writer(header=False).write_byte(codec.OK).getvalue()
    assert wire.call(address(as_agent), frame, ['byte', 'long']) == [
        codec.OK, 8]
    thread.join(20)
    assert result['reply'][0] == codec.OK


def test_as_not_ready_fails_the_start(as_agent):
    thread, result, ip = start_in_thread(as_agent, 9)
    wire.as_register(address(as_agent), ip, status=codec.ERROR)
    thread.join(20)
    assert result['reply'] == ERROR
    wait_until(lambda: as_agent.api.get_vm_info({}) == [])


def test_as_of_an_unknown_address_gets_error_after_the_wait():
    fixture = service(**{'legacy.as_register_wait': 1})
    try:
        started = time.monotonic()
        assert wire.as_register(address(fixture), '10.9.9.9') == ERROR
        assert 0.9 < time.monotonic() - started < 5
    finally:
        fixture.cleanUp()


def test_as_that_never_sends_its_status_does_not_confirm(caplog):
    fixture = service(as_register_timeout=3,
                      **{'legacy.as_status_timeout': 1})
    try:
        thread, result, ip = start_in_thread(fixture, 10)
        with socket.create_connection(address(fixture)) as sock:
            sock.sendall(wire.request(codec.AS_RM_REGISTER_VMM,
                                      ip_address=ip))
            thread.join(10)
        assert result['reply'] == ERROR  # AsRegistrationTimeout
        assert 'sent no status' in caplog.text
    finally:
        fixture.cleanUp()


# -- bounds ----------------------------------------------------------------

def connect_idle(fixture):
    sock = socket.create_connection(address(fixture), timeout=5)
    return sock


def test_idle_connections_do_not_hold_up_others(agent):
    idle = [connect_idle(agent) for _ in range(5)]
    try:
        started = time.monotonic()
        assert query(agent, codec.SLAM_GET_VMINFO_VMM) == [codec.OK, []]
        assert time.monotonic() - started < 1
        # Each gets the header, then is closed at its read deadline (2 s).
        for sock in idle:
            assert sock.recv(4) == codec.HEADER
            assert sock.recv(10) == b''
    finally:
        for sock in idle:
            sock.close()


def refused(where, frame: bytes = b'') -> bool:
    """True when the server resets the connection without a byte."""
    try:
        with socket.create_connection(where, timeout=5) as sock:
            if frame:
                sock.sendall(frame)
            return sock.recv(4) == b''
    except ConnectionResetError:
        return True


def test_connections_over_the_cap_are_refused():
    fixture = service(**{'legacy.max_connections': 2,
                         'legacy.read_timeout': 1})
    try:
        held = [connect_idle(fixture) for _ in range(2)]
        for sock in held:
            assert sock.recv(4) == codec.HEADER
        assert refused(address(fixture))
        for sock in held:
            sock.close()
        time.sleep(0.3)
        assert query(fixture, codec.SLAM_GET_VMINFO_VMM) == [codec.OK, []]
    finally:
        fixture.cleanUp()


def test_addresses_outside_allowed_peers_are_refused_unread(caplog):
    fixture = service(**{'legacy.allowed_peers': ['10.0.0.0/8']})
    try:
        assert refused(address(fixture), wire.request(
            codec.DS_VM_DEREGISTER_VMM, user_id=1))
        assert 'Refused a legacy connection from 127.0.0.1' in caplog.text
    finally:
        fixture.cleanUp()
    allowed = service(**{'legacy.allowed_peers': ['10.0.0.0/8',
                                                  '127.0.0.1']})
    try:
        assert query(allowed, codec.SLAM_GET_VMINFO_VMM) == [codec.OK, []]
    finally:
        allowed.cleanUp()


def test_empty_allowed_peers_warns_at_start(caplog):
    caplog.set_level(logging.WARNING)
    fixture = service()
    fixture.cleanUp()
    assert 'to ANY address' in caplog.text


@pytest.mark.parametrize('frame,reply', [
    (b'GET / HTTP/1.0\r\n\r\n', None),
    (codec.HEADER + b'\x77\x01\x63', None),                # command 99
    (codec.HEADER + b'\x77\x02\x3c\x00', ERROR),           # START cut
    (codec.HEADER + b'\x77\x01\x3f\x73\x72', ERROR),       # not a block
    (codec.HEADER + b'\x7a\x00\x10\x00\x00' + b'\x3c' * 20, None),
    (wire.request(codec.VMM_REGISTER_DS, ip_address='1', mac_type=4,
                  cpu_load=0, cpu_count=1, free_memory_mb=1, gpu_load=0,
                  gpu_cores=0, available_types=''), None),  # a DS message
])
def test_bad_frames_change_nothing(agent, caplog, frame, reply):
    start_over_tcp(agent, 7)
    before = records(agent)
    with socket.create_connection(address(agent), timeout=5) as sock:
        sock.sendall(frame)
        sock.shutdown(socket.SHUT_WR)
        data = b''
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    expected = codec.HEADER + (codec.Writer(header=False).write_byte(
        codec.ERROR).getvalue() if reply else b'')
    assert data == expected
    assert records(agent) == before
    assert 'Bad legacy frame from 127.0.0.1' in caplog.text
    assert 'Traceback' not in caplog.text
    assert query(agent, codec.SLAM_GET_VMINFO_VMM, 7)[0] == codec.OK


def test_oversized_frame_is_refused(agent, caplog):
    big = codec.encode(['byte', 'utf'], [38, 'x' * 60000]) + b'x' * 10000
    with socket.create_connection(address(agent), timeout=5) as sock:
        try:
            sock.sendall(big)
        except OSError:
            pass
    wait_until(lambda: 'over its limit' in caplog.text)


def test_typed_error_is_the_error_byte_and_one_line(agent, caplog):
    caplog.set_level(logging.WARNING, logger='rapid_vmm.legacy')
    frame = wire.request(codec.SLAM_START_VM_VMM, user_id=-5, os_type=0,
                         vcpus=1, memory_mb=1024, gpu_cores=0)
    assert wire.call(address(agent), frame, ['byte']) == ERROR
    lines = [r for r in caplog.records if r.name.startswith(
        'rapid_vmm.legacy') and 'answered ERROR' in r.getMessage()]
    assert len(lines) == 1
    assert 'InvalidRequest' in lines[0].getMessage()
    assert lines[0].exc_info is None


SEEDS = [
    wire.request(codec.SLAM_GET_VMINFO_VMM, user_id=0),
    wire.request(codec.SLAM_CONFIRM_VMFLV_VMM, user_id=7),
    wire.request(codec.AS_RM_REGISTER_VMM, ip_address='10.1.1.1'),
    wire.request(codec.SLAM_GET_VMDISK_VMM, user_id=7),
]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(SEEDS),
       st.lists(st.tuples(st.integers(0, 64), st.integers(0, 255)),
                min_size=1, max_size=4),
       st.integers(0, 64))
def test_fuzzed_frames_are_answered_or_closed(agent, seed, flips, cut):
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    with socket.create_connection(address(agent), timeout=5) as sock:
        sock.sendall(bytes(data[:max(cut, 1)]))
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(5)
        while sock.recv(4096):
            pass


def test_fuzzing_left_no_traceback(agent, caplog):
    for seed in SEEDS:
        for cut in range(1, len(seed)):
            with socket.create_connection(address(agent), timeout=5) as s:
                s.sendall(seed[:cut] + b'\xff')
                s.shutdown(socket.SHUT_WR)
                while s.recv(4096):
                    pass
    assert 'Traceback' not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert query(agent, codec.SLAM_GET_VMINFO_VMM) == [codec.OK, []]


def test_stop_is_bounded_with_idle_and_busy_connections():
    fixture = service(as_register_timeout=60)
    try:
        thread, result, _ip = start_in_thread(fixture, 7)  # waits for AS
        idle = connect_idle(fixture)
        server = fixture.service.legacy_server
        fixture.manager.stop()  # as the service does first
        started = time.monotonic()
        server.stop(timeout=5)
        assert time.monotonic() - started < 6
        thread.join(10)
        # The SLAM gets ERROR, or its connection closed by the stop.
        assert result.get('reply', ERROR) == ERROR
        idle.close()
        with pytest.raises(OSError):
            socket.create_connection(server.address, timeout=2)
    finally:
        fixture.cleanUp()


def test_bad_allowed_peers_is_a_config_error():
    fixture = rfix.ConfFixture(**{'legacy.allowed_peers': ['10.0.0.0/33']})
    fixture.setUp()
    try:
        with pytest.raises(Exception, match='allowed_peers'):
            legacy_server.validate_config(fixture.conf)
    finally:
        fixture.cleanUp()


def test_port_in_use_is_a_config_error():
    with socket.create_server(('127.0.0.1', 0)) as busy:
        fixture = rfix.ConfFixture(**{'legacy.bind_host': '127.0.0.1',
                                      'legacy.port': busy.getsockname()[1]})
        fixture.setUp()
        try:
            server = legacy_server.LegacyServer(fixture.conf, api=None)
            with pytest.raises(Exception, match='cannot listen'):
                server.start()
        finally:
            fixture.cleanUp()
