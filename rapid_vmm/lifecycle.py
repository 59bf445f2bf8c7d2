"""The life cycle of one user's VM: every transition, persisted first.

Each operation follows the same steps (Nova's ``task_state``, ironic's
reservation):

1. under the user's lock, in ONE state transaction: check the VM's state,
   reserve the capacity the operation needs (against every record, so two
   starts never overbook the host) and record the task state and its
   intent (``building``, ``resuming``, ``suspending``, ``resizing``,
   ``deleting``);
2. call the driver (and the AS, the network) outside any host-wide lock:
   other users' requests go on meanwhile;
3. in ONE transaction again: record the outcome and queue the messages
   that report it (:mod:`rapid_vmm.outbox`), or roll the intent back.

An agent that dies between the steps leaves the intent in the record; the
reconciler calls :meth:`Lifecycle.recover` on the first pass that can reach
the hypervisor, which finishes or rolls back what was in flight from what
the hypervisor shows. Nothing here destroys an instance that the driver
does not recognise as this agent's (:class:`InstanceNotOurs`), and only an
explicit request (remove, deregister, an AS ``remove``, or the roll-back of
this agent's own start) destroys at all.
"""

from collections.abc import Callable
import threading
import time
import uuid

from oslo_config import cfg
from oslo_log import log as logging

from rapid_vmm import capacity
from rapid_vmm import exception
from rapid_vmm import faults
from rapid_vmm import flavors
from rapid_vmm import handshake
from rapid_vmm import locks
from rapid_vmm import objects
from rapid_vmm import outbox
from rapid_vmm import state
from rapid_vmm.virt import driver as virt_driver

LOG = logging.getLogger(__name__)

Status = objects.VmStatus
Task = objects.TaskState
Presence = virt_driver.Presence
Power = virt_driver.PowerState

#: Task states of an operation in flight (``UNKNOWN`` is not one).
IN_FLIGHT = (Task.BUILDING.value, Task.RESUMING.value,
             Task.SUSPENDING.value, Task.RESIZING.value,
             Task.DELETING.value)

#: Called as ``listener(event, vm, ctxt)`` after each committed change.
Listener = Callable[[str, objects.Vm, dict | None], None]


def request_id(ctxt: dict | None) -> str | None:
    return (ctxt or {}).get('request_id')


def record_of(vm: objects.Vm) -> dict:
    """The VM record of the API (SPEC 4) with the agent's extra fields."""
    record = vm.to_record()
    record['task_state'] = vm.task_state
    record['as_ready'] = vm.as_ready
    record['resize_pending'] = bool(vm.pending_resize)
    record['saved'] = vm.saved
    if vm.state_reason:
        record['state_reason'] = vm.state_reason
    return record


