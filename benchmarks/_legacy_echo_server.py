"""A bare TCP echo of the legacy frames: bench_legacy's baseline process.

Run as ``python benchmarks/_legacy_echo_server.py --request-bytes N
--reply HEX``: it listens on 127.0.0.1 (a free port), writes
``ready <port>`` on stdout, and for each connection does exactly the
socket work of the legacy front end and nothing else: accept, write the
stream header, read a request of ``N`` bytes, write the reply bytes
(the agent's own reply to the same request, captured by the benchmark),
close. One selector thread, no decoding, no VMM behind it. SIGTERM or
SIGINT stops it.
"""

import argparse
import selectors
import signal
import socket
import sys
import threading

HEADER = b'\xac\xed\x00\x05'


def main(argv) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--request-bytes', type=int, required=True)
    parser.add_argument('--reply', required=True, help='hex of the reply')
    args = parser.parse_args(argv)
    reply = bytes.fromhex(args.reply)
    listener = socket.create_server(('127.0.0.1', 0), backlog=1024)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f'ready {listener.getsockname()[1]}', flush=True)
    buffers: dict[socket.socket, bytearray] = {}
    while not stop.is_set():
        for key, _mask in selector.select(0.5):
            if key.data is None:
                while True:
                    try:
                        conn, _addr = listener.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,
                                    1)
                    conn.send(HEADER)
                    buffers[conn] = bytearray()
                    selector.register(conn, selectors.EVENT_READ, 'conn')
                continue
            conn = key.fileobj
            try:
                data = conn.recv(65536)
            except OSError:
                data = b''
            buffer = buffers[conn]
            buffer += data
            if data and len(buffer) < args.request_bytes:
                continue
            selector.unregister(conn)
            del buffers[conn]
            if data:
                conn.setblocking(True)
                try:
                    conn.sendall(reply)
                except OSError:
                    pass
            conn.close()
    listener.close()
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
