"""Tests of rapid_vmm.monitor.host: real psutil readings on this machine,
and the CPU window logic with fake counters."""

import collections
import json
import logging
import os
import time

import psutil
import pytest

from rapid_vmm.monitor import host
from rapid_vmm.tests.unit.monitor.utils import records

MIB = 1024 * 1024
GIB = 1024 * MIB

# psutil's Linux field order.
CpuTimes = collections.namedtuple(
    'CpuTimes', 'user nice system idle iowait irq softirq steal guest '
    'guest_nice')


def times(user=0.0, system=0.0, idle=0.0, iowait=0.0, guest=0.0, **rest):
    values = dict(user=user, nice=0.0, system=system, idle=idle,
                  iowait=iowait, irq=0.0, softirq=0.0, steal=0.0,
                  guest=guest, guest_nice=0.0)
    values.update(rest)
    return CpuTimes(**values)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FakeCpuTimes:
    """Stands in for psutil.cpu_times, counting its calls."""

    def __init__(self, *values):
        self.values = list(values)
        self.calls = 0

    def __call__(self, percpu=False):
        self.calls += 1
        return self.values[0] if len(self.values) == 1 else self.values.pop(0)


# -- real readings ------------------------------------------------------------

def test_real_sample_is_sane(conf, tmp_path):
    sample = host.HostMonitor(conf).sample()

    assert sample['cpu_count'] == os.cpu_count()
    memory = psutil.virtual_memory()
    assert sample['memory_total_mb'] == memory.total // MIB
    assert 0 < sample['memory_free_mb'] <= sample['memory_total_mb']
    # MemAvailable moves; 10 % of the total is a loose bound.
    assert abs(sample['memory_free_mb'] - memory.available // MIB) < (
        sample['memory_total_mb'] / 10)
    statvfs = os.statvfs(tmp_path)
    assert sample['disk_total_gb'] == pytest.approx(
        statvfs.f_blocks * statvfs.f_frsize / GIB, abs=0.01)
    assert sample['disk_free_gb'] == pytest.approx(
        statvfs.f_bavail * statvfs.f_frsize / GIB, abs=1.0)
    assert 0 <= sample['disk_free_gb'] <= sample['disk_total_gb']
    assert 0.0 <= sample['cpu_load_percent'] <= 100.0
    assert sample['cpu_load_window_s'] > 0
    assert len(sample['load_average']) == 3
    assert all(value >= 0 for value in sample['load_average'])
    assert json.loads(json.dumps(sample, allow_nan=False)) == sample


def test_first_sample_does_not_block_and_measures_since_boot(conf,
                                                            monkeypatch):
    def no_sleep(seconds):
        raise AssertionError('the monitor slept')

    def no_cpu_percent(*args, **kwargs):
        raise AssertionError('psutil.cpu_percent shares a global baseline')

    monkeypatch.setattr(time, 'sleep', no_sleep)
    monkeypatch.setattr(psutil, 'cpu_percent', no_cpu_percent)

    sample = host.HostMonitor(conf).sample()

    uptime = time.time() - psutil.boot_time()
    assert sample['cpu_load_window_s'] == pytest.approx(uptime, abs=5)
    busy, total = host.cpu_busy_total(psutil.cpu_times())
    assert sample['cpu_load_percent'] == pytest.approx(
        100 * busy / total, abs=1)


def test_second_sample_measures_the_window(conf):
    monitor = host.HostMonitor(conf, min_cpu_window=0.0)
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        pass  # keep a CPU busy for a few ticks

    sample = monitor.sample()

    assert 0.25 <= sample['cpu_load_window_s'] < 5
    # One of the CPUs was busy the whole window.
    assert sample['cpu_load_percent'] >= 100 / os.cpu_count() * 0.5


# -- CPU load arithmetic ------------------------------------------------------

def test_busy_percent_like_psutil():
    before = times(user=10, system=5, idle=85, iowait=0)
    after = times(user=20, system=10, idle=150, iowait=20)
    # busy +15 of +100; iowait is idle time.
    assert host.cpu_busy_percent(before, after) == 15.0


