"""Tests of rapid_vmm.virt.libvirt.driver on libvirt's test:///default.

test:///default lives as long as this process and is shared by every
connection in it, so each test uses a ConfFixture with a unique ``host``
(list_instances only sees its own domains) and removes what it made.
"""

import ipaddress
import os
import shutil
import stat
import threading
import time
import uuid

import fixtures
import libvirt
import pytest
import testtools

from rapid_vmm import exception
from rapid_vmm import flavors
from rapid_vmm import objects
from rapid_vmm.tests import fixtures as rapid_fixtures
from rapid_vmm.virt import driver as virt_driver
from rapid_vmm.virt.libvirt import config as vconfig
from rapid_vmm.virt.libvirt import driver as libvirt_driver
from rapid_vmm.virt.libvirt import host as vhost

GiB = 1024 ** 3
PowerState = virt_driver.PowerState


class Env:
    """A driver on test:///default with a private configuration."""

    def __init__(self, **overrides):
        self.fixture = rapid_fixtures.ConfFixture(**overrides)
        self.fixture.setUp()
        self.conf = self.fixture.conf
        self.tmp = self.fixture.tempdir
        self.driver = libvirt_driver.LibvirtDriver(self.conf)
        self.driver.init_host()
        self.conn = libvirt.open('test:///default')
        self.foreign: list[str] = []
        self.events: list[tuple] = []

    def vm(self, user_id=1, **fields):
        values = dict(user_id=user_id,
                      name=f'rapid-vm-{user_id}-{uuid.uuid4().hex[:8]}',
                      vcpus=1, memory_mb=1024, disk_gb=20)
        values.update(fields)
        return objects.Vm(**values)

    def create(self, user_id=1, **fields):
        vm = self.vm(user_id, **fields)
        result = self.driver.create(vm)
        vm.driver_id = result.driver_id
        vm.disk_path = result.disk_path
        vm.image = result.image
        return vm

    def define_foreign(self, metadata=None, start=True):
        """A domain that is not ours (no metadata, or another owner)."""
        name = f'foreign-{uuid.uuid4().hex[:10]}'
        spec = vconfig.DomainSpec(
            name=name, domain_type='test', vcpus=1, max_vcpus=1,
            memory_mb=128, max_memory_mb=128,
            disk_path=os.path.join(self.tmp, name + '.qcow2'),
            disk_format='qcow2', network='default', metadata={})
        root_xml = vconfig.build_domain_xml(spec)
        if metadata is None:
            start_tag = root_xml.index('<metadata>')
            end_tag = root_xml.index('</metadata>') + len('</metadata>')
            root_xml = root_xml[:start_tag] + root_xml[end_tag:]
        else:
            root_xml = vconfig.build_domain_xml(
                vconfig.DomainSpec(**dict(vars(spec), metadata=metadata)))
        dom = self.conn.defineXML(root_xml)
        self.foreign.append(name)
        if start:
            dom.create()
        return dom

    def domain(self, vm):
        try:
            return self.conn.lookupByName(vm.name)
        except libvirt.libvirtError:
            return None

    def close(self):
        try:
            for instance in self.driver.list_instances():
                self.driver.destroy(objects.Vm(
                    user_id=instance.user_id, name=instance.name, vcpus=1,
                    memory_mb=1, disk_gb=0, disk_path=instance.disk_path))
        except exception.DriverError:
            pass
        for name in self.foreign:
            try:
                dom = self.conn.lookupByName(name)
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            except libvirt.libvirtError:
                pass
        self.conn.close()
        self.driver.cleanup_host()
        self.fixture.cleanUp()


@pytest.fixture
def env():
    environment = Env()
    yield environment
    environment.close()


def script(env, name, body):
    path = os.path.join(env.tmp, name)
    with open(path, 'w', encoding='utf-8') as stream:
        stream.write('#!/bin/sh\n' + body + '\n')
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


# -- validate_config ------------------------------------------------------


def test_validate_config_good(env):
    libvirt_driver.LibvirtDriver.validate_config(env.conf)


