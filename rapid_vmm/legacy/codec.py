"""The framing of the original RAPID TCP protocol.

The original components talk through ``java.io.ObjectOutputStream`` and
``ObjectInputStream`` on each socket (SPEC section 7, and the reference
streams in ``legacy-vectors/``). Each side first writes the stream header
``AC ED 00 05``; primitives (``writeByte``, ``writeInt``, ``writeLong``,
``writeUTF``) then travel in block-data records (``0x77`` + 1-byte length,
or ``0x7A`` + 4-byte length, at most 1024 bytes each); a list is a
serialized ``java.util.ArrayList`` of ``String`` (its class descriptor, the
``size`` field, a block with the capacity, the items as ``TC_STRING`` or as
back-references ``TC_REFERENCE`` to a string seen before, then
``TC_ENDBLOCKDATA``). The notice to an AS before a resize has its command
byte on the raw stream, outside any block.

This module reads and writes exactly these records and nothing else: any
other record, and an object of any other class, is a :class:`CodecError`.
It never deserializes an object. Every read is bounded by
:class:`Limits` (frame size, string length, list length) and, on a socket,
by a deadline.

* :class:`Writer` - builds a stream (``write_byte`` ... ``getvalue()``);
* :class:`Reader` - reads one from a :class:`BufferSource` (bytes) or a
  :class:`SocketSource` (a socket with a deadline);
* :func:`encode` / :func:`decode` - a whole stream from or to a list of
  values, after a *layout* (``['byte', 'long', 'utf']``, kinds
  :data:`KINDS`);
* :data:`REQUESTS` - the fields of each request the protocol knows, with
  :func:`encode_request` / :func:`read_request`.
"""

import dataclasses
import socket
import struct
import time
from typing import Any

from rapid_vmm import exception

HEADER = b'\xac\xed\x00\x05'

TC_NULL = 0x70
TC_REFERENCE = 0x71
TC_CLASSDESC = 0x72
TC_OBJECT = 0x73
TC_STRING = 0x74
TC_ARRAY = 0x75
TC_CLASS = 0x76
TC_BLOCKDATA = 0x77
TC_ENDBLOCKDATA = 0x78
TC_RESET = 0x79
TC_BLOCKDATALONG = 0x7A
TC_EXCEPTION = 0x7B
TC_LONGSTRING = 0x7C
TC_PROXYCLASSDESC = 0x7D
TC_ENUM = 0x7E

TC_NAMES = {TC_NULL: 'TC_NULL', TC_REFERENCE: 'TC_REFERENCE',
            TC_CLASSDESC: 'TC_CLASSDESC', TC_OBJECT: 'TC_OBJECT',
            TC_STRING: 'TC_STRING', TC_ARRAY: 'TC_ARRAY',
            TC_CLASS: 'TC_CLASS', TC_BLOCKDATA: 'TC_BLOCKDATA',
            TC_ENDBLOCKDATA: 'TC_ENDBLOCKDATA', TC_RESET: 'TC_RESET',
            TC_BLOCKDATALONG: 'TC_BLOCKDATALONG',
            TC_EXCEPTION: 'TC_EXCEPTION', TC_LONGSTRING: 'TC_LONGSTRING',
            TC_PROXYCLASSDESC: 'TC_PROXYCLASSDESC', TC_ENUM: 'TC_ENUM'}

#: First handle of a stream (``ObjectStreamConstants.baseWireHandle``).
BASE_HANDLE = 0x7E0000
#: Longest block ``ObjectOutputStream`` writes.
MAX_BLOCK = 1024
#: Longest class or field name read (they are compared with known ones).
MAX_NAME_BYTES = 256

SC_WRITE_METHOD = 0x01
SC_SERIALIZABLE = 0x02

ARRAYLIST_CLASS = 'java.util.ArrayList'
ARRAYLIST_SUID = 8683452581122892189
ARRAYLIST_FLAGS = SC_WRITE_METHOD | SC_SERIALIZABLE

# -- message numbers (eu.project.rapid.common.RapidMessages) ---------------

