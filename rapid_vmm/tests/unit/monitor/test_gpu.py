"""Tests of rapid_vmm.monitor.gpu, with NVML stubbed call by call."""

import json
import logging
import os

import pytest

from rapid_vmm.monitor import gpu
from rapid_vmm.monitor import gpu_load_percent
from rapid_vmm.tests.unit.monitor import fake_nvml
from rapid_vmm.tests.unit.monitor.fake_nvml import FakeGpu
from rapid_vmm.tests.unit.monitor.fake_nvml import FakeMig
from rapid_vmm.tests.unit.monitor.fake_nvml import FakeNvml
from rapid_vmm.tests.unit.monitor.utils import DATA
from rapid_vmm.tests.unit.monitor.utils import records
from rapid_vmm.tests.unit.monitor.utils import skip_if_real_nvml_works

V2 = FakeNvml.nvmlMemory_v2


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def monitor(conf, nvml, **kwargs):
    return gpu.GpuMonitor(conf, nvml_loader=lambda: nvml, **kwargs)


def expected(index, **changes):
    gpu_ = FakeGpu(index)
    report = {
        'index': index,
        'name': gpu_.name,
        'uuid': gpu_.uuid,
        'utilization_percent': 37,
        'memory_total_mb': 81559,
        'memory_used_mb': 1024,
        'mig': [],
        'temperature_c': 34,
        'power_w': 69.55,
    }
    report.update(changes)
    return report


# -- one GPU, caching ---------------------------------------------------------

def test_one_gpu_report(conf):
    nvml = FakeNvml([FakeGpu(0)])
    mon = monitor(conf, nvml)

    assert mon.sample() == [expected(0)]
    assert mon.backend == 'nvml'
    assert mon.last_error is None


def test_init_once_handles_and_identity_cached(conf):
    nvml = FakeNvml([FakeGpu(0)])
    mon = monitor(conf, nvml)

    for _ in range(3):
        mon.sample()

    assert nvml.count('nvmlInit') == 1
    assert nvml.count('nvmlDeviceGetCount') == 1
    assert nvml.count('nvmlDeviceGetHandleByIndex') == 1
    assert nvml.count('nvmlDeviceGetName') == 1
    assert nvml.count('nvmlDeviceGetUUID') == 1
    # Readings that move are read at every sample.
    assert nvml.count('nvmlDeviceGetUtilizationRates') == 3
    assert nvml.count('nvmlDeviceGetMemoryInfo') == 3
    assert nvml.count('nvmlDeviceGetPowerUsage') == 3
    # Not a MIG GPU: NotSupported once, not asked again.
    assert nvml.count('nvmlDeviceGetMigMode') == 1
    assert nvml.count('nvmlDeviceGetMaxMigDeviceCount') == 0


def test_readings_follow_the_device(conf):
    device = FakeGpu(0)
    nvml = FakeNvml([device])
    mon = monitor(conf, nvml)
    mon.sample()

    device.utilization, device.used_mb, device.power_mw = 99, 2048, 301234
    [report] = mon.sample()

    assert report['utilization_percent'] == 99
    assert report['memory_used_mb'] == 2048
    assert report['power_w'] == 301.23


def test_memory_v2_excludes_reserved(conf):
    nvml = FakeNvml([FakeGpu(0, used_mb=1024, reserved_mb=523)])
    mon = monitor(conf, nvml)

    [report] = mon.sample()

    assert report['memory_used_mb'] == 1024
    assert nvml.args_of('nvmlDeviceGetMemoryInfo')[0][1] == V2


def test_memory_v1_when_driver_has_no_v2(conf, log):
    nvml = FakeNvml([FakeGpu(0, used_mb=1024, reserved_mb=523)],
                    memory_v2=False)
    mon = monitor(conf, nvml)

    first = mon.sample()
    second = mon.sample()

    # v1 counts the driver's reserved memory as used.
    assert first[0]['memory_used_mb'] == second[0]['memory_used_mb'] == 1547
    assert first[0]['memory_total_mb'] == 81559
    versions = [args[1] for args in nvml.args_of('nvmlDeviceGetMemoryInfo')]
    assert versions == [V2, None, None]  # v2 tried once only
    assert len(records(log, 'memory information v2 is not available')) == 1


