"""Tests of rapid_vmm.virt.libvirt.config: domain XML and our metadata."""

import uuid
import xml.etree.ElementTree as ET

import libvirt
import pytest

from rapid_vmm.virt.libvirt import config as vconfig

NS = vconfig.METADATA_NS

METADATA = {'owner': 'host-a', 'user_id': 42, 'helper': 0, 'os_type': 1,
            'vcpus': 2, 'memory_mb': 2048, 'disk_gb': 40, 'gpu_cores': 3,
            'image': '/images/normal.qcow2',
            'disk': '/data/instances/rapid-vm-42.qcow2'}


def spec(**changes):
    values = dict(name='rapid-vm-42-abc', domain_type='qemu', vcpus=2,
                  max_vcpus=4, memory_mb=2048, max_memory_mb=4096,
                  disk_path='/data/instances/rapid-vm-42-abc.qcow2',
                  disk_format='qcow2', network='rapidnet',
                  metadata=dict(METADATA),
                  serial_log='/data/instances/rapid-vm-42-abc.console.log')
    values.update(changes)
    return vconfig.DomainSpec(**values)


def parse(domain_spec):
    xml = vconfig.build_domain_xml(domain_spec)
    assert isinstance(xml, str)
    return ET.fromstring(xml)


# -- build_domain_xml -----------------------------------------------------


@pytest.mark.parametrize('domain_type', ['test', 'qemu', 'kvm'])
def test_common_parts(domain_type):
    root = parse(spec(domain_type=domain_type))
    assert root.tag == 'domain'
    assert root.get('type') == domain_type
    assert root.findtext('name') == 'rapid-vm-42-abc'
    memory = root.find('memory')
    assert (memory.text, memory.get('unit')) == (str(4096 * 1024), 'KiB')
    current = root.find('currentMemory')
    assert (current.text, current.get('unit')) == (str(2048 * 1024), 'KiB')
    vcpu = root.find('vcpu')
    assert vcpu.text == '4'
    assert vcpu.get('current') == '2'
    assert root.findtext('os/type') == 'hvm'
    disk = root.find('devices/disk')
    assert (disk.get('type'), disk.get('device')) == ('file', 'disk')
    assert disk.find('driver').get('type') == 'qcow2'
    assert disk.find('driver').get('name') == 'qemu'
    assert disk.find('source').get('file') == \
        '/data/instances/rapid-vm-42-abc.qcow2'
    assert disk.find('target').get('dev') == 'vda'
    assert disk.find('target').get('bus') == 'virtio'
    interface = root.find('devices/interface')
    assert interface.get('type') == 'network'
    assert interface.find('source').get('network') == 'rapidnet'
    assert interface.find('model').get('type') == 'virtio'
    assert root.findtext('on_poweroff') == 'destroy'
    assert root.findtext('on_crash') == 'destroy'


def test_raw_disk_format():
    root = parse(spec(disk_format='raw', disk_path='/d/rapid-x.img'))
    assert root.find('devices/disk/driver').get('type') == 'raw'
    assert root.find('devices/disk/source').get('file') == '/d/rapid-x.img'


@pytest.mark.parametrize('domain_type', ['qemu', 'kvm'])
def test_real_hypervisor_parts(domain_type):
    root = parse(spec(domain_type=domain_type))
    os_type = root.find('os/type')
    assert os_type.get('arch') == 'x86_64'
    assert os_type.get('machine') == 'pc'
    assert root.find('features/acpi') is not None
    assert root.find('features/apic') is not None
    serial = root.find('devices/serial')
    assert serial.get('type') == 'file'
    source = serial.find('source')
    assert source.get('path') == \
        '/data/instances/rapid-vm-42-abc.console.log'
    assert source.get('append') == 'on'
    assert serial.find('target').get('port') == '0'
    assert root.find('devices/memballoon').get('model') == 'virtio'
    assert root.find('devices/memballoon/stats').get('period') == '5'
    rng = root.find('devices/rng')
    assert rng.get('model') == 'virtio'
    assert rng.find('backend').get('model') == 'random'
    assert rng.findtext('backend') == '/dev/urandom'


