"""Host CPU, memory, disk and load, sampled in-process with psutil.

No process is spawned and nothing sleeps.

CPU load: the busy share of :func:`psutil.cpu_times` between two samples,
computed as :func:`psutil.cpu_percent` does, but with the monitor's own
baseline (psutil keeps one per calling thread: a query from an RPC worker
between two reports would otherwise measure from that worker's last call)
and a minimum window, so that a query between two reports does not report
noise.

Memory "free" is :func:`psutil.virtual_memory`'s ``available`` (what can
be given to new VMs without swapping: ``MemAvailable``), not ``free``
(``MemFree``, which ignores reclaimable page cache).

Disk: :func:`psutil.disk_usage` of the filesystems holding ``data_path``
and the instance disks (``libvirt.images_path``, by default
``<data_path>/instances``), once each when both are on one filesystem.
``disk_total_gb``/``disk_free_gb`` are those of the instance-disk
filesystem: that is the space VMs consume (the state database in
``data_path`` is tiny), so it is what decides whether a VM type still
fits. Free space is what an unprivileged writer (qemu) can use, without
the blocks reserved for root. A path that does not exist yet is measured
on the filesystem of its nearest existing parent, where it will be
created. Which filesystem holds which path (and the paths themselves), and
the CPU count, are worked out again every :data:`LAYOUT_REFRESH_S` seconds
(a later mount is seen then); the sizes are read at every sample.

Load average: :func:`os.getloadavg` (what :func:`psutil.getloadavg` is on
Linux).
"""

import os
import threading
import time

from oslo_config import cfg
from oslo_log import log as logging
import psutil

from rapid_vmm.monitor.resources import ErrorLog
from rapid_vmm.monitor.resources import to_gib
from rapid_vmm.monitor.resources import to_mib

LOG = logging.getLogger(__name__)

MIN_CPU_WINDOW_S = 1.0
"""Shortest window over which the CPU load is measured; a sample taken
sooner after the previous one repeats the previous measurement."""

LAYOUT_REFRESH_S = 60.0
"""Seconds between two look-ups of which filesystem holds which path, and
of the number of CPUs."""


def images_path(conf: cfg.ConfigOpts) -> str:
    """Directory of the instance disks (``libvirt.images_path``)."""
    return (conf.libvirt.images_path or
            os.path.join(conf.data_path, 'instances'))


def cpu_busy_total(times) -> tuple[float, float]:
    """(busy, total) seconds of a :func:`psutil.cpu_times` result.

    As psutil counts them on Linux: guest time is already in user/nice, so
    it is left out of the total; idle and iowait are not busy.
    """
    total = sum(times)
    try:  # Linux: guest and guest_nice are already in user and nice
        total -= times.guest + times.guest_nice
    except AttributeError:
        total -= getattr(times, 'guest', 0.0)
    busy = total - times.idle - getattr(times, 'iowait', 0.0)
    return busy, total


def cpu_busy_percent(before, after) -> float | None:
    """Busy % of all CPUs between two CPU times; None if no time passed."""
    return _busy_percent(cpu_busy_total(before), cpu_busy_total(after))


def _busy_percent(before: tuple[float, float],
                  after: tuple[float, float]) -> float | None:
    busy0, total0 = before
    busy1, total1 = after
    elapsed = total1 - total0
    if elapsed <= 0:
        return None
    percent = (busy1 - busy0) / elapsed * 100.0
    return round(min(100.0, max(0.0, percent)), 1)


def _nearest_existing(path: str) -> str:
    """The path, or its nearest existing parent."""
    current = path
    while True:
        try:
            os.stat(current)
            return current
        except (FileNotFoundError, NotADirectoryError):
            parent = os.path.dirname(current)
            if parent == current:
                raise
            current = parent


def _mount_point(path: str) -> str:
    current = os.path.realpath(path)
    device = os.stat(current).st_dev
    while current != os.path.dirname(current):
        parent = os.path.dirname(current)
        if os.stat(parent).st_dev != device:
            break
        current = parent
    return current


