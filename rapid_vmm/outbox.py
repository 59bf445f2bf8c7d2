"""The outbox: every message to the DS and the SLAM arrives, in order.

A state change and the messages that report it are written in ONE
transaction of the state store (:meth:`StateStore.transaction`, with the
``queue_*`` functions below), so an agent killed right after a change still
tells its peers, and one that is killed before it never tells them of a
change that did not happen. One sender per peer ("lane": ``ds``, ``slam``)
delivers the lane's messages oldest first, each until the peer took it,
with exponential back-off while the peer or the broker is away.

* A message is gone from the outbox only once delivered (the peer's reply
  is the acknowledgement; see :mod:`rapid_vmm.peers`), or given up after
  ``outbox_max_rejections`` refusals by the peer (logged at ERROR).
* DS messages wait until the agent has a VMM id; ``register_vm`` is never
  sent twice for one VM: it is skipped once the VM has a DS id (from the
  state or its instance's metadata), and dropped with every later message
  of a VM that was removed before the DS ever knew it.
* The DS id of a VM fills in the VM's later messages the moment
  ``register_vm`` answers, so ``notify_vm`` never waits for a record.
"""

from collections.abc import Callable
import threading
import time

from oslo_config import cfg
from oslo_context import context as oslo_context
from oslo_log import log as logging
import tenacity

from rapid_vmm import exception
from rapid_vmm import flavors
from rapid_vmm import objects
from rapid_vmm import state

LOG = logging.getLogger(__name__)

DS = 'ds'
SLAM = 'slam'
LANES = (DS, SLAM)

#: DS messages that refer to a VM by its DS id.
_NEEDS_VM_ID = ('notify_vm', 'notify_helper')


# -- what a change queues (call inside a store transaction) ---------------


def queue_register_vm(txn: state.Txn, vm: objects.Vm, grid: flavors.Grid,
                      request_id: str | None = None) -> None:
    """Register ``vm`` with the DS (once; skipped if it has a DS id)."""
    vm_type = grid.index(flavors.VmType(vm.vcpus, vm.memory_mb, vm.disk_gb))
    txn.enqueue(DS, 'register_vm',
                {'user_id': vm.user_id, 'category': int(vm.category),
                 'vm_type': vm_type, 'status': int(vm.status)},
                vm_key=vm.name, request_id=request_id)


def queue_notify_vm(txn: state.Txn, vm: objects.Vm,
                    request_id: str | None = None) -> None:
    """Tell the DS the VM's current status."""
    txn.enqueue(DS, 'notify_vm',
                {'vm_id': vm.vm_id, 'status': int(vm.status)},
                vm_key=vm.name, request_id=request_id)


def queue_notify_helper(txn: state.Txn, vm: objects.Vm,
                        request_id: str | None = None) -> None:
    """Tell the DS a helper VM's address."""
    txn.enqueue(DS, 'notify_helper',
                {'vm_id': vm.vm_id, 'ip_address': vm.ip_address},
                vm_key=vm.name, request_id=request_id)


def queue_vm_started(txn: state.Txn, host: str, record: dict,
                     request_id: str | None = None) -> None:
    txn.enqueue(SLAM, 'vm_started', {'host': host, 'vm': record},
                vm_key=record.get('name'), request_id=request_id)


def queue_vm_start_failed(txn: state.Txn, host: str, user_id: int,
                          error: Exception,
                          request_id: str | None = None) -> None:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    txn.enqueue(SLAM, 'vm_start_failed',
                {'host': host, 'user_id': user_id, 'error': text[:500],
                 'error_class': type(error).__name__},
                request_id=request_id)


def queue_current_state(txn: state.Txn, grid: flavors.Grid) -> int:
    """After a (re)registration: tell the DS every VM as it is now.

    VMs without a DS id are registered (unless a registration is queued
    already); the others get a ``notify_vm`` with their status, helpers a
    ``notify_helper`` with their address. Returns the messages queued.
    """
    count = 0
    for vm in txn.list_vms():
        if vm.task_state in (objects.TaskState.BUILDING.value,
                             objects.TaskState.DELETING.value):
            continue  # their own messages follow when they settle
        if vm.vm_id is None:
            if not txn.queued(vm.name, 'register_vm'):
                queue_register_vm(txn, vm, grid)
                count += 1
            if vm.is_helper and vm.ip_address:
                queue_notify_helper(txn, vm)
                count += 1
            continue
        queue_notify_vm(txn, vm)
        count += 1
        if vm.is_helper and vm.ip_address:
            queue_notify_helper(txn, vm)
            count += 1
    return count


# -- delivery -------------------------------------------------------------


class _NotReady(Exception):
    """The lane cannot deliver yet (no VMM id)."""