ERROR = 0
OK = 1
AS_RM_REGISTER_VMM = 38
AS_RM_NOTIFY_VMM = 39
DS_MIGRATION_VM_AS = 57
SLAM_START_VM_VMM = 60
VMM_REGISTER_SLAM = 61
SLAM_GET_VMCPU_VMM = 62
SLAM_GET_VMINFO_VMM = 63
SLAM_CHANGE_VMFLV_VMM = 64
SLAM_CONFIRM_VMFLV_VMM = 65
SLAM_GET_VMMEM_VMM = 66
SLAM_GET_VMDISK_VMM = 67
VMM_REGISTER_DS = 70
VMM_NOTIFY_DS = 71
VM_REGISTER_DS = 72
VM_NOTIFY_DS = 73
HELPER_NOTIFY_DS = 74
DS_VM_DEREGISTER_VMM = 75
SLAM_REGISTER_DS = 90

#: The kinds of values a layout may hold.
KINDS = ('byte', 'int', 'long', 'utf', 'list', 'raw')

#: Fields after the command byte of each request (in wire order).
REQUESTS: dict[int, tuple[tuple[str, str], ...]] = {
    SLAM_START_VM_VMM: (('user_id', 'long'), ('os_type', 'int'),
                        ('vcpus', 'int'), ('memory_mb', 'int'),
                        ('gpu_cores', 'int')),
    SLAM_GET_VMCPU_VMM: (('user_id', 'long'),),
    SLAM_GET_VMINFO_VMM: (('user_id', 'long'),),
    SLAM_GET_VMMEM_VMM: (('user_id', 'long'),),
    SLAM_GET_VMDISK_VMM: (('user_id', 'long'),),
    SLAM_CHANGE_VMFLV_VMM: (('user_id', 'long'), ('vcpus', 'int'),
                            ('memory_mb', 'int'), ('disk_gb', 'int')),
    SLAM_CONFIRM_VMFLV_VMM: (('user_id', 'long'),),
    AS_RM_REGISTER_VMM: (('ip_address', 'utf'),),
    AS_RM_NOTIFY_VMM: (('user_id', 'long'), ('type', 'int')),
    DS_VM_DEREGISTER_VMM: (('user_id', 'long'),),
    VMM_REGISTER_SLAM: (('ip_address', 'utf'), ('port', 'int')),
    VMM_REGISTER_DS: (('ip_address', 'utf'), ('mac_type', 'int'),
                      ('cpu_load', 'int'), ('cpu_count', 'int'),
                      ('free_memory_mb', 'long'), ('gpu_load', 'int'),
                      ('gpu_cores', 'int'), ('available_types', 'utf')),
    VMM_NOTIFY_DS: (('vmm_id', 'long'), ('cpu_load', 'int'),
                    ('free_memory_mb', 'long'), ('gpu_load', 'int')),
    VM_REGISTER_DS: (('vmm_id', 'long'), ('category', 'int'),
                     ('vm_type', 'int'), ('user_id', 'long'),
                     ('status', 'int')),
    VM_NOTIFY_DS: (('vm_id', 'long'), ('status', 'int')),
    HELPER_NOTIFY_DS: (('vm_id', 'long'), ('ip_address', 'utf')),
    SLAM_REGISTER_DS: (('ip_address', 'utf'), ('port', 'int')),
}

COMMAND_NAMES = {
    AS_RM_REGISTER_VMM: 'AS_RM_REGISTER_VMM',
    AS_RM_NOTIFY_VMM: 'AS_RM_NOTIFY_VMM',
    DS_MIGRATION_VM_AS: 'DS_MIGRATION_VM_AS',
    SLAM_START_VM_VMM: 'SLAM_START_VM_VMM',
    VMM_REGISTER_SLAM: 'VMM_REGISTER_SLAM',
    SLAM_GET_VMCPU_VMM: 'SLAM_GET_VMCPU_VMM',
    SLAM_GET_VMINFO_VMM: 'SLAM_GET_VMINFO_VMM',
    SLAM_CHANGE_VMFLV_VMM: 'SLAM_CHANGE_VMFLV_VMM',
    SLAM_CONFIRM_VMFLV_VMM: 'SLAM_CONFIRM_VMFLV_VMM',
    SLAM_GET_VMMEM_VMM: 'SLAM_GET_VMMEM_VMM',
    SLAM_GET_VMDISK_VMM: 'SLAM_GET_VMDISK_VMM',
    VMM_REGISTER_DS: 'VMM_REGISTER_DS',
    VMM_NOTIFY_DS: 'VMM_NOTIFY_DS',
    VM_REGISTER_DS: 'VM_REGISTER_DS',
    VM_NOTIFY_DS: 'VM_NOTIFY_DS',
    HELPER_NOTIFY_DS: 'HELPER_NOTIFY_DS',
    DS_VM_DEREGISTER_VMM: 'DS_VM_DEREGISTER_VMM',
    SLAM_REGISTER_DS: 'SLAM_REGISTER_DS',
}

