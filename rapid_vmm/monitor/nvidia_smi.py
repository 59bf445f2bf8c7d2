"""The ``nvidia-smi`` fallback of the GPU monitor.

Used only when NVML cannot be (``gpu.backend = auto``) or when configured
(``gpu.backend = nvidia-smi``). One run per sample, as an argument list
(never a shell), in its own process group, bounded by
``gpu.nvidia_smi_timeout``. Its CSV is parsed strictly by
:func:`parse_query_gpu`, a pure function: a line that does not have exactly
the queried fields with the expected types is rejected (the device is
skipped and the reason reported), ``[N/A]`` / ``[Not Supported]`` become
None, never a made-up zero.

This backend cannot see MIG instances: ``mig`` is always an empty list here.
"""

import os
import re
import shutil
import signal
import subprocess
from typing import NamedTuple

from oslo_config import cfg
from oslo_log import log as logging

from rapid_vmm.monitor.resources import ErrorLog

LOG = logging.getLogger(__name__)

QUERY_FIELDS = (
    'index', 'name', 'uuid', 'utilization.gpu', 'memory.total',
    'memory.used', 'temperature.gpu', 'power.draw',
)
"""Fields asked of ``nvidia-smi --query-gpu``, in output order."""

# Values nvidia-smi prints where it has no reading. Any other bracketed
# value (``[Unknown Error]``, ``[GPU is lost]``...) is also None, but is
# reported as a warning because it means something is wrong.
NOT_AVAILABLE = frozenset({'[N/A]', '[Not Supported]', 'N/A'})

_UUID_RE = re.compile(
    r'^GPU-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-'
    r'[0-9a-fA-F]{12}$')
_INT_RE = re.compile(r'^[0-9]+$')
_FLOAT_RE = re.compile(r'^[0-9]+(\.[0-9]+)?$')

# Seconds to wait for a killed nvidia-smi to go away before giving up on
# it (a process stuck in the driver cannot die until the driver lets go).
_KILL_WAIT_S = 2.0
# Longest line quoted in an error message.
_QUOTE_MAX = 120


class NvidiaSmiError(Exception):
    """nvidia-smi could not be run, or gave nothing usable."""


class ParseResult(NamedTuple):
    """What :func:`parse_query_gpu` made of nvidia-smi's output.

    ``devices``: one dict per accepted line, in output order. ``errors``:
    one message per rejected line (that device is skipped). ``warnings``:
    one message per field that nvidia-smi reported as an error (the device
    is kept, that field is None).
    """

    devices: list[dict]
    errors: list[str]
    warnings: list[str]


def build_command(path: str) -> list[str]:
    """Argument list of one nvidia-smi query (run without a shell)."""
    return [path, '--query-gpu=' + ','.join(QUERY_FIELDS),
            '--format=csv,noheader,nounits']


class _BadField(ValueError):
    pass


def _quote(text: str) -> str:
    if len(text) > _QUOTE_MAX:
        text = text[:_QUOTE_MAX] + '...'
    return repr(text)


def _number(raw: str, field: str, pattern: re.Pattern, convert,
            warnings: list[str], where: str):
    if raw in NOT_AVAILABLE:
        return None
    if raw.startswith('[') and raw.endswith(']'):
        warnings.append(f'{where}: {field} is {raw}')
        return None
    if not pattern.match(raw):
        raise _BadField(f'{field} is not a number: {_quote(raw)}')
    return convert(raw)


def _parse_line(line: str, where: str, warnings: list[str]) -> dict:
    fields = [f.strip() for f in line.split(',')]
    if len(fields) != len(QUERY_FIELDS):
        raise _BadField(
            f'expected {len(QUERY_FIELDS)} fields, got {len(fields)}')
    index, name, uuid, util, total, used, temp, power = fields
    if not _INT_RE.match(index):
        raise _BadField(f'index is not an integer: {_quote(index)}')
    if not name or name.startswith('['):
        raise _BadField(f'no usable name: {_quote(name)}')
    if not _UUID_RE.match(uuid):
        raise _BadField(f'uuid is not a GPU UUID: {_quote(uuid)}')
    where = f'{where} (GPU {index})'
    utilization = _number(util, 'utilization.gpu', _INT_RE, int,
                          warnings, where)
    if utilization is not None and utilization > 100:
        raise _BadField(f'utilization.gpu out of range: {utilization}')
    return {
        'index': int(index),
        'name': name,
        'uuid': uuid,
        'utilization_percent': utilization,
        'memory_total_mb': _number(total, 'memory.total', _INT_RE, int,
                                   warnings, where),
        'memory_used_mb': _number(used, 'memory.used', _INT_RE, int,
                                  warnings, where),
        'mig': [],
        'temperature_c': _number(temp, 'temperature.gpu', _INT_RE, int,
                                 warnings, where),
        'power_w': _number(power, 'power.draw', _FLOAT_RE,
                           lambda v: round(float(v), 2), warnings, where),
    }


