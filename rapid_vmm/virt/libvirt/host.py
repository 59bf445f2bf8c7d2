"""The libvirt connection: open, reconnect with back-off, events, timeouts.

This is the only module of rapid-vmm that imports ``libvirt``; the rest of
the driver reaches the module through :data:`libvirt`.

Threads:

* the libvirt default event loop runs in a daemon thread (started once per
  process, before the first connection is opened, as libvirt requires);
* libvirt callbacks (lifecycle events, connection closed) only put an item
  on a queue; a dispatcher thread hands them to the driver's handler, so a
  slow handler never stalls libvirt's loop;
* calls that can hang (statistics, guest agent) run through
  :meth:`Host.call` with a timeout, on a small pool of worker threads.
"""

from collections.abc import Callable
import concurrent.futures
import queue
import threading
import time
from typing import Any

from oslo_log import log as logging
from oslo_utils import importutils

from rapid_vmm import exception

LOG = logging.getLogger(__name__)

libvirt = importutils.try_import('libvirt')


def _ignore_libvirt_error(ctx, error) -> None:
    """libvirt prints every error on stderr by default; we raise them."""


if libvirt is not None:
    libvirt.registerErrorHandler(_ignore_libvirt_error, None)

_event_loop_lock = threading.Lock()
_event_loop_started = False

#: libvirt error codes that mean "the connection is gone".
_CONNECTION_ERRORS = ('VIR_ERR_SYSTEM_ERROR', 'VIR_ERR_INTERNAL_ERROR',
                      'VIR_ERR_NO_CONNECT', 'VIR_ERR_INVALID_CONN',
                      'VIR_ERR_RPC', 'VIR_ERR_AUTH_FAILED')


def require_libvirt() -> None:
    """:raises ConfigError: when libvirt-python is not installed."""
    if libvirt is None:
        raise exception.ConfigError(
            reason='the libvirt driver needs libvirt-python (pip install '
                   'libvirt-python; apt-get install libvirt-dev pkg-config)')


def error_code(exc: BaseException) -> int | None:
    """Return the libvirt error code of ``exc``, or None."""
    if libvirt is not None and isinstance(exc, libvirt.libvirtError):
        return exc.get_error_code()
    return None


def is_connection_error(exc: BaseException) -> bool:
    code = error_code(exc)
    if code is None:
        return False
    return any(code == getattr(libvirt, name, None)
               for name in _CONNECTION_ERRORS)


def is_not_found(exc: BaseException) -> bool:
    return error_code(exc) == getattr(libvirt, 'VIR_ERR_NO_DOMAIN', -1)


