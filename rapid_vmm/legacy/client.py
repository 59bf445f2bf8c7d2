"""One bounded exchange with a peer that speaks the original protocol.

The original components open a connection per message: each side writes
its stream header, the caller writes one request, the callee answers (or
not, for notifications) and closes. :func:`exchange` does that within one
deadline for connecting, writing and reading, and maps every failure to
the two peer errors of :mod:`rapid_vmm.peers`:

* :class:`~rapid_vmm.exception.PeerUnavailable` - refused, timed out,
  reset or closed early: the message may not have arrived;
* :class:`~rapid_vmm.exception.PeerRejected` - the peer answered, but
  with an ERROR byte or a reply that is not the expected frame.
"""

from collections.abc import Callable
import math
import socket
import time
from typing import Any

from rapid_vmm import exception
from rapid_vmm.legacy import codec


def exchange(peer: str, method: str, address: tuple[str, int],
             frame: bytes, timeout: float,
             read_reply: Callable[[codec.Reader], Any] | None = None,
             limits: codec.Limits = codec.DEFAULT_LIMITS,
             connect_timeout: float | None = None) -> Any:
    """Send ``frame`` (a whole stream, header first) and read the reply.

    :param read_reply: reads the reply after the peer's header; None for a
        notification: the peer then only has to close the connection (the
        original DS closes it once it handled the message).
    :param timeout: bounds the whole exchange.
    :param connect_timeout: bounds the connection (default ``timeout``).
    :returns: what ``read_reply`` returns (None for a notification).
    """
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection(
            address, timeout=min(connect_timeout or timeout, timeout))
    except OSError as exc:
        raise exception.PeerUnavailable(
            peer=peer, method=method,
            reason=f'cannot connect to {address[0]}:{address[1]}: '
                   f'{_why(exc)}') from None
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.sendall(frame)
        source = codec.SocketSource(sock, deadline, limits)
        reader = codec.Reader(source, limits)
        reader.read_header()
        if read_reply is None:
            source.wait_closed()
            return None
        return read_reply(reader)
    except (codec.ReadTimeout, codec.Truncated, OSError) as exc:
        raise exception.PeerUnavailable(
            peer=peer, method=method,
            reason=f'{address[0]}:{address[1]}: {_why(exc)}') from None
    except codec.CodecError as exc:
        raise exception.PeerRejected(
            peer=peer, method=method,
            reason=f'{address[0]}:{address[1]} sent an unusable reply: '
                   f'{exc}') from None
    finally:
        sock.close()


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return 'timed out'
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def java_int(value: Any, low: int = codec.INT_MIN,
             high: int = codec.INT_MAX) -> int:
    """A figure as the original puts it on the wire: ``(int) value``
    (truncated toward zero), None and NaN as 0, clamped to the range."""
    if value is None or isinstance(value, bool):
        return int(bool(value))
    if isinstance(value, float):
        if math.isnan(value):
            return 0
        if math.isinf(value):
            return high if value > 0 else low
        value = math.trunc(value)
    return max(low, min(high, int(value)))


def java_long(value: Any) -> int:
    return java_int(value, codec.LONG_MIN, codec.LONG_MAX)
