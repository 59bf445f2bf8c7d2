"""The agent's identity and its "never destroy" rules against the real Nova
(SPEC 6 and 9, issue 8).

One agent process (``compute_driver = nova``) serves the whole module,
reconciling every 2 s, with the DS and SLAM simulated on RabbitMQ; the tests
run in order on it and the ``host`` change comes last. Two servers of
"someone else" in the same project, made with openstacksdk directly (one
with no metadata at all, one with rapid-vmm metadata of another owner),
are there from the start. Run under ``flock /tmp/rapid-nova.lock``.
"""

import os
import subprocess
import sys
import time
import uuid

import pytest

from rapid_vmm import exception
from rapid_vmm import rpcapi
from rapid_vmm.tests.nova import test_nova_driver as nova_agent

OTHER_OWNER = 'someone-else'
#: The user id the other owner's server claims (no VM of ours has it).
OTHER_USER = 33


def wait_until(predicate, agent, timeout=30, what='condition'):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f'{what} not reached in {timeout} s\n'
                                 f'{agent.log_tail()}')
        time.sleep(0.2)


@pytest.fixture(scope='module')
def made(nova):
    """Ids of every server this module makes, deleted at its end."""
    servers: list[str] = []
    yield servers
    for server_id in servers:
        nova.compute.delete_server(server_id, ignore_missing=True)
    for server_id in servers:
        try:
            nova.compute.wait_for_delete(
                nova.compute.get_server(server_id), wait=60)
        except Exception:  # gone already, or the stack stops anyway
            pass


@pytest.fixture(scope='module')
def agent(nova, made):
    fixture = nova_agent.make_agent(reconcile_interval=2,
                                    reconcile_absent_seconds=0)
    try:
        fixture.start()
        fixture.old_host = fixture.values[('DEFAULT', 'host')]
        yield fixture
    finally:
        fixture.cleanUp()


@pytest.fixture(scope='module')
def ours(agent, nova, made):
    """Two VMs of the agent, registered with the DS: user 31 running,
    user 32 suspended."""
    vms = {}
    for user_id in (31, 32):
        vm = nova_agent.start(agent, user_id)
        made.append(nova.compute.find_server(vm['name']).id)
        vms[user_id] = vm
    agent.api.suspend_vm({}, user_id=32)
    for user_id in vms:
        vms[user_id] = wait_until(
            lambda u=user_id: agent.api.get_vm_info({}, user_id=u)[0][
                'vm_id'] and agent.api.get_vm_info({}, user_id=u)[0],
            agent, what=f'DS id of user {user_id}')
    return vms


@pytest.fixture(scope='module')
def foreign(ours, nova, made):
    """Servers of someone else in the project: ``bare`` (no metadata) and
    ``other`` (rapid-vmm metadata of another owner). Made after ours, so
    the flavor exists."""
    flavor = nova.compute.find_flavor('rapid.1_1024_20')
    image = nova.image.find_image('rapid-linux')
    network = nova.network.find_network('rapid-net')
    metadata = {
        'bare': {},
        'other': {'rapid_owner': OTHER_OWNER,
                  'rapid_user_id': str(OTHER_USER),
                  'rapid_type': '1_1024_20', 'rapid_vm_id': '777',
                  'rapid_vmm_id': '999'},
    }
    servers = {}
    for kind, meta in metadata.items():
        server = nova.compute.create_server(
            name=f'rapid-vm-{OTHER_USER}-{uuid.uuid4().hex[:8]}',
            flavor_id=flavor.id, image_id=image.id,
            networks=[{'uuid': network.id}], metadata=meta)
        made.append(server.id)
        servers[kind] = server
    for kind, server in servers.items():
        servers[kind] = nova.compute.wait_for_server(server, wait=120)
    return servers


def records(agent):
    return {vm['user_id']: vm for vm in agent.api.get_vm_info({})}


def test_a_lost_database_keeps_the_vmm_id_and_the_ds_ids(agent, nova,
                                                         ours, foreign):
    vmm_id = agent.api.get_host_status({})['vmm_id']
    assert vmm_id is not None
    assert len(agent.ds.recorder.calls('register_vmm')) == 1
    assert len(agent.ds.recorder.calls('register_vm')) == 2
    reports = len(agent.ds.recorder.calls('notify_vmm'))
    agent.kill()
    data_path = agent.values[('DEFAULT', 'data_path')]
    lost = [name for name in os.listdir(data_path)
            if name.startswith('state.sqlite')]
    assert 'state.sqlite' in lost
    for name in lost:
        os.unlink(os.path.join(data_path, name))
    agent.start()
    rebuilt = wait_until(lambda: len(records(agent)) == 2 and records(agent),
                         agent, what='records rebuilt from Nova')
    assert {u: (vm['name'], vm['vm_id']) for u, vm in rebuilt.items()} == {
        u: (vm['name'], vm['vm_id']) for u, vm in ours.items()}
    assert (rebuilt[31]['status'], rebuilt[32]['status']) == (1, 2)
    assert all(vm['task_state'] == '' for vm in rebuilt.values())
    assert agent.api.get_host_status({})['vmm_id'] == vmm_id
    # Registration and the outbox had their chance: nothing registered
    # again (the original DS refuses a second VMM_REGISTER from one IP).
    agent.ds.recorder.wait_for('notify_vmm',
                               lambda kw: kw['vmm_id'] == vmm_id,
                               count=reports + 3)
    assert len(agent.ds.recorder.calls('register_vmm')) == 1
    assert len(agent.ds.recorder.calls('register_vm')) == 2
    # The servers of someone else were not adopted from the fresh state.
    assert sorted(records(agent)) == [31, 32]
    assert agent.api.resume_vm({}, user_id=32)['status'] == 3
    agent.ds.recorder.wait_for('notify_vm', lambda kw: kw == {
        'vm_id': ours[32]['vm_id'], 'status': 3})


