"""Optional: the agent with the REAL original Java DS and SLAM.

Skipped unless a local build of the originals is named by environment
variables (their sources are public, GitHub RapidProjectH2020; nothing of
them is in this repository, nor any script that fetches them):

* ``RAPID_VMM_ORIGINAL_DS_CP`` - classpath of ``eu.rapid.ds.DirectoryServer``
  (rapid-DirectoryServer compiled against its own ``lib/``, with a
  ``db.properties`` and ``myBatisConfig.xml`` pointing at MariaDB);
* ``RAPID_VMM_ORIGINAL_DS_SCHEMA`` - the DS's ``rapid_ds.sql`` with the
  database renamed to ``RAPID_VMM_ORIGINAL_DS_DB`` (default
  ``rapid_legacy_ds``); the test loads it (``mysql -h 127.0.0.1 -u root``)
  so that every run starts from an empty DS;
* ``RAPID_VMM_ORIGINAL_SLAM_CP`` and ``RAPID_VMM_ORIGINAL_SLAM_CONFIG`` -
  classpath of ``eu.atos.sla.core.MainSLAM`` (SLAM/sla-sockets) and the
  name of its properties resource (server 127.0.0.1:9002, DS
  127.0.0.1:9001).

* ``RAPID_VMM_ORIGINAL_AS_CP`` (optional, root) - classpath of
  ``eu.project.rapid.as.AccelerationServer`` (rapid-linux, with
  rapid-common's sources) whose ``config.properties`` names the VMM, DS and
  SLAM at 192.168.77.1: the real AS then runs in a network namespace at
  192.168.77.2 (the original AS takes the first 192.168.* address as its
  VM's), the agent finds its VM there (``ip_command``) and the AS's own
  registration (VMM, DS, status) completes the start; the notice before a
  resize goes to its port 4322.

The originals use fixed ports (DS 9001 and its VMM port 9000, SLAM 9002):
the agent serves ``[legacy]`` on 9000. The AC and the AS are played here
with the original frames (the AS exactly as rapid-linux's
AccelerationServer registers: VMM, then DS, then its status to the VMM).
See doc/source/legacy.md, "Checking against the original components".
"""

import os
import socket
import subprocess
import threading
import time

from oslo_config import cfg
import pytest

from rapid_vmm import conf as rapid_conf
from rapid_vmm.legacy import as_notice
from rapid_vmm.legacy import codec
from rapid_vmm.tests.functional import agent as agent_fixture
from rapid_vmm.tests.functional import test_legacy
from rapid_vmm.tests.unit.legacy import wire

DS_CP = os.environ.get('RAPID_VMM_ORIGINAL_DS_CP')
DS_SCHEMA = os.environ.get('RAPID_VMM_ORIGINAL_DS_SCHEMA')
DS_DB = os.environ.get('RAPID_VMM_ORIGINAL_DS_DB', 'rapid_legacy_ds')
SLAM_CP = os.environ.get('RAPID_VMM_ORIGINAL_SLAM_CP')
AS_CP = os.environ.get('RAPID_VMM_ORIGINAL_AS_CP')
NETNS, HOST_IF, NS_IF = 'rvmm-legacy-as', 'rvmmleg0', 'rvmmleg1'
HOST_IP, AS_IP = '192.168.77.1', '192.168.77.2'
SLAM_CONFIG = os.environ.get('RAPID_VMM_ORIGINAL_SLAM_CONFIG')

pytestmark = pytest.mark.skipif(
    not all((DS_CP, DS_SCHEMA, SLAM_CP, SLAM_CONFIG)),
    reason='no local build of the original DS and SLAM '
           '(RAPID_VMM_ORIGINAL_* unset)')

DS = ('127.0.0.1', 9001)
SLAM = ('127.0.0.1', 9002)
VMM = ('127.0.0.1', 9000)
OK, ERROR = codec.OK, codec.ERROR
AC_REGISTER_NEW_DS = 34
AC_REGISTER_SLAM = 36
AS_RM_REGISTER_DS = 37