@pytest.mark.parametrize('option, value, words', [
    ('normal_image', None, 'normal_image is not set'),
    ('normal_image', '', 'normal_image is not set'),
    ('normal_image', '/nonexistent/template.qcow2', 'not a readable file'),
    ('normal_image', '/', 'not a readable file'),
    ('helper_images', ['/nonexistent/helper.qcow2'], 'helper_images'),
    ('kernel', '/nonexistent/vmlinuz', 'kernel'),
    ('initrd', '/nonexistent/initrd', 'initrd'),
    ('ip_command', '/nonexistent/find-ip --flag', 'ip_command'),
    ('ip_command', 'no-such-program-rapid-vmm', 'names no executable'),
    ('ip_command', '   ', 'names no executable'),
    ('ip_command', '"unbalanced', 'cannot be parsed'),
])
def test_validate_config_refuses(env, option, value, words):
    env.conf.set_override(option, value, group='libvirt')
    with pytest.raises(exception.ConfigError, match=words) as info:
        libvirt_driver.LibvirtDriver.validate_config(env.conf)
    assert '\n' not in str(info.value)
    assert str(info.value).startswith('Bad configuration: ')


def test_validate_config_helper_images_good(env):
    env.conf.set_override('helper_images', [env.fixture.template],
                          group='libvirt')
    env.conf.set_override('ip_command', 'true --quiet', group='libvirt')
    libvirt_driver.LibvirtDriver.validate_config(env.conf)


@pytest.mark.skipif(os.geteuid() == 0, reason='root reads any file')
def test_validate_config_unreadable_image(env):
    path = os.path.join(env.tmp, 'secret.qcow2')
    shutil.copy(env.fixture.template, path)
    os.chmod(path, 0)
    env.conf.set_override('normal_image', path, group='libvirt')
    with pytest.raises(exception.ConfigError, match='not a readable file'):
        libvirt_driver.LibvirtDriver.validate_config(env.conf)


def test_validate_config_without_qemu_img(env, monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(libvirt_driver.shutil, 'which',
                        lambda name: None if name == 'qemu-img'
                        else real_which(name))
    with pytest.raises(exception.ConfigError, match='qemu-img'):
        libvirt_driver.LibvirtDriver.validate_config(env.conf)


# -- create ---------------------------------------------------------------


def test_create(env):
    vm = env.vm(7, vcpus=2, memory_mb=2048, disk_gb=20, gpu_cores=3,
                os_type=objects.OsType.ANDROID)
    result = env.driver.create(vm)
    dom = env.domain(vm)
    assert dom is not None
    assert result.driver_id == dom.UUIDString()
    assert dom.isActive()
    assert dom.isPersistent()
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert result.disk_path == os.path.join(env.conf.data_path, 'instances',
                                            vm.name + '.qcow2')
    assert os.path.isfile(result.disk_path)
    assert result.image == env.fixture.template
    # The grid's largest type is the ceiling of a live resize.
    assert dom.maxMemory() == 4096 * 1024
    assert dom.vcpusFlags(libvirt.VIR_DOMAIN_VCPU_MAXIMUM) == 4
    assert dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE) == 2
    metadata = vconfig.parse_metadata(dom.metadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT, vconfig.METADATA_NS))
    assert metadata == {'owner': env.conf.host, 'user_id': 7, 'helper': 0,
                        'os_type': 1, 'vcpus': 2, 'memory_mb': 2048,
                        'disk_gb': 20, 'gpu_cores': 3,
                        'image': env.fixture.template,
                        'disk': result.disk_path}
    devices = vconfig.parse_domain_devices(dom.XMLDesc(0))
    assert devices['disks'][0]['path'] == result.disk_path


def test_create_with_given_disk_path_and_helper(env):
    helper_template = os.path.join(env.tmp, 'helper.qcow2')
    shutil.copy(env.fixture.template, helper_template)
    env.conf.set_override('helper_images', [helper_template],
                          group='libvirt')
    disk = os.path.join(env.conf.data_path, 'instances',
                        'rapid-helper-1-given.qcow2')
    vm = env.vm(-1, helper=1, disk_path=disk)
    result = env.driver.create(vm)
    assert result.disk_path == disk
    assert result.image == helper_template
    assert os.path.isfile(disk)
    [instance] = env.driver.list_instances()
    assert (instance.user_id, instance.helper) == (-1, 1)
    assert instance.image == helper_template


