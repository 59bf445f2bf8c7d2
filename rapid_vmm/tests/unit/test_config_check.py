"""Tests of rapid_vmm.config_check and of the agent's exit on bad config."""

import os
import shutil
import subprocess
import sys

from oslo_config import cfg
import pytest

from rapid_vmm import conf as rapid_conf
from rapid_vmm import config_check
from rapid_vmm import exception
from rapid_vmm.tests import fixtures as rapid_fixtures


@pytest.fixture
def base(tmp_path):
    """Values of a good configuration (libvirt test driver)."""
    template = rapid_fixtures.make_template(str(tmp_path))
    return rapid_fixtures.agent_config(str(tmp_path / 'data'), template,
                                       rapid_fixtures.MEMORY_TRANSPORT)


def load(tmp_path, values, name='rapid-vmm.conf'):
    """A private ConfigOpts parsed from a real file holding ``values``."""
    path = rapid_fixtures.write_config_file(str(tmp_path / name), values)
    conf = cfg.ConfigOpts()
    rapid_conf.register_opts(conf)
    conf(['--config-file', path], project='rapid-vmm-test',
         default_config_files=[], default_config_dirs=[])
    return conf


def refused(conf, *words):
    with pytest.raises(exception.ConfigError) as info:
        config_check.validate(conf)
    message = str(info.value)
    assert '\n' not in message, message
    assert message.startswith('Bad configuration: ')
    for word in words:
        assert word.lower() in message.lower(), message
    return message


def test_good_config_passes(tmp_path, base):
    conf = load(tmp_path, base)
    config_check.validate(conf)
    assert os.path.isdir(conf.data_path)


def test_good_config_with_optional_values(tmp_path, base):
    base[('gpu', 'devices')] = '0, 2'
    base[('gpu', 'total_cores')] = 16
    base[('DEFAULT', 'vm_types')] = '1,2 x 512,1024 x 0,10'
    base[('libvirt', 'image_mode')] = 'copy'
    base[('libvirt', 'ip_command')] = 'true'
    config_check.validate(load(tmp_path, base))


def test_conf_fixture_config_passes():
    fixture = rapid_fixtures.ConfFixture()
    fixture.setUp()
    try:
        config_check.validate(fixture.conf)
    finally:
        fixture.cleanUp()


def test_unknown_driver_from_file(tmp_path, base):
    base[('DEFAULT', 'compute_driver')] = 'xen'
    conf = load(tmp_path, base)  # parsing does not check file values
    refused(conf, 'compute_driver', 'xen')


@pytest.mark.parametrize('group, name, value, words', [
    ('DEFAULT', 'report_interval', 'often', ['report_interval']),
    ('DEFAULT', 'helper_vm_count', '-1', ['helper_vm_count']),
    ('libvirt', 'image_mode', 'clone', ['image_mode', 'clone']),
    ('libvirt', 'ip_sources', 'lease,dns', ['ip_sources']),
    ('gpu', 'backend', 'cuda', ['backend', 'cuda']),
    ('DEFAULT', 'openstack_support', 'maybe', ['openstack_support']),
])
def test_bad_values_from_file(tmp_path, base, group, name, value, words):
    base[(group, name)] = value
    refused(load(tmp_path, base), *words)


@pytest.mark.parametrize('grid', ['1,2 x 1024', '2,1 x 1024 x 20',
                                  '0 x 1024 x 20', 'a x b x c'])
def test_bad_vm_types(tmp_path, base, grid):
    base[('DEFAULT', 'vm_types')] = grid
    refused(load(tmp_path, base), 'vm_types')


def test_data_path_cannot_be_created(tmp_path, base):
    blocker = tmp_path / 'blocker'
    blocker.write_text('x')
    base[('DEFAULT', 'data_path')] = str(blocker / 'data')
    refused(load(tmp_path, base), 'data_path', 'cannot be created')