INT_MIN, INT_MAX = -2 ** 31, 2 ** 31 - 1
LONG_MIN, LONG_MAX = -2 ** 63, 2 ** 63 - 1

_BYTE = struct.Struct('>b')
_SHORT = struct.Struct('>H')
_INT = struct.Struct('>i')
_LONG = struct.Struct('>q')


# -- errors --------------------------------------------------------------

class CodecError(exception.RapidVmmException):
    """A frame of the legacy protocol is malformed, too large or not a
    record this codec reads. Nothing was acted upon."""

    msg_fmt = 'Bad legacy frame: %(reason)s'


class Truncated(CodecError):
    """The stream ended before the frame did."""

    msg_fmt = 'Truncated legacy frame: %(reason)s'


class FrameTooLarge(CodecError):
    """A frame, block, string or list is over its limit."""

    msg_fmt = 'Legacy frame over its limit: %(reason)s'


class ReadTimeout(CodecError):
    """The peer did not send the whole frame before the deadline."""

    msg_fmt = 'Legacy frame not received in time: %(reason)s'


class UnknownCommand(CodecError):
    """A command byte this protocol does not have."""

    msg_fmt = 'Unknown legacy command %(command)s'


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds of one stream (see the ``[legacy]`` options)."""

    max_frame_bytes: int = 65536
    max_string_bytes: int = 8192
    max_list_items: int = 65536

    @classmethod
    def from_conf(cls, conf) -> 'Limits':
        group = conf.legacy
        return cls(max_frame_bytes=group.max_frame_bytes,
                   max_string_bytes=group.max_string_bytes,
                   max_list_items=group.max_list_items)


DEFAULT_LIMITS = Limits()


# -- modified UTF-8 ------------------------------------------------------

def encode_mutf8(text: str) -> bytes:
    """``DataOutput.writeUTF``'s body: modified UTF-8 of UTF-16 units."""
    if text.isascii() and '\x00' not in text:
        return text.encode('ascii')
    units = text.encode('utf-16-be', 'surrogatepass')
    out = bytearray()
    for index in range(0, len(units), 2):
        unit = (units[index] << 8) | units[index + 1]
        if 0x0001 <= unit <= 0x007F:
            out.append(unit)
        elif unit <= 0x07FF:
            out += bytes((0xC0 | (unit >> 6), 0x80 | (unit & 0x3F)))
        else:
            out += bytes((0xE0 | (unit >> 12), 0x80 | ((unit >> 6) & 0x3F),
                          0x80 | (unit & 0x3F)))
    return bytes(out)


def decode_mutf8(data: bytes) -> str:
    """What ``DataInput.readUTF`` makes of ``data`` (it accepts what Java
    accepts, e.g. a raw 0x00); :raises CodecError: when Java would."""
    if data.isascii():
        return data.decode('ascii')
    units = bytearray()
    index, end = 0, len(data)
    while index < end:
        first = data[index]
        high = first >> 4
        if high < 8:
            unit = first
            index += 1
        elif high in (12, 13):
            if index + 2 > end:
                raise CodecError(reason='modified UTF-8 ends inside a '
                                        'character')
            second = data[index + 1]
            if second & 0xC0 != 0x80:
                raise CodecError(reason=f'malformed modified UTF-8 around '
                                        f'byte {index}')
            unit = ((first & 0x1F) << 6) | (second & 0x3F)
            index += 2
        elif high == 14:
            if index + 3 > end:
                raise CodecError(reason='modified UTF-8 ends inside a '
                                        'character')
            second, third = data[index + 1], data[index + 2]
            if second & 0xC0 != 0x80 or third & 0xC0 != 0x80:
                raise CodecError(reason=f'malformed modified UTF-8 around '
                                        f'byte {index}')
            unit = (((first & 0x0F) << 12) | ((second & 0x3F) << 6) |
                    (third & 0x3F))
            index += 3
        else:
            raise CodecError(reason=f'malformed modified UTF-8 around byte '
                                    f'{index}')
        units += unit.to_bytes(2, 'big')
    return bytes(units).decode('utf-16-be', 'surrogatepass')


# -- sources -------------------------------------------------------------

