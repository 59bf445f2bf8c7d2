"""Tests of the rendering helpers of rapid_vmm.cmd.client."""

import pytest

from rapid_vmm.cmd import client

COLUMNS = [('user_id', 'USER'), ('name', 'NAME'), ('load', 'LOAD')]


def vm_record(**changes):
    record = {'user_id': 7, 'vm_id': 70, 'name': 'rapid-vm-7-abc',
              'status': 1, 'vcpus': 2, 'memory_mb': 2048, 'disk_gb': 40,
              'gpu_cores': 0, 'os_type': 0, 'helper': 0,
              'ip_address': '192.168.122.7'}
    record.update(changes)
    return record


# -- render_table -----------------------------------------------------------


def test_render_table_is_a_prettytable():
    rows = [{'user_id': 1, 'name': 'a', 'load': 12.345},
            {'user_id': 12345, 'name': 'a-much-longer-name', 'load': None}]
    lines = client.render_table(rows, COLUMNS).splitlines()
    assert lines == [
        '+-------+--------------------+------+',
        '| USER  | NAME               | LOAD |',
        '+-------+--------------------+------+',
        '| 1     | a                  | 12.3 |',
        '| 12345 | a-much-longer-name | -    |',
        '+-------+--------------------+------+',
    ]


def test_render_table_header_wider_than_values():
    lines = client.render_table([{'user_id': 1, 'name': 'x', 'load': 1}],
                                COLUMNS).splitlines()
    assert lines[1] == '| USER | NAME | LOAD |'
    assert lines[3] == '| 1    | x    | 1    |'


def test_render_table_no_rows():
    assert client.render_table([], COLUMNS).splitlines() == [
        '+------+------+------+', '| USER | NAME | LOAD |',
        '+------+------+------+', '+------+------+------+', '(none)']


def test_render_table_cells():
    rows = [{'user_id': [1, 2], 'name': (), 'load': 0.0},
            {'user_id': True, 'name': [None, 1.25], 'load': 0}]
    lines = client.render_table(rows, COLUMNS).splitlines()
    assert lines[3].split('|')[1:4] == [' 1,2  ', ' -     ', ' 0.0  ']
    assert [c.strip() for c in lines[4].split('|')[1:4]] == ['True',
                                                             '-,1.2', '0']


def test_render_table_missing_keys():
    text = client.render_table([{'user_id': 3}], COLUMNS)
    assert text.splitlines()[3] == '| 3    | -    | -    |'


# -- _vm_rows -----------------------------------------------------------


@pytest.mark.parametrize('status, name', [(1, 'started'), (2, 'suspended'),
                                          (3, 'resumed'), (4, 'stopped'),
                                          (9, 9), (None, None)])
def test_vm_rows_status_names(status, name):
    [row] = client._vm_rows([vm_record(status=status)])
    assert row['status'] == name


def test_vm_rows_fields():
    [row] = client._vm_rows([vm_record(os_type=1, helper=2, as_ready=True,
                                       task_state='building')])
    assert row['status'] == 'started (building)'
    assert row['os_type'] == 'android'
    assert row['helper'] == 2
    assert row['size'] == '2 vCPU / 2048 MB / 40 GB'
    assert row['as_ready'] == 'yes'
    [row] = client._vm_rows([vm_record()])
    assert row['os_type'] == 'linux'
    assert row['helper'] == '-'
    assert row['as_ready'] == 'no'
    assert row['status'] == 'started'


def test_vm_rows_do_not_change_the_records():
    record = vm_record()
    client._vm_rows([record])
    assert record == vm_record()


def test_vm_table():
    text = client.render_table(client._vm_rows([vm_record(), vm_record(
        user_id=-1, name='rapid-helper-1-x', helper=1, status=2,
        ip_address=None)]), client.VM_COLUMNS)
    lines = text.splitlines()
    assert [c.strip() for c in lines[1].split('|')[1:-1]] == [
        'USER', 'VM ID', 'NAME', 'STATUS', 'SIZE', 'GPU CORES', 'OS',
        'HELPER', 'IP', 'AS READY']
    assert 'started' in lines[3] and '192.168.122.7' in lines[3]
    assert 'suspended' in lines[4] and 'rapid-helper-1-x' in lines[4]
    assert len(lines) == 6


# -- render_host_status ---------------------------------------------------


