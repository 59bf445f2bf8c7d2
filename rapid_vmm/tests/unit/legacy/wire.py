"""The original RAPID peers, played by the tests over real TCP.

* :func:`call` - a client of the original protocol (what the Java SLAM, AS
  and DS do when they connect to a VMM): header, one request, the reply;
* :class:`OriginalDirectoryServer` - behaves as SPEC section 7 says the
  original Java DS does: ``VMM_REGISTER`` answered ERROR (before reading
  the request) until a SLAM registered with ``SLAM_REGISTER_DS``, ERROR to
  a second ``VMM_REGISTER`` from a known IP, ``VM_REGISTER`` answered with
  a bare long, notifications not answered (the connection is closed);
  it can send ``DS_VM_DEREGISTER_VMM`` to a VMM as the DS does (header,
  request, close, without reading the VMM's header);
* :class:`OriginalSlam` - answers ``VMM_REGISTER_SLAM`` and registers with
  the DS at start, as the original SLAM;
* :class:`OriginalAs` - the AS's port 4322: ``DS_MIGRATION_VM_AS`` read as
  the Java AS reads it (raw command byte, then a long), answered OK/ERROR.

Every one records what it received (``messages``) and can wait for one.
"""

import socket
import threading
import time

from rapid_vmm.legacy import codec

TIMEOUT = 10


def call(address, frame: bytes, layout=(), timeout: float = TIMEOUT,
         read_header: bool = True) -> list:
    """Send ``frame`` and read a reply of ``layout`` (``[]``: wait for the
    peer to close). Returns the values; raises codec errors or OSError."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(frame)
        source = codec.SocketSource(sock, deadline)
        reader = codec.Reader(source)
        if read_header:
            reader.read_header()
        values = [reader.read(kind) for kind in layout]
        if not layout:
            source.wait_closed()
        return values


def request(command: int, **fields) -> bytes:
    return codec.encode_request(command, **fields)


class _Peer:
    """A threaded TCP server of the original kind: one request per
    connection, header written first."""

    name = 'peer'

    def __init__(self, host: str = '127.0.0.1', port: int = 0):
        self.sock = socket.create_server((host, port))
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()[:2]
        self.messages: list[tuple[int, dict, str]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=self.name)
        self.errors: list[str] = []

    @property
    def port(self) -> int:
        return self.address[1]

    def start(self) -> '_Peer':
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, addr[0]),
                             daemon=True).start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        with conn:
            conn.settimeout(TIMEOUT)
            try:
                conn.sendall(codec.HEADER)
                reader = codec.Reader(codec.SocketSource(
                    conn, time.monotonic() + TIMEOUT))
                reader.read_header()
                command = reader.read_byte()
                self.handle(conn, reader, command, peer)
            except (codec.CodecError, OSError) as exc:
                self.errors.append(f'{type(exc).__name__}: {exc}')

    def handle(self, conn, reader, command, peer) -> None:
        raise NotImplementedError

    def record(self, command: int, fields: dict, peer: str) -> None:
        with self._cond:
            self.messages.append((command, fields, peer))
            self._cond.notify_all()

    def calls(self, command: int) -> list[dict]:
        with self._cond:
            return [f for c, f, _ in self.messages if c == command]

    def wait_for(self, command: int, predicate=lambda f: True,
                 timeout: float = 30, count: int = 1) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [f for c, f, _ in self.messages
                         if c == command and predicate(f)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    got = [codec.COMMAND_NAMES.get(c)
                           for c, _, _ in self.messages]
                    raise TimeoutError(
                        f'{self.name}: no {codec.COMMAND_NAMES[command]} in '
                        f'{timeout} s; got {got}, errors {self.errors}')
                self._cond.wait(left)


def _fields(reader, command) -> dict:
    return {name: reader.read(kind) for name, kind in codec.REQUESTS[command]}


class OriginalDirectoryServer(_Peer):
    """The original DS's VMM-facing behaviour (SPEC section 7)."""

    name = 'original-ds'

    def __init__(self, *args, first_vmm_id: int = 4242,
                 first_vm_id: int = 1001, **kwargs):
        super().__init__(*args, **kwargs)
        self.slam: tuple[str, int] | None = None
        self.vmms: dict[str, int] = {}
        self.vms: dict[int, dict] = {}
        self._next_vmm = first_vmm_id
        self._next_vm = first_vm_id
        self._lock = threading.Lock()
        #: Seconds to wait before answering (a slow DS).
        self.delay = 0.0

    def handle(self, conn, reader, command, peer) -> None:
        if self.delay:
            time.sleep(self.delay)
        out = codec.Writer(header=False)
        # Each message is recorded before it is answered: a caller that has
        # the reply finds it in ``messages``.
        if command == codec.SLAM_REGISTER_DS:
            fields = _fields(reader, command)
            self.slam = (fields['ip_address'], fields['port'])
            out.write_byte(codec.OK)
        elif command == codec.VMM_REGISTER_DS:
            if self.slam is None:
                # As the original: ERROR before the request is read.
                self.record(command, {'refused': 'no SLAM'}, peer)
                conn.sendall(out.write_byte(codec.ERROR).getvalue())
                return
            fields = _fields(reader, command)
            with self._lock:
                known = fields['ip_address'] in self.vmms
                if not known:
                    vmm_id = self._next_vmm
                    self._next_vmm += 1
                    self.vmms[fields['ip_address']] = vmm_id
            if known:
                fields['refused'] = 'known IP'
                out.write_byte(codec.ERROR)
            else:
                fields['vmm_id'] = vmm_id
                out.write_byte(codec.OK).write_long(vmm_id).write_utf(
                    self.slam[0]).write_int(self.slam[1])
        elif command == codec.VM_REGISTER_DS:
            fields = _fields(reader, command)
            with self._lock:
                vm_id = self._next_vm
                self._next_vm += 1
                self.vms[vm_id] = dict(fields)
            fields['vm_id'] = vm_id
            out.write_long(vm_id)  # a bare long, no status byte
        elif command in (codec.VMM_NOTIFY_DS, codec.VM_NOTIFY_DS,
                         codec.HELPER_NOTIFY_DS):
            fields = _fields(reader, command)
            if command == codec.VM_NOTIFY_DS and fields['vm_id'] in self.vms:
                self.vms[fields['vm_id']]['status'] = fields['status']
        else:
            self.errors.append(f'unexpected command {command}')
            return
        self.record(command, fields, peer)
        reply = out.getvalue()
        if reply:
            conn.sendall(reply)

    def deregister(self, vmm_address, user_id: int) -> None:
        """``DS_VM_DEREGISTER_VMM`` as the original sends it."""
        with socket.create_connection(vmm_address, timeout=TIMEOUT) as sock:
            sock.sendall(request(codec.DS_VM_DEREGISTER_VMM,
                                 user_id=user_id))


