"""The agent as a process, driven over the original RAPID TCP protocol.

The agent (``python -m rapid_vmm.cmd.vmm``) serves ``[legacy]`` on a free
local port beside its RPC API (RabbitMQ, libvirt's test hypervisor). The
tests are real TCP clients sending the frames of the original SLAM, AS
and DS, and, in peer mode, play an original DS and SLAM
(:mod:`rapid_vmm.tests.unit.legacy.wire`) that the agent registers with.
"""

import socket
import threading
import time

import testtools

from rapid_vmm.legacy import codec
from rapid_vmm.tests.functional import agent as agent_fixture
from rapid_vmm.tests.unit.legacy import wire

OK, ERROR = codec.OK, codec.ERROR
SHARED_URI = 'test+unix:///default'


def remove_domains_of(host: str) -> None:
    """Destroy the domains an agent of ``host`` left in libvirtd."""
    import libvirt
    conn = libvirt.open(SHARED_URI)
    try:
        for dom in conn.listAllDomains():
            if host in dom.XMLDesc(0):
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


class LegacyAgentTestCase(testtools.TestCase):

    overrides: dict = {}
    with_peers = True

    def setUp(self):
        super().setUp()
        self.port = free_port()
        values = {'legacy.enabled': True, 'legacy.bind_host': '127.0.0.1',
                  'legacy.port': self.port,
                  'legacy.allowed_peers': ['127.0.0.0/8'],
                  'legacy.read_timeout': 3, 'as_register_timeout': 30}
        values.update(self.extra_overrides())
        self.agent = self.useFixture(agent_fixture.AgentProcess(
            peers=self.with_peers, **values))
        self.agent.start()
        self.address = ('127.0.0.1', self.port)
        self.slam_client = wire.OriginalSlam()

    def extra_overrides(self) -> dict:
        return dict(self.overrides)

    def wait_until(self, predicate, timeout=30, what='condition'):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                self.fail(f'{what} not reached in {timeout} s\n'
                          f'{self.agent.log_tail()}')
            time.sleep(0.1)

    def record(self, user_id):
        vms = [vm for vm in self.agent.api.get_vm_info({})
               if vm['user_id'] == user_id]
        return vms[0] if vms else None

    def start_with_as(self, user_id, as_status=OK, **kwargs):
        """SLAM_START_VM_VMM, while the test plays the VM's AS."""
        result = {}

        def run():
            result['reply'] = self.slam_client.start_vm(
                self.address, user_id, **kwargs)
        thread = threading.Thread(target=run)
        thread.start()
        ip = self.wait_until(
            lambda: (self.record(user_id) or {}).get('ip_address'),
            what=f'the address of user {user_id}\'s VM')
        reply = wire.as_register(self.address, ip, status=as_status)
        thread.join(60)
        return result.get('reply'), reply, ip

    def query(self, command, user_id=0):
        frame = wire.request(command, user_id=user_id)
        with socket.create_connection(self.address, timeout=10) as sock:
            sock.sendall(frame)
            reader = codec.Reader(codec.SocketSource(
                sock, time.monotonic() + 10))
            reader.read_header()
            status = reader.read_byte()
            return [status, reader.read_string_list()] if status == OK \
                else [status]

    def assert_no_traceback(self):
        self.assertEqual([], self.agent.log_lines('Traceback'))