def _start_event_loop() -> None:
    """Register libvirt's default event implementation and run it."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run_loop() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except Exception:
                    LOG.exception('libvirt event loop iteration failed')
                    time.sleep(1)

        thread = threading.Thread(target=run_loop, name='libvirt-events',
                                  daemon=True)
        thread.start()
        _event_loop_started = True


class Host:
    """A managed connection to one libvirt URI.

    :param uri: libvirt connection URI.
    :param event_handler: called as ``handler(domain_name, event)`` for each
        lifecycle event, and ``handler(None, 'reconnected')`` after the
        connection was re-opened; runs in the dispatcher thread.
    """

    def __init__(self, uri: str, reconnect_max_interval: float = 30,
                 call_timeout: float = 30,
                 event_handler: Callable[[str | None, str], None] | None
                 = None):
        require_libvirt()
        self.uri = uri
        self.reconnect_max_interval = reconnect_max_interval
        self.call_timeout = call_timeout
        self._event_handler = event_handler
        self._lock = threading.RLock()
        self._conn = None
        self._failures = 0
        self._next_attempt = 0.0
        self._events: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix='libvirt-call')
        self._dispatcher: threading.Thread | None = None
        self._reconnector: threading.Thread | None = None

    # -- connection -------------------------------------------------------

    def start(self) -> None:
        """Start the event machinery and open the connection once.

        A failure to connect is not fatal: the agent serves and retries.
        """
        _start_event_loop()
        self._dispatcher = threading.Thread(
            target=self._dispatch_events, name='libvirt-dispatch',
            daemon=True)
        self._dispatcher.start()
        try:
            self.get_connection()
        except exception.DriverError as exc:
            LOG.warning('libvirt at %s is not reachable yet: %s', self.uri,
                        exc)
            with self._lock:
                self._start_reconnecting()

    def stop(self) -> None:
        self._stopped.set()
        self._events.put(None)
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except libvirt.libvirtError as exc:
                LOG.debug('Closing the libvirt connection: %s', exc)
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._conn is not None

    def get_connection(self):
        """Return an open connection, reconnecting when allowed.

        :raises DriverError: while libvirt is unreachable (attempts back off
            exponentially up to ``reconnect_max_interval``).
        """
        with self._lock:
            if self._conn is not None:
                return self._conn
            now = time.monotonic()
            if now < self._next_attempt:
                raise exception.DriverError(
                    action='connect',
                    reason=f'libvirt at {self.uri} is unreachable; next '
                           f'attempt in {self._next_attempt - now:.1f} s')
            reconnect = self._failures > 0
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                self._failures += 1
                delay = min(2 ** min(self._failures - 1, 10),
                            self.reconnect_max_interval)
                self._next_attempt = now + delay
                raise exception.DriverError(
                    action='connect', reason=f'{self.uri}: {exc}') from exc
            self._setup_connection(conn)
            self._conn = conn
            self._failures = 0
            self._next_attempt = 0.0
            LOG.info('Connected to libvirt at %s', self.uri)
        if reconnect:
            self._events.put((None, 'reconnected'))
        return conn

    def _setup_connection(self, conn) -> None:
        try:
            conn.registerCloseCallback(self._on_close, None)
        except libvirt.libvirtError as exc:
            LOG.debug('No close callback on %s: %s', self.uri, exc)
        try:
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                self._on_lifecycle, None)
        except libvirt.libvirtError as exc:
            LOG.info('libvirt at %s sends no lifecycle events (%s); relying '
                     'on periodic reconciliation', self.uri, exc)
        if not self.uri.startswith('test:'):
            try:
                conn.setKeepAlive(5, 3)
            except libvirt.libvirtError as exc:
                LOG.debug('No keepalive on %s: %s', self.uri, exc)

    def mark_broken(self, conn=None) -> None:
        """Forget the connection after an error that says it is gone."""
        with self._lock:
            if conn is not None and conn is not self._conn:
                return
            if self._conn is None:
                return
            LOG.warning('Lost the libvirt connection to %s', self.uri)
            self._conn = None
            self._failures = max(self._failures, 1)
            self._next_attempt = 0.0
            self._start_reconnecting()

    def _start_reconnecting(self) -> None:
        """Reconnect in the background, so that events (and the
        reconciliation they trigger) resume without waiting for a
        request. Caller holds the lock."""
        if self._stopped.is_set():
            return
        if self._reconnector is not None and self._reconnector.is_alive():
            return
        self._reconnector = threading.Thread(
            target=self._reconnect_loop, name='libvirt-reconnect',
            daemon=True)
        self._reconnector.start()

    def _reconnect_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                self.get_connection()
                return
            except exception.DriverError as exc:
                LOG.debug('Reconnecting to %s: %s', self.uri, exc)
            with self._lock:
                wait = max(self._next_attempt - time.monotonic(), 0.1)
            self._stopped.wait(wait)

    # -- calls ------------------------------------------------------------

    def call(self, func: Callable[..., Any], *args: Any,
             timeout: float | None = None, action: str = 'libvirt call'
             ) -> Any:
        """Run ``func(*args)`` with a timeout.

        The call runs on a worker thread; if it does not return in time the
        caller gets :class:`DriverError` while the stuck call is left to
        finish on its own (libvirt offers no way to cancel it).
        """
        limit = self.call_timeout if timeout is None else timeout
        try:
            future = self._executor.submit(func, *args)
        except RuntimeError as exc:  # executor shut down
            raise exception.DriverError(action=action,
                                        reason=str(exc)) from exc
        try:
            return future.result(timeout=limit)
        except concurrent.futures.TimeoutError:
            raise exception.DriverError(
                action=action, reason=f'no answer within {limit} s') from None

    # -- events -----------------------------------------------------------

    def _on_close(self, conn, reason, opaque) -> None:
        LOG.warning('libvirt closed the connection to %s (reason %s)',
                    self.uri, reason)
        self.mark_broken(conn)
        self._events.put((None, 'disconnected'))

    def _on_lifecycle(self, conn, dom, event, detail, opaque) -> None:
        try:
            name = dom.name()
        except libvirt.libvirtError:
            return
        self._events.put((name, _LIFECYCLE_NAMES.get(event, str(event))))

    def _dispatch_events(self) -> None:
        while not self._stopped.is_set():
            item = self._events.get()
            if item is None:
                return
            if self._event_handler is None:
                continue
            name, event = item
            try:
                self._event_handler(name, event)
            except Exception:
                LOG.exception('Handling libvirt event %s of %s failed',
                              event, name)


_LIFECYCLE_NAMES = {}
if libvirt is not None:
    _LIFECYCLE_NAMES = {
        libvirt.VIR_DOMAIN_EVENT_DEFINED: 'defined',
        libvirt.VIR_DOMAIN_EVENT_UNDEFINED: 'undefined',
        libvirt.VIR_DOMAIN_EVENT_STARTED: 'started',
        libvirt.VIR_DOMAIN_EVENT_SUSPENDED: 'suspended',
        libvirt.VIR_DOMAIN_EVENT_RESUMED: 'resumed',
        libvirt.VIR_DOMAIN_EVENT_STOPPED: 'stopped',
        libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: 'shutdown',
        libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: 'pmsuspended',
        libvirt.VIR_DOMAIN_EVENT_CRASHED: 'crashed',
    }
