"""Importing a host of the original VMM: its state files and configuration.

The inputs are the files real Java wrote (``legacy-vectors/state/``) and
the fixtures of ``data/`` (written by the real ``ObjectOutputStream`` with
``data/java/MakeFixtures.java``): a synchronized list (what the original's
lists really are after a fresh start), a map, and objects of a class that
is not the original's.
"""

import glob
import os
import shutil
import subprocess
import sys

from keystoneauth1 import loading as ks_loading
from oslo_config import cfg
import pytest

from rapid_vmm import conf as rapid_conf
from rapid_vmm import objects
from rapid_vmm import state
from rapid_vmm.cmd import manage
from rapid_vmm.legacy import importer
from rapid_vmm.legacy import serialized

STATE = os.path.join(os.environ.get('RAPID_VMM_LEGACY_VECTORS',
                                    '/work/shared/legacy-vectors'), 'state')
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
CONFIG_XML = os.path.join(STATE, 'configuration.xml')

pytestmark = pytest.mark.skipif(not os.path.isdir(STATE),
                                reason='no legacy-vectors/state directory')


def state_file(name):
    return os.path.join(STATE, name)


def data_file(name):
    return os.path.join(DATA, name)


@pytest.fixture
def original(tmp_path):
    """An original dataPath holding vmmInfo.out and vmList.out."""
    path = tmp_path / 'vmm_data'
    path.mkdir()
    shutil.copy(state_file('vmmInfo.out'), path / 'vmmInfo.out')
    shutil.copy(state_file('vmList.out'), path / 'vmList.out')
    return path


@pytest.fixture
def store(tmp_path):
    store = state.StateStore(str(tmp_path / 'rapid'))
    yield store
    store.close()


# -- the grammar reader ----------------------------------------------------

@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(STATE, '*.out'))
                                        + glob.glob(os.path.join(DATA,
                                                                 '*.out'))))
def test_every_state_file_parses_as_data(path):
    with open(path, 'rb') as source:
        value = serialized.load_one(source.read())
    assert isinstance(value, serialized.JavaObject)


def test_reading_a_stream_loads_or_imports_nothing(tmp_path):
    # The class's readObject would throw, and its field names a command:
    # read as data, the file only gives a name and a string.
    before = set(sys.modules)
    with open(data_file('vmmInfo-evil.out'), 'rb') as source:
        value = serialized.load_one(source.read())
    assert value.class_name == 'eu.rapid.vmm.Evil'
    assert value.fields() == {
        'command': 'touch /tmp/rapid-vmm-import-loaded-a-class'}
    assert set(sys.modules) == before
    assert not os.path.exists('/tmp/rapid-vmm-import-loaded-a-class')


def test_nested_third_party_object_is_read_as_data_only():
    with open(state_file('vmList-nova.out'), 'rb') as source:
        value = serialized.load_one(source.read())
    vm = value.annotations['java.util.ArrayList'][1]
    flavor = vm.fields()['flavor']
    assert flavor.class_name == \
        'org.openstack4j.openstack.compute.domain.NovaFlavor'
    assert flavor.fields()['name'] == 'rapid.2.2048.20'
    assert type(flavor) is serialized.JavaObject


@pytest.mark.parametrize('name', ['vmmInfo.out', 'vmList.out',
                                  'vmList-nova.out'])
def test_every_truncation_is_an_error(name):
    with open(state_file(name), 'rb') as source:
        data = source.read()
    for cut in range(len(data)):
        with pytest.raises(serialized.SerializedFormatError):
            serialized.load_one(data[:cut])


@pytest.mark.parametrize('data', [
    b'', b'\xac\xed\x00\x05', b'not a stream at all',
    b'\xac\xed\x00\x05\x7d\x00\x00\x00\x00',      # proxy class
    b'\xac\xed\x00\x05\x7b',                      # exception
    b'\xac\xed\x00\x05\x79',                      # reset
    b'\xac\xed\x00\x05\x71\x00\x7e\x00\x05',      # dangling reference
    b'\xac\xed\x00\x05\x75\x72\x00\x02[I\x00\x00\x00\x00\x00\x00\x00\x00'
    b'\x02\x00\x00\x78\x70\x7f\xff\xff\xff',     # huge int array
])
def test_malformed_streams_are_errors(data):
    with pytest.raises(serialized.SerializedFormatError):
        serialized.load_one(data)