def test_serial_pty_without_log():
    root = parse(spec(serial_log=None))
    serial = root.find('devices/serial')
    assert serial.get('type') == 'pty'
    assert serial.find('source') is None


def test_test_domain_has_no_real_devices():
    root = parse(spec(domain_type='test'))
    assert root.find('os/type').get('arch') is None
    assert root.find('features') is None
    assert root.find('devices/serial') is None
    assert root.find('devices/memballoon') is None
    assert root.find('devices/rng') is None


def test_boot_from_disk_without_kernel():
    root = parse(spec())
    assert root.find('os/boot').get('dev') == 'hd'
    assert root.find('os/kernel') is None
    assert root.find('os/initrd') is None
    assert root.find('os/cmdline') is None


def test_direct_kernel_boot():
    root = parse(spec(kernel='/boot/vmlinuz', initrd='/boot/initrd.img',
                      kernel_cmdline='console=ttyS0 quiet'))
    assert root.findtext('os/kernel') == '/boot/vmlinuz'
    assert root.findtext('os/initrd') == '/boot/initrd.img'
    assert root.findtext('os/cmdline') == 'console=ttyS0 quiet'
    assert root.find('os/boot') is None


def test_kernel_without_initrd_or_cmdline():
    root = parse(spec(kernel='/boot/vmlinuz'))
    assert root.findtext('os/kernel') == '/boot/vmlinuz'
    assert root.find('os/initrd') is None
    assert root.find('os/cmdline') is None
    assert root.find('os/boot') is None


def test_special_characters_are_escaped():
    root = parse(spec(name='rapid-<&>"\'', kernel='/k',
                      kernel_cmdline='a="b c" & <d>',
                      metadata=dict(METADATA, image='/i/<a&b>.qcow2')))
    assert root.findtext('name') == 'rapid-<&>"\''
    assert root.findtext('os/cmdline') == 'a="b c" & <d>'
    instance = root.find(f'metadata/{{{NS}}}instance')
    assert instance.findtext(f'{{{NS}}}image') == '/i/<a&b>.qcow2'


def test_metadata_element_in_domain():
    root = parse(spec())
    instance = root.find(f'metadata/{{{NS}}}instance')
    assert instance is not None
    for field, value in METADATA.items():
        assert instance.findtext(f'{{{NS}}}{field}') == str(value), field
    assert len(instance) == len(METADATA)
    # It parses back to the same values.
    assert vconfig.parse_metadata(ET.tostring(instance, encoding='unicode')) \
        == METADATA


def test_metadata_none_values_are_left_out():
    element = vconfig.build_metadata({'user_id': 1, 'owner': None,
                                      'helper': 0, 'unknown': 'x'})
    children = {child.tag.rsplit('}', 1)[-1]: child.text
                for child in element}
    assert children == {'user_id': '1', 'helper': '0'}


def test_metadata_uses_namespace_prefix():
    xml = vconfig.build_domain_xml(spec())
    assert f'xmlns:{vconfig.METADATA_PREFIX}="{NS}"' in xml
    assert f'<{vconfig.METADATA_PREFIX}:instance' in xml


# -- metadata_xml, parse_metadata ------------------------------------------


def test_metadata_xml_has_no_namespace():
    xml = vconfig.metadata_xml(METADATA)
    assert 'xmlns' not in xml
    assert NS not in xml
    root = ET.fromstring(xml)
    assert root.tag == 'instance'
    assert {child.tag for child in root} == set(METADATA)
    assert vconfig.parse_metadata(xml) == METADATA


def test_parse_metadata_namespaced_form():
    element = vconfig.build_metadata(METADATA)
    xml = ET.tostring(element, encoding='unicode')
    assert NS in xml
    assert vconfig.parse_metadata(xml) == METADATA


def test_parse_metadata_bare_form_as_libvirt_returns_it():
    xml = ('<instance>\n  <owner>h</owner>\n  <user_id> -1 </user_id>\n'
           '  <helper>1</helper>\n  <image></image>\n  <extra>7</extra>\n'
           '</instance>')
    assert vconfig.parse_metadata(xml) == {'owner': 'h', 'user_id': -1,
                                           'helper': 1, 'image': None}


