"""The libvirt driver: VMs as persistent libvirt domains on this host.

Each VM is a persistent domain named after the VM, with one disk made by
:mod:`imagebackend` from a template and one NIC on ``libvirt.network``.
Its metadata (owner, user id, helper index, OS type, size, disk) is in the
domain XML, so :meth:`LibvirtDriver.list_instances` can rebuild the agent's
records from libvirt alone. Only domains whose ``owner`` is this agent's
``host`` are ever touched.
"""

from collections.abc import Callable
import ipaddress
import os
import shlex
import shutil
import subprocess
import threading
import time
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from rapid_vmm import exception
from rapid_vmm import flavors
from rapid_vmm import netutils
from rapid_vmm import objects
from rapid_vmm.virt import driver
from rapid_vmm.virt.libvirt import config as vconfig
from rapid_vmm.virt.libvirt import host as vhost
from rapid_vmm.virt.libvirt import imagebackend
from rapid_vmm.virt.libvirt import imagepool

LOG = logging.getLogger(__name__)

libvirt = vhost.libvirt

GiB = 1024 ** 3

#: Seconds after which a cached CPU sample is too old to compute a rate.
CPU_SAMPLE_MAX_AGE = 300.0
#: Shortest interval between two CPU samples that gives a usable rate.
CPU_SAMPLE_MIN_INTERVAL = 0.5


def images_path(conf: cfg.ConfigOpts) -> str:
    """``libvirt.images_path``, defaulting to ``<data_path>/instances``."""
    return conf.libvirt.images_path or os.path.join(conf.data_path,
                                                    'instances')


def _readable_file(path: str | None, option: str) -> None:
    if not path:
        raise exception.ConfigError(reason=f'[libvirt] {option} is not set')
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise exception.ConfigError(
            reason=f'[libvirt] {option} {path!r} is not a readable file')


