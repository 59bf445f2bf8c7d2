"""Durable state of the agent: its identity and the VM records.

(The libvirt image pool keeps its state in the file names of its disks,
made complete by an atomic rename; see ``virt/libvirt/imagepool.py``.)

One SQLite database (``<data_path>/state.sqlite``) in WAL mode with
``synchronous=FULL``: each change is one transaction, so the file is
consistent after ``kill -9`` or a power cut at any point. The schema version
is SQLite's ``user_version``; older schemas are migrated forward, a newer
one (written by a later release) is refused rather than damaged.
"""

from collections.abc import Iterator
import contextlib
import dataclasses
import json
import os
import queue
import sqlite3
import threading
import time
from typing import Any

from oslo_log import log as logging

from rapid_vmm import exception
from rapid_vmm import objects

LOG = logging.getLogger(__name__)

DB_NAME = 'state.sqlite'
SCHEMA_VERSION = 2

_SCHEMA_V1 = """
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE vms (
    user_id INTEGER PRIMARY KEY,
    vm_id INTEGER,
    name TEXT NOT NULL UNIQUE,
    status INTEGER NOT NULL,
    task_state TEXT NOT NULL DEFAULT '',
    vcpus INTEGER NOT NULL,
    memory_mb INTEGER NOT NULL,
    disk_gb INTEGER NOT NULL,
    gpu_cores INTEGER NOT NULL DEFAULT 0,
    os_type INTEGER NOT NULL DEFAULT 0,
    helper INTEGER NOT NULL DEFAULT 0,
    driver_id TEXT,
    image TEXT,
    disk_path TEXT,
    ip_address TEXT,
    as_ready INTEGER NOT NULL DEFAULT 0,
    pending_resize TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX vms_ip ON vms (ip_address);
"""

# v2: lifecycle states (intent), memory ceiling, managed save, the AS's
# protocol, and the outbox of messages to the DS and the SLAM.
_SCHEMA_V2 = """
ALTER TABLE vms ADD COLUMN memory_max_mb INTEGER NOT NULL DEFAULT 0;
ALTER TABLE vms ADD COLUMN saved INTEGER NOT NULL DEFAULT 0;
ALTER TABLE vms ADD COLUMN state_reason TEXT NOT NULL DEFAULT '';
ALTER TABLE vms ADD COLUMN as_protocol TEXT;
ALTER TABLE vms ADD COLUMN intent TEXT;
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    lane TEXT NOT NULL,
    method TEXT NOT NULL,
    args TEXT NOT NULL,
    vm_key TEXT,
    request_id TEXT,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX outbox_lane ON outbox (lane, seq);
CREATE INDEX outbox_vm ON outbox (vm_key);
"""

_MIGRATIONS = {1: _SCHEMA_V1, 2: _SCHEMA_V2}

#: Read-only connections kept for the next reads.
READERS_KEPT = 8

_VM_COLUMNS = ('user_id', 'vm_id', 'name', 'status', 'task_state', 'vcpus',
               'memory_mb', 'disk_gb', 'gpu_cores', 'os_type', 'helper',
               'driver_id', 'image', 'disk_path', 'ip_address', 'as_ready',
               'pending_resize', 'memory_max_mb', 'saved', 'state_reason',
               'as_protocol', 'intent', 'created_at', 'updated_at')
_SELECT = ', '.join(_VM_COLUMNS)
_JSON_COLUMNS = ('pending_resize', 'intent')
_BOOL_COLUMNS = ('as_ready', 'saved')

_OUTBOX_COLUMNS = ('seq', 'lane', 'method', 'args', 'vm_key', 'request_id',
                   'created_at', 'attempts', 'last_error')


@dataclasses.dataclass
class OutboxMessage:
    """One message of the outbox, waiting to be delivered in order."""

    seq: int
    lane: str
    method: str
    args: dict
    vm_key: str | None = None
    request_id: str | None = None
    created_at: float = 0.0
    attempts: int = 0
    last_error: str | None = None


