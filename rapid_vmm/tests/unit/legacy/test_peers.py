"""Peer mode against a DS and a SLAM that behave as the original ones.

:class:`wire.OriginalDirectoryServer` answers ERROR until a SLAM registered
with it and to a second ``VMM_REGISTER`` from one IP, replies a bare long
to ``VM_REGISTER`` and nothing to notifications, as SPEC section 7 says
the Java DS does.
"""

import socket
import threading
import time

import pytest

from rapid_vmm import exception
from rapid_vmm import peers
from rapid_vmm.legacy import codec
from rapid_vmm.legacy import peers as legacy_peers
from rapid_vmm.tests import fixtures as rfix
from rapid_vmm.tests.unit.legacy import wire

CTXT: dict = {}
RESOURCES = {'available_types': [[1, 1024, 20], [1, 2048, 20]]}


@pytest.fixture
def ds():
    with wire.OriginalDirectoryServer() as server:
        yield server


@pytest.fixture
def slam(ds):
    with wire.OriginalSlam() as server:
        yield server


def make_conf(port, **overrides):
    fixture = rfix.ConfFixture(**{'peer_protocol': 'legacy',
                                  'legacy.ds_host': '127.0.0.1',
                                  'legacy.ds_port': port,
                                  'peer_call_timeout': 2, **overrides})
    fixture.setUp()
    return fixture


@pytest.fixture
def conf(ds):
    fixture = make_conf(ds.port)
    yield fixture.conf
    fixture.cleanUp()


def register(client, ip='10.0.0.5', **kwargs):
    values = dict(host='h', ip_address=ip, mac_type=4, cpu_load=13.7,
                  cpu_count=16, free_memory_mb=12000, gpu_load=None,
                  gpu_cores=3072, resources=RESOURCES)
    values.update(kwargs)
    return client.register_vmm(CTXT, **values)


def test_load_gives_the_legacy_clients(conf):
    ds_client, slam_client = peers.load(conf, None, dict)
    assert isinstance(ds_client, legacy_peers.DirectoryServerClient)
    assert isinstance(slam_client, legacy_peers.SlaManagerClient)
    assert isinstance(ds_client, peers.DirectoryServer)
    assert isinstance(slam_client, peers.SlaManager)


def test_register_is_refused_until_a_slam_registered(conf, ds, slam):
    client = legacy_peers.DirectoryServerClient(conf)
    with pytest.raises(exception.PeerRejected, match='ERROR'):
        register(client)
    slam.register_with(ds)
    reply = register(client)
    assert reply == {'vmm_id': 4242, 'slam_host': '127.0.0.1',
                     'slam_port': slam.port}
    fields = ds.wait_for(codec.VMM_REGISTER_DS,
                         lambda f: 'vmm_id' in f)[0]
    # Floats become ints as the original casts them; None becomes 0; the
    # availableType string says which types of the grid still fit.
    assert (fields['ip_address'], fields['mac_type'], fields['cpu_load'],
            fields['cpu_count'], fields['free_memory_mb'],
            fields['gpu_load'], fields['gpu_cores'],
            fields['available_types']) == ('10.0.0.5', 4, 13, 16, 12000, 0,
                                           3072, '1010000000')


def test_second_registration_from_one_ip_is_refused(conf, ds, slam):
    slam.register_with(ds)
    client = legacy_peers.DirectoryServerClient(conf)
    assert register(client)['vmm_id'] == 4242
    with pytest.raises(exception.PeerRejected):
        register(client)
    assert register(client, ip='10.0.0.6')['vmm_id'] == 4243


def test_vm_register_reads_the_bare_long(conf, ds):
    client = legacy_peers.DirectoryServerClient(conf)
    reply = client.register_vm(CTXT, vmm_id=4242, category=1, vm_type=0,
                               user_id=-1, status=1)
    assert reply == {'vm_id': 1001}
    assert ds.calls(codec.VM_REGISTER_DS)[0] == {
        'vmm_id': 4242, 'category': 1, 'vm_type': 0, 'user_id': -1,
        'status': 1, 'vm_id': 1001}


