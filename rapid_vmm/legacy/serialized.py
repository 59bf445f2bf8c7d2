"""Java serialization streams read as data, never as objects.

The original VMM keeps its state in files written by
``ObjectOutputStream.writeObject`` (``vmmInfo.out``, ``vmList.out``). This
module reads the grammar of such a stream (Java Object Serialization
Specification, section 6.4) into plain Python values: a
:class:`JavaObject` is a class *name* and its field values, nothing more.
No class is looked up, imported, loaded or instantiated, and no code of
the stream runs: a stream naming ``java.lang.Runtime`` or a Python module
gives a :class:`JavaObject` with that name, which the caller (the importer)
rejects because it is not on its whitelist.

Refused as :class:`SerializedFormatError`: proxy classes, exceptions in
the stream, ``TC_RESET``, externalizable classes written with the old
protocol (their data cannot be skipped without the class), unknown type
codes, dangling references, truncated data, data after the last object,
and anything over :class:`ReadLimits` (file size, nesting depth, number of
objects, string and array sizes).
"""

import dataclasses
import struct
from typing import Any

from rapid_vmm import exception
from rapid_vmm.legacy import codec

SC_WRITE_METHOD = 0x01
SC_SERIALIZABLE = 0x02
SC_EXTERNALIZABLE = 0x04
SC_BLOCK_DATA = 0x08
SC_ENUM = 0x10

_PRIMITIVES = {
    'B': struct.Struct('>b'), 'C': struct.Struct('>H'),
    'D': struct.Struct('>d'), 'F': struct.Struct('>f'),
    'I': struct.Struct('>i'), 'J': struct.Struct('>q'),
    'S': struct.Struct('>h'), 'Z': struct.Struct('>?'),
}
_OBJECT_TYPES = ('L', '[')


class SerializedFormatError(exception.RapidVmmException):
    """The file is not a Java serialization stream this reader accepts."""

    msg_fmt = 'Not a readable Java serialization stream: %(reason)s'


@dataclasses.dataclass(frozen=True)
class ReadLimits:
    max_bytes: int = 16 * 1024 * 1024
    max_depth: int = 64
    max_handles: int = 1_000_000
    max_string_bytes: int = 1024 * 1024


@dataclasses.dataclass(eq=False)
class JavaClass:
    """A class descriptor, as data: name, serialVersionUID, flags, fields
    (``(type code, name, field type signature or None)``), superclass."""

    name: str
    suid: int
    flags: int = 0
    fields: list[tuple[str, str, str | None]] = dataclasses.field(
        default_factory=list)
    superclass: 'JavaClass | None' = None

    def hierarchy(self) -> list['JavaClass']:
        """This class and its serializable superclasses, topmost first."""
        chain, cls = [], self
        while cls is not None:
            chain.append(cls)
            cls = cls.superclass
        return chain[::-1]


@dataclasses.dataclass(eq=False)
class JavaObject:
    """An object's data: its class and, per class of its hierarchy, the
    field values and the annotation (what a ``writeObject`` method wrote
    after the fields: :class:`BlockData` and objects)."""

    cls: JavaClass
    data: dict[str, dict[str, Any]] = dataclasses.field(
        default_factory=dict)
    annotations: dict[str, list[Any]] = dataclasses.field(
        default_factory=dict)

    @property
    def class_name(self) -> str:
        return self.cls.name

    def fields(self) -> dict[str, Any]:
        """Every field value, a subclass's winning over a superclass's."""
        merged: dict[str, Any] = {}
        for cls in self.cls.hierarchy():
            merged.update(self.data.get(cls.name, {}))
        return merged


@dataclasses.dataclass(eq=False)
class JavaArray:
    cls: JavaClass
    items: list[Any]


@dataclasses.dataclass(eq=False)
class JavaEnum:
    cls: JavaClass
    constant: str


class BlockData(bytes):
    """Primitive data a ``writeObject`` method wrote (block-data record)."""


