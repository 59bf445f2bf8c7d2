"""Reconciliation of the agent's records with the hypervisor (SPEC F13).

Observe, then decide; never destroy. Each pass asks the driver what it
sees of every record's instance (:meth:`ComputeDriver.observe`: ours,
foreign, unreadable, absent, unknown) and of the instances that carry our
metadata (:meth:`ComputeDriver.list_instances`), then, VM by VM under the
user's lock (a VM a request is working on is left to the next pass):

* an operation a dead agent left in flight is finished or rolled back
  (:meth:`Lifecycle.recover`);
* an instance of ours: the record takes its power state (the DS is told),
  a record marked unknown is vouched for again, missing metadata (the DS
  id, the VMM id) is written back;
* foreign or unreadable metadata: the record is marked ``unknown`` with the
  reason and reported; nothing is touched. An instance owned by the
  declared previous ``host`` (a rename) is taken over;
* absent: only when the hypervisor answered "no such instance" to a lookup
  by UUID, on ``reconcile_absent_passes`` passes in a row, the record is
  marked stopped (4) and the DS told; before that it is ``unknown``. Its
  disk is kept (only an explicit request or the delayed orphan-disk job
  removes disks);
* an instance of ours that no record knows is adopted, with the DS id and
  VMM id of its metadata (a lost state database is rebuilt this way).

If the hypervisor cannot be asked, nothing changes: VMs are "unknown" to
the caller (``driver_reachable`` is False), never deleted.
"""

import threading
import time

from oslo_log import log as logging

from rapid_vmm import exception
from rapid_vmm import lifecycle as vm_lifecycle
from rapid_vmm import objects
from rapid_vmm import outbox
from rapid_vmm.virt import driver as virt_driver

LOG = logging.getLogger(__name__)

Status = objects.VmStatus
Task = objects.TaskState
Presence = virt_driver.Presence
Power = virt_driver.PowerState

#: The record's status for each power state (None: keep a running one).
_POWER_TO_STATUS = {
    Power.RUNNING: None,
    Power.SUSPENDED: Status.SUSPENDED,
    Power.SHUTOFF: Status.STOPPED,
    Power.CRASHED: Status.STOPPED,
}

#: An imported record (``rapid-vmm-manage import-legacy``) has the intent
#: ``{'import': 'legacy'}``: its instance was made by the original Java
#: VMM and has no metadata of ours until it is taken over.


