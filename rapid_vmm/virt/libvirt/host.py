"""The libvirt connection: bounded calls, reconnect with back-off, events.

This is the only module of rapid-vmm that imports ``libvirt``; the rest of
the driver reaches the module through :data:`libvirt`.

Every libvirt call of the driver goes through :meth:`Host.call`: it runs on
a worker thread and the caller waits at most ``[libvirt] call_timeout``
seconds (or the deadline the caller gives), then gets
:class:`~rapid_vmm.exception.DriverError`. libvirt offers no way to cancel
a call: a stuck one is left to finish on its worker, and the keepalive of
remote connections ends it when the daemon is gone.

The connection:

* ``libvirt.open()`` runs outside the host lock and under the same kind of
  deadline, one attempt at a time; the lock only guards the bookkeeping;
* a connection is lost when an error comes from the remote/RPC layer
  (``VIR_FROM_REMOTE``, ``VIR_FROM_RPC``), when ``isAlive()`` says so, or
  when libvirt's close callback fires. The old connection is then retired
  in the background (its lifecycle callback and close callback
  deregistered, then closed), and a reconnect thread opens a new one with
  exponential back-off up to ``reconnect_max_interval``;
* after a reconnect the events are registered again on the new connection
  and the handler gets ``(None, 'reconnected')``.

Threads: libvirt's default event loop runs in a daemon thread (started
once per process, before the first connection is opened, as libvirt
requires); libvirt callbacks only put an item on a queue, and a dispatcher
thread hands them to the driver's handler, so a slow handler never stalls
libvirt's loop.
"""

from collections.abc import Callable
import concurrent.futures
import datetime
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

#: Keepalive of remote connections: a probe every KEEPALIVE_INTERVAL s, the
#: connection is closed after KEEPALIVE_COUNT probes without an answer.
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3

#: Codes of errors that the daemon itself answered (the connection works).
_ANSWERED_CODES = ('VIR_ERR_NO_DOMAIN', 'VIR_ERR_NO_DOMAIN_METADATA',
                   'VIR_ERR_OPERATION_INVALID', 'VIR_ERR_NO_SUPPORT',
                   'VIR_ERR_INVALID_ARG', 'VIR_ERR_XML_ERROR',
                   'VIR_ERR_OPERATION_FAILED', 'VIR_ERR_CONFIG_UNSUPPORTED')


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


def error_domain(exc: BaseException) -> int | None:
    """Return the libvirt error domain (the layer that failed), or None."""
    if libvirt is not None and isinstance(exc, libvirt.libvirtError):
        return exc.get_error_domain()
    return None


def is_not_found(exc: BaseException) -> bool:
    """The daemon answered "no such domain"."""
    return error_code(exc) == getattr(libvirt, 'VIR_ERR_NO_DOMAIN', -1)


def is_connection_error(exc: BaseException, conn=None) -> bool:
    """True when ``exc`` says the connection itself is gone.

    An error of the remote/RPC layer is; an error the daemon answered (no
    such domain, invalid operation, ...) is not; anything else is one only
    when ``conn.isAlive()`` says the connection is dead. An internal error
    of a driver (``VIR_ERR_INTERNAL_ERROR``) is not, by itself, a lost
    connection.
    """
    if libvirt is None or not isinstance(exc, libvirt.libvirtError):
        return False
    if error_domain(exc) in (libvirt.VIR_FROM_REMOTE, libvirt.VIR_FROM_RPC):
        return True
    code = error_code(exc)
    if any(code == getattr(libvirt, name, None) for name in _ANSWERED_CODES):
        return False
    if conn is None:
        return False
    try:
        return not conn.isAlive()
    except libvirt.libvirtError:
        return True


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


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(
        timestamp, tz=datetime.UTC).isoformat(timespec='seconds')