def test_deep_nesting_is_bounded():
    # Arrays of arrays of ... nested far deeper than any real file.
    desc = b'\x72\x00\x14[[Ljava.lang.Object;\x00\x00\x00\x00\x00\x00\x00' \
           b'\x00\x02\x00\x00\x78\x70'
    data = b'\xac\xed\x00\x05\x75' + desc + b'\x00\x00\x00\x01'
    data += (b'\x75\x71\x00\x7e\x00\x00\x00\x00\x00\x01') * 200 + b'\x70'
    with pytest.raises(serialized.SerializedFormatError, match='deep'):
        serialized.load_one(data)


# -- the whitelist ---------------------------------------------------------

def test_vmm_info_gives_the_identity_and_the_pool():
    identity = importer.read_vmm_info(state_file('vmmInfo.out'))
    assert (identity.vmm_id, identity.slam_host, identity.slam_port) == (
        7, '10.0.0.5', 9002)
    assert identity.image_pool == [
        '/home/rapid/vm_images/RAPID_VM_3.img',
        '/home/rapid/vm_images/RAPID_VM_4.img']


def test_unregistered_vmm_info_has_no_identity():
    identity = importer.read_vmm_info(state_file('vmmInfo-unregistered.out'))
    assert (identity.vmm_id, identity.slam_host, identity.slam_port,
            identity.image_pool) == (None, None, None, [])


def test_synchronized_lists_are_read_as_the_original_writes_them():
    identity = importer.read_vmm_info(data_file('vmmInfo-synchronized.out'))
    assert (identity.vmm_id, identity.slam_host, identity.slam_port) == (
        12, '10.0.0.9', 9002)
    assert identity.image_pool == ['/home/rapid/vm_images/RAPID_VM_6.img']
    vms, _notes = importer.read_vm_list(data_file('vmList-synchronized.out'),
                                        openstack=False)
    assert [(vm.user_id, vm.name, vm.vm_id) for vm in vms] == [
        (77, 'RAPID_VM_5', 105)]


def test_vm_list_of_a_libvirt_host():
    vms, notes = importer.read_vm_list(state_file('vmList.out'),
                                       openstack=False)
    by_user = {vm.user_id: vm for vm in vms}
    assert sorted(by_user) == [-2, -1, 4242, 4243]
    helper = by_user[-1]
    assert (helper.name, helper.vm_id, helper.helper, helper.status,
            helper.ip_address) == ('helper_1', 101, 1, 1, '192.168.122.11')
    assert helper.intent == {'import': 'legacy', 'keep_disk': True}
    assert helper.as_protocol is None
    vm = by_user[4242]
    assert (vm.name, vm.vm_id, vm.vcpus, vm.memory_mb, vm.disk_gb,
            vm.gpu_cores, vm.status, vm.os_type, vm.helper,
            vm.ip_address) == ('RAPID_VM_1', 103, 2, 2048, 20, 512, 3, 0, 0,
                               '192.168.122.20')
    assert vm.as_ready is True and vm.as_protocol == 'legacy'
    assert vm.disk_path == '/home/rapid/vm_images/RAPID_VM_1.img'
    assert vm.intent == {'import': 'legacy'}
    assert vm.driver_id is None and vm.task_state == ''
    android = by_user[4243]
    assert (android.status, android.os_type, android.vcpus,
            android.memory_mb, android.disk_gb) == (2, 1, 4, 4096, 40)
    assert notes == []


def test_vm_list_of_a_nova_host_skips_the_flavor_object():
    vms, notes = importer.read_vm_list(state_file('vmList-nova.out'),
                                       openstack=True)
    [vm] = vms
    assert (vm.user_id, vm.name, vm.driver_id, vm.vm_id, vm.image,
            vm.disk_path) == (5150, 'RAPID_VM_9',
                              '3f1c2d4e-0000-4000-8000-000000000009', 109,
                              '4c5cdd9c-4891-4b09-9a3e-16c66049408d', None)
    assert any('flavor object was skipped' in note for note in notes)


def test_empty_vm_list():
    assert importer.read_vm_list(state_file('vmList-empty.out'),
                                 openstack=False) == ([], [])