class _Parser:

    def __init__(self, data: bytes, limits: ReadLimits):
        self._data = data
        self._pos = 0
        self._limits = limits
        self._handles: list[Any] = []
        self._depth = 0

    # -- low level -------------------------------------------------------

    def _fail(self, reason: str) -> SerializedFormatError:
        return SerializedFormatError(reason=f'{reason} (at byte '
                                            f'{self._pos})')

    def _take(self, count: int) -> bytes:
        end = self._pos + count
        if count < 0 or end > len(self._data):
            raise self._fail(f'truncated: {count} bytes wanted, '
                             f'{len(self._data) - self._pos} left')
        chunk = self._data[self._pos:end]
        self._pos = end
        return chunk

    def _byte(self) -> int:
        return self._take(1)[0]

    def _peek(self) -> int:
        if self._pos >= len(self._data):
            raise self._fail('truncated: the stream ends here')
        return self._data[self._pos]

    def _unpack(self, code: str) -> Any:
        fmt = _PRIMITIVES[code]
        return fmt.unpack(self._take(fmt.size))[0]

    def _utf(self, length: int) -> str:
        if length > self._limits.max_string_bytes:
            raise self._fail(f'string of {length} bytes')
        try:
            return codec.decode_mutf8(self._take(length))
        except codec.CodecError as exc:
            raise self._fail(str(exc)) from None

    def _short_utf(self) -> str:
        return self._utf(self._unpack('C'))

    def _assign(self, value: Any) -> int:
        if len(self._handles) >= self._limits.max_handles:
            raise self._fail('too many objects')
        self._handles.append(value)
        return len(self._handles) - 1

    def _reference(self) -> Any:
        handle = self._unpack('I') - codec.BASE_HANDLE
        if not 0 <= handle < len(self._handles):
            raise self._fail(f'reference to unknown handle '
                             f'{handle + codec.BASE_HANDLE:#x}')
        value = self._handles[handle]
        if value is _PENDING:
            raise self._fail('reference to a class descriptor being read')
        return value

    # -- grammar ---------------------------------------------------------

    def stream(self) -> list[Any]:
        if self._take(4) != codec.HEADER:
            raise self._fail('no Java serialization header (AC ED 00 05)')
        contents = []
        while self._pos < len(self._data):
            contents.append(self._content(allow_block=True))
        return contents

    def _content(self, allow_block: bool = False) -> Any:
        self._depth += 1
        if self._depth > self._limits.max_depth:
            raise self._fail('objects nested too deep')
        try:
            return self._content_inner(allow_block)
        finally:
            self._depth -= 1

    def _content_inner(self, allow_block: bool) -> Any:
        code = self._byte()
        if code == codec.TC_NULL:
            return None
        if code == codec.TC_REFERENCE:
            return self._reference()
        if code == codec.TC_STRING:
            value = self._short_utf()
            self._assign(value)
            return value
        if code == codec.TC_LONGSTRING:
            value = self._utf(self._unpack('J'))
            self._assign(value)
            return value
        if code == codec.TC_OBJECT:
            return self._new_object()
        if code == codec.TC_ARRAY:
            return self._new_array()
        if code == codec.TC_ENUM:
            return self._new_enum()
        if code == codec.TC_CLASS:
            cls = self._class_desc()
            self._assign(cls)
            return cls
        if code in (codec.TC_CLASSDESC, codec.TC_PROXYCLASSDESC):
            self._pos -= 1
            return self._class_desc()
        if code in (codec.TC_BLOCKDATA, codec.TC_BLOCKDATALONG):
            if not allow_block:
                raise self._fail('block data where an object was expected')
            length = (self._byte() if code == codec.TC_BLOCKDATA
                      else self._unpack('I'))
            return BlockData(self._take(length))
        raise self._fail(f'{codec.TC_NAMES.get(code, hex(code))} is not '
                         'read')

    def _class_desc(self) -> JavaClass | None:
        code = self._byte()
        if code == codec.TC_NULL:
            return None
        if code == codec.TC_REFERENCE:
            value = self._reference()
            if not isinstance(value, JavaClass):
                raise self._fail('class reference to a non-class')
            return value
        if code == codec.TC_PROXYCLASSDESC:
            raise self._fail('proxy classes are not read')
        if code != codec.TC_CLASSDESC:
            raise self._fail(f'{codec.TC_NAMES.get(code, hex(code))} where '
                             'a class descriptor was expected')
        name = self._short_utf()
        suid = self._unpack('J')
        handle = self._assign(_PENDING)
        flags = self._byte()
        if flags & SC_EXTERNALIZABLE and not flags & SC_BLOCK_DATA:
            raise self._fail(f'class {name[:80]!r} is externalizable in '
                             'the old protocol')
        count = self._unpack('S')
        if count < 0:
            raise self._fail(f'{count} fields')
        fields = []
        for _ in range(count):
            type_code = chr(self._byte())
            field_name = self._short_utf()
            signature = None
            if type_code in _OBJECT_TYPES:
                signature = self._content()
                if not isinstance(signature, str):
                    raise self._fail(f'field {field_name!r} has no type '
                                     'name')
            elif type_code not in _PRIMITIVES:
                raise self._fail(f'field {field_name!r} of unknown type '
                                 f'{type_code!r}')
            fields.append((type_code, field_name, signature))
        cls = JavaClass(name=name, suid=suid, flags=flags, fields=fields)
        self._handles[handle] = cls
        self._annotation()
        cls.superclass = self._class_desc()
        return cls

    def _annotation(self) -> list[Any]:
        items = []
        while self._peek() != codec.TC_ENDBLOCKDATA:
            items.append(self._content(allow_block=True))
        self._pos += 1
        return items

    def _new_object(self) -> JavaObject:
        cls = self._class_desc()
        if cls is None:
            raise self._fail('object without a class')
        obj = JavaObject(cls=cls)
        self._assign(obj)
        for level in cls.hierarchy():
            if level.flags & SC_EXTERNALIZABLE:
                obj.annotations[level.name] = self._annotation()
                continue
            if not level.flags & SC_SERIALIZABLE:
                continue
            values = {}
            for type_code, field_name, _sig in level.fields:
                values[field_name] = self._value(type_code)
            obj.data[level.name] = values
            if level.flags & SC_WRITE_METHOD:
                obj.annotations[level.name] = self._annotation()
        return obj

    def _value(self, type_code: str) -> Any:
        if type_code in _OBJECT_TYPES:
            return self._content()
        return self._unpack(type_code)

    def _new_array(self) -> JavaArray:
        cls = self._class_desc()
        if cls is None or not cls.name.startswith('[') or len(cls.name) < 2:
            raise self._fail('array without an array class')
        array = JavaArray(cls=cls, items=[])
        self._assign(array)
        size = self._unpack('I')
        element = cls.name[1]
        if size < 0:
            raise self._fail(f'array of {size} items')
        if element in _PRIMITIVES:
            width = _PRIMITIVES[element].size
            if size * width > len(self._data) - self._pos:
                raise self._fail(f'truncated array of {size} items')
            array.items = [self._unpack(element) for _ in range(size)]
        elif element in _OBJECT_TYPES:
            if size > len(self._data) - self._pos:
                raise self._fail(f'truncated array of {size} items')
            array.items = [self._content() for _ in range(size)]
        else:
            raise self._fail(f'array of unknown type {cls.name[:40]!r}')
        return array

    def _new_enum(self) -> JavaEnum:
        cls = self._class_desc()
        if cls is None:
            raise self._fail('enum without a class')
        handle = self._assign(_PENDING)
        constant = self._content()
        if not isinstance(constant, str):
            raise self._fail('enum constant is not a string')
        value = JavaEnum(cls=cls, constant=constant)
        self._handles[handle] = value
        return value


_PENDING = object()


def loads(data: bytes, limits: ReadLimits = ReadLimits()) -> list[Any]:
    """Every top-level content of the stream ``data``, as data.

    :raises SerializedFormatError: see the module's documentation.
    """
    if len(data) > limits.max_bytes:
        raise SerializedFormatError(reason=f'{len(data)} bytes, more than '
                                           f'{limits.max_bytes}')
    return _Parser(bytes(data), limits).stream()


def load_one(data: bytes, limits: ReadLimits = ReadLimits()) -> Any:
    """The one object of a stream written by one ``writeObject``."""
    contents = loads(data, limits)
    if len(contents) != 1:
        raise SerializedFormatError(reason=f'{len(contents)} top-level '
                                           'contents, 1 expected')
    return contents[0]
