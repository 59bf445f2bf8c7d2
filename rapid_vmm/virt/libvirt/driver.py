"""The libvirt driver: VMs as persistent libvirt domains on this host.

Each VM is a persistent domain named after the VM, with one disk made by
:mod:`imagebackend` from a template and one NIC on ``libvirt.network``.
Its metadata (owner, user id, helper index, OS type, size, memory ceiling,
disk, the DS id of the VM and the VMM's identity) is in the domain XML, so
the agent's records can be rebuilt from libvirt alone.

What the driver does to a domain depends on what its metadata says:

* :meth:`LibvirtDriver.observe` looks each record's domain up by its UUID
  (by name only while the record has none) and says whether it is ours,
  foreign, unreadable, absent (libvirt answered "no such domain") or
  unknown; it never changes anything;
* :meth:`LibvirtDriver.destroy` (an explicit request) refuses a domain that
  is not recognisably ours, and deletes a disk only when no domain of any
  owner uses the file;
* orphan disks are moved aside and deleted after a grace period
  (:mod:`orphans`).

Every libvirt call goes through :meth:`host.Host.call`, with a deadline.
"""

from collections.abc import Callable
import contextlib
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
from rapid_vmm.virt.libvirt import orphans

LOG = logging.getLogger(__name__)

libvirt = vhost.libvirt

GiB = 1024 ** 3

#: Seconds between two looks for a new VM's address.
IP_POLL_INTERVAL = 0.1
Presence = driver.Presence

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


class _NotOurs(Exception):
    """Internal: the metadata of a domain cannot vouch for it."""

    def __init__(self, presence: driver.Presence, reason: str,
                 values: dict | None = None):
        super().__init__(reason)
        self.presence = presence
        self.reason = reason
        self.values = values