def test_busy_percent_guest_is_not_counted_twice():
    before = times(user=10, idle=90, guest=0)
    after = times(user=60, idle=140, guest=40)  # guest is inside user
    assert host.cpu_busy_percent(before, after) == 50.0


def test_busy_percent_without_elapsed_time_is_none():
    same = times(user=1, idle=1)
    assert host.cpu_busy_percent(same, same) is None


def test_busy_percent_is_clamped():
    assert host.cpu_busy_percent(times(user=10, idle=0),
                                 times(user=30, idle=-5)) == 100.0


def test_window_logic(conf, monkeypatch):
    clock = Clock()
    counters = FakeCpuTimes(
        times(user=100, idle=900),      # construction
        times(user=150, idle=1050),     # t+10: 50 busy of 200
        times(user=300, idle=1100),     # t+20: 150 busy of 200
    )
    monkeypatch.setattr(psutil, 'cpu_times', counters)
    monitor = host.HostMonitor(conf, min_cpu_window=1.0, clock=clock)

    clock.now += 10
    first = monitor.sample()
    clock.now += 0.5  # a query between two reports
    between = monitor.sample()
    clock.now += 9.5
    second = monitor.sample()

    assert (first['cpu_load_percent'], first['cpu_load_window_s']) == (
        25.0, 10.0)
    assert (between['cpu_load_percent'],
            between['cpu_load_window_s']) == (25.0, 10.0)
    assert (second['cpu_load_percent'], second['cpu_load_window_s']) == (
        75.0, 10.0)  # from the first report, not from the query
    assert counters.calls == 3


def test_window_shorter_than_the_minimum_at_start(conf, monkeypatch):
    clock = Clock()
    counters = FakeCpuTimes(times(user=100, idle=300),
                            times(user=101, idle=301),
                            times(user=150, idle=350))
    monkeypatch.setattr(psutil, 'cpu_times', counters)
    monkeypatch.setattr(psutil, 'boot_time', lambda: time.time() - 4000)
    monitor = host.HostMonitor(conf, min_cpu_window=1.0, clock=clock)

    clock.now += 0.1
    early = monitor.sample()
    clock.now += 1.0
    later = monitor.sample()

    # Too early for a window: the average since boot, with its window.
    assert early['cpu_load_percent'] == round(100 * 101 / 402, 1)
    assert early['cpu_load_window_s'] == pytest.approx(4000, abs=2)
    # The baseline was kept: the next window starts at construction.
    assert later['cpu_load_percent'] == 50.0
    assert later['cpu_load_window_s'] == 1.1


def test_cpu_times_error_is_none_and_logged_once(conf, monkeypatch, log):
    monitor = host.HostMonitor(conf, min_cpu_window=0.0)

    def broken():
        raise OSError(5, 'Input/output error')

    monkeypatch.setattr(psutil, 'cpu_times', broken)

    for _ in range(3):
        sample = monitor.sample()
        assert sample['cpu_load_percent'] is None
        assert sample['cpu_load_window_s'] is None
    assert len(records(log, 'Cannot read the CPU times')) == 1


# -- memory -------------------------------------------------------------------

def test_memory_free_is_available_not_memfree(conf, monkeypatch):
    fake = collections.namedtuple('svmem', 'total available free')
    monkeypatch.setattr(psutil, 'virtual_memory',
                        lambda: fake(8192 * MIB, 6000 * MIB, 512 * MIB))

    sample = host.HostMonitor(conf).sample()

    assert sample['memory_total_mb'] == 8192
    assert sample['memory_free_mb'] == 6000


# -- disk ---------------------------------------------------------------------

def test_images_path_default_and_set(conf, tmp_path):
    assert host.images_path(conf) == str(tmp_path / 'data' / 'instances')
    conf.set_override('images_path', '/srv/vm', group='libvirt')
    assert host.images_path(conf) == '/srv/vm'