class Lifecycle:
    """Carries out the transitions of SPEC F4-F6 and F9 on the driver.

    :param limits: returns the host's :class:`capacity.Limits`.
    :param identity: returns the agent's identity (``vmm_id``,
        ``slam_host``, ``slam_port``), written into instance metadata.
    :param before_resize: called with the VM before the driver resizes
        it (the AS notice); bounded by the caller, never raises.
    """

    def __init__(self, conf: cfg.ConfigOpts, store: state.StateStore,
                 driver: virt_driver.ComputeDriver, grid: flavors.Grid,
                 limits: Callable[[], capacity.Limits],
                 user_locks: locks.UserLocks,
                 as_handshake: handshake.AsHandshake,
                 identity: Callable[[], dict],
                 wake_outbox: Callable[[], None],
                 stopping: threading.Event):
        self.conf = conf
        self.store = store
        self.driver = driver
        self.grid = grid
        self._limits = limits
        self.locks = user_locks
        self.handshake = as_handshake
        self._identity = identity
        self._wake_outbox = wake_outbox
        self._stopping = stopping
        self.listeners: list[Listener] = []
        self.before_resize: Callable[[objects.Vm], None] | None = None
        #: Helper index -> (consecutive failures, monotonic time of the
        #: next attempt).
        self._helper_backoff: dict[int, tuple[int, float]] = {}

    # -- plumbing ---------------------------------------------------------

    def _committed(self, event: str, vm: objects.Vm,
                   ctxt: dict | None) -> None:
        """A change is committed: wake the outbox, tell the listeners."""
        self._wake_outbox()
        for listener in self.listeners:
            try:
                listener(event, vm, ctxt)
            except Exception:
                LOG.exception('Listener of %s for %s failed', event, vm.name)

    def metadata_identity(self) -> dict:
        identity = self._identity()
        return {key: identity.get(key)
                for key in ('vmm_id', 'slam_host', 'slam_port')}

    def _settled(self, user_id: int, action: str) -> objects.Vm:
        """The user's VM, with no operation in flight.

        A leftover intent of an agent that died is finished first when the
        hypervisor can be asked.

        :raises VmNotFound: when the user has no VM.
        :raises VmStateConflict: when its state is unknown or an
            operation is still in flight.
        """
        vm = self.store.get_vm(user_id)
        if vm is None:
            raise exception.VmNotFound(user_id=user_id)
        if vm.task_state in IN_FLIGHT:
            vm = self._recover_now(vm)
            if vm is None:
                raise exception.VmNotFound(user_id=user_id)
        if vm.task_state == Task.UNKNOWN.value:
            raise exception.VmStateConflict(
                action=action, user_id=user_id,
                state=f'unknown to the hypervisor ({vm.state_reason})')
        if vm.task_state != Task.NONE.value:
            raise exception.VmStateConflict(action=action, user_id=user_id,
                                            state=vm.task_state)
        return vm

    def _recover_now(self, vm: objects.Vm) -> objects.Vm | None:
        try:
            observation = self.driver.observe([vm]).get(vm.name)
        except exception.DriverError as exc:
            LOG.warning('Cannot look at %s to finish its %s: %s', vm.name,
                        vm.task_state, exc)
            return vm
        if observation is not None:
            self.recover(vm, observation)
        return self.store.get_vm(vm.user_id)

    # -- start ------------------------------------------------------------

    def start(self, ctxt: dict, user_id: int, os_type: int,
              vm_type: flavors.VmType, gpu_cores: int) -> objects.Vm:
        """Give the user a running VM (F4); the caller holds no lock.

        The outcome is queued for the SLAM (``vm_started`` or
        ``vm_start_failed``) in the transaction that records it.
        """
        with self.locks.hold(user_id, 'start'):
            existing = self.store.get_vm(user_id)
            if existing is not None and existing.task_state in IN_FLIGHT:
                existing = self._recover_now(existing)
            if existing is not None:
                existing = self._settled(user_id, 'start')
                if existing.is_running:
                    LOG.info('User %s already has the running VM %s',
                             user_id, existing.name)
                    with self.store.transaction() as txn:
                        outbox.queue_vm_started(txn, self.conf.host,
                                                record_of(existing),
                                                request_id(ctxt))
                    self._wake_outbox()
                    return existing
                if existing.status == Status.SUSPENDED:
                    vm = self._resume_locked(ctxt, existing)
                    with self.store.transaction() as txn:
                        outbox.queue_vm_started(txn, self.conf.host,
                                                record_of(vm),
                                                request_id(ctxt))
                    self._wake_outbox()
                    return vm
                LOG.info('Replacing the stopped VM %s of user %s',
                         existing.name, user_id)
                self._delete_locked(ctxt, existing, notify=False,
                                    reason='replaced by a new VM')
            vm = self.new_vm(user_id, os_type, vm_type, gpu_cores)
            return self.create_locked(ctxt, vm, wait_for_as=True)

    def start_refused(self, ctxt: dict, user_id: int,
                      error: Exception) -> None:
        """Tell the SLAM a start failed before it began (bad input, busy)."""
        with self.store.transaction() as txn:
            outbox.queue_vm_start_failed(txn, self.conf.host, user_id,
                                         error, request_id(ctxt))
        self._wake_outbox()

    def new_vm(self, user_id: int, os_type: int, vm_type: flavors.VmType,
               gpu_cores: int = 0, helper: int = 0) -> objects.Vm:
        token = uuid.uuid4().hex[:8]
        if helper:
            name = f'rapid-helper-{helper}-{token}'
        else:
            name = f'rapid-vm-{user_id}-{token}'
        return objects.Vm(
            user_id=user_id, name=name, vcpus=vm_type.vcpus,
            memory_mb=vm_type.memory_mb, disk_gb=vm_type.disk_gb,
            os_type=os_type, gpu_cores=gpu_cores, helper=helper,
            status=Status.STARTED, task_state=Task.BUILDING.value,
            intent={'op': 'create'},
            memory_max_mb=self.driver.memory_ceiling_mb(vm_type.memory_mb))

    def create_locked(self, ctxt: dict | None, vm: objects.Vm,
                      wait_for_as: bool) -> objects.Vm:
        """Create ``vm`` (its record is new); the caller holds its lock."""
        vm_type = flavors.VmType(vm.vcpus, vm.memory_mb, vm.disk_gb)
        with self.store.transaction() as txn:
            capacity.check(self._limits(),
                           capacity.usage_in(txn, vm.user_id), vm_type,
                           vm.gpu_cores, memory_mb=vm.memory_max_mb)
            txn.save_vm(vm)
        faults.point('start.recorded')
        wait_for_as = wait_for_as and self.conf.as_register_timeout > 0
        if wait_for_as:
            self.handshake.arm(vm.user_id)
        started = time.monotonic()
        try:
            made = self.driver.create(vm, identity=self.metadata_identity())
            vm.driver_id, vm.disk_path, vm.image = (
                made.driver_id, made.disk_path, made.image)
            self.store.update_vm(vm.user_id, driver_id=vm.driver_id,
                                 disk_path=vm.disk_path, image=vm.image)
            faults.point('start.created')
            vm.ip_address = self.driver.wait_for_ip(vm)
            with self.store.transaction() as txn:
                txn.update_vm(vm.user_id, ip_address=vm.ip_address)
                outbox.queue_register_vm(txn, vm, self.grid,
                                         request_id(ctxt))
                if vm.is_helper:
                    outbox.queue_notify_helper(txn, vm, request_id(ctxt))
            self._wake_outbox()
            faults.point('start.addressed')
            if wait_for_as:
                LOG.info('Waiting up to %s s for the Acceleration Server of '
                         'user %s at %s', self.conf.as_register_timeout,
                         vm.user_id, vm.ip_address)
                self.handshake.wait(vm.user_id,
                                    self.conf.as_register_timeout)
                vm.as_ready = True
            faults.point('start.confirmed')
            with self.store.transaction() as txn:
                current = txn.get_vm(vm.user_id)
                vm.vm_id = current.vm_id if current else vm.vm_id
                vm.as_ready = vm.as_ready or bool(current and
                                                  current.as_ready)
                vm.as_protocol = current.as_protocol if current else None
                vm.task_state, vm.intent = Task.NONE.value, None
                txn.update_vm(vm.user_id, task_state=vm.task_state,
                              intent=None, as_ready=vm.as_ready)
                if not vm.is_helper:
                    outbox.queue_vm_started(txn, self.conf.host,
                                            record_of(vm), request_id(ctxt))
        except Exception as exc:
            error = exc if isinstance(exc, exception.RapidVmmException) \
                else exception.DriverError(action='start VM',
                                           reason=str(exc))
            LOG.error('Starting %s for user %s failed: %s', vm.name,
                      vm.user_id, error)
            self._roll_back_start(ctxt, vm, error)
            if error is exc:
                raise
            raise error from exc
        finally:
            if wait_for_as:
                self.handshake.disarm(vm.user_id)
        self._committed('started', vm, ctxt)
        LOG.info('VM %s of user %s is running at %s (%.2f s)', vm.name,
                 vm.user_id, vm.ip_address, time.monotonic() - started)
        return vm

    def _roll_back_start(self, ctxt: dict | None, vm: objects.Vm,
                         error: Exception) -> None:
        """Undo a failed start of this agent: its own instance and record.

        If the instance cannot be removed now, the record stays
        ``building`` and the reconciler finishes the roll-back.
        """
        try:
            self.driver.destroy(vm)
        except exception.RapidVmmException as exc:
            LOG.error('Removing %s after its failed start failed (%s); '
                      'reconciliation will retry', vm.name, exc)
            with self.store.transaction() as txn:
                txn.update_vm(vm.user_id, intent={'op': 'create',
                                                  'slam_told': True})
                if not vm.is_helper:
                    outbox.queue_vm_start_failed(txn, self.conf.host,
                                                 vm.user_id, error,
                                                 request_id(ctxt))
            error.slam_told = True
            self._wake_outbox()
            return
        self._forget(ctxt, vm, start_error=error)

    def _forget(self, ctxt: dict | None, vm: objects.Vm,
                start_error: Exception | None = None,
                notify: bool = True) -> None:
        """Delete the record of a VM whose instance is gone, and queue
        what the peers must hear of it, in one transaction."""
        with self.store.transaction() as txn:
            current = txn.get_vm(vm.user_id)
            if current is None or current.name != vm.name:
                return
            txn.delete_vm(vm.user_id)
            known = current.vm_id is not None or txn.queued(vm.name,
                                                            'register_vm')
            if notify and known and current.status != Status.STOPPED:
                current.status = Status.STOPPED
                outbox.queue_notify_vm(txn, current, request_id(ctxt))
            slam_told = (current.intent or {}).get('slam_told')
            if start_error is not None and not vm.is_helper and \
                    not slam_told:
                outbox.queue_vm_start_failed(txn, self.conf.host,
                                             vm.user_id, start_error,
                                             request_id(ctxt))
        if start_error is not None:
            start_error.slam_told = True
        self.handshake.disarm(vm.user_id)
        self._committed('stopped' if start_error is None else
                        'start_failed', current, ctxt)

    # -- resume and suspend -------------------------------------------------

    def resume(self, ctxt: dict, user_id: int) -> objects.Vm:
        """Resume the user's suspended VM; a running one is returned."""
        with self.locks.hold(user_id, 'resume'):
            vm = self._settled(user_id, 'resume')
            if vm.is_running:
                return vm
            if vm.status != Status.SUSPENDED:
                raise exception.VmStateConflict(
                    action='resume', user_id=user_id,
                    state=Status(vm.status).name.lower())
            return self._resume_locked(ctxt, vm)

    def _resume_locked(self, ctxt: dict | None,
                       vm: objects.Vm) -> objects.Vm:
        with self.store.transaction() as txn:
            if vm.saved:
                # Its memory was given back to the host: claim it again.
                vm_type = flavors.VmType(vm.vcpus, vm.memory_mb, vm.disk_gb)
                capacity.check(self._limits(),
                               capacity.usage_in(txn, vm.user_id), vm_type,
                               vm.gpu_cores,
                               memory_mb=max(vm.memory_mb,
                                             vm.memory_max_mb))
            txn.update_vm(vm.user_id, task_state=Task.RESUMING.value,
                          intent={'op': 'resume'})
        # The original AS registers once, at boot: a VM whose AS is still
        # running (paused or saved with it) is not waited for again.
        wait_for_as = not vm.as_ready and self.conf.as_register_timeout > 0
        if wait_for_as:
            self.handshake.arm(vm.user_id)
        try:
            try:
                self.driver.resume(vm)
            except Exception:
                self.store.update_vm(vm.user_id, task_state=Task.NONE.value,
                                     intent=None)
                raise
            try:
                vm.ip_address = self.driver.wait_for_ip(
                    vm, timeout=min(10, self.conf.libvirt.ip_timeout))
            except exception.DriverError as exc:
                LOG.warning('No fresh address for resumed %s (%s); keeping '
                            '%s', vm.name, exc, vm.ip_address)
            with self.store.transaction() as txn:
                vm.status, vm.saved = Status.RESUMED, False
                vm.task_state, vm.intent = Task.NONE.value, None
                txn.update_vm(vm.user_id, status=vm.status, saved=False,
                              task_state=vm.task_state, intent=None,
                              ip_address=vm.ip_address)
                outbox.queue_notify_vm(txn, vm, request_id(ctxt))
            self._committed('resumed', vm, ctxt)
            if wait_for_as:
                self.handshake.wait(vm.user_id, self.conf.as_register_timeout)
                vm.as_ready = True
                self.store.update_vm(vm.user_id, as_ready=True)
        finally:
            if wait_for_as:
                self.handshake.disarm(vm.user_id)
        LOG.info('Resumed VM %s of user %s', vm.name, vm.user_id)
        return vm

    def suspend(self, ctxt: dict, user_id: int) -> objects.Vm:
        """Suspend the user's running VM; a suspended one is returned."""
        with self.locks.hold(user_id, 'suspend'):
            vm = self._settled(user_id, 'suspend')
            if vm.status == Status.SUSPENDED:
                return vm
            if not vm.is_running:
                raise exception.VmStateConflict(
                    action='suspend', user_id=user_id,
                    state=Status(vm.status).name.lower())
            self.store.update_vm(user_id, task_state=Task.SUSPENDING.value,
                                 intent={'op': 'suspend'})
            try:
                saved = bool(self.driver.suspend(vm))
            except Exception:
                self.store.update_vm(user_id, task_state=Task.NONE.value,
                                     intent=None)
                raise
            with self.store.transaction() as txn:
                vm.status, vm.saved = Status.SUSPENDED, saved
                vm.task_state, vm.intent = Task.NONE.value, None
                txn.update_vm(user_id, status=vm.status, saved=saved,
                              task_state=vm.task_state, intent=None)
                outbox.queue_notify_vm(txn, vm, request_id(ctxt))
        self._committed('suspended', vm, ctxt)
        LOG.info('Suspended VM %s of user %s%s', vm.name, user_id,
                 ' (memory saved to disk)' if saved else '')
        return vm

    # -- remove -----------------------------------------------------------

    def remove(self, ctxt: dict, user_id: int, reason: str) -> None:
        """Remove the user's VM and its disk: an explicit request."""
        with self.locks.hold(user_id, 'remove'):
            vm = self.store.get_vm(user_id)
            if vm is None:
                raise exception.VmNotFound(user_id=user_id)
            self._delete_locked(ctxt, vm, notify=True, reason=reason)

    def _delete_locked(self, ctxt: dict | None, vm: objects.Vm, notify: bool,
                       reason: str) -> None:
        previous_task = vm.task_state
        self.store.update_vm(vm.user_id, task_state=Task.DELETING.value,
                             intent={'op': 'delete', 'reason': reason,
                                     'notify': notify})
        faults.point('remove.recorded')
        try:
            self.driver.destroy(vm)
        except exception.InstanceNotOurs:
            self.store.update_vm(vm.user_id, task_state=previous_task
                                 if previous_task not in IN_FLIGHT
                                 else Task.UNKNOWN.value, intent=None)
            raise
        except Exception:
            # The intent stays: the reconciler finishes the removal.
            LOG.warning('Removing %s failed; it stays "deleting" and '
                        'reconciliation retries', vm.name)
            raise
        faults.point('remove.destroyed')
        self._forget(ctxt, vm, notify=notify)
        LOG.info('Removed VM %s of user %s (%s)', vm.name, vm.user_id,
                 reason)

    # -- resize -----------------------------------------------------------

    def resize(self, ctxt: dict, user_id: int, vcpus: int, memory_mb: int,
               disk_gb: int) -> objects.Vm:
        """Resize the user's running VM to a grid type (0 = keep)."""
        with self.locks.hold(user_id, 'resize'):
            vm = self._settled(user_id, 'resize')
            if not vm.is_running:
                raise exception.VmStateConflict(
                    action='resize', user_id=user_id,
                    state=Status(vm.status).name.lower())
            if vm.pending_resize:
                raise exception.VmStateConflict(
                    action='resize', user_id=user_id,
                    state='waiting for confirm_flavor of its last resize')
            new_type = self.grid.round_down(vcpus or vm.vcpus,
                                            memory_mb or vm.memory_mb,
                                            disk_gb or vm.disk_gb)
            old_type = flavors.VmType(vm.vcpus, vm.memory_mb, vm.disk_gb)
            if new_type == old_type:
                return vm
            if new_type.disk_gb < old_type.disk_gb:
                raise exception.InvalidRequest(
                    reason=f'disk cannot shrink from {old_type.disk_gb} GB '
                           f'to {new_type.disk_gb} GB')
            with self.store.transaction() as txn:
                capacity.check(self._limits(),
                               capacity.usage_in(txn, user_id), new_type,
                               vm.gpu_cores,
                               memory_mb=max(new_type.memory_mb,
                                             vm.memory_max_mb))
                txn.update_vm(user_id, task_state=Task.RESIZING.value,
                              intent={'op': 'resize',
                                      'from': old_type.as_list(),
                                      'to': new_type.as_list()})
            faults.point('resize.recorded')
            try:
                if self.before_resize is not None:
                    self.before_resize(vm)
                self.driver.resize(vm, new_type)
            except Exception:
                self.store.update_vm(user_id, task_state=Task.NONE.value,
                                     intent=None)
                raise
            faults.point('resize.resized')
            vm = self._resized(vm, old_type, new_type)
        self._committed('resized', vm, ctxt)
        LOG.info('Resized the VM of user %s from %s to %s', user_id,
                 old_type.as_list(), new_type.as_list())
        return vm

    def _resized(self, vm: objects.Vm, old_type: flavors.VmType,
                 new_type: flavors.VmType) -> objects.Vm:
        vm.vcpus, vm.memory_mb, vm.disk_gb = (
            new_type.vcpus, new_type.memory_mb, new_type.disk_gb)
        vm.memory_max_mb = max(vm.memory_max_mb, new_type.memory_mb)
        vm.pending_resize = {'from': old_type.as_list(),
                             'to': new_type.as_list()}
        vm.task_state, vm.intent = Task.NONE.value, None
        self.store.update_vm(vm.user_id, vcpus=vm.vcpus,
                             memory_mb=vm.memory_mb, disk_gb=vm.disk_gb,
                             memory_max_mb=vm.memory_max_mb,
                             pending_resize=vm.pending_resize,
                             task_state=vm.task_state, intent=None)
        return vm

    def confirm_resize(self, ctxt: dict, user_id: int) -> objects.Vm:
        """Confirm the user's last resize; idempotent."""
        with self.locks.hold(user_id, 'confirm a resize of'):
            vm = self._settled(user_id, 'confirm a resize of')
            if not vm.pending_resize:
                return vm
            self.driver.confirm_resize(vm)
            vm.pending_resize = None
            self.store.update_vm(user_id, pending_resize=None)
        self._committed('resize_confirmed', vm, ctxt)
        return vm

    # -- recovery of what a dead agent left in flight -------------------------

    def recover(self, vm: objects.Vm,
                observation: virt_driver.Observation) -> str | None:
        """Finish or roll back ``vm``'s operation in flight, from what the
        hypervisor shows; the caller holds the user's lock.

        Returns what was done (for the reconciler's summary), or None when
        the hypervisor's answer does not allow a decision yet.
        """
        task = vm.task_state
        presence = observation.presence
        instance = observation.instance
        if presence == Presence.UNKNOWN:
            return None
        if presence in (Presence.FOREIGN, Presence.UNREADABLE):
            reason = (f'its instance is {presence.value} '
                      f'({observation.reason}) after an interrupted {task}')
            LOG.warning('VM %s of user %s: %s; marked unknown, nothing '
                        'touched', vm.name, vm.user_id, reason)
            self.store.update_vm(vm.user_id, task_state=Task.UNKNOWN.value,
                                 state_reason=reason)
            return 'unknown'
        if task == Task.BUILDING.value:
            LOG.warning('Start of %s for user %s was interrupted; rolling '
                        'it back', vm.name, vm.user_id)
            self._roll_back_start(None, vm, exception.DriverError(
                action='start VM', reason='the agent restarted during the '
                                          'start'))
            return 'rolled back start'
        if task == Task.DELETING.value:
            intent = vm.intent or {}
            LOG.warning('Removal of %s of user %s was interrupted (%s); '
                        'finishing it', vm.name, vm.user_id,
                        intent.get('reason', 'removal'))
            try:
                self.driver.destroy(vm)
            except exception.InstanceNotOurs as exc:
                self.store.update_vm(vm.user_id,
                                     task_state=Task.UNKNOWN.value,
                                     state_reason=str(exc), intent=None)
                return 'unknown'
            self._forget(None, vm, notify=intent.get('notify', True))
            return 'finished removal'
        if presence == Presence.ABSENT:
            # The instance is gone; the reconciler's absence rule applies.
            self.store.update_vm(vm.user_id, task_state=Task.NONE.value,
                                 intent=None)
            return 'cleared'
        power = instance.power_state
        if task in (Task.RESUMING.value, Task.SUSPENDING.value):
            running = power == Power.RUNNING
            suspended = power == Power.SUSPENDED
            with self.store.transaction() as txn:
                fields = {'task_state': Task.NONE.value, 'intent': None}
                if running and not vm.is_running:
                    vm.status, vm.saved = Status.RESUMED, False
                    fields.update(status=vm.status, saved=False)
                    outbox.queue_notify_vm(txn, vm)
                elif suspended and vm.status != Status.SUSPENDED:
                    vm.status, vm.saved = Status.SUSPENDED, instance.saved
                    fields.update(status=vm.status, saved=vm.saved)
                    outbox.queue_notify_vm(txn, vm)
                txn.update_vm(vm.user_id, **fields)
            self._wake_outbox()
            LOG.warning('Interrupted %s of %s settled: the instance is %s',
                        task, vm.name, power.value)
            return f'settled {task}'
        if task == Task.RESIZING.value:
            intent = vm.intent or {}
            old = flavors.VmType(*intent.get('from', [vm.vcpus,
                                                      vm.memory_mb,
                                                      vm.disk_gb]))
            new = flavors.VmType(*intent.get('to', old.as_list()))
            if (instance.vcpus, instance.memory_mb) == (new.vcpus,
                                                        new.memory_mb):
                self._resized(vm, old, new)
                LOG.warning('Interrupted resize of %s had happened; '
                            'recorded %s', vm.name, new.as_list())
                return 'finished resize'
            self.store.update_vm(vm.user_id, task_state=Task.NONE.value,
                                 intent=None)
            LOG.warning('Interrupted resize of %s had not happened; '
                        'it keeps %s', vm.name, old.as_list())
            return 'rolled back resize'
        return None

    # -- helper VMs (F9) ------------------------------------------------------

    def ensure_helpers(self) -> None:
        """Keep ``helper_vm_count`` helper VMs (users -1..-N) running.

        A helper that fails to start is retried with exponential back-off
        (up to ``helper_retry_max_interval``), not recreated back to back.
        """
        wanted = self.conf.helper_vm_count
        for vm in self.store.list_vms():
            if vm.is_helper and vm.helper > wanted and \
                    vm.task_state == Task.NONE.value:
                with self.locks.try_hold(vm.user_id) as held:
                    if held:
                        self._try(f'remove helper {vm.helper}',
                                  self._delete_locked, None, vm, True,
                                  f'helper_vm_count is {wanted}')
        for index in range(1, wanted + 1):
            if self._stopping.is_set():
                return
            failures, next_attempt = self._helper_backoff.get(index, (0, 0))
            if time.monotonic() < next_attempt:
                continue
            if self._ensure_helper(index):
                self._helper_backoff.pop(index, None)
            else:
                failures += 1
                delay = min(2 ** (failures - 1) * 5,
                            self.conf.helper_retry_max_interval)
                self._helper_backoff[index] = (failures,
                                               time.monotonic() + delay)
                LOG.warning('Helper %s failed %s time(s); next attempt in '
                            '%s s', index, failures, delay)

    def _ensure_helper(self, index: int) -> bool:
        """One look at helper ``index``; False when an attempt failed."""
        user_id = -index
        with self.locks.try_hold(user_id) as held:
            if not held:
                return True
            vm = self.store.get_vm(user_id)
            if vm is not None:
                if vm.task_state != Task.NONE.value:
                    return True  # in flight or unknown: reconcile decides
                if vm.is_running:
                    return True
                if vm.status == Status.SUSPENDED:
                    return self._try(f'resume helper {index}',
                                     self._resume_locked, None, vm)
                if not self._try(f'replace helper {index}',
                                 self._delete_locked, None, vm, False,
                                 'helper replaced'):
                    return False
            helper = self.new_vm(user_id, objects.OsType.LINUX,
                                 self.grid.smallest, helper=index)
            return self._try(f'start helper {index}', self.create_locked,
                             None, helper, False)

    def _try(self, what: str, func, *args) -> bool:
        try:
            func(*args)
            return True
        except exception.RapidVmmException as exc:
            LOG.error('Could not %s: %s', what, exc)
            return False