class LibvirtDriver(driver.ComputeDriver):
    """Runs VMs as libvirt domains (``compute_driver = libvirt``)."""

    name = 'libvirt'

    def __init__(self, conf: cfg.ConfigOpts):
        super().__init__(conf)
        self._host: vhost.Host | None = None
        self._images = imagebackend.ImageBackend(
            images_path(conf), conf.libvirt.image_mode)
        self._pool: imagepool.ImagePool | None = None
        self._cpu_samples: dict[str, tuple[float, int]] = {}
        self._cpu_lock = threading.Lock()
        self._event_callback: Callable[[str | None, str], None] | None = None

    # -- set-up -----------------------------------------------------------

    @classmethod
    def validate_config(cls, conf: cfg.ConfigOpts) -> None:
        vhost.require_libvirt()
        _readable_file(conf.libvirt.normal_image, 'normal_image')
        for path in conf.libvirt.helper_images:
            _readable_file(path, 'helper_images')
        for option in ('kernel', 'initrd'):
            path = getattr(conf.libvirt, option)
            if path:
                _readable_file(path, option)
        if conf.libvirt.ip_command:
            try:
                argv = shlex.split(conf.libvirt.ip_command)
            except ValueError as exc:
                raise exception.ConfigError(
                    reason=f'[libvirt] ip_command cannot be parsed: {exc}'
                ) from None
            if not argv or shutil.which(argv[0]) is None:
                raise exception.ConfigError(
                    reason=f'[libvirt] ip_command {conf.libvirt.ip_command!r}'
                           ' names no executable program')
        if shutil.which('qemu-img') is None:
            raise exception.ConfigError(
                reason='the libvirt driver needs qemu-img (apt-get install '
                       'qemu-utils)')

    def set_event_callback(
            self, callback: Callable[[str | None, str], None]) -> None:
        """Receive ``callback(domain_name, event)`` for domain events."""
        self._event_callback = callback

    def init_host(self) -> None:
        self._images.ensure_directory()
        self._check_traversable(self._images.images_path)
        self._host = vhost.Host(
            self.conf.libvirt.connection_uri,
            reconnect_max_interval=self.conf.libvirt.reconnect_max_interval,
            call_timeout=self.conf.libvirt.call_timeout,
            event_handler=self._on_event)
        self._host.start()

    def post_start(self) -> None:
        """Fill the image pool, now that start-up removed orphan disks."""
        size = self.conf.libvirt.image_pool_size
        if size > 0:
            grid = flavors.parse_grid(self.conf.vm_types)
            self._pool = imagepool.ImagePool(
                self._images, self.conf.libvirt.normal_image, size,
                grid.smallest.disk_gb)
            self._pool.start()

    def _check_traversable(self, path: str) -> None:
        """Warn when QEMU (another user) cannot reach the instance disks."""
        if not self.conf.libvirt.connection_uri.startswith('qemu:///system'):
            return
        current = os.path.abspath(path)
        while True:
            try:
                mode = os.stat(current).st_mode
            except OSError:
                return
            if not mode & 0o001:
                LOG.warning('%s is not traversable by other users: QEMU, '
                            'running as its own user, will not reach the '
                            'instance disks in %s (chmod o+x %s)', current,
                            path, current)
                return
            parent = os.path.dirname(current)
            if parent == current:
                return
            current = parent

    def cleanup_host(self) -> None:
        if self._pool is not None:
            self._pool.stop()
        if self._host is not None:
            self._host.stop()

    def _on_event(self, name: str | None, event: str) -> None:
        if self._event_callback is not None:
            self._event_callback(name, event)

    # -- helpers ----------------------------------------------------------

    def _conn(self):
        return self._host.get_connection()

    def _run(self, action: str, func: Callable[..., Any], *args: Any,
             timed: bool = False) -> Any:
        """Call libvirt; a dropped connection is noticed and reported.

        ``timed`` runs the call under ``libvirt.call_timeout`` (for calls
        that can hang on a stuck domain or guest agent).
        """
        conn = self._conn()
        try:
            if timed:
                return self._host.call(func, *args, action=action)
            return func(*args)
        except libvirt.libvirtError as exc:
            if vhost.is_connection_error(exc):
                self._host.mark_broken(conn)
            raise exception.DriverError(action=action,
                                        reason=str(exc)) from exc

    def _lookup(self, name: str):
        """Return the domain called ``name``, or None."""
        conn = self._conn()
        try:
            return conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if vhost.is_not_found(exc):
                return None
            if vhost.is_connection_error(exc):
                self._host.mark_broken(conn)
            raise exception.DriverError(action='look up domain',
                                        reason=f'{name}: {exc}') from exc

    def _require(self, vm: objects.Vm):
        dom = self._lookup(vm.name)
        if dom is None:
            raise exception.DriverError(
                action='find domain', reason=f'{vm.name} does not exist')
        return dom

    def _domain_type(self) -> str:
        conn = self._conn()
        if conn.getType().lower() == 'test':
            return 'test'
        virt_type = self.conf.libvirt.virt_type
        if virt_type == 'auto':
            usable = os.access('/dev/kvm', os.R_OK | os.W_OK)
            return 'kvm' if usable else 'qemu'
        return virt_type

    def template_for(self, vm: objects.Vm) -> str:
        """The template disk of ``vm``: helper images by index, else normal."""
        helpers = self.conf.libvirt.helper_images
        if vm.helper and helpers:
            return helpers[min(vm.helper, len(helpers)) - 1]
        return self.conf.libvirt.normal_image

    def _max_sizes(self, vm: objects.Vm) -> tuple[int, int]:
        grid = flavors.parse_grid(self.conf.vm_types)
        max_vcpus = self.conf.libvirt.max_vcpus or grid.largest.vcpus
        max_memory = self.conf.libvirt.max_memory_mb or grid.largest.memory_mb
        return max(max_vcpus, vm.vcpus), max(max_memory, vm.memory_mb)

    def _metadata(self, vm: objects.Vm, template: str,
                  disk_path: str) -> dict:
        return {'owner': self.conf.host, 'user_id': vm.user_id,
                'helper': vm.helper, 'os_type': int(vm.os_type),
                'vcpus': vm.vcpus, 'memory_mb': vm.memory_mb,
                'disk_gb': vm.disk_gb, 'gpu_cores': vm.gpu_cores,
                'image': template, 'disk': disk_path}

    # -- life cycle -------------------------------------------------------

    def host_capacity(self) -> driver.HostCapacity:
        conn = self._conn()
        info = self._run('read host info', conn.getInfo)
        memory_mb = int(info[1])
        try:
            stats = conn.getMemoryStats(
                libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
            memory_mb = max(memory_mb, int(stats['total']) // 1024)
        except (libvirt.libvirtError, KeyError, TypeError):
            LOG.debug('No node memory statistics from %s; using getInfo',
                      self.conf.libvirt.connection_uri)
        try:
            disk_gb = shutil.disk_usage(self._images.images_path).total // GiB
        except OSError:
            disk_gb = 0
        return driver.HostCapacity(vcpus=int(info[2]), memory_mb=memory_mb,
                                   disk_gb=int(disk_gb))

    def create(self, vm: objects.Vm) -> driver.CreateResult:
        template = self.template_for(vm)
        disk_path = vm.disk_path or self._images.disk_path(vm.name)
        max_vcpus, max_memory = self._max_sizes(vm)
        if self._lookup(vm.name) is not None:
            raise exception.DriverError(
                action='define domain',
                reason=f'a domain called {vm.name} already exists')
        dom = None
        try:
            self._make_disk(template, disk_path, vm.disk_gb)
            spec = vconfig.DomainSpec(
                name=vm.name, domain_type=self._domain_type(),
                vcpus=vm.vcpus, max_vcpus=max_vcpus,
                memory_mb=vm.memory_mb, max_memory_mb=max_memory,
                disk_path=disk_path,
                disk_format=self._images.disk_format(template),
                network=self.conf.libvirt.network,
                metadata=self._metadata(vm, template, disk_path),
                kernel=self.conf.libvirt.kernel,
                initrd=self.conf.libvirt.initrd,
                kernel_cmdline=self.conf.libvirt.kernel_cmdline,
                serial_log=os.path.join(self._images.images_path,
                                        vm.name + '.console.log'))
            conn = self._conn()
            dom = self._run('define domain', conn.defineXML,
                            vconfig.build_domain_xml(spec))
            self._run('start domain', dom.create)
            driver_id = dom.UUIDString()
        except Exception:
            LOG.warning('Creating %s failed; removing what was made',
                        vm.name)
            # Only what this call made: the disk, and the domain if it got
            # as far as defining one (the name was free, checked above).
            self._destroy_quietly(vm.name if dom is not None else None,
                                  disk_path)
            raise
        LOG.info('Started domain %s (%s) for user %s', vm.name, driver_id,
                 vm.user_id)
        return driver.CreateResult(driver_id=driver_id, disk_path=disk_path,
                                   image=template)

    def _make_disk(self, template: str, disk_path: str, size_gb: int) -> None:
        pool = self._pool
        if pool is not None and template == pool.template and \
                pool.take(disk_path, size_gb):
            return
        self._images.create(template, disk_path, size_gb)

    def _destroy_quietly(self, name: str | None,
                         disk_path: str | None) -> None:
        if name is not None:
            try:
                self._undefine(name)
            except exception.DriverError as exc:
                LOG.error('Cleaning up domain %s failed: %s', name, exc)
            self._images.delete(os.path.join(self._images.images_path,
                                             name + '.console.log'))
        self._images.delete(disk_path)

    def _undefine(self, name: str) -> None:
        dom = self._lookup(name)
        if dom is None:
            return
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as exc:
            if not vhost.is_not_found(exc):
                raise exception.DriverError(action='destroy domain',
                                            reason=f'{name}: {exc}') from exc
        try:
            try:
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
            except libvirt.libvirtError as exc:
                if vhost.is_not_found(exc):
                    return
                dom.undefine()
        except libvirt.libvirtError as exc:
            if not vhost.is_not_found(exc):
                raise exception.DriverError(action='undefine domain',
                                            reason=f'{name}: {exc}') from exc

    def destroy(self, vm: objects.Vm) -> None:
        self._undefine(vm.name)
        self._images.delete(vm.disk_path or self._images.disk_path(vm.name))
        self._images.delete(os.path.join(self._images.images_path,
                                         vm.name + '.console.log'))
        with self._cpu_lock:
            self._cpu_samples.pop(vm.name, None)
        LOG.info('Removed domain %s of user %s', vm.name, vm.user_id)

    def suspend(self, vm: objects.Vm) -> None:
        dom = self._require(vm)
        state = self._run('read state', dom.state)[0]
        if state == libvirt.VIR_DOMAIN_PAUSED:
            return
        self._run('suspend domain', dom.suspend)

    def resume(self, vm: objects.Vm) -> None:
        dom = self._require(vm)
        state = self._run('read state', dom.state)[0]
        if state == libvirt.VIR_DOMAIN_PAUSED:
            self._run('resume domain', dom.resume)
        elif state in (libvirt.VIR_DOMAIN_SHUTOFF,
                       libvirt.VIR_DOMAIN_SHUTDOWN,
                       libvirt.VIR_DOMAIN_CRASHED):
            self._run('start domain', dom.create)

    def resize(self, vm: objects.Vm, new_type: flavors.VmType) -> None:
        dom = self._require(vm)
        max_vcpus, max_memory = self._max_sizes(vm)
        if new_type.vcpus > dom.vcpusFlags(libvirt.VIR_DOMAIN_VCPU_MAXIMUM) \
                or new_type.memory_mb * 1024 > dom.maxMemory():
            raise exception.VmStateConflict(
                action=f'resize to {new_type}', user_id=vm.user_id,
                state=f'defined with at most {max_vcpus} vCPUs and '
                      f'{max_memory} MB')
        if new_type.disk_gb < vm.disk_gb:
            raise exception.InvalidRequest(
                reason=f'disk cannot shrink from {vm.disk_gb} GB to '
                       f'{new_type.disk_gb} GB')
        # The disk first: it is the step a hypervisor may refuse, and
        # nothing else has changed yet when it does.
        if new_type.disk_gb > vm.disk_gb:
            self._grow_disk(vm, dom, new_type.disk_gb)
        live = dom.isActive()
        scopes = [libvirt.VIR_DOMAIN_AFFECT_CONFIG]
        if live:
            scopes.insert(0, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        for scope in scopes:
            if new_type.vcpus != vm.vcpus:
                self._set_vcpus(vm, dom, new_type.vcpus, scope)
            if new_type.memory_mb != vm.memory_mb:
                self._run('set memory', dom.setMemoryFlags,
                          new_type.memory_mb * 1024, scope)
        template = self.template_for(vm)
        resized = vm.copy(vcpus=new_type.vcpus, memory_mb=new_type.memory_mb,
                          disk_gb=new_type.disk_gb)
        metadata = self._metadata(resized, template, vm.disk_path or
                                  self._images.disk_path(vm.name))
        for scope in scopes:
            self._run('update metadata', dom.setMetadata,
                      libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                      vconfig.metadata_xml(metadata),
                      vconfig.METADATA_PREFIX, vconfig.METADATA_NS, scope)

    def _set_vcpus(self, vm: objects.Vm, dom, vcpus: int, scope: int) -> None:
        try:
            self._run('set vCPUs', dom.setVcpusFlags, vcpus, scope)
        except exception.DriverError as exc:
            # Guests may refuse to unplug a vCPU (QEMU TCG does): the
            # persistent config still changes and applies at next boot.
            if scope != libvirt.VIR_DOMAIN_AFFECT_LIVE or vcpus > vm.vcpus:
                raise
            LOG.warning('The guest of %s refused to unplug vCPUs live (%s); '
                        '%d vCPUs apply at its next boot', vm.name, exc,
                        vcpus)

    def _grow_disk(self, vm: objects.Vm, dom, disk_gb: int) -> None:
        try:
            dom.blockResize('vda', disk_gb * GiB,
                            libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
        except libvirt.libvirtError as exc:
            raise exception.VmStateConflict(
                action=f'grow the disk to {disk_gb} GB', user_id=vm.user_id,
                state=f'on a hypervisor that refuses it ({exc})') from exc

    def confirm_resize(self, vm: objects.Vm) -> None:
        """libvirt applies a resize at once: nothing is left to confirm."""

    # -- addresses --------------------------------------------------------

    def wait_for_ip(self, vm: objects.Vm,
                    timeout: float | None = None) -> str:
        if timeout is None:
            timeout = self.conf.libvirt.ip_timeout
        deadline = time.monotonic() + timeout
        delay = 0.2
        while True:
            ip = self._find_ip(vm)
            if ip:
                return ip
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise exception.DriverError(
                    action='find IP address',
                    reason=f'{vm.name} has no address after {timeout} s')
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 2.0)

    def _find_ip(self, vm: objects.Vm) -> str | None:
        if self.conf.libvirt.ip_command:
            return self._ip_from_command(vm)
        dom = self._require(vm)
        for source in self.conf.libvirt.ip_sources:
            code = {'lease': libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
                    'agent': libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
                    'arp': libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP,
                    }[source]
            try:
                interfaces = self._host.call(
                    dom.interfaceAddresses, code, timeout=10,
                    action=f'read addresses ({source})')
            except exception.DriverError as exc:
                LOG.debug('No address of %s from %s: %s', vm.name, source,
                          exc)
                continue
            except libvirt.libvirtError as exc:
                LOG.debug('No address of %s from %s: %s', vm.name, source,
                          exc)
                continue
            ip = _pick_address(interfaces)
            if ip:
                LOG.debug('Address of %s from %s: %s', vm.name, source, ip)
                return ip
        return None

    def _ip_from_command(self, vm: objects.Vm) -> str | None:
        argv = [*shlex.split(self.conf.libvirt.ip_command), vm.name]
        try:
            result = subprocess.run(  # noqa: S603 - argument list, no shell
                argv, capture_output=True, text=True, check=False,
                timeout=self.conf.libvirt.ip_command_timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            LOG.warning('ip_command for %s failed: %s', vm.name, exc)
            return None
        if result.returncode != 0:
            LOG.debug('ip_command for %s exited %s: %s', vm.name,
                      result.returncode, result.stderr.strip()[:200])
            return None
        for token in result.stdout.split():
            try:
                return netutils.parse_ip(token)
            except ValueError:
                continue
        return None

    # -- usage ------------------------------------------------------------

    def _bulk_stats(self, names: set[str]) -> dict[str, dict]:
        """One ``getAllDomainStats`` call for every domain; ours kept."""
        conn = self._conn()
        groups = (libvirt.VIR_DOMAIN_STATS_STATE |
                  libvirt.VIR_DOMAIN_STATS_CPU_TOTAL |
                  libvirt.VIR_DOMAIN_STATS_BALLOON |
                  libvirt.VIR_DOMAIN_STATS_BLOCK)
        flags = getattr(libvirt, 'VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT',
                        0)
        records = self._run('read domain statistics',
                            conn.getAllDomainStats, groups, flags,
                            timed=True)
        result = {}
        for dom, stats in records:
            name = dom.name()
            if name in names:
                result[name] = stats
        return result

    def usage(self, vms: list[objects.Vm],
              resource: str) -> dict[int, dict[str, Any]]:
        stats = self._bulk_stats({vm.name for vm in vms})
        now = time.monotonic()
        result = {}
        for vm in vms:
            record = stats.get(vm.name, {})
            if resource == 'cpu':
                result[vm.user_id] = self._cpu_usage(vm, record, now)
            elif resource == 'memory':
                result[vm.user_id] = _memory_usage(vm, record)
            else:
                result[vm.user_id] = self._disk_usage(vm, record)
        return result

    def _cpu_usage(self, vm: objects.Vm, stats: dict, now: float) -> dict:
        cpu_time = stats.get('cpu.time')
        if cpu_time is None:
            return {'cpu_util_percent': None, 'source': 'unavailable'}
        with self._cpu_lock:
            previous = self._cpu_samples.get(vm.name)
            if previous is None or now - previous[0] > CPU_SAMPLE_MAX_AGE:
                self._cpu_samples[vm.name] = (now, cpu_time)
                return {'cpu_util_percent': None, 'source': 'first-sample'}
            elapsed = now - previous[0]
            if elapsed < CPU_SAMPLE_MIN_INTERVAL:
                return {'cpu_util_percent': None, 'source': 'too-soon'}
            self._cpu_samples[vm.name] = (now, cpu_time)
        vcpus = stats.get('vcpu.current') or vm.vcpus or 1
        delta = max(cpu_time - previous[1], 0)
        percent = 100.0 * delta / (elapsed * 1e9 * vcpus)
        return {'cpu_util_percent': round(min(percent, 100.0), 2),
                'source': 'cpu.time'}

    def sample_cpu(self, vms: list[objects.Vm]) -> None:
        """Cache a CPU sample of every VM (called each report cycle)."""
        try:
            self.usage(vms, 'cpu')
        except exception.DriverError as exc:
            LOG.debug('CPU sampling skipped: %s', exc)

    def _disk_usage(self, vm: objects.Vm, stats: dict) -> dict:
        for i in range(int(stats.get('block.count', 0))):
            if stats.get(f'block.{i}.name') == 'vda':
                capacity = stats.get(f'block.{i}.capacity')
                allocation = stats.get(f'block.{i}.allocation')
                physical = stats.get(f'block.{i}.physical')
                if capacity is not None:
                    return {'capacity_bytes': int(capacity),
                            'allocation_bytes': _int_or_none(allocation),
                            'physical_bytes': _int_or_none(physical),
                            'source': 'block-stats'}
        path = vm.disk_path or self._images.disk_path(vm.name)
        physical = self._images.allocation(path)
        return {'capacity_bytes': vm.disk_gb * GiB,
                'allocation_bytes': physical, 'physical_bytes': physical,
                'source': 'disk-file'}

    # -- listing ----------------------------------------------------------

    def list_instances(self) -> list[driver.Instance]:
        conn = self._conn()
        domains = self._run('list domains', conn.listAllDomains, 0,
                            timed=True)
        instances = []
        for dom in domains:
            instance = self._instance_of(dom)
            if instance is not None:
                instances.append(instance)
        return instances

    def get_instance(self, name: str) -> driver.Instance | None:
        dom = self._lookup(name)
        return None if dom is None else self._instance_of(dom)

    def _instance_of(self, dom) -> driver.Instance | None:
        try:
            xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                               vconfig.METADATA_NS)
        except libvirt.libvirtError as exc:
            if vhost.error_code(exc) in (
                    libvirt.VIR_ERR_NO_DOMAIN_METADATA,
                    libvirt.VIR_ERR_NO_DOMAIN):
                return None  # not ours, or gone since the listing
            if vhost.is_connection_error(exc):
                self._host.mark_broken()
            raise exception.DriverError(action='read domain metadata',
                                        reason=str(exc)) from exc
        values = vconfig.parse_metadata(xml)
        if values is None or values.get('owner') != self.conf.host:
            return None
        try:
            state = dom.state()[0]
            name = dom.name()
            uuid = dom.UUIDString()
        except libvirt.libvirtError as exc:
            if vhost.is_not_found(exc):
                return None
            raise exception.DriverError(action='read domain',
                                        reason=str(exc)) from exc
        return driver.Instance(
            driver_id=uuid, name=name, power_state=_power_state(state),
            user_id=values['user_id'], helper=values.get('helper', 0),
            os_type=values.get('os_type', 0),
            vcpus=values.get('vcpus', 1),
            memory_mb=values.get('memory_mb', 0),
            disk_gb=values.get('disk_gb', 0),
            gpu_cores=values.get('gpu_cores', 0),
            disk_path=values.get('disk'), image=values.get('image'))

    def _is_pool_disk(self, path: str) -> bool:
        """A complete pool disk of the current normal template."""
        if self.conf.libvirt.image_pool_size <= 0:
            return False
        key = imagepool.template_key(self.conf.libvirt.normal_image)
        name = os.path.basename(path)
        return (name.startswith(f'{imagepool.POOL_PREFIX}{key}-') and
                not name.endswith('.part'))

    def cleanup_orphans(self, known_disks: set[str]) -> list[str]:
        removed = []
        for path in self._images.list_disks():
            if path in known_disks or self._is_pool_disk(path):
                continue
            LOG.warning('Removing orphan disk %s (no VM record uses it)',
                        path)
            self._images.delete(path)
            removed.append(path)
        return removed


def _int_or_none(value) -> int | None:
    return None if value is None else int(value)


def _memory_usage(vm: objects.Vm, stats: dict) -> dict:
    current = stats.get('balloon.current')
    if current is None:
        return {'memory_mb': vm.memory_mb, 'memory_used_mb': None,
                'source': 'record'}
    memory_mb = int(current) // 1024
    available = stats.get('balloon.available')
    unused = stats.get('balloon.unused')
    if available is not None and unused is not None:
        used = (int(available) - int(unused)) // 1024
        return {'memory_mb': memory_mb, 'memory_used_mb': used,
                'source': 'balloon'}
    rss = stats.get('balloon.rss')
    if rss is not None:
        return {'memory_mb': memory_mb, 'memory_used_mb': int(rss) // 1024,
                'source': 'balloon.rss'}
    return {'memory_mb': memory_mb, 'memory_used_mb': None,
            'source': 'balloon.current'}


def _pick_address(interfaces: dict) -> str | None:
    """First global IPv4 address of ``interfaceAddresses``, else IPv6."""
    candidates = []
    for details in (interfaces or {}).values():
        for addr in details.get('addrs') or []:
            try:
                ip = ipaddress.ip_address(addr.get('addr', ''))
            except ValueError:
                continue
            if ip.is_loopback or ip.is_link_local or ip.is_unspecified:
                continue
            candidates.append(ip)
    candidates.sort(key=lambda ip: ip.version)
    return str(candidates[0]) if candidates else None


def _power_state(state: int) -> driver.PowerState:
    return {
        libvirt.VIR_DOMAIN_RUNNING: driver.PowerState.RUNNING,
        libvirt.VIR_DOMAIN_BLOCKED: driver.PowerState.RUNNING,
        libvirt.VIR_DOMAIN_PAUSED: driver.PowerState.SUSPENDED,
        libvirt.VIR_DOMAIN_PMSUSPENDED: driver.PowerState.SUSPENDED,
        libvirt.VIR_DOMAIN_SHUTDOWN: driver.PowerState.SHUTOFF,
        libvirt.VIR_DOMAIN_SHUTOFF: driver.PowerState.SHUTOFF,
        libvirt.VIR_DOMAIN_CRASHED: driver.PowerState.CRASHED,
    }.get(state, driver.PowerState.UNKNOWN)
