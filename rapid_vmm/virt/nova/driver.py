"""The Nova driver: VMs as Nova servers, through openstacksdk.

``compute_driver = nova`` (or the deprecated ``openstack_support = true``).
One openstacksdk connection, built from a clouds.yaml cloud
(``[nova] cloud``) or from the keystoneauth options of ``[nova]``, serves
every call; keystoneauth re-authenticates when a token expires.

Each server carries our metadata (``rapid_owner`` = this agent's ``host``,
``rapid_user_id``, ``rapid_helper``, ``rapid_os_type`` and the type), so the
agent's records can be rebuilt from Nova alone, and only servers of this
agent are ever touched.

Errors from the cloud become the typed errors of the VMM API: no valid host
or an exceeded quota is ``NoCapacity``, a conflict is ``VmStateConflict``,
anything else (4xx, 5xx, timeouts, the API unreachable) ``DriverError``;
a server that failed to build is deleted before the error is raised.
"""

import concurrent.futures
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
    'ERROR': driver.PowerState.CRASHED,
    'BUILD': driver.PowerState.BUILDING,
}

_CLOUD_ERRORS: tuple = (ks_exceptions.ClientException,)
if sdk_exceptions is not None:
    _CLOUD_ERRORS = (sdk_exceptions.SDKException,
                     ks_exceptions.ClientException)