class StateStore:
    """Thread-safe access to the state database of one agent.

    Writes share one connection behind a lock (one transaction at a time,
    kept short). Reads use a small pool of read-only connections and never
    wait for a commit; :meth:`get_vm` answers from the rows read since the
    last commit (see :meth:`_forget_rows`).
    """

    def __init__(self, data_path: str):
        self.data_path = data_path
        self.path = os.path.join(data_path, DB_NAME)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        # LIFO: the connection used last (warm caches) is taken first.
        self._readers: queue.LifoQueue = queue.LifoQueue()
        self._generation = 0
        # Rows of get_vm() read since the last commit (see _forget_rows).
        self._rows: dict[int, tuple | None] = {}
        self._rows_version = 0
        self._rows_lock = threading.Lock()

    # -- life cycle -------------------------------------------------------

    def open(self) -> None:
        """Open (creating or migrating) the database.

        A file that is not a SQLite database, or is corrupt, is moved aside
        (with its WAL) as ``state.sqlite.corrupt-<time>`` and a fresh one
        is created: the agent then rebuilds its records from the
        hypervisor.

        :raises StateError: for a schema newer than this release knows
            (the file is left untouched), or a directory or file that
            cannot be written.
        """
        try:
            # 0711: others may traverse (QEMU, running as its own user, must
            # reach instance disks under it) but not list.
            os.makedirs(self.data_path, mode=0o711, exist_ok=True)
        except OSError as exc:
            raise exception.StateError(path=self.path,
                                       reason=str(exc)) from exc
        if not os.access(self.data_path, os.W_OK | os.X_OK):
            raise exception.StateError(
                path=self.path, reason=f'{self.data_path} is not writable')
        try:
            self._connect()
        except exception.StateError:
            self._close_quietly()
            raise
        except sqlite3.OperationalError as exc:
            # Locked, read-only, I/O error: not corruption; keep the file.
            self._close_quietly()
            raise exception.StateError(path=self.path,
                                       reason=str(exc)) from exc
        except sqlite3.DatabaseError as exc:
            self._move_aside(exc)
            try:
                self._connect()
            except sqlite3.Error as again:
                self._close_quietly()
                raise exception.StateError(path=self.path,
                                           reason=str(again)) from again

    def _move_aside(self, error: Exception) -> None:
        """Keep a corrupt database (and its WAL) for a post-mortem."""
        aside = f'{self.path}.corrupt-{time.time_ns()}'
        LOG.error('State database %s is unreadable (%s); moved it to %s '
                  'and starting from an empty state', self.path, error,
                  aside)
        # Move first: closing the connection would delete the WAL.
        for suffix in ('', '-wal', '-shm'):
            if os.path.exists(self.path + suffix):
                os.replace(self.path + suffix, aside + suffix)
        self._close_quietly()

    def _connect(self) -> None:
        conn = sqlite3.connect(self.path, timeout=30,
                               check_same_thread=False,
                               isolation_level=None)
        self._conn = conn
        # Read the version before changing anything: a newer schema is
        # refused with its file untouched.
        version = conn.execute('PRAGMA user_version').fetchone()[0]
        if version > SCHEMA_VERSION:
            raise exception.StateError(
                path=self.path,
                reason=f'schema version {version} is newer than this '
                       f'release supports ({SCHEMA_VERSION}); refusing to '
                       'touch it')
        conn.execute('PRAGMA journal_mode=WAL')
        conn.execute('PRAGMA synchronous=FULL')
        conn.execute('PRAGMA foreign_keys=ON')
        result = conn.execute('PRAGMA quick_check').fetchone()
        if result is None or result[0] != 'ok':
            raise sqlite3.DatabaseError(f'quick_check: {result}')
        self._migrate(version)

    def _migrate(self, version: int) -> None:
        for target in range(version + 1, SCHEMA_VERSION + 1):
            LOG.info('Migrating state database %s to schema %d',
                     self.path, target)
            with self.transaction() as txn:
                for statement in _MIGRATIONS[target].split(';'):
                    if statement.strip():
                        txn.cursor.execute(statement)
                txn.cursor.execute(f'PRAGMA user_version = {int(target)}')

    def close(self) -> None:
        with self._lock:
            self._close_quietly()

    def _close_quietly(self) -> None:
        self._generation += 1
        self._forget_rows()
        while True:
            try:
                self._readers.get_nowait().close()
            except queue.Empty:
                break
            except sqlite3.Error as exc:
                LOG.debug('Closing a reader of %s failed: %s', self.path,
                          exc)
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error as exc:
                LOG.warning('Closing %s failed: %s', self.path, exc)
            self._conn = None

    def transaction(self) -> '_Transaction':
        """``with store.transaction() as txn:`` one atomic change.

        ``txn`` (a :class:`Txn`) reads and writes VM records, the identity
        and the outbox; everything it did is committed together at the end
        of the block, or nothing if the block raises. Other threads wait
        for the block (keep it short: never call a driver or a peer in it).
        """
        return _Transaction(self)

    # -- identity ---------------------------------------------------------

    def get_meta(self) -> dict[str, Any]:
        """Return the persisted identity (``vmm_id``, ``slam_host``, ...)."""
        with self._reading() as cursor:
            return _read_meta(cursor)

    def set_meta(self, **values: Any) -> None:
        """Persist identity values in one transaction."""
        with self.transaction() as txn:
            txn.set_meta(**values)

    # -- VM records -------------------------------------------------------

    def _cursor(self) -> sqlite3.Cursor:
        if self._conn is None:
            raise exception.StateError(path=self.path,
                                       reason='the store is closed')
        return self._conn.cursor()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Cursor]:
        """A cursor of a read-only connection, for one read.

        Reads do not wait for the writer: in WAL mode a reader sees the
        last committed state while a transaction commits (and its fsync
        runs). Connections are kept in a small pool for the next reads.
        """
        if self._conn is None:
            raise exception.StateError(path=self.path,
                                       reason='the store is closed')
        generation = self._generation
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            conn = sqlite3.connect(self.path, timeout=30,
                                   check_same_thread=False,
                                   isolation_level=None)
            conn.execute('PRAGMA query_only = ON')
        cursor = conn.cursor()
        try:
            yield cursor
        finally:
            cursor.close()
            if generation == self._generation and \
                    self._readers.qsize() < READERS_KEPT:
                self._readers.put(conn)
            else:
                conn.close()

    def get_vm(self, user_id: int) -> objects.Vm | None:
        """The record of ``user_id`` (a new object at every call)."""
        row = self._rows.get(user_id, _UNREAD)
        if row is _UNREAD:
            version = self._rows_version
            with self._reading() as cursor:
                row = Txn(cursor).get_vm_row(user_id)
            with self._rows_lock:
                if version == self._rows_version:
                    self._rows[user_id] = row
        return _row_to_vm(row) if row else None

    def _forget_rows(self) -> None:
        """Called after every commit, by the committing thread.

        The agent is the database's only writer, so the row of a VM read
        since its last commit is still what the database holds: get_vm(),
        the query of every API call, takes it from memory instead of a new
        read transaction (two thirds of a legacy GET_VMINFO's time in the
        agent). A read that raced the commit is never kept: its version
        is the one before.
        """
        with self._rows_lock:
            self._rows_version += 1
            self._rows.clear()

    def get_vm_by_name(self, name: str) -> objects.Vm | None:
        """The record of the VM called ``name`` (names are unique)."""
        with self._reading() as cursor:
            return Txn(cursor).get_vm_by_name(name)

    def find_vm_by_ip(self, ip_address: str) -> objects.Vm | None:
        """The VM that holds ``ip_address`` now, or None.

        Only VMs that hold an address (not stopped, not being deleted)
        count: a stopped VM's last address may have been handed to
        another VM since. When several claim it, the most recently
        changed wins.
        """
        with self._reading() as cursor:
            row = cursor.execute(
                f'SELECT {_SELECT} FROM vms '  # noqa: S608
                'WHERE ip_address = ? AND status != ? AND task_state != ? '
                'ORDER BY updated_at DESC',
                (ip_address, int(objects.VmStatus.STOPPED),
                 objects.TaskState.DELETING.value)).fetchone()
        return _row_to_vm(row) if row else None

    def list_vms(self, task_state: str | None = None) -> list[objects.Vm]:
        """Every record (those in ``task_state`` only, when given)."""
        with self._reading() as cursor:
            if task_state is None:
                return Txn(cursor).list_vms()
            rows = cursor.execute(
                f'SELECT {_SELECT} FROM vms WHERE task_state = ? '  # noqa: S608
                'ORDER BY helper DESC, user_id', (task_state,)).fetchall()
        return [_row_to_vm(row) for row in rows]

    def save_vm(self, vm: objects.Vm) -> objects.Vm:
        """Insert or replace the whole record of ``vm.user_id``.

        For a new record or a rebuild; changes of a few fields use
        :meth:`update_vm`, which never overwrites what another thread
        changed meanwhile.
        """
        with self.transaction() as txn:
            txn.save_vm(vm)
        return vm

    def update_vm(self, user_id: int, **fields: Any) -> bool:
        """Change some fields of one record, leaving the others alone.

        Returns False when there is no such record (nothing is created).
        """
        with self.transaction() as txn:
            return txn.update_vm(user_id, **fields)

    def delete_vm(self, user_id: int) -> None:
        with self.transaction() as txn:
            txn.delete_vm(user_id)

    # -- outbox -----------------------------------------------------------

    def outbox_head(self, lane: str) -> OutboxMessage | None:
        """The oldest message of ``lane``, or None."""
        with self._reading() as cursor:
            row = cursor.execute(
                f'SELECT {", ".join(_OUTBOX_COLUMNS)} FROM outbox '  # noqa: S608
                'WHERE lane = ? ORDER BY seq LIMIT 1', (lane,)).fetchone()
        return _row_to_message(row) if row else None

    def outbox_messages(self, lane: str | None = None
                        ) -> list[OutboxMessage]:
        """Every queued message (of ``lane``), oldest first."""
        query = f'SELECT {", ".join(_OUTBOX_COLUMNS)} FROM outbox'  # noqa: S608
        params: tuple = ()
        if lane is not None:
            query += ' WHERE lane = ?'
            params = (lane,)
        with self._reading() as cursor:
            rows = cursor.execute(query + ' ORDER BY seq', params).fetchall()
        return [_row_to_message(row) for row in rows]

    def outbox_depth(self) -> dict[str, int]:
        """Number of queued messages per lane."""
        with self._reading() as cursor:
            rows = cursor.execute(
                'SELECT lane, COUNT(*) FROM outbox GROUP BY lane').fetchall()
        return dict(rows)

    def outbox_failed(self, seq: int, error: str) -> None:
        """Count one failed delivery of message ``seq``."""
        with self.transaction() as txn:
            txn.cursor.execute(
                'UPDATE outbox SET attempts = attempts + 1, last_error = ? '
                'WHERE seq = ?', (error[:500], seq))


