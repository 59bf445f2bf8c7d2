"""The Nova driver: VMs as Nova servers, through openstacksdk.

``compute_driver = nova`` (or the deprecated ``openstack_support = true``).
One openstacksdk connection, built from a clouds.yaml cloud
(``[nova] cloud``) or from the keystoneauth options of ``[nova]``, serves
every call; keystoneauth re-authenticates when a token expires.

Each server carries our metadata (``rapid_owner`` = this agent's ``host``,
``rapid_user_id``, ``rapid_helper``, ``rapid_os_type``, the type, the memory
ceiling, the DS id ``rapid_vm_id`` and the VMM identity ``rapid_vmm_id``,
``rapid_slam_host``, ``rapid_slam_port``), so the agent's records can be
rebuilt from Nova alone. A server of another owner, or whose metadata is
missing or unreadable, is never changed or deleted.

Every HTTP request is bounded by ``[nova] api_timeout`` (the session's
timeout, on both the clouds.yaml and the keystoneauth path) and every wait
for a state by ``[nova] boot_timeout``.

Errors from the cloud become the typed errors of the VMM API by their
class (``openstack.exceptions``) and, for a server that failed, by its
``fault``: "No valid host" faults, 413 and over-quota 403 answers are
``NoCapacity``, a 409 is ``VmStateConflict``, anything else (4xx, 5xx,
timeouts, the API unreachable) ``DriverError``; a server that failed to
build is deleted before the error is raised.
"""

import concurrent.futures
import datetime
import threading
import time
from typing import Any

from keystoneauth1 import exceptions as ks_exceptions
from keystoneauth1 import loading as ks_loading
from oslo_config import cfg
from oslo_log import log as logging

from rapid_vmm import exception
from rapid_vmm import flavors
from rapid_vmm import objects
from rapid_vmm.virt import driver

LOG = logging.getLogger(__name__)

try:
    import openstack
    from openstack import exceptions as sdk_exceptions
except ImportError:  # pragma: no cover - a declared requirement
    openstack = None
    sdk_exceptions = None

GiB = 1024 ** 3
META_PREFIX = 'rapid_'
POLL_INTERVAL = 1.0
#: Microversion with standard diagnostics (memory_details, cpu_details).
DIAGNOSTICS_MICROVERSION = '2.48'

_POWER = {
    'ACTIVE': driver.PowerState.RUNNING,
    'VERIFY_RESIZE': driver.PowerState.RUNNING,
    'RESIZE': driver.PowerState.RUNNING,
    'REVERT_RESIZE': driver.PowerState.RUNNING,
    'MIGRATING': driver.PowerState.RUNNING,
    'REBOOT': driver.PowerState.RUNNING,
    'HARD_REBOOT': driver.PowerState.RUNNING,
    'SUSPENDED': driver.PowerState.SUSPENDED,
    'PAUSED': driver.PowerState.SUSPENDED,
    'SHELVED': driver.PowerState.SHUTOFF,
    'SHELVED_OFFLOADED': driver.PowerState.SHUTOFF,
    'SHUTOFF': driver.PowerState.SHUTOFF,
    'STOPPED': driver.PowerState.SHUTOFF,
    'SOFT_DELETED': driver.PowerState.SHUTOFF,
    'ERROR': driver.PowerState.ERROR,
    'BUILD': driver.PowerState.BUILDING,
}
#: Metadata keys of the VMM identity (``Instance.identity``).
IDENTITY_KEYS = ('vmm_id', 'slam_host', 'slam_port')
#: Integer identity values (the rest are strings).
_INT_IDENTITY = ('vmm_id', 'slam_port')

_CLOUD_ERRORS: tuple = (ks_exceptions.ClientException,)
if sdk_exceptions is not None:
    _CLOUD_ERRORS = (sdk_exceptions.SDKException,
                     ks_exceptions.ClientException)


def _first_line(text: str) -> str:
    text = (text or '').strip()
    return text.splitlines()[0] if text else ''


def translate(action: str, exc: Exception,
              user_id: int | None = None) -> exception.RapidVmmException:
    """Map an error of the cloud to the typed error of the VMM API, by its
    class (``openstack.exceptions``, ``keystoneauth1.exceptions``) and
    status code."""
    if isinstance(exc, exception.RapidVmmException):
        return exc
    text = _first_line(str(exc)) or type(exc).__name__
    if sdk_exceptions is not None:
        status = getattr(exc, 'status_code', None) \
            if isinstance(exc, sdk_exceptions.HttpException) else None
        if isinstance(exc, sdk_exceptions.ConflictException) or \
                status == 409:
            return exception.VmStateConflict(
                action=action, user_id=user_id,
                state=f'refused by Nova ({text})')
        if isinstance(exc, sdk_exceptions.ResourceTimeout):
            return exception.DriverError(action=action,
                                         reason=f'timed out: {text}')
        if isinstance(exc, sdk_exceptions.HttpException):
            details = str(exc.details or '')
            if status == 413 or (status == 403 and
                                 'quota' in details.lower()):
                return exception.NoCapacity(request=action,
                                            reason=details or text)
    if isinstance(exc, ks_exceptions.ConnectFailure):
        return exception.DriverError(
            action=action, reason=f'the cloud API is unreachable: {text}')
    if isinstance(exc, ks_exceptions.DiscoveryFailure):
        return exception.DriverError(
            action=action, reason=f'the cloud API is unreachable or its '
                                  f'endpoint cannot be discovered: {text}')
    if isinstance(exc, ks_exceptions.RequestTimeout):
        return exception.DriverError(
            action=action, reason=f'the cloud API did not answer in time: '
                                  f'{text}')
    return exception.DriverError(action=action, reason=text)


