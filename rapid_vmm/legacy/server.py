"""The front end of the original RAPID TCP protocol (``[legacy] enabled``).

The original SLAM, AS and DS connect to a VMM at ``[legacy] port`` and send
one request per connection (SPEC section 7). :class:`LegacyServer` maps
every message they send onto the VMM API object it is given (the same
operations as the RPC API):

==========================  ==============================================
message                     VMM API
==========================  ==============================================
SLAM_START_VM_VMM 60        ``start_vm`` -> OK, user, IP (or ERROR)
SLAM_GET_VMCPU_VMM 62       ``get_vm_usage('cpu')`` -> OK + list
SLAM_GET_VMINFO_VMM 63      ``get_vm_info`` -> OK + list (user 0 = all)
SLAM_CHANGE_VMFLV_VMM 64    ``change_flavor`` -> OK / ERROR
SLAM_CONFIRM_VMFLV_VMM 65   ``confirm_flavor`` -> OK / ERROR
SLAM_GET_VMMEM_VMM 66       ``get_vm_usage('memory')`` -> OK + list
SLAM_GET_VMDISK_VMM 67      ``get_vm_usage('disk')`` -> OK + list
AS_RM_REGISTER_VMM 38       ``as_register`` -> OK, user; then the AS's
                            status byte -> ``as_confirm(ready=...)``
AS_RM_NOTIFY_VMM 39         ``as_notify('suspend' | 'remove')``, no reply
DS_VM_DEREGISTER_VMM 75     ``deregister_vm``, no reply
==========================  ==============================================

How it stays bounded:

* one reactor thread (``selectors``) accepts connections and reads every
  request: a connection from an address outside ``allowed_peers`` is
  closed before a byte is read, one past ``max_connections`` too; the
  request must be complete within ``read_timeout`` (an idle connection
  holds no worker, only a file descriptor until its deadline) and within
  ``max_frame_bytes``; a bad frame is logged in one line and closed (with
  the ERROR byte where the message has a reply); nothing was done;
* complete requests run in two bounded worker pools of
  ``max_concurrent_requests`` threads: one for the lifecycle (start,
  resize, confirm, notify, deregister), one for the AS hand-shake and the
  queries, so that starts waiting for their AS never keep that AS from
  registering;
* the AS's status byte after ``AS_RM_REGISTER`` is read by the reactor
  too (``as_status_timeout``), not by a waiting worker;
* typed errors of the API become the ERROR byte and one log line without
  a traceback.

``ctxt`` is a fresh :class:`oslo_context.context.RequestContext` per
request, so every log line of a request carries its request id.
"""

import collections
import ipaddress
import queue
import selectors
import socket
import threading
import time
from typing import Any
import uuid

from oslo_config import cfg
from oslo_context import context as oslo_context
from oslo_log import log as logging
from oslo_messaging.rpc import dispatcher as rpc_dispatcher

from rapid_vmm import exception
from rapid_vmm import objects
from rapid_vmm import rpc
from rapid_vmm.legacy import codec

LOG = logging.getLogger(__name__)

ERROR_REPLY = codec.Writer(header=False).write_byte(codec.ERROR).getvalue()
OK_REPLY = codec.Writer(header=False).write_byte(codec.OK).getvalue()

#: Seconds between two warnings about one refused address.
REFUSAL_LOG_INTERVAL = 60.0
#: Peer addresses whose allow-list answer is kept (then all forgotten).
ALLOWED_CACHE_SIZE = 4096

#: Seconds between two looks for VM of an AS's address.
AS_REGISTER_POLL = 0.5

LIFECYCLE = 'lifecycle'
CONTROL = 'control'
#: Served on the reactor thread: a read of the state store only, which
#: never waits on the hypervisor, a peer or a lock held across one; it
#: saves the hand-over to a worker thread.
INLINE = 'inline'

_RUNNING = (objects.VmStatus.STARTED, objects.VmStatus.RESUMED)


def parse_networks(items: list[str]) -> list:
    """``[legacy] allowed_peers`` as networks.

    :raises ConfigError: for an item that is not a CIDR or an address.
    """
    networks = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise exception.ConfigError(
                reason=f'[legacy] allowed_peers: {item!r} is not a network '
                       '(CIDR) or an address') from None
    return networks


