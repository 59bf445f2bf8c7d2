"""What the agent tells its peers: registration, reports, VM status.

The :class:`Reporter` owns the agent's identity (VMM id and SLAM address,
persisted in the state store), registers with the DS and the SLAM with
back-off while they are absent, samples the host and sends the periodic
``notify_vmm`` report, and carries every VM event to the DS (``register_vm``,
``notify_vm``, ``notify_helper``) and the SLAM (``vm_started``,
``vm_start_failed``).

A peer that is absent or slow never fails a VM operation: notifications
are best effort and logged; a VM the DS could not register keeps
``vm_id = None`` and :meth:`Reporter.sync_vms` registers it later.
"""

from collections.abc import Callable
import threading
import time
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from rapid_vmm import capacity
from rapid_vmm import exception
from rapid_vmm import flavors
from rapid_vmm import objects
from rapid_vmm import peers
from rapid_vmm import state

LOG = logging.getLogger(__name__)

MAC_TYPE_LINUX = peers.MAC_TYPE_LINUX

#: Context of the agent's own requests to its peers.
AGENT_CONTEXT: dict = {}


def int_field(reply: Any, key: str) -> int | None:
    """``reply[key]`` when ``reply`` is a dict and the value an int."""
    if not isinstance(reply, dict):
        return None
    value = reply.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