@pytest.mark.parametrize('reader,name,message', [
    ('vm', 'vmmInfo.out', 'VmmInfo.* where a java.util.ArrayList'),
    ('info', 'vmList.out', 'ArrayList.* where a eu.rapid.vmm.VmmInfo'),
    ('info', 'data:vmmInfo-evil.out', 'eu.rapid.vmm.Evil'),
    ('vm', 'data:vmList-evil.out', 'eu.rapid.vmm.Evil'),
    ('info', 'data:other-hashmap.out', 'java.util.HashMap'),
    ('vm', 'data:other-hashmap.out', 'java.util.HashMap'),
])
def test_objects_of_other_classes_are_refused(reader, name, message):
    path = data_file(name[5:]) if name.startswith('data:') \
        else state_file(name)
    with pytest.raises(importer.ImportError_, match=message):
        if reader == 'vm':
            importer.read_vm_list(path, openstack=False)
        else:
            importer.read_vmm_info(path)


def test_another_version_of_the_class_is_refused(tmp_path):
    with open(state_file('vmmInfo.out'), 'rb') as source:
        data = bytearray(source.read())
    index = data.index(b'eu.rapid.vmm.VmmInfo') + len('eu.rapid.vmm.VmmInfo')
    data[index] ^= 0xFF  # serialVersionUID
    path = tmp_path / 'vmmInfo.out'
    path.write_bytes(bytes(data))
    with pytest.raises(importer.ImportError_, match='serialVersionUID'):
        importer.read_vmm_info(str(path))


def test_corrupt_files_are_clear_errors(tmp_path):
    with open(state_file('vmList.out'), 'rb') as source:
        data = source.read()
    for position in range(4, len(data), 7):
        corrupt = bytearray(data)
        corrupt[position] ^= 0x5A
        path = tmp_path / 'vmList.out'
        path.write_bytes(bytes(corrupt))
        try:
            importer.read_vm_list(str(path), openstack=False)
        except importer.ImportError_:
            continue
        # A flip in a string or a number may leave a valid file: then it
        # still reads as the original's classes.


# -- configuration.xml -----------------------------------------------------

def test_every_element_of_the_configuration_is_handled():
    config = importer.read_configuration(CONFIG_XML)
    assert config.unknown == []
    assert set(config.elements) <= importer.HANDLED
    # Every element of the file is either an option or explained.
    sources = set()
    for setting in importer.map_configuration(config):
        sources.update(s.strip() for s in setting.source.split(','))
    for element in config.elements:
        assert element in sources or element in importer.NOT_MAPPED, element


def test_configuration_becomes_options_oslo_config_reads(tmp_path):
    config = importer.read_configuration(CONFIG_XML)
    text = importer.render_config(config, importer.map_configuration(config))
    path = tmp_path / 'imported.conf'
    importer.write_config(str(path), text)
    assert os.stat(path).st_mode & 0o777 == 0o600
    conf = cfg.ConfigOpts()
    rapid_conf.register_opts(conf)
    # The keystoneauth plugin's options, as the Nova driver loads them.
    conf.register_opts(ks_loading.get_auth_plugin_conf_options('password'),
                       group='nova')
    conf(['--config-file', str(path)], project='rapid-vmm-test',
         default_config_files=[], default_config_dirs=[])
    assert conf.peer_protocol == 'legacy'
    assert conf.compute_driver == 'libvirt'
    assert conf.my_ip == '10.0.0.21'
    assert conf.max_concurrent_requests == 64
    assert conf.legacy.enabled is True
    assert (conf.legacy.bind_host, conf.legacy.port) == ('10.0.0.21', 9000)
    assert (conf.legacy.ds_host, conf.legacy.ds_port) == ('127.0.0.1', 9001)
    assert conf.libvirt.normal_image == '/srv/rapid/images/template.img'
    assert conf.libvirt.helper_images == ['/srv/rapid/images/helper1.img',
                                          '/srv/rapid/images/helper2.img']
    assert conf.libvirt.images_path == '/srv/rapid/images'
    assert conf.libvirt.ip_command is None  # written commented out
    assert '#ip_command = /srv/rapid/bin/getIp.sh' in text
    assert conf.gpu.total_cores == 2560
    assert conf.gpu.nvidia_smi_path == '/usr/bin/nvidia-smi'
    assert conf.gpu.devices == ['0']
    assert conf.nova.flavors == {
        '1_1024_20': '11111111-2222-4333-8444-555555555555',
        '2_1024_20': '22222222-2222-4333-8444-555555555555',
        '4_1024_20': '44444444-2222-4333-8444-555555555555'}
    assert (conf.nova.linux_image, conf.nova.linux_helper_image,
            conf.nova.android_image, conf.nova.android_helper_image) == (
        'aaaaaaaa-0000-4000-8000-000000000001',
        'aaaaaaaa-0000-4000-8000-000000000002',
        'bbbbbbbb-0000-4000-8000-000000000001',
        'bbbbbbbb-0000-4000-8000-000000000002')
    assert (conf.nova.network, conf.nova.key_name,
            conf.nova.security_group) == (
        'cccccccc-0000-4000-8000-000000000001', 'rapid_keys',
        'rapid-offload')
    assert conf.nova.auth_url == 'http://10.0.0.2:5000/v3'
    assert conf.nova.password == 's3cret-pass'
    assert conf.nova.project_id == '0123456789abcdef0123456789abcdef'