def sql(query: str) -> list[list[str]]:
    out = subprocess.run(['mysql', '-h', '127.0.0.1', '-u', 'root', '-N',
                          '-B', '-e', query, DS_DB], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return [line.split('\t') for line in out.splitlines()]


def wait_port(address, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(address, timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f'nothing listens on {address}')


def wait_until(predicate, timeout=60, what='condition'):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f'{what} not reached in {timeout} s')
        time.sleep(0.2)


class Java:
    def __init__(self, name, classpath, main, args, log_dir):
        self.log = os.path.join(log_dir, f'{name}.log')
        with open(self.log, 'wb') as out:
            self.process = subprocess.Popen(
                ['java', '-cp', classpath, main, *args], stdout=out,
                stderr=subprocess.STDOUT, cwd=log_dir,
                start_new_session=True)

    def text(self) -> str:
        with open(self.log, encoding='utf-8', errors='replace') as log:
            return log.read()

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def exchange(address, frame, read, timeout=150):
    """Connect, send ``frame``, ``read(reader)`` the reply."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(frame)
        reader = codec.Reader(codec.SocketSource(sock, deadline))
        reader.read_header()
        return read(reader)


def ac_register_new_when_placed(**kwargs):
    """AC_REGISTER_NEW_DS until the DS places the user on a host.

    The original DS skips a host whose reported CPU load leaves less
    than the request (vcpus / cores of the host): on a busy machine a
    report or two later it is placed.
    """
    return wait_until(lambda: (lambda r: r if r[0] == OK else None)(
        ac_register_new(**kwargs)), 60, 'the DS placing the user')


def ac_register_new(user_id=0, vcpus=1, memory_mb=1024, gpu_cores=0):
    frame = (codec.Writer().write_byte(AC_REGISTER_NEW_DS)
             .write_long(user_id).write_int(vcpus).write_int(memory_mb)
             .write_int(gpu_cores).getvalue())

    def read(reader):
        status = reader.read_byte()
        if status != OK:
            return [status]
        return [status, reader.read_long(), reader.read_string_list(),
                reader.read_utf(), reader.read_int()]
    return exchange(DS, frame, read)


def ac_register_slam(user_id, vmm, vcpus=1, memory_mb=1024, os_type=0):
    frame = (codec.Writer().write_byte(AC_REGISTER_SLAM).write_long(user_id)
             .write_int(os_type).write_utf(vmm[0]).write_int(vmm[1])
             .write_int(vcpus).write_int(memory_mb).write_int(0)
             .write_utf('{"QoS":[]}').getvalue())

    def read(reader):
        status = reader.read_byte()
        return [status, reader.read_utf()] if status == OK else [status]
    return exchange(SLAM, frame, read)


def as_boots(vm_ip):
    """rapid-linux's AS at boot: VMM, DS, then its status to the VMM."""
    deadline = time.monotonic() + 60
    with socket.create_connection(VMM, timeout=60) as vmm:
        vmm.sendall(wire.request(codec.AS_RM_REGISTER_VMM,
                                 ip_address=vm_ip))
        reader = codec.Reader(codec.SocketSource(vmm, deadline))
        reader.read_header()
        if reader.read_byte() != OK:
            return None, None
        user_id = reader.read_long()
        reply = _as_register_ds(user_id)
        status = OK if reply[0] == OK else ERROR
        vmm.sendall(codec.Writer(header=False).write_byte(status)
                    .getvalue())
        return user_id, reply


def _as_register_ds(user_id):
    def read(reader):
        status = reader.read_byte()
        return [status, reader.read_long()] if status == OK else [status]
    return exchange(DS, codec.Writer().write_byte(AS_RM_REGISTER_DS)
                    .write_long(user_id).getvalue(), read, timeout=30)


@pytest.fixture(scope='module')
def originals(tmp_path_factory):
    logs = str(tmp_path_factory.mktemp('originals'))
    subprocess.run(f'mysql -h 127.0.0.1 -u root < {DS_SCHEMA}', shell=True,
                   check=True, timeout=60)
    ds = Java('ds', DS_CP, 'eu.rapid.ds.DirectoryServer', [], logs)
    try:
        wait_port(DS)
        slam = Java('slam', SLAM_CP, 'eu.atos.sla.core.MainSLAM',
                    [SLAM_CONFIG], logs)
        try:
            wait_port(SLAM)
            wait_until(lambda: 'SLAM_REGISTER_DS' in ds.text(), 30,
                       'the SLAM registered with the DS')
            yield ds, slam
        finally:
            slam.stop()
    finally:
        ds.stop()


def start_agent():
    agent = agent_fixture.AgentProcess(peers=False, **{
        'peer_protocol': 'legacy', 'legacy.enabled': True,
        'legacy.bind_host': '127.0.0.1', 'legacy.port': VMM[1],
        'legacy.ds_host': DS[0], 'legacy.ds_port': DS[1],
        'my_ip': '127.0.0.1', 'helper_vm_count': 2,
        'as_register_timeout': 60, 'report_interval': 1,
        'registration_retry_max_interval': 2,
        'libvirt.connection_uri': test_legacy.SHARED_URI})
    agent.setUp()
    return agent


def record(agent, user_id):
    vms = [vm for vm in agent.api.get_vm_info({})
           if vm['user_id'] == user_id]
    return vms[0] if vms else None


def start_for_ac(agent, user_id, vm_known=False):
    """AC -> SLAM -> VMM START_VM, the AS registering meanwhile."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        'reply', ac_register_slam(user_id, VMM)))
    thread.start()
    as_reply = None
    if not vm_known:
        ip = wait_until(lambda: (record(agent, user_id) or {}).get(
            'ip_address'), 60, 'the VM\'s address')
        as_reply = as_boots(ip)
    thread.join(150)
    return result.get('reply'), as_reply


def query(command, user_id):
    def read(reader):
        status = reader.read_byte()
        return [status, reader.read_string_list()] if status == OK \
            else [status]
    return exchange(VMM, wire.request(command, user_id=user_id), read)


def test_with_the_original_ds_and_slam(originals):
    _ds, slam = originals
    agent = start_agent()
    host = agent.values[('DEFAULT', 'host')]
    try:
        agent.start()
        # Registration with the DS (its id) and the SLAM (our port).
        rows = wait_until(lambda: sql('select vmmid, ipv4, mactype, '
                                      'cpunums, availtypes from vmm_info'),
                          60, 'the VMM in the DS')
        assert len(rows) == 1 and rows[0][1:3] == ['127.0.0.1', '4']
        vmm_id = int(rows[0][0])
        assert agent.api.get_host_status({})['vmm_id'] == vmm_id
        wait_until(lambda: 'registered with ip: 127.0.0.1 port: 9000'
                   in slam.text(), 30, 'the VMM in the SLAM')
        # Reports: the DS's row changes with every VMM_NOTIFY.
        first = sql('select timestamp from vmm_info')[0][0]
        wait_until(lambda: sql('select timestamp from vmm_info')[0][0]
                   != first, 30, 'a report')
        # Two helpers, registered with their addresses.
        helpers = wait_until(lambda: [r for r in sql(
            'select vmid, userid, ipv4 from vm_info where category = 1')
            if r[2] != 'NULL'] if len(sql(
                'select vmid from vm_info where category = 1')) == 2
            else None, 60, 'two helpers with their addresses')
        assert sorted(int(r[1]) for r in helpers) == [-2, -1]

        # An AC asks the DS for hosts, then the SLAM for a VM.
        reply = ac_register_new_when_placed(vcpus=1, memory_mb=1024)
        assert reply[0] == OK and reply[2] == ['127.0.0.1'] and \
            reply[3:] == ['127.0.0.1', SLAM[1]]
        user_id = reply[1]
        started, (as_user, as_ds) = start_for_ac(agent, user_id)
        vm = record(agent, user_id)
        assert as_user == user_id
        assert as_ds == [OK, vm['vm_id']]  # the DS knew the VM already
        assert started == [OK, vm['ip_address']]
        assert vm['as_ready'] is True
        assert sql(f'select vmmid, category, vmstatus from vm_info where '
                   f'vmid = {vm["vm_id"]}') == [[str(vmm_id), '0', '1']]

        # Usage and info as the SLAM asks for them.
        info = query(codec.SLAM_GET_VMINFO_VMM, user_id)
        assert info == [OK, [str(user_id), str(vm['vm_id']), '1', '1024',
                             '20', '0']]
        assert query(codec.SLAM_GET_VMINFO_VMM, 0)[0] == OK
        assert query(codec.SLAM_GET_VMDISK_VMM, user_id)[0] == OK

        # Resize and confirm.
        change = wire.request(codec.SLAM_CHANGE_VMFLV_VMM, user_id=user_id,
                              vcpus=2, memory_mb=0, disk_gb=0)
        assert wire.call(VMM, change, ['byte']) == [OK]
        assert record(agent, user_id)['vcpus'] == 2
        confirm = wire.request(codec.SLAM_CONFIRM_VMFLV_VMM,
                               user_id=user_id)
        assert wire.call(VMM, confirm, ['byte']) == [OK]

        # Suspend (the AS asks), the DS is told; resume through the SLAM
        # without a new AS registration; the DS is told.
        wire.call(VMM, wire.request(codec.AS_RM_NOTIFY_VMM, user_id=user_id,
                                    type=1))
        wait_until(lambda: sql(f'select vmstatus from vm_info where vmid = '
                               f'{vm["vm_id"]}') == [['2']], 30,
                   'status 2 in the DS')
        began = time.monotonic()
        started, _ = start_for_ac(agent, user_id, vm_known=True)
        assert started == [OK, vm['ip_address']]
        assert time.monotonic() - began < 20
        wait_until(lambda: sql(f'select vmstatus from vm_info where vmid = '
                               f'{vm["vm_id"]}') == [['3']], 30,
                   'status 3 in the DS')

        # Remove (the AS asks): status 4 in the DS.
        wire.call(VMM, wire.request(codec.AS_RM_NOTIFY_VMM, user_id=user_id,
                                    type=2))
        wait_until(lambda: record(agent, user_id) is None, 30, 'removal')
        wait_until(lambda: sql(f'select vmstatus from vm_info where vmid = '
                               f'{vm["vm_id"]}') == [['4']], 30,
                   'status 4 in the DS')

        # Deregistration: the DS sends DS_VM_DEREGISTER_VMM to our port
        # when the AC registers again as new.
        second = ac_register_new_when_placed()[1]
        start_for_ac(agent, second)
        assert record(agent, second) is not None
        assert ac_register_new_when_placed(user_id=second)[0] == OK
        wait_until(lambda: record(agent, second) is None, 30,
                   'the deregistered VM removed')

        # Bad frames: nothing changes, the agent serves on.
        before = agent.api.get_vm_info({})
        for frame in (b'\x00' * 50, codec.HEADER + b'\x77\x01\x63',
                      codec.HEADER + b'\x77\x03\x3c\x00\x00'):
            with socket.create_connection(VMM, timeout=10) as sock:
                sock.sendall(frame)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(4096):
                    pass
        assert agent.api.get_vm_info({}) == before

        # Restart keeping the VMM id: no second registration with the DS
        # (which would refuse it), the SLAM told again.
        agent.terminate()
        agent.start()
        wait_until(lambda: slam.text().count(
            'registered with ip: 127.0.0.1 port: 9000') >= 2, 60,
            'the SLAM registration after the restart')
        assert agent.api.get_host_status({})['vmm_id'] == vmm_id
        assert len(sql('select vmmid from vm_info')) >= 1
        assert len(sql('select vmmid from vmm_info')) == 1
        third = ac_register_new_when_placed()[1]
        started, _ = start_for_ac(agent, third)
        assert started[0] == OK
        assert sql(f'select vmmid from vm_info where userid = {third}') == [
            [str(vmm_id)]]
        assert agent.log_lines('Traceback') == []
    finally:
        agent.cleanUp()
        test_legacy.remove_domains_of(host)


def _ip(*args, check=True):
    return subprocess.run(['ip', *args], capture_output=True, text=True,
                          timeout=30, check=check)


@pytest.fixture
def as_namespace(tmp_path):
    """A network namespace at 192.168.77.2 for the AS, its "VM"."""
    if not AS_CP or os.geteuid() != 0:
        pytest.skip('RAPID_VMM_ORIGINAL_AS_CP unset or not root')
    _ip('netns', 'del', NETNS, check=False)
    _ip('link', 'del', HOST_IF, check=False)
    try:
        _ip('netns', 'add', NETNS)
        _ip('link', 'add', HOST_IF, 'type', 'veth', 'peer', 'name', NS_IF)
        _ip('link', 'set', NS_IF, 'netns', NETNS)
        _ip('addr', 'add', f'{HOST_IP}/30', 'dev', HOST_IF)
        _ip('link', 'set', HOST_IF, 'up')
        for args in (('addr', 'add', f'{AS_IP}/30', 'dev', NS_IF),
                     ('link', 'set', NS_IF, 'up'), ('link', 'set', 'lo',
                                                    'up')):
            _ip('netns', 'exec', NETNS, 'ip', *args)
        yield str(tmp_path)
    finally:
        _ip('link', 'del', HOST_IF, check=False)
        _ip('netns', 'del', NETNS, check=False)


def test_with_the_real_acceleration_server(originals, as_namespace):
    _ds, _slam = originals
    home = os.path.join(as_namespace, 'home')
    os.makedirs(home)
    agent = agent_fixture.AgentProcess(peers=False, **{
        'peer_protocol': 'legacy', 'legacy.enabled': True,
        'legacy.bind_host': HOST_IP, 'legacy.port': VMM[1],
        'legacy.ds_host': DS[0], 'legacy.ds_port': DS[1],
        'my_ip': HOST_IP, 'helper_vm_count': 0,
        'as_register_timeout': 90, 'report_interval': 2,
        'registration_retry_max_interval': 2,
        # The "VM" of the AS is the namespace.
        'libvirt.ip_command': f"sh -c 'echo {AS_IP}' vm",
        'libvirt.connection_uri': test_legacy.SHARED_URI})
    agent.setUp()
    host = agent.values[('DEFAULT', 'host')]
    vmm = (HOST_IP, VMM[1])
    java = None
    try:
        agent.start()
        vmm_id = wait_until(lambda: agent.api.get_host_status({})['vmm_id'],
                            60, 'registration with the DS')
        reply = ac_register_new_when_placed()
        assert reply[0] == OK and HOST_IP in reply[2]
        user_id = reply[1]
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault(
            'reply', ac_register_slam(user_id, vmm)))
        thread.start()
        wait_until(lambda: record(agent, user_id), 60, 'the VM record')
        # The VM "boots": its AS starts and registers once, by itself.
        log = open(os.path.join(as_namespace, 'as.log'), 'wb')
        java = subprocess.Popen(
            ['ip', 'netns', 'exec', NETNS, 'java', f'-Duser.home={home}',
             '-cp', AS_CP, 'eu.project.rapid.as.AccelerationServer'],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        thread.join(150)
        assert result.get('reply') == [OK, AS_IP], agent.log_tail(60)
        vm = record(agent, user_id)
        assert vm['as_ready'] is True
        # The DS recorded the AS's own registration (offloadstatus 1).
        assert sql(f'select vmmid, offloadstatus, vmstatus from vm_info '
                   f'where vmid = {vm["vm_id"]}') == [[str(vmm_id), '1',
                                                       '1']]
        # The notice before a resize, to the real AS's port 4322.
        conf = cfg.ConfigOpts()
        rapid_conf.register_opts(conf)
        conf([], default_config_files=[], default_config_dirs=[])
        outcome = as_notice.notify_migration(
            conf, {'user_id': user_id, 'as_protocol': 'legacy',
                   'ip_address': AS_IP})
        assert outcome is as_notice.Outcome.READY
        change = wire.request(codec.SLAM_CHANGE_VMFLV_VMM, user_id=user_id,
                              vcpus=2, memory_mb=2048, disk_gb=0)
        assert wire.call(vmm, change, ['byte']) == [OK]
        confirm = wire.request(codec.SLAM_CONFIRM_VMFLV_VMM,
                               user_id=user_id)
        assert wire.call(vmm, confirm, ['byte']) == [OK]
        wire.call(vmm, wire.request(codec.AS_RM_NOTIFY_VMM, user_id=user_id,
                                    type=2))
        wait_until(lambda: record(agent, user_id) is None, 30, 'removal')
        with open(os.path.join(as_namespace, 'as.log'),
                  encoding='utf-8', errors='replace') as as_log:
            text = as_log.read()
        assert 'userId is: ' + str(user_id) in text
        assert 'informing that there will be a VM migration' in text
        assert agent.log_lines('Traceback') == []
    finally:
        if java is not None:
            os.killpg(java.pid, 15)
            java.wait(10)
        agent.cleanUp()
        test_legacy.remove_domains_of(host)
