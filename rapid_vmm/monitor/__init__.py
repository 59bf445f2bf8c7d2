"""Host resource monitoring: what the VMM reports to the Directory Server.

:class:`ResourceMonitor` is the facade the manager uses: one
:meth:`~ResourceMonitor.sample` per report gives the ``resources`` dict of
SPEC section 4 (less ``vms_running``, ``vms_suspended`` and
``available_types``, which the manager adds). Everything is read
in-process (psutil, NVML); no process is spawned per sample unless
``gpu.backend`` falls back to ``nvidia-smi``.
"""

import threading
import time

from oslo_config import cfg

from rapid_vmm.monitor.gpu import GpuMonitor
from rapid_vmm.monitor.host import HostMonitor

__all__ = ['GpuMonitor', 'HostMonitor', 'ResourceMonitor', 'gpu_load_percent']


def gpu_load_percent(gpus: list[dict]) -> float | None:
    """Mean utilisation of the GPUs that have one; None if none has."""
    values = [g['utilization_percent'] for g in gpus
              if g.get('utilization_percent') is not None]
    if not values:
        return None
    return round(sum(values) / len(values), 1)


class ResourceMonitor:
    """Samples the host's CPU, memory, disk and GPUs for the reports.

    :param conf: the agent's ``ConfigOpts`` (options read at each sample).
    :param host: a :class:`HostMonitor` (default: a new one).
    :param gpu: a :class:`GpuMonitor` (default: a new one).

    :meth:`sample` is cheap (tens of microseconds plus one NVML query per
    GPU), never raises and returns only JSON-serialisable values.
    """

    def __init__(self, conf: cfg.ConfigOpts,
                 host: HostMonitor | None = None,
                 gpu: GpuMonitor | None = None) -> None:
        self._conf = conf
        self._gpu_opts = conf.gpu  # [gpu], read at each sample
        self.host = host if host is not None else HostMonitor(conf)
        self.gpu = gpu if gpu is not None else GpuMonitor(conf)
        self._lock = threading.Lock()

    def sample(self) -> dict:
        """The ``resources`` of one report.

        SPEC keys: ``cpu_load_percent``, ``cpu_count``,
        ``memory_total_mb``, ``memory_free_mb``, ``disk_total_gb``,
        ``disk_free_gb``, ``gpu_load_percent``, ``gpu_cores``, ``gpus``.
        Extra keys: ``cpu_load_window_s``, ``load_average``,
        ``filesystems``, ``gpu_backend``, ``gpu_error``, ``sampled_at``
        (seconds since the epoch). See :meth:`HostMonitor.sample` and
        :meth:`GpuMonitor.sample` for the details of each.
        """
        with self._lock:
            sampled_at = round(time.time(), 3)
            resources = self.host.sample()
            gpus = self.gpu.sample()
            gpu = self.gpu
            resources['gpu_load_percent'] = (gpu_load_percent(gpus) if gpus
                                             else None)
            resources['gpu_cores'] = self._gpu_opts.total_cores
            resources['gpus'] = gpus
            resources['gpu_backend'] = gpu.backend
            resources['gpu_error'] = gpu.last_error
            resources['sampled_at'] = sampled_at
        return resources

    def close(self) -> None:
        """Release NVML. The monitor can still be sampled afterwards."""
        self.gpu.close()