def test_template_for(env):
    env.conf.set_override('helper_images', ['/h1', '/h2'], group='libvirt')
    template = env.fixture.template
    assert env.driver.template_for(env.vm(1)) == template
    assert env.driver.template_for(env.vm(-1, helper=1)) == '/h1'
    assert env.driver.template_for(env.vm(-2, helper=2)) == '/h2'
    assert env.driver.template_for(env.vm(-3, helper=3)) == '/h2'
    env.conf.set_override('helper_images', [], group='libvirt')
    assert env.driver.template_for(env.vm(-1, helper=1)) == template


def test_create_max_sizes_from_options(env):
    env.conf.set_override('max_vcpus', 8, group='libvirt')
    env.conf.set_override('max_memory_mb', 6144, group='libvirt')
    vm = env.create(1)
    dom = env.domain(vm)
    assert dom.vcpusFlags(libvirt.VIR_DOMAIN_VCPU_MAXIMUM) == 8
    assert dom.maxMemory() == 6144 * 1024
    # A VM bigger than the maximums gets its own size as maximum.
    big = env.create(2, vcpus=16, memory_mb=8192)
    dom = env.domain(big)
    assert dom.vcpusFlags(libvirt.VIR_DOMAIN_VCPU_MAXIMUM) == 16
    assert dom.maxMemory() == 8192 * 1024


def test_create_failure_cleans_up(env):
    bogus = os.path.join(env.tmp, 'bogus.qcow2')
    with open(bogus, 'wb') as stream:
        stream.write(b'QFI\xfb' + b'\xff' * 100)  # not an image
    env.conf.set_override('normal_image', bogus, group='libvirt')
    vm = env.vm(3)
    with pytest.raises(exception.DriverError):
        env.driver.create(vm)
    assert env.domain(vm) is None
    assert env.driver.list_instances() == []
    assert os.listdir(os.path.join(env.conf.data_path, 'instances')) == []


def test_create_failure_after_define_cleans_up(env, monkeypatch):
    vm = env.vm(4)

    def refuse(self):
        raise libvirt.libvirtError('refused by the test')

    monkeypatch.setattr(libvirt.virDomain, 'create', refuse)
    with pytest.raises(exception.DriverError, match='start domain'):
        env.driver.create(vm)
    monkeypatch.undo()
    assert env.domain(vm) is None
    assert os.listdir(os.path.join(env.conf.data_path, 'instances')) == []


# -- addresses ------------------------------------------------------------


def is_test_driver_address(ip):
    """The test driver makes up 192.168.122.<2 + domain id> (it carries
    over into the third octet once the process made many domains)."""
    address = ipaddress.ip_address(ip)
    return address.version == 4 and \
        address in ipaddress.ip_network('192.168.0.0/16')


def test_wait_for_ip_on_test_driver(env):
    vm = env.create(1)
    ip = env.driver.wait_for_ip(vm)
    assert is_test_driver_address(ip)
    assert env.driver.wait_for_ip(vm, timeout=0) == ip


@pytest.mark.parametrize('source', ['lease', 'agent', 'arp'])
def test_wait_for_ip_each_source(env, source):
    env.conf.set_override('ip_sources', [source], group='libvirt')
    vm = env.create(1)
    assert is_test_driver_address(env.driver.wait_for_ip(vm, timeout=0))


def test_wait_for_ip_of_missing_domain(env):
    with pytest.raises(exception.DriverError, match='does not exist'):
        env.driver.wait_for_ip(env.vm(1), timeout=0)


def test_wait_for_ip_with_command(env):
    args_file = os.path.join(env.tmp, 'args')
    command = script(env, 'find-ip',
                     f'printf "%s\\n" "$@" > {args_file}\n'
                     'echo "address of $2: 10.20.30.40"')
    env.conf.set_override('ip_command', f'{command} --fast',
                          group='libvirt')
    vm = env.vm(1)  # no domain needed: the command decides
    assert env.driver.wait_for_ip(vm, timeout=0) == '10.20.30.40'
    with open(args_file, encoding='utf-8') as stream:
        assert stream.read().split() == ['--fast', vm.name]


def test_wait_for_ip_command_normalises_ipv6(env):
    command = script(env, 'find-ip6', 'echo "  2001:DB8::0:1  "')
    env.conf.set_override('ip_command', command, group='libvirt')
    assert env.driver.wait_for_ip(env.vm(1), timeout=0) == '2001:db8::1'


