"""The agent's identity, its registration with the DS and SLAM, its reports.

The :class:`Reporter` owns the agent's identity (VMM id and SLAM address,
persisted in the state store), registers with the DS and then the SLAM with
back-off while they are absent or refuse (the original DS answers ERROR
until a SLAM registered with it), samples the host and sends the periodic
``notify_vmm`` report. Messages about VMs go through the outbox
(:mod:`rapid_vmm.outbox`); after a registration the agent re-sends the
state of every VM through it, in the transaction that stores the identity.
"""

from collections.abc import Callable
import threading
import time

from oslo_config import cfg
from oslo_context import context as oslo_context
from oslo_log import log as logging
import tenacity

from rapid_vmm import capacity
from rapid_vmm import exception
from rapid_vmm import flavors
from rapid_vmm import objects
from rapid_vmm import outbox
from rapid_vmm import peers
from rapid_vmm import state

LOG = logging.getLogger(__name__)

MAC_TYPE_LINUX = peers.MAC_TYPE_LINUX


def int_field(reply, key: str) -> int | None:
    """``reply[key]`` when ``reply`` is a dict and the value an int."""
    if not isinstance(reply, dict):
        return None
    value = reply.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def agent_context() -> dict:
    """A fresh context (new request id) for the agent's own messages."""
    return oslo_context.RequestContext(overwrite=False).to_dict()


class Reporter:
    """The agent's side of registration and reporting.

    :param limits: returns the host's :class:`capacity.Limits` (raises
        ``DriverError`` while the hypervisor cannot say).
    :param stopping: set when the agent stops; ends retry loops.
    :param registered: called after a (re)registration with the DS.
    """

    def __init__(self, conf: cfg.ConfigOpts, store: state.StateStore,
                 monitor, ds_api: peers.DirectoryServer,
                 slam_api: peers.SlaManager, grid: flavors.Grid,
                 limits: Callable[[], capacity.Limits],
                 stopping: threading.Event,
                 registered: Callable[[], None] | None = None):
        self.conf = conf
        self.store = store
        self.monitor = monitor
        self.ds = ds_api
        self.slam = slam_api
        self.grid = grid
        self._limits = limits
        self._stopping = stopping
        self._registered = registered
        self.identity: dict = {}
        self.slam_registered = False
        self._last_resources: dict | None = None
        self._resources_lock = threading.Lock()

    @property
    def vmm_id(self) -> int | None:
        return self.identity.get('vmm_id')

    def load_identity(self) -> None:
        """Restore the identity persisted by an earlier run."""
        self.identity.clear()
        self.identity.update(self.store.get_meta())
        if self.vmm_id is not None:
            LOG.info('Restored identity: VMM id %s (registered %s)',
                     self.vmm_id,
                     time.ctime(self.identity.get('registered_at', 0)))

    def adopt_identity(self, identity: dict, source: str) -> bool:
        """Take the VMM id (and SLAM address) found in an instance's
        metadata when the state lost it: the DS must not be asked again
        (the original refuses a second registration from one IP)."""
        vmm_id = identity.get('vmm_id')
        if self.vmm_id is not None or not isinstance(vmm_id, int):
            return False
        values = {'vmm_id': vmm_id,
                  'slam_host': identity.get('slam_host'),
                  'slam_port': identity.get('slam_port'),
                  'registered_at': time.time(), 'rebuilt_from': source}
        self.store.set_meta(**values)
        self.identity.update(values)
        LOG.warning('Rebuilt the identity from %s: VMM id %s (not '
                    'registering with the DS again)', source, vmm_id)
        return True

    # -- registration -------------------------------------------------------

    def register_with_ds(self) -> bool:
        """One attempt to register with the DS; True once registered."""
        if self.vmm_id is not None:
            return True
        resources = self.latest_resources() or self.sample_resources()
        reply = self.ds.register_vmm(
            agent_context(), host=self.conf.host,
            ip_address=self.conf.my_ip, mac_type=MAC_TYPE_LINUX,
            cpu_load=resources.get('cpu_load_percent'),
            cpu_count=resources.get('cpu_count'),
            free_memory_mb=resources.get('memory_free_mb'),
            gpu_load=resources.get('gpu_load_percent'),
            gpu_cores=resources.get('gpu_cores'), resources=resources)
        vmm_id = int_field(reply, 'vmm_id')
        if vmm_id is None:
            raise exception.PeerRejected(
                peer='DS', method='register_vmm',
                reason=f'unusable reply {reply!r:.200}')
        identity = {'vmm_id': vmm_id,
                    'slam_host': reply.get('slam_host'),
                    'slam_port': int_field(reply, 'slam_port'),
                    'registered_at': time.time(),
                    'host': self.conf.host}
        with self.store.transaction() as txn:
            if txn.get_meta().get('vmm_id') is not None:
                return True  # rebuilt from metadata meanwhile
            txn.set_meta(**identity)
            resent = outbox.queue_current_state(txn, self.grid)
        self.identity.update(identity)
        LOG.info('Registered with the DS as VMM %s (SLAM %s:%s); %d '
                 'message(s) queued for the DS', vmm_id,
                 identity['slam_host'], identity['slam_port'], resent)
        if self._registered is not None:
            self._registered()
        return True

    def register_with_slam(self) -> bool:
        """One attempt to register with the SLAM; True once done."""
        if self.slam_registered:
            return True
        self.slam.register_vmm(agent_context(), host=self.conf.host,
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
        def log_retry(retry_state: tenacity.RetryCallState) -> None:
            error = retry_state.outcome.exception()
            if isinstance(error, exception.RapidVmmException):
                LOG.warning('Registration with the %s failed (%s); '
                            'retrying in %.0f s', name, error,
                            retry_state.next_action.sleep)
            else:
                LOG.error('Registration with the %s failed (%s: %s); '
                          'retrying in %.0f s', name,
                          type(error).__name__, error,
                          retry_state.next_action.sleep)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(Exception),
            wait=tenacity.wait_exponential(
                multiplier=1, max=self.conf.registration_retry_max_interval),
            stop=tenacity.stop_when_event_set(self._stopping),
            sleep=self._stopping.wait, before_sleep=log_retry,
            reraise=True)
        try:
            return bool(retrying(attempt))
        except Exception:  # noqa: BLE001 - stopped while still refused
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
        resources['vms_unknown'] = sum(
            1 for vm in vms
            if vm.task_state == objects.TaskState.UNKNOWN.value)
        try:
            resources['available_types'] = capacity.available_types(
                self.grid, self._limits(), vms)
        except exception.DriverError as exc:
            LOG.warning('Host capacity unknown: %s', exc)
            resources['available_types'] = []
        with self._resources_lock:
            self._last_resources = resources
        return resources

    def report(self, vms: list[objects.Vm] | None = None) -> dict:
        """Sample the host and send ``notify_vmm`` (once registered).

        Best effort: a report that does not arrive is superseded by the
        next one. Returns the resources sent.
        """
        resources = self.sample_resources(vms)
        if self.vmm_id is None:
            return resources
        try:
            self.ds.notify_vmm(
                agent_context(), vmm_id=self.vmm_id,
                cpu_load=resources.get('cpu_load_percent'),
                free_memory_mb=resources.get('memory_free_mb'),
                gpu_load=resources.get('gpu_load_percent'),
                resources=resources)
        except exception.PeerError as exc:
            LOG.warning('Resource report to the DS failed: %s', exc)
        return resources
