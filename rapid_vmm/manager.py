"""The VMM manager: composes the agent's parts and carries out the API.

It talks only to the driver interface, the state store, the resource
monitor and the peers (through the outbox). The parts:

* :class:`~rapid_vmm.lifecycle.Lifecycle` - every VM transition, intent
  persisted first, capacity reserved in the same transaction;
* :class:`~rapid_vmm.reconciler.Reconciler` - observes the hypervisor,
  never destroys;
* :class:`~rapid_vmm.outbox.Outbox` - messages to the DS and SLAM,
  delivered in order;
* :class:`~rapid_vmm.reporter.Reporter` - identity, registration, reports.

The manager is NOT an RPC endpoint: :class:`rapid_vmm.endpoint.VmmEndpoint`
exposes exactly the VMM API and calls the methods here with validated
arguments.
"""

import concurrent.futures
import threading
import time

from oslo_config import cfg
from oslo_log import log as logging

from rapid_vmm import capacity
from rapid_vmm import exception
from rapid_vmm import flavors
from rapid_vmm import handshake
from rapid_vmm import lifecycle as vm_lifecycle
from rapid_vmm import locks
from rapid_vmm import notifications
from rapid_vmm import objects
from rapid_vmm import outbox as vm_outbox
from rapid_vmm import peers
from rapid_vmm import reconciler as vm_reconciler
from rapid_vmm import reporter as vm_reporter
from rapid_vmm import state
from rapid_vmm import version
from rapid_vmm.virt import driver as virt_driver

LOG = logging.getLogger(__name__)

Status = objects.VmStatus
Task = objects.TaskState
record_of = vm_lifecycle.record_of


#: start_vm waits for the new VM's DS id only while at most this many
#: messages queue for the DS.
DS_ID_WAIT_MAX_QUEUE = 2


def lock_wait_timeout(conf: cfg.ConfigOpts) -> float:
    """How long a request waits for a user's lock held by another.

    ``lock_wait_timeout`` if set, else the longest a lifecycle operation
    can take (IP wait or Nova boot, plus the AS wait, plus a margin).
    """
    if conf.lock_wait_timeout:
        return float(conf.lock_wait_timeout)
    boot = conf.nova.boot_timeout if conf.compute_driver == 'nova' \
        else conf.libvirt.ip_timeout
    return float(boot + conf.as_register_timeout + 60)


