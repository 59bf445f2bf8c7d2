"""Prometheus metrics of the agent (``[metrics]``, off by default).

An HTTP endpoint serves, in the Prometheus text format (prometheus-client,
a custom collector on a registry of its own), the figures the Directory
Server gets: the host part of ``get_host_status()['resources']`` and the
per-VM ``get_vm_usage`` results, plus the VM records. Names follow the
Prometheus conventions: prefix ``rapid_vmm_``, base units in the name
(``_bytes``, ``_percent``, ``_celsius``, ``_watts``; MiB and GiB of the API
are converted to bytes), labels ``user_id``, ``vm`` (the domain or server
name) and ``gpu`` (its index). A figure the agent does not know (None) is
left out rather than exported as 0.

Bounded: every scrape reads the figures in worker threads for at most
``[metrics] scrape_timeout`` seconds, and a reading still running (a stuck
hypervisor) is waited for, never started again; what did not come is
reported by ``rapid_vmm_scrape_collector_success{collector=...} 0``. The
HTTP server handles at most ``max_connections`` requests at once (more are
refused with 503) and drops a connection idle for 10 s.

Usage (the service)::

    server = metrics.start(conf, host_status=lambda: manager.get_host_status(
        {}), vm_usage=lambda r: manager.get_vm_usage({}, resource=r))
    ...
    server.stop()
"""

from collections.abc import Callable
from concurrent import futures
import http.server
import socket
import threading
import time
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging
from prometheus_client import core
from prometheus_client import exposition
from prometheus_client import registry as prom_registry

from rapid_vmm import exception

LOG = logging.getLogger(__name__)

PREFIX = 'rapid_vmm'
MiB = 1024 ** 2
GiB = 1024 ** 3
RESOURCES = ('cpu', 'memory', 'disk')
#: Seconds an HTTP connection may stay idle.
CONNECTION_TIMEOUT = 10


class SingleFlight:
    """Runs ``func`` in a worker thread; concurrent callers share one run,
    and a run that is still going (stuck) is never started again."""

    def __init__(self, func: Callable[[], Any], name: str):
        self._func = func
        self._name = name
        self._lock = threading.Lock()
        self._future: futures.Future | None = None

    def get(self, timeout: float) -> Any:
        """The result of the current or a new run; ``TimeoutError`` when it
        does not end within ``timeout`` seconds."""
        with self._lock:
            if self._future is None or self._future.done():
                self._future = futures.Future()
                threading.Thread(target=self._run, args=(self._future,),
                                 name=f'rapid-vmm-metrics-{self._name}',
                                 daemon=True).start()
            future = self._future
        return future.result(timeout=max(timeout, 0))

    def _run(self, future: futures.Future) -> None:
        try:
            future.set_result(self._func())
        except BaseException as exc:  # noqa: BLE001 - handed to get()
            future.set_exception(exc)


class _Families:
    """Builds the metric families of one scrape."""

    def __init__(self):
        self.families: dict[str, core.Metric] = {}

    def gauge(self, name: str, documentation: str, value: Any,
              labels: dict | None = None, unit_factor: float = 1) -> None:
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, float)):
            return
        labels = labels or {}
        full = f'{PREFIX}_{name}'
        family = self.families.get(full)
        if family is None:
            family = core.GaugeMetricFamily(full, documentation,
                                            labels=sorted(labels))
            self.families[full] = family
        family.add_metric([str(labels[key]) for key in sorted(labels)],
                          value * unit_factor)


