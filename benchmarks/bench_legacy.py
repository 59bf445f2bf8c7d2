"""Benchmark: the legacy RAPID TCP front end (SPEC 9, bench_legacy).

The agent runs as a separate process (``python -m rapid_vmm.cmd.vmm``
in one process) on the local RabbitMQ and libvirt's test hypervisor with
``[legacy] enabled`` on a free local port; this process is the original
SLAM and AS, one TCP connection per request with the original framing
(header, block-data records, ``ArrayList<String>``), as the Java
components do. The baseline is a bare TCP echo of the same frames in its
own process (``_legacy_echo_server.py``): accept, write the stream header,
read the request, write the agent's own reply bytes, close.

- ``start_vm_ms``: p50 of ``SLAM_START_VM_VMM`` for ``--users`` distinct
  users (default 30), one after the other (``as_register_timeout`` 0; each
  makes the qcow2 overlay, defines and starts the domain, reads its IP,
  registers the VM with the DS over RPC and tells the SLAM);
- ``get_vminfo_ms``: ``SLAM_GET_VMINFO_VMM`` for one user (connect, both
  headers, the request, the reply list, close) and ``echo_ms`` the same
  exchange with the echo; medians over ``--calls`` (default 300) taken in
  alternating blocks of 20 after a warm-up; ``get_vminfo_vs_echo`` their
  ratio (target <= 1.5);
- ``connections``: ``--connections`` (default 200) clients connected at
  once (all connections open before any request is sent), each then
  sending ``SLAM_GET_VMINFO_VMM`` for all users; ``refused`` connections
  refused or reset, ``lost`` requests without the complete, correct reply
  (target 0 and 0); ``concurrent_s`` the wall time of the burst.

Run: ``python benchmarks/bench_legacy.py [--calls 300] [--users 30]
[--connections 200]``; ~20-30 s. Prints readable figures, then one JSON
line.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import _common

from rapid_vmm.legacy import codec

TARGET = 1.5
BLOCK = 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def exchange(address, frame: bytes, expected_len: int | None = None,
             timeout: float = 60) -> bytes:
    """One original-style exchange; the reply bytes after the header."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(frame)
        data = bytearray()
        while expected_len is None or len(data) < expected_len:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return bytes(data)


def start_vm(address, user_id: int) -> list:
    frame = codec.encode_request(codec.SLAM_START_VM_VMM, user_id=user_id,
                                 os_type=0, vcpus=1, memory_mb=1024,
                                 gpu_cores=0)
    data = exchange(address, frame)
    reader = codec.Reader(codec.BufferSource(data))
    reader.read_header()
    status = reader.read_byte()
    if status != codec.OK:
        raise RuntimeError(f'START_VM of user {user_id} answered {status}')
    return [status, reader.read_long(), reader.read_utf()]