class TestFrontEnd(LegacyAgentTestCase):
    """Every message the SLAM, AS and DS send a VMM."""

    def test_every_message(self):
        started, as_reply, ip = self.start_with_as(7, vcpus=2,
                                                   memory_mb=2048)
        self.assertEqual([OK, 7], as_reply)
        self.assertEqual([OK, 7, ip], started)
        record = self.record(7)
        self.assertTrue(record['as_ready'])
        # The SLAM asks again: the same VM, at once.
        self.assertEqual([OK, 7, ip], self.slam_client.start_vm(
            self.address, 7))
        vm_id = str(record['vm_id'])
        self.assertEqual([OK, ['7', vm_id, '2', '2048', '20', '0']],
                         self.query(codec.SLAM_GET_VMINFO_VMM, 7))
        self.assertEqual([OK, ['7', vm_id, '2', '2048', '20', '0']],
                         self.query(codec.SLAM_GET_VMINFO_VMM, 0))
        self.assertEqual([ERROR], self.query(codec.SLAM_GET_VMINFO_VMM, 99))
        disk = self.query(codec.SLAM_GET_VMDISK_VMM, 7)
        self.assertEqual(['7', vm_id, str(20 * 2 ** 30)], disk[1][:3])
        # No CPU or memory statistics in the test driver: ERROR for one
        # VM, an empty list for all.
        self.assertEqual([ERROR], self.query(codec.SLAM_GET_VMCPU_VMM, 7))
        self.assertEqual([OK, []], self.query(codec.SLAM_GET_VMMEM_VMM, 0))

        change = wire.request(codec.SLAM_CHANGE_VMFLV_VMM, user_id=7,
                              vcpus=4, memory_mb=0, disk_gb=0)
        self.assertEqual([OK], wire.call(self.address, change, ['byte']))
        self.assertEqual(4, self.record(7)['vcpus'])
        confirm = wire.request(codec.SLAM_CONFIRM_VMFLV_VMM, user_id=7)
        self.assertEqual([OK], wire.call(self.address, confirm, ['byte']))
        self.assertFalse(self.record(7)['resize_pending'])

        suspend = wire.request(codec.AS_RM_NOTIFY_VMM, user_id=7, type=1)
        self.assertEqual([], wire.call(self.address, suspend))
        self.wait_until(lambda: self.record(7)['status'] == 2,
                        what='the suspend')
        self.agent.ds.recorder.wait_for('notify_vm',
                                        lambda kw: kw['status'] == 2)
        # The SLAM's start resumes it without waiting for a new AS
        # registration (the AS of a resumed VM is still running).
        began = time.monotonic()
        self.assertEqual([OK, 7, ip],
                         self.slam_client.start_vm(self.address, 7))
        self.assertLess(time.monotonic() - began, 10)
        self.assertEqual(3, self.record(7)['status'])
        remove = wire.request(codec.AS_RM_NOTIFY_VMM, user_id=7, type=2)
        self.assertEqual([], wire.call(self.address, remove))
        self.wait_until(lambda: self.record(7) is None, what='the removal')

        self.start_with_as(8)
        wire.OriginalDirectoryServer().deregister(self.address, 8)
        self.wait_until(lambda: self.record(8) is None,
                        what='the DS deregistration')
        self.agent.ds.recorder.wait_for('notify_vm',
                                        lambda kw: kw['status'] == 4,
                                        count=2)
        self.assert_no_traceback()

    def test_as_not_ready_fails_the_start(self):
        started, as_reply, _ip = self.start_with_as(9, as_status=ERROR)
        self.assertEqual([OK, 9], as_reply)
        self.assertEqual([ERROR], started)
        self.wait_until(lambda: self.record(9) is None,
                        what='the failed start cleaned up')

    def test_bad_frames_and_idle_connections(self):
        self.start_with_as(7)
        before = self.agent.api.get_vm_info({})
        idle = [socket.create_connection(self.address) for _ in range(20)]
        try:
            frames = [b'GET / HTTP/1.0\r\n\r\n',
                      codec.HEADER + b'\x77\x01\x63',
                      codec.HEADER + b'\x77\x05\x3c\x00\x00\x00\x00',
                      codec.HEADER + b'\x73\x72\x00\x03abc',
                      wire.request(codec.SLAM_START_VM_VMM, user_id=-3,
                                   os_type=7, vcpus=0, memory_mb=-1,
                                   gpu_cores=0),
                      wire.request(codec.AS_RM_NOTIFY_VMM, user_id=7,
                                   type=9)]
            for frame in frames:
                with socket.create_connection(self.address,
                                              timeout=10) as sock:
                    sock.sendall(frame)
                    sock.shutdown(socket.SHUT_WR)
                    while sock.recv(4096):
                        pass
            # Twenty idle connections hold no worker: queries answer.
            began = time.monotonic()
            self.assertEqual(OK, self.query(codec.SLAM_GET_VMINFO_VMM)[0])
            self.assertLess(time.monotonic() - began, 2)
        finally:
            for sock in idle:
                sock.close()
        self.assertEqual(before, self.agent.api.get_vm_info({}))
        self.assertTrue(self.agent.log_lines('Bad legacy frame from'))
        self.assertTrue(self.agent.log_lines('answered ERROR'))
        self.assert_no_traceback()