class Reporter:
    """The agent's side of the DS and SLAM APIs.

    :param limits: returns the host's :class:`capacity.Limits` (raises
        ``DriverError`` while the hypervisor cannot say).
    :param stopping: set when the agent stops; ends retry loops.
    """

    def __init__(self, conf: cfg.ConfigOpts, store: state.StateStore,
                 monitor, ds_api, slam_api, grid: flavors.Grid,
                 limits: Callable[[], capacity.Limits],
                 stopping: threading.Event):
        self.conf = conf
        self.store = store
        self.monitor = monitor
        self.ds = ds_api
        self.slam = slam_api
        self.grid = grid
        self._limits = limits
        self._stopping = stopping
        self.identity: dict = {}
        self.slam_registered = False
        self._last_resources: dict | None = None
        self._resources_lock = threading.Lock()

    @property
    def vmm_id(self) -> int | None:
        return self.identity.get('vmm_id')

    def load_identity(self) -> None:
        """Restore the identity persisted by an earlier run."""
        self.identity = self.store.get_meta()
        if self.vmm_id is not None:
            LOG.info('Restored identity: VMM id %s (registered %s)',
                     self.vmm_id,
                     time.ctime(self.identity.get('registered_at', 0)))

    # -- best-effort calls --------------------------------------------------

    def _peer_call(self, what: str, func, *args, **kwargs) -> Any:
        """Call a peer; a failure is logged and gives None."""
        try:
            return func(*args, **kwargs)
        except exception.PeerError as exc:
            LOG.warning('%s failed: %s: %s', what, type(exc).__name__, exc)
            return None
        except Exception as exc:
            if not self._stopping.is_set():
                raise
            # The transport is being torn down under an in-flight call.
            LOG.debug('%s abandoned while stopping: %r', what, exc)
            return None

    # -- VM events --------------------------------------------------------

    def notify_vm(self, vm: objects.Vm) -> None:
        """Tell the DS the VM's status (if the DS knows the VM)."""
        if vm.vm_id is None:
            return
        self._peer_call(f'notify_vm({vm.vm_id}, {int(vm.status)})',
                        self.ds.notify_vm, AGENT_CONTEXT, vm_id=vm.vm_id,
                        status=int(vm.status))

    def register_vm(self, vm: objects.Vm) -> None:
        """Register ``vm`` with the DS now, or leave it to :meth:`sync_vms`.

        Sets ``vm.vm_id`` and persists it; a helper VM's address follows
        in ``notify_helper``.
        """
        if self.vmm_id is None or vm.vm_id is not None:
            return
        vm_type = self.grid.index(flavors.VmType(vm.vcpus, vm.memory_mb,
                                                 vm.disk_gb))
        reply = self._peer_call(
            f'register_vm(user {vm.user_id})', self.ds.register_vm,
            AGENT_CONTEXT, vmm_id=self.vmm_id, category=int(vm.category),
            vm_type=vm_type, user_id=vm.user_id, status=int(vm.status))
        vm_id = int_field(reply, 'vm_id')
        if vm_id is None:
            if reply is not None:
                LOG.error('The DS answered register_vm with %r', reply)
            return
        vm.vm_id = vm_id
        self.store.update_vm(vm.user_id, vm_id=vm_id)
        if vm.is_helper and vm.ip_address:
            self._peer_call(f'notify_helper({vm_id})', self.ds.notify_helper,
                            AGENT_CONTEXT, vm_id=vm_id,
                            ip_address=vm.ip_address)

    def vm_started(self, context: dict, vm: objects.Vm) -> None:
        self._peer_call(f'vm_started(user {vm.user_id})',
                        self.slam.vm_started, context or AGENT_CONTEXT,
                        host=self.conf.host, vm=vm.to_record())

    def vm_start_failed(self, context: dict, user_id: int,
                        error: Exception) -> None:
        self._peer_call(f'vm_start_failed(user {user_id})',
                        self.slam.vm_start_failed, context or AGENT_CONTEXT,
                        host=self.conf.host, user_id=user_id,
                        error=str(error).splitlines()[0] if str(error)
                        else type(error).__name__,
                        error_class=type(error).__name__)

    def sync_vms(self, register: Callable[[objects.Vm], None]) -> None:
        """Register with the DS the VMs it does not know yet.

        ``register`` is called for each candidate and must take the VM's
        lock and call :meth:`register_vm` on a fresh record.
        """
        if self.vmm_id is None:
            return
        for vm in self.store.list_vms():
            if vm.vm_id is None and vm.task_state == '':
                register(vm)

    # -- registration -------------------------------------------------------

    def register_with_ds(self) -> bool:
        """One attempt to register with the DS; True once registered."""
        if self.vmm_id is not None:
            return True
        resources = self.latest_resources() or self.sample_resources()
        reply = self.ds.register_vmm(
            AGENT_CONTEXT, host=self.conf.host, ip_address=self.conf.my_ip,
            mac_type=MAC_TYPE_LINUX,
            cpu_load=resources.get('cpu_load_percent'),
            cpu_count=resources.get('cpu_count'),
            free_memory_mb=resources.get('memory_free_mb'),
            gpu_load=resources.get('gpu_load_percent'),
            gpu_cores=resources.get('gpu_cores'), resources=resources)
        vmm_id = int_field(reply, 'vmm_id')
        if vmm_id is None:
            raise exception.DriverError(
                action='register with the DS',
                reason=f'unusable reply {reply!r:.200}')
        identity = {'vmm_id': vmm_id,
                    'slam_host': reply.get('slam_host'),
                    'slam_port': int_field(reply, 'slam_port'),
                    'registered_at': time.time(),
                    'host': self.conf.host}
        self.store.set_meta(**identity)
        self.identity.update(identity)
        LOG.info('Registered with the DS as VMM %s (SLAM %s:%s)', vmm_id,
                 identity['slam_host'], identity['slam_port'])
        return True

    def register_with_slam(self) -> bool:
        """One attempt to register with the SLAM; True once done."""
        if self.slam_registered:
            return True
        self.slam.register_vmm(AGENT_CONTEXT, host=self.conf.host,
                               vmm_id=self.vmm_id,
                               ip_address=self.conf.my_ip)
        self.slam_registered = True
        LOG.info('Registered with the SLAM')
        return True

    def retry_until_done(self, name: str, attempt: Callable[[], bool]
                         ) -> bool:
        """Call ``attempt`` with exponential back-off until it succeeds.

        Never raises; returns False only when the agent stops first.
        """
        delay = 1.0
        while not self._stopping.is_set():
            try:
                if attempt():
                    return True
            except exception.RapidVmmException as exc:
                LOG.warning('Registration with the %s failed (%s: %s); '
                            'retrying in %.0f s', name, type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else '',
                            delay)
            except Exception:
                LOG.exception('Registration with the %s failed; retrying '
                              'in %.0f s', name, delay)
            self._stopping.wait(delay)
            delay = min(delay * 2,
                        self.conf.registration_retry_max_interval)
        return False

    # -- resource reports ---------------------------------------------------

    def latest_resources(self) -> dict | None:
        with self._resources_lock:
            return self._last_resources

    def sample_resources(self, vms: list[objects.Vm] | None = None) -> dict:
        """Sample the host and add what the state says about the VMs
        (``vms``: the records, when the caller has just listed them)."""
        resources = dict(self.monitor.sample())
        if vms is None:
            vms = self.store.list_vms()
        resources['vms_running'] = sum(1 for vm in vms if vm.is_running)
        resources['vms_suspended'] = sum(
            1 for vm in vms if vm.status == objects.VmStatus.SUSPENDED)
        try:
            resources['available_types'] = capacity.available_types(
                self.grid, self._limits(), vms)
        except exception.DriverError as exc:
            LOG.warning('Host capacity unknown: %s', exc)
            resources['available_types'] = []
        with self._resources_lock:
            self._last_resources = resources
        return resources

    def report(self, vms: list[objects.Vm] | None = None) -> None:
        """Sample the host and send ``notify_vmm`` (once registered)."""
        resources = self.sample_resources(vms)
        if self.vmm_id is None:
            return
        self._peer_call('notify_vmm', self.ds.notify_vmm, AGENT_CONTEXT,
                        vmm_id=self.vmm_id,
                        cpu_load=resources.get('cpu_load_percent'),
                        free_memory_mb=resources.get('memory_free_mb'),
                        gpu_load=resources.get('gpu_load_percent'),
                        resources=resources)
