"""Tests of the ResourceMonitor facade (rapid_vmm.monitor)."""

import json
import os
import subprocess
import time

import pytest

from rapid_vmm import monitor
from rapid_vmm.monitor import gpu
from rapid_vmm.tests.unit.monitor.fake_nvml import FakeGpu
from rapid_vmm.tests.unit.monitor.fake_nvml import FakeMig
from rapid_vmm.tests.unit.monitor.fake_nvml import FakeNvml

SPEC_KEYS = {'cpu_load_percent', 'cpu_count', 'memory_total_mb',
             'memory_free_mb', 'disk_total_gb', 'disk_free_gb',
             'gpu_load_percent', 'gpu_cores', 'gpus'}
EXTRA_KEYS = {'cpu_load_window_s', 'load_average', 'filesystems',
              'gpu_backend', 'gpu_error', 'sampled_at'}
GPU_KEYS = {'index', 'name', 'uuid', 'utilization_percent',
            'memory_total_mb', 'memory_used_mb', 'mig'}


def resource_monitor(conf, nvml=None):
    gpus = gpu.GpuMonitor(conf, nvml_loader=lambda: nvml or FakeNvml())
    return monitor.ResourceMonitor(conf, gpu=gpus)


def test_keys_of_a_report(conf):
    sample = resource_monitor(conf, FakeNvml([FakeGpu(0)])).sample()

    assert set(sample) == SPEC_KEYS | EXTRA_KEYS
    [device] = sample['gpus']
    assert set(device) == GPU_KEYS | {'temperature_c', 'power_w'}
    assert sample['gpu_backend'] == 'nvml'
    assert sample['gpu_error'] is None
    assert sample['sampled_at'] == pytest.approx(time.time(), abs=60)


def test_report_without_gpu(conf):
    sample = monitor.ResourceMonitor(
        conf, gpu=gpu.GpuMonitor(conf, nvml_loader=_no_pynvml)).sample()

    assert sample['gpus'] == []
    assert sample['gpu_load_percent'] is None
    assert sample['gpu_backend'] == 'none'
    assert sample['gpu_cores'] == 0


def _no_pynvml():
    raise ImportError('no pynvml')


def test_gpu_load_is_the_mean_of_readable_gpus(conf):
    mig = FakeGpu(2, mig_mode=1, migs=[FakeMig(0, 1, 0, 9856, 13)])
    nvml = FakeNvml([FakeGpu(0, utilization=40), FakeGpu(1, utilization=65),
                     mig])

    sample = resource_monitor(conf, nvml).sample()

    assert [g['utilization_percent'] for g in sample['gpus']] == [
        40, 65, None]
    assert sample['gpu_load_percent'] == 52.5  # MIG GPU left out


def test_gpu_load_percent():
    assert monitor.gpu_load_percent([]) is None
    assert monitor.gpu_load_percent([{'utilization_percent': None}]) is None
    assert monitor.gpu_load_percent([{'utilization_percent': 0},
                                     {'utilization_percent': 0}]) == 0.0
    assert monitor.gpu_load_percent([{'utilization_percent': 1},
                                     {'utilization_percent': 2},
                                     {'utilization_percent': 2}]) == 1.7


def test_gpu_cores_and_selection_from_config(conf):
    conf.set_override('total_cores', 6912, group='gpu')
    conf.set_override('devices', ['1'], group='gpu')
    nvml = FakeNvml([FakeGpu(0), FakeGpu(1, utilization=80)])

    sample = resource_monitor(conf, nvml).sample()

    assert sample['gpu_cores'] == 6912
    assert [g['index'] for g in sample['gpus']] == [1]
    assert sample['gpu_load_percent'] == 80.0


def test_gpu_error_is_reported(conf):
    conf.set_override('backend', 'nvml', group='gpu')
    sample = monitor.ResourceMonitor(
        conf, gpu=gpu.GpuMonitor(conf, nvml_loader=_no_pynvml)).sample()

    assert sample['gpus'] == []
    assert 'pynvml cannot be imported' in sample['gpu_error']


def test_report_is_json_serialisable(conf):
    nvml = FakeNvml([FakeGpu(0), FakeGpu(1, mig_mode=1, migs=[
        FakeMig(0, 1, 0, 9856, 13)])])

    sample = resource_monitor(conf, nvml).sample()

    assert json.loads(json.dumps(sample, allow_nan=False)) == sample


def test_no_process_is_spawned_and_nothing_sleeps(conf, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError('a sample spawned a process or slept')

    nvml = FakeNvml([FakeGpu(0)])
    rmon = resource_monitor(conf, nvml)
    for name in ('fork', 'posix_spawn', 'posix_spawnp', 'system', 'popen'):
        monkeypatch.setattr(os, name, forbidden, raising=False)
    monkeypatch.setattr(subprocess.Popen, '__init__', forbidden)
    monkeypatch.setattr(time, 'sleep', forbidden)

    for _ in range(3):
        sample = rmon.sample()

    assert sample['gpus'][0]['utilization_percent'] == 37
    assert sample['cpu_count'] == os.cpu_count()


def test_default_monitors_and_close(conf):
    conf.set_override('backend', 'none', group='gpu')
    rmon = monitor.ResourceMonitor(conf)

    assert isinstance(rmon.host, monitor.HostMonitor)
    assert isinstance(rmon.gpu, monitor.GpuMonitor)
    assert rmon.sample()['gpu_backend'] == 'none'
    rmon.close()


def test_close_releases_nvml(conf):
    nvml = FakeNvml([FakeGpu(0)])
    rmon = resource_monitor(conf, nvml)
    rmon.sample()

    rmon.close()

    assert nvml.refcount == 0