# -- device selection ---------------------------------------------------------

def test_devices_selects_two_of_four(conf):
    gpus = [FakeGpu(i) for i in range(4)]
    nvml = FakeNvml(gpus)
    conf.set_override('devices', ['1', '3'], group='gpu')
    mon = monitor(conf, nvml)

    reports = mon.sample()

    assert [r['index'] for r in reports] == [1, 3]
    assert reports == [expected(1), expected(3)]
    assert nvml.args_of('nvmlDeviceGetHandleByIndex') == [(1,), (3,)]
    touched = {args[0].gpu.index for name, args in nvml.calls
               if args and isinstance(args[0], fake_nvml.Handle)}
    assert touched == {1, 3}


def test_devices_all_reports_every_gpu(conf):
    nvml = FakeNvml([FakeGpu(i) for i in range(4)])
    conf.set_override('devices', ['all'], group='gpu')

    assert [r['index'] for r in monitor(conf, nvml).sample()] == [0, 1, 2, 3]


def test_devices_unknown_and_invalid_logged_once(conf, log):
    nvml = FakeNvml([FakeGpu(i) for i in range(4)])
    conf.set_override('devices', ['3', '7', 'x', '3'], group='gpu')
    mon = monitor(conf, nvml)

    for _ in range(3):
        assert [r['index'] for r in mon.sample()] == [3]

    assert len(records(log, 'GPU 7 named in gpu.devices',
                       logging.WARNING)) == 1
    assert len(records(log, "'x' is not a GPU index", logging.ERROR)) == 1


def test_extra_metrics_off(conf):
    nvml = FakeNvml([FakeGpu(0)])
    conf.set_override('extra_metrics', False, group='gpu')

    [report] = monitor(conf, nvml).sample()

    assert 'temperature_c' not in report and 'power_w' not in report
    assert report == {k: v for k, v in expected(0).items()
                      if k not in ('temperature_c', 'power_w')}
    assert nvml.count('nvmlDeviceGetTemperature') == 0
    assert nvml.count('nvmlDeviceGetPowerUsage') == 0


# -- MIG ----------------------------------------------------------------------

def mig_gpu():
    return FakeGpu(
        0, name='NVIDIA A100-SXM4-40GB', total_mb=40960, used_mb=2061,
        mig_mode=1, migs=[FakeMig(0, 1, 0, 9856, 13, '2g.10gb'),
                          FakeMig(2, 5, 0, 4864, 2048, '1g.5gb')])


def test_mig_enabled_lists_instances_without_fake_utilisation(conf, log):
    nvml = FakeNvml([mig_gpu()])

    [report] = monitor(conf, nvml).sample()

    assert report['utilization_percent'] is None
    assert report['memory_total_mb'] == 40960
    assert report['mig'] == [
        {'index': 0, 'uuid': 'MIG-00000001-0000-4000-8000-000000000000',
         'name': 'NVIDIA A100-SXM4-40GB MIG 2g.10gb',
         'gpu_instance_id': 1, 'compute_instance_id': 0,
         'memory_total_mb': 9856, 'memory_used_mb': 13},
        {'index': 2, 'uuid': 'MIG-00000005-0000-4000-8000-000000000000',
         'name': 'NVIDIA A100-SXM4-40GB MIG 1g.5gb',
         'gpu_instance_id': 5, 'compute_instance_id': 0,
         'memory_total_mb': 4864, 'memory_used_mb': 2048},
    ]
    # Every slot is looked at; empty ones (NotFound) are skipped.
    assert [a[1] for a in nvml.args_of(
        'nvmlDeviceGetMigDeviceHandleByIndex')] == list(range(7))
    assert gpu_load_percent([report]) is None
    # Empty slots are normal: nothing logged about them.
    assert not [r for r in log.records if r.levelno >= logging.WARNING]
    assert records(log, 'mig1') == []