def test_wait_for_ip_command_garbage(env):
    command = script(env, 'garbage', 'echo "no address here: 999.1.1.1"')
    env.conf.set_override('ip_command', command, group='libvirt')
    start = time.monotonic()
    with pytest.raises(exception.DriverError, match='no address after'):
        env.driver.wait_for_ip(env.vm(1), timeout=0.5)
    assert 0.4 <= time.monotonic() - start < 5


def test_wait_for_ip_command_failing(env):
    command = script(env, 'fails', 'echo 10.0.0.1; exit 3')
    env.conf.set_override('ip_command', command, group='libvirt')
    with pytest.raises(exception.DriverError):
        env.driver.wait_for_ip(env.vm(1), timeout=0)


def test_wait_for_ip_command_timeout(env):
    command = script(env, 'slow', 'sleep 30; echo 10.0.0.1')
    env.conf.set_override('ip_command', f'{command}', group='libvirt')
    env.conf.set_override('ip_command_timeout', 1, group='libvirt')
    start = time.monotonic()
    with pytest.raises(exception.DriverError):
        env.driver.wait_for_ip(env.vm(1), timeout=0)
    assert time.monotonic() - start < 10


def test_wait_for_ip_command_appears_later(env):
    flag = os.path.join(env.tmp, 'ready')
    command = script(env, 'later',
                     f'[ -e {flag} ] && echo 10.9.8.7 || echo pending')
    env.conf.set_override('ip_command', command, group='libvirt')
    timer = threading.Timer(0.5, lambda: open(flag, 'w').close())
    timer.start()
    try:
        assert env.driver.wait_for_ip(env.vm(1), timeout=10) == '10.9.8.7'
    finally:
        timer.cancel()


@pytest.mark.parametrize('interfaces, expected', [
    ({}, None),
    (None, None),
    ({'eth0': {'addrs': [{'addr': '127.0.0.1'}, {'addr': 'fe80::1'},
                         {'addr': '0.0.0.0'}]}}, None),
    ({'eth0': {'addrs': [{'addr': '2001:db8::5'}, {'addr': '10.0.0.5'}]}},
     '10.0.0.5'),
    ({'a': {'addrs': [{'addr': 'bogus'}]},
      'b': {'addrs': [{'addr': '2001:db8::5'}]}}, '2001:db8::5'),
    ({'a': {'addrs': None}, 'b': {}}, None),
    ({'a': {'addrs': [{'addr': '169.254.1.1'}, {}]}}, None),
])
def test_pick_address(interfaces, expected):
    assert libvirt_driver._pick_address(interfaces) == expected


# -- suspend, resume ------------------------------------------------------


def test_suspend_resume_idempotent(env):
    vm = env.create(1)
    dom = env.domain(vm)
    env.driver.suspend(vm)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    env.driver.suspend(vm)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    [instance] = env.driver.list_instances()
    assert instance.power_state == PowerState.SUSPENDED
    env.driver.resume(vm)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    env.driver.resume(vm)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def test_resume_starts_a_shut_off_domain(env):
    vm = env.create(1)
    dom = env.domain(vm)
    dom.destroy()
    assert env.driver.list_instances()[0].power_state == PowerState.SHUTOFF
    env.driver.resume(vm)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def test_suspend_resume_missing_domain(env):
    vm = env.vm(1)
    with pytest.raises(exception.DriverError, match='does not exist'):
        env.driver.suspend(vm)
    with pytest.raises(exception.DriverError, match='does not exist'):
        env.driver.resume(vm)


# -- resize -----------------------------------------------------------------


def metadata_of(dom, scope):
    return vconfig.parse_metadata(dom.metadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT, vconfig.METADATA_NS, scope))


def test_resize_within_maximums_live_and_config(env):
    vm = env.create(1)
    dom = env.domain(vm)
    env.driver.resize(vm, flavors.VmType(4, 4096, 20))
    assert dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE) == 4
    assert dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_CONFIG) == 4
    assert dom.info()[2] == 4096 * 1024          # current memory, live
    config_xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert f'<currentMemory unit=\'KiB\'>{4096 * 1024}</currentMemory>' in \
        config_xml
    for scope in (libvirt.VIR_DOMAIN_AFFECT_LIVE,
                  libvirt.VIR_DOMAIN_AFFECT_CONFIG):
        metadata = metadata_of(dom, scope)
        assert (metadata['vcpus'], metadata['memory_mb'],
                metadata['disk_gb']) == (4, 4096, 20)
        assert metadata['owner'] == env.conf.host
    [instance] = env.driver.list_instances()
    assert (instance.vcpus, instance.memory_mb) == (4, 4096)
    # And down again.
    resized = vm.copy(vcpus=4, memory_mb=4096)
    env.driver.resize(resized, flavors.VmType(1, 2048, 20))
    assert dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE) == 1
    assert dom.info()[2] == 2048 * 1024
    env.driver.confirm_resize(resized)  # nothing to do, no error