def test_one_filesystem_reported_once(conf, tmp_path):
    (tmp_path / 'data').mkdir()

    sample = host.HostMonitor(conf).sample()

    [filesystem] = sample['filesystems']
    assert filesystem['roles'] == ['images', 'data']
    assert filesystem['paths'] == [str(tmp_path / 'data' / 'instances'),
                                   str(tmp_path / 'data')]
    assert os.path.ismount(filesystem['mount_point'])
    assert str(tmp_path).startswith(filesystem['mount_point'])
    assert sample['disk_total_gb'] == filesystem['total_gb']
    assert sample['disk_free_gb'] == filesystem['free_gb']


def _other_filesystem(tmp_path):
    for candidate in ('/dev/shm', '/run', '/proc'):
        if (os.path.isdir(candidate) and
                os.stat(candidate).st_dev != os.stat(tmp_path).st_dev):
            return candidate
    pytest.skip('no second filesystem on this machine')


def test_instance_disks_on_their_own_filesystem(conf, tmp_path):
    other = _other_filesystem(tmp_path)
    images = os.path.join(other, 'rapid-vmm-test-not-created', 'instances')
    conf.set_override('images_path', images, group='libvirt')

    sample = host.HostMonitor(conf).sample()

    images_fs, data_fs = sample['filesystems']
    assert images_fs['roles'] == ['images'] and data_fs['roles'] == ['data']
    assert images_fs['mount_point'] == other
    usage = psutil.disk_usage(other)
    assert sample['disk_total_gb'] == round(usage.total / GIB, 2)
    assert sample['disk_total_gb'] == images_fs['total_gb']
    assert not os.path.exists(images)  # measured, never created


def test_disk_error_is_none_logged_once_and_recovers(conf, monkeypatch,
                                                     log):
    real = psutil.disk_usage

    def denied(path):
        raise PermissionError(13, 'Permission denied', path)

    monkeypatch.setattr(psutil, 'disk_usage', denied)
    monitor = host.HostMonitor(conf)

    for _ in range(3):
        sample = monitor.sample()
        assert sample['disk_total_gb'] is None
        assert sample['disk_free_gb'] is None
    [filesystem] = sample['filesystems']
    assert filesystem['total_gb'] is None and filesystem['free_gb'] is None
    assert filesystem['roles'] == ['images', 'data']

    monkeypatch.setattr(psutil, 'disk_usage', real)
    assert monitor.sample()['disk_total_gb'] > 0
    assert len(records(log, 'Cannot measure the filesystem',
                       logging.WARNING)) == 1
    assert len(records(log, 'measurable again', logging.INFO)) == 1


def test_unreachable_path_is_none(conf, monkeypatch, log):
    real = os.stat

    def stat(path, *args, **kwargs):
        if str(path).startswith(conf.data_path):
            raise PermissionError(13, 'Permission denied', path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, 'stat', stat)

    sample = host.HostMonitor(conf).sample()

    assert sample['disk_total_gb'] is None
    assert sample['filesystems'][0] == {
        'mount_point': None, 'roles': ['images'],
        'paths': [host.images_path(conf)], 'total_gb': None,
        'free_gb': None}
    assert len(records(log, 'Cannot find the filesystem')) == 2


def test_a_later_mount_is_seen_after_the_refresh(conf, tmp_path,
                                                 monkeypatch):
    other = _other_filesystem(tmp_path)
    clock = Clock()
    monitor = host.HostMonitor(conf, clock=clock)
    assert monitor.sample()['filesystems'][0]['mount_point'] != other

    # Pretend the instance directory became a mount of the other fs.
    monkeypatch.setattr(host, '_nearest_existing', lambda path: other)
    monkeypatch.setattr(host, '_mount_point', lambda path: other)
    clock.now += host.LAYOUT_REFRESH_S - 1
    assert monitor.sample()['filesystems'][0]['mount_point'] != other
    clock.now += 1
    assert monitor.sample()['filesystems'][0]['mount_point'] == other
