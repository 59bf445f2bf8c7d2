"""A stand-in for the ``pynvml`` module, stubbed call by call.

It has the names rapid_vmm.monitor.gpu uses, with pynvml's signatures and
NVML's error codes, and behaves like NVML where it matters to the monitor:
calls before ``nvmlInit`` fail with Uninitialized, handles from before a
re-initialisation are refused, MIG-enabled GPUs do not report utilisation,
empty MIG slots give NotFound. Every call is recorded in ``calls``, and any
call can be made to fail (:meth:`FakeGpu.fail`, :meth:`FakeNvml.fail`).
"""

import itertools

MIB = 1024 * 1024

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
NVML_ERROR_UNKNOWN = 999

_STRINGS = {
    NVML_ERROR_UNINITIALIZED: 'Uninitialized',
    NVML_ERROR_INVALID_ARGUMENT: 'Invalid Argument',
    NVML_ERROR_NOT_SUPPORTED: 'Not Supported',
    NVML_ERROR_NO_PERMISSION: 'Insufficient Permissions',
    NVML_ERROR_NOT_FOUND: 'Not Found',
    NVML_ERROR_DRIVER_NOT_LOADED: 'Driver Not Loaded',
    NVML_ERROR_TIMEOUT: 'Timeout',
    NVML_ERROR_LIBRARY_NOT_FOUND: 'NVML Shared Library Not Found',
    NVML_ERROR_FUNCTION_NOT_FOUND: 'Function Not Found',
    NVML_ERROR_GPU_IS_LOST: 'GPU is lost',
    NVML_ERROR_RESET_REQUIRED: 'GPU requires restart',
    NVML_ERROR_UNKNOWN: 'Unknown Error',
}


class NVMLError(Exception):
    """Like pynvml's: carries the NVML return code in ``value``."""

    def __init__(self, value):
        super().__init__(value)
        self.value = value

    def __str__(self):
        return _STRINGS.get(self.value, f'NVML Error with code {self.value}')


class Utilization:
    def __init__(self, gpu, memory):
        self.gpu = gpu
        self.memory = memory


class Memory:
    def __init__(self, total, free, used, reserved=None):
        self.total = total
        self.free = free
        self.used = used
        if reserved is not None:
            self.reserved = reserved
            self.version = 0x02000028


class FakeMig:
    """One MIG device (a compute instance of a GPU instance)."""

    def __init__(self, slot, gpu_instance_id, compute_instance_id,
                 total_mb, used_mb, profile='1g.10gb'):
        self.slot = slot
        self.gpu_instance_id = gpu_instance_id
        self.compute_instance_id = compute_instance_id
        self.total_mb = total_mb
        self.used_mb = used_mb
        self.profile = profile
        self.uuid = (f'MIG-{gpu_instance_id:08x}-0000-4000-8000-'
                     f'{compute_instance_id:012x}')
        self.parent = None


class FakeGpu:
    """One GPU and the readings NVML gives for it."""

    def __init__(self, index, name='NVIDIA H100 80GB HBM3', uuid=None,
                 utilization=37, memory_utilization=12, total_mb=81559,
                 used_mb=1024, reserved_mb=523, temperature=34,
                 power_mw=69550, mig_mode=None, migs=(), max_migs=7):
        self.index = index
        self.name = name
        self.uuid = uuid or (f'GPU-{index:08x}-1111-2222-3333-'
                             f'{index:012x}')
        self.utilization = utilization
        self.memory_utilization = memory_utilization
        self.total_mb = total_mb
        self.used_mb = used_mb
        self.reserved_mb = reserved_mb
        self.temperature = temperature
        self.power_mw = power_mw
        # None: not a MIG-capable GPU (GetMigMode says NotSupported).
        self.mig_mode = mig_mode
        self.migs = {m.slot: m for m in migs}
        for mig in migs:
            mig.parent = self
        self.max_migs = max_migs
        self._failures = {}

    def fail(self, function, code, times=None):
        """Make ``function`` fail with ``code`` (``times`` calls, or all)."""
        self._failures[function] = [code, times]

    def heal(self, function=None):
        if function is None:
            self._failures.clear()
        else:
            self._failures.pop(function, None)

    def check(self, function):
        failure = self._failures.get(function)
        if failure is None:
            return
        code, times = failure
        if times is not None:
            failure[1] -= 1
            if failure[1] <= 0:
                del self._failures[function]
        raise NVMLError(code)


class Handle:
    _ids = itertools.count()

    def __init__(self, gpu, generation, mig=None):
        self.gpu = gpu
        self.generation = generation
        self.mig = mig
        self.id = next(self._ids)

    def __repr__(self):
        return f'<Handle gpu={self.gpu.index} gen={self.generation}>'