class Echo:
    """A helper server process that prints ``ready <port>``."""

    script = '_legacy_echo_server.py'

    def __init__(self, ws, *args: str):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              self.script)
        self.process = subprocess.Popen(
            [sys.executable, script, *args], stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        ws.add_stopper(self.stop)
        line = self.process.stdout.readline().split()
        if len(line) != 2 or line[0] != 'ready':
            raise RuntimeError(f'{self.script} did not start: {line!r}')
        self.address = ('127.0.0.1', int(line[1]))

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


class Stub(Echo):
    script = '_legacy_stub_server.py'


def echo_of(ws, request: bytes, reply: bytes) -> Echo:
    return Echo(ws, '--request-bytes', str(len(request)), '--reply',
                reply[len(codec.HEADER):].hex())


def burst(address, frame: bytes, expected: bytes, count: int) -> dict:
    """``count`` connections open at once, then one request on each."""
    socks, refused = [], 0
    for _ in range(count):
        try:
            sock = socket.create_connection(address, timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(sock)
        except OSError:
            refused += 1
    results = [None] * len(socks)
    go = threading.Barrier(len(socks) + 1)

    def client(index, sock):
        go.wait()
        data = bytearray()
        try:
            sock.sendall(frame)
            while len(data) < len(expected):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            results[index] = f'{type(exc).__name__}'
            return
        finally:
            sock.close()
        results[index] = bytes(data) == expected

    threads = [threading.Thread(target=client, args=(i, s))
               for i, s in enumerate(socks)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    go.wait()
    for thread in threads:
        thread.join(60)
    seconds = time.monotonic() - started
    resets = sum(1 for r in results if isinstance(r, str))
    return {'open': len(socks), 'refused': refused + resets,
            'lost': sum(1 for r in results if r is not True),
            'seconds': seconds}


def main(argv) -> int:
    parser = _common.arg_parser(__doc__)
    parser.add_argument('--calls', type=int, default=300)
    parser.add_argument('--users', type=int, default=30)
    parser.add_argument('--connections', type=int, default=200)
    args = parser.parse_args(argv)
    _common.setup_logging(args.verbose)

    port = free_port()
    with _common.Workspace('legacy') as ws:
        agent = _common.AgentProcess(
            ws, 'legacy', report_interval=10, reconcile_interval=60,
            helper_vm_count=0, as_register_timeout=0,
            **{'legacy.enabled': True, 'legacy.bind_host': '127.0.0.1',
               'legacy.port': port,
               'legacy.allowed_peers': ['127.0.0.0/8']})
        startup_s = agent.start()
        agent.wait_registered()
        address = ('127.0.0.1', port)

        # -- start_vm over TCP ------------------------------------------
        start_ms = [_common.timed_ms(start_vm, address, user)
                    for user in range(1, args.users + 1)]
        running_ms = [_common.timed_ms(start_vm, address, 1)
                      for _ in range(10)]

        # -- get_vminfo vs echo -------------------------------------------
        user = max(1, args.users // 2)
        request = codec.encode_request(codec.SLAM_GET_VMINFO_VMM,
                                       user_id=user)
        reply = exchange(address, request)
        values = codec.decode(reply, ['byte', 'list'])
        if values[0] != codec.OK or values[1][0] != str(user):
            raise RuntimeError(f'unexpected GET_VMINFO reply {values!r}')
        echo = echo_of(ws, request, reply)
        records = agent.api.get_vm_info({}, user_id=user)
        stub = Stub(ws, '--records', json.dumps(records))
        stub_address = ('127.0.0.1', int(stub.address[1]))
        if exchange(stub_address, request, len(reply)) != reply:
            raise RuntimeError('the stub front end answers other bytes')
        if exchange(echo.address, request, len(reply)) != reply:
            raise RuntimeError('the echo does not answer the same bytes')

        def info():
            if exchange(address, request, len(reply)) != reply:
                raise RuntimeError('GET_VMINFO reply changed')

        def bare():
            exchange(echo.address, request, len(reply))

        def front_end():
            exchange(stub_address, request, len(reply))

        for _ in range(BLOCK):
            info()
            bare()
            front_end()
        info_ms, echo_ms, stub_ms = [], [], []
        while len(info_ms) < args.calls:
            block = min(BLOCK, args.calls - len(info_ms))
            info_ms += [_common.timed_ms(info) for _ in range(block)]
            echo_ms += [_common.timed_ms(bare) for _ in range(block)]
            stub_ms += [_common.timed_ms(front_end) for _ in range(block)]

        # -- concurrent connections ----------------------------------------
        all_request = codec.encode_request(codec.SLAM_GET_VMINFO_VMM,
                                           user_id=0)
        all_reply = exchange(address, all_request)
        records = len(codec.decode(all_reply, ['byte', 'list'])[1]) // 6
        concurrent = burst(address, all_request, all_reply,
                           args.connections)
        echo_burst = burst(echo_of(ws, all_request, all_reply).address,
                           all_request, all_reply, args.connections)
        errors = len(agent.log_lines(' ERROR ')) + len(
            agent.log_lines('Traceback'))
        stop_s = agent.stop()

    info_med = statistics.median(info_ms)
    echo_med = statistics.median(echo_ms)
    stub_med = statistics.median(stub_ms)
    ratio = info_med / echo_med
    met = (ratio <= TARGET and concurrent['refused'] == 0 and
           concurrent['lost'] == 0 and
           concurrent['open'] == args.connections)
    result = {
        'get_vminfo_ms': round(info_med, 3),
        'echo_ms': round(echo_med, 3),
        'get_vminfo_vs_echo': round(ratio, 2),
        'get_vminfo_p90_ms': round(_common.percentile(info_ms, 90), 3),
        'echo_p90_ms': round(_common.percentile(echo_ms, 90), 3),
        'front_end_ms': round(stub_med, 3),
        'front_end_vs_echo': round(stub_med / echo_med, 2),
        'start_vm_ms': round(statistics.median(start_ms), 1),
        'start_vm_p90_ms': round(_common.percentile(start_ms, 90), 1),
        'start_vm_running_ms': round(statistics.median(running_ms), 2),
        'connections': concurrent['open'],
        'refused': concurrent['refused'],
        'lost': concurrent['lost'],
        'concurrent_s': round(concurrent['seconds'], 3),
        'echo_concurrent_s': round(echo_burst['seconds'], 3),
        'concurrent_records': records,
        'agent_error_lines': errors,
        'users': args.users,
        'calls': len(info_ms),
        'agent_startup_s': round(startup_s, 2),
        'agent_stop_s': round(stop_s, 2) if stop_s is not None else None,
        'statistic': 'median of sequential exchanges (one connection '
                     f'each), alternating blocks of {BLOCK}',
        'target': {'get_vminfo_vs_echo': f'<= {TARGET:g}',
                   'connections': args.connections, 'refused': 0,
                   'lost': 0},
        'target_met': met,
        **_common.machine(),
    }
    print('Legacy front end: agent process, original framing over TCP')
    print(f'  GET_VMINFO(user)   p50 {info_med:7.3f} ms  p90 '
          f'{result["get_vminfo_p90_ms"]:7.3f} ms  (n={len(info_ms)})')
    print(f'  bare TCP echo      p50 {echo_med:7.3f} ms  p90 '
          f'{result["echo_p90_ms"]:7.3f} ms  (same frames)')
    print(f'  front end, stub API p50 {stub_med:6.3f} ms  (the front end '
          f'alone: {stub_med / echo_med:.2f} x echo)')
    print(f'  get_vminfo_vs_echo     {ratio:7.2f}     (target <= '
          f'{TARGET:g}: {_common.verdict(ratio <= TARGET)})')
    print(f'  {concurrent["open"]} connections at once: {concurrent["lost"]}'
          f' lost, {concurrent["refused"]} refused, '
          f'{concurrent["seconds"]:.3f} s (echo {echo_burst["seconds"]:.3f}'
          f' s; {records} records each)')
    print(f'  START_VM           p50 {result["start_vm_ms"]:7.1f} ms  p90 '
          f'{result["start_vm_p90_ms"]:7.1f} ms  ({args.users} users; '
          f'already running: {result["start_vm_running_ms"]:.2f} ms)')
    return _common.emit(result)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
