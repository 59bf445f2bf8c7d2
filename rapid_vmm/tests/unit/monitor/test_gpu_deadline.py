"""GPU sampling with a deadline: an NVML call stuck in the driver does not
stall the report (issue 8.6), and the DeadlineWorker behind it."""

import logging
import threading
import time

import pytest

from rapid_vmm import monitor
from rapid_vmm.monitor import gpu
from rapid_vmm.monitor import resources
from rapid_vmm.tests.unit.monitor.fake_nvml import FakeGpu
from rapid_vmm.tests.unit.monitor.fake_nvml import FakeNvml
from rapid_vmm.tests.unit.monitor.utils import records

TIMEOUT = 0.3


class StuckNvml(FakeNvml):
    """A FakeNvml whose chosen function blocks until ``release`` is set."""

    def __init__(self, gpus, stuck_in, **kwargs):
        super().__init__(gpus, **kwargs)
        self.stuck_in = stuck_in
        self.release = threading.Event()
        self.entered = threading.Event()
        for name in stuck_in:
            setattr(self, name, self._blocking(getattr(self, name)))

    def _blocking(self, real):
        def call(*args, **kwargs):
            self.entered.set()
            if not self.release.wait(30):
                raise AssertionError('never released')
            return real(*args, **kwargs)
        return call


@pytest.fixture
def deadline_conf(conf):
    conf.set_override('sample_timeout', TIMEOUT, group='gpu')
    return conf


def timed(fn):
    started = time.monotonic()
    value = fn()
    return value, time.monotonic() - started


def test_a_stuck_reading_does_not_stall_the_report(deadline_conf, log):
    nvml = StuckNvml([FakeGpu(0, utilization=40)],
                     ['nvmlDeviceGetUtilizationRates'])
    gpus = gpu.GpuMonitor(deadline_conf, nvml_loader=lambda: nvml)
    resource_monitor = monitor.ResourceMonitor(deadline_conf, gpu=gpus)

    sample, seconds = timed(resource_monitor.sample)

    assert nvml.entered.is_set()
    assert seconds < TIMEOUT + 1.0
    assert sample['gpus'] == []
    assert sample['gpu_load_percent'] is None
    assert 'timed out' in sample['gpu_error']
    assert sample['memory_total_mb'] > 0  # the host part is there

    # While the call is stuck, reports do not wait for it again.
    again, seconds = timed(resource_monitor.sample)
    assert seconds < TIMEOUT / 2
    assert again['gpus'] == []
    assert 'has not returned' in again['gpu_error']

    # Once it returns, readings come back.
    nvml.release.set()
    deadline = time.monotonic() + 5
    while gpus._worker.busy_for() is not None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    recovered = resource_monitor.sample()
    assert [d['utilization_percent'] for d in recovered['gpus']] == [40]
    assert recovered['gpu_error'] is None

    assert len(records(log, 'did not return within', logging.ERROR)) == 1
    assert len(records(log, 'within the deadline again', logging.INFO)) == 1


def test_a_stuck_nvml_init_is_bounded_too(deadline_conf):
    nvml = StuckNvml([FakeGpu(0)], ['nvmlInit'])
    gpus = gpu.GpuMonitor(deadline_conf, nvml_loader=lambda: nvml)

    devices, seconds = timed(gpus.sample)
    assert devices == []
    assert seconds < TIMEOUT + 1.0
    assert 'timed out' in gpus.last_error

    # Asking for the backend does not block either.
    _backend, seconds = timed(lambda: gpus.backend)
    assert seconds < TIMEOUT + 1.0
    nvml.release.set()


def test_backend_before_the_first_sample_is_bounded(deadline_conf):
    nvml = StuckNvml([FakeGpu(0)], ['nvmlInit'])
    gpus = gpu.GpuMonitor(deadline_conf, nvml_loader=lambda: nvml)

    backend, seconds = timed(lambda: gpus.backend)

    assert seconds < TIMEOUT + 1.0
    assert backend == 'none'
    assert 'timed out' in gpus.last_error
    nvml.release.set()


def test_close_while_stuck_returns(deadline_conf):
    nvml = StuckNvml([FakeGpu(0)], ['nvmlDeviceGetMemoryInfo'])
    gpus = gpu.GpuMonitor(deadline_conf, nvml_loader=lambda: nvml)
    gpus.sample()

    _none, seconds = timed(gpus.close)

    assert seconds < TIMEOUT + 1.0
    nvml.release.set()


def test_nothing_to_read_skips_the_worker(conf):
    conf.set_override('backend', 'none', group='gpu')
    gpus = gpu.GpuMonitor(conf)
    gpus.sample()  # the first sample settles the mode on the worker

    calls = []
    real = gpus._worker.call
    gpus._worker.call = lambda *a, **k: calls.append(a) or real(*a, **k)
    assert gpus.sample() == []
    assert calls == []


def test_healthy_readings_go_through_the_worker(conf):
    nvml = FakeNvml([FakeGpu(0, utilization=7)])
    gpus = gpu.GpuMonitor(conf, nvml_loader=lambda: nvml)
    threads = []
    real = nvml.nvmlDeviceGetUtilizationRates

    def spy(handle):
        threads.append(threading.current_thread().name)
        return real(handle)
    nvml.nvmlDeviceGetUtilizationRates = spy

    assert [d['utilization_percent'] for d in gpus.sample()] == [7]
    assert threads == ['gpu-sample']


# -- DeadlineWorker -------------------------------------------------------

def test_worker_returns_results_and_raises_errors():
    worker = resources.DeadlineWorker('test-worker')

    assert worker.call(lambda a, b: a + b, 5, 2, 3) == 5
    with pytest.raises(ZeroDivisionError):
        worker.call(lambda: 1 / 0, 5)
    assert worker.call(lambda: 'again', 5) == 'again'
    assert worker.busy_for() is None


def test_worker_times_out_and_refuses_while_busy():
    worker = resources.DeadlineWorker('test-worker')
    release = threading.Event()

    with pytest.raises(resources.CallTimeout, match='no answer within'):
        worker.call(release.wait, 0.1, 30)
    assert worker.busy_for() >= 0.1
    started = time.monotonic()
    with pytest.raises(resources.CallTimeout, match='has not returned'):
        worker.call(lambda: 'queued behind it', 5)
    assert time.monotonic() - started < 0.1

    release.set()
    deadline = time.monotonic() + 5
    while worker.busy_for() is not None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert worker.call(lambda: 'free again', 5) == 'free again'


def test_worker_thread_is_a_daemon():
    worker = resources.DeadlineWorker('test-daemon')
    name = worker.call(lambda: threading.current_thread().name, 5)
    [thread] = [t for t in threading.enumerate() if t.name == name]
    assert thread.daemon
