"""Tests of rapid_vmm.metrics: the collector on a real prometheus-client
registry, and the bounded HTTP server over real sockets."""

import http.client
import socket
import threading
import time

from prometheus_client import exposition
from prometheus_client import parser
from prometheus_client import registry as prom_registry
import pytest

from rapid_vmm import exception
from rapid_vmm import metrics
from rapid_vmm.tests import fixtures as rfix

MiB = 1024 ** 2
GiB = 1024 ** 3


def host_status():
    return {
        'host': 'node-1', 'vmm_id': 5, 'driver': 'libvirt',
        'version': '1.2.3', 'driver_reachable': True,
        'registered': {'ds': True, 'slam': False},
        'resources': {
            'cpu_load_percent': 12.5, 'cpu_count': 16,
            'memory_total_mb': 3072, 'memory_free_mb': 2048,
            'disk_total_gb': 100, 'disk_free_gb': 60.5,
            'gpu_load_percent': 37.0, 'gpu_cores': 3072,
            'gpus': [{'index': 0, 'name': 'NVIDIA H200', 'uuid': 'GPU-a',
                      'utilization_percent': 37, 'memory_total_mb': 143771,
                      'memory_used_mb': 1024, 'temperature_c': 40,
                      'power_w': 70.25, 'mig': [{}, {}]},
                     {'index': 1, 'name': 'NVIDIA H200', 'uuid': 'GPU-b',
                      'utilization_percent': None, 'memory_total_mb': None,
                      'memory_used_mb': None, 'mig': []}],
            'vms_running': 1, 'vms_suspended': 1,
            'available_types': [[1, 1024, 20]]},
        'vms': [{'user_id': 7, 'vm_id': 70, 'name': 'rapid-vm-7-abc',
                 'status': 1, 'vcpus': 2, 'memory_mb': 2048, 'disk_gb': 20,
                 'gpu_cores': 0, 'os_type': 0, 'helper': 0,
                 'ip_address': '10.0.0.7', 'task_state': ''},
                {'user_id': -1, 'vm_id': None, 'name': 'rapid-helper-1-x',
                 'status': 2, 'vcpus': 1, 'memory_mb': 1024, 'disk_gb': 20,
                 'gpu_cores': 0, 'os_type': 0, 'helper': 1,
                 'ip_address': None, 'task_state': ''}],
    }


USAGE = {
    'cpu': [{'user_id': 7, 'vm_id': 70, 'cpu_util_percent': 42.5},
            {'user_id': -1, 'vm_id': None, 'cpu_util_percent': None}],
    'memory': [{'user_id': 7, 'vm_id': 70, 'memory_mb': 2048,
                'memory_used_mb': 512}],
    'disk': [{'user_id': 7, 'vm_id': 70, 'capacity_bytes': 20 * GiB,
              'allocation_bytes': 196608}],
}


def scrape(collector) -> dict:
    """``{(name, sorted label items): value}`` of one scrape."""
    registry = prom_registry.CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = exposition.generate_latest(registry).decode()
    samples = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = \
                sample.value
    return samples


def value(samples, metric, **labels):
    key = (f'rapid_vmm_{metric}',
           tuple(sorted((k, str(v)) for k, v in labels.items())))
    return samples.get(key)


def test_host_gpu_and_vm_figures():
    grid = [[1, 1024, 20], [2, 2048, 20]]
    samples = scrape(metrics.VmmCollector(host_status, USAGE.__getitem__,
                                          5, grid))
    assert value(samples, 'info', host='node-1', driver='libvirt',
                 version='1.2.3', vmm_id=5) == 1
    assert value(samples, 'registered', peer='ds') == 1
    assert value(samples, 'registered', peer='slam') == 0
    assert value(samples, 'driver_reachable') == 1
    assert value(samples, 'host_cpu_load_percent') == 12.5
    assert value(samples, 'host_cpus') == 16
    assert value(samples, 'host_memory_total_bytes') == 3072 * MiB
    assert value(samples, 'host_memory_free_bytes') == 2048 * MiB
    assert value(samples, 'host_disk_total_bytes') == 100 * GiB
    assert value(samples, 'host_disk_free_bytes') == 60.5 * GiB
    assert value(samples, 'host_gpu_load_percent') == 37.0
    assert value(samples, 'host_gpu_cores') == 3072
    assert value(samples, 'vms', state='running') == 1
    assert value(samples, 'vm_type_fits', vcpus=1, memory_mb=1024,
                 disk_gb=20) == 1
    assert value(samples, 'vm_type_fits', vcpus=2, memory_mb=2048,
                 disk_gb=20) == 0
    # GPUs: label gpu = index; what is unknown is absent, not 0.
    assert value(samples, 'gpu_info', gpu=0, name='NVIDIA H200',
                 uuid='GPU-a') == 1
    assert value(samples, 'gpu_utilization_percent', gpu=0) == 37
    assert value(samples, 'gpu_memory_total_bytes', gpu=0) == 143771 * MiB
    assert value(samples, 'gpu_memory_used_bytes', gpu=0) == 1024 * MiB
    assert value(samples, 'gpu_temperature_celsius', gpu=0) == 40
    assert value(samples, 'gpu_power_watts', gpu=0) == 70.25
    assert value(samples, 'gpu_mig_instances', gpu=0) == 2
    assert value(samples, 'gpu_utilization_percent', gpu=1) is None
    assert value(samples, 'gpu_temperature_celsius', gpu=1) is None
    # VMs: labels user_id and vm.
    vm7 = {'user_id': 7, 'vm': 'rapid-vm-7-abc'}
    assert value(samples, 'vm_status', **vm7) == 1
    assert value(samples, 'vm_status', user_id=-1,
                 vm='rapid-helper-1-x') == 2
    assert value(samples, 'vm_vcpus', **vm7) == 2
    assert value(samples, 'vm_memory_bytes', **vm7) == 2048 * MiB
    assert value(samples, 'vm_disk_bytes', **vm7) == 20 * GiB
    assert value(samples, 'vm_info', os_type=0, helper=1, vm_id='',
                 task_state='', user_id=-1, vm='rapid-helper-1-x') == 1
    assert value(samples, 'vm_cpu_utilization_percent', **vm7) == 42.5
    assert value(samples, 'vm_cpu_utilization_percent', user_id=-1,
                 vm='rapid-helper-1-x') is None
    assert value(samples, 'vm_memory_current_bytes', **vm7) == 2048 * MiB
    assert value(samples, 'vm_memory_used_bytes', **vm7) == 512 * MiB
    assert value(samples, 'vm_disk_capacity_bytes', **vm7) == 20 * GiB
    assert value(samples, 'vm_disk_allocation_bytes', **vm7) == 196608
    assert value(samples, 'scrape_collector_success', collector='host') == 1
    assert value(samples, 'scrape_collector_success', collector='usage') == 1
    # Every name has the prefix; counters none, so no _total.
    assert all(name.startswith('rapid_vmm_') for name, _ in samples)