class Host:
    """A managed connection to one libvirt URI.

    :param uri: libvirt connection URI.
    :param reconnect_max_interval: upper bound of the back-off, seconds.
    :param call_timeout: default deadline of a call (and of ``open()``).
    :param event_handler: called as ``handler(domain_name, event)`` for each
        lifecycle event, ``handler(None, 'disconnected')`` when the
        connection is lost and ``handler(None, 'reconnected')`` after it was
        opened again; runs in the dispatcher thread.
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
        # Guards the fields below; never held across a libvirt call.
        self._lock = threading.Lock()
        self._connected = threading.Condition(self._lock)
        self._conn = None
        self._callback_id: int | None = None
        self._connecting = False
        self._ever_connected = False
        self._failures = 0
        self._next_attempt = 0.0
        self._since = time.time()
        self._last_error = ''
        self._events: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=16, thread_name_prefix='libvirt-call')
        # open(), close() and callback (de)registration: never queued
        # behind stuck calls.
        self._admin = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix='libvirt-conn')
        self._dispatcher: threading.Thread | None = None
        self._reconnector: threading.Thread | None = None

    # -- connection -------------------------------------------------------

    def start(self) -> None:
        """Start the event machinery and open the connection once.

        A failure to connect is not fatal: the agent serves and retries in
        the background.
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
            conn, callback_id = self._conn, self._callback_id
            self._conn = self._callback_id = None
        if conn is not None:
            future = self._admin.submit(self._retire, conn, callback_id)
            try:
                future.result(timeout=self.call_timeout)
            except concurrent.futures.TimeoutError:
                LOG.warning('Closing the libvirt connection to %s takes more '
                            'than %s s; left to finish', self.uri,
                            self.call_timeout)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._admin.shutdown(wait=False, cancel_futures=True)

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._conn is not None

    def state(self) -> dict:
        """``state`` (connected, connecting, reconnecting, disconnected,
        stopped), ``since`` (epoch seconds), ``failures``, ``last_error``."""
        with self._lock:
            if self._stopped.is_set():
                state = 'stopped'
            elif self._conn is not None:
                state = 'connected'
            elif self._ever_connected:
                state = 'reconnecting'
            elif self._connecting:
                state = 'connecting'
            else:
                state = 'disconnected'
            return {'state': state, 'since': self._since, 'uri': self.uri,
                    'failures': self._failures,
                    'last_error': self._last_error}

    def describe(self) -> str:
        """One line for diagnostics: state, URI and since when."""
        info = self.state()
        word = 'from' if info['state'] in ('disconnected', 'stopped') \
            else 'to'
        line = (f"{info['state']} {word} {self.uri} since "
                f"{_iso(info['since'])}")
        if info['state'] != 'connected' and info['last_error']:
            line += (f" ({info['failures']} failed attempts; last error: "
                     f"{info['last_error']})")
        return line

    def get_connection(self):
        """Return the open connection, or open one when allowed.

        ``libvirt.open()`` runs outside the lock, under ``call_timeout``,
        one attempt at a time: a caller that comes while another thread
        opens waits for that attempt (which is bounded).

        :raises DriverError: while libvirt is unreachable (attempts back off
            exponentially up to ``reconnect_max_interval``).
        """
        with self._lock:
            waited = False
            if self._connecting and self._conn is None:
                # open() and the set-up each have call_timeout.
                waited = True
                self._connected.wait_for(
                    lambda: not self._connecting or self._conn is not None,
                    timeout=2 * self.call_timeout + 1)
            if self._conn is not None:
                return self._conn
            if self._stopped.is_set():
                raise exception.DriverError(
                    action='connect', reason=f'{self.uri}: agent stopping')
            if self._connecting:
                raise exception.DriverError(
                    action='connect',
                    reason=f'connecting to {self.uri} since '
                           f'{_iso(self._since)}')
            now = time.monotonic()
            if now < self._next_attempt or waited:
                # Back-off, or the attempt waited for failed: its answer.
                raise exception.DriverError(
                    action='connect',
                    reason=f'libvirt at {self.uri} is unreachable '
                           f'({self._last_error}); next attempt in '
                           f'{max(self._next_attempt - now, 0):.1f} s')
            self._connecting = True
            reconnect = self._ever_connected
        try:
            conn = self._open()
            callback_id = self._setup_connection(conn)
        except exception.DriverError as exc:
            with self._lock:
                self._connecting = False
                self._connected.notify_all()
                self._failures += 1
                delay = min(2 ** min(self._failures - 1, 10),
                            self.reconnect_max_interval)
                self._next_attempt = time.monotonic() + delay
                self._last_error = exc.kwargs.get('reason', str(exc))
            raise
        with self._lock:
            self._connecting = False
            self._connected.notify_all()
            if self._stopped.is_set():
                self._admin.submit(self._retire, conn, callback_id)
                raise exception.DriverError(
                    action='connect', reason=f'{self.uri}: agent stopping')
            self._conn = conn
            self._callback_id = callback_id
            self._failures = 0
            self._next_attempt = 0.0
            self._last_error = ''
            self._since = time.time()
            self._ever_connected = True
        LOG.info('Connected to libvirt at %s', self.uri)
        if reconnect:
            self._events.put((None, 'reconnected'))
        return conn

    def _open(self):
        """``libvirt.open(uri)`` under ``call_timeout``."""
        future = self._admin.submit(libvirt.open, self.uri)
        try:
            return future.result(timeout=self.call_timeout)
        except concurrent.futures.TimeoutError:
            # It may still succeed: that late connection is closed.
            future.add_done_callback(self._close_late_open)
            raise exception.DriverError(
                action='connect',
                reason=f'{self.uri}: no answer within '
                       f'{self.call_timeout} s') from None
        except libvirt.libvirtError as exc:
            raise exception.DriverError(
                action='connect', reason=f'{self.uri}: {exc}') from exc

    def _close_late_open(self, future) -> None:
        try:
            conn = future.result()
        except Exception:  # noqa: BLE001 - it failed late: nothing to close
            return
        LOG.info('Closing a connection to %s that opened after its '
                 'deadline', self.uri)
        try:
            self._admin.submit(self._retire, conn, None)
        except RuntimeError:  # shut down: close it here
            self._retire(conn, None)

    def _setup_connection(self, conn) -> int | None:
        """Close callback, lifecycle events and keepalive on ``conn``;
        returns the lifecycle callback's id (None without events)."""
        def setup() -> int | None:
            try:
                conn.registerCloseCallback(self._on_close, None)
            except libvirt.libvirtError as exc:
                LOG.debug('No close callback on %s: %s', self.uri, exc)
            callback_id = None
            try:
                callback_id = conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                    self._on_lifecycle, None)
            except libvirt.libvirtError as exc:
                LOG.info('libvirt at %s sends no lifecycle events (%s); '
                         'relying on periodic reconciliation', self.uri, exc)
            if not self.uri.startswith('test:'):
                try:
                    conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
                except libvirt.libvirtError as exc:
                    LOG.debug('No keepalive on %s: %s', self.uri, exc)
            return callback_id

        future = self._admin.submit(setup)
        try:
            return future.result(timeout=self.call_timeout)
        except concurrent.futures.TimeoutError:
            self._admin.submit(self._retire, conn, None)
            raise exception.DriverError(
                action='connect',
                reason=f'{self.uri}: registering events took more than '
                       f'{self.call_timeout} s') from None

    def _retire(self, conn, callback_id: int | None) -> None:
        """Deregister our callbacks from ``conn`` and close it (runs on an
        admin worker; a dead connection fails these quickly)."""
        if callback_id is not None:
            try:
                conn.domainEventDeregisterAny(callback_id)
            except libvirt.libvirtError as exc:
                LOG.debug('Deregistering events on %s: %s', self.uri, exc)
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError as exc:
            LOG.debug('Unregistering the close callback on %s: %s',
                      self.uri, exc)
        try:
            conn.close()
        except libvirt.libvirtError as exc:
            LOG.debug('Closing the libvirt connection to %s: %s', self.uri,
                      exc)

    def mark_broken(self, conn=None, reason: str = '') -> None:
        """Forget the connection after an error that says it is gone.

        ``conn`` other than the current connection (an old one) is ignored.
        The old connection is retired and a reconnect starts, both in the
        background: this is safe from libvirt's own callbacks.
        """
        with self._lock:
            if conn is not None and conn is not self._conn:
                return
            if self._conn is None:
                return
            old, callback_id = self._conn, self._callback_id
            self._conn = self._callback_id = None
            self._failures = max(self._failures, 1)
            self._next_attempt = 0.0
            self._since = time.time()
            self._last_error = reason or 'connection lost'
            try:
                self._admin.submit(self._retire, old, callback_id)
            except RuntimeError:  # shut down: the agent is stopping
                pass
            self._start_reconnecting()
        LOG.warning('Lost the libvirt connection to %s (%s); reconnecting',
                    self.uri, reason or 'connection lost')

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
             timeout: float | None = None, action: str = 'libvirt call',
             conn=None) -> Any:
        """Run ``func(*args)`` on a worker and wait at most ``timeout``
        seconds (default ``call_timeout``).

        ``func`` may be one libvirt call or a function making several (one
        deadline for the batch). A libvirt error is raised as is, after the
        connection was marked broken when the error says it is gone
        (``conn``: the connection the call used; default the current one).

        :raises DriverError: when no answer came in time (the call is left
            to finish on its worker) or the agent is stopping.
        """
        limit = self.call_timeout if timeout is None else timeout
        if conn is None:
            with self._lock:
                conn = self._conn
        try:
            future = self._executor.submit(func, *args)
        except RuntimeError as exc:  # executor shut down
            raise exception.DriverError(action=action,
                                        reason=str(exc)) from exc
        try:
            return future.result(timeout=limit)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise exception.DriverError(
                action=action,
                reason=f'no answer from libvirt at {self.uri} within '
                       f'{limit} s') from None
        except libvirt.libvirtError as exc:
            if is_connection_error(exc, conn):
                self.mark_broken(conn, reason=str(exc))
            raise

    # -- events -----------------------------------------------------------

    def _on_close(self, conn, reason, opaque) -> None:
        LOG.warning('libvirt closed the connection to %s (reason %s)',
                    self.uri, _CLOSE_REASONS.get(reason, reason))
        self.mark_broken(conn, reason=f'closed by libvirt ('
                                      f'{_CLOSE_REASONS.get(reason, reason)})')
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
_CLOSE_REASONS = {}
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
    _CLOSE_REASONS = {
        libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: 'error',
        libvirt.VIR_CONNECT_CLOSE_REASON_EOF: 'end of file',
        libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: 'keepalive timeout',
        libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: 'closed by the client',
    }
