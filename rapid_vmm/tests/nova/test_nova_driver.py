"""The agent with compute_driver = nova against a real Nova on loopback.

The agent runs as a process on RabbitMQ; the test plays the DS and SLAM
and looks at Nova through openstacksdk to check what the agent did.
"""

import os
import time

import pytest

from rapid_vmm import exception
from rapid_vmm.tests.functional import agent as agent_fixture
from rapid_vmm.tests.nova import conftest

NOVA_OPTIONS = {
    'compute_driver': 'nova',
    'nova.cloud': conftest.CLOUD,
    'nova.linux_image': 'rapid-linux',
    'nova.linux_helper_image': 'rapid-linux-helper',
    'nova.network': 'rapid-net',
    'nova.security_group': conftest.SECURITY_GROUP,
    'nova.create_flavors': True,
    'nova.boot_timeout': 120,
    'libvirt.normal_image': '',
}


def make_agent(**overrides):
    options = dict(NOVA_OPTIONS)
    options.update(overrides)
    fixture = agent_fixture.AgentProcess(**options)
    fixture.setUp()
    return fixture


@pytest.fixture
def agent(nova):
    fixture = make_agent()
    try:
        fixture.start()
        yield fixture
    finally:
        fixture.cleanUp()
        leftovers = [s.name for s in nova.compute.servers()
                     if (s.metadata or {}).get('rapid_owner') ==
                     fixture.conf.host]
        for server in nova.compute.servers():
            if server.name in leftovers:
                nova.compute.delete_server(server)


def servers_of(nova, agent):
    return [s for s in nova.compute.servers(details=True)
            if (s.metadata or {}).get('rapid_owner') == agent.conf.host]


def start(agent, user_id, **kwargs):
    kwargs.setdefault('vcpus', 1)
    kwargs.setdefault('memory_mb', 1024)
    return agent.api.start_vm({}, user_id=user_id, os_type=0, **kwargs)


def test_life_cycle_of_a_user_vm(agent, nova):
    started = time.monotonic()
    vm = start(agent, 7)
    start_s = time.monotonic() - started
    servers = servers_of(nova, agent)
    assert [s.name for s in servers] == [vm['name']]
    server = servers[0]
    assert server.status == 'ACTIVE'
    assert server.metadata['rapid_user_id'] == '7'
    # The IP is the fixed IP of the server's port.
    ports = list(nova.network.ports(device_id=server.id))
    assert vm['ip_address'] == ports[0].fixed_ips[0]['ip_address']
    # The security group was added.
    assert {g['name'] for g in server.security_groups} == {
        conftest.SECURITY_GROUP}
    assert server.flavor.original_name == 'rapid.1_1024_20'
    # Idempotent start.
    assert start(agent, 7)['name'] == vm['name']
    assert agent.api.suspend_vm({}, user_id=7)['status'] == 2
    assert nova.compute.get_server(server.id).status == 'SUSPENDED'
    assert agent.api.resume_vm({}, user_id=7)['status'] == 3
    assert nova.compute.get_server(server.id).status == 'ACTIVE'
    # Resize to the grid type, then confirm (idempotent).
    resized = agent.api.change_flavor({}, user_id=7, vcpus=2,
                                      memory_mb=2048)
    assert resized['resize_pending']
    assert nova.compute.get_server(server.id).status == 'VERIFY_RESIZE'
    confirmed = agent.api.confirm_flavor({}, user_id=7)
    assert not confirmed['resize_pending']
    assert agent.api.confirm_flavor({}, user_id=7) == confirmed
    fresh = nova.compute.get_server(server.id)
    assert (fresh.status, fresh.flavor.vcpus, fresh.flavor.ram) == (
        'ACTIVE', 2, 2048)
    # Usage from diagnostics.
    cpu = agent.api.get_vm_usage({}, resource='cpu', user_id=7)[0]
    assert cpu['source'].startswith('diagnostics')
    assert cpu['cpu_util_percent'] is not None
    memory = agent.api.get_vm_usage({}, resource='memory', user_id=7)[0]
    assert memory['source'] == 'diagnostics'
    disk = agent.api.get_vm_usage({}, resource='disk', user_id=7)[0]
    assert disk['capacity_bytes'] == 20 * 1024 ** 3
    # Remove: the server and its port are gone.
    assert agent.api.remove_vm({}, user_id=7) is None
    assert servers_of(nova, agent) == []
    assert list(nova.network.ports(device_id=server.id)) == []
    statuses = [kw['status'] for kw in agent.ds.recorder.calls('notify_vm')]
    assert statuses == [2, 3, 4]
    print(f'start_vm through Nova: {start_s:.2f} s')


