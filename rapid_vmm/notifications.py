"""Versioned notifications: every VM state change, and the host reports.

The agent publishes with an oslo.messaging ``Notifier`` configured by
``[oslo_messaging_notifications]`` (``driver``, ``topics``,
``transport_url``) as ``rapid-vmm.<host>``:

* ``rapid_vmm.vm.<event>`` (priority ``info``; ``error`` for
  ``start_failed``) for each event of :data:`VM_EVENTS`, with a
  ``VmStatusPayload``;
* ``rapid_vmm.host.report`` (priority ``sample``) with a
  ``HostReportPayload``: the arguments of each ``notify_vmm`` the Directory
  Server gets (``[notifications] host_reports``).

Payloads are versioned the way Nova's are, so consumers can check what they
read::

    {'rapid_vmm_object.name': 'VmStatusPayload',
     'rapid_vmm_object.namespace': 'rapid_vmm',
     'rapid_vmm_object.version': '1.0',
     'rapid_vmm_object.data': {'event': 'started', 'user_id': 7, ...}}

A minor version adds fields; a major version changes or removes one.

Sending never blocks the caller and never raises into it: :class:`VmNotifier`
queues each notification (bounded, ``[notifications] queue_size``) and one
background thread sends them in order with a bounded retry
(``[notifications] send_retry``); what cannot be sent is logged and
dropped. Notifications are a feed for Ceilometer-style consumers and
operators; what the DS and SLAM must get goes through the outbox.

Usage (the lead's lifecycle code calls it at each state change)::

    notifier = VmNotifier(conf, vmm_id=lambda: reporter.vmm_id)
    notifier.vm_changed(ctxt, 'suspended', record)
    notifier.host_report(ctxt, resources)
    notifier.stop()
"""

from collections.abc import Callable
import queue
import threading
import time
from typing import Any

from oslo_config import cfg
from oslo_context import context as oslo_context
from oslo_log import log as logging
import oslo_messaging as messaging

LOG = logging.getLogger(__name__)

NAMESPACE = 'rapid_vmm'
PUBLISHER = 'rapid-vmm'

#: Event types and priorities of VM state changes.
VM_EVENTS = {
    'started': 'info',          # a new VM runs (its IP known, AS ready)
    'start_failed': 'error',    # a start ended in an error (cleaned up)
    'suspended': 'info',
    'resumed': 'info',
    'stopped': 'info',          # removed, or confirmed gone
    'resized': 'info',          # change_flavor applied
    'resize_confirmed': 'info',  # confirm_flavor closed a resize
    'adopted': 'info',          # a VM of ours found and recorded
    'unknown': 'warning',         # the hypervisor cannot say (not destroyed)
}
HOST_REPORT = f'{NAMESPACE}.host.report'

VM_PAYLOAD = 'VmStatusPayload'
VM_PAYLOAD_VERSION = '1.0'
#: Fields of ``VmStatusPayload`` 1.0 (each present, None when unknown).
VM_FIELDS = ('user_id', 'vm_id', 'name', 'status', 'vcpus', 'memory_mb',
             'disk_gb', 'gpu_cores', 'os_type', 'helper', 'ip_address',
             'task_state')
#: Extra fields of some events: ``start_failed`` (error, error_class),
#: ``resized`` (previous: ``[vcpus, memory_mb, disk_gb]`` before).
VM_EXTRA_FIELDS = ('error', 'error_class', 'previous')

HOST_PAYLOAD = 'HostReportPayload'
HOST_PAYLOAD_VERSION = '1.0'

STATUS_NAMES = {1: 'started', 2: 'suspended', 3: 'resumed', 4: 'stopped'}


def event_type(event: str) -> str:
    return f'{NAMESPACE}.vm.{event}'


def versioned(name: str, version: str, data: dict) -> dict:
    """A payload in the versioned envelope."""
    return {f'{NAMESPACE}_object.name': name,
            f'{NAMESPACE}_object.namespace': NAMESPACE,
            f'{NAMESPACE}_object.version': version,
            f'{NAMESPACE}_object.data': data}


def unwrap(payload: Any) -> tuple[str | None, str | None, dict]:
    """``(name, version, data)`` of a versioned payload (a consumer's
    helper); ``(None, None, {})`` for anything else."""
    if not isinstance(payload, dict):
        return None, None, {}
    data = payload.get(f'{NAMESPACE}_object.data')
    return (payload.get(f'{NAMESPACE}_object.name'),
            payload.get(f'{NAMESPACE}_object.version'),
            data if isinstance(data, dict) else {})


def vm_payload(host: str, vmm_id: int | None, event: str, record: dict,
               **extra: Any) -> dict:
    data = {'host': host, 'vmm_id': vmm_id, 'event': event}
    data.update({field: record.get(field) for field in VM_FIELDS})
    data['status_name'] = STATUS_NAMES.get(data['status'])
    data['helper'] = data['helper'] or 0
    data.update({key: value for key, value in extra.items()
                 if key in VM_EXTRA_FIELDS})
    return versioned(VM_PAYLOAD, VM_PAYLOAD_VERSION, data)


def host_payload(host: str, vmm_id: int | None, resources: dict) -> dict:
    """The ``notify_vmm`` arguments, as the DS gets them."""
    return versioned(HOST_PAYLOAD, HOST_PAYLOAD_VERSION, {
        'host': host, 'vmm_id': vmm_id,
        'cpu_load': resources.get('cpu_load_percent'),
        'free_memory_mb': resources.get('memory_free_mb'),
        'gpu_load': resources.get('gpu_load_percent'),
        'resources': resources})