class BufferSource:
    """Bytes already received (a reference stream, or what a connection
    has sent so far: :class:`Truncated` then means "not all there yet")."""

    def __init__(self, data: bytes, limits: Limits = DEFAULT_LIMITS):
        if len(data) > limits.max_frame_bytes:
            raise FrameTooLarge(reason=f'{len(data)} bytes, at most '
                                       f'{limits.max_frame_bytes}')
        self._data = memoryview(data)
        self.position = 0

    def read(self, count: int) -> bytes:
        end = self.position + count
        if end > len(self._data):
            raise Truncated(reason=f'{count} more bytes wanted at offset '
                                   f'{self.position}, '
                                   f'{len(self._data) - self.position} left')
        chunk = bytes(self._data[self.position:end])
        self.position = end
        return chunk

    def at_end(self) -> bool:
        return self.position == len(self._data)


class SocketSource:
    """A socket read with a deadline and a byte budget.

    :param deadline: ``time.monotonic()`` by which every byte must be in.
    """

    def __init__(self, sock: socket.socket, deadline: float,
                 limits: Limits = DEFAULT_LIMITS):
        self._sock = sock
        self._deadline = deadline
        self._budget = limits.max_frame_bytes
        self._buffer = bytearray()
        self.position = 0

    def read(self, count: int) -> bytes:
        if self.position + count > self._budget:
            raise FrameTooLarge(reason=f'more than {self._budget} bytes')
        while len(self._buffer) < count:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise ReadTimeout(reason='deadline passed')
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(max(4096, count))
            except TimeoutError:
                raise ReadTimeout(reason='deadline passed') from None
            except OSError as exc:
                raise Truncated(reason=f'connection lost: {exc}') from None
            if not chunk:
                raise Truncated(reason='the peer closed the connection')
            self._buffer += chunk
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        self.position += count
        return data

    def wait_closed(self) -> bool:
        """Read until the peer closes; True on a clean close, False when
        it sent more data (dropped) first. :raises ReadTimeout:,
        :raises Truncated: (reset)."""
        extra = bool(self._buffer)
        self._buffer.clear()
        while True:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise ReadTimeout(reason='the peer did not close in time')
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(4096)
            except TimeoutError:
                raise ReadTimeout(
                    reason='the peer did not close in time') from None
            except OSError as exc:
                raise Truncated(reason=f'connection lost: {exc}') from None
            if not chunk:
                return not extra
            extra = True


# -- reading -------------------------------------------------------------