def test_a_stuck_reading_bounds_the_scrape_and_is_not_restarted():
    release = threading.Event()
    calls = []

    def stuck_usage(resource):
        calls.append(resource)
        release.wait(30)
        return []

    collector = metrics.VmmCollector(host_status, stuck_usage, 0.3)
    for _ in range(3):
        started = time.monotonic()
        samples = scrape(collector)
        assert time.monotonic() - started < 2
        assert value(samples, 'scrape_collector_success',
                     collector='usage') == 0
        # The host figures are served anyway.
        assert value(samples, 'host_cpus') == 16
        assert value(samples, 'vm_cpu_utilization_percent', user_id=7,
                     vm='rapid-vm-7-abc') is None
    assert calls == ['cpu']   # one reading, still stuck, never started again
    release.set()


def test_a_failing_host_reading():
    def broken():
        raise exception.DriverError(action='read', reason='gone')

    samples = scrape(metrics.VmmCollector(broken, None, 1))
    assert value(samples, 'scrape_collector_success', collector='host') == 0
    assert value(samples, 'host_cpus') is None
    assert value(samples, 'scrape_duration_seconds') is not None


@pytest.fixture
def conf():
    fixture = rfix.ConfFixture()
    fixture.setUp()
    fixture.conf.set_override('enabled', True, group='metrics')
    fixture.conf.set_override('port', 0, group='metrics')
    yield fixture.conf
    fixture.cleanUp()


def get(port, path='/metrics'):
    connection = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
    connection.request('GET', path)
    response = connection.getresponse()
    return response.status, response.read().decode()


def test_server_serves_the_text_format(conf):
    server = metrics.start(conf, host_status, USAGE.__getitem__)
    try:
        status, body = get(server.port)
    finally:
        server.stop()
    assert status == 200
    assert '# TYPE rapid_vmm_host_memory_free_bytes gauge' in body
    assert 'rapid_vmm_host_memory_free_bytes 2.147483648e+09' in body


def test_server_off_by_default(conf):
    conf.clear_override('enabled', group='metrics')
    assert metrics.start(conf, host_status, USAGE.__getitem__) is None


def test_a_port_in_use_is_a_configuration_error(conf):
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen(1)
        conf.set_override('port', taken.getsockname()[1], group='metrics')
        with pytest.raises(exception.ConfigError, match='cannot listen'):
            metrics.start(conf, host_status, USAGE.__getitem__)


def test_server_is_bounded(conf, monkeypatch):
    conf.set_override('max_connections', 1, group='metrics')
    conf.set_override('scrape_timeout', 5, group='metrics')
    release = threading.Event()

    def slow_status():
        release.wait(5)
        return host_status()

    monkeypatch.setattr(metrics, 'CONNECTION_TIMEOUT', 0.5)
    monkeypatch.setattr(metrics._Handler, 'timeout', 0.5)
    server = metrics.start(conf, slow_status, None)
    try:
        first = {}
        thread = threading.Thread(
            target=lambda: first.update(result=get(server.port)))
        thread.start()
        time.sleep(0.5)
        # The one slot is taken: refused at once, not queued.
        status, _ = get(server.port)
        assert status == 503
        release.set()
        thread.join(10)
        assert first['result'][0] == 200
        # An idle connection is dropped after its timeout.
        idle = socket.create_connection(('127.0.0.1', server.port))
        idle.settimeout(5)
        assert idle.recv(1) == b''
        idle.close()
        assert get(server.port)[0] == 200
    finally:
        release.set()
        server.stop()