def request_context(ctxt: Any) -> oslo_context.RequestContext:
    """The request context to send: oslo.messaging sends the redacted copy
    of a ``RequestContext`` (no token) and drops a plain dict, so a dict
    (``{}`` from the agent's own tasks, or a caller's context) is turned
    into one, keeping its request id."""
    if isinstance(ctxt, oslo_context.RequestContext):
        return ctxt
    if isinstance(ctxt, dict):
        try:
            return oslo_context.RequestContext.from_dict(ctxt)
        except Exception:  # noqa: BLE001 - a context we cannot read
            LOG.debug('Unreadable request context %r', ctxt)
    return oslo_context.RequestContext(overwrite=False)


class NullNotifier:
    """What the manager holds while notifications are not wired."""

    enabled = False

    def vm_changed(self, ctxt: Any, event: str, record: dict,
                   **extra: Any) -> None:
        return None

    def host_report(self, ctxt: Any, resources: dict) -> None:
        return None

    def flush(self, timeout: float = 5.0) -> bool:
        return True

    def stop(self, timeout: float = 5.0) -> None:
        return None


NULL = NullNotifier()


class VmNotifier:
    """Publishes VM state changes and host reports; never blocks a caller.

    :param conf: the agent's configuration (``host``, ``[notifications]``,
        ``[oslo_messaging_notifications]``).
    :param transport: a notification transport; default: one made from
        ``conf`` (and cleaned up by :meth:`stop`).
    :param vmm_id: returns the agent's VMM id (None until registered).
    """

    _STOP = object()

    def __init__(self, conf: cfg.ConfigOpts, transport=None,
                 vmm_id: Callable[[], int | None] | None = None):
        self.conf = conf
        self._vmm_id = vmm_id or (lambda: None)
        self._own_transport = transport is None
        if transport is None:
            transport = messaging.get_notification_transport(conf)
        self.transport = transport
        self.publisher_id = f'{PUBLISHER}.{conf.host}'
        self._notifier = messaging.Notifier(
            transport, publisher_id=self.publisher_id,
            retry=conf.notifications.send_retry)
        # Notifier.is_enabled() is true for no driver at all: with no
        # driver (the default) or only noop, nothing is ever sent.
        drivers = conf.oslo_messaging_notifications.driver
        self.enabled = any(name != 'noop' for name in drivers)
        self._queue: queue.Queue = queue.Queue(
            maxsize=conf.notifications.queue_size)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.sent = 0
        self.dropped = 0
        if self.enabled:
            LOG.info('Notifications on: %s to topics %s as %s',
                     ','.join(conf.oslo_messaging_notifications.driver),
                     ','.join(conf.oslo_messaging_notifications.topics),
                     self.publisher_id)

    # -- the API the lifecycle calls ----------------------------------------

    def vm_changed(self, ctxt: Any, event: str, record: dict,
                   **extra: Any) -> None:
        """Publish ``rapid_vmm.vm.<event>`` for the VM ``record`` (a VM
        record of SPEC 4, with ``task_state``); ``extra``: the event's own
        fields (:data:`VM_EXTRA_FIELDS`). Returns at once."""
        if not self.enabled:
            return
        try:
            priority = VM_EVENTS[event]
            payload = vm_payload(self.conf.host, self._vmm_id(), event,
                                 record, **extra)
        except Exception:
            LOG.exception('Notification %s for %r not built', event, record)
            return
        self._put((request_context(ctxt), event_type(event), payload,
                   priority))

    def host_report(self, ctxt: Any, resources: dict) -> None:
        """Publish ``rapid_vmm.host.report`` with a report's figures."""
        if not self.enabled or not self.conf.notifications.host_reports:
            return
        try:
            payload = host_payload(self.conf.host, self._vmm_id(),
                                   dict(resources))
        except Exception:
            LOG.exception('Host report notification not built')
            return
        self._put((request_context(ctxt), HOST_REPORT, payload, 'sample'))

    # -- sending --------------------------------------------------------------

    def _put(self, item: tuple) -> None:
        with self._lock:
            if self._stopped:
                return
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name='rapid-vmm-notifier', daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                LOG.warning('Notification queue full (%s waiting): dropped '
                            '%s (%s dropped so far)',
                            self._queue.maxsize, item[1], self.dropped)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is self._STOP:
                    return
                self._send(*item)
            finally:
                self._queue.task_done()

    def _send(self, ctxt: oslo_context.RequestContext, event: str,
              payload: dict, priority: str) -> None:
        # The notify drivers log (and swallow) a broker failure
        # themselves, once the bounded retry is spent.
        try:
            getattr(self._notifier, priority)(ctxt, event, payload)
            self.sent += 1
        except Exception:
            LOG.exception('Notification %s not sent', event)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait up to ``timeout`` s until everything queued was handed to
        the broker (or given up); True if it was."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued (for at most ``timeout`` s), then stop."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            thread = self._thread
        if thread is not None:
            if not self.flush(timeout):
                LOG.warning('%s notifications not sent at stop',
                            self._queue.unfinished_tasks)
            try:
                self._queue.put_nowait(self._STOP)
            except queue.Full:
                pass
            thread.join(max(timeout, 0.1))
        if self._own_transport:
            self.transport.cleanup()