def test_secrets_are_masked_when_shown():
    config = importer.read_configuration(CONFIG_XML)
    text = importer.render_config(config, importer.map_configuration(config),
                                  mask_secrets=True)
    assert 's3cret-pass' not in text
    assert 'password = ***' in text


def test_ds_element_and_openstack(tmp_path):
    xml = tmp_path / 'configuration.xml'
    xml.write_text(
        '<RAPID_VMM_DS><VMM><vmmPort>9100</vmmPort><openStackSupport>1'
        '</openStackSupport><vmmIpAddress>10.1.1.1</vmmIpAddress>'
        '<futureThing>x</futureThing></VMM>'
        '<DS><dsIpAddress>10.1.1.9</dsIpAddress><dsPort>9101</dsPort></DS>'
        '</RAPID_VMM_DS>')
    config = importer.read_configuration(str(xml))
    assert config.openstack and config.unknown == ['futureThing']
    values = {(s.group, s.name): s.value
              for s in importer.map_configuration(config)}
    assert values[('DEFAULT', 'compute_driver')] == 'nova'
    assert values[('legacy', 'ds_host')] == '10.1.1.9'
    assert values[('legacy', 'ds_port')] == '9101'
    assert values[('legacy', 'port')] == '9100'
    text = importer.render_config(config, importer.map_configuration(config))
    assert '# <futureThing> not recognised: ignored.' in text


@pytest.mark.parametrize('content,message', [
    ('<RAPID_VMM_DS><VMM><vmmPort>90x0</vmmPort></VMM></RAPID_VMM_DS>',
     'not an integer'),
    ('<RAPID_VMM_DS><DS/></RAPID_VMM_DS>', 'no <VMM>'),
    ('<RAPID_VMM_DS><VMM>', 'not a readable XML'),
    ('<!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>', 'not a readable XML'),
])
def test_bad_configuration_files(tmp_path, content, message):
    xml = tmp_path / 'configuration.xml'
    xml.write_text(content)
    with pytest.raises(importer.ImportError_, match=message):
        importer.read_configuration(str(xml))


# -- into the state --------------------------------------------------------

def test_plan_and_apply_into_an_empty_state(original, store):
    plan = importer.plan(CONFIG_XML, host='host-a', data_dir=str(original))
    store.open()
    importer.apply(store, plan)
    meta = store.get_meta()
    assert (meta['vmm_id'], meta['slam_host'], meta['slam_port'],
            meta['host']) == (7, '10.0.0.5', 9002, 'host-a')
    records = {vm.user_id: vm for vm in store.list_vms()}
    assert sorted(records) == [-2, -1, 4242, 4243]
    assert records[4242].vm_id == 103
    assert records[4242].status == objects.VmStatus.RESUMED
    assert records[4243].name == 'RAPID_VM_2'


def test_refuses_a_state_with_another_vmm_id(original, store):
    store.open()
    store.set_meta(vmm_id=99, host='host-a')
    plan = importer.plan(CONFIG_XML, host='host-a', data_dir=str(original))
    with pytest.raises(importer.ImportRefused, match='vmm_id 99'):
        importer.apply(store, plan)
    assert store.get_meta() == {'vmm_id': 99, 'host': 'host-a'}
    assert store.list_vms() == []


