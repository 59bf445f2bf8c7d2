"""The Nova driver itself against the real Nova: what it must never touch.

The driver runs in this process (no agent) on the test cloud; servers of
"someone else" are made with openstacksdk directly, as another agent or a
user of the same project would. Run under ``flock /tmp/rapid-nova.lock``.
"""

import threading
import uuid

import pytest

from rapid_vmm import exception
from rapid_vmm import flavors
from rapid_vmm import objects
from rapid_vmm.tests import fixtures as rfix
from rapid_vmm.tests.nova import conftest
from rapid_vmm.virt import driver as virt_driver
from rapid_vmm.virt.nova import driver as nova_driver

Presence = virt_driver.Presence


@pytest.fixture
def conf(nova):
    fixture = rfix.ConfFixture(compute_driver='nova', **{
        'nova.cloud': conftest.CLOUD,
        'nova.linux_image': 'rapid-linux',
        'nova.network': 'rapid-net',
        'nova.create_flavors': True,
        'nova.boot_timeout': 120,
        'nova.api_timeout': 30})
    fixture.setUp()
    yield fixture.conf
    fixture.cleanUp()


@pytest.fixture
def made(nova):
    """Servers and flavors to delete at the end, whoever made them."""
    things = {'servers': [], 'flavors': []}
    yield things
    for server_id in things['servers']:
        nova.compute.delete_server(server_id, ignore_missing=True)
    for server_id in things['servers']:
        try:
            nova.compute.wait_for_delete(
                nova.compute.get_server(server_id), wait=60)
        except Exception:
            pass
    for flavor in things['flavors']:
        nova.compute.delete_flavor(flavor, ignore_missing=True)


@pytest.fixture
def drv(conf):
    driver = nova_driver.NovaDriver(conf)
    driver.init_host()
    yield driver
    driver.cleanup_host()


def make_vm(user_id, **fields):
    values = dict(user_id=user_id,
                  name=f'rapid-vm-{user_id}-{uuid.uuid4().hex[:8]}',
                  vcpus=1, memory_mb=1024, disk_gb=20)
    values.update(fields)
    return objects.Vm(**values)


def create(drv, made, vm, identity=None):
    result = drv.create(vm, identity)
    made['servers'].append(result.driver_id)
    return vm.copy(driver_id=result.driver_id)


def someone_elses_server(nova, drv, made, metadata):
    """A server of the project made by someone else, with ``metadata``."""
    flavor_id = drv._flavor_id(flavors.VmType(1, 1024, 20))
    image = nova.image.find_image('rapid-linux')
    network = nova.network.find_network('rapid-net')
    server = nova.compute.create_server(
        name=f'someone-else-{uuid.uuid4().hex[:8]}', flavor_id=flavor_id,
        image_id=image.id, networks=[{'uuid': network.id}],
        metadata=metadata)
    made['servers'].append(server.id)
    return nova.compute.wait_for_server(server, wait=120)


def test_a_server_of_another_owner_is_never_touched(nova, drv, made):
    other = someone_elses_server(nova, drv, made, {
        'rapid_owner': 'another-agent', 'rapid_user_id': '5',
        'rapid_type': '1_1024_20'})
    vm = make_vm(5, driver_id=other.id, name=other.name)
    seen = drv.observe([vm])[vm.name]
    assert seen.presence is Presence.FOREIGN
    assert seen.instance.owner == 'another-agent'
    by_name = drv.observe([vm.copy(driver_id=None)])[vm.name]
    assert by_name.presence is Presence.FOREIGN
    assert other.id not in {i.driver_id for i in drv.list_instances()}
    with pytest.raises(exception.InstanceNotOurs):
        drv.destroy(vm)
    with pytest.raises(exception.InstanceNotOurs):
        drv.destroy(vm.copy(driver_id=None))
    with pytest.raises(exception.InstanceNotOurs):
        drv.update_metadata(vm, {'vmm_id': 1})
    fresh = nova.compute.get_server(other.id)
    assert fresh.status == 'ACTIVE'
    assert fresh.metadata['rapid_owner'] == 'another-agent'
    # A declared rename takes it over.
    assert drv.update_metadata(vm.copy(vm_id=8), {'vmm_id': 1},
                               claim_from='another-agent') is True
    taken = drv.observe([vm])[vm.name]
    assert taken.presence is Presence.OURS
    assert (taken.instance.vm_id, taken.instance.identity) == (
        8, {'vmm_id': 1})