class Outbox:
    """Delivers the queued messages of each lane, in order.

    :param identity: returns the agent's identity (``vmm_id`` ...).
    :param on_vm_id: called as ``on_vm_id(vm_key, vm_id)`` after a VM got
        its DS id (the manager writes it into the instance's metadata).
    """

    def __init__(self, conf: cfg.ConfigOpts, store: state.StateStore,
                 ds, slam, identity: Callable[[], dict],
                 stopping: threading.Event,
                 on_vm_id: Callable[[str, int], None] | None = None):
        self.conf = conf
        self.store = store
        self._peers = {DS: ds, SLAM: slam}
        self._identity = identity
        self._stopping = stopping
        self._on_vm_id = on_vm_id
        self._wake = {lane: threading.Event() for lane in LANES}
        self._threads: list[threading.Thread] = []
        #: Per lane: (seq, error) of the message being retried, for
        #: diagnostics.
        self.retrying: dict[str, tuple[int, str] | None] = {
            lane: None for lane in LANES}
        self.delivered = {lane: 0 for lane in LANES}
        self.given_up = {lane: 0 for lane in LANES}
        #: Notified whenever a VM gets its DS id (``_vm_id_changes``
        #: counts them, so that a waiter never misses one).
        self._vm_ids = threading.Condition()
        self._vm_id_changes = 0

    # -- control ----------------------------------------------------------

    def start(self) -> None:
        for lane in LANES:
            thread = threading.Thread(target=self._run, args=(lane,),
                                      name=f'outbox-{lane}', daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        """New messages or a new identity: look at the lanes now."""
        for event in self._wake.values():
            event.set()

    def stop(self, timeout: float = 5) -> None:
        self.wake()
        with self._vm_ids:
            self._vm_id_changes += 1
            self._vm_ids.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0))

    def depth(self) -> dict[str, int]:
        depth = dict.fromkeys(LANES, 0)
        depth.update(self.store.outbox_depth())
        return depth

    def diagnostics(self) -> dict:
        return {'depth': self.depth(), 'delivered': dict(self.delivered),
                'given_up': dict(self.given_up),
                'retrying': {lane: value for lane, value in
                             self.retrying.items() if value}}

    # -- the sender of one lane -------------------------------------------

    def _run(self, lane: str) -> None:
        wake = self._wake[lane]
        while not self._stopping.is_set():
            wake.clear()
            try:
                message = self.store.outbox_head(lane)
            except exception.StateError as exc:
                LOG.debug('Outbox %s paused: %s', lane, exc)
                message = None
            if message is None:
                wake.wait(self.conf.outbox_idle_interval)
                continue
            try:
                self._deliver_with_retries(message)
            except _NotReady:
                wake.wait(self.conf.outbox_idle_interval)
            except exception.PeerError as exc:
                if self._stopping.is_set():
                    return
                self._give_up(message, exc)
            except Exception:  # a bug must not end the sender
                if self._stopping.is_set():
                    return
                LOG.exception('Outbox %s: delivering %s #%s failed', lane,
                              message.method, message.seq)
                self._stopping.wait(self.conf.outbox_retry_max_interval)

    def _deliver_with_retries(self, message: state.OutboxMessage) -> None:
        rejections = []

        def stop(retry_state: tenacity.RetryCallState) -> bool:
            if self._stopping.is_set():
                return True
            error = retry_state.outcome.exception()
            if isinstance(error, exception.PeerRejected):
                rejections.append(error)
                return len(rejections) >= self.conf.outbox_max_rejections
            return False

        def before_sleep(retry_state: tenacity.RetryCallState) -> None:
            error = retry_state.outcome.exception()
            self.retrying[message.lane] = (message.seq, str(error))
            self.store.outbox_failed(message.seq, str(error))
            LOG.warning('%s #%s to the %s not delivered (%s); retrying in '
                        '%.1f s', message.method, message.seq,
                        message.lane.upper(), error,
                        retry_state.next_action.sleep)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(exception.PeerError),
            # Exponential from 0.5 s with up to 1 s of jitter (what
            # wait_exponential_jitter does, without its argument renamed
            # between tenacity releases).
            wait=(tenacity.wait_exponential(
                multiplier=0.5, max=self.conf.outbox_retry_max_interval) +
                tenacity.wait_random(0, 1)),
            stop=stop, sleep=self._sleep, before_sleep=before_sleep,
            reraise=True)
        retrying(self._deliver, message)
        self.retrying[message.lane] = None

    def _sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    def _give_up(self, message: state.OutboxMessage,
                 error: Exception) -> None:
        LOG.error('Giving up %s #%s to the %s after %s refusals: %s '
                  '(arguments %s)', message.method, message.seq,
                  message.lane.upper(), self.conf.outbox_max_rejections,
                  error, message.args)
        with self.store.transaction() as txn:
            txn.dequeue(message.seq)
        self.given_up[message.lane] += 1
        self.retrying[message.lane] = None

    def _context(self, message: state.OutboxMessage) -> dict:
        kwargs = {'overwrite': False}
        if message.request_id:
            kwargs['request_id'] = message.request_id
        return oslo_context.RequestContext(**kwargs).to_dict()

    def _deliver(self, message: state.OutboxMessage) -> None:
        if message.lane == SLAM:
            args = message.args
            record = args.get('vm')
            if isinstance(record, dict) and record.get('vm_id') is None:
                # The DS may have registered the VM since: its DS id too.
                vm_id = self._vm_id_of(message.vm_key)
                if vm_id is not None:
                    args = dict(args, vm=dict(record, vm_id=vm_id))
            getattr(self._peers[SLAM], message.method)(
                self._context(message), **args)
            self._done(message)
            return
        vmm_id = self._identity().get('vmm_id')
        if vmm_id is None:
            raise _NotReady()
        if message.method == 'register_vm':
            self._register_vm(message, vmm_id)
            return
        args = dict(message.args)
        if message.method in _NEEDS_VM_ID and args.get('vm_id') is None:
            vm_id = self._vm_id_of(message.vm_key)
            if vm_id is None:
                LOG.info('Dropping %s #%s: the DS never knew VM %s',
                         message.method, message.seq, message.vm_key)
                self._done(message, delivered=False)
                return
            args['vm_id'] = vm_id
        getattr(self._peers[DS], message.method)(self._context(message),
                                                 **args)
        self._done(message)

    def _vm_id_of(self, vm_key: str | None) -> int | None:
        vm = self.store.get_vm_by_name(vm_key) if vm_key else None
        return vm.vm_id if vm is not None else None

    def _register_vm(self, message: state.OutboxMessage,
                     vmm_id: int) -> None:
        record = self.store.get_vm_by_name(message.vm_key)
        if record is None:
            # Removed before the DS knew it: nothing to register, nothing
            # to tell about it afterwards.
            with self.store.transaction() as txn:
                dropped = txn.queued(message.vm_key)
                for queued in dropped:
                    txn.dequeue(queued.seq)
            LOG.info('VM %s was removed before the DS knew it; dropped %d '
                     'message(s) about it', message.vm_key, len(dropped))
            return
        if record.vm_id is not None:
            self._fill_vm_id(message, record.vm_id)
            return
        reply = self._peers[DS].register_vm(self._context(message),
                                            vmm_id=vmm_id, **message.args)
        vm_id = _int_field(reply, 'vm_id')
        if vm_id is None:
            raise exception.PeerRejected(
                peer='DS', method='register_vm',
                reason=f'unusable reply {reply!r:.200}')
        self._fill_vm_id(message, vm_id, record.user_id)
        LOG.info('The DS registered VM %s of user %s as VM %s',
                 message.vm_key, record.user_id, vm_id)
        if self._on_vm_id is not None:
            try:
                self._on_vm_id(message.vm_key, vm_id)
            except Exception:
                LOG.exception('Recording DS id %s of %s failed', vm_id,
                              message.vm_key)

    def _fill_vm_id(self, message: state.OutboxMessage, vm_id: int,
                    user_id: int | None = None) -> None:
        """Store the DS id and put it in the VM's later messages."""
        with self.store.transaction() as txn:
            if user_id is not None:
                current = txn.get_vm(user_id)
                if current is not None and current.name == message.vm_key:
                    txn.update_vm(user_id, vm_id=vm_id)
            for queued in txn.queued(message.vm_key):
                if queued.method in _NEEDS_VM_ID and \
                        queued.args.get('vm_id') is None:
                    txn.set_message_args(queued.seq,
                                         dict(queued.args, vm_id=vm_id))
            txn.dequeue(message.seq)
        self.delivered[message.lane] += 1
        with self._vm_ids:
            self._vm_id_changes += 1
            self._vm_ids.notify_all()

    def wait_for_vm_id(self, vm_key: str, timeout: float) -> int | None:
        """The DS id of the VM ``vm_key``, waiting up to ``timeout`` s
        for its ``register_vm`` to be answered; None if it was not."""
        deadline = time.monotonic() + timeout
        while True:
            with self._vm_ids:
                seen = self._vm_id_changes
            vm = self.store.get_vm_by_name(vm_key)
            if vm is None or vm.vm_id is not None:
                return vm.vm_id if vm is not None else None
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping.is_set():
                return None
            with self._vm_ids:
                if self._vm_id_changes == seen:
                    self._vm_ids.wait(remaining)

    def _done(self, message: state.OutboxMessage,
              delivered: bool = True) -> None:
        with self.store.transaction() as txn:
            txn.dequeue(message.seq)
        if delivered:
            self.delivered[message.lane] += 1


def _int_field(reply, key: str) -> int | None:
    if not isinstance(reply, dict):
        return None
    value = reply.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value