def test_refuses_a_state_with_records_or_another_host(original, store):
    store.open()
    store.save_vm(objects.Vm(user_id=5, name='mine', vcpus=1, memory_mb=1,
                             disk_gb=1))
    plan = importer.plan(CONFIG_XML, host='host-a', data_dir=str(original))
    with pytest.raises(importer.ImportRefused, match='1 VM records'):
        importer.apply(store, plan)
    assert [vm.name for vm in store.list_vms()] == ['mine']
    store.delete_vm(5)
    store.set_meta(host='host-b')
    with pytest.raises(importer.ImportRefused, match='host'):
        importer.apply(store, plan)
    assert store.list_vms() == []


def test_failed_write_leaves_the_state_as_it_was(original, store,
                                                 monkeypatch):
    plan = importer.plan(CONFIG_XML, host='host-a', data_dir=str(original))
    store.open()

    def broken(**values):
        raise OSError('disk full')
    monkeypatch.setattr(store, 'set_meta', broken)
    with pytest.raises(OSError):
        importer.apply(store, plan)
    assert store.list_vms() == []


def test_missing_state_files_mean_unregistered_and_empty(tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    plan = importer.plan(CONFIG_XML, host='h', data_dir=str(empty))
    assert plan.identity is None and plan.vms == []
    assert plan.meta() == {'host': 'h'}


# -- the command -----------------------------------------------------------

def run_manage(tmp_path, *args):
    conf_file = tmp_path / 'rapid-vmm.conf'
    conf_file.write_text(f'[DEFAULT]\nhost = host-a\n'
                         f'data_path = {tmp_path / "rapid"}\n')
    return subprocess.run(
        [sys.executable, '-m', 'rapid_vmm.cmd.manage', '--config-file',
         str(conf_file), 'import-legacy', CONFIG_XML, *args],
        capture_output=True, text=True, timeout=60, check=False)


def test_dry_run_writes_nothing(tmp_path, original):
    output = tmp_path / 'imported.conf'
    result = run_manage(tmp_path, '--legacy-data-path', str(original),
                        '--output-config', str(output), '--dry-run')
    assert result.returncode == 0, result.stderr
    assert 'VMM id: 7' in result.stdout
    assert 'user 4242: RAPID_VM_1 DS id 103' in result.stdout
    assert 'password = ***' in result.stdout
    assert 's3cret-pass' not in result.stdout
    assert not output.exists()
    assert not (tmp_path / 'rapid').exists()


def test_import_then_refuse_a_second_one(tmp_path, original):
    output = tmp_path / 'imported.conf'
    result = run_manage(tmp_path, '--legacy-data-path', str(original),
                        '--output-config', str(output))
    assert result.returncode == 0, result.stderr
    assert 'peer_protocol = legacy' in output.read_text()
    store = state.StateStore(str(tmp_path / 'rapid'))
    store.open()
    try:
        assert store.get_meta()['vmm_id'] == 7
        assert len(store.list_vms()) == 4
    finally:
        store.close()
    again = run_manage(tmp_path, '--legacy-data-path', str(original),
                       '--output-config', str(tmp_path / 'other.conf'))
    assert again.returncode == 1
    assert 'Refusing to import' in again.stderr
    assert not (tmp_path / 'other.conf').exists()


def test_corrupt_input_is_one_line_and_changes_nothing(tmp_path, original):
    (original / 'vmList.out').write_bytes(
        (original / 'vmList.out').read_bytes()[:300])
    output = tmp_path / 'imported.conf'
    result = run_manage(tmp_path, '--legacy-data-path', str(original),
                        '--output-config', str(output))
    assert result.returncode == 1
    assert result.stderr.count('\n') == 1
    assert 'Cannot import' in result.stderr and 'truncated' in result.stderr
    assert 'Traceback' not in result.stderr
    assert not output.exists()
    assert not (tmp_path / 'rapid').exists()


def test_manage_rejects_a_bad_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, '-m', 'rapid_vmm.cmd.manage', 'no-such-command'],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert 'invalid choice' in result.stderr


def test_manage_module_has_the_console_entry_point():
    assert callable(manage.main)
