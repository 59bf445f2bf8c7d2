"""GPU monitoring: NVML first, ``nvidia-smi`` as a fallback, or nothing.

This is the only module of rapid-vmm that imports ``pynvml`` (from the
``nvidia-ml-py`` distribution), and it does so lazily in :func:`load_nvml`,
so the agent imports and runs on hosts without it.

NVML is initialised once and its device handles are cached; a reading that
fails on one field or one device is reported as None (never a made-up
zero), logged once (not every cycle), and tried again at the next sample.
A driver-class error (driver not loaded, GPU lost, unknown error...) makes
the next sample shut NVML down and initialise it again.

``gpu.backend`` picks where readings come from: ``nvml``, ``nvidia-smi``,
``none``, or ``auto`` (NVML, else nvidia-smi if the tool is there, else
nothing; while it is not on NVML, ``auto`` probes NVML again every
:data:`AUTO_REPROBE_S` seconds, so a driver that comes up late is found).

Every call into the backend (NVML's initialisation and readings, a run of
nvidia-smi) runs on a worker thread with a deadline, ``gpu.sample_timeout``
(:class:`~rapid_vmm.monitor.resources.DeadlineWorker`): an NVML call stuck
in the driver costs one report at most that long, the report goes on
without GPU figures and says why (``gpu_error``), and later reports do not
wait for it again until it returns. A cycle with nothing to read (``none``,
or ``auto`` between two probes on a host without GPU) skips the worker.
"""

from collections.abc import Callable
import logging as std_logging
import threading
import time
import types

from oslo_config import cfg
from oslo_log import log as logging

from rapid_vmm.monitor import nvidia_smi
from rapid_vmm.monitor.resources import CallTimeout
from rapid_vmm.monitor.resources import DeadlineWorker
from rapid_vmm.monitor.resources import ErrorLog
from rapid_vmm.monitor.resources import to_mib

LOG = logging.getLogger(__name__)

AUTO_REPROBE_S = 300.0
"""Seconds between two NVML probes while ``auto`` is not on NVML."""

# NVML return codes, by name, resolved on the loaded module (the values are
# NVML's and stable, the names are how pynvml spells them).
_DRIVER_ERRORS = (
    'NVML_ERROR_UNINITIALIZED', 'NVML_ERROR_DRIVER_NOT_LOADED',
    'NVML_ERROR_GPU_IS_LOST', 'NVML_ERROR_UNKNOWN',
    'NVML_ERROR_LIB_RM_VERSION_MISMATCH', 'NVML_ERROR_RESET_REQUIRED',
)
_UNSUPPORTED_ERRORS = (
    'NVML_ERROR_NOT_SUPPORTED', 'NVML_ERROR_FUNCTION_NOT_FOUND',
)
# Errors of the versioned memory call that mean "this driver has no v2".
_NO_MEMORY_V2_ERRORS = (
    'NVML_ERROR_FUNCTION_NOT_FOUND', 'NVML_ERROR_ARGUMENT_VERSION_MISMATCH',
)


class GpuBackendError(Exception):
    """A GPU backend cannot be started or read as a whole."""


def load_nvml() -> types.ModuleType:
    """Import pynvml (the one place it is imported) and return it."""
    import pynvml

    return pynvml


def _codes(nvml: types.ModuleType, names: tuple[str, ...]) -> frozenset:
    return frozenset(getattr(nvml, n) for n in names if hasattr(nvml, n))


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode('utf-8', 'replace')
    return str(value)


def empty_device(index: int, extra: bool) -> dict:
    """The report of a GPU that could not be read at all this cycle."""
    device = {
        'index': index, 'name': None, 'uuid': None,
        'utilization_percent': None, 'memory_total_mb': None,
        'memory_used_mb': None, 'mig': [],
    }
    if extra:
        device['temperature_c'] = None
        device['power_w'] = None
    return device


class _Device:
    __slots__ = ('handle', 'index', 'mig_enabled', 'name', 'uuid')

    def __init__(self, index: int, handle: object) -> None:
        self.index = index
        self.handle = handle
        self.name: str | None = None
        self.uuid: str | None = None
        self.mig_enabled: bool | None = None


