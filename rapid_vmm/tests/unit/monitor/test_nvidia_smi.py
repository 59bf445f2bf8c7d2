"""Tests of rapid_vmm.monitor.nvidia_smi: the parser on captured output,
the reader with a fake tool."""

import logging
import os
import random
import subprocess
import time

import pytest

from rapid_vmm.monitor import gpu
from rapid_vmm.monitor import nvidia_smi
from rapid_vmm.monitor.resources import ErrorLog
from rapid_vmm.tests.unit.monitor.utils import DATA
from rapid_vmm.tests.unit.monitor.utils import records

QUERY = ('--query-gpu=index,name,uuid,utilization.gpu,memory.total,'
         'memory.used,temperature.gpu,power.draw')


def parse(name):
    return nvidia_smi.parse_query_gpu((DATA / name).read_text())


def reader(conf):
    return nvidia_smi.NvidiaSmiReader(
        conf, ErrorLog(logging.getLogger('rapid_vmm.monitor.test')))


def a100(index, uuid, util, used, temp, power):
    return {'index': index, 'name': 'NVIDIA A100-SXM4-80GB', 'uuid': uuid,
            'utilization_percent': util, 'memory_total_mb': 81920,
            'memory_used_mb': used, 'mig': [], 'temperature_c': temp,
            'power_w': power}


FOUR_GPUS = [
    a100(0, 'GPU-1c7a9a6e-5d0b-4f39-8c1e-0b6a3f9e2d41', 87, 40211, 61,
         312.45),
    a100(1, 'GPU-2b8f0d3c-7e4a-4b12-9d6f-1c2e3a4b5c6d', 0, 4, 33, 62.1),
    a100(2, 'GPU-3c9e1f4d-8a5b-4c23-ae70-2d3f4b5c6d7e', 100, 79850, 70,
         398.77),
    a100(3, 'GPU-4dae2a5e-9b6c-4d34-bf81-3e4a5c6d7e8f', 12, 2048, 41, 95.03),
]


# -- the parser ---------------------------------------------------------------

def test_build_command_is_an_argument_list():
    assert nvidia_smi.build_command('/usr/bin/nvidia-smi') == [
        '/usr/bin/nvidia-smi', QUERY, '--format=csv,noheader,nounits']


def test_parse_four_gpus():
    result = parse('nvidia_smi_4gpu.csv')

    assert result.devices == FOUR_GPUS
    assert result.errors == [] and result.warnings == []


def test_parse_not_available_and_not_supported_are_none():
    result = parse('nvidia_smi_not_available.csv')

    mig, geforce, h100 = result.devices
    assert mig['utilization_percent'] is None  # MIG mode: [N/A]
    assert mig['memory_used_mb'] == 10752 and mig['power_w'] == 56.19
    assert geforce['power_w'] is None  # [Not Supported]
    assert geforce['utilization_percent'] == 3
    assert h100['temperature_c'] is None and h100['power_w'] is None
    assert h100['utilization_percent'] == 0  # a real zero stays zero
    assert h100['memory_used_mb'] == 0
    assert result.errors == [] and result.warnings == []


def test_parse_garbage_skips_bad_lines_and_says_why():
    result = parse('nvidia_smi_garbage.csv')

    assert [d['index'] for d in result.devices] == [0, 5]
    assert result.devices[0]['utilization_percent'] == 15
    # Bracketed errors are None, and reported as warnings.
    five = result.devices[1]
    assert five['utilization_percent'] is None
    assert five['memory_used_mb'] is None
    assert five['memory_total_mb'] == 15360
    assert result.warnings == [
        'line 7 (GPU 5): utilization.gpu is [Unknown Error]',
        'line 7 (GPU 5): memory.used is [GPU is lost]',
    ]
    errors = result.errors
    assert len(errors) == 7
    assert errors[0].startswith('line 2: expected 8 fields, got 1')
    assert errors[1].startswith(
        "line 3: utilization.gpu is not a number: 'abc'")
    assert errors[2].startswith('line 4: expected 8 fields, got 7')
    assert errors[3].startswith(
        "line 6: uuid is not a GPU UUID: 'not-a-uuid'")
    assert errors[4] == 'line 8: GPU 0 listed twice'
    assert errors[5].startswith('line 9: utilization.gpu out of range: 140')
    assert errors[6].startswith("line 10: memory.total is not a number: "
                                "'-1'")


