"""Real guests under a real libvirtd with QEMU (TCG), driven by the agent.

One agent process (``compute_driver = libvirt``, ``qemu:///system``) and
one real guest (Debian kernel + busybox initramfs, direct kernel boot, an
overlay of a template disk, DHCP on an isolated network) go through the
whole life cycle. The tests of this module run in order and share them.

The guest's own Acceleration Server stand-in registers it: with
``rapid.as=legacy:HOST:PORT`` on its kernel command line its ``/init``
sends the original AS's ``AS_RM_REGISTER_VMM`` to the agent's legacy port
(``[legacy] enabled``), so ``start_vm`` completes only once the guest
itself registered. The last test boots a guest with ``rapid.as=rpc``
under a second agent (legacy protocol off): the guest announces its AS on
its console and the test registers it over RPC (the guest has no AMQP
client), the RPC AS variant.
"""

import json
import os
import re
import socket
import subprocess
import threading
import time
from xml.etree import ElementTree

import libvirt
import pytest

from rapid_vmm.tests.functional import agent as agent_fixture

USER = 11
MiB = 1024 * 1024
GiB = 1024 * MiB


def wait_until(predicate, timeout, what, agent=None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = agent.log_tail() if agent is not None else ''
            raise AssertionError(f'{what} not reached in {timeout} s\n{tail}')
        time.sleep(0.5)


def guest_agent_values(guest, cmdline_extra: str, **overrides) -> dict:
    values = {
        'libvirt.connection_uri': 'qemu:///system',
        'libvirt.virt_type': guest.get('RAPID_GUEST_DOMAIN_TYPE', 'qemu'),
        'libvirt.normal_image': guest['RAPID_GUEST_TEMPLATE'],
        'libvirt.kernel': guest['RAPID_GUEST_KERNEL'],
        'libvirt.initrd': guest['RAPID_GUEST_INITRD'],
        'libvirt.kernel_cmdline': (guest['RAPID_GUEST_CMDLINE'] + ' ' +
                                   cmdline_extra),
        'libvirt.network': guest['NETWORK'],
        'libvirt.ip_sources': 'lease',
        'libvirt.ip_timeout': 150,
        # Memory growth by change_flavor is opt-in (test_change_flavor_live).
        'libvirt.max_memory_mb': 256,
        'vm_types': '1,2 x 128,256 x 1',
        'as_register_timeout': 180,
        'report_interval': 2,
        'reconcile_interval': 5,
        'ram_allocation_ratio': 1.0,
        'disk_allocation_ratio': 1.0,
    }
    values.update(overrides)
    return values


def network_host_address(network: str) -> str:
    """The host's address on the test network (its <ip address=...>)."""
    conn = libvirt.open('qemu:///system')
    try:
        xml = conn.networkLookupByName(network).XMLDesc(0)
    finally:
        conn.close()
    return ElementTree.fromstring(xml).find('ip').get('address')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('', 0))
        return sock.getsockname()[1]


@pytest.fixture(scope='module')
def agent(guest):
    host_ip = network_host_address(guest['NETWORK'])
    port = free_port()
    subnet = host_ip.rsplit('.', 1)[0] + '.0/24'
    fixture = agent_fixture.AgentProcess(**guest_agent_values(
        guest, f'rapid.as=legacy:{host_ip}:{port}', **{
            'legacy.enabled': True, 'legacy.bind_host': host_ip,
            'legacy.port': port,
            'legacy.allowed_peers': [subnet, '127.0.0.0/8']}))
    fixture.setUp()
    try:
        fixture.start()
        yield fixture
    finally:
        fixture.cleanUp()


@pytest.fixture(scope='module')
def conn():
    connection = libvirt.open('qemu:///system')
    yield connection
    connection.close()


@pytest.fixture(scope='module')
def vm(agent, guest, conn):
    """Start the guest through the agent; its own AS registers it."""
    api = agent.api
    started = time.monotonic()
    record = api.start_vm({}, user_id=USER, os_type=0, vcpus=1,
                          memory_mb=128, disk_gb=1)
    record['boot_s'] = time.monotonic() - started
    yield record