class TestPeerMode(LegacyAgentTestCase):
    """The agent with the original DS and SLAM as its peers."""

    with_peers = False

    def extra_overrides(self):
        self.ds = wire.OriginalDirectoryServer().start()
        self.addCleanup(self.ds.stop)
        self.slam = wire.OriginalSlam().start()
        self.addCleanup(self.slam.stop)
        # libvirtd's test driver: its domains outlive an agent restart.
        return {'peer_protocol': 'legacy', 'legacy.ds_host': '127.0.0.1',
                'legacy.ds_port': self.ds.port, 'helper_vm_count': 1,
                'registration_retry_max_interval': 1,
                'libvirt.connection_uri': SHARED_URI}

    def setUp(self):
        super().setUp()
        self.addCleanup(remove_domains_of, self.agent.values[
            ('DEFAULT', 'host')])

    def test_registration_reports_vms_and_restart(self):
        # ERROR until a SLAM registered with the DS: the agent retries.
        self.ds.wait_for(codec.VMM_REGISTER_DS,
                         lambda f: f.get('refused') == 'no SLAM')
        self.assertEqual(None, self.agent.api.get_host_status({})['vmm_id'])
        self.slam.register_with(self.ds)
        registered = self.ds.wait_for(codec.VMM_REGISTER_DS,
                                      lambda f: 'vmm_id' in f)[0]
        self.assertEqual('127.0.0.1', registered['ip_address'])
        self.assertEqual(4, registered['mac_type'])
        self.assertEqual(10, len(registered['available_types']))
        self.slam.wait_for(codec.VMM_REGISTER_SLAM)
        self.assertEqual({'ip_address': '127.0.0.1', 'port': self.port},
                         self.slam.calls(codec.VMM_REGISTER_SLAM)[0])
        self.ds.wait_for(codec.VMM_NOTIFY_DS, lambda f: f['vmm_id'] == 4242)
        # The helper VM: registered (category 1), then its address.
        helper = self.ds.wait_for(codec.VM_REGISTER_DS,
                                  lambda f: f['category'] == 1)[0]
        self.assertEqual(-1, helper['user_id'])
        self.ds.wait_for(codec.HELPER_NOTIFY_DS,
                         lambda f: f['vm_id'] == helper['vm_id'])

        # A start through the SLAM with the AS hand-shake.
        started, as_reply, ip = self.start_with_as(7)
        self.assertEqual([OK, 7, ip], started)
        self.assertEqual([OK, 7], as_reply)
        normal = self.ds.wait_for(codec.VM_REGISTER_DS,
                                  lambda f: f['user_id'] == 7)[0]
        self.assertEqual((0, 1), (normal['category'], normal['status']))
        self.assertEqual(normal['vm_id'], self.record(7)['vm_id'])
        suspend = wire.request(codec.AS_RM_NOTIFY_VMM, user_id=7, type=1)
        wire.call(self.address, suspend)
        self.ds.wait_for(codec.VM_NOTIFY_DS,
                         lambda f: f == {'vm_id': normal['vm_id'],
                                         'status': 2})

        # Restarted, the agent keeps its VMM id: no second VMM_REGISTER
        # (the original DS would refuse it), the SLAM is told again.
        registrations = len(self.ds.calls(codec.VMM_REGISTER_DS))
        self.agent.terminate()
        self.agent.start()
        self.slam.wait_for(codec.VMM_REGISTER_SLAM, count=2)
        self.assertEqual(4242, self.agent.api.get_host_status({})['vmm_id'])
        self.assertEqual(registrations,
                         len(self.ds.calls(codec.VMM_REGISTER_DS)))
        # A start after the restart: the VM kept (resumed at once) or, if
        # the hypervisor lost it, made again with the AS hand-shake; either
        # way registered under the same VMM id.
        started, _reply, _ip = self.start_with_as(7)
        self.assertEqual(OK, started[0], self.agent.log_tail(40))
        self.assertEqual({4242}, {f['vmm_id'] for f in
                                  self.ds.calls(codec.VM_REGISTER_DS)})
        self.assert_no_traceback()