def test_mig_utilisation_not_asked_again_and_logged_once(conf, log):
    nvml = FakeNvml([mig_gpu()])
    mon = monitor(conf, nvml)

    mon.sample()
    [report] = mon.sample()

    assert report['utilization_percent'] is None
    assert len(report['mig']) == 2
    assert nvml.count('nvmlDeviceGetUtilizationRates') == 1
    assert len(records(log, 'cannot read utilization (Not Supported)',
                       logging.INFO)) == 1


def test_mig_instances_created_and_destroyed(conf):
    device = mig_gpu()
    nvml = FakeNvml([device])
    mon = monitor(conf, nvml)
    mon.sample()

    del device.migs[0]
    [report] = mon.sample()

    assert [m['index'] for m in report['mig']] == [2]


def test_mig_disabled_again_utilisation_comes_back(conf):
    device = mig_gpu()
    nvml = FakeNvml([device])
    mon = monitor(conf, nvml)
    assert mon.sample()[0]['utilization_percent'] is None

    device.mig_mode = 0
    device.migs.clear()
    [report] = mon.sample()

    assert report['utilization_percent'] == 37
    assert report['mig'] == []


# -- NotSupported and other field errors --------------------------------------

def test_not_supported_fields_are_none_not_zero(conf, log):
    device = FakeGpu(0)
    device.fail('nvmlDeviceGetTemperature', fake_nvml.NVML_ERROR_NOT_SUPPORTED)
    device.fail('nvmlDeviceGetPowerUsage', fake_nvml.NVML_ERROR_NOT_SUPPORTED)
    nvml = FakeNvml([device])
    mon = monitor(conf, nvml)

    for _ in range(3):
        [report] = mon.sample()
        assert report == expected(0, temperature_c=None, power_w=None)

    assert nvml.count('nvmlDeviceGetPowerUsage') == 1
    assert len(records(log, 'cannot read power')) == 1
    assert len(records(log, 'cannot read temperature')) == 1


def test_utilisation_not_supported_outside_mig(conf):
    device = FakeGpu(0)
    device.fail('nvmlDeviceGetUtilizationRates',
                fake_nvml.NVML_ERROR_NOT_SUPPORTED)

    [report] = monitor(conf, FakeNvml([device])).sample()

    assert report == expected(0, utilization_percent=None)


def test_transient_field_error_retried_logged_once_and_recovery(conf, log):
    device = FakeGpu(0)
    device.fail('nvmlDeviceGetPowerUsage', fake_nvml.NVML_ERROR_NO_PERMISSION)
    nvml = FakeNvml([device])
    mon = monitor(conf, nvml)

    for _ in range(3):
        assert mon.sample()[0]['power_w'] is None
    device.heal()
    assert mon.sample()[0]['power_w'] == 69.55

    assert nvml.count('nvmlDeviceGetPowerUsage') == 4  # retried every cycle
    assert len(records(log, 'cannot read power: Insufficient Permissions',
                       logging.WARNING)) == 1
    assert len(records(log, 'GPU 0: power readable again',
                       logging.INFO)) == 1


def test_one_unreadable_device_does_not_break_the_others(conf):
    gpus = [FakeGpu(i) for i in range(4)]
    gpus[2].fail('nvmlDeviceGetHandleByIndex', fake_nvml.NVML_ERROR_TIMEOUT,
                 times=1)
    nvml = FakeNvml(gpus)
    mon = monitor(conf, nvml)

    first = mon.sample()
    second = mon.sample()

    assert first == [expected(0), expected(1),
                     gpu.empty_device(2, extra=True), expected(3)]
    assert first[2] == {
        'index': 2, 'name': None, 'uuid': None, 'utilization_percent': None,
        'memory_total_mb': None, 'memory_used_mb': None, 'mig': [],
        'temperature_c': None, 'power_w': None}
    assert second == [expected(i) for i in range(4)]