class Reader:
    """Reads one object stream: primitives across block boundaries (as
    ``ObjectInputStream`` does), the raw byte, and ``ArrayList<String>``."""

    def __init__(self, source, limits: Limits = DEFAULT_LIMITS):
        self._src = source
        self._limits = limits
        self._block_left = 0
        # Handle table: ('desc', None), ('list', None) or ('str', value).
        self._handles: list[tuple[str, Any]] = []

    # -- records ------------------------------------------------------------

    def read_header(self) -> None:
        header = self._src.read(4)
        if header != HEADER:
            raise CodecError(reason=f'stream header {header.hex()} is not '
                                    f'{HEADER.hex()}')

    def _next_block(self) -> None:
        while True:
            code = self._src.read(1)[0]
            if code == TC_BLOCKDATA:
                length = self._src.read(1)[0]
            elif code == TC_BLOCKDATALONG:
                length = _INT.unpack(self._src.read(4))[0]
                if length < 0:
                    raise CodecError(reason=f'negative block length '
                                            f'{length}')
            else:
                raise CodecError(reason=f'{_name(code)} where primitive '
                                        'data was expected')
            if length > self._limits.max_frame_bytes:
                raise FrameTooLarge(reason=f'block of {length} bytes')
            if length:
                self._block_left = length
                return

    def _primitive(self, count: int) -> bytes:
        if self._block_left >= count:
            self._block_left -= count
            return self._src.read(count)
        out = bytearray()
        while count:
            if not self._block_left:
                self._next_block()
            take = min(count, self._block_left)
            out += self._src.read(take)
            self._block_left -= take
            count -= take
        return bytes(out)

    def read_byte(self) -> int:
        return _BYTE.unpack(self._primitive(1))[0]

    def read_int(self) -> int:
        return _INT.unpack(self._primitive(4))[0]

    def read_long(self) -> int:
        return _LONG.unpack(self._primitive(8))[0]

    def read_utf(self) -> str:
        length = _SHORT.unpack(self._primitive(2))[0]
        if length > self._limits.max_string_bytes:
            raise FrameTooLarge(reason=f'string of {length} bytes, at most '
                                       f'{self._limits.max_string_bytes}')
        return decode_mutf8(self._primitive(length))

    def read_raw_byte(self) -> int:
        """A byte written on the raw socket stream, outside any block."""
        self._at_record('a raw byte')
        return _BYTE.unpack(self._src.read(1))[0]

    def _at_record(self, what: str) -> None:
        if self._block_left:
            raise CodecError(reason=f'{what} inside a block of primitive '
                                    'data')

    def read_string_list(self) -> list[str]:
        """A serialized ``java.util.ArrayList`` of ``String``."""
        self._at_record('a list')
        code = self._src.read(1)[0]
        if code != TC_OBJECT:
            raise CodecError(reason=f'{_name(code)} where an ArrayList was '
                                    'expected')
        self._read_list_desc()
        self._handles.append(('list', None))
        size = _INT.unpack(self._src.read(4))[0]
        if size < 0:
            raise CodecError(reason=f'list size {size}')
        if size > self._limits.max_list_items:
            raise FrameTooLarge(reason=f'list of {size} items, at most '
                                       f'{self._limits.max_list_items}')
        capacity = self.read_int()
        if capacity < 0:
            raise CodecError(reason=f'list capacity {capacity}')
        if self._block_left:
            raise CodecError(reason='unexpected data after the list '
                                    'capacity')
        items = [self._read_string_item() for _ in range(size)]
        code = self._src.read(1)[0]
        if code != TC_ENDBLOCKDATA:
            raise CodecError(reason=f'{_name(code)} after the {size} list '
                                    'items')
        return items

    def _read_list_desc(self) -> None:
        code = self._src.read(1)[0]
        if code == TC_REFERENCE:
            kind, _ = self._reference()
            if kind != 'desc':
                raise CodecError(reason='a class reference to a non-class')
            return
        if code != TC_CLASSDESC:
            raise CodecError(reason=f'{_name(code)} where a class '
                                    'descriptor was expected')
        name = self._raw_utf()
        if name != ARRAYLIST_CLASS:
            raise CodecError(reason=f'object of class {name[:100]!r}: only '
                                    f'{ARRAYLIST_CLASS} of String is read')
        suid = _LONG.unpack(self._src.read(8))[0]
        if suid != ARRAYLIST_SUID:
            raise CodecError(reason=f'{ARRAYLIST_CLASS} serialVersionUID '
                                    f'{suid}')
        self._handles.append(('desc', None))
        flags = self._src.read(1)[0]
        count = _SHORT.unpack(self._src.read(2))[0]
        if flags != ARRAYLIST_FLAGS or count != 1:
            raise CodecError(reason=f'{ARRAYLIST_CLASS} descriptor flags '
                                    f'{flags:#x}, {count} fields')
        if self._src.read(1) != b'I' or self._raw_utf() != 'size':
            raise CodecError(reason=f'{ARRAYLIST_CLASS} field is not '
                                    '"int size"')
        annotation = self._src.read(1)[0]
        if annotation != TC_ENDBLOCKDATA:
            raise CodecError(reason='class annotation of '
                                    f'{ARRAYLIST_CLASS}: {_name(annotation)}')
        superclass = self._src.read(1)[0]
        if superclass != TC_NULL:
            raise CodecError(reason=f'{ARRAYLIST_CLASS} with a '
                                    f'superclass: {_name(superclass)}')

    def _read_string_item(self) -> str:
        code = self._src.read(1)[0]
        if code == TC_STRING:
            length = _SHORT.unpack(self._src.read(2))[0]
        elif code == TC_LONGSTRING:
            length = _LONG.unpack(self._src.read(8))[0]
            if length < 0:
                raise CodecError(reason=f'string length {length}')
        elif code == TC_REFERENCE:
            kind, value = self._reference()
            if kind != 'str':
                raise CodecError(reason='a list item refers to a '
                                        'non-string')
            return value
        else:
            raise CodecError(reason=f'list item {_name(code)}: only '
                                    'strings are read')
        if length > self._limits.max_string_bytes:
            raise FrameTooLarge(reason=f'string of {length} bytes, at most '
                                       f'{self._limits.max_string_bytes}')
        value = decode_mutf8(self._src.read(length))
        self._handles.append(('str', value))
        return value

    def _raw_utf(self) -> str:
        # A class or field name: only short known names are accepted.
        length = _SHORT.unpack(self._src.read(2))[0]
        if length > MAX_NAME_BYTES:
            raise FrameTooLarge(reason=f'name of {length} bytes')
        return decode_mutf8(self._src.read(length))

    def _reference(self) -> tuple[str, Any]:
        handle = _INT.unpack(self._src.read(4))[0] - BASE_HANDLE
        if not 0 <= handle < len(self._handles):
            raise CodecError(reason=f'reference to unknown handle '
                                    f'{handle + BASE_HANDLE:#x}')
        return self._handles[handle]

    def read(self, kind: str) -> Any:
        """One value of a layout kind (see :data:`KINDS`)."""
        try:
            return self._READERS[kind](self)
        except KeyError:
            raise ValueError(f'unknown kind {kind!r}') from None

    def at_end(self) -> bool:
        return self._block_left == 0 and self._src.at_end()

    _READERS = {'byte': read_byte, 'int': read_int, 'long': read_long,
                'utf': read_utf, 'list': read_string_list,
                'raw': read_raw_byte}