def translate_fault(action: str, fault: dict | None, user_id: int | None
                    = None) -> exception.RapidVmmException:
    """The typed error of a server that went to ERROR, from its ``fault``
    (``code``, ``message``): "No valid host" is ``NoCapacity``."""
    fault = fault or {}
    message = _first_line(fault.get('message', '')) or 'no fault recorded'
    if 'no valid host' in message.lower():
        return exception.NoCapacity(request=action, reason=message)
    code = fault.get('code')
    reason = f'the server failed: {message}'
    if code:
        reason += f' (fault {code})'
    return exception.DriverError(action=action, reason=reason)


class _NotOurs(Exception):
    """Internal: the metadata of a server cannot vouch for it."""

    def __init__(self, presence: driver.Presence, reason: str):
        super().__init__(reason)
        self.presence = presence
        self.reason = reason


class NovaDriver(driver.ComputeDriver):
    """Runs VMs as Nova servers (``compute_driver = nova``)."""

    name = 'nova'

    def __init__(self, conf: cfg.ConfigOpts):
        super().__init__(conf)
        self._conn = None
        self._lock = threading.Lock()
        self._flavor_ids: dict[str, str] = {}
        self._flavor_locks: dict[str, threading.Lock] = {}
        # First lookups of images and the network, one at a time: the
        # first request to a service also discovers its endpoint, and
        # concurrent discoveries fail.
        self._resolve_lock = threading.Lock()
        self._image_ids: dict[str, str] = {}
        self._network_id: str | None = None
        self._cpu_samples: dict[str, tuple[float, float]] = {}
        # Metadata Nova refused during VERIFY_RESIZE, written on confirm.
        self._pending_metadata: dict[str, dict[str, str]] = {}
        self._last_ok: float | None = None
        self._failing_since: float | None = None
        self._last_error = ''
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix='nova-call')

    # -- set-up -----------------------------------------------------------

    @classmethod
    def validate_config(cls, conf: cfg.ConfigOpts) -> None:
        if openstack is None:
            raise exception.ConfigError(
                reason='the nova driver needs openstacksdk')
        if not conf.nova.cloud and not conf.nova.auth_type:
            raise exception.ConfigError(
                reason='[nova] needs a clouds.yaml cloud (cloud = ...) or '
                       'keystoneauth options (auth_type, auth_url, ...)')
        if not conf.nova.linux_image:
            raise exception.ConfigError(
                reason='[nova] linux_image is not set')
        if not conf.nova.network:
            raise exception.ConfigError(reason='[nova] network is not set')
        grid = flavors.parse_grid(conf.vm_types)
        keys = {t.key for t in grid.types}
        for key in conf.nova.flavors:
            if key not in keys:
                raise exception.ConfigError(
                    reason=f'[nova] flavors: {key!r} is not a type of '
                           f'vm_types (types are vcpus_memoryMB_diskGB, '
                           f'e.g. {grid.smallest.key})')

    def init_host(self) -> None:
        """Connect once; the API need not answer yet (calls retry)."""
        self._conn = self._connect()

    def _connect(self):
        """One openstacksdk connection whose every request is bounded:
        ``api_timeout`` on the clouds.yaml path, the session's timeout
        (keystoneauth ``timeout``, else ``api_timeout``) on the other."""
        nova = self.conf.nova
        try:
            if nova.cloud:
                return openstack.connect(cloud=nova.cloud,
                                         region_name=nova.region_name,
                                         api_timeout=nova.api_timeout)
            auth = ks_loading.load_auth_from_conf_options(self.conf, 'nova')
            session = ks_loading.load_session_from_conf_options(
                self.conf, 'nova', auth=auth)
            if session.timeout is None:
                session.timeout = float(nova.api_timeout)
            return openstack.connection.Connection(
                session=session, region_name=nova.region_name,
                api_timeout=nova.api_timeout)
        except _CLOUD_ERRORS as exc:
            raise exception.ConfigError(
                reason=f'[nova] cannot build a connection: {exc}') from exc

    def cleanup_host(self) -> None:
        self._stopping.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                LOG.debug('Closing the openstacksdk connection failed',
                          exc_info=True)

    @property
    def compute(self):
        return self._conn.compute

    def connection_state(self) -> str:
        where = (f'cloud {self.conf.nova.cloud}' if self.conf.nova.cloud
                 else f'{self.conf.nova.auth_url or "keystoneauth options"}')
        with self._lock:
            if self._failing_since is not None:
                return (f'{where}: failing since '
                        f'{_iso(self._failing_since)} ({self._last_error})')
            if self._last_ok is not None:
                return f'{where}: answering (last call {_iso(self._last_ok)})'
        return f'{where}: not asked yet'

    def _call(self, action: str, func, *args, user_id: int | None = None,
              **kwargs):
        """One request to the cloud; its errors become typed errors."""
        try:
            result = func(*args, **kwargs)
        except _CLOUD_ERRORS as exc:
            self._note(exc)
            raise translate(action, exc, user_id) from exc
        self._note(None)
        return result

    def _note(self, exc: Exception | None) -> None:
        # An answer of the API (4xx) means it is reachable.
        reached = exc is None or (
            sdk_exceptions is not None and
            isinstance(exc, sdk_exceptions.HttpException) and
            (exc.status_code or 500) < 500)
        with self._lock:
            if reached:
                self._last_ok = time.time()
                self._failing_since = None
                self._last_error = ''
            else:
                if self._failing_since is None:
                    self._failing_since = time.time()
                self._last_error = _first_line(str(exc))

    # -- what a server is made of -------------------------------------------

    def _flavor_id(self, vm_type: flavors.VmType) -> str:
        """The flavor of ``vm_type``; created on first use when allowed.

        One creation at a time per type in this agent; a 409 on create
        means another agent (or request) made it first: it is looked up
        again.
        """
        key = vm_type.key
        with self._lock:
            cached = self._flavor_ids.get(key)
            lock = self._flavor_locks.setdefault(key, threading.Lock())
        if cached:
            return cached
        wanted = self.conf.nova.flavors.get(key) or f'rapid.{key}'
        with lock:
            with self._lock:
                cached = self._flavor_ids.get(key)
            if cached:
                return cached
            flavor = self._call('choose a flavor', self.compute.find_flavor,
                                wanted, ignore_missing=True)
            if flavor is None:
                flavor = self._create_flavor(wanted, vm_type)
            with self._lock:
                self._flavor_ids[key] = flavor.id
        return flavor.id

    def _create_flavor(self, wanted: str, vm_type: flavors.VmType):
        if not self.conf.nova.create_flavors:
            raise exception.DriverError(
                action='choose a flavor',
                reason=f'flavor {wanted!r} of type {vm_type.key} does not '
                       'exist (create it, map the type in [nova] flavors, '
                       'or set [nova] create_flavors)')
        LOG.info('Creating flavor %s for type %s', wanted, vm_type.key)
        try:
            return self.compute.create_flavor(
                name=wanted, vcpus=vm_type.vcpus, ram=vm_type.memory_mb,
                disk=vm_type.disk_gb, is_public=True)
        except sdk_exceptions.ConflictException:
            LOG.info('Flavor %s was created meanwhile by someone else; '
                     'using it', wanted)
        except _CLOUD_ERRORS as exc:
            self._note(exc)
            raise translate(f'create flavor {wanted}', exc) from exc
        # Nova answers 409 before the other creator's flavor is listed.
        flavor = driver.poll(
            lambda: self._call('choose a flavor', self.compute.find_flavor,
                               wanted, ignore_missing=True), 4, 0.5,
            self._stopping)
        if flavor is not None:
            return flavor
        raise exception.DriverError(
            action='choose a flavor',
            reason=f'flavor {wanted!r} exists (Nova said 409) but cannot be '
                   'found')

    def _image_option(self, vm: objects.Vm) -> str:
        nova = self.conf.nova
        if int(vm.os_type) == objects.OsType.ANDROID:
            name = (nova.android_helper_image if vm.is_helper else None) \
                or nova.android_image
            if not name:
                raise exception.InvalidRequest(
                    reason='no Android image is configured on this host '
                           '([nova] android_image)')
            return name
        return (nova.linux_helper_image if vm.is_helper else None) \
            or nova.linux_image

    def _image_id(self, vm: objects.Vm) -> str:
        name = self._image_option(vm)
        with self._lock:
            cached = self._image_ids.get(name)
        if cached:
            return cached
        with self._resolve_lock:
            with self._lock:
                cached = self._image_ids.get(name)
            if cached:
                return cached
            image = self._call('choose an image',
                               self._conn.image.find_image, name,
                               ignore_missing=True)
            if image is None:
                raise exception.DriverError(
                    action='choose an image',
                    reason=f'image {name!r} not found')
            with self._lock:
                self._image_ids[name] = image.id
        return image.id

    def _network(self) -> str:
        with self._resolve_lock:
            if self._network_id is None:
                network = self._call(
                    'choose a network', self._conn.network.find_network,
                    self.conf.nova.network, ignore_missing=True)
                if network is None:
                    raise exception.DriverError(
                        action='choose a network',
                        reason=f'network {self.conf.nova.network!r} not '
                               'found')
                self._network_id = network.id
            return self._network_id

    def _metadata(self, vm: objects.Vm,
                  identity: dict | None = None) -> dict[str, str]:
        meta = {'owner': self.conf.host, 'user_id': vm.user_id,
                'helper': vm.helper, 'os_type': int(vm.os_type),
                'gpu_cores': vm.gpu_cores,
                'type': flavors.VmType(vm.vcpus, vm.memory_mb,
                                       vm.disk_gb).key,
                'memory_max_mb': self.memory_ceiling_mb(vm.memory_mb),
                'vm_id': vm.vm_id}
        meta.update({key: (identity or {}).get(key) for key in IDENTITY_KEYS})
        return {f'{META_PREFIX}{key}': str(value)
                for key, value in meta.items() if value is not None}

    # -- life cycle -------------------------------------------------------

    def host_capacity(self) -> driver.HostCapacity:
        """Total capacity of the compute nodes, from placement.

        Falls back to the hypervisor API (microversion 2.87, the last with
        sizes) when placement cannot be asked.
        """
        try:
            return self._capacity_from_placement()
        except _CLOUD_ERRORS as exc:
            LOG.info('Placement unavailable (%s); asking the hypervisors',
                     exc)
        response = self._call('read the capacity of the cloud',
                              self.compute.get, '/os-hypervisors/detail',
                              microversion='2.87')
        try:
            response.raise_for_status()
        except Exception as exc:
            raise exception.DriverError(
                action='read the capacity of the cloud',
                reason=str(exc)) from exc
        hypervisors = response.json().get('hypervisors', [])
        return driver.HostCapacity(
            vcpus=sum(h.get('vcpus', 0) for h in hypervisors),
            memory_mb=sum(h.get('memory_mb', 0) for h in hypervisors),
            disk_gb=sum(h.get('local_gb', 0) for h in hypervisors))

    def _capacity_from_placement(self) -> driver.HostCapacity:
        totals = {'VCPU': 0, 'MEMORY_MB': 0, 'DISK_GB': 0}
        placement = self._conn.placement
        for provider in placement.resource_providers():
            for inventory in placement.resource_provider_inventories(
                    provider):
                name = inventory.resource_class
                if name in totals:
                    totals[name] += int(inventory.total) - int(
                        inventory.reserved or 0)
        return driver.HostCapacity(vcpus=totals['VCPU'],
                                   memory_mb=totals['MEMORY_MB'],
                                   disk_gb=totals['DISK_GB'])

    def create(self, vm: objects.Vm,
               identity: dict | None = None) -> driver.CreateResult:
        vm_type = flavors.VmType(vm.vcpus, vm.memory_mb, vm.disk_gb)
        image_option = self._image_option(vm)   # InvalidRequest first
        server = None
        try:
            args: dict[str, Any] = {
                'name': vm.name,
                'flavor_id': self._flavor_id(vm_type),
                'image_id': self._image_id(vm),
                'networks': [{'uuid': self._network()}],
                'metadata': self._metadata(vm, identity),
            }
            if self.conf.nova.key_name:
                args['key_name'] = self.conf.nova.key_name
            if self.conf.nova.security_group:
                args['security_groups'] = [
                    {'name': self.conf.nova.security_group}]
            server = self._call('create the server',
                                self.compute.create_server,
                                user_id=vm.user_id, **args)
            server = self._wait(server, 'ACTIVE', 'boot the server', vm)
        except Exception as exc:
            LOG.warning('Creating %s failed (%s); removing what was made',
                        vm.name, exc)
            self._delete_quietly(server.id if server is not None else None,
                                 vm.name)
            if isinstance(exc, exception.RapidVmmException):
                raise
            if isinstance(exc, _CLOUD_ERRORS):
                raise translate('create the server', exc,
                                vm.user_id) from exc
            raise
        LOG.info('Server %s (%s) of user %s is ACTIVE', vm.name, server.id,
                 vm.user_id)
        return driver.CreateResult(driver_id=server.id, image=image_option)

    def _wait(self, server, status: str, action: str, vm: objects.Vm):
        """Wait (``boot_timeout`` at most) for ``status``; a server that
        goes to ERROR is translated from its fault."""
        try:
            return self.compute.wait_for_server(
                server, status=status, failures=['ERROR'],
                interval=POLL_INTERVAL, wait=self.conf.nova.boot_timeout)
        except sdk_exceptions.ResourceFailure as exc:
            raise translate_fault(action, self._fault(server),
                                  vm.user_id) from exc
        except sdk_exceptions.ResourceTimeout as exc:
            raise exception.DriverError(
                action=action, reason=f'{vm.name} not {status} within '
                f'{self.conf.nova.boot_timeout} s') from exc
        except _CLOUD_ERRORS as exc:
            self._note(exc)
            raise translate(action, exc, vm.user_id) from exc

    def _fault(self, server) -> dict | None:
        try:
            fresh = self.compute.get_server(server.id)
        except _CLOUD_ERRORS as exc:
            LOG.debug('No fault of %s: %s', server.id, exc)
            return None
        return getattr(fresh, 'fault', None) or None

    def _find_server(self, vm: objects.Vm, any_owner: bool = False):
        """The server of ``vm``: by id, else by name (a crash mid-create
        may have left no id in the record), preferring ours; None when
        Nova says there is none.

        :raises DriverError: when Nova cannot be asked.
        """
        try:
            if vm.driver_id:
                server = self.compute.get_server(vm.driver_id)
                return None if server.status == 'DELETED' else server
            servers = list(self.compute.servers(details=True,
                                                name=f'^{vm.name}$'))
        except sdk_exceptions.NotFoundException:
            return None
        except _CLOUD_ERRORS as exc:
            self._note(exc)
            raise translate('find the server', exc, vm.user_id) from exc
        self._note(None)
        servers = [s for s in servers if s.name == vm.name]
        for server in servers:
            if (server.metadata or {}).get(
                    f'{META_PREFIX}owner') == self.conf.host:
                return server
        return servers[0] if servers and any_owner else None

    def _require(self, vm: objects.Vm):
        server = self._find_server(vm)
        if server is None:
            raise exception.DriverError(
                action='find the server',
                reason=f'{vm.name} does not exist in Nova')
        return server

    def _require_ours(self, vm: objects.Vm, claim_from: str | None = None):
        """The server of ``vm`` and its parsed metadata, when ours.

        :raises InstanceNotOurs: for a foreign or unreadable server.
        """
        server = self._find_server(vm, any_owner=True)
        if server is None:
            raise exception.DriverError(
                action='find the server',
                reason=f'{vm.name} does not exist in Nova')
        try:
            self._read_metadata(server, claim_from)
        except _NotOurs as exc:
            raise exception.InstanceNotOurs(name=vm.name, user_id=vm.user_id,
                                            reason=exc.reason) from None
        return server

    def _delete_quietly(self, server_id: str | None, name: str) -> None:
        try:
            if server_id is None:
                probe = objects.Vm(user_id=0, name=name, vcpus=1,
                                   memory_mb=1, disk_gb=0)
                server = self._find_server(probe)   # ours only
                server_id = server.id if server is not None else None
            if server_id is not None:
                self._delete(server_id)
        except Exception as exc:  # noqa: BLE001 - clean-up must go on
            LOG.error('Removing server %s failed: %s; reconciliation will '
                      'retry', name, exc)

    def _delete(self, server_id: str) -> None:
        server = self.compute.get_server(server_id)
        self.compute.delete_server(server, ignore_missing=True)
        self.compute.wait_for_delete(server, interval=POLL_INTERVAL,
                                     wait=self.conf.nova.boot_timeout)

    def destroy(self, vm: objects.Vm) -> None:
        server = self._find_server(vm, any_owner=True)
        if server is None:
            return
        try:
            self._read_metadata(server)
        except _NotOurs as exc:
            LOG.warning('Refusing to delete server %s (%s) of user %s: %s',
                        vm.name, server.id, vm.user_id, exc.reason)
            raise exception.InstanceNotOurs(name=vm.name, user_id=vm.user_id,
                                            reason=exc.reason) from None
        try:
            self._delete(server.id)
        except sdk_exceptions.NotFoundException:
            return
        except sdk_exceptions.ResourceTimeout as exc:
            raise exception.DriverError(
                action='delete the server',
                reason=f'{vm.name} still exists after '
                       f'{self.conf.nova.boot_timeout} s') from exc
        except _CLOUD_ERRORS as exc:
            self._note(exc)
            raise translate('delete the server', exc, vm.user_id) from exc
        with self._lock:
            self._cpu_samples.pop(vm.name, None)
            self._pending_metadata.pop(server.id, None)
        LOG.info('Deleted server %s of user %s', vm.name, vm.user_id)

    def suspend(self, vm: objects.Vm) -> bool:
        """Nova's suspend saves the guest's memory to disk: True."""
        server = self._require(vm)
        if server.status == 'SUSPENDED':
            return True
        self._call('suspend', self.compute.suspend_server, server,
                   user_id=vm.user_id)
        self._wait(server, 'SUSPENDED', 'suspend', vm)
        return True

    def resume(self, vm: objects.Vm) -> None:
        server = self._require(vm)
        if server.status == 'ACTIVE':
            return
        if server.status == 'SHUTOFF':
            self._call('resume', self.compute.start_server, server,
                       user_id=vm.user_id)
        elif server.status == 'PAUSED':
            self._call('resume', self.compute.unpause_server, server,
                       user_id=vm.user_id)
        else:
            self._call('resume', self.compute.resume_server, server,
                       user_id=vm.user_id)
        self._wait(server, 'ACTIVE', 'resume', vm)

    def resize(self, vm: objects.Vm, new_type: flavors.VmType) -> None:
        server = self._require(vm)
        flavor_id = self._flavor_id(new_type)
        self._call(f'resize to {new_type.key}', self.compute.resize_server,
                   server, flavor_id, user_id=vm.user_id)
        self._wait(server, 'VERIFY_RESIZE', f'resize to {new_type.key}', vm)

    def confirm_resize(self, vm: objects.Vm) -> None:
        server = self._require(vm)
        if server.status != 'VERIFY_RESIZE':
            self._write_pending(server)
            return  # confirmed already (or nothing to confirm)
        self._call('confirm the resize', self.compute.confirm_server_resize,
                   server, user_id=vm.user_id)
        server = self._wait(server, 'ACTIVE', 'confirm the resize', vm)
        # Nova refuses metadata changes while a resize waits: record the
        # new type now (and what update_metadata could not write).
        flavor = server.flavor
        with self._lock:
            pending = self._pending_metadata.setdefault(server.id, {})
            pending[f'{META_PREFIX}type'] = (
                f'{flavor.vcpus}_{flavor.ram}_{flavor.disk}')
            pending[f'{META_PREFIX}memory_max_mb'] = str(flavor.ram)
        self._write_pending(server)

    def _write_pending(self, server) -> None:
        with self._lock:
            pending = self._pending_metadata.pop(server.id, None)
        if not pending:
            return
        try:
            self._call('record the metadata',
                       self.compute.set_server_metadata, server, **pending)
        except exception.RapidVmmException as exc:
            LOG.warning('Cannot record the metadata of %s (%s): %s',
                        server.name, exc, sorted(pending))
            with self._lock:
                self._pending_metadata.setdefault(server.id, pending)

    def update_metadata(self, vm: objects.Vm, identity: dict,
                        claim_from: str | None = None) -> bool:
        """Write the DS id, the identity and this ``host`` as owner.

        Returns False when Nova refuses metadata changes right now (a
        resize waits for its confirmation): the values are then written
        by :meth:`confirm_resize`.
        """
        server = self._require_ours(vm, claim_from)
        owner = (server.metadata or {}).get(f'{META_PREFIX}owner')
        if owner != self.conf.host:
            LOG.warning('Taking over server %s of user %s from %s (now %r)',
                        vm.name, vm.user_id, f'host {owner!r}' if owner
                        else 'the Java VMM (no metadata)', self.conf.host)
        meta = self._metadata(vm, identity)
        if vm.memory_max_mb:
            meta[f'{META_PREFIX}memory_max_mb'] = str(vm.memory_max_mb)
        stale = [f'{META_PREFIX}{key}' for key in IDENTITY_KEYS
                 if f'{META_PREFIX}{key}' not in meta and
                 f'{META_PREFIX}{key}' in (server.metadata or {})]
        try:
            self.compute.set_server_metadata(server, **meta)
            if stale:
                # By id: openstacksdk pops each key from the Server's local
                # metadata, which set_server_metadata just replaced with
                # ``meta``, and raises KeyError for a key not in it.
                self.compute.delete_server_metadata(server.id, stale)
        except sdk_exceptions.ConflictException as exc:
            status = getattr(self._call('read the server',
                                        self.compute.get_server, server.id),
                             'status', None)
            if status != 'VERIFY_RESIZE':
                raise translate('update the metadata', exc,
                                vm.user_id) from exc
            LOG.info('Nova refuses metadata changes of %s while its resize '
                     'waits; they are written when it is confirmed',
                     vm.name)
            with self._lock:
                self._pending_metadata.setdefault(server.id, {}).update(
                    meta)
            return False
        except _CLOUD_ERRORS as exc:
            self._note(exc)
            raise translate('update the metadata', exc, vm.user_id) from exc
        self._note(None)
        return True

    # -- addresses --------------------------------------------------------

    def wait_for_ip(self, vm: objects.Vm,
                    timeout: float | None = None) -> str:
        if timeout is None:
            timeout = self.conf.nova.boot_timeout
        return driver.poll_for_address(vm, self._ip_from_ports, timeout,
                                       POLL_INTERVAL, self._stopping,
                                       what='fixed IP')

    def _ip_from_ports(self, vm: objects.Vm) -> str | None:
        if not vm.driver_id:
            return None
        try:
            ports = list(self._conn.network.ports(device_id=vm.driver_id))
        except _CLOUD_ERRORS as exc:
            LOG.debug('No ports of %s yet: %s', vm.name, exc)
            return None
        addresses = [fixed.get('ip_address') for port in ports
                     for fixed in (port.fixed_ips or [])]
        addresses = [a for a in addresses if a]
        addresses.sort(key=lambda a: ':' in a)  # IPv4 first
        return addresses[0] if addresses else None

    # -- usage ------------------------------------------------------------

    def usage(self, vms: list[objects.Vm],
              resource: str) -> dict[int, dict[str, Any]]:
        """Usage from server diagnostics, fetched in parallel.

        Nova has no bulk call: one diagnostics request per server, at
        most 8 at a time, each bounded by ``api_timeout``.
        """
        if resource == 'disk':
            # Diagnostics carry I/O counters, not sizes: the flavor's disk
            # is the capacity; what the guest wrote is not known.
            return {vm.user_id: {'capacity_bytes': vm.disk_gb * GiB,
                                 'allocation_bytes': None,
                                 'source': 'flavor'} for vm in vms}
        futures = {vm.user_id: self._executor.submit(self._diagnostics, vm)
                   for vm in vms}
        now = time.monotonic()
        deadline = now + 2 * self.conf.nova.api_timeout
        result = {}
        for vm in vms:
            try:
                diagnostics = futures[vm.user_id].result(
                    timeout=max(deadline - time.monotonic(), 0))
            except (concurrent.futures.TimeoutError,
                    exception.DriverError) as exc:
                LOG.warning('No diagnostics of %s: %s', vm.name, exc)
                diagnostics = None
            if resource == 'cpu':
                result[vm.user_id] = self._cpu_usage(vm, diagnostics, now)
            else:
                result[vm.user_id] = _memory_usage(vm, diagnostics)
        return result

    def _diagnostics(self, vm: objects.Vm) -> dict | None:
        if not vm.driver_id:
            return None
        response = self._call('read diagnostics', self.compute.get,
                              f'/servers/{vm.driver_id}/diagnostics',
                              microversion=DIAGNOSTICS_MICROVERSION,
                              user_id=vm.user_id)
        if not response.ok:
            raise exception.DriverError(
                action='read diagnostics',
                reason=f'HTTP {response.status_code} for {vm.name}')
        return response.json()

    def _cpu_usage(self, vm: objects.Vm, diagnostics: dict | None,
                   now: float) -> dict:
        details = (diagnostics or {}).get('cpu_details') or []
        utilisations = [d.get('utilisation') for d in details
                        if d.get('utilisation') is not None]
        if utilisations:
            return {'cpu_util_percent': round(
                sum(utilisations) / len(utilisations), 2),
                'source': 'diagnostics'}
        times = [d.get('time') for d in details if d.get('time') is not None]
        if not times:
            return {'cpu_util_percent': None, 'source': 'unavailable'}
        cpu_ns = float(sum(times))
        with self._lock:
            previous = self._cpu_samples.get(vm.name)
            self._cpu_samples[vm.name] = (now, cpu_ns)
        if previous is None or now <= previous[0]:
            return {'cpu_util_percent': None, 'source': 'first-sample'}
        elapsed = now - previous[0]
        percent = 100.0 * max(cpu_ns - previous[1], 0) / (
            elapsed * 1e9 * max(len(times), 1))
        return {'cpu_util_percent': round(min(percent, 100.0), 2),
                'source': 'diagnostics.cpu_time'}

    # -- observation and listing ---------------------------------------------

    def _read_metadata(self, server, claim_from: str | None = None) -> dict:
        """Our metadata of ``server``, parsed.

        :raises _NotOurs: missing, malformed, without an owner, or owned
            by another ``host`` than ours (or ``claim_from``).
        """
        meta = server.metadata or {}
        if not any(key.startswith(META_PREFIX) for key in meta):
            if claim_from == driver.CLAIM_UNMARKED:
                return {}  # an imported server, taken over by its id
            raise _NotOurs(driver.Presence.UNREADABLE,
                           'no rapid-vmm metadata')
        values = _parse_metadata(meta)
        if values is None:
            raise _NotOurs(driver.Presence.UNREADABLE,
                           f'malformed rapid-vmm metadata {meta}')
        owner = values.get('owner')
        if not owner:
            raise _NotOurs(driver.Presence.UNREADABLE,
                           'rapid-vmm metadata without an owner')
        if owner != self.conf.host and (not claim_from or
                                        owner != claim_from):
            raise _NotOurs(driver.Presence.FOREIGN, f'owned by {owner!r}')
        return values

    def _instance_of_values(self, server, values: dict) -> driver.Instance:
        vcpus, memory_mb, disk_gb = values['type']
        flavor = getattr(server, 'flavor', None)
        if flavor is not None and getattr(flavor, 'vcpus', None):
            vcpus, memory_mb, disk_gb = (flavor.vcpus, flavor.ram,
                                         flavor.disk)
        status = server.status
        power = _POWER.get(status, driver.PowerState.UNKNOWN)
        reason = '' if power == driver.PowerState.RUNNING else \
            (status or '').lower()
        if status == 'ERROR':
            fault = getattr(server, 'fault', None) or {}
            reason = _first_line(fault.get('message', '')) or \
                'error (no fault recorded)'
        image = getattr(server, 'image', None)
        return driver.Instance(
            driver_id=server.id, name=server.name, power_state=power,
            user_id=values['user_id'], helper=values.get('helper', 0),
            os_type=values.get('os_type', 0),
            vcpus=vcpus, memory_mb=memory_mb, disk_gb=disk_gb,
            gpu_cores=values.get('gpu_cores', 0),
            image=image.get('id') if isinstance(image, dict) else None,
            owner=values.get('owner'), vm_id=values.get('vm_id'),
            identity={key: values[key] for key in IDENTITY_KEYS
                      if values.get(key) is not None},
            memory_max_mb=memory_mb,
            saved=status == 'SUSPENDED', state_reason=reason)

    def _observation(self, server) -> driver.Observation:
        try:
            values = self._read_metadata(server)
        except _NotOurs as exc:
            instance = None
            if exc.presence == driver.Presence.FOREIGN:
                instance = self._instance_of_values(
                    server, _parse_metadata(server.metadata))
            return driver.Observation(exc.presence, instance=instance,
                                      name=server.name, driver_id=server.id,
                                      reason=exc.reason)
        return driver.Observation(
            driver.Presence.OURS,
            instance=self._instance_of_values(server, values),
            name=server.name, driver_id=server.id)

    def _servers(self) -> list:
        return self._call('list servers', lambda: list(
            self.compute.servers(details=True)))

    def observe(self, vms: list[objects.Vm]) -> dict[str, driver.Observation]:
        """One listing of the project's servers; ``get_server(id)`` only
        for the records whose server is not in it (404: ABSENT)."""
        servers = self._servers()
        by_id = {server.id: server for server in servers}
        by_name: dict[str, list] = {}
        for server in servers:
            by_name.setdefault(server.name, []).append(server)
        result = {}
        for vm in vms:
            result[vm.name] = self._observe_one(vm, by_id, by_name)
        return result

    def _observe_one(self, vm: objects.Vm, by_id: dict,
                     by_name: dict) -> driver.Observation:
        if not vm.driver_id:
            candidates = by_name.get(vm.name, [])
            if not candidates:
                return driver.Observation(
                    driver.Presence.ABSENT,
                    reason=f'Nova lists no server called {vm.name}')
            observations = [self._observation(s) for s in candidates]
            ours = [o for o in observations
                    if o.presence == driver.Presence.OURS]
            return (ours or observations)[0]
        server = by_id.get(vm.driver_id)
        if server is None:
            try:
                server = self.compute.get_server(vm.driver_id)
            except sdk_exceptions.NotFoundException:
                return driver.Observation(
                    driver.Presence.ABSENT, driver_id=vm.driver_id,
                    reason=f'Nova has no server {vm.driver_id}')
            except _CLOUD_ERRORS as exc:
                self._note(exc)
                return driver.Observation(
                    driver.Presence.UNKNOWN, driver_id=vm.driver_id,
                    reason=f'Nova failed on server {vm.driver_id}: '
                           f'{_first_line(str(exc))}')
        if server.status == 'DELETED':
            return driver.Observation(
                driver.Presence.ABSENT, driver_id=vm.driver_id,
                reason=f'server {vm.driver_id} is deleted')
        return self._observation(server)

    def list_instances(self, owners: set[str] | None = None
                       ) -> list[driver.Instance]:
        owners = {self.conf.host} if owners is None else set(owners)
        instances = []
        for server in self._servers():
            observation = self._observation(server)
            instance = observation.instance
            if instance is not None and instance.owner in owners:
                instances.append(instance)
        return instances

    def get_instance(self, name: str) -> driver.Instance | None:
        """Our server called ``name``, or None (kept for callers of the
        previous API; :meth:`observe` tells the cases apart)."""
        probe = objects.Vm(user_id=0, name=name, vcpus=1, memory_mb=1,
                           disk_gb=0)
        server = self._find_server(probe)
        if server is None:
            return None
        observation = self._observation(server)
        return observation.instance \
            if observation.presence == driver.Presence.OURS else None


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(
        timestamp, tz=datetime.UTC).isoformat(timespec='seconds')