class Txn:
    """The operations of one transaction (see :meth:`StateStore.transaction`).

    Also used, outside a transaction, for the store's single reads.
    """

    def __init__(self, cursor: sqlite3.Cursor):
        self.cursor = cursor

    # -- identity -------------------------------------------------------

    def get_meta(self) -> dict[str, Any]:
        return _read_meta(self.cursor)

    def set_meta(self, **values: Any) -> None:
        for key, value in values.items():
            self.cursor.execute(
                'INSERT INTO meta (key, value) VALUES (?, ?) '
                'ON CONFLICT(key) DO UPDATE SET value = excluded.value',
                (key, json.dumps(value)))

    # -- VM records -----------------------------------------------------

    def get_vm(self, user_id: int) -> objects.Vm | None:
        row = self.get_vm_row(user_id)
        return _row_to_vm(row) if row else None

    def get_vm_row(self, user_id: int) -> tuple | None:
        """The raw row of ``user_id`` (None: no record)."""
        return self.cursor.execute(
            f'SELECT {_SELECT} FROM vms WHERE user_id = ?',  # noqa: S608
            (user_id,)).fetchone()

    def get_vm_by_name(self, name: str) -> objects.Vm | None:
        row = self.cursor.execute(
            f'SELECT {_SELECT} FROM vms WHERE name = ?',  # noqa: S608
            (name,)).fetchone()
        return _row_to_vm(row) if row else None

    def list_vms(self) -> list[objects.Vm]:
        rows = self.cursor.execute(
            f'SELECT {_SELECT} FROM vms '  # noqa: S608
            'ORDER BY helper DESC, user_id').fetchall()
        return [_row_to_vm(row) for row in rows]

    def held_sums(self, exclude_user: int | None = None
                  ) -> tuple[tuple[int, int, int, int], list[objects.Vm]]:
        """What the VMs hold, summed by SQLite: ``(vcpus, memory_mb,
        disk_gb, gpu_cores)`` of every VM that is neither stopped nor
        being resized, and the records of those being resized (whose
        intent decides what they hold), for :func:`capacity.usage_in`.

        The same rule as :func:`capacity.held_by` (a test compares them):
        memory at the ceiling, none for a suspended VM saved to disk.
        """
        # No user id is below -2**63 (SQLite's INTEGER): None excludes none.
        user = -2 ** 63 if exclude_user is None else exclude_user
        sums = self.cursor.execute(
            'SELECT COALESCE(SUM(vcpus), 0), '
            'COALESCE(SUM(CASE WHEN saved = 1 AND status = ? THEN 0 '
            'ELSE MAX(memory_mb, memory_max_mb) END), 0), '
            'COALESCE(SUM(disk_gb), 0), COALESCE(SUM(gpu_cores), 0) '
            'FROM vms WHERE status != ? AND user_id != ? '
            'AND task_state != ?',
            (int(objects.VmStatus.SUSPENDED), int(objects.VmStatus.STOPPED),
             user, objects.TaskState.RESIZING.value)).fetchone()
        rows = self.cursor.execute(
            f'SELECT {_SELECT} FROM vms '  # noqa: S608
            'WHERE status != ? AND user_id != ? AND task_state = ?',
            (int(objects.VmStatus.STOPPED), user,
             objects.TaskState.RESIZING.value)).fetchall()
        return tuple(sums), [_row_to_vm(row) for row in rows]

    def save_vm(self, vm: objects.Vm) -> objects.Vm:
        """Insert or replace the record of ``vm.user_id``."""
        now = time.time()
        vm.updated_at = now
        if not vm.created_at:
            vm.created_at = now
        placeholders = ', '.join('?' for _ in _VM_COLUMNS)
        self.cursor.execute(
            f'INSERT OR REPLACE INTO vms ({_SELECT}) '  # noqa: S608
            f'VALUES ({placeholders})', _vm_to_row(vm))
        return vm

    def update_vm(self, user_id: int, **fields: Any) -> bool:
        """Change ``fields`` of one record; False when there is none."""
        unknown = set(fields) - set(_VM_COLUMNS)
        if unknown:
            raise ValueError(f'unknown VM fields {sorted(unknown)}')
        if not fields:
            return self.get_vm(user_id) is not None
        probe = objects.Vm(user_id=user_id, name='', vcpus=0, memory_mb=0,
                           disk_gb=0)
        for key, value in fields.items():
            setattr(probe, key, value)
        row = dict(zip(_VM_COLUMNS, _vm_to_row(probe), strict=True))
        assignments = ', '.join(f'{key} = ?' for key in fields)
        values = [row[key] for key in fields] + [time.time(), user_id]
        # Column names come from _VM_COLUMNS (checked above), values are
        # bound parameters.
        self.cursor.execute(f'UPDATE vms SET {assignments}, '  # noqa: S608
                            'updated_at = ? WHERE user_id = ?', values)
        return self.cursor.rowcount > 0

    def delete_vm(self, user_id: int) -> None:
        self.cursor.execute('DELETE FROM vms WHERE user_id = ?', (user_id,))

    # -- outbox ---------------------------------------------------------

    def enqueue(self, lane: str, method: str, args: dict,
                vm_key: str | None = None,
                request_id: str | None = None) -> int:
        """Queue a message for delivery after this transaction commits."""
        self.cursor.execute(
            'INSERT INTO outbox (lane, method, args, vm_key, request_id, '
            'created_at) VALUES (?, ?, ?, ?, ?, ?)',
            (lane, method, json.dumps(args), vm_key, request_id,
             time.time()))
        return self.cursor.lastrowid

    def dequeue(self, seq: int) -> None:
        self.cursor.execute('DELETE FROM outbox WHERE seq = ?', (seq,))

    def queued(self, vm_key: str, method: str | None = None
               ) -> list[OutboxMessage]:
        """The queued messages about one VM (of ``method``)."""
        query = (f'SELECT {", ".join(_OUTBOX_COLUMNS)} FROM outbox '  # noqa: S608
                 'WHERE vm_key = ?')
        params: tuple = (vm_key,)
        if method is not None:
            query += ' AND method = ?'
            params += (method,)
        rows = self.cursor.execute(query + ' ORDER BY seq', params).fetchall()
        return [_row_to_message(row) for row in rows]

    def set_message_args(self, seq: int, args: dict) -> None:
        self.cursor.execute('UPDATE outbox SET args = ? WHERE seq = ?',
                            (json.dumps(args), seq))