def test_data_path_not_writable(tmp_path, base, request):
    data = tmp_path / 'readonly'
    data.mkdir()
    if os.geteuid() != 0:
        data.chmod(0o555)
        request.addfinalizer(lambda: data.chmod(0o755))
    else:
        if shutil.which('chattr') is None or subprocess.run(
                ['chattr', '+i', str(data)], check=False,
                capture_output=True).returncode != 0:
            pytest.skip('cannot make a directory read-only for root')
        request.addfinalizer(lambda: subprocess.run(
            ['chattr', '-i', str(data)], check=False))
    base[('DEFAULT', 'data_path')] = str(data)
    refused(load(tmp_path, base), 'data_path', 'not writable')


@pytest.mark.parametrize('value, words', [
    (None, ['normal_image', 'not set']),
    ('/nonexistent/template.qcow2', ['normal_image', 'not a readable']),
])
def test_libvirt_normal_image(tmp_path, base, value, words):
    if value is None:
        del base[('libvirt', 'normal_image')]
    else:
        base[('libvirt', 'normal_image')] = value
    refused(load(tmp_path, base), *words)


@pytest.mark.parametrize('devices', ['x', '0,x', 'all,1', '-1', '1.5'])
def test_bad_gpu_devices(tmp_path, base, devices):
    base[('gpu', 'devices')] = devices
    refused(load(tmp_path, base), '[gpu] devices')


def test_openstack_support_true_selects_nova(tmp_path, base):
    base[('DEFAULT', 'openstack_support')] = 'true'
    # The nova driver may not exist yet (cannot be loaded) or may refuse
    # this configuration, which has no [nova] settings: both say nova.
    refused(load(tmp_path, base), 'nova')


def test_openstack_support_false_selects_libvirt(tmp_path, base):
    base[('DEFAULT', 'openstack_support')] = 'false'
    base[('DEFAULT', 'compute_driver')] = 'nova'
    config_check.validate(load(tmp_path, base))


def test_compute_driver_nova(tmp_path, base):
    base[('DEFAULT', 'compute_driver')] = 'nova'
    refused(load(tmp_path, base), 'nova')


# -- the agent's command line ----------------------------------------------


def run_agent(tmp_path, *args):
    env = dict(os.environ, HOME=str(tmp_path))
    env.pop('OS_CLOUD', None)
    return subprocess.Popen(
        [sys.executable, '-m', 'rapid_vmm.cmd.vmm', *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=str(tmp_path), env=env)


def test_agent_exits_2_with_one_line(tmp_path, base):
    cases = {}
    bad_driver = dict(base)
    bad_driver[('DEFAULT', 'compute_driver')] = 'xen'
    cases['driver'] = rapid_fixtures.write_config_file(
        str(tmp_path / 'driver.conf'), bad_driver)
    bad_grid = dict(base)
    bad_grid[('DEFAULT', 'vm_types')] = '1,2 x 1024'
    cases['grid'] = rapid_fixtures.write_config_file(
        str(tmp_path / 'grid.conf'), bad_grid)
    no_image = dict(base)
    no_image[('libvirt', 'normal_image')] = str(tmp_path / 'missing.qcow2')
    cases['image'] = rapid_fixtures.write_config_file(
        str(tmp_path / 'image.conf'), no_image)
    cases['missing file'] = str(tmp_path / 'does-not-exist.conf')
    # Run them side by side: each start costs about a second.
    procs = {name: run_agent(tmp_path, '--config-file', path)
             for name, path in cases.items()}
    words = {'driver': 'xen', 'grid': 'vm_types', 'image': 'normal_image',
             'missing file': 'does-not-exist.conf'}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 2, (name, out, err)
        lines = err.splitlines()
        assert len(lines) == 1, (name, err)
        assert lines[0].startswith('rapid-vmm: configuration error:'), err
        assert words[name] in lines[0], (name, err)
        assert out == ''