def test_bytes_names_from_old_pynvml_are_decoded(conf):
    device = FakeGpu(0, name='Tesla T4')
    nvml = FakeNvml([device])
    real_name = nvml.nvmlDeviceGetName
    nvml.nvmlDeviceGetName = lambda h: real_name(h).encode()

    assert monitor(conf, nvml).sample()[0]['name'] == 'Tesla T4'


# -- backends, NVML missing ---------------------------------------------------

def test_library_missing_auto_without_tool_is_none(conf, log):
    nvml = FakeNvml(init_errors=[fake_nvml.NVML_ERROR_LIBRARY_NOT_FOUND])
    mon = monitor(conf, nvml)

    assert mon.sample() == []
    assert mon.backend == 'none'
    assert mon.last_error is None  # no GPU here is not an error
    assert len(records(log, 'NVML Shared Library Not Found',
                       logging.INFO)) == 1
    assert len(records(log, 'No GPU monitoring')) == 1


def test_library_missing_auto_falls_back_to_nvidia_smi(conf, fake_tool):
    tool = fake_tool(f'cat "{DATA / "nvidia_smi_4gpu.csv"}"\n')
    conf.set_override('nvidia_smi_path', tool, group='gpu')
    nvml = FakeNvml(init_errors=[fake_nvml.NVML_ERROR_LIBRARY_NOT_FOUND])
    mon = monitor(conf, nvml)

    reports = mon.sample()

    assert mon.backend == 'nvidia-smi'
    assert [r['index'] for r in reports] == [0, 1, 2, 3]
    assert reports[0]['utilization_percent'] == 87


def test_library_missing_backend_nvml_errors_and_retries(conf, log):
    conf.set_override('backend', 'nvml', group='gpu')
    nvml = FakeNvml([FakeGpu(0)], init_errors=[
        fake_nvml.NVML_ERROR_LIBRARY_NOT_FOUND,
        fake_nvml.NVML_ERROR_LIBRARY_NOT_FOUND])
    mon = monitor(conf, nvml)

    assert mon.sample() == []
    assert 'NVML Shared Library Not Found' in mon.last_error
    assert mon.sample() == []
    assert mon.sample() == [expected(0)]
    assert mon.last_error is None
    assert mon.backend == 'nvml'
    assert nvml.count('nvmlInit') == 3
    assert len(records(log, 'NVML unavailable', logging.ERROR)) == 1


def test_backend_nvml_never_falls_back_to_the_tool(conf, fake_tool):
    tool = fake_tool(f'cat "{DATA / "nvidia_smi_4gpu.csv"}"\n')
    conf.set_override('nvidia_smi_path', tool, group='gpu')
    conf.set_override('backend', 'nvml', group='gpu')
    nvml = FakeNvml(init_errors=[fake_nvml.NVML_ERROR_DRIVER_NOT_LOADED])
    mon = monitor(conf, nvml)

    assert mon.sample() == []
    assert mon.backend == 'none'


def test_backend_none_never_touches_nvml_or_tool(conf, fake_tool):
    tool = fake_tool('echo called > "$0.called"\n')
    conf.set_override('nvidia_smi_path', tool, group='gpu')
    conf.set_override('backend', 'none', group='gpu')

    def loader():
        raise AssertionError('NVML loaded with backend none')

    mon = gpu.GpuMonitor(conf, nvml_loader=loader)

    assert mon.sample() == []
    assert mon.backend == 'none'
    assert mon.last_error is None
    assert not os.path.exists(tool + '.called')


