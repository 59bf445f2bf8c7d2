"""Empty qcow2 overlays written in-process, without spawning qemu-img.

An overlay of a template is a qcow2 (version 3) file that holds no data of
its own: a header naming the backing file and its format, a refcount table
and block, and an empty L1 table. Its layout is fixed by the qcow2
specification (``docs/interop/qcow2.txt`` in QEMU) and is the one
``qemu-img create -f qcow2 -b TEMPLATE -F FORMAT`` writes, so writing it
directly takes well under a millisecond instead of a process spawn. The
tests compare the result with qemu-img's (``qemu-img check`` and ``info``)
and the system tests boot real guests from it.

Only the empty overlay is written here; anything else (copies, resizes,
reading images) goes through qemu-img.
"""

import math
import os
import struct

MAGIC = b'QFI\xfb'
VERSION = 3
CLUSTER_BITS = 16
CLUSTER_SIZE = 1 << CLUSTER_BITS
REFCOUNT_ORDER = 4          # 16-bit refcounts
HEADER_LENGTH = 112         # v3 fields + compression type, 8-aligned
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_END = 0x00000000
MAX_BACKING_NAME = 1023     # QEMU's limit

# The clusters of an empty overlay: header, refcount table and block, then
# the L1 table (one cluster up to 4 TiB of virtual size).
REFCOUNT_TABLE_OFFSET = 1 * CLUSTER_SIZE
REFCOUNT_BLOCK_OFFSET = 2 * CLUSTER_SIZE
L1_TABLE_OFFSET = 3 * CLUSTER_SIZE

_HEADER = struct.Struct('>4sIQIIQIIQQIIQQQQIIB7x')


def l1_entries(size: int) -> int:
    """L1 entries needed for ``size`` bytes (one L2 table per entry)."""
    l2_entries = CLUSTER_SIZE // 8
    return max(1, math.ceil(size / (CLUSTER_SIZE * l2_entries)))


def _extension(kind: int, data: bytes) -> bytes:
    padded = data + b'\0' * (-len(data) % 8)
    return struct.pack('>II', kind, len(data)) + padded


def overlay_bytes(backing_file: str, backing_format: str, size: int) -> bytes:
    """The bytes of an empty qcow2 overlay of ``backing_file``.

    :raises ValueError: for an unusable name, format or size.
    """
    name = backing_file.encode('utf-8')
    fmt = backing_format.encode('ascii')
    if not name or len(name) > MAX_BACKING_NAME or b'\0' in name:
        raise ValueError(f'backing file name {backing_file!r} is unusable')
    if not fmt or len(fmt) > 16 or not fmt.isalnum():
        raise ValueError(f'backing format {backing_format!r} is unusable')
    if size <= 0 or size % 512:
        raise ValueError(f'size {size} must be a positive multiple of 512')
    extensions = (_extension(EXT_BACKING_FORMAT, fmt) +
                  _extension(EXT_END, b''))
    backing_offset = HEADER_LENGTH + len(extensions)
    if backing_offset + len(name) > CLUSTER_SIZE:
        raise ValueError('the header does not fit in one cluster')
    l1_size = l1_entries(size)
    l1_clusters = math.ceil(l1_size * 8 / CLUSTER_SIZE)
    used_clusters = 3 + l1_clusters
    if used_clusters > CLUSTER_SIZE // 2:  # one 16-bit refcount block
        raise ValueError(f'size {size} is too large')
    header = _HEADER.pack(
        MAGIC, VERSION, backing_offset, len(name), CLUSTER_BITS, size,
        0,                          # no encryption
        l1_size, L1_TABLE_OFFSET,
        REFCOUNT_TABLE_OFFSET, 1,   # one refcount table cluster
        0, 0,                       # no snapshots
        0, 0, 0,                    # no incompatible/compatible/autoclear
        REFCOUNT_ORDER, HEADER_LENGTH,
        0)                          # compression type: zlib
    cluster0 = header + extensions + name
    cluster0 += b'\0' * (CLUSTER_SIZE - len(cluster0))
    refcount_table = struct.pack('>Q', REFCOUNT_BLOCK_OFFSET)
    refcount_table += b'\0' * (CLUSTER_SIZE - len(refcount_table))
    # Header, refcount table, refcount block and the L1 clusters are used.
    refcount_block = struct.pack(f'>{used_clusters}H',
                                 *([1] * used_clusters))
    refcount_block += b'\0' * (CLUSTER_SIZE - len(refcount_block))
    l1_table = b'\0' * (l1_size * 8)
    return cluster0 + refcount_table + refcount_block + l1_table


def create_overlay(path: str, backing_file: str, backing_format: str,
                   size: int, sync: bool = False) -> None:
    """Write an empty overlay at ``path`` (which must not exist).

    ``sync`` flushes it to disk before returning (for a file that is then
    renamed into place); a VM's disk needs no flush: a crash before the
    VM is recorded as built removes it anyway.

    :raises FileExistsError: when ``path`` exists.
    :raises OSError: when it cannot be written (nothing is left behind).
    :raises ValueError: for unusable arguments.
    """
    data = overlay_bytes(backing_file, backing_format, size)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