def translate(action: str, exc: Exception,
              user_id: int | None = None) -> exception.RapidVmmException:
    """Map an error of the cloud to the typed error of the VMM API."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else \
        type(exc).__name__
    status = getattr(exc, 'status_code', None)
    lowered = text.lower()
    over_quota = 'quota' in lowered and ('exceed' in lowered or
                                         status in (403, 413))
    if 'no valid host' in lowered or over_quota or status == 413:
        return exception.NoCapacity(request=action, reason=text)
    if status == 409:
        return exception.VmStateConflict(action=action, user_id=user_id,
                                         state=f'refused by Nova ({text})')
    if isinstance(exc, ks_exceptions.ConnectFailure):
        text = f'the cloud API is unreachable: {text}'
    return exception.DriverError(action=action, reason=text)


class NovaDriver(driver.ComputeDriver):
    """Runs VMs as Nova servers (``compute_driver = nova``)."""

    name = 'nova'

    def __init__(self, conf: cfg.ConfigOpts):
        super().__init__(conf)
        self._conn = None
        self._lock = threading.Lock()
        self._flavor_ids: dict[str, str] = {}
        self._image_ids: dict[str, str] = {}
        self._network_id: str | None = None
        self._cpu_samples: dict[str, tuple[float, float]] = {}
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
        nova = self.conf.nova
        try:
            if nova.cloud:
                return openstack.connect(cloud=nova.cloud,
                                         region_name=nova.region_name)
            auth = ks_loading.load_auth_from_conf_options(self.conf, 'nova')
            session = ks_loading.load_session_from_conf_options(
                self.conf, 'nova', auth=auth)
            return openstack.connection.Connection(
                session=session, region_name=nova.region_name)
        except _CLOUD_ERRORS as exc:
            raise exception.ConfigError(
                reason=f'[nova] cannot build a connection: {exc}') from exc

    def cleanup_host(self) -> None:
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

    # -- what a server is made of -------------------------------------------

    def _flavor_id(self, vm_type: flavors.VmType) -> str:
        key = vm_type.key
        with self._lock:
            cached = self._flavor_ids.get(key)
        if cached:
            return cached
        wanted = self.conf.nova.flavors.get(key) or f'rapid.{key}'
        flavor = self.compute.find_flavor(wanted, ignore_missing=True)
        if flavor is None:
            if not self.conf.nova.create_flavors:
                raise exception.DriverError(
                    action='choose a flavor',
                    reason=f'flavor {wanted!r} of type {key} does not exist '
                           '(create it, map the type in [nova] flavors, or '
                           'set [nova] create_flavors)')
            LOG.info('Creating flavor %s for type %s', wanted, key)
            flavor = self.compute.create_flavor(
                name=wanted, vcpus=vm_type.vcpus, ram=vm_type.memory_mb,
                disk=vm_type.disk_gb, is_public=True)
        with self._lock:
            self._flavor_ids[key] = flavor.id
        return flavor.id

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
        image = self._conn.image.find_image(name, ignore_missing=True)
        if image is None:
            raise exception.DriverError(action='choose an image',
                                        reason=f'image {name!r} not found')
        with self._lock:
            self._image_ids[name] = image.id
        return image.id

    def _network(self) -> str:
        if self._network_id is None:
            network = self._conn.network.find_network(
                self.conf.nova.network, ignore_missing=True)
            if network is None:
                raise exception.DriverError(
                    action='choose a network',
                    reason=f'network {self.conf.nova.network!r} not found')
            self._network_id = network.id
        return self._network_id

    def _metadata(self, vm: objects.Vm) -> dict[str, str]:
        return {f'{META_PREFIX}owner': self.conf.host,
                f'{META_PREFIX}user_id': str(vm.user_id),
                f'{META_PREFIX}helper': str(vm.helper),
                f'{META_PREFIX}os_type': str(int(vm.os_type)),
                f'{META_PREFIX}gpu_cores': str(vm.gpu_cores),
                f'{META_PREFIX}type': flavors.VmType(
                    vm.vcpus, vm.memory_mb, vm.disk_gb).key}

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
        try:
            response = self.compute.get('/os-hypervisors/detail',
                                        microversion='2.87')
            response.raise_for_status()
            hypervisors = response.json().get('hypervisors', [])
        except _CLOUD_ERRORS as exc:
            raise translate('read the capacity of the cloud', exc) from exc
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

    def create(self, vm: objects.Vm) -> driver.CreateResult:
        vm_type = flavors.VmType(vm.vcpus, vm.memory_mb, vm.disk_gb)
        server = None
        try:
            args: dict[str, Any] = {
                'name': vm.name,
                'flavor_id': self._flavor_id(vm_type),
                'image_id': self._image_id(vm),
                'networks': [{'uuid': self._network()}],
                'metadata': self._metadata(vm),
            }
            if self.conf.nova.key_name:
                args['key_name'] = self.conf.nova.key_name
            if self.conf.nova.security_group:
                args['security_groups'] = [
                    {'name': self.conf.nova.security_group}]
            server = self.compute.create_server(**args)
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
        return driver.CreateResult(driver_id=server.id,
                                   image=self._image_option(vm))

    def _wait(self, server, status: str, action: str, vm: objects.Vm):
        try:
            return self.compute.wait_for_server(
                server, status=status, failures=['ERROR'],
                interval=POLL_INTERVAL, wait=self.conf.nova.boot_timeout)
        except sdk_exceptions.ResourceFailure as exc:
            fault = self._fault(server)
            raise translate(action, Exception(fault or str(exc)),
                            vm.user_id) from exc
        except sdk_exceptions.ResourceTimeout as exc:
            raise exception.DriverError(
                action=action, reason=f'{vm.name} not {status} within '
                f'{self.conf.nova.boot_timeout} s') from exc
        except _CLOUD_ERRORS as exc:
            raise translate(action, exc, vm.user_id) from exc

    def _fault(self, server) -> str | None:
        try:
            fresh = self.compute.get_server(server.id)
        except _CLOUD_ERRORS:
            return None
        fault = getattr(fresh, 'fault', None) or {}
        return fault.get('message')

    def _find_server(self, vm: objects.Vm):
        """The server of ``vm``: by id, else by name (a crash mid-create
        may have left no id in the record)."""
        try:
            if vm.driver_id:
                return self.compute.get_server(vm.driver_id)
            for server in self.compute.servers(name=f'^{vm.name}$'):
                if (server.metadata or {}).get(
                        f'{META_PREFIX}owner') == self.conf.host:
                    return server
            return None
        except sdk_exceptions.NotFoundException:
            return None
        except _CLOUD_ERRORS as exc:
            raise translate('find the server', exc, vm.user_id) from exc

    def _require(self, vm: objects.Vm):
        server = self._find_server(vm)
        if server is None:
            raise exception.DriverError(
                action='find the server',
                reason=f'{vm.name} does not exist in Nova')
        return server

    def _delete_quietly(self, server_id: str | None, name: str) -> None:
        try:
            if server_id is None:
                probe = objects.Vm(user_id=0, name=name, vcpus=1,
                                   memory_mb=1, disk_gb=0)
                server = self._find_server(probe)
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
        server = self._find_server(vm)
        if server is None:
            return
        try:
            self._delete(server.id)
        except sdk_exceptions.NotFoundException:
            return
        except _CLOUD_ERRORS as exc:
            raise translate('delete the server', exc, vm.user_id) from exc
        with self._lock:
            self._cpu_samples.pop(vm.name, None)
        LOG.info('Deleted server %s of user %s', vm.name, vm.user_id)

    def suspend(self, vm: objects.Vm) -> None:
        server = self._require(vm)
        if server.status == 'SUSPENDED':
            return
        try:
            self.compute.suspend_server(server)
        except _CLOUD_ERRORS as exc:
            raise translate('suspend', exc, vm.user_id) from exc
        self._wait(server, 'SUSPENDED', 'suspend', vm)

    def resume(self, vm: objects.Vm) -> None:
        server = self._require(vm)
        if server.status == 'ACTIVE':
            return
        try:
            if server.status == 'SHUTOFF':
                self.compute.start_server(server)
            else:
                self.compute.resume_server(server)
        except _CLOUD_ERRORS as exc:
            raise translate('resume', exc, vm.user_id) from exc
        self._wait(server, 'ACTIVE', 'resume', vm)

    def resize(self, vm: objects.Vm, new_type: flavors.VmType) -> None:
        server = self._require(vm)
        flavor_id = self._flavor_id(new_type)
        try:
            self.compute.resize_server(server, flavor_id)
        except _CLOUD_ERRORS as exc:
            raise translate(f'resize to {new_type.key}', exc,
                            vm.user_id) from exc
        self._wait(server, 'VERIFY_RESIZE', f'resize to {new_type.key}', vm)

    def confirm_resize(self, vm: objects.Vm) -> None:
        server = self._require(vm)
        if server.status != 'VERIFY_RESIZE':
            return  # confirmed already (or nothing to confirm)
        try:
            self.compute.confirm_server_resize(server)
        except _CLOUD_ERRORS as exc:
            raise translate('confirm the resize', exc, vm.user_id) from exc
        server = self._wait(server, 'ACTIVE', 'confirm the resize', vm)
        # Nova refuses metadata changes while a resize waits: record the
        # new type now, for a rebuild of the state from Nova.
        flavor = server.flavor
        try:
            self.compute.set_server_metadata(
                server, **{f'{META_PREFIX}type':
                           f'{flavor.vcpus}_{flavor.ram}_{flavor.disk}'})
        except _CLOUD_ERRORS as exc:
            LOG.warning('Cannot record the new type of %s: %s', vm.name,
                        exc)

    # -- addresses --------------------------------------------------------

    def wait_for_ip(self, vm: objects.Vm,
                    timeout: float | None = None) -> str:
        if timeout is None:
            timeout = self.conf.nova.boot_timeout
        deadline = time.monotonic() + timeout
        while True:
            ip = self._ip_from_ports(vm)
            if ip:
                return ip
            if time.monotonic() >= deadline:
                raise exception.DriverError(
                    action='find IP address',
                    reason=f'{vm.name} has no fixed IP after {timeout} s')
            time.sleep(min(POLL_INTERVAL, max(deadline - time.monotonic(),
                                              0)))

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
        most 8 at a time, each bounded by the session's timeouts.
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
        result = {}
        for vm in vms:
            try:
                diagnostics = futures[vm.user_id].result(timeout=60)
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
        try:
            response = self.compute.get(
                f'/servers/{vm.driver_id}/diagnostics',
                microversion=DIAGNOSTICS_MICROVERSION)
            response.raise_for_status()
            return response.json()
        except _CLOUD_ERRORS as exc:
            raise translate('read diagnostics', exc, vm.user_id) from exc

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

    # -- listing ----------------------------------------------------------

    def list_instances(self) -> list[driver.Instance]:
        try:
            servers = list(self.compute.servers(details=True))
        except _CLOUD_ERRORS as exc:
            raise translate('list servers', exc) from exc
        instances = []
        for server in servers:
            instance = self._instance_of(server)
            if instance is not None:
                instances.append(instance)
        return instances

    def get_instance(self, name: str) -> driver.Instance | None:
        try:
            for server in self.compute.servers(details=True,
                                               name=f'^{name}$'):
                instance = self._instance_of(server)
                if instance is not None and instance.name == name:
                    return instance
        except _CLOUD_ERRORS as exc:
            raise translate('find the server', exc) from exc
        return None

    def _instance_of(self, server) -> driver.Instance | None:
        meta = server.metadata or {}
        if meta.get(f'{META_PREFIX}owner') != self.conf.host:
            return None
        try:
            user_id = int(meta[f'{META_PREFIX}user_id'])
            vcpus, memory_mb, disk_gb = (int(v) for v in meta.get(
                f'{META_PREFIX}type', '0_0_0').split('_'))
        except (KeyError, ValueError):
            LOG.warning('Server %s has unreadable rapid metadata %s',
                        server.name, meta)
            return None
        flavor = getattr(server, 'flavor', None)
        if flavor is not None and getattr(flavor, 'vcpus', None):
            vcpus, memory_mb, disk_gb = (flavor.vcpus, flavor.ram,
                                         flavor.disk)
        return driver.Instance(
            driver_id=server.id, name=server.name,
            power_state=_POWER.get(server.status, driver.PowerState.UNKNOWN),
            user_id=user_id,
            helper=int(meta.get(f'{META_PREFIX}helper', 0)),
            os_type=int(meta.get(f'{META_PREFIX}os_type', 0)),
            vcpus=vcpus, memory_mb=memory_mb, disk_gb=disk_gb,
            gpu_cores=int(meta.get(f'{META_PREFIX}gpu_cores', 0)),
            image=getattr(server, 'image', {}).get('id')
            if isinstance(getattr(server, 'image', None), dict) else None)


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
