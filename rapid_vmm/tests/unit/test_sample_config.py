"""The sample configuration in etc/rapid-vmm/ matches the options."""

import difflib
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
GENERATOR = os.path.join(REPO, 'etc', 'rapid-vmm',
                         'rapid-vmm-config-generator.conf')
SAMPLE = os.path.join(REPO, 'etc', 'rapid-vmm', 'rapid-vmm.conf.sample')


def test_sample_config_is_current(tmp_path):
    fresh = tmp_path / 'rapid-vmm.conf.sample'
    subprocess.run([sys.executable, '-m', 'oslo_config.generator',
                    '--config-file', GENERATOR, '--output-file', str(fresh)],
                   check=True, cwd=REPO, capture_output=True)
    with open(SAMPLE, encoding='utf-8') as committed:
        expected = committed.read()
    actual = fresh.read_text(encoding='utf-8')
    diff = ''.join(difflib.unified_diff(
        expected.splitlines(True), actual.splitlines(True),
        'committed sample', 'generated now', n=1))
    assert actual == expected, (
        'etc/rapid-vmm/rapid-vmm.conf.sample is stale; regenerate it with '
        '`tox -e genconfig`:\n' + diff[:3000])


def test_sample_documents_every_spec_option():
    with open(SAMPLE, encoding='utf-8') as sample:
        text = sample.read()
    for option in ('host', 'my_ip', 'vmm_topic', 'ds_topic', 'slam_topic',
                   'compute_driver', 'openstack_support',
                   'max_concurrent_requests', 'data_path', 'report_interval',
                   'helper_vm_count', 'as_register_timeout', 'vm_types',
                   'cpu_allocation_ratio', 'ram_allocation_ratio',
                   'disk_allocation_ratio', 'reserved_host_memory_mb',
                   'connection_uri', 'normal_image', 'helper_images',
                   'images_path', 'image_mode', 'image_pool_size', 'network',
                   'ip_sources', 'ip_command', 'ip_timeout', 'cloud',
                   'flavors', 'linux_image', 'linux_helper_image',
                   'android_image', 'android_helper_image', 'key_name',
                   'security_group', 'boot_timeout', 'backend', 'devices',
                   'total_cores', 'nvidia_smi_path'):
        assert f'#{option} =' in text, option