class FakeNvml:
    """The fake ``pynvml`` module."""

    NVMLError = NVMLError
    NVML_DEVICE_MIG_DISABLE = 0
    NVML_DEVICE_MIG_ENABLE = 1
    NVML_TEMPERATURE_GPU = 0
    nvmlMemory_v2 = 0x02000028

    def __init__(self, gpus=(), memory_v2=True, init_errors=()):
        self.gpus = list(gpus)
        self.memory_v2 = memory_v2
        # Codes raised by the next nvmlInit calls, one each, in order.
        self.init_errors = list(init_errors)
        self.calls = []
        self.refcount = 0
        self.generation = 0
        self._failures = {}

    # error codes, as module attributes like pynvml's
    NVML_ERROR_UNINITIALIZED = NVML_ERROR_UNINITIALIZED
    NVML_ERROR_INVALID_ARGUMENT = NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION
    NVML_ERROR_NOT_FOUND = NVML_ERROR_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_TIMEOUT = NVML_ERROR_TIMEOUT
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_FUNCTION_NOT_FOUND = NVML_ERROR_FUNCTION_NOT_FOUND
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_RESET_REQUIRED = NVML_ERROR_RESET_REQUIRED
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = NVML_ERROR_LIB_RM_VERSION_MISMATCH
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = (
        NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
    NVML_ERROR_UNKNOWN = NVML_ERROR_UNKNOWN

    # -- test helpers ---------------------------------------------------------

    def fail(self, function, code, times=None):
        """Make ``function`` fail for every GPU (``times`` calls, or all)."""
        self._failures[function] = [code, times]

    def heal(self):
        self._failures.clear()

    def count(self, function):
        return sum(1 for name, _ in self.calls if name == function)

    def args_of(self, function):
        return [args for name, args in self.calls if name == function]

    def _enter(self, function, *args, initialised=True):
        self.calls.append((function, args))
        failure = self._failures.get(function)
        if failure is not None:
            code, times = failure
            if times is not None:
                failure[1] -= 1
                if failure[1] <= 0:
                    del self._failures[function]
            raise NVMLError(code)
        if initialised and self.refcount <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def _gpu(self, function, handle, mig_ok=False):
        if not isinstance(handle, Handle):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if handle.generation != self.generation:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)  # stale handle
        if handle.mig is not None and not mig_ok:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        handle.gpu.check(function)
        return handle.gpu

    # -- pynvml API -----------------------------------------------------------

    def nvmlInit(self):
        self._enter('nvmlInit', initialised=False)
        if self.init_errors:
            raise NVMLError(self.init_errors.pop(0))
        self.refcount += 1
        self.generation += 1

    def nvmlShutdown(self):
        self._enter('nvmlShutdown')
        self.refcount -= 1

    def nvmlDeviceGetCount(self):
        self._enter('nvmlDeviceGetCount')
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        self._enter('nvmlDeviceGetHandleByIndex', index)
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[index]
        gpu.check('nvmlDeviceGetHandleByIndex')
        return Handle(gpu, self.generation)

    def nvmlDeviceGetName(self, handle):
        self._enter('nvmlDeviceGetName', handle)
        gpu = self._gpu('nvmlDeviceGetName', handle, mig_ok=True)
        if handle.mig is not None:
            return f'{gpu.name} MIG {handle.mig.profile}'
        return gpu.name

    def nvmlDeviceGetUUID(self, handle):
        self._enter('nvmlDeviceGetUUID', handle)
        gpu = self._gpu('nvmlDeviceGetUUID', handle, mig_ok=True)
        return handle.mig.uuid if handle.mig is not None else gpu.uuid

    def nvmlDeviceGetUtilizationRates(self, handle):
        self._enter('nvmlDeviceGetUtilizationRates', handle)
        gpu = self._gpu('nvmlDeviceGetUtilizationRates', handle)
        if gpu.mig_mode == 1:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return Utilization(gpu.utilization, gpu.memory_utilization)

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        self._enter('nvmlDeviceGetMemoryInfo', handle, version)
        gpu = self._gpu('nvmlDeviceGetMemoryInfo', handle, mig_ok=True)
        if version is not None:
            if not self.memory_v2:
                raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
            if version != self.nvmlMemory_v2:
                raise NVMLError(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        if handle.mig is not None:
            total, used, reserved = (handle.mig.total_mb, handle.mig.used_mb,
                                     0)
        else:
            total, used, reserved = gpu.total_mb, gpu.used_mb, gpu.reserved_mb
        if version is None:
            # v1: what the driver reserves counts as used.
            return Memory(total * MIB, (total - used - reserved) * MIB,
                          (used + reserved) * MIB)
        return Memory(total * MIB, (total - used - reserved) * MIB,
                      used * MIB, reserved * MIB)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        self._enter('nvmlDeviceGetTemperature', handle, sensor)
        gpu = self._gpu('nvmlDeviceGetTemperature', handle)
        if sensor != self.NVML_TEMPERATURE_GPU:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature

    def nvmlDeviceGetPowerUsage(self, handle):
        self._enter('nvmlDeviceGetPowerUsage', handle)
        gpu = self._gpu('nvmlDeviceGetPowerUsage', handle)
        return gpu.power_mw

    def nvmlDeviceGetMigMode(self, handle):
        self._enter('nvmlDeviceGetMigMode', handle)
        gpu = self._gpu('nvmlDeviceGetMigMode', handle)
        if gpu.mig_mode is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return [gpu.mig_mode, gpu.mig_mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle):
        self._enter('nvmlDeviceGetMaxMigDeviceCount', handle)
        gpu = self._gpu('nvmlDeviceGetMaxMigDeviceCount', handle)
        if gpu.mig_mode is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.max_migs

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle, index):
        self._enter('nvmlDeviceGetMigDeviceHandleByIndex', handle, index)
        gpu = self._gpu('nvmlDeviceGetMigDeviceHandleByIndex', handle)
        if gpu.mig_mode != 1 or not 0 <= index < gpu.max_migs:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        mig = gpu.migs.get(index)
        if mig is None:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return Handle(gpu, self.generation, mig=mig)

    def nvmlDeviceGetGpuInstanceId(self, handle):
        self._enter('nvmlDeviceGetGpuInstanceId', handle)
        self._gpu('nvmlDeviceGetGpuInstanceId', handle, mig_ok=True)
        if handle.mig is None:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return handle.mig.gpu_instance_id

    def nvmlDeviceGetComputeInstanceId(self, handle):
        self._enter('nvmlDeviceGetComputeInstanceId', handle)
        self._gpu('nvmlDeviceGetComputeInstanceId', handle, mig_ok=True)
        if handle.mig is None:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return handle.mig.compute_instance_id