def test_resize_of_inactive_domain_changes_config(env):
    vm = env.create(1)
    dom = env.domain(vm)
    dom.destroy()
    env.driver.resize(vm, flavors.VmType(2, 2048, 20))
    assert dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_CONFIG) == 2
    assert metadata_of(dom, libvirt.VIR_DOMAIN_AFFECT_CONFIG)['vcpus'] == 2


@pytest.mark.parametrize('new_type', [flavors.VmType(8, 1024, 20),
                                      flavors.VmType(1, 8192, 20)])
def test_resize_beyond_maximum_is_state_conflict(env, new_type):
    vm = env.create(1)
    dom = env.domain(vm)
    with pytest.raises(exception.VmStateConflict, match='at most 4 vCPUs'):
        env.driver.resize(vm, new_type)
    assert dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE) == 1
    assert dom.info()[2] == 1024 * 1024


def test_resize_disk_shrink_is_invalid(env):
    vm = env.create(1, disk_gb=40)
    with pytest.raises(exception.InvalidRequest, match='cannot shrink'):
        env.driver.resize(vm, flavors.VmType(2, 1024, 20))
    assert env.domain(vm).vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE) == 1


def test_resize_disk_grow_unsupported_on_test_driver(env):
    vm = env.create(1)
    with pytest.raises(exception.VmStateConflict, match='grow the disk'):
        env.driver.resize(vm, flavors.VmType(1, 1024, 40))
    dom = env.domain(vm)
    assert metadata_of(dom, libvirt.VIR_DOMAIN_AFFECT_CONFIG)['disk_gb'] \
        == 20


def test_resize_missing_domain(env):
    with pytest.raises(exception.DriverError, match='does not exist'):
        env.driver.resize(env.vm(1), flavors.VmType(2, 1024, 20))


# -- destroy ----------------------------------------------------------------


@pytest.mark.parametrize('state', ['running', 'paused', 'shutoff'])
def test_destroy(env, state):
    vm = env.create(1)
    dom = env.domain(vm)
    if state == 'paused':
        dom.suspend()
    elif state == 'shutoff':
        dom.destroy()
    console = os.path.join(env.conf.data_path, 'instances',
                           vm.name + '.console.log')
    open(console, 'w').close()
    env.driver.destroy(vm)
    assert env.domain(vm) is None
    assert not os.path.exists(vm.disk_path)
    assert not os.path.exists(console)
    assert env.driver.list_instances() == []
    env.driver.destroy(vm)  # twice is fine


def test_destroy_without_disk_path_uses_the_default_name(env):
    vm = env.create(1)
    path = vm.disk_path
    env.driver.destroy(vm.copy(disk_path=None))
    assert not os.path.exists(path)


def test_destroy_of_nothing(env):
    env.driver.destroy(env.vm(1))


# -- usage ------------------------------------------------------------------


def test_usage_on_test_driver(env):
    vm = env.create(1, memory_mb=2048)
    cpu = env.driver.usage([vm], 'cpu')
    assert cpu == {1: {'cpu_util_percent': None, 'source': 'unavailable'}}
    memory = env.driver.usage([vm], 'memory')
    assert memory == {1: {'memory_mb': 2048, 'memory_used_mb': None,
                          'source': 'record'}}
    disk = env.driver.usage([vm], 'disk')
    assert disk[1]['capacity_bytes'] == 20 * GiB
    assert disk[1]['allocation_bytes'] == \
        os.stat(vm.disk_path).st_blocks * 512
    assert disk[1]['allocation_bytes'] > 0
    assert disk[1]['source'] == 'disk-file'