def status(gpus=None, vms=None):
    return {
        'host': 'node-1', 'vmm_id': 5, 'driver': 'libvirt',
        'version': '1.2.3',
        'registered': {'ds': True, 'slam': False},
        'resources': {
            'cpu_load_percent': 12.5, 'cpu_count': 16,
            'load_average': [0.5, 0.25, 0.0],
            'memory_total_mb': 3072, 'memory_free_mb': 2048,
            'disk_total_gb': 100, 'disk_free_gb': 60,
            'gpu_load_percent': None, 'gpu_cores': 0,
            'gpu_backend': 'none', 'gpus': gpus or [],
            'vms_running': 1, 'vms_suspended': 0,
            'available_types': [[1, 1024, 20], [2, 2048, 40]]},
        'vms': vms if vms is not None else [vm_record()],
    }


def test_host_status_without_gpus():
    text = client.render_host_status(status())
    lines = text.splitlines()
    assert lines[0] == ('Host            node-1  (VMM id 5, driver libvirt, '
                        'version 1.2.3)')
    assert 'DS: yes   SLAM: no   hypervisor reachable: yes' in lines[1]
    assert 'CPU             12.5 % of 16 cores   load average 0.5,0.2,0.0' \
        in text
    assert 'Memory          2048 MB available of 3072 MB' in text
    assert 'Disk            60 GB free of 100 GB' in text
    assert 'GPU             load - %, 0 cores configured, backend none' \
        in text
    assert 'VMs             1 running, 0 suspended' in text
    assert 'Types that fit  1x1024x20,2x2048x40' in text
    assert 'GPUs' not in lines
    assert 'VMs' in lines
    assert 'rapid-vm-7-abc' in text


def test_host_status_with_gpus():
    gpus = [{'index': 0, 'name': 'NVIDIA H100', 'uuid': 'GPU-aaaa',
             'utilization_percent': 37, 'memory_total_mb': 81559,
             'memory_used_mb': 1024, 'temperature_c': 40, 'power_w': 70.25,
             'mig': []},
            {'index': 1, 'name': 'NVIDIA A100', 'uuid': 'GPU-bbbb',
             'utilization_percent': None, 'memory_total_mb': 40960,
             'memory_used_mb': None, 'mig': [{'id': 1}, {'id': 2}]}]
    text = client.render_host_status(status(gpus=gpus))
    lines = text.splitlines()
    assert 'GPUs' in lines
    header = lines[lines.index('GPUs') + 2]
    assert [c.strip() for c in header.split('|')[1:-1]] == [
        'IDX', 'NAME', 'UUID', 'UTIL %', 'MEMORY MB', 'TEMP C', 'POWER W',
        'MIG']
    first = lines[lines.index('GPUs') + 4]
    second = lines[lines.index('GPUs') + 5]
    assert 'NVIDIA H100' in first and 'GPU-aaaa' in first
    assert '1024 / 81559' in first and '70.2' in first
    assert first.split('|')[-2].strip() == '-'
    assert 'NVIDIA A100' in second and '- / 40960' in second
    assert second.split('|')[-2].strip() == '2 instances'
    assert lines.index('GPUs') < lines.index('VMs')


def test_host_status_no_vms_and_minimal_status():
    text = client.render_host_status(status(vms=[]))
    assert text.splitlines()[-1] == '(none)'
    text = client.render_host_status({'host': 'h'})
    assert text.startswith('Host            h  (VMM id -, driver None')
    assert 'DS: no   SLAM: no   hypervisor reachable: yes' in text
    assert 'Types that fit  -' in text
    assert text.splitlines()[-1] == '(none)'


def test_host_status_driver_unreachable():
    data = status()
    data['driver_reachable'] = False
    assert 'hypervisor reachable: no' in client.render_host_status(data)


# -- watch ------------------------------------------------------------------


def test_render_report():
    report = {'host': 'node-1', 'vmm_id': 5, 'cpu_load': 12.5,
              'free_memory_mb': 2048, 'gpu_load': None,
              'resources': {'vms_running': 2, 'vms_suspended': 1,
                            'available_types': [[1, 1024, 20]]}}
    assert client.render_report(report, '10:00:00') == (
        '10:00:00  node-1 (VMM 5)  cpu 12.5 %  free memory 2048 MB  '
        'gpu - %  vms 2 running / 1 suspended  fit 1x1024x20')
    report['vmm_id'] = None
    assert '(not registered with the DS yet)' in client.render_report(
        report)


def test_clock():
    assert client._clock('2026-01-02 03:04:05.678901') == '03:04:05'
    assert len(client._clock(None)) == 8
