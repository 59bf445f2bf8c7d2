"""Tests of tools/gpu-check.py, with a fake NVML and a fake nvidia-smi."""

import importlib.util
import json
import pathlib

import pytest

from rapid_vmm.tests.unit.monitor.fake_nvml import FakeGpu
from rapid_vmm.tests.unit.monitor.fake_nvml import FakeMig
from rapid_vmm.tests.unit.monitor.fake_nvml import FakeNvml
from rapid_vmm.tests.unit.monitor.utils import DATA
from rapid_vmm.tests.unit.monitor.utils import skip_if_real_nvml_works

TOOL = pathlib.Path(__file__).resolve().parents[4] / 'tools' / 'gpu-check.py'


@pytest.fixture(scope='module')
def check():
    if not TOOL.exists():
        pytest.skip('tools/gpu-check.py is not in this checkout')
    spec = importlib.util.spec_from_file_location('gpu_check', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The GPUs of data/nvidia_smi_4gpu.csv, as NVML would see them.
CSV_GPUS = [
    (0, 'GPU-1c7a9a6e-5d0b-4f39-8c1e-0b6a3f9e2d41', 87, 40211, 61, 312450),
    (1, 'GPU-2b8f0d3c-7e4a-4b12-9d6f-1c2e3a4b5c6d', 0, 4, 33, 62100),
    (2, 'GPU-3c9e1f4d-8a5b-4c23-ae70-2d3f4b5c6d7e', 100, 79850, 70, 398770),
    (3, 'GPU-4dae2a5e-9b6c-4d34-bf81-3e4a5c6d7e8f', 12, 2048, 41, 95030),
]

UUIDS = [uuid for _, uuid, *_ in CSV_GPUS]
MIG_LINE = ('  MIG 1g.10gb     Device  0: '
            '(UUID: MIG-00000001-0000-4000-8000-000000000000)\n')
SMI_LIST = ''.join(
    f'GPU {i}: NVIDIA A100-SXM4-80GB (UUID: {uuid})\n' +
    (MIG_LINE if i == 1 else '') for i, uuid in enumerate(UUIDS))
MODES = '0, Disabled\n1, Disabled\n2, Disabled\n3, Disabled\n'


def fake_nvml(**changes):
    gpus = [FakeGpu(i, name='NVIDIA A100-SXM4-80GB', uuid=uuid,
                    utilization=util, total_mb=81920, used_mb=used,
                    temperature=temp, power_mw=power)
            for i, uuid, util, used, temp, power in CSV_GPUS]
    for attribute, value in changes.items():
        index, name = attribute.split('_', 1)
        setattr(gpus[int(index[3:])], name, value)
    return FakeNvml(gpus)


def smi_script(fake_tool, query=DATA / 'nvidia_smi_4gpu.csv', modes=MODES,
               listing=None):
    if listing is None:
        listing = SMI_LIST.replace(MIG_LINE, '')
    return fake_tool(
        'case "$1" in\n'
        f'  --query-gpu=index,mig.mode.current) printf "{modes}" ;;\n'
        f"  -L) cat <<'EOF'\n{listing}EOF\n ;;\n"
        f'  *) cat "{query}" ;;\n'
        'esac\n')


def test_parse_list(check):
    assert check.parse_list(SMI_LIST) == {
        0: [], 1: ['MIG-00000001-0000-4000-8000-000000000000'], 2: [],
        3: []}


def test_parse_mig_modes(check):
    assert check.parse_mig_modes(
        '0, Enabled\n1, Disabled\n2, [N/A]\ngarbage\n') == {
            0: True, 1: False, 2: False}


def agent(index, **changes):
    report = {'index': index, 'name': 'T4', 'uuid': f'GPU-{index}',
              'utilization_percent': 50, 'memory_total_mb': 15360,
              'memory_used_mb': 1000, 'mig': [], 'temperature_c': 40,
              'power_w': 30.0}
    report.update(changes)
    return report


def failing(rows):
    return [(row['gpu'], row['field']) for row in rows if not row['ok']]


def test_compare_within_tolerances(check):
    before = [agent(0, utilization_percent=40, memory_used_mb=900)]
    after = [agent(0, utilization_percent=70, memory_used_mb=1100)]
    smi = [agent(0, utilization_percent=75, memory_used_mb=1300,
                 temperature_c=43, power_w=33.0, memory_total_mb=15361)]

    assert failing(check.compare(before, after, smi)) == []


def test_compare_finds_mismatches(check):
    before = after = [agent(0), agent(1)]
    smi = [agent(0, uuid='GPU-x', memory_total_mb=15000,
                 utilization_percent=None, memory_used_mb=5000),
           agent(2)]

    assert failing(check.compare(before, after, smi)) == [
        (0, 'uuid'), (0, 'memory_total_mb'), (0, 'memory_used_mb'),
        (0, 'utilization_percent'), (1, 'present'), (2, 'present')]


def test_compare_mig(check):
    mig = {'index': 0, 'uuid': 'MIG-a', 'name': 'x', 'gpu_instance_id': 1,
           'compute_instance_id': 0, 'memory_total_mb': 1,
           'memory_used_mb': 0}
    ok = [agent(0, utilization_percent=None, mig=[mig])]
    smi = [agent(0, utilization_percent=None)]

    assert failing(check.compare(ok, ok, smi, {0: ['MIG-a']},
                                 {0: True})) == []
    wrong = [agent(0, utilization_percent=0, mig=[])]
    assert failing(check.compare(wrong, wrong, smi, {0: ['MIG-a']},
                                 {0: True})) == [
        (0, 'utilization_percent'), (0, 'mig'), (0, 'mig_utilization')]


def test_main_all_match(check, fake_tool, capsys):
    tool = smi_script(fake_tool)

    status = check.main(['--nvidia-smi', tool, '--json'],
                        nvml_loader=lambda: fake_nvml())

    out = capsys.readouterr().out
    assert status == 0, out
    assert 'All readings match' in out
    summary = json.loads(out.splitlines()[-1])
    assert summary['gpus'] == 4 and summary['mismatches'] == 0
    assert summary['result'] == 'ok'


def test_main_mismatch(check, fake_tool, capsys):
    tool = smi_script(fake_tool)
    nvml = fake_nvml(gpu2_used_mb=10000, gpu3_uuid='GPU-wrong')

    status = check.main(['--nvidia-smi', tool], nvml_loader=lambda: nvml)

    out = capsys.readouterr().out
    assert status == 1
    assert '2 mismatch(es)' in out


def test_main_mig_instances_compared(check, fake_tool, tmp_path, capsys):
    nvml = fake_nvml()
    nvml.gpus[1].mig_mode = 1
    nvml.gpus[1].migs = {0: FakeMig(0, 1, 0, 9856, 13)}
    # nvidia-smi reports no utilisation in MIG mode.
    query = (DATA / 'nvidia_smi_4gpu.csv').read_text().replace(
        '1c2e3a4b5c6d, 0,', '1c2e3a4b5c6d, [N/A],')
    path = tmp_path / 'query.csv'
    path.write_text(query)
    tool = smi_script(fake_tool, query=path, modes='0, Disabled\n1, '
                      'Enabled\n2, Disabled\n3, Disabled\n',
                      listing=SMI_LIST)

    status = check.main(['--nvidia-smi', tool], nvml_loader=lambda: nvml)

    assert status == 0, capsys.readouterr().out


def test_main_without_gpu_is_skipped(check, tmp_path, capsys):
    skip_if_real_nvml_works()
    status = check.main(['--nvidia-smi', str(tmp_path / 'none')])

    assert status == 77
    assert 'No NVIDIA GPU here' in capsys.readouterr().out


def test_main_nvml_broken_but_tool_present_is_a_mismatch(check, fake_tool,
                                                         capsys):
    tool = smi_script(fake_tool)

    def broken():
        raise ImportError('no pynvml')

    assert check.main(['--nvidia-smi', tool], nvml_loader=broken) == 1


def test_main_no_tool_to_compare_is_skipped(check, tmp_path, capsys):
    status = check.main(['--nvidia-smi', str(tmp_path / 'none')],
                        nvml_loader=lambda: fake_nvml())

    assert status == 77
    assert 'no nvidia-smi to compare with' in capsys.readouterr().out