class Reconciler:
    """Brings the manager's records in line with its driver.

    :param manager: the :class:`rapid_vmm.manager.VmmManager` (its store,
        driver, lifecycle, identity and ``previous_host``).
    """

    def __init__(self, manager):
        self.manager = manager
        self.store = manager.store
        self.driver = manager.driver
        self.lifecycle: vm_lifecycle.Lifecycle = manager.lifecycle
        #: False while the hypervisor cannot be asked (VMs are "unknown").
        self.driver_reachable = True
        #: Passes completed with the hypervisor reachable.
        self.passes = 0
        #: VM name -> (passes it was absent on, when first seen absent).
        self._absent: dict[str, tuple[int, float]] = {}
        self._repaired: set[tuple[str, int | None, int | None]] = set()
        # One pass at a time: a pass started on an event and one started by
        # the timer would otherwise race on the same VMs.
        self._pass_lock = threading.Lock()

    @property
    def conf(self):
        return self.manager.conf

    def reconcile(self, startup: bool = False,
                  names: set[str] | None = None) -> dict:
        """One pass; returns what it did, by kind, as lists of user ids.

        ``names``: only the records of these VMs (the instances that
        hypervisor events were about) and of those marked unknown, without
        looking for instances to adopt; None: every record, and adoption.
        """
        with self._pass_lock:
            return self._reconcile(startup, names)

    def _reconcile(self, startup: bool, names: set[str] | None) -> dict:
        summary: dict[str, list] = {
            'recovered': [], 'changed': [], 'stopped': [], 'unknown': [],
            'vouched': [], 'adopted': [], 'claimed': [], 'left_alone': []}
        if names is None:
            records = self.store.list_vms()
        else:
            # The named VMs, and those the hypervisor could not vouch for
            # yet: each look at the hypervisor settles them sooner.
            unknown = self.store.list_vms(task_state=Task.UNKNOWN.value)
            named = [vm for vm in map(self.store.get_vm_by_name,
                                      sorted(names - {vm.name for vm in
                                                      unknown}))
                     if vm is not None]
            records = named + unknown
        owners = {self.conf.host}
        if self.manager.previous_host:
            owners.add(self.manager.previous_host)
        try:
            observations = self.driver.observe(records)
            instances = [] if names is not None else \
                self.driver.list_instances(owners=owners)
        except exception.DriverError as exc:
            if self.driver_reachable or startup:
                LOG.error('Cannot reconcile: %s; VM states are unknown '
                          'until the hypervisor answers (nothing is '
                          'changed meanwhile)', exc)
            self.driver_reachable = False
            return summary
        if not self.driver_reachable:
            LOG.info('The hypervisor answers again; reconciling')
        self.driver_reachable = True
        seen_ids = {obs.driver_id for obs in observations.values()
                    if obs.driver_id}
        seen_names = set(observations)
        for vm in records:
            observation = observations.get(vm.name)
            if observation is None:
                continue
            with self.manager.locks.try_hold(vm.user_id) as held:
                if not held:
                    LOG.debug('VM of user %s is busy; reconciled next time',
                              vm.user_id)
                    continue
                current = self.store.get_vm(vm.user_id)
                if current is None or current.name != vm.name:
                    continue  # changed under us: a request got there first
                self._reconcile_vm(current, observation, summary)
        for instance in instances:
            if instance.driver_id in seen_ids or instance.name in seen_names:
                continue
            self._consider_adoption(instance, summary)
        if names is None:
            self.passes += 1
        done = {k: v for k, v in summary.items() if v}
        if done:
            LOG.info('Reconciled with the hypervisor: %s', done)
        return summary

    # -- one record -------------------------------------------------------

    def _reconcile_vm(self, vm: objects.Vm,
                      observation: virt_driver.Observation,
                      summary: dict) -> None:
        presence = observation.presence
        if presence != Presence.ABSENT:
            self._absent.pop(vm.name, None)
        if vm.task_state in vm_lifecycle.IN_FLIGHT:
            done = self.lifecycle.recover(vm, observation)
            if done:
                summary['recovered'].append(vm.user_id)
            return
        if presence == Presence.UNKNOWN:
            LOG.debug('No answer about %s: %s', vm.name, observation.reason)
            return
        if presence == Presence.OURS:
            self._ours(vm, observation.instance, summary)
        elif presence == Presence.ABSENT:
            self._absent_instance(vm, summary)
        else:
            self._not_ours(vm, observation, summary)

    def _mark_unknown(self, vm: objects.Vm, reason: str,
                      summary: dict) -> None:
        if vm.task_state == Task.UNKNOWN.value and vm.state_reason == reason:
            return
        LOG.warning('VM %s of user %s is unknown: %s; nothing is touched '
                    'and it is reported until the operator or the '
                    'hypervisor settles it', vm.name, vm.user_id, reason)
        self.store.update_vm(vm.user_id, task_state=Task.UNKNOWN.value,
                             state_reason=reason)
        summary['unknown'].append(vm.user_id)
        self.manager.vm_event('unknown', vm.copy(task_state='unknown',
                                                 state_reason=reason))

    def _ours(self, vm: objects.Vm, instance: virt_driver.Instance,
              summary: dict) -> None:
        if instance.power_state == Power.ERROR:
            self._mark_unknown(vm, instance.state_reason or
                               'stopped by a fault', summary)
            return
        fields: dict = {}
        if vm.task_state == Task.UNKNOWN.value:
            LOG.info('VM %s of user %s is vouched for by the hypervisor '
                     'again', vm.name, vm.user_id)
            fields.update(task_state=Task.NONE.value, state_reason='')
            summary['vouched'].append(vm.user_id)
        if vm.driver_id != instance.driver_id:
            fields['driver_id'] = instance.driver_id
        new_status = _status_after(vm, instance)
        notify = False
        if new_status is not None:
            LOG.warning('VM %s of user %s is %s on the hypervisor; status '
                        '%s -> %s', vm.name, vm.user_id,
                        instance.power_state.value,
                        Status(vm.status).name, Status(new_status).name)
            fields['status'] = new_status
            if new_status == Status.SUSPENDED:
                fields['saved'] = instance.saved
            if new_status in (Status.STOPPED, Status.RESUMED):
                fields['saved'] = False
            if new_status == Status.STOPPED:
                # A guest that boots again registers its AS again.
                fields['as_ready'] = False
            notify = True
            summary['changed'].append(vm.user_id)
        if fields:
            with self.store.transaction() as txn:
                txn.update_vm(vm.user_id, **fields)
                if notify:
                    vm.status = new_status
                    outbox.queue_notify_vm(txn, vm)
            if notify:
                self.manager.wake_outbox()
                self.manager.vm_event(_EVENTS[new_status],
                                      self.store.get_vm(vm.user_id) or vm)
        self._repair_metadata(vm, instance)

    def _repair_metadata(self, vm: objects.Vm,
                         instance: virt_driver.Instance) -> None:
        """Write the DS id and VMM id into metadata that lacks them."""
        identity = self.lifecycle.metadata_identity()
        wanted = (vm.name, vm.vm_id, identity.get('vmm_id'))
        if wanted in self._repaired:
            return
        stale = (vm.vm_id is not None and instance.vm_id != vm.vm_id) or (
            identity.get('vmm_id') is not None and
            instance.identity.get('vmm_id') != identity.get('vmm_id'))
        if stale:
            try:
                self.driver.update_metadata(vm, identity)
            except exception.RapidVmmException as exc:
                LOG.warning('Cannot write the identity into the metadata '
                            'of %s: %s', vm.name, exc)
                return
        self._repaired.add(wanted)

    def _absent_instance(self, vm: objects.Vm, summary: dict) -> None:
        if vm.status == Status.STOPPED and \
                vm.task_state == Task.NONE.value:
            self._absent.pop(vm.name, None)
            return
        passes, first = self._absent.get(vm.name, (0, time.monotonic()))
        passes += 1
        self._absent[vm.name] = (passes, first)
        wanted = max(self.conf.reconcile_absent_passes, 1)
        waited = time.monotonic() - first
        if passes < wanted or waited < self.conf.reconcile_absent_seconds:
            self._mark_unknown(vm, 'its instance was not found by UUID '
                                   f'(pass {passes}, {waited:.0f} s; gone '
                                   f'after {wanted} passes and '
                                   f'{self.conf.reconcile_absent_seconds} '
                                   's)', summary)
            return
        self._absent.pop(vm.name, None)
        LOG.warning('The instance of VM %s of user %s is gone (not found by '
                    'UUID on %s passes over %.0f s): marked stopped, its '
                    'disk kept', vm.name, vm.user_id, passes, waited)
        with self.store.transaction() as txn:
            vm.status = Status.STOPPED
            txn.update_vm(vm.user_id, status=vm.status, ip_address=None,
                          as_ready=False, saved=False,
                          task_state=Task.NONE.value,
                          state_reason='instance gone')
            outbox.queue_notify_vm(txn, vm)
        self.manager.wake_outbox()
        summary['stopped'].append(vm.user_id)
        self.manager.vm_event('stopped', vm)

    def _not_ours(self, vm: objects.Vm,
                  observation: virt_driver.Observation,
                  summary: dict) -> None:
        instance = observation.instance
        previous = self.manager.previous_host
        claim_from = None
        if previous and instance is not None and instance.owner == previous:
            claim_from = previous
        elif observation.presence == Presence.UNREADABLE and \
                (vm.intent or {}).get('import') == 'legacy':
            claim_from = virt_driver.CLAIM_UNMARKED
        if claim_from is not None:
            try:
                self.driver.update_metadata(
                    vm, self.lifecycle.metadata_identity(),
                    claim_from=claim_from)
            except exception.RapidVmmException as exc:
                self._mark_unknown(vm, f'taking it over failed: {exc}',
                                   summary)
                return
            LOG.warning('Took over instance %s of user %s (%s)', vm.name,
                        vm.user_id,
                        f'renamed from host {previous}' if claim_from ==
                        previous else 'imported from a Java VMM')
            self.store.update_vm(vm.user_id, intent=None, state_reason='',
                                 task_state=Task.NONE.value)
            summary['claimed'].append(vm.user_id)
            return
        self._mark_unknown(vm, f'its instance is {observation.presence.value}'
                               f' ({observation.reason})', summary)

    # -- instances no record knows ------------------------------------------

    def _consider_adoption(self, instance: virt_driver.Instance,
                           summary: dict) -> None:
        """Adopt ``instance`` if nobody owns its user.

        The decision is taken under the user's lock, with the records as
        they are now (a start may have finished since the listing).
        """
        with self.manager.locks.try_hold(instance.user_id) as held:
            if not held:
                LOG.debug('User %s is busy; adoption of %s deferred',
                          instance.user_id, instance.name)
                return
            record = self.store.get_vm(instance.user_id)
            if record is not None:
                if record.name != instance.name and \
                        record.driver_id != instance.driver_id:
                    LOG.warning('Instance %s claims user %s, whose VM is '
                                '%s; left alone for the operator',
                                instance.name, instance.user_id,
                                record.name)
                    summary['left_alone'].append(instance.user_id)
                return
            self._adopt(instance)
            summary['adopted'].append(instance.user_id)

    def _adopt(self, instance: virt_driver.Instance) -> None:
        status = _POWER_TO_STATUS.get(instance.power_state) or Status.STARTED
        vm = objects.Vm(
            user_id=instance.user_id, name=instance.name,
            vcpus=instance.vcpus, memory_mb=instance.memory_mb,
            disk_gb=instance.disk_gb, os_type=instance.os_type,
            gpu_cores=instance.gpu_cores, helper=instance.helper,
            status=status, driver_id=instance.driver_id,
            image=instance.image, disk_path=instance.disk_path,
            vm_id=instance.vm_id,
            memory_max_mb=max(instance.memory_max_mb, instance.memory_mb),
            saved=instance.saved and status == Status.SUSPENDED)
        if instance.power_state == Power.ERROR:
            vm.task_state = Task.UNKNOWN.value
            vm.state_reason = instance.state_reason or 'stopped by a fault'
        if vm.is_running:
            try:
                vm.ip_address = self.driver.wait_for_ip(vm, timeout=0)
            except exception.RapidVmmException:
                vm.ip_address = None
            # Its AS registered when it booted, before this agent knew it.
            vm.as_ready = True
        with self.store.transaction() as txn:
            txn.save_vm(vm)
            if vm.vm_id is None:
                outbox.queue_register_vm(txn, vm, self.lifecycle.grid)
        self.manager.identity_from_instance(instance)
        self.manager.wake_outbox()
        if instance.owner != self.conf.host:
            try:
                self.driver.update_metadata(
                    vm, self.lifecycle.metadata_identity(),
                    claim_from=instance.owner)
            except exception.RapidVmmException as exc:
                LOG.warning('Cannot take over the metadata of %s: %s',
                            vm.name, exc)
        LOG.warning('Adopted instance %s of user %s (%s, DS id %s), unknown '
                    'to the state', vm.name, vm.user_id,
                    instance.power_state.value, vm.vm_id)
        self.manager.vm_event('adopted', vm)


#: Notification event of each status a reconciliation sets.
_EVENTS = {Status.SUSPENDED: 'suspended', Status.RESUMED: 'resumed',
           Status.STOPPED: 'stopped', Status.STARTED: 'started'}


def _status_after(vm: objects.Vm,
                  instance: virt_driver.Instance) -> Status | None:
    """The status ``vm`` must take for ``instance``; None if unchanged."""
    if instance.power_state == Power.RUNNING:
        return None if vm.is_running else Status.RESUMED
    new_status = _POWER_TO_STATUS.get(instance.power_state)
    if new_status is None or new_status == vm.status:
        return None
    return new_status