def _name(code: int) -> str:
    return TC_NAMES.get(code, f'byte {code:#04x}')


# -- writing -------------------------------------------------------------

class Writer:
    """Builds an object stream as ``ObjectOutputStream`` writes it: the
    header, primitives in blocks of at most 1024 bytes, lists, raw bytes.

    Equal strings of a stream are written once and referred to after
    (``TC_REFERENCE``), as Java does for one String instance.
    """

    def __init__(self, header: bool = True):
        self._out = bytearray(HEADER if header else b'')
        self._block = bytearray()
        self._next_handle = 0
        self._list_desc: int | None = None
        self._strings: dict[str, int] = {}

    def write_byte(self, value: int) -> 'Writer':
        self._block += _BYTE.pack(_check(value, -128, 127, 'byte'))
        return self

    def write_int(self, value: int) -> 'Writer':
        self._block += _INT.pack(_check(value, INT_MIN, INT_MAX, 'int'))
        return self

    def write_long(self, value: int) -> 'Writer':
        self._block += _LONG.pack(_check(value, LONG_MIN, LONG_MAX, 'long'))
        return self

    def write_utf(self, value: str) -> 'Writer':
        data = encode_mutf8(value)
        if len(data) > 0xFFFF:
            raise ValueError(f'writeUTF of {len(data)} bytes')
        self._block += _SHORT.pack(len(data)) + data
        return self

    def write_raw_byte(self, value: int) -> 'Writer':
        self._drain()
        self._out += _BYTE.pack(_check(value, -128, 127, 'byte'))
        return self

    def write_string_list(self, items: list[str]) -> 'Writer':
        self._drain()
        out = self._out
        if self._list_desc is None:
            out += _ARRAYLIST_DESC
            self._list_desc = self._assign()
        else:
            out.append(TC_OBJECT)
            out.append(TC_REFERENCE)
            out += _INT.pack(BASE_HANDLE + self._list_desc)
        self._assign()
        size = _INT.pack(len(items))
        # The size field, then writeObject's block with the capacity.
        out += size + b'\x77\x04' + size
        strings = self._strings
        pack_short, pack_int = _SHORT.pack, _INT.pack
        parts = []  # joined once: a reply is built at every request
        append = parts.append
        next_handle = self._next_handle
        for item in items:
            handle = strings.get(item)
            if handle is not None:
                append(b'\x71' + pack_int(BASE_HANDLE + handle))
                continue
            if not isinstance(item, str):
                raise TypeError(f'list item {item!r} is not a string')
            data = encode_mutf8(item)
            if len(data) <= 0xFFFF:
                append(b'\x74' + pack_short(len(data)))
            else:
                append(b'\x7c' + _LONG.pack(len(data)))
            append(data)
            strings[item] = next_handle
            next_handle += 1
        self._next_handle = next_handle
        out += b''.join(parts)
        out.append(TC_ENDBLOCKDATA)
        return self

    def write(self, kind: str, value: Any) -> 'Writer':
        """One value of a layout kind (see :data:`KINDS`)."""
        writer = {'byte': self.write_byte, 'int': self.write_int,
                  'long': self.write_long, 'utf': self.write_utf,
                  'list': self.write_string_list,
                  'raw': self.write_raw_byte}.get(kind)
        if writer is None:
            raise ValueError(f'unknown kind {kind!r}')
        return writer(value)

    def _assign(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    def _drain(self) -> None:
        block = self._block
        for start in range(0, len(block), MAX_BLOCK):
            chunk = block[start:start + MAX_BLOCK]
            if len(chunk) <= 0xFF:
                self._out += bytes((TC_BLOCKDATA, len(chunk)))
            else:
                self._out.append(TC_BLOCKDATALONG)
                self._out += _INT.pack(len(chunk))
            self._out += chunk
        block.clear()

    def getvalue(self) -> bytes:
        """Everything written so far (pending primitives in a block)."""
        self._drain()
        return bytes(self._out)


#: TC_OBJECT and the class descriptor of java.util.ArrayList, first use.
_ARRAYLIST_DESC = (bytes((TC_OBJECT, TC_CLASSDESC)) +
                   _SHORT.pack(len(ARRAYLIST_CLASS)) +
                   ARRAYLIST_CLASS.encode('ascii') +
                   _LONG.pack(ARRAYLIST_SUID) + bytes((ARRAYLIST_FLAGS,)) +
                   _SHORT.pack(1) + b'I' + _SHORT.pack(4) + b'size' +
                   bytes((TC_ENDBLOCKDATA, TC_NULL)))


def _check(value: Any, low: int, high: int, kind: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'{kind} value {value!r} is not an integer')
    if not low <= value <= high:
        raise ValueError(f'{kind} value {value} out of range')
    return value


# -- whole streams ---------------------------------------------------------

def encode(layout, values, header: bool = True) -> bytes:
    """The stream of ``values`` (one per kind of ``layout``)."""
    layout, values = list(layout), list(values)
    if len(layout) != len(values):
        raise ValueError(f'{len(layout)} kinds for {len(values)} values')
    writer = Writer(header=header)
    for kind, value in zip(layout, values, strict=True):
        writer.write(kind, value)
    return writer.getvalue()


def decode(data: bytes, layout, limits: Limits = DEFAULT_LIMITS,
           header: bool = True) -> list:
    """The values of the stream ``data`` after ``layout``.

    :raises CodecError: when ``data`` is not exactly such a stream.
    """
    reader = Reader(BufferSource(data, limits), limits)
    if header:
        reader.read_header()
    values = [reader.read(kind) for kind in layout]
    if not reader.at_end():
        raise CodecError(reason='data after the end of the frame')
    return values


def encode_request(command: int, **fields: Any) -> bytes:
    """A request stream: the header, the command byte, its fields."""
    spec = REQUESTS[command]
    writer = Writer().write_byte(command)
    for name, kind in spec:
        writer.write(kind, fields[name])
    return writer.getvalue()


_FIXED = {'byte': _BYTE, 'int': _INT, 'long': _LONG}
_SIMPLE_REQUESTS = {
    command: struct.Struct('>' + ''.join(_FIXED[kind].format[1:]
                                         for _name, kind in spec))
    for command, spec in REQUESTS.items()
    if all(kind in _FIXED for _name, kind in spec)}


def read_simple_request(data: bytes) -> tuple[int, dict[str, Any]] | None:
    """:func:`read_request` for the common shape, or None.

    The common shape: the header and one short block holding exactly the
    command and its fixed-size fields (what every original client sends
    for the requests without strings). Anything else (more data, other
    blocks, strings) is None: read it with :func:`read_request`.
    """
    if len(data) < 7 or data[4] != TC_BLOCKDATA or \
            data[5] != len(data) - 6 or data[:4] != HEADER:
        return None
    command = _BYTE.unpack_from(data, 6)[0]
    layout = _SIMPLE_REQUESTS.get(command)
    if layout is None or layout.size != len(data) - 7:
        return None
    values = layout.unpack_from(data, 7)
    return command, dict(zip((name for name, _k in REQUESTS[command]),
                             values, strict=True))


def read_request(reader: Reader) -> tuple[int, dict[str, Any]]:
    """Read the header, a command and its fields (what follows is left).

    :raises CodecError: for an unknown command or a malformed field.
    """
    reader.read_header()
    command = reader.read_byte()
    spec = REQUESTS.get(command)
    if spec is None:
        raise UnknownCommand(command=command)
    return command, {name: reader.read(kind) for name, kind in spec}