class LibvirtDriver(driver.ComputeDriver):
    """Runs VMs as libvirt domains (``compute_driver = libvirt``)."""

    name = 'libvirt'

    def __init__(self, conf: cfg.ConfigOpts):
        super().__init__(conf)
        self._host: vhost.Host | None = None
        self._images = imagebackend.ImageBackend(
            images_path(conf), conf.libvirt.image_mode)
        self._pool: imagepool.ImagePool | None = None
        self._orphans = orphans.OrphanDisks(
            self._images.images_path,
            grace_period=conf.libvirt.orphan_disk_grace_period,
            is_pool_disk=self._is_pool_disk)
        self._cpu_samples: dict[str, tuple[float, int]] = {}
        self._cpu_lock = threading.Lock()
        self._event_callback: Callable[[str | None, str], None] | None = None
        # Disks being made by create(): never orphans.
        self._in_flight: set[str] = set()
        self._in_flight_lock = threading.Lock()

    # -- set-up -----------------------------------------------------------

    @classmethod
    def validate_config(cls, conf: cfg.ConfigOpts) -> None:
        vhost.require_libvirt()
        _readable_file(conf.libvirt.normal_image, 'normal_image')
        for path in conf.libvirt.helper_images:
            _readable_file(path, 'helper_images')
        if conf.libvirt.android_image:
            _readable_file(conf.libvirt.android_image, 'android_image')
        for path in conf.libvirt.android_helper_images:
            _readable_file(path, 'android_helper_images')
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
        """Fill the image pool."""
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
        self._stopping.set()
        if self._pool is not None:
            self._pool.stop()
        if self._host is not None:
            self._host.stop()

    def _on_event(self, name: str | None, event: str) -> None:
        if self._event_callback is not None:
            self._event_callback(name, event)

    def connection_state(self) -> str:
        if self._host is None:
            return 'not started'
        return self._host.describe()

    # -- calls ------------------------------------------------------------

    def _conn(self):
        if self._host is None:
            raise exception.DriverError(action='connect',
                                        reason='the driver is not started')
        return self._host.get_connection()

    def _call(self, action: str, func: Callable[..., Any], *args: Any,
              conn=None, timeout: float | None = None) -> Any:
        """``func(*args)`` under a deadline; libvirt errors become
        :class:`DriverError` (a lost connection is noticed on the way)."""
        try:
            return self._host.call(func, *args, action=action, conn=conn,
                                   timeout=timeout)
        except libvirt.libvirtError as exc:
            raise exception.DriverError(action=action,
                                        reason=str(exc)) from exc

    def _run(self, action: str, func: Callable[..., Any], *args: Any,
             timed: bool = True) -> Any:
        """Kept for callers of the previous API: every call is timed."""
        return self._call(action, func, *args)

    def _lookup_in(self, conn, vm: objects.Vm):
        """On a worker: the domain of ``vm`` by UUID (by name when the
        record has none), or None when libvirt answers "no such domain"."""
        try:
            if vm.driver_id:
                return conn.lookupByUUIDString(vm.driver_id)
            return conn.lookupByName(vm.name)
        except libvirt.libvirtError as exc:
            if vhost.is_not_found(exc):
                return None
            raise

    def _find(self, vm: objects.Vm, conn=None):
        """The domain of ``vm`` (UUID, else name), or None when absent.

        :raises DriverError: when libvirt cannot say.
        """
        conn = conn or self._conn()
        key = vm.driver_id or vm.name
        return self._call(f'look up domain {key}', self._lookup_in, conn, vm,
                          conn=conn)

    def _lookup(self, name: str):
        """Return the domain called ``name``, or None."""
        conn = self._conn()
        probe = objects.Vm(user_id=0, name=name, vcpus=1, memory_mb=1,
                           disk_gb=0)
        return self._find(probe, conn)

    def _require(self, vm: objects.Vm, conn=None):
        dom = self._find(vm, conn)
        if dom is None:
            key = f'UUID {vm.driver_id}' if vm.driver_id else 'name'
            raise exception.DriverError(
                action='find domain',
                reason=f'{vm.name} does not exist (looked up by {key})')
        return dom

    def _require_ours(self, vm: objects.Vm, conn=None):
        """The domain of ``vm`` and its metadata, when it is ours.

        :raises InstanceNotOurs: for a foreign or unreadable domain.
        """
        conn = conn or self._conn()
        dom = self._require(vm, conn)
        values = self._call(f'read the metadata of {vm.name}',
                            self._metadata_or_reason, dom, conn=conn)
        if isinstance(values, _NotOurs):
            raise exception.InstanceNotOurs(name=vm.name, user_id=vm.user_id,
                                            reason=values.reason)
        return dom, values

    # -- metadata ---------------------------------------------------------

    def _read_values(self, dom, flags: int = 0) -> dict:
        """On a worker: our metadata of ``dom``.

        :raises _NotOurs: missing, malformed or without an owner.
        :raises libvirtError: any other libvirt failure (incl. gone).
        """
        try:
            xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                               vconfig.METADATA_NS, flags)
        except libvirt.libvirtError as exc:
            if vhost.error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                raise _NotOurs(Presence.UNREADABLE,
                               'no rapid-vmm metadata') from None
            raise
        try:
            values = vconfig.read_metadata(xml)
        except vconfig.MetadataError as exc:
            raise _NotOurs(Presence.UNREADABLE,
                           f'malformed rapid-vmm metadata: {exc}') from None
        owner = values.get('owner')
        if not owner:
            raise _NotOurs(Presence.UNREADABLE,
                           'rapid-vmm metadata without an owner', values)
        if owner != self.conf.host:
            raise _NotOurs(Presence.FOREIGN, f'owned by {owner!r}', values)
        return values

    def _metadata_or_reason(self, dom) -> 'dict | _NotOurs':
        try:
            return self._read_values(dom)
        except _NotOurs as exc:
            return exc

    def _record_values(self, vm: objects.Vm, template: str | None,
                       disk_path: str | None, memory_max_mb: int) -> dict:
        return {'owner': self.conf.host, 'user_id': vm.user_id,
                'helper': vm.helper, 'os_type': int(vm.os_type),
                'vcpus': vm.vcpus, 'memory_mb': vm.memory_mb,
                'disk_gb': vm.disk_gb, 'gpu_cores': vm.gpu_cores,
                'memory_max_mb': memory_max_mb, 'vm_id': vm.vm_id,
                'image': template, 'disk': disk_path}

    def _metadata(self, vm: objects.Vm, template: str, disk_path: str,
                  identity: dict | None = None,
                  memory_max_mb: int | None = None) -> dict:
        if memory_max_mb is None:
            memory_max_mb = self._max_sizes(vm)[1]
        values = self._record_values(vm, template, disk_path, memory_max_mb)
        values.update(_identity_values(identity))
        return values

    def _write_values(self, dom, values: dict) -> None:
        """On a worker: replace our metadata, live and persistent."""
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if dom.isActive():
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                        vconfig.metadata_xml(values),
                        vconfig.METADATA_PREFIX, vconfig.METADATA_NS, flags)

    def update_metadata(self, vm: objects.Vm, identity: dict,
                        claim_from: str | None = None) -> bool:
        conn = self._conn()
        dom = self._require(vm, conn)

        def update() -> 'dict | _NotOurs':
            try:
                values = self._read_values(dom)
            except _NotOurs as exc:
                owner = (exc.values or {}).get('owner')
                unmarked = (claim_from == driver.CLAIM_UNMARKED and
                            exc.presence == Presence.UNREADABLE and
                            exc.values is None and
                            exc.reason == 'no rapid-vmm metadata')
                if unmarked:
                    values = {}
                    LOG.warning('Taking over domain %s of user %s, which '
                                'has no rapid-vmm metadata (imported from '
                                'a Java VMM)', vm.name, vm.user_id)
                elif exc.presence != Presence.FOREIGN or not claim_from or \
                        owner != claim_from:
                    return exc
                else:
                    values = exc.values
                    LOG.warning('Taking over domain %s of user %s from host '
                                '%r (declared rename to %r)', vm.name,
                                vm.user_id, claim_from, self.conf.host)
            new = dict(values)
            new.update({key: value for key, value in self._record_values(
                vm, vm.image or values.get('image'),
                vm.disk_path or values.get('disk'),
                vm.memory_max_mb or values.get('memory_max_mb') or
                dom.maxMemory() // 1024).items() if value is not None})
            for field in vconfig.IDENTITY_FIELDS:
                new.pop(field, None)
            new.update(_identity_values(identity))
            self._write_values(dom, new)
            return new

        result = self._call(f'update the metadata of {vm.name}', update,
                            conn=conn)
        if isinstance(result, _NotOurs):
            raise exception.InstanceNotOurs(name=vm.name, user_id=vm.user_id,
                                            reason=result.reason)
        LOG.debug('Metadata of %s updated: %s', vm.name, result)
        return True

    # -- sizes ------------------------------------------------------------

    def memory_ceiling_mb(self, memory_mb: int) -> int:
        """``[libvirt] max_memory_mb`` when set (growth opt-in), else the
        VM's own size."""
        configured = self.conf.libvirt.max_memory_mb
        return max(configured, memory_mb) if configured > 0 else memory_mb

    def _max_sizes(self, vm: objects.Vm) -> tuple[int, int]:
        grid = flavors.parse_grid(self.conf.vm_types)
        max_vcpus = self.conf.libvirt.max_vcpus or grid.largest.vcpus
        max_memory = max(vm.memory_max_mb or 0,
                         self.memory_ceiling_mb(vm.memory_mb))
        return max(max_vcpus, vm.vcpus), max(max_memory, vm.memory_mb)

    def _domain_type(self) -> str:
        conn = self._conn()
        if self._call('read the hypervisor type', conn.getType,
                      conn=conn).lower() == 'test':
            return 'test'
        virt_type = self.conf.libvirt.virt_type
        if virt_type == 'auto':
            usable = os.access('/dev/kvm', os.R_OK | os.W_OK)
            return 'kvm' if usable else 'qemu'
        return virt_type

    def template_for(self, vm: objects.Vm) -> str:
        """The template disk of ``vm``, for its OS: helper images by index,
        else the OS's normal template.

        :raises InvalidRequest: when this host has no template for the
            VM's OS (never another OS's image).
        """
        lv = self.conf.libvirt
        if int(vm.os_type) == objects.OsType.ANDROID:
            helpers, normal = lv.android_helper_images, lv.android_image
            if not normal and not (vm.helper and helpers):
                raise exception.InvalidRequest(
                    reason='this host has no Android template ([libvirt] '
                           'android_image is not set): Android VMs cannot '
                           'be started here')
        else:
            helpers, normal = lv.helper_images, lv.normal_image
        if vm.helper and helpers:
            return helpers[min(vm.helper, len(helpers)) - 1]
        return normal

    # -- life cycle -------------------------------------------------------

    def host_capacity(self) -> driver.HostCapacity:
        conn = self._conn()

        def read() -> tuple:
            info = conn.getInfo()
            try:
                stats = conn.getMemoryStats(
                    libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
            except libvirt.libvirtError as exc:
                if vhost.is_connection_error(exc, conn):
                    raise
                stats = {}
            return info, stats

        info, stats = self._call('read host info', read, conn=conn)
        memory_mb = int(info[1])
        try:
            memory_mb = max(memory_mb, int(stats['total']) // 1024)
        except (KeyError, TypeError, ValueError):
            LOG.debug('No node memory statistics from %s; using getInfo',
                      self.conf.libvirt.connection_uri)
        try:
            disk_gb = shutil.disk_usage(self._images.images_path).total // GiB
        except OSError:
            disk_gb = 0
        return driver.HostCapacity(vcpus=int(info[2]), memory_mb=memory_mb,
                                   disk_gb=int(disk_gb))

    @contextlib.contextmanager
    def _making(self, disk_path: str):
        with self._in_flight_lock:
            self._in_flight.add(disk_path)
        try:
            yield
        finally:
            with self._in_flight_lock:
                self._in_flight.discard(disk_path)

    def create(self, vm: objects.Vm,
               identity: dict | None = None) -> driver.CreateResult:
        template = self.template_for(vm)
        disk_path = vm.disk_path or self._images.disk_path(vm.name)
        max_vcpus, max_memory = self._max_sizes(vm)
        conn = self._conn()
        name_probe = vm.copy(driver_id=None)
        if self._find(name_probe, conn) is not None:
            raise exception.DriverError(
                action='define domain',
                reason=f'a domain called {vm.name} already exists')
        if os.path.lexists(disk_path):
            raise exception.DriverError(
                action='create disk',
                reason=f'{disk_path} exists already; it is left alone')
        dom = None
        made_disk = False
        with self._making(disk_path):
            try:
                made_disk = True
                self._make_disk(template, disk_path, vm.disk_gb)
                spec = vconfig.DomainSpec(
                    name=vm.name, domain_type=self._domain_type(),
                    vcpus=vm.vcpus, max_vcpus=max_vcpus,
                    memory_mb=vm.memory_mb, max_memory_mb=max_memory,
                    disk_path=disk_path,
                    disk_format=self._images.disk_format(template),
                    network=self.conf.libvirt.network,
                    metadata=self._metadata(vm, template, disk_path,
                                            identity, max_memory),
                    kernel=self.conf.libvirt.kernel,
                    initrd=self.conf.libvirt.initrd,
                    kernel_cmdline=self.conf.libvirt.kernel_cmdline,
                    serial_log=self._console_log(vm.name))
                dom = self._call('define domain', conn.defineXML,
                                 vconfig.build_domain_xml(spec), conn=conn)
                self._call('start domain', dom.create, conn=conn)
                driver_id = dom.UUIDString()
            except Exception:
                LOG.warning('Creating %s failed; removing what was made',
                            vm.name)
                # Only what this call made: the disk, and the domain it
                # defined (by its object, never by name).
                if dom is not None:
                    self._undefine_quietly(dom, vm.name)
                    self._images.delete(self._console_log(vm.name))
                if made_disk:
                    self._images.delete(disk_path)
                raise
        LOG.info('Started domain %s (%s) for user %s', vm.name, driver_id,
                 vm.user_id)
        return driver.CreateResult(driver_id=driver_id, disk_path=disk_path,
                                   image=template)

    def _console_log(self, name: str) -> str:
        return os.path.join(self._images.images_path, name + '.console.log')

    def _make_disk(self, template: str, disk_path: str, size_gb: int) -> None:
        pool = self._pool
        if pool is not None and template == pool.template and \
                pool.take(disk_path, size_gb):
            return
        self._images.create(template, disk_path, size_gb)

    def _undefine_quietly(self, dom, name: str) -> None:
        try:
            self._undefine(dom, name)
        except exception.DriverError as exc:
            LOG.error('Cleaning up domain %s failed: %s', name, exc)

    def _undefine(self, dom, name: str) -> None:
        """Stop and undefine ``dom`` (with its managed save image)."""
        def undefine() -> None:
            try:
                if dom.isActive():
                    dom.destroy()
            except libvirt.libvirtError as exc:
                if not vhost.is_not_found(exc):
                    raise
            try:
                try:
                    dom.undefineFlags(
                        libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
                except libvirt.libvirtError as exc:
                    if vhost.is_not_found(exc):
                        return
                    dom.undefine()
            except libvirt.libvirtError as exc:
                if not vhost.is_not_found(exc):
                    raise

        self._call(f'remove domain {name}', undefine)

    def destroy(self, vm: objects.Vm) -> None:
        conn = self._conn()
        dom = self._find(vm, conn)
        disk_path = vm.disk_path
        if dom is not None:
            values = self._call(f'read the metadata of {vm.name}',
                                self._metadata_or_reason, dom, conn=conn)
            if isinstance(values, _NotOurs):
                LOG.warning('Refusing to remove domain %s of user %s: %s',
                            vm.name, vm.user_id, values.reason)
                raise exception.InstanceNotOurs(
                    name=vm.name, user_id=vm.user_id, reason=values.reason)
            disk_path = disk_path or values.get('disk')
            self._undefine(dom, vm.name)
            LOG.info('Removed domain %s of user %s', vm.name, vm.user_id)
        disk_path = disk_path or self._images.disk_path(vm.name)
        in_use = self._disks_in_use(conn)
        if os.path.realpath(disk_path) in in_use:
            LOG.warning('Keeping disk %s of removed VM %s: another domain '
                        'uses it', disk_path, vm.name)
        elif os.path.realpath(disk_path) in self._templates():
            # A helper imported from the Java VMM ran on its template.
            LOG.warning('Keeping disk %s of removed VM %s: it is a '
                        'configured template', disk_path, vm.name)
        else:
            self._images.delete(disk_path)
        self._images.delete(self._console_log(vm.name))
        with self._cpu_lock:
            self._cpu_samples.pop(vm.name, None)

    def _templates(self) -> set[str]:
        """Real paths of every configured template image."""
        group = self.conf.libvirt
        paths = [group.normal_image, group.android_image,
                 *group.helper_images, *group.android_helper_images]
        return {os.path.realpath(p) for p in paths if p}

    def _disks_in_use(self, conn=None) -> set[str]:
        """Real paths of every file a domain of any owner uses as a disk
        (live and persistent definitions, backing chains included).

        :raises DriverError: when libvirt cannot be asked.
        """
        conn = conn or self._conn()

        def collect() -> set[str]:
            files: set[str] = set()
            for dom in conn.listAllDomains(0):
                try:
                    files |= vconfig.domain_disk_files(dom.XMLDesc(0))
                except libvirt.libvirtError as exc:
                    if not vhost.is_not_found(exc):
                        raise
            persistent_active = (libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE |
                                 libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT)
            for dom in conn.listAllDomains(persistent_active):
                try:
                    files |= vconfig.domain_disk_files(
                        dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
                except libvirt.libvirtError as exc:
                    if not vhost.is_not_found(exc):
                        raise
            return {os.path.realpath(path) for path in files}

        return self._call('list the disks of every domain', collect,
                          conn=conn)

    def suspend(self, vm: objects.Vm) -> bool:
        conn = self._conn()
        dom = self._require(vm, conn)
        state = self._call('read state', dom.state, conn=conn)[0]
        if self.conf.suspend_mode != 'save':
            if state == libvirt.VIR_DOMAIN_PAUSED:
                return False
            self._call('suspend domain', dom.suspend, conn=conn)
            return False
        if state == libvirt.VIR_DOMAIN_SHUTOFF and self._call(
                'read managed save', dom.hasManagedSaveImage, 0, conn=conn):
            return True
        if state not in (libvirt.VIR_DOMAIN_RUNNING,
                         libvirt.VIR_DOMAIN_BLOCKED,
                         libvirt.VIR_DOMAIN_PAUSED):
            raise exception.VmStateConflict(
                action='suspend', user_id=vm.user_id,
                state=f'not running on the hypervisor ({_state_name(state)})')
        started = time.monotonic()
        self._call('save domain', dom.managedSave,
                   libvirt.VIR_DOMAIN_SAVE_RUNNING, conn=conn,
                   timeout=self.conf.libvirt.save_timeout)
        LOG.info('Saved domain %s of user %s to disk in %.2f s', vm.name,
                 vm.user_id, time.monotonic() - started)
        return True

    def resume(self, vm: objects.Vm) -> None:
        conn = self._conn()
        dom = self._require(vm, conn)
        state = self._call('read state', dom.state, conn=conn)[0]
        if state == libvirt.VIR_DOMAIN_PAUSED:
            self._call('resume domain', dom.resume, conn=conn)
        elif state in (libvirt.VIR_DOMAIN_SHUTOFF,
                       libvirt.VIR_DOMAIN_SHUTDOWN,
                       libvirt.VIR_DOMAIN_CRASHED):
            saved = self._call('read managed save', dom.hasManagedSaveImage,
                               0, conn=conn)
            started = time.monotonic()
            self._call('start domain', dom.create, conn=conn,
                       timeout=self.conf.libvirt.save_timeout if saved
                       else None)
            if saved:
                LOG.info('Restored domain %s of user %s from its managed '
                         'save in %.2f s', vm.name, vm.user_id,
                         time.monotonic() - started)
                # The live definition came back from the save image: give
                # it the metadata written while the domain was saved.
                self._call('refresh live metadata',
                           self._sync_live_metadata, dom, conn=conn)

    def _sync_live_metadata(self, dom) -> None:
        try:
            config = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                  vconfig.METADATA_NS,
                                  libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            live = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                vconfig.METADATA_NS,
                                libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            if vhost.error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return
            raise
        if config != live:
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, config,
                            vconfig.METADATA_PREFIX, vconfig.METADATA_NS,
                            libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def resize(self, vm: objects.Vm, new_type: flavors.VmType) -> None:
        conn = self._conn()
        dom, values = self._require_ours(vm, conn)
        max_vcpus, max_memory_kib = self._call(
            'read the maximums',
            lambda: (dom.vcpusFlags(libvirt.VIR_DOMAIN_VCPU_MAXIMUM),
                     dom.maxMemory()), conn=conn)
        max_memory = max_memory_kib // 1024
        if new_type.vcpus > max_vcpus:
            raise exception.VmStateConflict(
                action=f'resize to {new_type}', user_id=vm.user_id,
                state=f'defined with at most {max_vcpus} vCPUs '
                      '([libvirt] max_vcpus applies to new VMs)')
        if new_type.memory_mb > max_memory:
            raise exception.VmStateConflict(
                action=f'resize to {new_type}', user_id=vm.user_id,
                state=f'defined with at most {max_memory} MB of memory; '
                      'growth beyond a VM\'s own size is opt-in: set '
                      '[libvirt] max_memory_mb (applies to new VMs)')
        if new_type.disk_gb < vm.disk_gb:
            raise exception.InvalidRequest(
                reason=f'disk cannot shrink from {vm.disk_gb} GB to '
                       f'{new_type.disk_gb} GB')
        # The disk first: it is the step a hypervisor may refuse, and
        # nothing else has changed yet when it does.
        if new_type.disk_gb > vm.disk_gb:
            self._grow_disk(vm, dom, new_type.disk_gb)
        live = self._call('read state', dom.isActive, conn=conn)
        scopes = [libvirt.VIR_DOMAIN_AFFECT_CONFIG]
        if live:
            scopes.insert(0, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        for scope in scopes:
            if new_type.vcpus != vm.vcpus:
                self._set_vcpus(vm, dom, new_type.vcpus, scope)
            if new_type.memory_mb != vm.memory_mb:
                self._call('set memory', dom.setMemoryFlags,
                           new_type.memory_mb * 1024, scope, conn=conn)
        values = dict(values, vcpus=new_type.vcpus,
                      memory_mb=new_type.memory_mb,
                      disk_gb=new_type.disk_gb)
        values.setdefault('memory_max_mb', max_memory)
        self._call('update metadata', self._write_values, dom, values,
                   conn=conn)

    def _set_vcpus(self, vm: objects.Vm, dom, vcpus: int, scope: int) -> None:
        try:
            self._call('set vCPUs', dom.setVcpusFlags, vcpus, scope)
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
            self._host.call(dom.blockResize, 'vda', disk_gb * GiB,
                            libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES,
                            action='grow disk')
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
        # A lease is a local question to libvirtd: poll it often, so the
        # agent sees the address when the guest got it, not seconds later.
        return driver.poll_for_address(vm, self._find_ip, timeout,
                                       IP_POLL_INTERVAL, self._stopping)

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
                    dom.interfaceAddresses, code,
                    timeout=min(10, self.conf.libvirt.call_timeout),
                    action=f'read addresses ({source})')
            except (exception.DriverError, libvirt.libvirtError) as exc:
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
        records = self._call('read domain statistics',
                             conn.getAllDomainStats, groups, flags,
                             conn=conn)
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

    # -- observation and listing -------------------------------------------

    def _listing(self, conn) -> list[tuple]:
        """On a worker: ``(dom, state, reason)`` of every domain."""
        records = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0)
        return [(dom, stats.get('state.state', -1),
                 stats.get('state.reason', 0)) for dom, stats in records]

    def _instance(self, dom, values: dict, state: int,
                  reason: int) -> driver.Instance:
        """On a worker: the Instance of a domain whose metadata we read."""
        power, why = _power_state(state, reason)
        saved = False
        if state == libvirt.VIR_DOMAIN_SHUTOFF and dom.hasManagedSaveImage(0):
            power, saved, why = (driver.PowerState.SUSPENDED, True,
                                 'saved to disk (managed save)')
        memory_max = values.get('memory_max_mb') or dom.maxMemory() // 1024
        return driver.Instance(
            driver_id=dom.UUIDString(), name=dom.name(), power_state=power,
            user_id=values['user_id'], helper=values.get('helper', 0),
            os_type=values.get('os_type', 0),
            vcpus=values.get('vcpus', 1),
            memory_mb=values.get('memory_mb', 0),
            disk_gb=values.get('disk_gb', 0),
            gpu_cores=values.get('gpu_cores', 0),
            disk_path=values.get('disk'), image=values.get('image'),
            owner=values.get('owner'), vm_id=values.get('vm_id'),
            identity={field: values[field]
                      for field in vconfig.IDENTITY_FIELDS
                      if values.get(field) is not None},
            memory_max_mb=memory_max, saved=saved, state_reason=why)

    def _observe_domain(self, conn, dom, state: int,
                        reason: int) -> driver.Observation:
        """On a worker: classify one domain that exists."""
        name, uuid = dom.name(), dom.UUIDString()
        try:
            values = self._read_values(dom)
        except _NotOurs as exc:
            instance = None
            if exc.presence == Presence.FOREIGN:
                instance = self._instance(dom, exc.values, state, reason)
            return driver.Observation(exc.presence, instance=instance,
                                      name=name, driver_id=uuid,
                                      reason=exc.reason)
        return driver.Observation(
            Presence.OURS, instance=self._instance(dom, values, state,
                                                   reason),
            name=name, driver_id=uuid)

    def _observe_one(self, conn, vm: objects.Vm,
                     by_uuid: dict, by_name: dict) -> driver.Observation:
        entry = (by_uuid.get(vm.driver_id) if vm.driver_id
                 else by_name.get(vm.name))
        key = f'UUID {vm.driver_id}' if vm.driver_id else f'name {vm.name}'
        for attempt in (1, 2):
            try:
                if entry is None:
                    # Not in the listing: only a lookup may say it is gone.
                    dom = self._lookup_in(conn, vm)
                    if dom is None:
                        return driver.Observation(
                            Presence.ABSENT, driver_id=vm.driver_id,
                            reason=f'libvirt has no domain with {key}')
                    state, reason = dom.state()
                    entry = (dom, state, reason)
                return self._observe_domain(conn, *entry)
            except libvirt.libvirtError as exc:
                if vhost.is_connection_error(exc, conn):
                    raise
                if vhost.is_not_found(exc) and attempt == 1:
                    entry = None  # gone since the listing: confirm
                    continue
                return driver.Observation(
                    Presence.UNKNOWN, driver_id=vm.driver_id,
                    reason=f'libvirt failed on the domain with {key}: {exc}')
        raise AssertionError('unreachable')  # pragma: no cover

    def observe(self, vms: list[objects.Vm]) -> dict[str, driver.Observation]:
        """One listing of every domain (with its state), then one metadata
        read per record's domain; a UUID lookup only for the records whose
        domain is not in the listing. All of it under one deadline."""
        conn = self._conn()

        def observe_all() -> dict[str, driver.Observation]:
            listing = self._listing(conn)
            by_uuid = {entry[0].UUIDString(): entry for entry in listing}
            by_name = {entry[0].name(): entry for entry in listing}
            return {vm.name: self._observe_one(conn, vm, by_uuid, by_name)
                    for vm in vms}

        return self._call('observe domains', observe_all, conn=conn)

    def list_instances(self, owners: set[str] | None = None
                       ) -> list[driver.Instance]:
        owners = {self.conf.host} if owners is None else set(owners)
        conn = self._conn()

        def list_all() -> list[driver.Instance]:
            instances = []
            for dom, state, reason in self._listing(conn):
                try:
                    observation = self._observe_domain(conn, dom, state,
                                                       reason)
                except libvirt.libvirtError as exc:
                    if vhost.is_not_found(exc):
                        continue  # gone since the listing
                    raise
                instance = observation.instance
                if instance is not None and instance.owner in owners:
                    instances.append(instance)
            return instances

        return self._call('list domains', list_all, conn=conn)

    def get_instance(self, name: str) -> driver.Instance | None:
        """Our instance called ``name``, or None (absent or not ours).

        Kept for callers of the previous API; :meth:`observe` tells the
        cases apart.
        """
        conn = self._conn()
        probe = objects.Vm(user_id=0, name=name, vcpus=1, memory_mb=1,
                           disk_gb=0)

        def look() -> driver.Observation:
            return self._observe_one(conn, probe, {}, {})

        observation = self._call(f'read domain {name}', look, conn=conn)
        if observation.presence == Presence.UNKNOWN:
            raise exception.DriverError(action='read domain',
                                        reason=observation.reason)
        if observation.presence != Presence.OURS:
            return None
        return observation.instance

    # -- orphan disks -------------------------------------------------------

    def _is_pool_disk(self, path: str) -> bool:
        """A complete pool disk of the current normal template."""
        if self.conf.libvirt.image_pool_size <= 0:
            return False
        key = imagepool.template_key(self.conf.libvirt.normal_image)
        name = os.path.basename(path)
        return (name.startswith(f'{imagepool.POOL_PREFIX}{key}-') and
                not name.endswith('.part'))

    def cleanup_orphans(self, known_disks: set[str]) -> list[str]:
        """One pass of the delayed clean-up (:mod:`orphans`).

        Nothing happens when libvirt cannot list every domain's disks.
        """
        try:
            in_use = self._disks_in_use()
        except exception.DriverError as exc:
            LOG.info('Orphan disk clean-up skipped: %s', exc)
            return []
        with self._in_flight_lock:
            in_flight = set(self._in_flight)
        self._orphans.grace_period = \
            self.conf.libvirt.orphan_disk_grace_period
        return self._orphans.run(known_disks, in_use, in_flight)


def _identity_values(identity: dict | None) -> dict:
    identity = identity or {}
    return {field: identity.get(field) for field in vconfig.IDENTITY_FIELDS
            if identity.get(field) is not None}


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


def _reason_names(prefix: str) -> dict[int, str]:
    return {getattr(libvirt, name): name[len(prefix):].lower().replace(
        '_', ' ') for name in dir(libvirt) if name.startswith(prefix)}


_STATE_NAMES = {0: 'no state', 1: 'running', 2: 'blocked', 3: 'paused',
                4: 'shutting down', 5: 'shut off', 6: 'crashed',
                7: 'pmsuspended'}
_PAUSED_REASONS: dict[int, str] = {}
_SHUTOFF_REASONS: dict[int, str] = {}
if libvirt is not None:
    _PAUSED_REASONS = _reason_names('VIR_DOMAIN_PAUSED_')
    _SHUTOFF_REASONS = _reason_names('VIR_DOMAIN_SHUTOFF_')


def _state_name(state: int) -> str:
    return _STATE_NAMES.get(state, f'state {state}')


def _power_state(state: int, reason: int = 0
                 ) -> tuple[driver.PowerState, str]:
    """Power state and reason of a domain state and its reason code.

    A domain paused by a suspend (``VIR_DOMAIN_PAUSED_USER``, or while a
    managed save runs) is SUSPENDED; paused for any other reason (an I/O
    error, a watchdog, a failed migration, ...) it is ERROR, never
    SUSPENDED.
    """
    if state == libvirt.VIR_DOMAIN_PAUSED:
        why = 'paused: ' + _PAUSED_REASONS.get(reason, f'reason {reason}')
        if reason in (libvirt.VIR_DOMAIN_PAUSED_USER,
                      libvirt.VIR_DOMAIN_PAUSED_SAVE):
            return driver.PowerState.SUSPENDED, why
        return driver.PowerState.ERROR, why
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        why = 'shut off: ' + _SHUTOFF_REASONS.get(reason,
                                                  f'reason {reason}')
        if reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED:
            return driver.PowerState.CRASHED, why
        return driver.PowerState.SHUTOFF, why
    power = {
        libvirt.VIR_DOMAIN_RUNNING: driver.PowerState.RUNNING,
        libvirt.VIR_DOMAIN_BLOCKED: driver.PowerState.RUNNING,
        libvirt.VIR_DOMAIN_PMSUSPENDED: driver.PowerState.SUSPENDED,
        libvirt.VIR_DOMAIN_SHUTDOWN: driver.PowerState.SHUTOFF,
        libvirt.VIR_DOMAIN_CRASHED: driver.PowerState.CRASHED,
    }.get(state, driver.PowerState.UNKNOWN)
    why = '' if power == driver.PowerState.RUNNING else _state_name(state)
    return power, why