class VmmManager:
    """The agent of one host.

    :param conf: the agent's configuration.
    :param driver: a :class:`rapid_vmm.virt.driver.ComputeDriver`.
    :param store: the :class:`rapid_vmm.state.StateStore` (not yet open).
    :param monitor: an object whose ``sample()`` returns the host part of
        ``resources`` (CPU, memory, disk, GPUs).
    :param ds_api: a :class:`rapid_vmm.peers.DirectoryServer`.
    :param slam_api: a :class:`rapid_vmm.peers.SlaManager`.
    """

    def __init__(self, conf: cfg.ConfigOpts,
                 driver: virt_driver.ComputeDriver, store: state.StateStore,
                 monitor, ds_api: peers.DirectoryServer,
                 slam_api: peers.SlaManager, transport=None):
        self.conf = conf
        #: The RPC transport, to tell an AS that registered over RPC.
        self.transport = transport
        self.driver = driver
        self.store = store
        self.monitor = monitor
        self.ds = ds_api
        self.slam = slam_api
        self.grid = flavors.parse_grid(conf.vm_types)
        self._stopping = threading.Event()
        self._limits: capacity.Limits | None = None
        self._reconcile_wanted = threading.Event()
        #: VMs hypervisor events were about since the last pass, and
        #: whether a full pass was asked for.
        self._event_names: set[str] = set()
        self._full_pass_wanted = False
        self._event_lock = threading.Lock()
        self._last_orphan_scan = 0.0
        #: The ``host`` this agent had before a declared rename, or None.
        self.previous_host: str | None = None
        #: Set once the identity is known or the hypervisor was looked at
        #: (a fresh state may be rebuilt from instance metadata first).
        self.identity_settled = threading.Event()
        self.locks = locks.UserLocks(lock_wait_timeout(conf))
        self.handshake = handshake.AsHandshake(self._stopping)
        self.reporter = vm_reporter.Reporter(
            conf, store, monitor, ds_api, slam_api, self.grid, self.limits,
            self._stopping, registered=self._on_registered)
        self.outbox = vm_outbox.Outbox(
            conf, store, ds_api, slam_api, lambda: self.reporter.identity,
            self._stopping, on_vm_id=self._on_vm_id)
        self.lifecycle = vm_lifecycle.Lifecycle(
            conf, store, driver, self.grid, self.limits, self.locks,
            self.handshake, lambda: self.reporter.identity,
            self.outbox.wake, self._stopping)
        self.lifecycle.before_resize = self._notify_as_of_resize
        self.lifecycle.listeners.append(self.vm_event)
        self.reconciler = vm_reconciler.Reconciler(self)
        #: A :class:`notifications.VmNotifier` (set by the service): told
        #: of every VM state change and host report, best effort.
        self.notifier = notifications.NULL
        self._metadata_writer = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix='metadata')

    # ------------------------------------------------------------------
    # start and stop
    # ------------------------------------------------------------------

    def open_state(self) -> None:
        """Open the state and check that it is this host's (SPEC 6).

        :raises StateError: when the state cannot be opened, is of a newer
            schema, or belongs to another ``host`` and no rename was
            declared (``previous_host``).
        """
        self.store.open()
        meta = self.store.get_meta()
        stored = meta.get('host')
        host = self.conf.host
        if stored is None:
            self.store.set_meta(host=host)
        elif stored != host:
            if self.conf.previous_host and stored == self.conf.previous_host:
                LOG.warning('Host renamed from %s to %s (previous_host): '
                            'taking over its state and instances', stored,
                            host)
                self.store.set_meta(host=host, renamed_from=stored,
                                    renamed_at=time.time())
                self.previous_host = stored
            else:
                self.store.close()
                raise exception.StateError(
                    path=self.store.path,
                    reason=f'it belongs to host {stored!r}, and this agent '
                           f'is {host!r}; if the host was renamed, set '
                           f'[DEFAULT] previous_host = {stored} once; '
                           'otherwise give this agent its own data_path')
        else:
            self.previous_host = meta.get('renamed_from') or \
                self.conf.previous_host or None
        if self.conf.previous_host and self.previous_host is None:
            self.previous_host = self.conf.previous_host

    def init_host(self) -> None:
        """Restore state, connect the driver and reconcile: SPEC start-up.

        Called once before the RPC server starts serving. A hypervisor
        that does not answer yet is not fatal: the agent serves and
        reconciles once it answers.
        """
        self.open_state()
        self.reporter.load_identity()
        fresh = self.reporter.vmm_id is None and not self.store.list_vms()
        self.driver.init_host()
        self.driver.set_event_callback(self._on_driver_event)
        self.outbox.start()
        self.reconciler.reconcile(startup=True)
        if not fresh or self.reconciler.driver_reachable:
            self.identity_settled.set()
        self.driver.post_start()

    def stop(self) -> None:
        """Wake every wait so that in-flight requests end quickly."""
        self._stopping.set()
        self._reconcile_wanted.set()
        self.identity_settled.set()
        self.handshake.stop()
        self.outbox.wake()

    def cleanup_host(self) -> None:
        self.outbox.stop()
        self._metadata_writer.shutdown(wait=False, cancel_futures=True)
        self.driver.cleanup_host()
        close = getattr(self.monitor, 'close', None)
        if close is not None:
            close()
        for peer in (self.ds, self.slam):
            peer.close()
        self.store.close()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def limits(self) -> capacity.Limits:
        """Capacity of the host for VMs (the driver is asked once)."""
        if self._limits is None:
            host = self.driver.host_capacity()
            self._limits = capacity.Limits.from_host(self.conf, host)
            LOG.info('Host capacity for VMs: %.0f vCPUs, %.0f MB memory, '
                     '%.0f GB disk, %s GPU cores', self._limits.vcpus,
                     self._limits.memory_mb, self._limits.disk_gb,
                     self._limits.gpu_cores or 'unaccounted')
        return self._limits

    def wake_outbox(self) -> None:
        self.outbox.wake()

    # ------------------------------------------------------------------
    # the VMM API (arguments validated by the endpoint)
    # ------------------------------------------------------------------

    def start_vm(self, ctxt: dict, user_id: int, os_type: int,
                 vm_type: flavors.VmType, gpu_cores: int) -> dict:
        vm = self.lifecycle.start(ctxt, user_id, os_type, vm_type, gpu_cores)
        self._await_ds_id(vm)
        return record_of(vm)

    def _await_ds_id(self, vm: objects.Vm) -> None:
        """Give the outbox a moment to register a new VM with the DS, so
        the reply usually carries its DS id (never waits long, and not at
        all while many messages queue for the DS: a burst of starts must
        not wait for the DS one after the other)."""
        if vm.vm_id is None and self.reporter.vmm_id is not None and \
                self.outbox.depth()[vm_outbox.DS] <= DS_ID_WAIT_MAX_QUEUE:
            vm.vm_id = self.outbox.wait_for_vm_id(
                vm.name, min(self.conf.peer_call_timeout, 2))

    def resume_vm(self, ctxt: dict, user_id: int) -> dict:
        return record_of(self.lifecycle.resume(ctxt, user_id))

    def suspend_vm(self, ctxt: dict, user_id: int) -> dict:
        return record_of(self.lifecycle.suspend(ctxt, user_id))

    def remove_vm(self, ctxt: dict, user_id: int,
                  reason: str = 'remove_vm') -> None:
        self.lifecycle.remove(ctxt, user_id, reason)

    def get_vm_info(self, ctxt: dict, user_id: int | None = None) -> list:
        if user_id is None:
            return [record_of(vm) for vm in self.store.list_vms()]
        vm = self.store.get_vm(user_id)
        if vm is None:
            raise exception.VmNotFound(user_id=user_id)
        return [record_of(vm)]

    def get_vm_usage(self, ctxt: dict, resource: str,
                     user_id: int | None = None) -> list:
        """Usage per VM, every VM on the hypervisor in one bulk call."""
        if user_id is not None:
            vm = self.store.get_vm(user_id)
            if vm is None:
                raise exception.VmNotFound(user_id=user_id)
            vms = [vm] if _measurable(vm) else []
        else:
            vms = [vm for vm in self.store.list_vms() if _measurable(vm)]
        if not vms:
            return []
        figures = self.driver.usage(vms, resource)
        result = []
        for vm in vms:
            entry = {'user_id': vm.user_id, 'vm_id': vm.vm_id}
            entry.update(figures.get(vm.user_id, {}))
            result.append(entry)
        return result

    def change_flavor(self, ctxt: dict, user_id: int, vcpus: int,
                      memory_mb: int, disk_gb: int) -> dict:
        return record_of(self.lifecycle.resize(ctxt, user_id, vcpus,
                                               memory_mb, disk_gb))

    def confirm_flavor(self, ctxt: dict, user_id: int) -> dict:
        return record_of(self.lifecycle.confirm_resize(ctxt, user_id))

    def as_register(self, ctxt: dict, ip_address: str,
                    protocol: str = 'rpc') -> dict:
        """Which user the VM at ``ip_address`` serves (for its AS)."""
        vm = self.store.find_vm_by_ip(ip_address)
        if vm is None:
            vm = self._find_building_vm_by_ip(ip_address)
        if vm is None:
            raise exception.VmNotFound(
                f'No VM of this host has the address {ip_address}.')
        self.store.update_vm(vm.user_id, as_protocol=protocol)
        LOG.info('Acceleration Server at %s registered (%s) for user %s, '
                 'VM %s', ip_address, protocol, vm.user_id, vm.name)
        return {'user_id': vm.user_id}

    def _find_building_vm_by_ip(self, ip_address: str) -> objects.Vm | None:
        """An AS may register before the start's IP polling saw it."""
        for vm in self.store.list_vms():
            if vm.task_state != Task.BUILDING.value or vm.ip_address or \
                    vm.driver_id is None:
                continue
            try:
                if self.driver.wait_for_ip(vm, timeout=0) == ip_address:
                    return vm
            except exception.RapidVmmException:
                continue
        return None

    def as_confirm(self, ctxt: dict, user_id: int, ready: bool) -> None:
        vm = self.store.get_vm(user_id)
        if vm is None:
            raise exception.VmNotFound(user_id=user_id)
        if ready:
            self.store.update_vm(user_id, as_ready=True)
        waiting = self.handshake.confirm(user_id, ready)
        LOG.info('Acceleration Server of user %s (VM %s) reports %s%s',
                 user_id, vm.name, 'ready' if ready else 'NOT ready',
                 '' if waiting else ' (no start was waiting)')

    def as_notify(self, ctxt: dict, user_id: int, action: str) -> None:
        if action == 'suspend':
            self.lifecycle.suspend(ctxt, user_id)
        else:
            self.lifecycle.remove(ctxt, user_id, 'the AS asked to remove it')

    def deregister_vm(self, ctxt: dict, user_id: int) -> None:
        self.lifecycle.remove(ctxt, user_id, 'the DS deregistered the user')

    def get_host_status(self, ctxt: dict) -> dict:
        """The latest host sample and every VM record; samples nothing
        unless no report was made yet."""
        resources = self.reporter.latest_resources()
        if resources is None:
            resources = self.reporter.sample_resources()
        return {'host': self.conf.host,
                'vmm_id': self.reporter.vmm_id,
                'driver': self.driver.name,
                'version': version.version_string(),
                'driver_reachable': self.reconciler.driver_reachable,
                'registered': {'ds': self.reporter.vmm_id is not None,
                               'slam': self.reporter.slam_registered},
                'outbox': self.outbox.depth(),
                'resources': resources,
                'vms': [record_of(vm) for vm in self.store.list_vms()]}

    def diagnostics(self) -> dict:
        """What an operator needs in a Guru Meditation report."""
        vms = self.store.list_vms()
        return {
            'host': self.conf.host,
            'previous_host': self.previous_host,
            'identity': dict(self.reporter.identity),
            'registered': {'ds': self.reporter.vmm_id is not None,
                           'slam': self.reporter.slam_registered},
            'driver': {'name': self.driver.name,
                       'reachable': self.reconciler.driver_reachable,
                       'connection': self.driver.connection_state(),
                       'reconcile_passes': self.reconciler.passes},
            'outbox': self.outbox.diagnostics(),
            'as_waits': self.handshake.waiting(),
            'vms': [{'user_id': vm.user_id, 'name': vm.name,
                     'vm_id': vm.vm_id, 'status': int(vm.status),
                     'task_state': vm.task_state or '(none)',
                     'intent': vm.intent,
                     'state_reason': vm.state_reason or '-',
                     'busy': self.locks.busy(vm.user_id)} for vm in vms],
        }

    # ------------------------------------------------------------------
    # periodic duties
    # ------------------------------------------------------------------

    def run_registration(self) -> None:
        """Register with the DS, then the SLAM, retrying with back-off.

        Runs in its own thread; never gives up and never raises, so the
        agent keeps serving while its peers are absent. With a fresh state
        it first waits until the hypervisor was looked at, so that an
        identity kept in instance metadata is not registered again.
        """
        while not self.identity_settled.wait(1):
            if self.stopping:
                return
        if self.stopping:
            return
        if not self.reporter.retry_until_done(
                'DS', self.reporter.register_with_ds):
            return
        self.periodic_report()
        self.reporter.retry_until_done('SLAM',
                                       self.reporter.register_with_slam)

    def periodic_report(self) -> None:
        """Sample the host and report to the DS; never raises."""
        try:
            vms = self.store.list_vms()
            resources = self.reporter.report(vms)
            self.notifier.host_report({}, resources)
            self.driver.sample_cpu([vm for vm in vms if _measurable(vm)])
        except Exception as exc:  # noqa: BLE001 - logged just below
            self._log_failure('Resource report', exc)

    def _log_failure(self, what: str, exc: BaseException) -> None:
        """Log the failure of a background job: with its traceback, unless
        the agent's stop cut it short (its store closed under it), which
        is not an error."""
        if self.stopping:
            LOG.debug('%s failed while stopping', what, exc_info=exc)
        else:
            LOG.error('%s failed', what, exc_info=exc)

    def _on_driver_event(self, name: str | None, event: str) -> None:
        """A hypervisor event: reconcile soon, if it is about one of ours.

        Events of other domains (the hypervisor may be shared) are dropped
        here; instances of ours that no record knows yet are found by the
        periodic pass.
        """
        if event not in ('reconnected', 'stopped', 'undefined', 'suspended',
                         'resumed', 'crashed', 'shutdown', 'started'):
            return
        if name is None:  # reconnected: anything may have changed
            self.request_reconcile()
            return
        try:
            if self.store.get_vm_by_name(name) is None:
                return
        except exception.StateError:
            return  # stopping: the store is closed
        LOG.debug('Driver event %s for %s', event, name)
        with self._event_lock:
            self._event_names.add(name)
        self._reconcile_wanted.set()

    def request_reconcile(self) -> None:
        """Ask the reconcile loop for a full pass soon."""
        with self._event_lock:
            self._full_pass_wanted = True
        self._reconcile_wanted.set()

    def run_reconcile_loop(self) -> None:
        """Reconcile every ``reconcile_interval`` s or when asked; keep the
        helpers; scan for orphan disks now and then. Runs in its own thread
        until the agent stops."""
        interval = self.conf.reconcile_interval or None
        while not self.stopping:
            woken = self._reconcile_wanted.wait(interval)
            if self.stopping:
                return
            self._reconcile_wanted.clear()
            with self._event_lock:
                names, self._event_names = self._event_names, set()
                full = self._full_pass_wanted or not woken
                self._full_pass_wanted = False
            # Events name the VMs they are about: a pass over those only
            # (a busy host's events would otherwise start one full pass
            # after another).
            self.reconcile_once(names=None if full else names)

    def reconcile_once(self, names: set[str] | None = None) -> None:
        """One reconciliation pass (of ``names`` only, when given) and its
        follow-ups; never raises."""
        try:
            self.reconciler.reconcile(names=names)
            if self.reconciler.driver_reachable:
                if names is None:
                    self.identity_settled.set()
                self.lifecycle.ensure_helpers()
                if names is None:
                    self.scan_orphan_disks()
        except Exception as exc:  # noqa: BLE001 - logged just below
            self._log_failure('Periodic reconciliation', exc)

    def ensure_helpers(self) -> None:
        """Keep the helper VMs (its own thread at start-up)."""
        try:
            self.lifecycle.ensure_helpers()
        except Exception as exc:  # noqa: BLE001 - logged just below
            self._log_failure('Keeping the helper VMs', exc)

    def scan_orphan_disks(self, force: bool = False) -> list[str]:
        """The driver's delayed orphan-disk job, every
        ``orphan_scan_interval`` s (0 disables)."""
        interval = self.conf.orphan_scan_interval
        now = time.monotonic()
        if not force and (not interval or
                          now - self._last_orphan_scan < interval):
            return []
        self._last_orphan_scan = now
        known = {vm.disk_path for vm in self.store.list_vms()
                 if vm.disk_path}
        return self.driver.cleanup_orphans(known)

    # ------------------------------------------------------------------
    # callbacks of the parts
    # ------------------------------------------------------------------

    def vm_event(self, event: str, vm: objects.Vm,
                 ctxt: dict | None = None) -> None:
        """A VM changed (lifecycle or reconciliation): notify, best
        effort (:mod:`rapid_vmm.notifications`)."""
        extra = {}
        if event == 'resized' and vm.pending_resize:
            extra['previous'] = vm.pending_resize.get('from')
        self.notifier.vm_changed(ctxt or {}, event, record_of(vm), **extra)

    def _notify_as_of_resize(self, vm: objects.Vm) -> None:
        """Tell the VM's AS it is about to be resized (SPEC F6, 7), over
        the protocol it registered with, and wait (bounded) for it.

        :raises VmStateConflict: when the AS refuses (it is busy); an AS
            that does not answer does not hold the resize up.
        """
        from rapid_vmm.legacy import as_notice
        outcome = as_notice.notify_migration(self.conf, vm, self.transport)
        if outcome == as_notice.Outcome.REFUSED:
            raise exception.VmStateConflict(
                action='resize', user_id=vm.user_id,
                state='refused by its Acceleration Server')

    def _on_registered(self) -> None:
        self.outbox.wake()

    def _on_vm_id(self, vm_key: str, vm_id: int) -> None:
        """The DS id of a VM is known: keep it in the instance too.

        Written by a worker of its own, not by the outbox's sender: the
        next messages need not wait for the hypervisor.
        """
        try:
            self._metadata_writer.submit(self._write_vm_id, vm_key, vm_id)
        except RuntimeError:  # stopping: the reconciler repairs it later
            LOG.debug('DS id %s of %s not written: stopping', vm_id, vm_key)

    def _write_vm_id(self, vm_key: str, vm_id: int) -> None:
        vm = self.store.get_vm_by_name(vm_key)
        if vm is None or vm.driver_id is None:
            return
        try:
            self.driver.update_metadata(vm, self.lifecycle.metadata_identity())
        except NotImplementedError:
            return
        except exception.RapidVmmException as exc:
            LOG.warning('Cannot record DS id %s in the metadata of %s: %s',
                        vm_id, vm_key, exc)

    def identity_from_instance(self, instance: virt_driver.Instance) -> None:
        """A lost state takes the VMM id kept in an instance's metadata."""
        if self.reporter.adopt_identity(instance.identity,
                                        f'the metadata of {instance.name}'):
            self.outbox.wake()


def _measurable(vm: objects.Vm) -> bool:
    return (vm.task_state == Task.NONE.value and
            vm.status != Status.STOPPED)