class VmmCollector(prom_registry.Collector):
    """prometheus-client collector of the agent's figures.

    :param host_status: returns ``get_host_status`` (SPEC 4).
    :param vm_usage: returns ``get_vm_usage(resource=...)`` for every VM.
    :param timeout: seconds a scrape may wait for the figures.
    :param grid: the ``vm_types`` (``[vcpus, memory_mb, disk_gb]`` lists)
        for ``rapid_vmm_vm_type_fits``; None: only the types that fit.
    """

    def __init__(self, host_status: Callable[[], dict],
                 vm_usage: Callable[[str], list] | None,
                 timeout: float, grid: list[list[int]] | None = None):
        self.timeout = timeout
        self.grid = grid
        self._host = SingleFlight(host_status, 'host')
        self._usage = (SingleFlight(lambda: {r: vm_usage(r)
                                             for r in RESOURCES}, 'usage')
                       if vm_usage is not None else None)

    def describe(self) -> list:
        return []  # figures depend on the host: no describe-time collect

    def collect(self):
        started = time.monotonic()
        deadline = started + self.timeout
        out = _Families()
        status = self._read(self._host, deadline, 'host', out)
        usage = (self._read(self._usage, deadline, 'usage', out)
                 if self._usage is not None else None)
        if status is not None:
            self._host_figures(out, status)
            self._vm_figures(out, status.get('vms') or [], usage or {})
        out.gauge('scrape_duration_seconds',
                  'Seconds this scrape spent reading the figures.',
                  time.monotonic() - started)
        yield from out.families.values()

    def _read(self, flight: SingleFlight, deadline: float, name: str,
              out: _Families) -> Any:
        try:
            result = flight.get(deadline - time.monotonic())
            ok = 1
        except futures.TimeoutError:
            LOG.warning('Metrics: the %s figures did not come in %.1f s; '
                        'scrape served without them', name, self.timeout)
            result, ok = None, 0
        except Exception as exc:  # noqa: BLE001 - any failure: scrape goes on
            LOG.warning('Metrics: reading the %s figures failed: %s', name,
                        exc)
            result, ok = None, 0
        out.gauge('scrape_collector_success',
                  'Whether this scrape got the figures of a collector '
                  '(host: get_host_status, usage: get_vm_usage).', ok,
                  {'collector': name})
        return result

    def _host_figures(self, out: _Families, status: dict) -> None:
        res = status.get('resources') or {}
        out.gauge('info', 'The agent: host, VMM id, driver, version.', 1,
                  {'host': status.get('host'), 'driver': status.get('driver'),
                   'version': status.get('version'),
                   'vmm_id': _label(status.get('vmm_id'))})
        for peer, done in (status.get('registered') or {}).items():
            out.gauge('registered', 'Whether the agent is registered with '
                      'the peer (ds, slam).', bool(done), {'peer': peer})
        out.gauge('driver_reachable', 'Whether the hypervisor answers.',
                  bool(status.get('driver_reachable', True)))
        out.gauge('host_cpu_load_percent', 'Host CPU load, as reported to '
                  'the DS.', res.get('cpu_load_percent'))
        out.gauge('host_cpus', 'Host CPU cores.', res.get('cpu_count'))
        out.gauge('host_memory_total_bytes', 'Host memory.',
                  res.get('memory_total_mb'), unit_factor=MiB)
        out.gauge('host_memory_free_bytes', 'Host memory available (as '
                  'reported to the DS).', res.get('memory_free_mb'),
                  unit_factor=MiB)
        out.gauge('host_disk_total_bytes', 'Size of the instance disks\' '
                  'file system.', res.get('disk_total_gb'), unit_factor=GiB)
        out.gauge('host_disk_free_bytes', 'Free space of the instance '
                  'disks\' file system.', res.get('disk_free_gb'),
                  unit_factor=GiB)
        out.gauge('host_gpu_load_percent', 'Host GPU load, as reported to '
                  'the DS.', res.get('gpu_load_percent'))
        out.gauge('host_gpu_cores', 'GPU cores of the host for VMs '
                  '([gpu] total_cores).', res.get('gpu_cores'))
        for state in ('running', 'suspended'):
            out.gauge('vms', 'VMs of the agent by state.',
                      res.get(f'vms_{state}'), {'state': state})
        fits = {tuple(t) for t in res.get('available_types') or []}
        for vm_type in self.grid or sorted(fits):
            vcpus, memory_mb, disk_gb = vm_type
            out.gauge('vm_type_fits', 'Whether one more VM of this type '
                      'fits on the host.', tuple(vm_type) in fits,
                      {'vcpus': vcpus, 'memory_mb': memory_mb,
                       'disk_gb': disk_gb})
        for gpu in res.get('gpus') or []:
            labels = {'gpu': gpu.get('index')}
            out.gauge('gpu_info', 'A GPU of the host.', 1,
                      dict(labels, name=gpu.get('name'),
                           uuid=gpu.get('uuid')))
            out.gauge('gpu_utilization_percent', 'GPU utilisation.',
                      gpu.get('utilization_percent'), labels)
            out.gauge('gpu_memory_total_bytes', 'GPU memory.',
                      gpu.get('memory_total_mb'), labels, MiB)
            out.gauge('gpu_memory_used_bytes', 'GPU memory in use.',
                      gpu.get('memory_used_mb'), labels, MiB)
            out.gauge('gpu_temperature_celsius', 'GPU temperature.',
                      gpu.get('temperature_c'), labels)
            out.gauge('gpu_power_watts', 'GPU power draw.',
                      gpu.get('power_w'), labels)
            out.gauge('gpu_mig_instances', 'MIG instances of the GPU.',
                      len(gpu.get('mig') or []), labels)

    def _vm_figures(self, out: _Families, vms: list[dict],
                    usage: dict[str, list]) -> None:
        names = {}
        for vm in vms:
            labels = {'user_id': vm.get('user_id'), 'vm': vm.get('name')}
            names[vm.get('user_id')] = vm.get('name')
            out.gauge('vm_info', 'A VM of the agent.', 1,
                      dict(labels, vm_id=_label(vm.get('vm_id')),
                           os_type=_label(vm.get('os_type')),
                           helper=_label(vm.get('helper') or 0),
                           task_state=vm.get('task_state') or ''))
            out.gauge('vm_status', 'Status code of the VM (1 started, 2 '
                      'suspended, 3 resumed, 4 stopped).', vm.get('status'),
                      labels)
            out.gauge('vm_vcpus', 'vCPUs of the VM.', vm.get('vcpus'),
                      labels)
            out.gauge('vm_memory_bytes', 'Memory of the VM\'s type.',
                      vm.get('memory_mb'), labels, MiB)
            out.gauge('vm_disk_bytes', 'Disk of the VM\'s type.',
                      vm.get('disk_gb'), labels, GiB)
            out.gauge('vm_gpu_cores', 'GPU cores given to the VM.',
                      vm.get('gpu_cores'), labels)
        figures = (
            ('cpu', 'cpu_util_percent', 'vm_cpu_utilization_percent',
             'CPU use of the VM (get_vm_usage cpu).', 1),
            ('memory', 'memory_mb', 'vm_memory_current_bytes',
             'Memory the VM has now (get_vm_usage memory).', MiB),
            ('memory', 'memory_used_mb', 'vm_memory_used_bytes',
             'Memory the guest uses (get_vm_usage memory).', MiB),
            ('disk', 'capacity_bytes', 'vm_disk_capacity_bytes',
             'Capacity of the VM\'s disk (get_vm_usage disk).', 1),
            ('disk', 'allocation_bytes', 'vm_disk_allocation_bytes',
             'Space the VM\'s disk takes (get_vm_usage disk).', 1),
        )
        for resource, key, name, documentation, factor in figures:
            for row in usage.get(resource) or []:
                user_id = row.get('user_id')
                out.gauge(name, documentation, row.get(key),
                          {'user_id': user_id,
                           'vm': names.get(user_id, '')}, factor)