def test_usage_of_vm_without_domain(env):
    vm = env.vm(9)
    assert env.driver.usage([vm], 'disk') == {9: {
        'capacity_bytes': 20 * GiB, 'allocation_bytes': None,
        'physical_bytes': None, 'source': 'disk-file'}}
    assert env.driver.usage([], 'cpu') == {}


def test_usage_from_statistics(env, monkeypatch):
    vm = env.vm(1, vcpus=2, memory_mb=2048)
    now = [1000.0]
    stats = {vm.name: {'cpu.time': 10 * 10 ** 9, 'vcpu.current': 2,
                       'balloon.current': 2048 * 1024,
                       'balloon.available': 2000 * 1024,
                       'balloon.unused': 1500 * 1024,
                       'block.count': 2,
                       'block.0.name': 'hdc',
                       'block.1.name': 'vda',
                       'block.1.capacity': 20 * GiB,
                       'block.1.allocation': 12345,
                       'block.1.physical': 200704}}
    monkeypatch.setattr(env.driver, '_bulk_stats', lambda names: stats)
    monkeypatch.setattr(libvirt_driver.time, 'monotonic', lambda: now[0])
    assert env.driver.usage([vm], 'cpu')[1] == {
        'cpu_util_percent': None, 'source': 'first-sample'}
    now[0] += 0.1
    assert env.driver.usage([vm], 'cpu')[1]['source'] == 'too-soon'
    now[0] += 9.9
    stats[vm.name]['cpu.time'] += 5 * 10 ** 9     # 5 s of 2 vCPUs in 10 s
    assert env.driver.usage([vm], 'cpu')[1] == {
        'cpu_util_percent': 25.0, 'source': 'cpu.time'}
    now[0] += 1
    stats[vm.name]['cpu.time'] += 10 * 10 ** 9    # more than possible
    assert env.driver.usage([vm], 'cpu')[1]['cpu_util_percent'] == 100.0
    now[0] += libvirt_driver.CPU_SAMPLE_MAX_AGE + 1
    assert env.driver.usage([vm], 'cpu')[1]['source'] == 'first-sample'
    assert env.driver.usage([vm], 'memory')[1] == {
        'memory_mb': 2048, 'memory_used_mb': 500, 'source': 'balloon'}
    assert env.driver.usage([vm], 'disk')[1] == {
        'capacity_bytes': 20 * GiB, 'allocation_bytes': 12345,
        'physical_bytes': 200704, 'source': 'block-stats'}


@pytest.mark.parametrize('stats, expected', [
    ({}, {'memory_mb': 1024, 'memory_used_mb': None, 'source': 'record'}),
    ({'balloon.current': 512 * 1024, 'balloon.rss': 300 * 1024},
     {'memory_mb': 512, 'memory_used_mb': 300, 'source': 'balloon.rss'}),
    ({'balloon.current': 512 * 1024},
     {'memory_mb': 512, 'memory_used_mb': None,
      'source': 'balloon.current'}),
])
def test_memory_usage_fallbacks(stats, expected):
    vm = objects.Vm(user_id=1, name='x', vcpus=1, memory_mb=1024, disk_gb=1)
    assert libvirt_driver._memory_usage(vm, stats) == expected


def test_destroy_forgets_cpu_sample(env, monkeypatch):
    vm = env.create(1)
    monkeypatch.setattr(env.driver, '_bulk_stats',
                        lambda names: {vm.name: {'cpu.time': 1}})
    env.driver.sample_cpu([vm])
    assert vm.name in env.driver._cpu_samples
    env.driver.destroy(vm)
    assert vm.name not in env.driver._cpu_samples


# -- listing ----------------------------------------------------------------


def test_list_instances_only_ours(env):
    mine = env.create(5, vcpus=2, memory_mb=2048, disk_gb=40, gpu_cores=1)
    env.define_foreign()                                    # no metadata
    env.define_foreign({'owner': 'another-host', 'user_id': 5})
    env.define_foreign({'owner': env.conf.host})            # no user_id
    names = {d.name() for d in env.conn.listAllDomains(0)}
    assert 'test' in names   # libvirt's predefined domain
    instances = env.driver.list_instances()
    assert [i.name for i in instances] == [mine.name]
    [instance] = instances
    assert instance == virt_driver.Instance(
        driver_id=mine.driver_id, name=mine.name,
        power_state=PowerState.RUNNING, user_id=5, helper=0, os_type=0,
        vcpus=2, memory_mb=2048, disk_gb=40, gpu_cores=1,
        disk_path=mine.disk_path, image=env.fixture.template)