class NvmlReader:
    """Reads the GPUs through NVML (the primary backend).

    :param nvml: the ``pynvml`` module, or a stand-in with the same names.
    :param errors: the :class:`ErrorLog` of the owning monitor.
    """

    name = 'nvml'

    def __init__(self, nvml: types.ModuleType, errors: ErrorLog) -> None:
        self._nvml = nvml
        self._errors = errors
        self._error_class = nvml.NVMLError
        self._driver_codes = _codes(nvml, _DRIVER_ERRORS)
        self._unsupported_codes = _codes(nvml, _UNSUPPORTED_ERRORS)
        self._no_memory_v2_codes = _codes(nvml, _NO_MEMORY_V2_ERRORS)
        self._not_found = getattr(nvml, 'NVML_ERROR_NOT_FOUND', None)
        self._mig_enable = getattr(nvml, 'NVML_DEVICE_MIG_ENABLE', 1)
        self._temperature_gpu = getattr(nvml, 'NVML_TEMPERATURE_GPU', 0)
        self._memory_v2 = getattr(nvml, 'nvmlMemory_v2', None)
        self._initialised = False
        self._restart = False
        self._count = 0
        self._devices: dict[int, _Device] = {}
        # (index, field) that NVML said it cannot read: not asked again
        # until NVML is re-initialised or the GPU's MIG mode changes.
        self._unsupported: set[tuple] = set()
        # (index, field) whose memory is read with the v1 call only.
        self._memory_v1: set[tuple] = set()
        # GPUs that gave a driver-class error this cycle.
        self._lost: set[int] = set()

    @property
    def device_count(self) -> int:
        return self._count

    def start(self) -> None:
        """Initialise NVML and count the GPUs; raise GpuBackendError."""
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except self._error_class as exc:
            raise GpuBackendError(
                f'NVML cannot be initialised: {exc}') from exc
        self._initialised = True
        try:
            self._count = int(nvml.nvmlDeviceGetCount())
        except self._error_class as exc:
            self.stop()
            raise GpuBackendError(
                f'NVML cannot count the GPUs: {exc}') from exc
        self._restart = False
        self._devices.clear()
        self._unsupported.clear()
        self._memory_v1.clear()
        self._lost.clear()

    def stop(self) -> None:
        """Shut NVML down (once per successful start)."""
        if not self._initialised:
            return
        self._initialised = False
        self._devices.clear()
        try:
            self._nvml.nvmlShutdown()
        except self._error_class as exc:
            LOG.debug('nvmlShutdown failed (ignored): %s', exc)

    close = stop

    def sample(self, selection: list[int] | None,
               extra: bool) -> list[dict]:
        """Read the selected GPUs (None: all); raise GpuBackendError."""
        if self._restart or not self._initialised:
            if self._restart:
                LOG.info('Re-initialising NVML after a driver error')
                self._restart = False
            self.stop()
            self.start()
        self._lost.clear()
        if selection is None:
            indexes = range(self._count)
        else:
            indexes = [i for i in selection if i < self._count]
        devices = [self._read(index, extra) for index in indexes]
        for index in indexes:
            if index not in self._lost:
                self._errors.recovered(
                    ('driver', index), 'GPU %d: readable again through '
                    'NVML', index)
        return devices

    # -- one GPU --------------------------------------------------------------

    def _read(self, index: int, extra: bool) -> dict:
        nvml = self._nvml
        device = self._device(index)
        if device is None:
            return empty_device(index, extra)
        handle = device.handle
        if device.name is None:
            device.name = self._text(index, 'name', nvml.nvmlDeviceGetName,
                                     handle)
        if device.uuid is None:
            device.uuid = self._text(index, 'uuid', nvml.nvmlDeviceGetUUID,
                                     handle)
        mig_enabled = self._mig_enabled(device)
        rates = self._call(index, 'utilization',
                           nvml.nvmlDeviceGetUtilizationRates, handle)
        total_mb, used_mb = self._memory(index, 'memory', handle)
        report = {
            'index': index,
            'name': device.name,
            'uuid': device.uuid,
            'utilization_percent': (None if rates is None
                                    else int(rates.gpu)),
            'memory_total_mb': total_mb,
            'memory_used_mb': used_mb,
            'mig': self._mig_instances(device) if mig_enabled else [],
        }
        if extra:
            temperature = self._call(index, 'temperature',
                                     nvml.nvmlDeviceGetTemperature, handle,
                                     self._temperature_gpu)
            milliwatts = self._call(index, 'power',
                                    nvml.nvmlDeviceGetPowerUsage, handle)
            report['temperature_c'] = (None if temperature is None
                                       else int(temperature))
            report['power_w'] = (None if milliwatts is None
                                 else round(milliwatts / 1000.0, 2))
        return report

    def _device(self, index: int) -> _Device | None:
        device = self._devices.get(index)
        if device is None:
            handle = self._call(index, 'handle',
                                self._nvml.nvmlDeviceGetHandleByIndex, index)
            if handle is None:
                return None
            device = self._devices[index] = _Device(index, handle)
        return device

    def _mig_enabled(self, device: _Device) -> bool:
        index = device.index
        mode = self._call(index, 'mig_mode', self._nvml.nvmlDeviceGetMigMode,
                          device.handle)
        if mode is None:
            # Not a MIG-capable GPU (NotSupported), or unreadable now.
            enabled = bool(device.mig_enabled) if (
                index, 'mig_mode') not in self._unsupported else False
        else:
            enabled = int(mode[0]) == self._mig_enable
        if device.mig_enabled is not None and enabled != device.mig_enabled:
            LOG.info('GPU %d: MIG mode is now %s', index,
                     'enabled' if enabled else 'disabled')
            # What NVML could not read in one mode may work in the other.
            self._unsupported = {k for k in self._unsupported
                                 if k[0] != index}
            self._errors.forget(lambda k: isinstance(k, tuple) and
                                k[:1] == (index,))
        device.mig_enabled = enabled
        return enabled

    def _mig_instances(self, device: _Device) -> list[dict]:
        nvml = self._nvml
        index = device.index
        slots = self._call(index, 'mig_count',
                           nvml.nvmlDeviceGetMaxMigDeviceCount, device.handle)
        instances = []
        for slot in range(int(slots or 0)):
            if index in self._lost:
                break
            try:
                handle = nvml.nvmlDeviceGetMigDeviceHandleByIndex(
                    device.handle, slot)
            except self._error_class as exc:
                if getattr(exc, 'value', None) != self._not_found:
                    self._failed(index, f'mig{slot}', exc)
                continue  # NotFound: an empty slot
            field = f'mig{slot}.'
            total_mb, used_mb = self._memory(index, field + 'memory', handle)
            instances.append({
                'index': slot,
                'uuid': self._text(index, field + 'uuid',
                                   nvml.nvmlDeviceGetUUID, handle),
                'name': self._text(index, field + 'name',
                                   nvml.nvmlDeviceGetName, handle),
                'gpu_instance_id': self._call(
                    index, field + 'gpu_instance_id',
                    nvml.nvmlDeviceGetGpuInstanceId, handle),
                'compute_instance_id': self._call(
                    index, field + 'compute_instance_id',
                    nvml.nvmlDeviceGetComputeInstanceId, handle),
                'memory_total_mb': total_mb,
                'memory_used_mb': used_mb,
            })
        return instances

    def _memory(self, index: int, field: str,
                handle: object) -> tuple[int | None, int | None]:
        key = (index, field)
        if index in self._lost or key in self._unsupported:
            return None, None
        if self._memory_v2 is not None and key not in self._memory_v1:
            try:
                info = self._nvml.nvmlDeviceGetMemoryInfo(
                    handle, version=self._memory_v2)
            except TypeError:
                # A pynvml too old for the version argument.
                self._no_memory_v2('this pynvml has no version argument')
            except self._error_class as exc:
                code = getattr(exc, 'value', None)
                if code in self._no_memory_v2_codes:
                    self._no_memory_v2(str(exc))
                elif code in self._unsupported_codes:
                    self._memory_v1.add(key)
                else:
                    self._failed(index, field, exc)
                    return None, None
            else:
                self._errors.recovered(key, 'GPU %d: %s readable again',
                                       index, field)
                return to_mib(info.total), to_mib(info.used)
        info = self._call(index, field, self._nvml.nvmlDeviceGetMemoryInfo,
                          handle)
        if info is None:
            return None, None
        return to_mib(info.total), to_mib(info.used)

    def _no_memory_v2(self, reason: str) -> None:
        if self._memory_v2 is not None:
            LOG.info('NVML memory information v2 is not available (%s): '
                     'using v1, whose used memory includes the memory '
                     'reserved by the driver', reason)
        self._memory_v2 = None

    # -- calls and their errors -----------------------------------------------

    def _call(self, index: int, field: str, fn: Callable, *args: object):
        key = (index, field)
        if index in self._lost or key in self._unsupported:
            return None
        try:
            value = fn(*args)
        except self._error_class as exc:
            self._failed(index, field, exc)
            return None
        self._errors.recovered(key, 'GPU %d: %s readable again', index,
                               field)
        return value

    def _text(self, index: int, field: str, fn: Callable,
              handle: object) -> str | None:
        value = self._call(index, field, fn, handle)
        return None if value is None else _text(value)

    def _failed(self, index: int, field: str, exc: Exception) -> None:
        code = getattr(exc, 'value', None)
        key = (index, field)
        if code in self._unsupported_codes:
            self._unsupported.add(key)
            self._errors.failed(
                key, str(exc), 'GPU %d: NVML cannot read %s (%s); '
                'reported as None', index, field, exc,
                level=std_logging.INFO)
        elif code in self._driver_codes:
            self._lost.add(index)
            self._restart = True
            self._errors.failed(
                ('driver', index), str(exc), 'GPU %d: NVML driver error '
                'reading %s: %s; its readings are None this cycle and NVML '
                'will be re-initialised', index, field, exc)
        else:
            self._errors.failed(
                key, str(exc), 'GPU %d: cannot read %s: %s; reported as '
                'None, retried next cycle', index, field, exc)