def domain(conn, name):
    return conn.lookupByName(name)


def serial_log(agent, name):
    path = os.path.join(agent.values[('DEFAULT', 'data_path')],
                        'instances', name + '.console.log')
    with open(path, encoding='utf-8', errors='replace') as log:
        return log.read()


def test_start_vm_boots_a_real_guest_with_the_lease_ip(agent, vm, conn,
                                                       guest):
    dom = domain(conn, vm['name'])
    assert dom.isActive()
    assert dom.isPersistent()
    xml = dom.XMLDesc(0)
    assert "type='qemu'" in xml.split('\n', 1)[0]
    # The IP the agent handed back is the one the guest itself configured.
    marker = guest.get('RAPID_GUEST_READY_MARKER', 'RAPID-GUEST-READY')
    match = wait_until(lambda: re.search(
        rf'{marker} (\S+)', serial_log(agent, vm['name'])), 60,
        'the guest\'s ready marker')
    assert match.group(1) == vm['ip_address']
    # Its disk is a qcow2 overlay of the template, 1 GiB.
    disk = agent.api.get_vm_usage({}, resource='disk', user_id=USER)[0]
    assert disk['capacity_bytes'] == 1 * GiB
    path = os.path.join(agent.values[('DEFAULT', 'data_path')], 'instances',
                        vm['name'] + '.qcow2')
    info = json.loads(subprocess.run(
        ['qemu-img', 'info', '-U', '--output=json', path], check=True,
        capture_output=True, text=True).stdout)
    assert info['format'] == 'qcow2'
    assert info['backing-filename'] == guest['RAPID_GUEST_TEMPLATE']
    registered = agent.ds.recorder.wait_for(
        'register_vm', lambda kw: kw['user_id'] == USER)
    assert registered[0]['vm_id'] == vm['vm_id']
    print(f"boot to start_vm reply: {vm['boot_s']:.1f} s")


def test_the_guests_own_as_registered_over_the_legacy_port(agent, vm):
    # start_vm returned only after the guest's AS registered (the agent
    # waits up to as_register_timeout for it, nobody else registers it).
    assert agent.api.get_vm_info({}, user_id=USER)[0]['as_ready'] is True
    line = wait_until(lambda: re.search(
        r'RAPID-GUEST-AS legacy registered user (\d+)',
        serial_log(agent, vm['name'])), 30, 'the AS line on the console')
    assert int(line.group(1)) == USER
    assert agent.log_lines('registered over the legacy protocol')


def test_usage_is_non_zero_and_sane(agent, vm):
    api = agent.api

    def cpu():
        usage = api.get_vm_usage({}, resource='cpu', user_id=USER)[0]
        return usage if usage['cpu_util_percent'] is not None else None

    usage = wait_until(cpu, 30, 'a CPU figure', agent)
    assert 0 < usage['cpu_util_percent'] <= 100
    assert usage['source'] == 'cpu.time'
    memory = api.get_vm_usage({}, resource='memory', user_id=USER)[0]
    assert memory['memory_mb'] == 128
    assert 0 < memory['memory_used_mb'] <= 256
    assert memory['source'].startswith('balloon')
    disk = api.get_vm_usage({}, resource='disk', user_id=USER)[0]
    assert disk['source'] == 'block-stats'
    # The guest runs from its initramfs and writes nothing to its disk:
    # the overlay holds only its own metadata.
    assert 0 <= disk['allocation_bytes'] < disk['capacity_bytes']
    assert 0 < disk['physical_bytes'] < 10 * MiB