def test_list_instances_defined_but_not_running(env):
    vm = env.create(1)
    env.domain(vm).destroy()
    [instance] = env.driver.list_instances()
    assert instance.power_state == PowerState.SHUTOFF


@pytest.mark.parametrize('state, expected', [
    ('VIR_DOMAIN_RUNNING', PowerState.RUNNING),
    ('VIR_DOMAIN_BLOCKED', PowerState.RUNNING),
    ('VIR_DOMAIN_PAUSED', PowerState.SUSPENDED),
    ('VIR_DOMAIN_PMSUSPENDED', PowerState.SUSPENDED),
    ('VIR_DOMAIN_SHUTDOWN', PowerState.SHUTOFF),
    ('VIR_DOMAIN_SHUTOFF', PowerState.SHUTOFF),
    ('VIR_DOMAIN_CRASHED', PowerState.CRASHED),
    ('VIR_DOMAIN_NOSTATE', PowerState.UNKNOWN),
])
def test_power_state(state, expected):
    assert libvirt_driver._power_state(getattr(libvirt, state)) == expected


def test_cleanup_orphans(env):
    vm = env.create(1)
    images = os.path.join(env.conf.data_path, 'instances')
    orphans = [os.path.join(images, name) for name in
               ('rapid-vm-99-gone.qcow2', 'rapid-vm-98-x.img',
                'rapid-vm-97-y.qcow2.part')]
    others = [os.path.join(images, name) for name in
              ('notes.txt', 'rapid-vm-1.console.log', 'template.qcow2')]
    for path in orphans + others:
        open(path, 'w').close()
    removed = env.driver.cleanup_orphans({vm.disk_path})
    assert sorted(removed) == sorted(orphans)
    assert os.path.exists(vm.disk_path)
    assert all(os.path.exists(p) for p in others)
    assert not any(os.path.exists(p) for p in orphans)
    assert env.driver.cleanup_orphans({vm.disk_path}) == []


# -- host ---------------------------------------------------------------------


def test_host_capacity(env):
    capacity = env.driver.host_capacity()
    assert capacity.vcpus == 16
    assert capacity.memory_mb == 3072
    images = os.path.join(env.conf.data_path, 'instances')
    assert capacity.disk_gb == shutil.disk_usage(images).total // GiB
    assert capacity.disk_gb > 0


def test_images_path_option(env):
    assert libvirt_driver.images_path(env.conf) == os.path.join(
        env.conf.data_path, 'instances')
    env.conf.set_override('images_path', '/srv/disks', group='libvirt')
    assert libvirt_driver.images_path(env.conf) == '/srv/disks'


def test_domain_type_on_test_driver(env):
    assert env.driver._domain_type() == 'test'


def test_lifecycle_events_reach_the_callback(env):
    events = []
    seen = threading.Event()

    def callback(name, event):
        events.append((name, event))
        if event == 'started':
            seen.set()

    env.driver.set_event_callback(callback)
    vm = env.create(1)
    assert seen.wait(10), events
    assert (vm.name, 'started') in events


def test_bad_uri_raises_driver_error_and_backs_off(monkeypatch):
    host = vhost.Host('test:///nonexistent/path.xml',
                      reconnect_max_interval=5)
    opened = []
    real_open = libvirt.open
    monkeypatch.setattr(vhost.libvirt, 'open',
                        lambda uri: opened.append(uri) or real_open(uri))
    now = [100.0]
    monkeypatch.setattr(vhost.time, 'monotonic', lambda: now[0])
    try:
        with pytest.raises(exception.DriverError, match='connect'):
            host.get_connection()
        assert len(opened) == 1
        # Within the back-off: refused without trying libvirt again.
        with pytest.raises(exception.DriverError, match='next attempt'):
            host.get_connection()
        assert len(opened) == 1
        delays = []
        for _ in range(6):
            now[0] = host._next_attempt
            with pytest.raises(exception.DriverError):
                host.get_connection()
            delays.append(host._next_attempt - now[0])
        assert len(opened) == 7
        assert delays == [2, 4, 5, 5, 5, 5]   # doubling, capped at 5 s
        assert not host.connected
    finally:
        host.stop()