def test_backend_nvidia_smi_does_not_load_nvml(conf, fake_tool):
    tool = fake_tool(f'cat "{DATA / "nvidia_smi_4gpu.csv"}"\n')
    conf.set_override('nvidia_smi_path', tool, group='gpu')
    conf.set_override('backend', 'nvidia-smi', group='gpu')

    def loader():
        raise AssertionError('NVML loaded with backend nvidia-smi')

    mon = gpu.GpuMonitor(conf, nvml_loader=loader)

    assert len(mon.sample()) == 4
    assert mon.backend == 'nvidia-smi'


def test_backend_nvidia_smi_missing_tool(conf, log):
    conf.set_override('backend', 'nvidia-smi', group='gpu')
    mon = gpu.GpuMonitor(conf, nvml_loader=lambda: FakeNvml([FakeGpu(0)]))

    assert mon.sample() == []
    assert mon.sample() == []
    assert 'not found or not executable' in mon.last_error
    assert len(records(log, 'nvidia-smi unavailable', logging.ERROR)) == 1


def test_pynvml_not_importable(conf):
    def loader():
        raise ImportError('No module named pynvml')

    mon = gpu.GpuMonitor(conf, nvml_loader=loader)
    assert mon.sample() == []
    assert mon.backend == 'none'

    conf.set_override('backend', 'nvml', group='gpu')
    assert mon.sample() == []
    assert 'pynvml cannot be imported' in mon.last_error


def test_auto_reprobes_nvml_after_the_interval(conf):
    clock = Clock()
    nvml = FakeNvml([FakeGpu(0)], init_errors=[
        fake_nvml.NVML_ERROR_DRIVER_NOT_LOADED])
    mon = monitor(conf, nvml, clock=clock, reprobe_interval=300)

    assert mon.sample() == []
    clock.now += 299
    assert mon.sample() == []
    assert nvml.count('nvmlInit') == 1  # not probed every cycle
    clock.now += 1
    assert mon.sample() == [expected(0)]
    assert mon.backend == 'nvml'


def test_auto_moves_from_nvidia_smi_to_nvml(conf, fake_tool):
    tool = fake_tool(f'cat "{DATA / "nvidia_smi_4gpu.csv"}"\n')
    conf.set_override('nvidia_smi_path', tool, group='gpu')
    clock = Clock()
    nvml = FakeNvml([FakeGpu(0)], init_errors=[
        fake_nvml.NVML_ERROR_DRIVER_NOT_LOADED])
    mon = monitor(conf, nvml, clock=clock, reprobe_interval=300)

    assert len(mon.sample()) == 4
    assert mon.backend == 'nvidia-smi'
    clock.now += 300
    assert mon.sample() == [expected(0)]
    assert mon.backend == 'nvml'


def test_backend_change_at_run_time(conf):
    nvml = FakeNvml([FakeGpu(0)])
    mon = monitor(conf, nvml)
    assert mon.sample() == [expected(0)]

    conf.set_override('backend', 'none', group='gpu')
    assert mon.sample() == []
    assert nvml.count('nvmlShutdown') == 1
    assert nvml.refcount == 0


def test_real_pynvml_without_a_gpu(conf):
    try:
        gpu.load_nvml()
    except ImportError:
        pytest.skip('nvidia-ml-py is not installed')
    skip_if_real_nvml_works()
    mon = gpu.GpuMonitor(conf)

    assert mon.sample() == []
    assert mon.backend == 'none'
    assert mon.last_error is None
    mon.close()


# -- driver errors and recovery -----------------------------------------------