def test_notifications_arrive_and_get_no_reply(conf, ds):
    client = legacy_peers.DirectoryServerClient(conf)
    assert client.notify_vmm(CTXT, vmm_id=4242, cpu_load=99.9,
                             free_memory_mb=1500, gpu_load=12.5,
                             resources={}) is None
    assert client.notify_vm(CTXT, vm_id=1001, status=2) is None
    assert client.notify_helper(CTXT, vm_id=1000,
                                ip_address='192.168.122.30') is None
    # The call returns once the DS closed the connection: it has them.
    assert ds.calls(codec.VMM_NOTIFY_DS) == [
        {'vmm_id': 4242, 'cpu_load': 99, 'free_memory_mb': 1500,
         'gpu_load': 12}]
    assert ds.calls(codec.VM_NOTIFY_DS) == [{'vm_id': 1001, 'status': 2}]
    assert ds.calls(codec.HELPER_NOTIFY_DS) == [
        {'vm_id': 1000, 'ip_address': '192.168.122.30'}]


def test_slam_registration_at_the_address_of_the_identity(conf, ds, slam):
    identity = {}
    client = legacy_peers.SlaManagerClient(conf, lambda: identity)
    with pytest.raises(exception.PeerUnavailable, match='not known'):
        client.register_vmm(CTXT, host='h', vmm_id=4242, ip_address='10.0.0.5')
    identity.update(slam_host='127.0.0.1', slam_port=slam.port)
    assert client.register_vmm(CTXT, host='h', vmm_id=4242,
                               ip_address='10.0.0.5') is True
    assert slam.calls(codec.VMM_REGISTER_SLAM) == [
        {'ip_address': '10.0.0.5', 'port': conf.legacy.port}]
    # The outcome of a start has no message of its own.
    assert client.vm_started(CTXT, host='h', vm={}) is None
    assert client.vm_start_failed(CTXT, host='h', user_id=7, error='x',
                                  error_class='NoCapacity') is None
    assert len(slam.messages) == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_absent_ds_is_unavailable():
    fixture = make_conf(free_port())
    try:
        client = legacy_peers.DirectoryServerClient(fixture.conf)
        with pytest.raises(exception.PeerUnavailable, match='connect'):
            client.notify_vm(CTXT, vm_id=1, status=1)
        with pytest.raises(exception.PeerUnavailable):
            register(client)
    finally:
        fixture.cleanUp()


class _Silent:
    """Accepts connections and never answers (nor closes)."""

    def __init__(self, reply: bytes = b''):
        self.sock = socket.create_server(('127.0.0.1', 0))
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.conns = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.reply:
                conn.sendall(self.reply)

    def close(self):
        self.sock.close()
        for conn in self.conns:
            conn.close()


def test_silent_ds_is_unavailable_within_the_bound():
    silent = _Silent()
    fixture = make_conf(silent.port, peer_call_timeout=1,
                        peer_reply_timeout=1)
    try:
        client = legacy_peers.DirectoryServerClient(fixture.conf)
        for call in (lambda: register(client),
                     lambda: client.notify_vm(CTXT, vm_id=1, status=1)):
            started = time.monotonic()
            with pytest.raises(exception.PeerUnavailable, match='time'):
                call()
            assert time.monotonic() - started < 3
    finally:
        fixture.cleanUp()
        silent.close()


@pytest.mark.parametrize('reply', [
    b'HTTP/1.1 400 Bad Request\r\n\r\n',
    codec.HEADER + b'\x73\x72',
    codec.HEADER + codec.Writer(header=False).write_byte(7).getvalue(),
])
def test_unusable_reply_is_rejected(reply):
    peer = _Silent(reply)
    fixture = make_conf(peer.port, peer_call_timeout=1)
    try:
        client = legacy_peers.DirectoryServerClient(fixture.conf)
        with pytest.raises(exception.PeerRejected):
            register(client)
    finally:
        fixture.cleanUp()
        peer.close()


def test_no_ds_host_is_unavailable_not_a_crash():
    fixture = make_conf(9001, **{'legacy.ds_host': None})
    try:
        client = legacy_peers.DirectoryServerClient(fixture.conf)
        with pytest.raises(exception.PeerUnavailable, match='not known'):
            client.notify_vm(CTXT, vm_id=1, status=1)
    finally:
        fixture.cleanUp()