def _label(value: Any) -> str:
    return '' if value is None else str(value)


class _Handler(exposition.MetricsHandler):
    timeout = CONNECTION_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        LOG.debug('Metrics request from %s: %s', self.client_address[0],
                  format % args)


class MetricsServer(http.server.HTTPServer):
    """An HTTP server for one registry with a bounded worker pool."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], registry,
                 max_connections: int):
        handler = type('RapidVmmMetricsHandler', (_Handler,),
                       {'registry': registry})
        if ':' in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._pool = futures.ThreadPoolExecutor(
            max_workers=max_connections,
            thread_name_prefix='rapid-vmm-metrics-http')
        self._thread: threading.Thread | None = None

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            LOG.warning('Metrics: %s refused, %s requests in progress',
                        client_address[0], self.max_connections)
            try:
                request.settimeout(1)
                request.sendall(b'HTTP/1.0 503 Service Unavailable\r\n'
                                b'Content-Length: 0\r\n\r\n')
            except OSError:
                pass
            self.shutdown_request(request)
            return
        self._pool.submit(self._handle, request, client_address)

    def _handle(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception as exc:  # noqa: BLE001 - one request, logged
            LOG.warning('Metrics request from %s failed: %s: %s',
                        client_address[0], type(exc).__name__, exc)
        finally:
            # The slot is free before the peer sees the close: a client
            # that reconnects at once is not refused by its own last one.
            self._slots.release()
            self.shutdown_request(request)

    def start(self) -> 'MetricsServer':
        self._thread = threading.Thread(target=self.serve_forever,
                                        kwargs={'poll_interval': 0.5},
                                        name='rapid-vmm-metrics',
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def port(self) -> int:
        return self.server_address[1]


def start(conf: cfg.ConfigOpts, host_status: Callable[[], dict],
          vm_usage: Callable[[str], list],
          grid: list[list[int]] | None = None) -> MetricsServer | None:
    """Serve the metrics if ``[metrics] enabled``; the running server, or
    None. A port that cannot be bound is a :class:`ConfigError`."""
    if not conf.metrics.enabled:
        return None
    registry = prom_registry.CollectorRegistry(auto_describe=False)
    registry.register(VmmCollector(
        host_status, vm_usage if conf.metrics.vm_usage else None,
        conf.metrics.scrape_timeout, grid))
    address = (conf.metrics.bind_host, conf.metrics.port)
    try:
        server = MetricsServer(address, registry,
                               conf.metrics.max_connections)
    except OSError as exc:
        raise exception.ConfigError(
            reason=f'[metrics] cannot listen on {address[0]}:{address[1]}: '
                   f'{exc.strerror or exc}') from exc
    LOG.info('Metrics served on http://%s:%s/metrics', address[0],
             server.port)
    return server.start()