def test_helper_vms(nova):
    fixture = make_agent(helper_vm_count=1)
    try:
        fixture.start()
        notified = fixture.ds.recorder.wait_for('notify_helper', timeout=120)
        servers = servers_of(nova, fixture)
        assert len(servers) == 1
        helper = servers[0]
        assert helper.metadata['rapid_helper'] == '1'
        assert helper.metadata['rapid_user_id'] == '-1'
        image = nova.image.get_image(helper.image['id'])
        assert image.name == 'rapid-linux-helper'
        ports = list(nova.network.ports(device_id=helper.id))
        assert notified[0]['ip_address'] == ports[0].fixed_ips[0][
            'ip_address']
        category = fixture.ds.recorder.calls('register_vm')[0]['category']
        assert category == 1
    finally:
        fixture.cleanUp()
        for server in servers_of(nova, fixture):
            nova.compute.delete_server(server)


def test_restart_rebuilds_the_state_from_nova(agent, nova):
    vm = start(agent, 8)
    agent.api.suspend_vm({}, user_id=8)
    agent.kill()
    # Kept state: the agent knows its VM.
    agent.start()
    record = agent.api.get_vm_info({}, user_id=8)[0]
    assert (record['name'], record['status']) == (vm['name'], 2)
    # Lost state: the VM is adopted from the server's metadata.
    agent.kill()
    data_path = agent.values[('DEFAULT', 'data_path')]
    for name in os.listdir(data_path):
        if name.startswith('state.sqlite'):
            os.unlink(os.path.join(data_path, name))
    agent.start()
    record = agent.api.get_vm_info({}, user_id=8)[0]
    assert (record['name'], record['status']) == (vm['name'], 2)
    assert (record['vcpus'], record['memory_mb'], record['disk_gb']) == (
        1, 1024, 20)
    assert record['ip_address'] is None or record['ip_address'] == vm[
        'ip_address']
    assert agent.api.resume_vm({}, user_id=8)['status'] == 3
    assert agent.api.get_vm_info({}, user_id=8)[0]['ip_address'] == vm[
        'ip_address']


def test_no_valid_host_is_no_capacity_and_leaks_nothing(nova):
    fixture = make_agent(**{'nova.flavors': f'1_1024_20:'
                                            f'{conftest.HUGE_FLAVOR}'})
    try:
        fixture.start()
        with pytest.raises(exception.NoCapacity) as error:
            start(fixture, 9)
        assert 'No valid host' in str(error.value)
        assert servers_of(nova, fixture) == []
        assert fixture.api.get_vm_info({}) == []
        failed = fixture.slam.recorder.wait_for('vm_start_failed')[0]
        assert failed['error_class'] == 'NoCapacity'
    finally:
        fixture.cleanUp()


def test_missing_flavor_is_a_driver_error_and_leaks_nothing(nova):
    fixture = make_agent(**{'nova.flavors': '1_1024_20:no-such-flavor',
                            'nova.create_flavors': False})
    try:
        fixture.start()
        with pytest.raises(exception.DriverError) as error:
            start(fixture, 10)
        assert 'no-such-flavor' in str(error.value)
        assert servers_of(nova, fixture) == []
        assert fixture.api.get_vm_info({}) == []
    finally:
        fixture.cleanUp()


def test_api_down_is_a_driver_error_and_the_agent_recovers(nova):
    agent = make_agent(reconcile_interval=2)
    try:
        agent.start()
        conftest.stack('service-stop', 'nova-api', timeout=60)
        try:
            started = time.monotonic()
            with pytest.raises(exception.DriverError) as error:
                start(agent, 11)
            assert time.monotonic() - started < 60
            assert 'unreachable' in str(error.value)
            # Nova could not say whether a server exists: the record waits,
            # still building (the roll-back of the failed start is left to
            # the reconciler), for the cloud to come back.
            records = agent.api.get_vm_info({})
            assert [r['task_state'] for r in records] in ([], ['building'])
            assert not agent.api.get_host_status({})['driver_reachable'] \
                or records == []
        finally:
            conftest.stack('service-start', 'nova-api', timeout=120)
        deadline = time.monotonic() + 30
        while agent.api.get_vm_info({}):
            assert time.monotonic() < deadline, agent.log_tail()
            time.sleep(0.5)
        vm = start(agent, 11)
        assert vm['status'] == 1
        assert [s.name for s in servers_of(nova, agent)] == [vm['name']]
    finally:
        agent.cleanUp()
        for server in servers_of(nova, agent):
            nova.compute.delete_server(server)