def test_parse_empty_output():
    assert nvidia_smi.parse_query_gpu('') == ([], [], [])
    assert nvidia_smi.parse_query_gpu('\n \n') == ([], [], [])


def test_parse_crlf_and_spacing():
    text = ('0,Tesla T4,GPU-81e26e92-dfa0-4178-b3d5-728e9a0b1c23,  5 ,'
            '15360,100,40,20\r\n')

    [device] = nvidia_smi.parse_query_gpu(text).devices

    assert device['utilization_percent'] == 5
    assert device['power_w'] == 20.0


def test_parse_long_garbage_is_quoted_short():
    result = nvidia_smi.parse_query_gpu('x' * 10000)

    assert result.devices == []
    assert len(result.errors[0]) < 200


def test_parse_never_raises_on_noise():
    rng = random.Random(42)
    alphabet = '0123456789,. []-GPUNA/xé\t'
    good = (DATA / 'nvidia_smi_4gpu.csv').read_text()
    for _ in range(500):
        noise = ''.join(rng.choice(alphabet)
                        for _ in range(rng.randint(0, 120)))
        cut = rng.randint(0, len(good))
        result = nvidia_smi.parse_query_gpu(good[:cut] + noise)
        for device in result.devices:
            assert isinstance(device['index'], int)
            assert device['uuid'].startswith('GPU-')
            for key in ('utilization_percent', 'memory_total_mb',
                        'memory_used_mb', 'temperature_c'):
                assert device[key] is None or isinstance(device[key], int)


# -- the reader, with a fake tool ---------------------------------------------

def test_reader_runs_the_query_without_a_shell(conf, fake_tool):
    tool = fake_tool(f'cat "{DATA / "nvidia_smi_4gpu.csv"}"\n')
    conf.set_override('nvidia_smi_path', tool, group='gpu')

    devices = reader(conf).sample(None, True)

    assert devices == FOUR_GPUS
    with open(tool + '.args') as args:
        assert args.read().splitlines() == [
            QUERY, '--format=csv,noheader,nounits']


def test_reader_selection_and_no_extras(conf, fake_tool):
    tool = fake_tool(f'cat "{DATA / "nvidia_smi_4gpu.csv"}"\n')
    conf.set_override('nvidia_smi_path', tool, group='gpu')

    devices = reader(conf).sample([0, 2, 9], False)

    assert [d['index'] for d in devices] == [0, 2]
    assert all('power_w' not in d and 'temperature_c' not in d
               for d in devices)