def _parse_metadata(meta: dict | None) -> dict | None:
    """Our fields of a server's metadata, or None when malformed."""
    meta = meta or {}

    def get(key):
        return meta.get(f'{META_PREFIX}{key}')

    try:
        values: dict[str, Any] = {'owner': get('owner') or None,
                                  'user_id': int(get('user_id'))}
        for key in ('helper', 'os_type', 'gpu_cores', 'vm_id',
                    'memory_max_mb'):
            if get(key) not in (None, ''):
                values[key] = int(get(key))
        vcpus, memory_mb, disk_gb = (int(v) for v in (
            get('type') or '0_0_0').split('_'))
        values['type'] = (vcpus, memory_mb, disk_gb)
        for key in IDENTITY_KEYS:
            if get(key) not in (None, ''):
                values[key] = int(get(key)) if key in _INT_IDENTITY \
                    else get(key)
    except (TypeError, ValueError):
        return None
    return values


def _memory_usage(vm: objects.Vm, diagnostics: dict | None) -> dict:
    details = (diagnostics or {}).get('memory_details') or {}
    maximum = details.get('maximum')
    used = details.get('used')
    if maximum is None and used is None:
        return {'memory_mb': vm.memory_mb, 'memory_used_mb': None,
                'source': 'flavor'}
    return {'memory_mb': int(maximum) if maximum is not None
            else vm.memory_mb,
            'memory_used_mb': int(used) if used is not None else None,
            'source': 'diagnostics'}