class _Filesystem:
    __slots__ = ('measured_path', 'mount_point', 'paths', 'roles')

    def __init__(self, measured_path, mount_point):
        self.measured_path = measured_path  # None: cannot be measured
        self.mount_point = mount_point
        self.roles: list[str] = []
        self.paths: list[str] = []


class HostMonitor:
    """Samples the host's CPU, memory, disk and load average.

    :param conf: the agent's ``ConfigOpts``; ``data_path`` and
        ``libvirt.images_path`` are read with the filesystem layout (at the
        first sample, then every :data:`LAYOUT_REFRESH_S` seconds).
    :param min_cpu_window: see :data:`MIN_CPU_WINDOW_S`.
    :param clock: monotonic clock (tests pass a fake).

    The CPU counters are primed at construction, so the first sample
    already measures a real window. If it comes less than
    ``min_cpu_window`` after construction, it reports the average since
    boot instead (``cpu_load_window_s`` then is the uptime). Thread-safe.
    """

    def __init__(self, conf: cfg.ConfigOpts,
                 min_cpu_window: float = MIN_CPU_WINDOW_S,
                 clock=time.monotonic) -> None:
        self._conf = conf
        self._min_cpu_window = min_cpu_window
        self._clock = clock
        self._errors = ErrorLog(LOG)
        self._lock = threading.Lock()
        try:
            base = psutil.cpu_times()
        except OSError as exc:
            LOG.warning('Cannot read the CPU times: %s', exc)
            base = None
        # (time, busy and total CPU seconds) of the window's start.
        self._cpu_base = (clock(), None if base is None
                          else cpu_busy_total(base))
        self._cpu_last: tuple[float, float] | None = None
        self._boot_time: float | None = None
        self._cpu_count: int | None = None
        self._layout: list[_Filesystem] = []
        self._layout_expires = -float('inf')

    def sample(self) -> dict:
        """One sample of the host. Never raises; unreadable values: None.

        Keys: ``cpu_load_percent`` (0-100, all CPUs), ``cpu_load_window_s``
        (seconds it was measured over), ``cpu_count`` (logical CPUs),
        ``memory_total_mb``, ``memory_free_mb`` (available, MiB),
        ``disk_total_gb``, ``disk_free_gb`` (GiB, instance-disk
        filesystem), ``filesystems`` (list, instance disks first:
        ``mount_point``, ``roles`` (``images``, ``data``), ``paths``,
        ``total_gb``, ``free_gb``) and ``load_average`` ([1, 5, 15]
        minutes).
        """
        with self._lock:
            now = self._clock()
            cpu_percent, window = self._cpu_load(now)
            memory_total, memory_free = self._memory()
            filesystems = self._filesystems(now)
            cpu_count = self._cpu_count
        images = filesystems[0]
        return {
            'cpu_load_percent': cpu_percent,
            'cpu_load_window_s': window,
            'cpu_count': cpu_count,
            'memory_total_mb': memory_total,
            'memory_free_mb': memory_free,
            'disk_total_gb': images['total_gb'],
            'disk_free_gb': images['free_gb'],
            'filesystems': filesystems,
            'load_average': self._load_average(),
        }

    # -- CPU -----------------------------------------------------------------

    def _cpu_load(self, now: float) -> tuple[float | None, float | None]:
        base_time, base_times = self._cpu_base
        elapsed = now - base_time
        if elapsed < self._min_cpu_window and self._cpu_last is not None:
            return self._cpu_last
        try:
            times = psutil.cpu_times()
        except OSError as exc:
            self._errors.failed('cpu', str(exc), 'Cannot read the CPU '
                                'times: %s; CPU load reported as None', exc)
            return None, None
        if self._errors.any_failing:
            self._errors.recovered('cpu', 'CPU times readable again')
        counters = cpu_busy_total(times)
        percent = None
        if base_times is None:
            self._cpu_base = (now, counters)
        elif elapsed >= self._min_cpu_window:
            percent = _busy_percent(base_times, counters)
        if percent is None:
            if self._cpu_last is not None:
                return self._cpu_last
            # No window yet: the average since boot is a real figure.
            busy, total = counters
            percent = round(100.0 * busy / total, 1) if total > 0 else None
            return percent, self._uptime()
        self._cpu_base = (now, counters)
        self._cpu_last = (percent, round(elapsed, 3))
        return self._cpu_last

    def _uptime(self) -> float | None:
        try:
            if self._boot_time is None:
                self._boot_time = psutil.boot_time()
        except OSError as exc:
            LOG.debug('Cannot read the boot time: %s', exc)
            return None
        return round(time.time() - self._boot_time, 3)

    # -- memory, load --------------------------------------------------------

    def _memory(self) -> tuple[int | None, int | None]:
        try:
            memory = psutil.virtual_memory()
        except OSError as exc:
            self._errors.failed('memory', str(exc), 'Cannot read the '
                                'memory use: %s; reported as None', exc)
            return None, None
        if self._errors.any_failing:
            self._errors.recovered('memory', 'Memory use readable again')
        return to_mib(memory.total), to_mib(memory.available)

    def _load_average(self) -> list[float] | None:
        try:
            one, five, fifteen = os.getloadavg()
        except OSError as exc:
            LOG.debug('No load average: %s', exc)
            return None
        return [round(one, 2), round(five, 2), round(fifteen, 2)]

    # -- disk ----------------------------------------------------------------

    def _filesystems(self, now: float) -> list[dict]:
        """Filesystems of the instance disks (first) and of data_path."""
        if now >= self._layout_expires:
            # The CPU count is as static as the mounts: looked up with them.
            self._cpu_count = psutil.cpu_count(logical=True)
            self._layout = self._resolve_layout()
            self._layout_expires = now + LAYOUT_REFRESH_S
        entries = []
        for filesystem in self._layout:
            total = free = None
            if filesystem.measured_path is not None:
                try:
                    usage = psutil.disk_usage(filesystem.measured_path)
                except OSError as exc:
                    # Look again at the next sample.
                    self._layout_expires = -float('inf')
                    self._errors.failed(
                        ('disk', filesystem.mount_point), str(exc),
                        'Cannot measure the filesystem of %s: %s; reported '
                        'as None', ', '.join(filesystem.paths), exc)
                else:
                    if self._errors.any_failing and self._errors.is_failing(
                            ('disk', filesystem.mount_point)):
                        self._errors.recovered(
                            ('disk', filesystem.mount_point),
                            'Filesystem of %s measurable again',
                            ', '.join(filesystem.paths))
                    total = to_gib(usage.total)
                    free = to_gib(usage.free)
            # roles and paths change only with the layout: each sample
            # shares them (read-only for the callers).
            entries.append({
                'mount_point': filesystem.mount_point,
                'roles': filesystem.roles,
                'paths': filesystem.paths,
                'total_gb': total,
                'free_gb': free,
            })
        return entries

    def _resolve_layout(self) -> list[_Filesystem]:
        paths = (('images', os.path.abspath(images_path(self._conf))),
                 ('data', os.path.abspath(self._conf.data_path)))
        layout: list[_Filesystem] = []
        by_device: dict[int, _Filesystem] = {}
        for role, path in paths:
            try:
                existing = _nearest_existing(path)
                device = os.stat(existing).st_dev
                filesystem = by_device.get(device)
                if filesystem is None:
                    filesystem = _Filesystem(existing,
                                             _mount_point(existing))
                    by_device[device] = filesystem
                    layout.append(filesystem)
            except OSError as exc:
                self._errors.failed(
                    ('disk', role), str(exc), 'Cannot find the filesystem '
                    'of %s (%s): %s; reported as None', path, role, exc)
                filesystem = _Filesystem(None, None)
                layout.append(filesystem)
            else:
                self._errors.recovered(('disk', role), 'Filesystem of %s '
                                       'found again', path)
            filesystem.roles.append(role)
            filesystem.paths.append(path)
        return layout