def test_suspend_and_resume(agent, vm, conn):
    api = agent.api
    dom = domain(conn, vm['name'])
    assert api.suspend_vm({}, user_id=USER)['status'] == 2
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED

    def vcpu_time():
        return sum(vcpu[2] for vcpu in dom.vcpus()[0])

    before = vcpu_time()
    time.sleep(2)
    assert vcpu_time() == before  # paused: its vCPUs do not run
    assert api.resume_vm({}, user_id=USER)['status'] == 3
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    wait_until(lambda: vcpu_time() > before, 20, 'the guest running again')
    statuses = [kw['status'] for kw in agent.ds.recorder.calls('notify_vm')]
    assert statuses[-2:] == [2, 3]


def test_change_flavor_live(agent, vm, conn):
    api = agent.api
    dom = domain(conn, vm['name'])
    resized = api.change_flavor({}, user_id=USER, vcpus=2, memory_mb=256)
    assert (resized['vcpus'], resized['memory_mb']) == (2, 256)
    assert dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE) == 2
    assert dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_CONFIG) == 2
    wait_until(lambda: dom.info()[2] >= 250 * 1024, 30,
               'the balloon at 256 MiB')
    config = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "<currentMemory unit='KiB'>262144</currentMemory>" in config
    confirmed = api.confirm_flavor({}, user_id=USER)
    assert not confirmed['resize_pending']
    assert api.confirm_flavor({}, user_id=USER) == confirmed


def test_agent_killed_while_the_guest_runs_comes_back_knowing_it(
        agent, vm, conn):
    agent.kill()
    assert domain(conn, vm['name']).isActive()
    agent.start()
    record = agent.api.get_vm_info({}, user_id=USER)[0]
    assert record['name'] == vm['name']
    assert record['status'] in (1, 3)
    assert record['ip_address'] == vm['ip_address']
    assert (record['vcpus'], record['memory_mb']) == (2, 256)
    assert domain(conn, vm['name']).isActive()
    assert agent.api.get_host_status({})['vmm_id'] == 4242


def test_remove_leaves_no_disk_and_no_domain(agent, vm, conn):
    images = os.path.join(agent.values[('DEFAULT', 'data_path')],
                          'instances')
    assert agent.api.remove_vm({}, user_id=USER) is None
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(vm['name'])
    assert [n for n in os.listdir(images) if vm['name'] in n] == []
    agent.ds.recorder.wait_for('notify_vm', lambda kw: kw['status'] == 4)


@pytest.fixture
def rpc_agent(guest):
    fixture = agent_fixture.AgentProcess(**guest_agent_values(
        guest, 'rapid.as=rpc'))
    fixture.setUp()
    try:
        fixture.start()
        yield fixture
    finally:
        fixture.cleanUp()


def test_guest_with_an_rpc_as(rpc_agent, conn):
    """The RPC variant: the guest says its AS is up; the test registers
    it over RPC for it (as an RPC AS would); only then start_vm returns."""
    api = rpc_agent.api
    user = USER + 1
    result = {}

    def run_start():
        try:
            result['vm'] = api.start_vm({}, user_id=user, os_type=0,
                                        vcpus=1, memory_mb=128, disk_gb=1)
        except Exception as exc:
            result['error'] = exc

    thread = threading.Thread(target=run_start)
    thread.start()

    def announced():
        if 'error' in result:
            raise AssertionError(f"start_vm failed: {result['error']}")
        mine = [v for v in api.get_vm_info({}) if v['user_id'] == user]
        if not mine:
            return None
        try:
            text = serial_log(rpc_agent, mine[0]['name'])
        except OSError:
            return None
        return re.search(r'RAPID-GUEST-AS rpc ready (\S+)', text)

    match = wait_until(announced, 200, 'the guest\'s AS announcement',
                       rpc_agent)
    assert 'vm' not in result  # still waiting for the AS
    reply = api.as_register({}, ip_address=match.group(1))
    assert reply == {'user_id': user}
    api.as_confirm({}, user_id=user)
    thread.join(60)
    assert 'vm' in result, rpc_agent.log_tail()
    assert result['vm']['ip_address'] == match.group(1)
    assert api.remove_vm({}, user_id=user) is None
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(result['vm']['name'])
