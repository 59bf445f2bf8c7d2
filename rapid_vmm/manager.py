"""The VMM manager: the RPC endpoint of the VMM API and the agent's duties.

It talks only to the driver interface, the state store, the resource
monitor and the peer RPC clients (DS, SLAM). Lifecycle operations on one
user's VM are serialised by a per-user lock; capacity is checked and
reserved under one host-wide lock, so concurrent requests never overbook
the host nor make two VMs for one user.

A VM is recorded (``task_state = building``) before anything is made for
it, so a crash at any point leaves a record that start-up reconciliation
finishes or cleans up: no VM and no disk is ever leaked.
"""

import threading
import time
from typing import Any
import uuid

from oslo_concurrency import lockutils
from oslo_config import cfg
from oslo_log import log as logging
import oslo_messaging as messaging

from rapid_vmm import capacity
from rapid_vmm import exception
from rapid_vmm import flavors
from rapid_vmm import notifications
from rapid_vmm import objects
from rapid_vmm import reconciler
from rapid_vmm import reporter
from rapid_vmm import rpc
from rapid_vmm import state
from rapid_vmm import validation
from rapid_vmm import version

LOG = logging.getLogger(__name__)

Status = objects.VmStatus
Task = objects.TaskState

class VmmManager:
    """Serves the VMM API and runs the agent's periodic duties.

    :param conf: the agent's configuration.
    :param driver: a :class:`rapid_vmm.virt.driver.ComputeDriver`.
    :param store: the :class:`rapid_vmm.state.StateStore` (not yet open).
    :param monitor: an object whose ``sample()`` returns the host part of
        ``resources`` (CPU, memory, disk, GPUs).
    :param ds_api: a :class:`rapid_vmm.peers.DirectoryServerAPI`.
    :param slam_api: a :class:`rapid_vmm.peers.SlaManagerAPI`.
    """

    target = messaging.Target(version='1.0')

    def __init__(self, conf: cfg.ConfigOpts, driver, store: state.StateStore,
                 monitor, ds_api, slam_api):
        self.conf = conf
        self.driver = driver
        self.store = store
        self.monitor = monitor
        self.ds = ds_api
        self.slam = slam_api
        self.grid = flavors.parse_grid(conf.vm_types)
        self._locks = lockutils.Semaphores()
        self._capacity_lock = threading.Lock()
        self._as_events: dict[int, threading.Event] = {}
        self._as_results: dict[int, bool] = {}
        self._as_lock = threading.Lock()
        self._stopping = threading.Event()
        self._limits: capacity.Limits | None = None
        self._reconcile_wanted = threading.Event()
        self.reporter = reporter.Reporter(conf, store, monitor, ds_api,
                                          slam_api, self.grid, self.limits,
                                          self._stopping)
        self.reconciler = reconciler.Reconciler(self)
        #: ops (issue 10.5): a notifications.VmNotifier, set by the service;
        #: told of every VM state change.
        self.notifier = notifications.NULL

    # ------------------------------------------------------------------
    # start and stop
    # ------------------------------------------------------------------

    def init_host(self) -> None:
        """Restore state, connect the driver and reconcile: SPEC start-up.

        Called once before the RPC server starts serving.
        """
        self.store.open()
        self.reporter.load_identity()
        self.driver.init_host()
        self.driver.set_event_callback(self._on_driver_event)
        self.reconciler.reconcile(startup=True)
        self.driver.post_start()

    def stop(self) -> None:
        """Wake every wait so that in-flight requests end quickly."""
        self._stopping.set()
        self._reconcile_wanted.set()
        with self._as_lock:
            for event in self._as_events.values():
                event.set()

    def cleanup_host(self) -> None:
        self.driver.cleanup_host()
        close = getattr(self.monitor, 'close', None)
        if close is not None:
            close()
        self.store.close()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def user_lock(self, user_id: int, blocking: bool = True):
        """The lock of one user's VM.

        With ``blocking=False`` it raises ``AcquireLockFailedException``
        when busy: periodic tasks skip a VM that a request is working on.
        """
        return lockutils.lock(f'user-{user_id}', semaphores=self._locks,
                              do_log=False, blocking=blocking)

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

    # ------------------------------------------------------------------
    # VMM API (version 1.0)
    # ------------------------------------------------------------------

    @rpc.remotable
    def start_vm(self, context: dict, user_id: int, os_type: int,
                 vcpus: int, memory_mb: int, gpu_cores: int = 0,
                 disk_gb: int = 0) -> dict:
        """Give the user a running VM and return its record.

        Reuses the user's running VM, resumes a suspended one, or creates
        one of the grid type the request rounds down to; waits for its IP
        and (``as_register_timeout``) for its Acceleration Server. The
        outcome is also cast to the SLAM (``vm_started`` or
        ``vm_start_failed``).
        """
        try:
            user_id = validation.user_id(user_id)
            os_type = validation.os_type(os_type)
            vm_type = self.grid.round_down(
                validation.vcpus(vcpus), validation.memory_mb(memory_mb),
                validation.disk_gb(disk_gb))
            gpu_cores = validation.gpu_cores(gpu_cores,
                                             self.conf.gpu.total_cores)
            with self.user_lock(user_id):
                vm = self._start_locked(user_id, os_type, vm_type, gpu_cores)
        except Exception as exc:
            if isinstance(user_id, int) and not isinstance(user_id, bool):
                self.reporter.vm_start_failed(context, user_id, exc)
            raise
        self.reporter.vm_started(context, vm)
        return self._record(vm)

    @rpc.remotable
    def resume_vm(self, context: dict, user_id: int) -> dict:
        """Resume the user's suspended VM; a running one is returned as is."""
        user_id = validation.user_id(user_id)
        with self.user_lock(user_id):
            vm = self._get_settled(user_id, 'resume')
            if vm.is_running:
                return self._record(vm)
            if vm.status != Status.SUSPENDED:
                raise exception.VmStateConflict(
                    action='resume', user_id=user_id,
                    state=Status(vm.status).name.lower())
            return self._record(self._resume_locked(vm))

    @rpc.remotable
    def suspend_vm(self, context: dict, user_id: int) -> dict:
        """Suspend the user's running VM; a suspended one is returned as is."""
        user_id = validation.user_id(user_id)
        with self.user_lock(user_id):
            return self._record(self._suspend_locked(user_id))

    @rpc.remotable
    def remove_vm(self, context: dict, user_id: int) -> None:
        """Remove the user's VM and its disk; the DS is told (status 4)."""
        self._remove(validation.user_id(user_id))

    @rpc.remotable
    def get_vm_info(self, context: dict, user_id: int | None = None) -> list:
        """Records of every VM of this host, or of one user's VM."""
        user_id = validation.optional_user_id(user_id)
        if user_id is None:
            return [self._record(vm) for vm in self.store.list_vms()]
        vm = self.store.get_vm(user_id)
        if vm is None:
            raise exception.VmNotFound(user_id=user_id)
        return [self._record(vm)]

    @rpc.remotable
    def get_vm_usage(self, context: dict, resource: str,
                     user_id: int | None = None) -> list:
        """Usage of ``resource`` ('cpu', 'memory', 'disk') per VM.

        Every VM that exists on the hypervisor (running or suspended) is
        measured in one bulk driver call.
        """
        resource = validation.resource(resource)
        user_id = validation.optional_user_id(user_id)
        if user_id is not None:
            vm = self.store.get_vm(user_id)
            if vm is None:
                raise exception.VmNotFound(user_id=user_id)
            vms = [vm] if self._measurable(vm) else []
        else:
            vms = [vm for vm in self.store.list_vms() if self._measurable(vm)]
        if not vms:
            return []
        figures = self.driver.usage(vms, resource)
        result = []
        for vm in vms:
            entry = {'user_id': vm.user_id, 'vm_id': vm.vm_id}
            entry.update(figures.get(vm.user_id, {}))
            result.append(entry)
        return result

    @rpc.remotable
    def change_flavor(self, context: dict, user_id: int, vcpus: int = 0,
                      memory_mb: int = 0, disk_gb: int = 0) -> dict:
        """Resize the user's running VM to a grid type (0 = keep a size).

        Nova completes the resize with ``confirm_flavor``; libvirt applies
        it at once within the domain's maximums and ``confirm_flavor`` only
        closes it.
        """
        user_id = validation.user_id(user_id)
        vcpus = validation.vcpus(vcpus, allow_zero=True)
        memory_mb = validation.memory_mb(memory_mb, allow_zero=True)
        disk_gb = validation.disk_gb(disk_gb)
        with self.user_lock(user_id):
            vm = self._get_settled(user_id, 'resize')
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
                return self._record(vm)
            with self._capacity_lock:
                capacity.check(self.limits(), self.store.list_vms(),
                               new_type, vm.gpu_cores, exclude_user=user_id)
                self.before_resize(vm)
                self.driver.resize(vm, new_type)
                vm.vcpus, vm.memory_mb, vm.disk_gb = (
                    new_type.vcpus, new_type.memory_mb, new_type.disk_gb)
                vm.pending_resize = {'from': old_type.as_list(),
                                     'to': new_type.as_list()}
                self.store.save_vm(vm)
            self.notifier.vm_changed(context, 'resized', self._record(vm),
                                     previous=old_type.as_list())
            LOG.info('Resized the VM of user %s from %s to %s', user_id,
                     old_type.as_list(), new_type.as_list())
            return self._record(vm)

    @rpc.remotable
    def confirm_flavor(self, context: dict, user_id: int) -> dict:
        """Confirm the user's last resize; idempotent."""
        user_id = validation.user_id(user_id)
        with self.user_lock(user_id):
            vm = self._get_settled(user_id, 'confirm a resize of')
            if not vm.pending_resize:
                return self._record(vm)
            self.driver.confirm_resize(vm)
            vm.pending_resize = None
            self.store.save_vm(vm)
            self.notifier.vm_changed(context, 'resize_confirmed',
                                     self._record(vm))
            return self._record(vm)

    @rpc.remotable
    def as_register(self, context: dict, ip_address: str) -> dict:
        """Tell an Acceleration Server which user its VM (by IP) serves."""
        ip_address = validation.ip_address(ip_address)
        vm = self.store.find_vm_by_ip(ip_address)
        if vm is None:
            vm = self._find_building_vm_by_ip(ip_address)
        if vm is None:
            raise exception.VmNotFound(
                f'No VM of this host has the address {ip_address}.')
        LOG.info('Acceleration Server at %s registered for user %s',
                 ip_address, vm.user_id)
        return {'user_id': vm.user_id}

    @rpc.remotable
    def as_confirm(self, context: dict, user_id: int,
                   ready: bool = True) -> None:
        """The Acceleration Server of the user's VM is ready (or not)."""
        user_id = validation.user_id(user_id)
        ready = validation.boolean('ready', ready)
        vm = self.store.get_vm(user_id)
        if vm is None:
            raise exception.VmNotFound(user_id=user_id)
        if ready:
            self.store.update_vm(user_id, as_ready=True)
        with self._as_lock:
            self._as_results[user_id] = ready
            event = self._as_events.get(user_id)
        if event is not None:
            event.set()
        LOG.info('Acceleration Server of user %s reports %s', user_id,
                 'ready' if ready else 'NOT ready')

    @rpc.remotable
    def as_notify(self, context: dict, user_id: int, action: str) -> None:
        """The Acceleration Server asks to suspend or remove its VM."""
        user_id = validation.user_id(user_id)
        action = validation.as_action(action)
        if action == 'suspend':
            with self.user_lock(user_id):
                self._suspend_locked(user_id)
        else:
            self._remove(user_id)

    @rpc.remotable
    def deregister_vm(self, context: dict, user_id: int) -> None:
        """The DS deregistered the user: remove the user's VM."""
        self._remove(validation.user_id(user_id))

    @rpc.remotable
    def get_host_status(self, context: dict) -> dict:
        """The latest host sample and every VM record; samples nothing."""
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
                'resources': resources,
                'vms': [self._record(vm) for vm in self.store.list_vms()]}

    # ------------------------------------------------------------------
    # lifecycle internals (caller holds the user's lock)
    # ------------------------------------------------------------------

    def _record(self, vm: objects.Vm) -> dict:
        record = vm.to_record()
        record['task_state'] = vm.task_state
        record['as_ready'] = vm.as_ready
        record['resize_pending'] = bool(vm.pending_resize)
        return record

    def _measurable(self, vm: objects.Vm) -> bool:
        return (vm.task_state == Task.NONE.value and
                vm.status != Status.STOPPED)

    def _get_settled(self, user_id: int, action: str) -> objects.Vm:
        vm = self.store.get_vm(user_id)
        if vm is None:
            raise exception.VmNotFound(user_id=user_id)
        if vm.task_state != Task.NONE.value:
            raise exception.VmStateConflict(action=action, user_id=user_id,
                                            state=vm.task_state)
        return vm

    def _start_locked(self, user_id: int, os_type: int,
                      vm_type: flavors.VmType, gpu_cores: int) -> objects.Vm:
        existing = self.store.get_vm(user_id)
        if existing is not None:
            if existing.task_state != Task.NONE.value:
                LOG.warning('VM %s of user %s was left %s; cleaning it up',
                            existing.name, user_id, existing.task_state)
                self.delete_vm(existing)
            elif existing.is_running:
                LOG.info('User %s already has the running VM %s', user_id,
                         existing.name)
                return existing
            elif existing.status == Status.SUSPENDED:
                return self._resume_locked(existing)
            else:
                LOG.info('Replacing the stopped VM %s of user %s',
                         existing.name, user_id)
                self.delete_vm(existing, notify=False)
        vm = self._new_vm(user_id, os_type, vm_type, gpu_cores)
        return self._create_locked(vm, wait_for_as=True)

    def _new_vm(self, user_id: int, os_type: int, vm_type: flavors.VmType,
                gpu_cores: int = 0, helper: int = 0) -> objects.Vm:
        token = uuid.uuid4().hex[:8]
        if helper:
            name = f'rapid-helper-{helper}-{token}'
        else:
            name = f'rapid-vm-{user_id}-{token}'
        return objects.Vm(user_id=user_id, name=name, vcpus=vm_type.vcpus,
                          memory_mb=vm_type.memory_mb,
                          disk_gb=vm_type.disk_gb, os_type=os_type,
                          gpu_cores=gpu_cores, helper=helper,
                          status=Status.STARTED,
                          task_state=Task.BUILDING.value)

    def _create_locked(self, vm: objects.Vm, wait_for_as: bool) -> objects.Vm:
        vm_type = flavors.VmType(vm.vcpus, vm.memory_mb, vm.disk_gb)
        with self._capacity_lock:
            capacity.check(self.limits(), self.store.list_vms(), vm_type,
                           vm.gpu_cores, exclude_user=vm.user_id)
            self.store.save_vm(vm)
        event = self._arm_as_wait(vm.user_id)
        started = time.monotonic()
        try:
            made = self.driver.create(vm)
            vm.driver_id, vm.disk_path, vm.image = (
                made.driver_id, made.disk_path, made.image)
            self.store.save_vm(vm)
            vm.ip_address = self.driver.wait_for_ip(vm)
            self.store.save_vm(vm)
            self.reporter.register_vm(vm)
            if wait_for_as:
                self._wait_for_as(vm, event)
            vm.task_state = Task.NONE.value
            self.store.save_vm(vm)
        except Exception as exc:
            LOG.error('Starting %s for user %s failed: %s', vm.name,
                      vm.user_id, exc)
            self.notifier.vm_changed(
                {}, 'start_failed', self._record(vm),
                error=str(exc).splitlines()[0] if str(exc) else '',
                error_class=type(exc).__name__)
            self._cleanup_failed_start(vm)
            if isinstance(exc, exception.RapidVmmException):
                raise
            raise exception.DriverError(action='start VM',
                                        reason=str(exc)) from exc
        finally:
            self._disarm_as_wait(vm.user_id)
        self.notifier.vm_changed({}, 'started', self._record(vm))
        LOG.info('VM %s of user %s is running at %s (%.2f s)', vm.name,
                 vm.user_id, vm.ip_address, time.monotonic() - started)
        return vm

    def _cleanup_failed_start(self, vm: objects.Vm) -> None:
        try:
            self.delete_vm(vm)
        except exception.RapidVmmException as exc:
            LOG.error('Cleaning up %s failed (%s); reconciliation will '
                      'retry', vm.name, exc)

    def _resume_locked(self, vm: objects.Vm) -> objects.Vm:
        event = self._arm_as_wait(vm.user_id)
        try:
            self.driver.resume(vm)
            vm.status = Status.RESUMED
            self.store.save_vm(vm)
            self.reporter.notify_vm(vm)
            self.notifier.vm_changed({}, 'resumed', self._record(vm))
            try:
                vm.ip_address = self.driver.wait_for_ip(vm)
            except exception.DriverError as exc:
                LOG.warning('No fresh address for resumed %s (%s); keeping '
                            '%s', vm.name, exc, vm.ip_address)
            self.store.save_vm(vm)
            if not vm.as_ready:
                self._wait_for_as(vm, event)
                self.store.save_vm(vm)
        finally:
            self._disarm_as_wait(vm.user_id)
        LOG.info('Resumed VM %s of user %s', vm.name, vm.user_id)
        return vm

    def _remove(self, user_id: int) -> None:
        with self.user_lock(user_id):
            vm = self.store.get_vm(user_id)
            if vm is None:
                raise exception.VmNotFound(user_id=user_id)
            self.delete_vm(vm)

    def _suspend_locked(self, user_id: int) -> objects.Vm:
        vm = self._get_settled(user_id, 'suspend')
        if vm.status == Status.SUSPENDED:
            return vm
        if not vm.is_running:
            raise exception.VmStateConflict(
                action='suspend', user_id=user_id,
                state=Status(vm.status).name.lower())
        self.driver.suspend(vm)
        vm.status = Status.SUSPENDED
        self.store.save_vm(vm)
        self.reporter.notify_vm(vm)
        self.notifier.vm_changed({}, 'suspended', self._record(vm))
        LOG.info('Suspended VM %s of user %s', vm.name, user_id)
        return vm

    def delete_vm(self, vm: objects.Vm, notify: bool = True) -> None:
        """Remove ``vm`` from the hypervisor, then its record.

        The record is marked ``deleting`` first: if the agent dies half way,
        reconciliation finishes the job.
        """
        self.store.update_vm(vm.user_id, task_state=Task.DELETING.value)
        self.driver.destroy(vm)
        self.store.delete_vm(vm.user_id)
        if notify and vm.status != Status.STOPPED:
            vm.status = Status.STOPPED
            self.reporter.notify_vm(vm)
            self.notifier.vm_changed({}, 'stopped',
                                     dict(self._record(vm), task_state=''))
        with self._as_lock:
            self._as_results.pop(vm.user_id, None)
        LOG.info('Removed VM %s of user %s', vm.name, vm.user_id)

    # -- the Acceleration Server hand-shake --------------------------------

    def _arm_as_wait(self, user_id: int) -> threading.Event:
        with self._as_lock:
            self._as_results.pop(user_id, None)
            event = threading.Event()
            self._as_events[user_id] = event
            return event

    def _disarm_as_wait(self, user_id: int) -> None:
        with self._as_lock:
            self._as_events.pop(user_id, None)

    def _wait_for_as(self, vm: objects.Vm, event: threading.Event) -> None:
        timeout = self.conf.as_register_timeout
        if timeout == 0 or vm.as_ready:
            return
        LOG.info('Waiting up to %s s for the Acceleration Server of user '
                 '%s at %s', timeout, vm.user_id, vm.ip_address)
        event.wait(timeout)
        if self.stopping:
            raise exception.DriverError(action='start VM',
                                        reason='the agent is stopping')
        with self._as_lock:
            result = self._as_results.get(vm.user_id)
        if result is None:
            raise exception.AsRegistrationTimeout(user_id=vm.user_id,
                                                  timeout=timeout)
        if not result:
            raise exception.AsNotReady(user_id=vm.user_id)
        vm.as_ready = True

    def _find_building_vm_by_ip(self, ip_address: str) -> objects.Vm | None:
        """An AS may register before our IP polling saw the address."""
        for vm in self.store.list_vms():
            if vm.task_state != Task.BUILDING.value or vm.ip_address:
                continue
            if vm.driver_id is None:
                continue
            try:
                if self.driver.wait_for_ip(vm, timeout=0) == ip_address:
                    return vm
            except exception.RapidVmmException:
                continue
        return None

    # ------------------------------------------------------------------
    # periodic duties
    # ------------------------------------------------------------------

    def run_registration(self) -> None:
        """Register with the DS, then the SLAM, retrying with back-off.

        Runs in its own thread; never gives up and never raises, so the
        agent keeps serving while its peers are absent.
        """
        if not self.reporter.retry_until_done(
                'DS', self.reporter.register_with_ds):
            return
        self.periodic_report()
        self.sync_with_ds()
        self.reporter.retry_until_done('SLAM',
                                       self.reporter.register_with_slam)

    def periodic_report(self) -> None:
        """Sample the host and report to the DS; never raises."""
        try:
            vms = self.store.list_vms()
            self.reporter.report(vms)
            self.notifier.host_report({},
                                      self.reporter.latest_resources() or {})
            self.driver.sample_cpu([vm for vm in vms
                                    if self._measurable(vm)])
        except Exception:
            LOG.exception('Resource report failed')

    def sync_with_ds(self) -> None:
        """Register with the DS the VMs it does not know yet."""
        def register(vm: objects.Vm) -> None:
            with self.user_lock(vm.user_id):
                current = self.store.get_vm(vm.user_id)
                if current is not None and current.vm_id is None and \
                        current.task_state == Task.NONE.value:
                    self.reporter.register_vm(current)
        self.reporter.sync_vms(register)

    def _on_driver_event(self, name: str | None, event: str) -> None:
        LOG.debug('Driver event %s for %s', event, name)
        if event in ('reconnected', 'stopped', 'undefined', 'suspended',
                     'resumed', 'crashed', 'shutdown', 'started'):
            self.request_reconcile()

    def request_reconcile(self) -> None:
        """Ask the reconcile loop to run soon (events call this)."""
        self._reconcile_wanted.set()

    def run_reconcile_loop(self) -> None:
        """Reconcile every ``reconcile_interval`` s or when asked.

        Runs in its own thread until the agent stops.
        """
        interval = self.conf.reconcile_interval or None
        while not self.stopping:
            self._reconcile_wanted.wait(interval)
            if self.stopping:
                return
            self._reconcile_wanted.clear()
            try:
                self.reconciler.reconcile()
                self.ensure_helpers()
                self.sync_with_ds()
            except Exception:
                LOG.exception('Periodic reconciliation failed')

    def before_resize(self, vm: objects.Vm) -> None:
        """Hook run before a resize: the AS is told it will migrate.

        The legacy protocol front end fills it (``DS_MIGRATION_VM_AS``);
        over RPC the AS needs no warning.
        """

    def ensure_helpers(self) -> None:
        """Keep ``helper_vm_count`` helper VMs (users -1..-N) running."""
        wanted = self.conf.helper_vm_count
        for vm in self.store.list_vms():
            if vm.is_helper and vm.helper > wanted:
                with self.user_lock(vm.user_id):
                    LOG.info('Removing helper VM %s (helper_vm_count is %s)',
                             vm.name, wanted)
                    self.delete_vm(vm)
        for index in range(1, wanted + 1):
            if self.stopping:
                return
            user_id = -index
            with self.user_lock(user_id):
                vm = self.store.get_vm(user_id)
                if vm is not None and vm.task_state == Task.NONE.value:
                    if vm.status == Status.SUSPENDED:
                        self.try_to(f'resume helper {index}',
                                  self._resume_locked, vm)
                        continue
                    if vm.is_running:
                        continue
                if vm is not None:
                    self.try_to(f'replace helper {index}', self.delete_vm, vm,
                              notify=vm.status != Status.STOPPED)
                helper = self._new_vm(user_id, objects.OsType.LINUX,
                                      self.grid.smallest, helper=index)
                self.try_to(f'start helper {index}', self._create_locked,
                          helper, wait_for_as=False)

    def try_to(self, what: str, func, *args, **kwargs) -> Any:
        try:
            return func(*args, **kwargs)
        except exception.RapidVmmException as exc:
            LOG.error('Could not %s: %s', what, exc)
            return None

