"""``suspend_mode = save`` with a real guest: its RAM is freed, it comes back.

One agent process (``qemu:///system``, ``suspend_mode = save``) starts the
system tests' real guest, suspends it through the API (libvirt managed
save: the QEMU process ends and the guest's memory is on disk), and resumes
it: the same guest goes on (its heartbeat counter continues, it did not
boot again) with the same IP. Run under ``flock /tmp/rapid-system.lock``.
"""

import os
import re
import threading
import time

import libvirt
import psutil
import pytest

from rapid_vmm.tests.functional import agent as agent_fixture

USER = 12
ALIVE = re.compile(r'RAPID-GUEST-ALIVE (\d+) ip=(\S*)')


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


@pytest.fixture(scope='module')
def agent(guest):
    fixture = agent_fixture.AgentProcess(**{
        'suspend_mode': 'save',
        'libvirt.connection_uri': 'qemu:///system',
        'libvirt.virt_type': guest.get('RAPID_GUEST_DOMAIN_TYPE', 'qemu'),
        'libvirt.normal_image': guest['RAPID_GUEST_TEMPLATE'],
        'libvirt.kernel': guest['RAPID_GUEST_KERNEL'],
        'libvirt.initrd': guest['RAPID_GUEST_INITRD'],
        'libvirt.kernel_cmdline': guest['RAPID_GUEST_CMDLINE'],
        'libvirt.network': guest['NETWORK'],
        'libvirt.ip_sources': 'lease',
        'libvirt.ip_timeout': 150,
        'vm_types': '1 x 128 x 1',
        'as_register_timeout': 180,
        'report_interval': 2,
        'reconcile_interval': 5,
        'ram_allocation_ratio': 1.0,
        'disk_allocation_ratio': 1.0,
    })
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
def vm(agent):
    """Start the guest through the agent, playing its AS at boot."""
    api = agent.api
    result = {}

    def run_start():
        try:
            result['vm'] = api.start_vm({}, user_id=USER, os_type=0,
                                        vcpus=1, memory_mb=128, disk_gb=1)
        except Exception as exc:
            result['error'] = exc

    def play_as():
        if 'error' in result:
            raise AssertionError(f"start_vm failed: {result['error']}")
        mine = [v for v in api.get_vm_info({})
                if v['user_id'] == USER and v['ip_address']]
        if not mine:
            return None
        reply = api.as_register({}, ip_address=mine[0]['ip_address'])
        api.as_confirm({}, user_id=reply['user_id'])
        return reply

    thread = threading.Thread(target=run_start)
    thread.start()
    wait_until(play_as, 200, 'the guest\'s DHCP lease', agent)
    thread.join(60)
    assert 'vm' in result, agent.log_tail()
    return result['vm']


def serial_log(agent, name):
    path = os.path.join(agent.values[('DEFAULT', 'data_path')],
                        'instances', name + '.console.log')
    with open(path, encoding='utf-8', errors='replace') as log:
        return log.read()


def heartbeats(agent, name):
    return [(int(n), ip) for n, ip in ALIVE.findall(serial_log(agent, name))]


def qemu_of(name):
    """The QEMU processes running the domain ``name``."""
    found = []
    for process in psutil.process_iter(['name', 'cmdline']):
        cmdline = process.info['cmdline'] or []
        if any(arg.startswith(f'guest={name},') or arg == f'guest={name}'
               for arg in cmdline):
            found.append(process)
    return found


def test_save_frees_the_memory_and_resume_brings_the_same_guest_back(
        agent, vm, conn):
    name = vm['name']
    dom = conn.lookupByName(name)
    wait_until(lambda: len(heartbeats(agent, name)) >= 2, 60,
               'two heartbeats of the guest', agent)
    [qemu] = qemu_of(name)
    rss_mb = qemu.memory_info().rss / 2 ** 20
    boots = serial_log(agent, name).count('RAPID-GUEST-BOOT')

    started = time.monotonic()
    suspended = agent.api.suspend_vm({}, user_id=USER)
    save_s = time.monotonic() - started
    assert suspended['status'] == 2
    # Managed save: the domain is off with its memory on disk, and no QEMU
    # process holds its RAM any more.
    assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    assert dom.hasManagedSaveImage(0)
    wait_until(lambda: not qemu_of(name), 30, 'the QEMU process gone')
    assert not psutil.pid_exists(qemu.pid) or \
        psutil.Process(qemu.pid).status() == psutil.STATUS_ZOMBIE
    before = heartbeats(agent, name)
    time.sleep(6)                                  # > one heartbeat period
    assert heartbeats(agent, name) == before       # it does not run

    started = time.monotonic()
    resumed = agent.api.resume_vm({}, user_id=USER)
    resume_s = time.monotonic() - started
    assert resumed['status'] == 3
    assert resumed['ip_address'] == vm['ip_address']
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert not dom.hasManagedSaveImage(0)
    # The same guest goes on: its heartbeat counter continues from where it
    # was, it did not boot again, and it keeps its address.
    last = before[-1][0]
    after = wait_until(lambda: [h for h in heartbeats(agent, name)
                                if h[0] > last], 60,
                       'a heartbeat after the resume', agent)
    assert after[0][0] == last + 1
    assert after[0][1] == vm['ip_address']
    assert serial_log(agent, name).count('RAPID-GUEST-BOOT') == boots
    assert len(qemu_of(name)) == 1
    restored = agent.log_lines('Restored domain')
    print(f'managed save: suspend_vm {save_s:.2f} s, resume_vm {resume_s:.2f}'
          f' s (QEMU RSS before the save {rss_mb:.0f} MiB); agent: '
          f'{restored[-1] if restored else "?"}')


def test_a_saved_vm_is_reported_suspended_across_an_agent_restart(
        agent, vm, conn):
    agent.api.suspend_vm({}, user_id=USER)
    agent.kill()
    agent.start()
    record = agent.api.get_vm_info({}, user_id=USER)[0]
    assert record['status'] == 2
    assert conn.lookupByName(vm['name']).hasManagedSaveImage(0)
    assert agent.api.resume_vm({}, user_id=USER)['status'] == 3


def test_remove_of_a_saved_vm_leaves_nothing(agent, vm, conn):
    agent.api.suspend_vm({}, user_id=USER)
    assert agent.api.remove_vm({}, user_id=USER) is None
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(vm['name'])
    images = os.path.join(agent.values[('DEFAULT', 'data_path')],
                          'instances')
    assert [n for n in os.listdir(images) if vm['name'] in n] == []