def test_stripped_metadata_is_unreadable_and_never_deleted(nova, drv, made):
    vm = create(drv, made, make_vm(6, vm_id=61),
                {'vmm_id': 4242, 'slam_host': 'slam', 'slam_port': 9002})
    server = nova.compute.get_server(vm.driver_id)
    assert (server.metadata['rapid_vm_id'], server.metadata['rapid_vmm_id'],
            server.metadata['rapid_owner']) == ('61', '4242',
                                                drv.conf.host)
    seen = drv.observe([vm])[vm.name].instance
    assert (seen.vm_id, seen.identity['slam_port']) == (61, 9002)
    nova.compute.delete_server_metadata(server, list(server.metadata))
    seen = drv.observe([vm])[vm.name]
    assert seen.presence is Presence.UNREADABLE
    assert 'no rapid-vmm metadata' in seen.reason
    with pytest.raises(exception.InstanceNotOurs):
        drv.destroy(vm)
    assert nova.compute.get_server(vm.driver_id).status == 'ACTIVE'
    assert vm.driver_id not in {i.driver_id for i in drv.list_instances()}


def test_identity_keys_left_out_are_removed(nova, drv, made):
    vm = create(drv, made, make_vm(10, vm_id=100),
                {'vmm_id': 4242, 'slam_host': 'slam', 'slam_port': 9002})
    # openstacksdk's delete_metadata_item fails with KeyError on a Server
    # whose local metadata lacks the key; the driver must not trip on it.
    assert drv.update_metadata(vm.copy(vm_id=101), {'vmm_id': 4243}) is True
    meta = nova.compute.get_server(vm.driver_id).metadata
    assert (meta['rapid_vm_id'], meta['rapid_vmm_id']) == ('101', '4243')
    assert 'rapid_slam_host' not in meta and 'rapid_slam_port' not in meta
    seen = drv.observe([vm])[vm.name].instance
    assert seen.identity == {'vmm_id': 4243}


def test_a_deleted_server_is_absent_by_its_id(nova, drv, made):
    vm = create(drv, made, make_vm(7))
    assert drv.observe([vm])[vm.name].presence is Presence.OURS
    drv.destroy(vm)
    seen = drv.observe([vm])[vm.name]
    assert seen.presence is Presence.ABSENT
    assert vm.driver_id in seen.reason
    never = make_vm(8)                # no id, no server of that name
    assert drv.observe([never])[never.name].presence is Presence.ABSENT
    drv.destroy(vm)                   # twice is fine


def test_metadata_during_a_resize_is_written_on_confirm(nova, drv, made):
    vm = create(drv, made, make_vm(9, vm_id=90), {'vmm_id': 1})
    drv.resize(vm, flavors.VmType(2, 2048, 20))
    assert nova.compute.get_server(vm.driver_id).status == 'VERIFY_RESIZE'
    assert drv.update_metadata(vm.copy(vm_id=91), {'vmm_id': 2}) is False
    drv.confirm_resize(vm)
    meta = nova.compute.get_server(vm.driver_id).metadata
    assert (meta['rapid_vm_id'], meta['rapid_vmm_id'], meta['rapid_type']) \
        == ('91', '2', '2_2048_20')
    assert drv.update_metadata(vm.copy(vm_id=92), {'vmm_id': 2}) is True


def test_concurrent_first_use_of_a_flavor(nova, conf, made):
    """Four agents (four drivers) and four starts in one agent, all at
    once, on types whose flavors do not exist yet: all succeed."""
    race = f'rapid.race-{uuid.uuid4().hex[:8]}'
    inside = f'rapid.race-{uuid.uuid4().hex[:8]}'
    conf.set_override('flavors', {'1_1024_20': race, '2_2048_20': inside},
                      group='nova')
    made['flavors'] += [race, inside]
    drivers = [nova_driver.NovaDriver(conf) for _ in range(4)]
    for each in drivers:
        each.init_host()
    barrier = threading.Barrier(8)
    results, errors = [], []

    def first_use(each):
        barrier.wait()
        try:
            results.append(each._flavor_id(flavors.VmType(1, 1024, 20)))
        except Exception as exc:
            errors.append(exc)

    def start(user_id):
        barrier.wait()
        try:
            vm = create(drivers[0], made, make_vm(user_id, vcpus=2,
                                                  memory_mb=2048))
            results.append(vm.driver_id)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=first_use, args=(each,))
               for each in drivers]
    threads += [threading.Thread(target=start, args=(20 + i,))
                for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert errors == []
        assert len(results) == 8
        flavors_made = [f for f in nova.compute.flavors()
                        if f.name in (race, inside)]
        assert sorted(f.name for f in flavors_made) == sorted([race, inside])
        race_ids = {drivers[i]._flavor_ids['1_1024_20'] for i in range(4)}
        assert race_ids == {next(f.id for f in flavors_made
                                 if f.name == race)}
    finally:
        for each in drivers:
            each.cleanup_host()