def test_driver_error_mid_run_then_reinit(conf, log):
    gpus = [FakeGpu(0), FakeGpu(1)]
    nvml = FakeNvml(gpus)
    mon = monitor(conf, nvml)
    assert mon.sample() == [expected(0), expected(1)]

    gpus[0].fail('nvmlDeviceGetUtilizationRates',
                 fake_nvml.NVML_ERROR_GPU_IS_LOST, times=1)
    lost = mon.sample()

    # The lost GPU's readings are None (not asked again this cycle, so one
    # error is not repeated for every field); the other GPU is reported.
    assert lost[0] == expected(0, utilization_percent=None,
                               memory_total_mb=None, memory_used_mb=None,
                               temperature_c=None, power_w=None)
    assert lost[1] == expected(1)
    assert nvml.count('nvmlShutdown') == 0

    recovered = mon.sample()

    assert recovered == [expected(0), expected(1)]
    assert nvml.count('nvmlShutdown') == 1
    assert nvml.count('nvmlInit') == 2
    # New handles after the re-initialisation (stale ones are refused).
    assert nvml.count('nvmlDeviceGetHandleByIndex') == 4
    assert len(records(log, 'GPU 0: NVML driver error reading utilization: '
                       'GPU is lost', logging.WARNING)) == 1
    assert len(records(log, 'Re-initialising NVML')) == 1
    assert len(records(log, 'GPU 0: readable again')) == 1


@pytest.mark.parametrize('code', [fake_nvml.NVML_ERROR_UNKNOWN,
                                  fake_nvml.NVML_ERROR_DRIVER_NOT_LOADED,
                                  fake_nvml.NVML_ERROR_UNINITIALIZED])
def test_driver_class_errors_trigger_reinit(conf, code):
    device = FakeGpu(0)
    nvml = FakeNvml([device])
    mon = monitor(conf, nvml)
    mon.sample()

    device.fail('nvmlDeviceGetMemoryInfo', code, times=1)
    assert mon.sample()[0]['memory_used_mb'] is None
    assert mon.sample() == [expected(0)]
    assert nvml.count('nvmlInit') == 2


def test_driver_unloaded_then_reloaded(conf, log):
    nvml = FakeNvml([FakeGpu(0), FakeGpu(1)])
    mon = monitor(conf, nvml)
    mon.sample()

    # The driver goes away: every call fails, and so does nvmlInit.
    nvml.fail('nvmlDeviceGetUtilizationRates',
              fake_nvml.NVML_ERROR_DRIVER_NOT_LOADED)
    nvml.init_errors = [fake_nvml.NVML_ERROR_DRIVER_NOT_LOADED] * 2
    assert [r['utilization_percent'] for r in mon.sample()] == [None, None]
    assert mon.sample() == []
    assert 'Driver Not Loaded' in mon.last_error
    assert mon.sample() == []
    assert mon.backend == 'nvml'  # still the backend, being retried

    nvml.heal()
    assert mon.sample() == [expected(0), expected(1)]
    assert mon.last_error is None
    assert len(records(log, 'Re-initialising NVML')) == 1
    assert len(records(log, 'GPU readings through nvml failed')) == 1
    assert len(records(log, 'GPU readings through nvml work again')) == 1


def test_close_shuts_nvml_down_once_and_can_restart(conf):
    nvml = FakeNvml([FakeGpu(0)])
    mon = monitor(conf, nvml)
    mon.sample()

    mon.close()
    mon.close()

    assert nvml.count('nvmlShutdown') == 1
    assert nvml.refcount == 0
    assert mon.sample() == [expected(0)]
    assert nvml.refcount == 1


def test_unexpected_error_never_escapes(conf, log):
    nvml = FakeNvml([FakeGpu(0)])
    real = nvml.nvmlDeviceGetPowerUsage
    nvml.nvmlDeviceGetPowerUsage = lambda h: 1 / 0
    mon = monitor(conf, nvml)

    assert mon.sample() == []
    assert mon.sample() == []
    assert 'ZeroDivisionError' in mon.last_error
    [record] = records(log, 'Unexpected error reading the GPUs')
    assert record.exc_info is not None

    nvml.nvmlDeviceGetPowerUsage = real
    assert mon.sample() == [expected(0)]
    assert nvml.refcount == 1  # the broken reader was shut down


def test_report_is_json_serialisable(conf):
    nvml = FakeNvml([FakeGpu(0), mig_gpu()])
    nvml.gpus[1].index = 1

    reports = monitor(conf, nvml).sample()

    assert json.loads(json.dumps(reports, allow_nan=False)) == reports