def test_driver_with_bad_uri_starts_and_reports():
    environment = Env(**{'libvirt.connection_uri':
                         'test:///nonexistent/path.xml'})
    try:
        with pytest.raises(exception.DriverError):
            environment.driver.list_instances()
        with pytest.raises(exception.DriverError):
            environment.driver.host_capacity()
    finally:
        environment.conn.close()
        environment.driver.cleanup_host()
        environment.fixture.cleanUp()


def test_reconnect_after_mark_broken():
    events = []
    got = threading.Event()

    def handler(name, event):
        events.append((name, event))
        got.set()

    host = vhost.Host('test:///default', event_handler=handler)
    host.start()
    try:
        first = host.get_connection()
        assert host.get_connection() is first
        host.mark_broken(object())        # another connection: ignored
        assert host.get_connection() is first
        host.mark_broken(first)
        # It reconnects by itself, in the background, and says so.
        assert got.wait(5)
        assert (None, 'reconnected') in events
        assert host.connected
        second = host.get_connection()
        assert second is not first
    finally:
        host.stop()


def test_host_call_timeout():
    host = vhost.Host('test:///default', call_timeout=0.2)
    try:
        assert host.call(lambda a, b: a + b, 1, 2) == 3
        release = threading.Event()
        with pytest.raises(exception.DriverError, match='no answer'):
            host.call(release.wait, 5, action='slow call')
        release.set()
    finally:
        host.stop()
    with pytest.raises(exception.DriverError):
        host.call(lambda: 1)


# -- production bugs ----------------------------------------------------------


class DriverBugTest(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.env = Env()
        self.addCleanup(self.env.close)

    # BUG: LibvirtDriver.resize() applies the vCPU and memory changes (live
    # and config) before it tries to grow the disk; when blockResize is
    # refused it raises VmStateConflict but leaves the domain at the new
    # vCPUs/memory while its metadata (and the manager's record) keep the
    # old size. Fix: grow the disk first (before any setVcpusFlags /
    # setMemoryFlags), or roll the changes back when _grow_disk fails.
    def test_failed_disk_grow_leaves_cpu_and_memory_alone(self):
        vm = self.env.create(1)
        self.assertRaises(exception.VmStateConflict, self.env.driver.resize,
                          vm, flavors.VmType(2, 2048, 40))
        dom = self.env.domain(vm)
        self.assertEqual(1, dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE))
        self.assertEqual(1024 * 1024, dom.info()[2])

    # BUG: when defineXML fails because a domain of that name already
    # exists (not ours), create()'s clean-up (_destroy_quietly ->
    # _undefine(name)) destroys and undefines that foreign domain. The
    # module promises "Only domains whose owner is this agent's host are
    # ever touched". Fix: in create(), remember the domain returned by
    # defineXML and undefine only that one (skip _undefine when define
    # failed), or check the metadata owner in _undefine.
    def test_create_failure_never_touches_a_foreign_domain(self):
        foreign = self.env.define_foreign()
        vm = self.env.vm(1, name=foreign.name())
        self.assertRaises(exception.DriverError, self.env.driver.create, vm)
        self.assertIsNotNone(self.env.domain(vm))
        self.assertTrue(self.env.domain(vm).isActive())

    # BUG: _instance_of() returns None for *any* libvirtError from
    # dom.metadata(), so when the connection drops after listAllDomains
    # every domain is skipped and list_instances() returns [] instead of
    # raising DriverError (the interface promises callers "treat every VM
    # as unknown, never as deleted"; reconcile would mark all VMs stopped).
    # Fix: in _instance_of, return None only for VIR_ERR_NO_DOMAIN_METADATA
    # or VIR_ERR_NO_DOMAIN; for a connection error call
    # self._host.mark_broken(...) and raise DriverError; others too.
    def test_list_instances_with_lost_connection_raises(self):
        self.env.create(1)

        def lost(*args, **kwargs):
            error = libvirt.libvirtError('connection lost')
            error.err = (libvirt.VIR_ERR_SYSTEM_ERROR, 0, 'connection lost',
                         2, '', None, None, -1, 0)
            raise error

        self.useFixture(fixtures.MockPatchObject(
            libvirt.virDomain, 'metadata', lost))
        self.assertRaises(exception.DriverError,
                          self.env.driver.list_instances)