def parse_query_gpu(text: str) -> ParseResult:
    """Parse the output of :func:`build_command`'s query.

    Pure: no logging, no I/O. Blank lines are ignored; every other line
    must be one GPU with exactly the fields of :data:`QUERY_FIELDS`
    (integers where nvidia-smi prints integers, MiB for memory, watts for
    power). A repeated index keeps the first line.
    """
    devices: list[dict] = []
    errors: list[str] = []
    warnings: list[str] = []
    seen: set[int] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f'line {number}'
        try:
            device = _parse_line(line, where, warnings)
        except _BadField as exc:
            errors.append(f'{where}: {exc}: {_quote(line.strip())}')
            continue
        if device['index'] in seen:
            errors.append(f"{where}: GPU {device['index']} listed twice")
            continue
        seen.add(device['index'])
        devices.append(device)
    return ParseResult(devices, errors, warnings)


class NvidiaSmiReader:
    """Reads the GPUs by running ``nvidia-smi`` (the fallback backend).

    :param conf: the agent's ``ConfigOpts`` (``[gpu]`` options are read at
        each sample).
    :param errors: the :class:`ErrorLog` of the owning monitor.
    :param popen: ``subprocess.Popen`` or a stand-in (tests).
    """

    name = 'nvidia-smi'

    def __init__(self, conf: cfg.ConfigOpts, errors: ErrorLog,
                 popen=subprocess.Popen) -> None:
        self._conf = conf
        self._errors = errors
        self._popen = popen
        # Killed runs that did not exit yet (stuck in the driver): no new
        # run is started while one is there, so they cannot pile up.
        self._stuck: list = []

    def executable(self) -> str | None:
        """Full path of the configured nvidia-smi, or None if not found."""
        return shutil.which(self._conf.gpu.nvidia_smi_path)

    def start(self) -> None:
        """Check that the tool is there; raise NvidiaSmiError if not."""
        if self.executable() is None:
            raise NvidiaSmiError(self._not_found())

    def sample(self, selection: list[int] | None,
               extra: bool) -> list[dict]:
        """One run of nvidia-smi: the selected GPUs (None: all).

        Raises NvidiaSmiError when the run fails and gives no usable line.
        """
        path = self.executable()
        if path is None:
            raise NvidiaSmiError(self._not_found())
        out, err, returncode = self._run(build_command(path),
                                         self._conf.gpu.nvidia_smi_timeout)
        result = parse_query_gpu(out)
        self._report(result, returncode, out, err)
        if not result.devices and (returncode != 0 or result.errors):
            raise NvidiaSmiError(
                f'nvidia-smi gave no usable GPU line (exit status '
                f'{returncode}): {_first_line(err) or _first_line(out)}')
        devices = result.devices
        if selection is not None:
            wanted = set(selection)
            devices = [d for d in devices if d['index'] in wanted]
        if not extra:
            for device in devices:
                del device['temperature_c']
                del device['power_w']
        return devices

    def close(self) -> None:
        self._reap()

    # -- internals ------------------------------------------------------------

    def _not_found(self) -> str:
        return (f'{self._conf.gpu.nvidia_smi_path} not found or not '
                f'executable')

    def _report(self, result: ParseResult, returncode: int, out: str,
                err: str) -> None:
        for kind, messages in (('rejected', result.errors),
                               ('field', result.warnings)):
            key = ('nvidia-smi', kind)
            if messages:
                self._errors.failed(
                    key, '; '.join(messages),
                    'nvidia-smi output: %s', '; '.join(messages))
            else:
                self._errors.recovered(
                    key, 'nvidia-smi output is clean again (%s lines)', kind)
        key = ('nvidia-smi', 'status')
        if returncode != 0 and result.devices:
            self._errors.failed(
                key, str(returncode),
                'nvidia-smi exited with status %d but listed %d GPU(s); '
                'using them: %s', returncode, len(result.devices),
                _first_line(err) or '(no message)')
        else:
            self._errors.recovered(key)

    def _run(self, argv: list[str], timeout: float) -> tuple[str, str, int]:
        self._reap()
        if self._stuck:
            raise NvidiaSmiError(
                f'a killed nvidia-smi (pid {self._stuck[0].pid}) has not '
                f'exited yet: the driver may be hung; not starting another')
        try:
            proc = self._popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, encoding='utf-8', errors='replace',
                close_fds=True, start_new_session=True)
        except OSError as exc:
            raise NvidiaSmiError(f'cannot run {argv[0]}: {exc}') from exc
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            raise NvidiaSmiError(
                f'{argv[0]} did not answer within {timeout} s; killed'
            ) from None
        return out or '', err or '', proc.returncode

    def _kill(self, proc) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except OSError as exc:
            LOG.warning('Cannot kill nvidia-smi (pid %d): %s', proc.pid, exc)
        try:
            proc.communicate(timeout=_KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            LOG.error('nvidia-smi (pid %d) did not exit after SIGKILL: it '
                      'is probably stuck in the NVIDIA driver; no new run '
                      'until it exits', proc.pid)
            self._stuck.append(proc)

    def _reap(self) -> None:
        for proc in list(self._stuck):
            if proc.poll() is not None:
                self._stuck.remove(proc)
                LOG.info('Stuck nvidia-smi (pid %d) has exited', proc.pid)


def _first_line(text: str) -> str:
    for line in (text or '').splitlines():
        if line.strip():
            return _quote(line.strip())
    return ''