def validate_config(conf: cfg.ConfigOpts) -> None:
    """Start-up checks of the ``[legacy]`` options (one clear line)."""
    parse_networks(conf.legacy.allowed_peers)
    if conf.peer_protocol == 'legacy' and not conf.legacy.ds_host:
        raise exception.ConfigError(
            reason='peer_protocol = legacy needs [legacy] ds_host (the '
                   'address of the original Directory Server)')


class _Conn:
    """One connection: its socket, what it sent, where it stands."""

    __slots__ = ('buf', 'command', 'deadline', 'eof', 'peer', 'phase',
                 'registered', 'sock', 'started', 'user_id')

    def __init__(self, sock: socket.socket, peer: str, deadline: float):
        self.sock = sock
        self.peer = peer
        self.deadline = deadline
        self.buf = bytearray()
        self.eof = False
        #: 'request' (reading the request) or 'status' (reading the AS's
        #: status byte after AS_RM_REGISTER was answered).
        self.phase = 'request'
        self.command: int | None = None
        self.user_id: int | None = None
        self.started = time.monotonic()
        #: Waiting in the reactor's selector.
        self.registered = False


class _Handler:
    """How one command is served."""

    def __init__(self, name: str, method, pool: str, has_reply: bool):
        self.name = name
        self.method = method
        self.pool = pool
        self.has_reply = has_reply


