#!/usr/bin/env python3
"""Compare the agent's GPU readings with nvidia-smi's, on a GPU machine.

Reads the GPUs through the agent's own monitor (``rapid_vmm.monitor.gpu``,
NVML backend by default), runs ``nvidia-smi`` in between two agent samples,
and prints both side by side for every GPU: name, UUID, memory total and
used, utilisation (and temperature, power draw), and the MIG instances.
Identity fields must match exactly, memory total to 1 MiB; values that
move (memory used, utilisation, temperature, power) must fall within a
tolerance of the range the agent saw.

Exit status: 0 every reading matches, 1 a mismatch, 2 the check could not
run (nvidia-smi failed), 77 skipped: no NVIDIA GPU here, or nothing to
compare with (no nvidia-smi).

Usage: tools/gpu-check.py [--backend nvml] [--json] [oslo.config options
such as --config-file /etc/rapid-vmm/rapid-vmm.conf]
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import time

from oslo_config import cfg

from rapid_vmm import conf as rapid_conf
from rapid_vmm.monitor import gpu as gpu_monitor
from rapid_vmm.monitor import nvidia_smi

OK, MISMATCH, ERROR, SKIPPED = 0, 1, 2, 77

_MIG_UUID_RE = re.compile(r'\(UUID: (MIG-[^)\s]+)\)')
_GPU_LINE_RE = re.compile(r'^GPU (\d+): ')


def parse_list(text: str) -> dict[int, list[str]]:
    """MIG device UUIDs per GPU index, from ``nvidia-smi -L``."""
    migs: dict[int, list[str]] = {}
    current = None
    for line in text.splitlines():
        match = _GPU_LINE_RE.match(line)
        if match:
            current = int(match.group(1))
            migs[current] = []
            continue
        match = _MIG_UUID_RE.search(line)
        if match and current is not None:
            migs[current].append(match.group(1))
    return migs


def parse_mig_modes(text: str) -> dict[int, bool]:
    """MIG mode per GPU from ``--query-gpu=index,mig.mode.current``."""
    modes = {}
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(',')]
        if len(fields) == 2 and fields[0].isdigit():
            modes[int(fields[0])] = fields[1] == 'Enabled'
    return modes


def _in_range(smi, before, after, tolerance):
    values = [v for v in (before, after) if v is not None]
    if smi is None or not values:
        return smi is None and not values
    return min(values) - tolerance <= smi <= max(values) + tolerance


def compare(before: list[dict], after: list[dict], smi: list[dict],
            smi_migs: dict[int, list[str]] | None = None,
            smi_mig_modes: dict[int, bool] | None = None,
            tolerances: dict | None = None) -> list[dict]:
    """One row per GPU and field: agent value(s), nvidia-smi's, verdict.

    ``before``/``after``: the agent's samples taken around the nvidia-smi
    run. A row is ``{'gpu', 'field', 'agent', 'nvidia_smi', 'ok'}``.
    """
    tol = {'memory_used_mb': 256, 'utilization_percent': 20,
           'temperature_c': 5, 'power_w': 25.0, 'power_fraction': 0.15}
    tol.update(tolerances or {})
    rows = []
    agent_before = {d['index']: d for d in before}
    agent_after = {d['index']: d for d in after}
    smi_by_index = {d['index']: d for d in smi}
    for index in sorted(set(agent_before) | set(smi_by_index)):
        a1, a2 = agent_before.get(index), agent_after.get(index, {})
        s = smi_by_index.get(index)
        if a1 is None or s is None:
            rows.append({'gpu': index, 'field': 'present',
                         'agent': a1 is not None,
                         'nvidia_smi': s is not None, 'ok': False})
            continue
        for field in ('name', 'uuid'):
            rows.append({'gpu': index, 'field': field, 'agent': a1[field],
                         'nvidia_smi': s[field],
                         'ok': a1[field] == s[field]})
        total_ok = (a1['memory_total_mb'] is not None and
                    s['memory_total_mb'] is not None and
                    abs(a1['memory_total_mb'] - s['memory_total_mb']) <= 1)
        rows.append({'gpu': index, 'field': 'memory_total_mb',
                     'agent': a1['memory_total_mb'],
                     'nvidia_smi': s['memory_total_mb'], 'ok': total_ok})
        for field in ('memory_used_mb', 'utilization_percent',
                      'temperature_c', 'power_w'):
            if field not in a1:
                continue  # extra metrics off
            tolerance = tol[field]
            if field == 'power_w' and s.get(field) is not None:
                tolerance = max(tolerance, s[field] * tol['power_fraction'])
            rows.append({
                'gpu': index, 'field': field,
                'agent': _span(a1.get(field), a2.get(field)),
                'nvidia_smi': s.get(field),
                'ok': _in_range(s.get(field), a1.get(field), a2.get(field),
                                tolerance)})
        if smi_mig_modes is not None and index in smi_mig_modes:
            enabled = smi_mig_modes[index]
            agent_uuids = sorted(m['uuid'] for m in a1['mig'])
            expected = sorted((smi_migs or {}).get(index, []))
            rows.append({'gpu': index, 'field': 'mig',
                         'agent': agent_uuids, 'nvidia_smi': expected,
                         'ok': agent_uuids == expected})
            if enabled:
                rows.append({'gpu': index, 'field': 'mig_utilization',
                             'agent': a1['utilization_percent'],
                             'nvidia_smi': 'None in MIG mode',
                             'ok': a1['utilization_percent'] is None})
    return rows


def _span(before, after):
    values = sorted({v for v in (before, after) if v is not None})
    if len(values) < 2:
        return values[0] if values else None
    return f'{values[0]}..{values[-1]}'


def _run(argv: list[str], timeout: float) -> str:
    # An argument list, never a shell.
    result = subprocess.run(argv, capture_output=True, text=True,  # noqa: S603
                            timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f'{" ".join(argv)} exited with status '
                           f'{result.returncode}: '
                           f'{(result.stderr or result.stdout).strip()}')
    return result.stdout


def _print_rows(rows):
    print(f'{"GPU":>3}  {"field":<20} {"agent":<42} {"nvidia-smi":<42} ok')
    for row in rows:
        print(f'{row["gpu"]:>3}  {row["field"]:<20} '
              f'{row["agent"]!s:<42.42} {row["nvidia_smi"]!s:<42.42} '
              f'{"yes" if row["ok"] else "NO"}')


def main(argv: list[str] | None = None, nvml_loader=None) -> int:
    parser = argparse.ArgumentParser(
        description='Compare the agent\'s GPU readings with nvidia-smi.')
    parser.add_argument('--backend', default='nvml',
                        choices=['nvml', 'nvidia-smi', 'auto'],
                        help='agent backend to check (default: nvml)')
    parser.add_argument('--nvidia-smi', dest='nvidia_smi',
                        help='nvidia-smi to compare with (default: '
                             '[gpu] nvidia_smi_path)')
    parser.add_argument('--json', action='store_true',
                        help='print a JSON summary as the last line')
    args, rest = parser.parse_known_args(argv)

    conf = cfg.ConfigOpts()
    rapid_conf.register_opts(conf)
    conf(rest, project='rapid-vmm')
    conf.set_override('backend', args.backend, group='gpu')
    if args.nvidia_smi:
        conf.set_override('nvidia_smi_path', args.nvidia_smi, group='gpu')
    timeout = conf.gpu.nvidia_smi_timeout
    tool = shutil.which(conf.gpu.nvidia_smi_path)

    kwargs = {} if nvml_loader is None else {'nvml_loader': nvml_loader}
    monitor = gpu_monitor.GpuMonitor(conf, **kwargs)
    try:
        start = time.perf_counter()
        before = monitor.sample()
        agent_ms = (time.perf_counter() - start) * 1000
        backend = monitor.backend
        summary = {'backend': backend, 'gpus': len(before),
                   'agent_sample_ms': round(agent_ms, 3)}
        if backend == 'none' or not before:
            reason = monitor.last_error or 'no GPU reported'
            if tool is None:
                print(f'No NVIDIA GPU here ({reason}; no nvidia-smi): '
                      f'skipped')
                return _done(SKIPPED, summary, args.json, 'skipped')
            print(f'nvidia-smi is at {tool} but the agent reads no GPU '
                  f'through {args.backend}: {reason}')
            return _done(MISMATCH, summary, args.json, 'mismatch')
        if tool is None:
            print(f'The agent reads {len(before)} GPU(s) through {backend} '
                  f'but there is no nvidia-smi to compare with: skipped')
            return _done(SKIPPED, summary, args.json, 'skipped')
        try:
            start = time.perf_counter()
            smi_out = _run(nvidia_smi.build_command(tool), timeout)
            summary['nvidia_smi_ms'] = round(
                (time.perf_counter() - start) * 1000, 3)
            mig_modes = parse_mig_modes(_run(
                [tool, '--query-gpu=index,mig.mode.current',
                 '--format=csv,noheader'], timeout))
            migs = parse_list(_run([tool, '-L'], timeout))
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f'nvidia-smi failed: {exc}')
            return _done(ERROR, summary, args.json, 'error')
        after = monitor.sample()
    finally:
        monitor.close()

    parsed = nvidia_smi.parse_query_gpu(smi_out)
    for message in parsed.errors + parsed.warnings:
        print(f'nvidia-smi output: {message}')
    selected = {d['index'] for d in before}
    if conf.gpu.devices and 'all' not in [d.strip().lower()
                                          for d in conf.gpu.devices]:
        smi_devices = [d for d in parsed.devices if d['index'] in selected]
    else:
        smi_devices = parsed.devices
    rows = compare(before, after, smi_devices, migs, mig_modes)
    print(f'Agent backend {backend}: {len(before)} GPU(s), one sample '
          f'{agent_ms:.3f} ms; nvidia-smi run '
          f'{summary["nvidia_smi_ms"]:.1f} ms')
    _print_rows(rows)
    bad = [row for row in rows if not row['ok']]
    summary['fields'] = len(rows)
    summary['mismatches'] = len(bad)
    if bad or parsed.errors:
        print(f'{len(bad)} mismatch(es)')
        return _done(MISMATCH, summary, args.json, 'mismatch')
    print('All readings match')
    return _done(OK, summary, args.json, 'ok')


def _done(status, summary, as_json, verdict):
    summary['result'] = verdict
    summary['exit_status'] = status
    if as_json:
        print(json.dumps(summary, sort_keys=True))
    return status


if __name__ == '__main__':
    sys.exit(main())