class _Transaction:
    """``with store.transaction() as txn``: BEGIN IMMEDIATE .. COMMIT."""

    def __init__(self, store: StateStore):
        self._store = store

    def __enter__(self) -> Txn:
        self._store._lock.acquire()
        try:
            self._cur = self._store._cursor()
            self._cur.execute('BEGIN IMMEDIATE')
        except BaseException:
            self._store._lock.release()
            raise
        return Txn(self._cur)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._cur.execute('COMMIT')
            else:
                self._cur.execute('ROLLBACK')
        finally:
            # Also after a failed COMMIT or ROLLBACK: what is on disk is
            # then not known for sure.
            self._store._forget_rows()
            self._cur.close()
            self._store._lock.release()


_UNREAD = object()


def _read_meta(cursor: sqlite3.Cursor) -> dict[str, Any]:
    rows = cursor.execute('SELECT key, value FROM meta')
    return {key: json.loads(value) for key, value in rows}


def _vm_to_row(vm: objects.Vm) -> tuple:
    values = []
    for column in _VM_COLUMNS:
        value = getattr(vm, column)
        if column in _JSON_COLUMNS:
            value = json.dumps(value) if value is not None else None
        elif column in _BOOL_COLUMNS:
            value = int(bool(value))
        elif column in ('status', 'os_type'):
            value = int(value)
        elif column == 'state_reason':
            value = value or ''
        values.append(value)
    return tuple(values)


def _row_to_vm(row: tuple) -> objects.Vm:
    data = dict(zip(_VM_COLUMNS, row, strict=True))
    for column in _BOOL_COLUMNS:
        data[column] = bool(data[column])
    for column in _JSON_COLUMNS:
        if data[column] is not None:
            data[column] = json.loads(data[column])
    return objects.Vm(**data)


def _row_to_message(row: tuple) -> OutboxMessage:
    data = dict(zip(_OUTBOX_COLUMNS, row, strict=True))
    data['args'] = json.loads(data['args'])
    return OutboxMessage(**data)