class LegacyServer:
    """Serves the original protocol on ``[legacy] bind_host``:``port``.

    :param api: an object with the VMM API methods of SPEC section 4
        (called as ``api.start_vm(ctxt, user_id=..., ...)``), raising the
        typed errors of :mod:`rapid_vmm.exception`.
    """

    def __init__(self, conf: cfg.ConfigOpts, api: Any):
        self.conf = conf
        self.api = api
        group = conf.legacy
        self.limits = codec.Limits.from_conf(conf)
        self.allowed = parse_networks(group.allowed_peers)
        self._allowed_cache: dict[str, bool] = {}
        self.read_timeout = group.read_timeout
        self.max_connections = group.max_connections
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._handbacks: queue.SimpleQueue = queue.SimpleQueue()
        self._conns: dict[int, _Conn] = {}
        self._open = 0
        self._open_lock = threading.Lock()
        self._busy: set[_Conn] = set()
        self._busy_cond = threading.Condition()
        self._refusals: dict[str, list] = collections.defaultdict(
            lambda: [0.0, 0])
        size = conf.max_concurrent_requests
        self._pools = {LIFECYCLE: rpc.worker_pool(size),
                       CONTROL: rpc.worker_pool(size)}
        self.address: tuple[str, int] | None = None
        self._context_template = oslo_context.RequestContext(
            overwrite=False).to_dict()

    # ------------------------------------------------------------------
    # start and stop
    # ------------------------------------------------------------------

    def start(self) -> None:
        """Listen and serve in a background thread.

        :raises ConfigError: when the address cannot be listened on.
        """
        group = self.conf.legacy
        try:
            family, _type, _proto, _name, sockaddr = socket.getaddrinfo(
                group.bind_host, group.port, type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE)[0]
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(sockaddr)
            listener.listen(min(self.max_connections, socket.SOMAXCONN))
        except OSError as exc:
            raise exception.ConfigError(
                reason=f'[legacy] cannot listen on {group.bind_host}:'
                       f'{group.port}: {exc.strerror or exc}') from None
        listener.setblocking(False)
        self._listener = listener
        self.address = listener.getsockname()[:2]
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, 'listener')
        self._selector.register(self._wake_r, selectors.EVENT_READ, 'wake')
        self._thread = threading.Thread(target=self._run,
                                        name='legacy-reactor', daemon=True)
        self._thread.start()
        if not self.allowed:
            LOG.warning('The legacy RAPID protocol (no authentication) is '
                        'served on %s:%s to ANY address: set [legacy] '
                        'allowed_peers to the networks of the SLAM, DS and '
                        'VMs', *self.address)
        LOG.info('Serving the legacy RAPID protocol on %s:%s (allowed: '
                 '%s)', self.address[0], self.address[1],
                 ', '.join(str(n) for n in self.allowed) or 'any')

    @property
    def port(self) -> int | None:
        return self.address[1] if self.address else None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, let workers end.

        Bounded by ``timeout`` seconds; workers still busy in an API call
        then finish on their own (their connection is already closed).
        """
        if self._stopping.is_set():
            return
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(max(deadline - time.monotonic(), 0.1))
        with self._busy_cond:
            busy = list(self._busy)
        for conn in busy:
            _shutdown(conn.sock)
        with self._busy_cond:
            while self._busy and time.monotonic() < deadline:
                self._busy_cond.wait(max(deadline - time.monotonic(), 0.01))
            left = len(self._busy)
        for pool in self._pools.values():
            pool.shutdown(wait=False)
        for sock in (self._wake_r, self._wake_w):
            sock.close()
        if left:
            LOG.warning('Stopped the legacy front end with %d requests '
                        'still in the VMM API', left)
        else:
            LOG.info('Stopped the legacy front end')

    def _wake(self) -> None:
        try:
            self._wake_w.send(b'x')
        except OSError:
            pass

    # ------------------------------------------------------------------
    # the reactor
    # ------------------------------------------------------------------

    def _run(self) -> None:
        selector = self._selector
        try:
            while not self._stopping.is_set():
                timeout = self._next_timeout()
                for key, _mask in selector.select(timeout):
                    if key.data == 'listener':
                        self._accept()
                    elif key.data == 'wake':
                        self._drain_wake()
                    else:
                        self._on_readable(key.data)
                self._take_handbacks()
                self._expire()
        except Exception:
            LOG.exception('The legacy front end failed; it no longer '
                          'serves')
        finally:
            self._close_everything()

    def _next_timeout(self) -> float:
        if not self._conns:
            return 1.0
        earliest = min(conn.deadline for conn in self._conns.values())
        return max(min(earliest - time.monotonic(), 1.0), 0.0)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                LOG.warning('Accepting a legacy connection failed: %s', exc)
                return
            peer = addr[0]
            if not self._allowed(peer):
                self._refuse(sock, peer, 'not in [legacy] allowed_peers')
                continue
            with self._open_lock:
                full = self._open >= self.max_connections
                if not full:
                    self._open += 1
            if full:
                self._refuse(sock, peer, f'{self.max_connections} '
                                         'connections are open '
                                         '([legacy] max_connections)')
                continue
            conn = _Conn(sock, peer, time.monotonic() + self.read_timeout)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # Each side of the original writes its stream header at
                # once (new ObjectOutputStream + flush), before reading.
                if sock.send(codec.HEADER) != len(codec.HEADER):
                    raise OSError('short write of the stream header')
            except OSError as exc:
                LOG.debug('Legacy connection from %s lost at once: %s',
                          peer, exc)
                self._close(conn)
                continue
            # The original clients send their request at once: read what
            # is there now; wait in the selector only for the rest.
            if self._on_readable(conn):
                self._register(conn)

    def _allowed(self, peer: str) -> bool:
        """Whether ``peer`` is in ``[legacy] allowed_peers`` (answers are
        kept for the addresses seen last: the networks never change)."""
        if not self.allowed:
            return True
        known = self._allowed_cache.get(peer)
        if known is None:
            if len(self._allowed_cache) >= ALLOWED_CACHE_SIZE:
                self._allowed_cache.clear()
            known = self._allowed_cache[peer] = self._in_allowed(peer)
        return known

    def _in_allowed(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer.split('%', 1)[0])
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.allowed)

    def _refuse(self, sock: socket.socket, peer: str, why: str) -> None:
        now = time.monotonic()
        entry = self._refusals[peer]
        entry[1] += 1
        if entry[0] == 0.0 or now - entry[0] >= REFUSAL_LOG_INTERVAL:
            LOG.warning('Refused a legacy connection from %s: %s (%d '
                        'refused since the last warning)', peer, why,
                        entry[1])
            entry[0], entry[1] = now, 0
        try:
            # Reset, not a polite close: nothing is read or written.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                            b'\x01\x00\x00\x00\x00\x00\x00\x00')
        except OSError:
            pass
        sock.close()

    def _on_readable(self, conn: _Conn) -> bool:
        """Read what ``conn`` sent; True while its request is partial."""
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as exc:
            LOG.info('Legacy connection from %s lost: %s', conn.peer, exc)
            self._forget(conn)
            self._close(conn)
            return False
        if data:
            conn.buf += data
        else:
            conn.eof = True
        return self._parse(conn)

    def _parse(self, conn: _Conn) -> bool:
        """Act on ``conn``'s request; True while it is partial (``conn``
        stays with the reactor), False once it was handed on or closed."""
        command = None
        simple = None
        if conn.phase == 'request':
            simple = codec.read_simple_request(conn.buf)
        if simple is not None and simple[0] in HANDLERS:
            command, fields = simple
        else:
            try:
                command, fields = self._read(conn)
            except codec.Truncated as exc:
                if not conn.eof:
                    return True  # not all there yet
                self._forget(conn)
                if conn.phase == 'status':
                    LOG.warning('The AS at %s (user %s) closed without '
                                'sending its status after AS_RM_REGISTER',
                                conn.peer, conn.user_id)
                    self._close(conn)
                else:
                    self._bad_frame(conn, exc.command, exc)
                return False
            except codec.CodecError as exc:
                self._forget(conn)
                self._bad_frame(conn, getattr(exc, 'command', None), exc)
                return False
        self._forget(conn)
        conn.command = command
        if conn.phase == 'status':
            self._submit(CONTROL, self._confirm_as, conn, fields['status'])
        else:
            handler = HANDLERS[command]
            if handler.pool == INLINE:
                self._serve_inline(conn, handler, fields)
            else:
                self._submit(handler.pool, self._serve, conn, handler,
                             fields)
        return False

    def _read(self, conn: _Conn) -> tuple[int, dict]:
        """Read ``conn``'s request (and status byte) from its buffer.

        :raises codec.CodecError: with ``command`` set once it was read.
        """
        command = None
        try:
            if len(conn.buf) > self.limits.max_frame_bytes:
                raise codec.FrameTooLarge(
                    reason=f'more than {self.limits.max_frame_bytes} bytes')
            reader = codec.Reader(codec.BufferSource(bytes(conn.buf),
                                                     self.limits),
                                  self.limits)
            reader.read_header()
            command = reader.read_byte()
            if command not in HANDLERS:
                raise codec.UnknownCommand(command=command)
            fields = {name: reader.read(kind)
                      for name, kind in codec.REQUESTS[command]}
            if conn.phase == 'status':
                fields['status'] = reader.read_byte()
        except codec.CodecError as exc:
            exc.command = command
            raise
        return command, fields

    def _bad_frame(self, conn: _Conn, command: int | None,
                   error: codec.CodecError) -> None:
        name = codec.COMMAND_NAMES.get(command, 'a request')
        LOG.warning('Bad legacy frame from %s (%s), nothing done: %s',
                    conn.peer, name, error)
        handler = HANDLERS.get(command)
        if handler is not None and handler.has_reply:
            try:
                conn.sock.send(ERROR_REPLY)
            except OSError:
                pass
        self._close(conn)

    def _forget(self, conn: _Conn) -> None:
        """Take ``conn`` out of the reactor (a worker or nobody has it)."""
        if not conn.registered:
            return
        conn.registered = False
        self._conns.pop(conn.sock.fileno(), None)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _register(self, conn: _Conn) -> bool:
        """Let the reactor wait for ``conn``'s data; False if it is gone."""
        try:
            conn.sock.setblocking(False)
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        except (OSError, ValueError, KeyError) as exc:
            LOG.info('Legacy connection from %s lost: %s', conn.peer, exc)
            self._close(conn)
            return False
        conn.registered = True
        self._conns[conn.sock.fileno()] = conn
        return True

    def _serve_inline(self, conn: _Conn, handler: _Handler,
                      fields: dict) -> None:
        # RequestContext().to_dict() with a fresh request id, made from a
        # template (a tenth of the time), and not made current: the
        # reactor's own log lines must not carry this request's id.
        ctxt = dict(self._context_template,
                    request_id=f'req-{uuid.uuid4()}')
        try:
            reply = self._reply(ctxt, conn, handler, fields)
        except Exception:
            LOG.exception('Serving a legacy request from %s failed',
                          conn.peer)
            reply = None
        sent = 0
        if reply:
            try:
                sent = conn.sock.send(reply)  # never blocks the reactor
            except BlockingIOError:
                pass
            except OSError as exc:
                LOG.warning('Could not send the reply to %s to %s: %s',
                            handler.name, conn.peer, exc)
                sent = len(reply)
        if reply and sent < len(reply):
            # A reader slower than its socket buffer: a worker finishes.
            self._submit(CONTROL, self._finish_send, conn, handler.name,
                         reply[sent:])
            return
        self._close(conn)

    def _finish_send(self, ctxt: dict, conn: _Conn, what: str,
                     data: bytes) -> None:
        self._send(conn, data, what)

    def _submit(self, pool: str, func, conn: _Conn, *args) -> None:
        with self._busy_cond:
            self._busy.add(conn)
        try:
            self._pools[pool].submit(self._work, func, conn, *args)
        except RuntimeError:  # shut down: the server stops
            self._done(conn)
            self._close(conn)

    def _take_handbacks(self) -> None:
        while not self._handbacks.empty():
            try:
                conn = self._handbacks.get_nowait()
            except queue.Empty:
                return
            if self._stopping.is_set():
                self._close(conn)
                continue
            # The AS may have sent its status with the request already.
            if self._parse(conn):
                self._register(conn)

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            self._forget(conn)
            if conn.phase == 'status':
                LOG.warning('The AS at %s (user %s) sent no status within '
                            '%.0f s after AS_RM_REGISTER; its VM is not '
                            'confirmed', conn.peer, conn.user_id,
                            self.conf.legacy.as_status_timeout)
            else:
                LOG.info('Closed the legacy connection from %s: no whole '
                         'request within %.1f s', conn.peer,
                         self.read_timeout)
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        try:
            conn.sock.close()
        except OSError:
            pass
        with self._open_lock:
            self._open -= 1

    def _close_everything(self) -> None:
        for conn in list(self._conns.values()):
            self._forget(conn)
            self._close(conn)
        while True:
            try:
                self._close(self._handbacks.get_nowait())
            except queue.Empty:
                break
        if self._listener is not None:
            try:
                self._selector.unregister(self._listener)
            except (KeyError, ValueError):
                pass
            self._listener.close()
        self._selector.close()

    # ------------------------------------------------------------------
    # workers
    # ------------------------------------------------------------------

    def _work(self, func, conn: _Conn, *args) -> None:
        handed_back = False
        try:
            # A fresh request context, current for this thread's logging.
            ctxt = oslo_context.RequestContext(overwrite=True).to_dict()
            handed_back = func(ctxt, conn, *args) is _HANDED_BACK
        except Exception:
            LOG.exception('Serving a legacy request from %s failed',
                          conn.peer)
        finally:
            self._done(conn)
            if not handed_back:
                self._close(conn)

    def _done(self, conn: _Conn) -> None:
        with self._busy_cond:
            self._busy.discard(conn)
            self._busy_cond.notify_all()

    def _serve(self, ctxt: dict, conn: _Conn, handler: _Handler,
               fields: dict) -> Any:
        reply = self._reply(ctxt, conn, handler, fields)
        if reply is _HANDED_BACK:
            return reply
        if reply:
            self._send(conn, reply, handler.name)
        return None

    def _reply(self, ctxt: dict, conn: _Conn, handler: _Handler,
               fields: dict) -> Any:
        """The reply bytes (None: no reply), or ``_HANDED_BACK``."""
        try:
            reply = handler.method(self, ctxt, conn, fields)
        except Exception as exc:
            error = _unwrap(exc)
            if isinstance(error, exception.RapidVmmException):
                LOG.warning('Legacy %s from %s%s answered ERROR: %s: %s',
                            handler.name, conn.peer, _user(fields),
                            type(error).__name__, error)
            else:
                LOG.error('Legacy %s from %s%s failed unexpectedly',
                          handler.name, conn.peer, _user(fields),
                          exc_info=(type(error), error,
                                    error.__traceback__))
            reply = ERROR_REPLY if handler.has_reply else None
        LOG.debug('Legacy %s from %s%s served in %.3f s', handler.name,
                  conn.peer, _user(fields), time.monotonic() - conn.started)
        return reply

    def _send(self, conn: _Conn, data: bytes, what: str) -> bool:
        try:
            conn.sock.setblocking(True)
            conn.sock.settimeout(self.read_timeout)
            conn.sock.sendall(data)
        except OSError as exc:
            LOG.warning('Could not send the reply to %s to %s: %s', what,
                        conn.peer, exc)
            return False
        return True

    # -- the messages -------------------------------------------------------

    def _start_vm(self, ctxt: dict, conn: _Conn, f: dict) -> bytes:
        vm = self.api.start_vm(ctxt, user_id=f['user_id'],
                               os_type=f['os_type'], vcpus=f['vcpus'],
                               memory_mb=f['memory_mb'],
                               gpu_cores=f['gpu_cores'])
        if not vm.get('ip_address'):
            raise exception.DriverError(action='start VM',
                                        reason='the VM has no IP address')
        return (codec.Writer(header=False).write_byte(codec.OK)
                .write_long(vm['user_id']).write_utf(vm['ip_address'])
                .getvalue())

    def _get_vminfo(self, ctxt: dict, conn: _Conn, f: dict) -> bytes:
        user_id = f['user_id'] or None
        records = self.api.get_vm_info(ctxt, user_id=user_id)
        items = []
        for vm in records:
            if vm.get('status') not in _RUNNING:
                continue
            items += [str(vm['user_id']), str(vm.get('vm_id') or 0),
                      str(vm['vcpus']), str(vm['memory_mb']),
                      str(vm['disk_gb']), str(vm.get('gpu_cores') or 0)]
        return self._list_reply(user_id, items, 'is not running')

    def _get_usage(self, resource: str, ctxt: dict, conn: _Conn,
                   f: dict) -> bytes:
        user_id = f['user_id'] or None
        entries = self.api.get_vm_usage(ctxt, resource=resource,
                                        user_id=user_id)
        items = []
        for entry in entries:
            figures = _usage_figures(resource, entry)
            if figures is None:
                continue
            items += [str(entry['user_id']), str(entry.get('vm_id') or 0),
                      *figures]
        return self._list_reply(user_id, items,
                                f'has no {resource} figure yet')

    def _list_reply(self, user_id: int | None, items: list[str],
                    why: str) -> bytes:
        if user_id is not None and not items:
            # As the original: ERROR when the one VM asked for has none.
            raise exception.VmStateConflict(
                f'The VM of user {user_id} {why}.')
        return (codec.Writer(header=False).write_byte(codec.OK)
                .write_string_list(items).getvalue())

    def _change_flavor(self, ctxt: dict, conn: _Conn, f: dict) -> bytes:
        self.api.change_flavor(ctxt, user_id=f['user_id'], vcpus=f['vcpus'],
                               memory_mb=f['memory_mb'],
                               disk_gb=f['disk_gb'])
        return OK_REPLY

    def _confirm_flavor(self, ctxt: dict, conn: _Conn, f: dict) -> bytes:
        self.api.confirm_flavor(ctxt, user_id=f['user_id'])
        return OK_REPLY

    def _as_register(self, ctxt: dict, conn: _Conn, f: dict) -> Any:
        ip_address = f['ip_address']
        wait = self.conf.legacy.as_register_wait
        deadline = time.monotonic() + wait
        while True:
            try:
                user_id = self.api.as_register(
                    ctxt, ip_address=ip_address)['user_id']
                break
            except Exception as exc:
                if not isinstance(_unwrap(exc), exception.VmNotFound) or \
                        not self._pause_until(deadline):
                    raise
        if self.conf.peer_protocol == 'legacy':
            # The AS registers with the DS next, by user id: the DS must
            # know the VM by then, or it answers ERROR.
            self._wait_for_ds_id(ctxt, user_id, deadline)
        reply = (codec.Writer(header=False).write_byte(codec.OK)
                 .write_long(user_id).getvalue())
        if not self._send(conn, reply, 'AS_RM_REGISTER_VMM'):
            return None
        conn.phase = 'status'
        conn.user_id = user_id
        conn.deadline = (time.monotonic() +
                         self.conf.legacy.as_status_timeout)
        self._handbacks.put(conn)
        self._wake()
        return _HANDED_BACK

    def _pause_until(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0 or self._stopping.is_set():
            return False
        return not self._stopping.wait(min(AS_REGISTER_POLL, left))

    def _wait_for_ds_id(self, ctxt: dict, user_id: int,
                        deadline: float) -> None:
        while True:
            records = self.api.get_vm_info(ctxt, user_id=user_id)
            if records and records[0].get('vm_id') is not None:
                return
            if not self._pause_until(deadline):
                LOG.warning('The VM of user %s is not registered with the '
                            'DS yet; answering its AS anyway', user_id)
                return

    def _confirm_as(self, ctxt: dict, conn: _Conn, status: int) -> None:
        ready = status == codec.OK
        try:
            self.api.as_confirm(ctxt, user_id=conn.user_id, ready=ready)
        except Exception as exc:  # noqa: BLE001 - no reply to give
            error = _unwrap(exc)
            LOG.warning('The AS status of user %s from %s was not taken: '
                        '%s: %s', conn.user_id, conn.peer,
                        type(error).__name__, error)
            return
        LOG.info('The AS at %s (user %s) registered over the legacy '
                 'protocol: %s', conn.peer, conn.user_id,
                 'ready' if ready else f'NOT ready (status {status})')

    def _as_notify(self, ctxt: dict, conn: _Conn, f: dict) -> None:
        action = {1: 'suspend', 2: 'remove'}.get(f['type'])
        if action is None:
            raise exception.InvalidRequest(
                reason=f'AS_RM_NOTIFY type {f["type"]} (1 suspend, 2 '
                       'remove)')
        self.api.as_notify(ctxt, user_id=f['user_id'], action=action)

    def _deregister(self, ctxt: dict, conn: _Conn, f: dict) -> None:
        self.api.deregister_vm(ctxt, user_id=f['user_id'])


_HANDED_BACK = object()


def _unwrap(exc: BaseException) -> BaseException:
    """The typed error inside oslo.messaging's ``ExpectedException`` (what
    an RPC endpoint method raises for an expected error)."""
    if isinstance(exc, rpc_dispatcher.ExpectedException):
        inner = exc.exc_info[1] if exc.exc_info else None
        if inner is not None:
            return inner
    return exc


def _user(fields: dict) -> str:
    user_id = fields.get('user_id')
    return '' if user_id is None else f' (user {user_id})'


def _float_text(value: float) -> str:
    """A figure as text Java's ``Double.parseDouble`` reads: '12.5'."""
    return repr(float(value))


def _usage_figures(resource: str, entry: dict) -> list[str] | None:
    """The original's figures of one VM, or None when one is missing."""
    if resource == 'cpu':
        value = entry.get('cpu_util_percent')
        return None if value is None else [_float_text(value)]
    if resource == 'memory':
        size, used = entry.get('memory_mb'), entry.get('memory_used_mb')
        if size is None or used is None:
            return None
        return [str(int(size)), _float_text(used)]
    capacity, allocation = (entry.get('capacity_bytes'),
                            entry.get('allocation_bytes'))
    if capacity is None or allocation is None:
        return None
    return [str(int(capacity)), _float_text(allocation)]


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _usage(resource: str):
    def method(self, ctxt, conn, fields):
        return self._get_usage(resource, ctxt, conn, fields)
    return method


HANDLERS: dict[int, _Handler] = {
    codec.SLAM_START_VM_VMM: _Handler('SLAM_START_VM_VMM',
                                      LegacyServer._start_vm, LIFECYCLE,
                                      True),
    codec.SLAM_GET_VMCPU_VMM: _Handler('SLAM_GET_VMCPU_VMM', _usage('cpu'),
                                       CONTROL, True),
    codec.SLAM_GET_VMINFO_VMM: _Handler('SLAM_GET_VMINFO_VMM',
                                        LegacyServer._get_vminfo, INLINE,
                                        True),
    codec.SLAM_CHANGE_VMFLV_VMM: _Handler('SLAM_CHANGE_VMFLV_VMM',
                                          LegacyServer._change_flavor,
                                          LIFECYCLE, True),
    codec.SLAM_CONFIRM_VMFLV_VMM: _Handler('SLAM_CONFIRM_VMFLV_VMM',
                                           LegacyServer._confirm_flavor,
                                           LIFECYCLE, True),
    codec.SLAM_GET_VMMEM_VMM: _Handler('SLAM_GET_VMMEM_VMM',
                                       _usage('memory'), CONTROL, True),
    codec.SLAM_GET_VMDISK_VMM: _Handler('SLAM_GET_VMDISK_VMM',
                                        _usage('disk'), CONTROL, True),
    codec.AS_RM_REGISTER_VMM: _Handler('AS_RM_REGISTER_VMM',
                                       LegacyServer._as_register, CONTROL,
                                       True),
    codec.AS_RM_NOTIFY_VMM: _Handler('AS_RM_NOTIFY_VMM',
                                     LegacyServer._as_notify, LIFECYCLE,
                                     False),
    codec.DS_VM_DEREGISTER_VMM: _Handler('DS_VM_DEREGISTER_VMM',
                                         LegacyServer._deregister,
                                         LIFECYCLE, False),
}