class GpuMonitor:
    """The host's GPUs, read through the configured backend.

    :param conf: the agent's ``ConfigOpts``; the ``[gpu]`` options are read
        at each call.
    :param nvml_loader: returns the ``pynvml`` module (tests pass a fake).
    :param clock: monotonic clock (tests pass a fake).
    :param reprobe_interval: seconds between NVML probes in ``auto`` mode
        while not on NVML.

    :meth:`sample` never raises and never takes much longer than
    ``gpu.sample_timeout``: a failed or stuck backend gives an empty list
    for that cycle and :attr:`last_error` says why.
    """

    def __init__(self, conf: cfg.ConfigOpts,
                 nvml_loader: Callable[[], types.ModuleType] = load_nvml,
                 clock: Callable[[], float] = time.monotonic,
                 reprobe_interval: float = AUTO_REPROBE_S) -> None:
        self._conf = conf
        # The [gpu] options, read at each use through this proxy (one
        # attribute lookup instead of two: the sample is a hot path).
        self._opts = conf.gpu
        self._nvml_loader = nvml_loader
        self._clock = clock
        self._reprobe_interval = reprobe_interval
        self._errors = ErrorLog(LOG)
        # Used by the callers only (under _lock), never by the worker.
        self._deadline_errors = ErrorLog(LOG)
        self._lock = threading.Lock()
        self._worker = DeadlineWorker('gpu-sample', clock)
        self._reader: NvmlReader | nvidia_smi.NvidiaSmiReader | None = None
        self._mode: str | None = None
        self._next_probe = 0.0
        # Set by the worker while it samples ...
        self._last_error: str | None = None
        # ... and what the last sample reported (set by the caller).
        self._reported_error: str | None = None
        self._selection_source: tuple | None = None
        self._selection: list[int] | None = None

    @property
    def backend(self) -> str:
        """The backend of the last sample: ``nvml``, ``nvidia-smi``, ``none``.

        Before the first sample it is chosen here (within the deadline).
        Asking again never probes and reads no option: it is cheap.
        """
        if self._mode is None:
            with self._lock:
                if self._mode is None:
                    self._bounded(self._ensure_reader)
        reader = self._reader
        return reader.name if reader is not None else 'none'

    @property
    def last_error(self) -> str | None:
        """Why the last sample reported no GPU, or None."""
        return self._reported_error

    def sample(self) -> list[dict]:
        """The selected GPUs, ordered by index. Never raises.

        Each GPU: ``index``, ``name``, ``uuid``, ``utilization_percent``
        (None where it cannot be read, e.g. in MIG mode),
        ``memory_total_mb``, ``memory_used_mb`` (MiB), ``mig`` (MIG
        instances: ``index``, ``uuid``, ``name``, ``gpu_instance_id``,
        ``compute_instance_id``, ``memory_total_mb``, ``memory_used_mb``;
        empty when MIG is off) and, with ``gpu.extra_metrics``,
        ``temperature_c`` and ``power_w``.
        """
        with self._lock:
            if self._nothing_to_read():
                return []
            result = self._bounded(self._guarded_sample)
            if result is None:
                return []
            devices, self._reported_error = result
            return devices

    def close(self) -> None:
        """Release NVML (or forget the tool). The monitor can be reused."""
        with self._lock:
            self._bounded(self._drop_reader)
            self._mode = None

    # -- the deadline ---------------------------------------------------------

    def _nothing_to_read(self) -> bool:
        """True when this cycle would not touch a backend: no worker hop."""
        mode = self._opts.backend
        if mode != self._mode:
            return False
        if mode == 'none':
            return True
        return self._reader is None and self._clock() < self._next_probe

    def _bounded(self, fn: Callable):
        """``fn()`` on the worker, within ``gpu.sample_timeout``; None (and
        the reason in :attr:`last_error`) when it did not return in time."""
        timeout = self._opts.sample_timeout
        try:
            value = self._worker.call(fn, timeout)
        except CallTimeout as exc:
            reader = self._reader
            backend = reader.name if reader is not None else 'the GPU backend'
            self._reported_error = (f'GPU readings through {backend} timed '
                                    f'out: {exc}')
            self._deadline_errors.failed(
                ('deadline',), 'stuck', 'GPU readings through %s did not '
                'return within %s s (%s): reports go on without GPU '
                'figures until the call returns', backend, timeout, exc,
                level=std_logging.ERROR)
            return None
        self._deadline_errors.recovered(
            ('deadline',), 'GPU readings return within the deadline again')
        return value

    def _guarded_sample(self) -> tuple[list[dict], str | None]:
        """One sample, on the worker: (devices, why none or None)."""
        try:
            devices = self._sample()
        except Exception as exc:  # noqa: BLE001 - logged, see below
            # A bug or a pynvml surprise must not stop the report: log it
            # once with its traceback, start over next cycle.
            self._last_error = f'unexpected error: {exc!r}'
            self._errors.failed(
                ('unexpected',), repr(exc), 'Unexpected error reading '
                'the GPUs; none reported this cycle', exc_info=True,
                level=std_logging.ERROR)
            self._drop_reader()
            devices = []
        return devices, self._last_error

    # -- internals ------------------------------------------------------------

    def _sample(self) -> list[dict]:
        reader = self._ensure_reader()
        if reader is None:
            return []
        selection = self._parse_selection()
        try:
            devices = reader.sample(selection,
                                    self._opts.extra_metrics)
        except (GpuBackendError, nvidia_smi.NvidiaSmiError) as exc:
            self._last_error = str(exc)
            self._errors.failed(
                ('backend', reader.name), str(exc), 'GPU readings through '
                '%s failed: %s; no GPU reported this cycle', reader.name,
                exc)
            return []
        self._errors.recovered(('unexpected',))
        self._errors.recovered(('backend', reader.name),
                               'GPU readings through %s work again',
                               reader.name)
        self._last_error = None
        if selection is not None:
            self._check_selection(selection, devices)
        return devices

    def _ensure_reader(self):
        mode = self._opts.backend
        if mode != self._mode:
            if self._mode is not None:
                LOG.info('GPU backend changed from %s to %s', self._mode,
                         mode)
            self._drop_reader()
            self._mode = mode
            self._next_probe = 0.0
        if mode == 'none':
            self._last_error = None
            return None
        reader = self._reader
        if reader is not None and (mode != 'auto' or reader.name == 'nvml'):
            return reader
        now = self._clock()
        if now < self._next_probe:
            return reader
        # Explicit backends retry every cycle; auto re-probes NVML slowly.
        self._next_probe = now + (self._reprobe_interval
                                  if mode == 'auto' else 0.0)
        if mode in ('auto', 'nvml'):
            nvml_reader = self._start_nvml(mode)
            if nvml_reader is not None:
                self._drop_reader()
                self._reader = nvml_reader
                return nvml_reader
            if mode == 'nvml' or reader is not None:
                return reader
        return self._start_nvidia_smi(mode)

    def _start_nvml(self, mode: str) -> NvmlReader | None:
        level = std_logging.INFO if mode == 'auto' else std_logging.ERROR
        key = ('backend', 'nvml', 'start')
        try:
            nvml = self._nvml_loader()
        except ImportError as exc:
            self._last_error = f'pynvml cannot be imported: {exc}'
            self._errors.failed(key, 'import', 'NVML unavailable: pynvml '
                                '(nvidia-ml-py) cannot be imported: %s', exc,
                                level=level)
            return None
        reader = NvmlReader(nvml, self._errors)
        try:
            reader.start()
        except GpuBackendError as exc:
            self._last_error = str(exc)
            self._errors.failed(key, str(exc), 'NVML unavailable: %s', exc,
                                level=level)
            return None
        self._errors.recovered(key)
        LOG.info('GPU monitoring through NVML: %d GPU(s)',
                 reader.device_count)
        return reader

    def _start_nvidia_smi(self, mode: str):
        reader = nvidia_smi.NvidiaSmiReader(self._conf, self._errors)
        key = ('backend', 'nvidia-smi', 'start')
        try:
            reader.start()
        except nvidia_smi.NvidiaSmiError as exc:
            if mode == 'auto':
                self._last_error = None  # no GPU here is not an error
                self._errors.failed(
                    key, str(exc), 'No GPU monitoring: NVML is unavailable '
                    'and %s; probing NVML again every %d s', exc,
                    self._reprobe_interval, level=std_logging.INFO)
            else:
                self._last_error = str(exc)
                self._errors.failed(key, str(exc), 'GPU backend '
                                    'nvidia-smi unavailable: %s', exc,
                                    level=std_logging.ERROR)
            return None
        self._errors.recovered(key)
        LOG.info('GPU monitoring through %s', reader.executable())
        self._reader = reader
        return reader

    def _drop_reader(self) -> None:
        reader, self._reader = self._reader, None
        self._next_probe = 0.0
        if reader is not None:
            reader.close()

    def _parse_selection(self) -> list[int] | None:
        source = tuple(self._opts.devices or ())
        if source == self._selection_source:
            return self._selection
        selection: list[int] | None = []
        for item in source:
            item = item.strip()
            if item.lower() == 'all':
                selection = None
                break
            try:
                value = int(item)
                if value < 0:
                    raise ValueError(item)
            except ValueError:
                LOG.error('gpu.devices: %r is not a GPU index; ignored',
                          item)
                continue
            selection.append(value)
        if not source:
            selection = None  # an empty list means the default: all
        if selection is not None:
            selection = sorted(set(selection))
        self._selection_source = source
        self._selection = selection
        return selection

    def _check_selection(self, selection: list[int],
                         devices: list[dict]) -> None:
        present = {device['index'] for device in devices}
        for index in selection:
            key = ('selection', index)
            if index in present:
                self._errors.recovered(key, 'GPU %d (gpu.devices) is '
                                       'present again', index)
            else:
                self._errors.failed(key, 'absent', 'GPU %d named in '
                                    'gpu.devices is not on this host; '
                                    'skipped', index)