def test_servers_of_someone_else_are_never_touched_or_adopted(
        agent, nova, ours, foreign):
    # They were listed by every pass since before the restart above.
    for kind, server in foreign.items():
        fresh = nova.compute.get_server(server.id)
        assert fresh.status == 'ACTIVE', kind
        assert fresh.metadata == server.metadata, kind
    assert sorted(records(agent)) == [31, 32]
    with pytest.raises(exception.VmNotFound):
        agent.api.remove_vm({}, user_id=OTHER_USER)
    with pytest.raises(exception.VmNotFound):
        agent.api.get_vm_info({}, user_id=OTHER_USER)
    for server in foreign.values():
        acted = [line for needle in (server.id, server.name)
                 for line in agent.log_lines(needle)
                 if any(word in line for word in (
                     'Adopted', 'Took over', 'Taking over', 'Deleted'))]
        assert acted == []


def test_stripped_metadata_marks_unknown_and_deletes_nothing(agent, nova,
                                                             ours):
    server = nova.compute.find_server(ours[31]['name'])
    server = nova.compute.get_server(server.id)
    nova.compute.delete_server_metadata(server, list(server.metadata))
    got = wait_until(
        lambda: agent.api.get_vm_info({}, user_id=31)[0]['task_state'] ==
        'unknown' and agent.api.get_vm_info({}, user_id=31)[0], agent,
        what='record of user 31 unknown')
    assert (got['name'], got['vm_id'], got['status']) == (
        ours[31]['name'], ours[31]['vm_id'], 1)
    assert 'no rapid-vmm metadata' in got['state_reason']
    with pytest.raises(exception.VmStateConflict):
        agent.api.remove_vm({}, user_id=31)
    # Left alone over more passes: still there, still without metadata,
    # still known as unknown.
    time.sleep(5)
    fresh = nova.compute.get_server(server.id)
    assert (fresh.status, fresh.metadata) == ('ACTIVE', {})
    got = agent.api.get_vm_info({}, user_id=31)[0]
    assert (got['task_state'], got['status']) == ('unknown', 1)


def test_a_host_change_refuses_to_start_then_a_rename_takes_over(
        agent, nova, ours, foreign):
    servers = {u: nova.compute.find_server(vm['name']).id
               for u, vm in ours.items()}
    agent.terminate()
    new_host = agent.old_host + '.example.org'
    agent.reconfigure(host=new_host)
    result = subprocess.run(
        [sys.executable, '-m', 'rapid_vmm.cmd.vmm', '--config-file',
         agent.config_file], capture_output=True, text=True, timeout=60,
        check=False)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert 'previous_host' in lines[0]
    # Nothing was deleted or changed.
    for user_id, server_id in servers.items():
        fresh = nova.compute.get_server(server_id)
        assert fresh.status in ('ACTIVE', 'SUSPENDED'), user_id
    assert nova.compute.get_server(servers[32]).metadata[
        'rapid_owner'] == agent.old_host
    for server in foreign.values():
        assert nova.compute.get_server(server.id).metadata == \
            server.metadata
    # Declared as a rename: the agent takes its state and servers over.
    agent.reconfigure(previous_host=agent.old_host)
    agent.api = rpcapi.VmmAPI(agent.conf, agent.transport, host=new_host,
                              timeout=60)
    agent.start()
    kept = records(agent)
    assert {u: (vm['name'], vm['vm_id']) for u, vm in kept.items()} == {
        u: (vm['name'], vm['vm_id']) for u, vm in ours.items()}
    assert kept[32]['task_state'] == ''
    wait_until(lambda: nova.compute.get_server(servers[32]).metadata.get(
        'rapid_owner') == new_host, agent, what='owner of server 32')
    meta = nova.compute.get_server(servers[32]).metadata
    assert (meta['rapid_vm_id'], meta['rapid_vmm_id']) == (
        str(ours[32]['vm_id']), str(agent.api.get_host_status({})[
            'vmm_id']))
    # The stripped server is still left alone; no server was deleted.
    assert nova.compute.get_server(servers[31]).metadata == {}
    assert agent.api.get_vm_info({}, user_id=31)[0]['task_state'] == \
        'unknown'
    assert len(agent.ds.recorder.calls('register_vmm')) == 1
    assert len(agent.ds.recorder.calls('register_vm')) == 2
    for server in foreign.values():
        fresh = nova.compute.get_server(server.id)
        assert (fresh.status, fresh.metadata) == ('ACTIVE', server.metadata)
    # No pass of the whole module failed half-way (every agent start
    # writes to the same log).
    assert agent.log_lines('Periodic reconciliation failed') == []