class OriginalSlam(_Peer):
    """The original SLAM's socket server, VMM side."""

    name = 'original-slam'

    def handle(self, conn, reader, command, peer) -> None:
        if command != codec.VMM_REGISTER_SLAM:
            self.errors.append(f'unexpected command {command}')
            return
        fields = _fields(reader, command)
        self.record(command, fields, peer)
        conn.sendall(codec.Writer(header=False).write_byte(codec.OK)
                     .getvalue())

    def register_with(self, ds: OriginalDirectoryServer) -> None:
        call(ds.address, request(codec.SLAM_REGISTER_DS,
                                 ip_address=self.address[0],
                                 port=self.port), ['byte'])

    def start_vm(self, vmm_address, user_id: int, os_type: int = 0,
                 vcpus: int = 1, memory_mb: int = 1024, gpu_cores: int = 0,
                 timeout: float = 120) -> list:
        """``SLAM_START_VM_VMM``: ``[status]`` or ``[OK, user, ip]``."""
        frame = request(codec.SLAM_START_VM_VMM, user_id=user_id,
                        os_type=os_type, vcpus=vcpus, memory_mb=memory_mb,
                        gpu_cores=gpu_cores)
        deadline = time.monotonic() + timeout
        with socket.create_connection(vmm_address, timeout=timeout) as sock:
            sock.sendall(frame)
            reader = codec.Reader(codec.SocketSource(sock, deadline))
            reader.read_header()
            status = reader.read_byte()
            if status != codec.OK:
                return [status]
            return [status, reader.read_long(), reader.read_utf()]


class OriginalAs(_Peer):
    """The AS's server port, for the notice before a resize."""

    name = 'original-as'

    def __init__(self, *args, answer: int = codec.OK, delay: float = 0.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.answer = answer
        self.delay = delay

    def _serve(self, conn: socket.socket, peer: str) -> None:
        # The Java AS: new ObjectInputStream (reads the header), new
        # ObjectOutputStream (writes its header), then the command byte
        # with a raw read, a long through the object stream.
        with conn:
            conn.settimeout(TIMEOUT)
            try:
                reader = codec.Reader(codec.SocketSource(
                    conn, time.monotonic() + TIMEOUT))
                reader.read_header()
                conn.sendall(codec.HEADER)
                command = reader.read_raw_byte()
                user_id = reader.read_long()
                self.record(command, {'user_id': user_id}, peer)
                if self.delay:
                    time.sleep(self.delay)
                conn.sendall(codec.Writer(header=False)
                             .write_byte(self.answer).getvalue())
            except (codec.CodecError, OSError) as exc:
                self.errors.append(f'{type(exc).__name__}: {exc}')


def as_register(vmm_address, ip_address: str, status: int = codec.OK,
                timeout: float = TIMEOUT) -> list:
    """The original AS's registration: ``AS_RM_REGISTER_VMM``, the reply
    (OK + user, or ERROR), then its status byte. Returns the reply."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(vmm_address, timeout=timeout) as sock:
        sock.sendall(request(codec.AS_RM_REGISTER_VMM,
                             ip_address=ip_address))
        reader = codec.Reader(codec.SocketSource(sock, deadline))
        reader.read_header()
        reply = [reader.read_byte()]
        if reply[0] == codec.OK:
            reply.append(reader.read_long())
            sock.sendall(codec.Writer(header=False).write_byte(status)
                         .getvalue())
        return reply