def test_reader_tool_found_on_path(conf, fake_tool, monkeypatch, tmp_path):
    fake_tool(f'cat "{DATA / "nvidia_smi_4gpu.csv"}"\n')
    monkeypatch.setenv('PATH', f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    conf.set_override('nvidia_smi_path', 'nvidia-smi', group='gpu')

    assert reader(conf).executable() == str(tmp_path / 'nvidia-smi')
    assert len(reader(conf).sample(None, True)) == 4


def test_reader_no_driver(conf, fake_tool):
    tool = fake_tool(f'cat "{DATA / "nvidia_smi_no_driver.txt"}"\nexit 9\n')
    conf.set_override('nvidia_smi_path', tool, group='gpu')

    with pytest.raises(nvidia_smi.NvidiaSmiError) as exc:
        reader(conf).sample(None, True)

    assert 'exit status 9' in str(exc.value)
    assert "couldn't communicate with the NVIDIA driver" in str(exc.value)


def test_reader_only_garbage_is_a_failure(conf, fake_tool):
    tool = fake_tool('echo "Failed to initialize NVML: Unknown Error"\n')
    conf.set_override('nvidia_smi_path', tool, group='gpu')

    with pytest.raises(nvidia_smi.NvidiaSmiError, match='no usable GPU'):
        reader(conf).sample(None, True)


def test_reader_no_gpu_is_an_empty_list(conf, fake_tool):
    conf.set_override('nvidia_smi_path', fake_tool('true\n'), group='gpu')

    assert reader(conf).sample(None, True) == []


def test_reader_partial_failure_keeps_good_lines_logs_once(conf, fake_tool,
                                                           log):
    tool = fake_tool(f'cat "{DATA / "nvidia_smi_garbage.csv"}"\nexit 15\n')
    conf.set_override('nvidia_smi_path', tool, group='gpu')
    conf.set_override('backend', 'nvidia-smi', group='gpu')
    mon = gpu.GpuMonitor(conf)

    for _ in range(3):
        assert [d['index'] for d in mon.sample()] == [0, 5]

    assert len(records(log, 'nvidia-smi output: line 2: expected 8')) == 1
    assert len(records(log, 'exited with status 15 but listed 2')) == 1
    assert len(records(log, 'utilization.gpu is [Unknown Error]')) == 1


def _alive(pid):
    try:
        with open(f'/proc/{pid}/stat') as stat:
            state = stat.read().rsplit(')', 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ('Z', 'X')


def test_reader_timeout_kills_the_whole_process_group(conf, fake_tool):
    # The tool's own child holds the output pipe open: killing only the
    # tool would leave the reader waiting for it.
    tool = fake_tool('sleep 60 &\necho $! > "$0.pid"\nwait\n')
    conf.set_override('nvidia_smi_path', tool, group='gpu')
    conf.set_override('nvidia_smi_timeout', 1, group='gpu')

    with pytest.raises(nvidia_smi.NvidiaSmiError,
                       match='did not answer within 1 s; killed'):
        reader(conf).sample(None, True)

    with open(tool + '.pid') as pid_file:
        child = int(pid_file.read())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_gpu_monitor_reports_the_timeout(conf, fake_tool, log):
    tool = fake_tool('exec sleep 60\n')
    conf.set_override('nvidia_smi_path', tool, group='gpu')
    conf.set_override('nvidia_smi_timeout', 1, group='gpu')
    conf.set_override('backend', 'nvidia-smi', group='gpu')
    mon = gpu.GpuMonitor(conf)

    assert mon.sample() == []
    assert 'did not answer within 1 s' in mon.last_error
    assert mon.backend == 'nvidia-smi'


class StuckProcess:
    """A process that ignores SIGKILL (stuck in the driver) until freed."""

    pid = 999999

    def __init__(self):
        self.freed = False
        self.returncode = None

    def communicate(self, timeout=None):
        if self.freed:
            self.returncode = 0
            return '', ''
        raise subprocess.TimeoutExpired('nvidia-smi', timeout)

    def poll(self):
        return 0 if self.freed else None


def test_stuck_tool_is_not_started_again_until_it_exits(conf, fake_tool,
                                                        monkeypatch):
    conf.set_override('nvidia_smi_path', fake_tool('true\n'), group='gpu')
    started = []

    def popen(argv, **kwargs):
        assert kwargs['start_new_session'] is True
        assert 'shell' not in kwargs
        started.append(StuckProcess())
        return started[-1]

    monkeypatch.setattr(nvidia_smi.os, 'killpg', lambda pid, sig: None)
    monkeypatch.setattr(nvidia_smi, '_KILL_WAIT_S', 0.01)
    smi = nvidia_smi.NvidiaSmiReader(
        conf, ErrorLog(logging.getLogger('test')), popen=popen)

    with pytest.raises(nvidia_smi.NvidiaSmiError, match='did not answer'):
        smi.sample(None, True)
    with pytest.raises(nvidia_smi.NvidiaSmiError, match='not exited yet'):
        smi.sample(None, True)
    assert len(started) == 1

    started[0].freed = True
    with pytest.raises(nvidia_smi.NvidiaSmiError, match='did not answer'):
        smi.sample(None, True)
    assert len(started) == 2


def test_tool_not_executable(conf, tmp_path):
    path = tmp_path / 'nvidia-smi'
    path.write_text('#!/bin/sh\n')
    path.chmod(0o644)
    conf.set_override('nvidia_smi_path', str(path), group='gpu')

    with pytest.raises(nvidia_smi.NvidiaSmiError, match='not executable'):
        reader(conf).start()