def test_parse_metadata_other_prefix():
    xml = (f'<x:instance xmlns:x="{NS}"><x:user_id>5</x:user_id>'
           '<x:vcpus>2</x:vcpus></x:instance>')
    assert vconfig.parse_metadata(xml) == {'user_id': 5, 'vcpus': 2}


@pytest.mark.parametrize('xml', [
    '',
    'not xml at all',
    '<instance><user_id>1</user_id>',           # unterminated
    '<nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">'
    '<nova:name>x</nova:name></nova:instance>',  # no user_id
    '<other><user_id>1</user_id></other>',       # another element
    '<instance><owner>h</owner></instance>',     # no user_id
    '<instance><user_id>one</user_id></instance>',
    '<instance><user_id>1</user_id><vcpus>2.5</vcpus></instance>',
    '<instance><user_id></user_id></instance>',
])
def test_parse_metadata_refuses(xml):
    assert vconfig.parse_metadata(xml) is None


# -- parse_domain_devices --------------------------------------------------


def test_parse_domain_devices_of_our_xml():
    devices = vconfig.parse_domain_devices(vconfig.build_domain_xml(spec()))
    assert devices == {'disks': [{'path':
                                  '/data/instances/rapid-vm-42-abc.qcow2',
                                  'target': 'vda'}],
                       'macs': []}


def test_parse_domain_devices_libvirt_style():
    xml = """<domain type='kvm'><name>x</name><devices>
      <disk type='file' device='disk'><source file='/a.qcow2'/>
        <target dev='vda' bus='virtio'/></disk>
      <disk type='file' device='cdrom'><target dev='hdc'/></disk>
      <disk type='block'><source dev='/dev/sdb'/><target dev='vdb'/></disk>
      <interface type='network'><mac address='52:54:00:AA:BB:CC'/>
        <source network='default'/></interface>
      <interface type='network'><mac address='52:54:00:00:00:01'/></interface>
      <interface type='user'/>
    </devices></domain>"""
    assert vconfig.parse_domain_devices(xml) == {
        'disks': [{'path': '/a.qcow2', 'target': 'vda'},
                  {'path': None, 'target': 'hdc'},
                  {'path': None, 'target': 'vdb'}],
        'macs': ['52:54:00:aa:bb:cc', '52:54:00:00:00:01']}


def test_parse_domain_devices_without_devices():
    assert vconfig.parse_domain_devices('<domain><name>x</name></domain>') \
        == {'disks': [], 'macs': []}


# -- on libvirt's test driver ----------------------------------------------


def test_define_on_test_driver_and_read_metadata_back():
    conn = libvirt.open('test:///default')
    name = f'rapid-cfgtest-{uuid.uuid4().hex[:10]}'
    metadata = dict(METADATA, user_id=123456789012, owner='cfg-test')
    xml = vconfig.build_domain_xml(spec(name=name, domain_type='test',
                                        network='default',
                                        metadata=metadata))
    dom = conn.defineXML(xml)
    try:
        assert dom.name() == name
        returned = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS)
        assert vconfig.parse_metadata(returned) == metadata
        assert dom.maxMemory() == 4096 * 1024
        assert dom.vcpusFlags(libvirt.VIR_DOMAIN_VCPU_MAXIMUM) == 4
        assert dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_CONFIG) == 2
        devices = vconfig.parse_domain_devices(dom.XMLDesc(0))
        assert devices['disks'][0] == {
            'path': '/data/instances/rapid-vm-42-abc.qcow2', 'target': 'vda'}
        assert len(devices['macs']) == 1  # libvirt made one up
        # Replace the metadata the way the driver does after a resize.
        changed = dict(metadata, vcpus=4, memory_mb=4096)
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                        vconfig.metadata_xml(changed),
                        vconfig.METADATA_PREFIX, NS,
                        libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        returned = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS)
        assert vconfig.parse_metadata(returned) == changed
    finally:
        dom.undefine()
        conn.close()
