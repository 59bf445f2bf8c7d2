"""Reconciliation of the agent's records with the hypervisor (SPEC F13).

Runs at start-up, before the agent serves, and then periodically or when a
hypervisor event asks for it. The hypervisor is the truth for what exists
and in which power state; the records are the truth for who owns what.
"""

import threading

from oslo_concurrency import lockutils
from oslo_log import log as logging

from rapid_vmm import exception
from rapid_vmm import objects
from rapid_vmm.virt import driver as virt_driver

LOG = logging.getLogger(__name__)

Status = objects.VmStatus
Task = objects.TaskState

_POWER_TO_STATUS = {
    virt_driver.PowerState.RUNNING: None,  # running: keep STARTED/RESUMED
    virt_driver.PowerState.SUSPENDED: Status.SUSPENDED,
    virt_driver.PowerState.SHUTOFF: Status.STOPPED,
    virt_driver.PowerState.CRASHED: Status.STOPPED,
}


class Reconciler:
    """Brings the manager's records in line with its driver."""

    def __init__(self, manager):
        self.manager = manager
        self.store = manager.store
        self.reporter = manager.reporter
        #: False while the hypervisor cannot be asked (VMs are "unknown").
        self.driver_reachable = True
        # One pass at a time: a pass started on an event and one started by
        # the timer would otherwise race on the same VMs and flags.
        self._pass_lock = threading.Lock()

    def reconcile(self, startup: bool = False) -> dict:
        """Bring the records in line with the hypervisor; SPEC F13.

        * a record whose instance is gone is marked stopped (4), its disk
          removed and the DS told;
        * a record whose instance is suspended, shut off or running again
          takes that status and the DS is told;
        * an instance of ours that no record knows is adopted;
        * records left half-built or half-deleted by a crash (at start-up)
          or by a removal the hypervisor refused (at any time) are
          finished; at start-up, disks no record knows are removed.

        If the hypervisor cannot be asked, nothing changes: VMs are then
        "unknown", never deleted.
        """
        with self._pass_lock:
            return self._reconcile(startup)

    def _reconcile(self, startup: bool) -> dict:
        summary = {'stopped': [], 'changed': [], 'adopted': [],
                   'cleaned': [], 'orphan_disks': []}
        try:
            instances = self.manager.driver.list_instances()
        except exception.DriverError as exc:
            if self.driver_reachable:
                LOG.error('Cannot reconcile: %s; VM states are unknown '
                          'until the hypervisor answers', exc)
            self.driver_reachable = False
            return summary
        self.driver_reachable = True
        by_name = {instance.name: instance for instance in instances}
        for vm in self.store.list_vms():
            if vm.task_state == Task.NONE.value:
                self._reconcile_vm(vm, by_name.pop(vm.name, None), summary)
            elif startup or vm.task_state == Task.DELETING.value:
                by_name.pop(vm.name, None)
                self._finish(vm, startup, summary)
        for instance in by_name.values():
            self._consider_adoption(instance, summary)
        if startup:
            known = {vm.disk_path for vm in self.store.list_vms()
                     if vm.disk_path}
            summary['orphan_disks'] = (
                self.manager.driver.cleanup_orphans(known))
        if any(summary.values()):
            LOG.info('Reconciled with the hypervisor: %s',
                     {k: v for k, v in summary.items() if v})
        return summary

    def _finish(self, vm: objects.Vm, startup: bool, summary: dict) -> None:
        """Remove a VM whose start or removal did not complete.

        A lock that is busy means a request is working on it right now:
        left alone until the next pass.
        """
        try:
            # At start-up nothing else runs: wait for the lock.
            with self.manager.user_lock(vm.user_id, blocking=startup):
                current = self.store.get_vm(vm.user_id)
                if current is None or current.name != vm.name or \
                        current.task_state == Task.NONE.value:
                    return
                LOG.warning('VM %s of user %s was left %s; removing it',
                            vm.name, vm.user_id, current.task_state)
                self.manager.try_to('clean up ' + vm.name,
                                    self.manager.delete_vm, current)
                if self.store.get_vm(vm.user_id) is None:
                    summary['cleaned'].append(vm.user_id)
        except lockutils.AcquireLockFailedException:
            LOG.debug('VM of user %s is busy; finished next time',
                      vm.user_id)

    def _reconcile_vm(self, vm: objects.Vm,
                      instance: virt_driver.Instance | None,
                      summary: dict) -> None:
        try:
            with self.manager.user_lock(vm.user_id, blocking=False):
                self._reconcile_vm_locked(vm, instance, summary)
        except lockutils.AcquireLockFailedException:
            LOG.debug('VM of user %s is busy; reconciled next time',
                      vm.user_id)

    def _reconcile_vm_locked(self, vm: objects.Vm,
                             instance: virt_driver.Instance | None,
                             summary: dict) -> None:
        current = self.store.get_vm(vm.user_id)
        if current is None or current.name != vm.name or \
                current.task_state != Task.NONE.value:
            return  # changed under us: a request got there first
        if instance is None or \
                _status_after(current, instance) is not None:
            # The listing may predate a request that finished since: act
            # only on what the hypervisor says now.
            instance = self.manager.driver.get_instance(current.name)
        if instance is None:
            if current.status == Status.STOPPED:
                return
            LOG.warning('VM %s of user %s vanished from the hypervisor',
                        current.name, current.user_id)
            self.manager.try_to('remove the disk of ' + current.name,
                      self.manager.driver.destroy, current)
            current.status = Status.STOPPED
            current.ip_address = None
            current.as_ready = False
            self.store.save_vm(current)
            self.reporter.notify_vm(current)
            summary['stopped'].append(current.user_id)
            return
        new_status = _status_after(current, instance)
        if new_status is None:
            return
        LOG.warning('VM %s of user %s is %s on the hypervisor; status '
                    '%s -> %s', current.name, current.user_id,
                    instance.power_state.value,
                    Status(current.status).name,
                    Status(new_status).name)
        current.status = new_status
        self.store.save_vm(current)
        self.reporter.notify_vm(current)
        summary['changed'].append(current.user_id)

    def _consider_adoption(self, instance: virt_driver.Instance,
                           summary: dict) -> None:
        """Adopt ``instance`` if it is still there and nobody owns it.

        The listing may be older than the records (a start or a removal
        can finish in between), so the decision is taken again under the
        user's lock with a fresh look at the hypervisor.
        """
        try:
            with self.manager.user_lock(instance.user_id, blocking=False):
                record = self.store.get_vm(instance.user_id)
                if record is not None:
                    if record.name != instance.name and \
                            record.task_state == Task.NONE.value:
                        LOG.warning('Instance %s claims user %s, whose VM '
                                    'is %s; left alone for the operator',
                                    instance.name, instance.user_id,
                                    record.name)
                    return
                fresh = self.manager.driver.get_instance(instance.name)
                if fresh is None:
                    return
                self._adopt(fresh)
                summary['adopted'].append(fresh.user_id)
        except lockutils.AcquireLockFailedException:
            LOG.debug('User %s is busy; adoption of %s deferred',
                      instance.user_id, instance.name)

    def _adopt(self, instance: virt_driver.Instance) -> None:
        status = _POWER_TO_STATUS.get(instance.power_state) or Status.STARTED
        vm = objects.Vm(user_id=instance.user_id, name=instance.name,
                        vcpus=instance.vcpus, memory_mb=instance.memory_mb,
                        disk_gb=instance.disk_gb, os_type=instance.os_type,
                        gpu_cores=instance.gpu_cores, helper=instance.helper,
                        status=status, driver_id=instance.driver_id,
                        image=instance.image, disk_path=instance.disk_path)
        if vm.is_running:
            try:
                vm.ip_address = self.manager.driver.wait_for_ip(vm, timeout=0)
            except exception.RapidVmmException:
                vm.ip_address = None
        self.store.save_vm(vm)
        LOG.warning('Adopted instance %s of user %s (%s), unknown to the '
                    'state', vm.name, vm.user_id, instance.power_state.value)


def _status_after(vm: objects.Vm,
                  instance: virt_driver.Instance) -> Status | None:
    """The status ``vm`` must take for ``instance``; None if unchanged."""
    if instance.power_state == virt_driver.PowerState.RUNNING:
        return None if vm.is_running else Status.RESUMED
    new_status = _POWER_TO_STATUS.get(instance.power_state)
    if new_status is None or new_status == vm.status:
        return None
    return new_status
