"""Durable state of the agent: its identity and the VM records.

(The libvirt image pool keeps its state in the file names of its disks,
made complete by an atomic rename; see ``virt/libvirt/imagepool.py``.)

One SQLite database (``<data_path>/state.sqlite``) in WAL mode with
``synchronous=FULL``: each change is one transaction, so the file is
consistent after ``kill -9`` or a power cut at any point. The schema version
is SQLite's ``user_version``; older schemas are migrated forward, a newer
one (written by a later release) is refused rather than damaged.
"""

import json
import os
import sqlite3
import threading
import time
from typing import Any

from oslo_log import log as logging

from rapid_vmm import exception
from rapid_vmm import objects

LOG = logging.getLogger(__name__)

DB_NAME = 'state.sqlite'
SCHEMA_VERSION = 1

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

_MIGRATIONS = {1: _SCHEMA_V1}

_VM_COLUMNS = ('user_id', 'vm_id', 'name', 'status', 'task_state', 'vcpus',
               'memory_mb', 'disk_gb', 'gpu_cores', 'os_type', 'helper',
               'driver_id', 'image', 'disk_path', 'ip_address', 'as_ready',
               'pending_resize', 'created_at', 'updated_at')
_SELECT = ', '.join(_VM_COLUMNS)


class StateStore:
    """Thread-safe access to the state database of one agent.

    One connection is shared by the agent's threads behind a lock; SQLite
    statements here are short, so the lock is never held for long.
    """

    def __init__(self, data_path: str):
        self.data_path = data_path
        self.path = os.path.join(data_path, DB_NAME)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None

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
            with self._transaction() as cur:
                for statement in _MIGRATIONS[target].split(';'):
                    if statement.strip():
                        cur.execute(statement)
                cur.execute(f'PRAGMA user_version = {int(target)}')

    def close(self) -> None:
        with self._lock:
            self._close_quietly()

    def _close_quietly(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error as exc:
                LOG.warning('Closing %s failed: %s', self.path, exc)
            self._conn = None

    def _transaction(self):
        return _Transaction(self)

    # -- identity ---------------------------------------------------------

    def get_meta(self) -> dict[str, Any]:
        """Return the persisted identity (``vmm_id``, ``slam_host``, ...)."""
        with self._lock:
            rows = self._conn.execute('SELECT key, value FROM meta')
            return {key: json.loads(value) for key, value in rows}

    def set_meta(self, **values: Any) -> None:
        """Persist identity values in one transaction."""
        with self._transaction() as cur:
            for key, value in values.items():
                cur.execute('INSERT INTO meta (key, value) VALUES (?, ?) '
                            'ON CONFLICT(key) DO UPDATE '
                            'SET value = excluded.value',
                            (key, json.dumps(value)))

    # -- VM records -------------------------------------------------------

    def get_vm(self, user_id: int) -> objects.Vm | None:
        with self._lock:
            row = self._conn.execute(
                f'SELECT {_SELECT} FROM vms WHERE user_id = ?',  # noqa: S608
                (user_id,)).fetchone()
        return _row_to_vm(row) if row else None

    def find_vm_by_ip(self, ip_address: str) -> objects.Vm | None:
        with self._lock:
            row = self._conn.execute(
                f'SELECT {_SELECT} FROM vms '  # noqa: S608
                'WHERE ip_address = ? ORDER BY updated_at DESC',
                (ip_address,)).fetchone()
        return _row_to_vm(row) if row else None

    def list_vms(self) -> list[objects.Vm]:
        with self._lock:
            rows = self._conn.execute(
                f'SELECT {_SELECT} FROM vms '  # noqa: S608
                'ORDER BY helper DESC, user_id').fetchall()
        return [_row_to_vm(row) for row in rows]

    def save_vm(self, vm: objects.Vm) -> objects.Vm:
        """Insert or replace the record of ``vm.user_id``; returns it."""
        now = time.time()
        vm.updated_at = now
        if not vm.created_at:
            vm.created_at = now
        values = _vm_to_row(vm)
        placeholders = ', '.join('?' for _ in _VM_COLUMNS)
        with self._transaction() as cur:
            cur.execute(f'INSERT OR REPLACE INTO vms ({_SELECT}) '  # noqa: S608
                        f'VALUES ({placeholders})', values)
        return vm

    def update_vm(self, user_id: int, **fields: Any) -> None:
        """Change some fields of one record, leaving the others alone."""
        unknown = set(fields) - set(_VM_COLUMNS)
        if unknown:
            raise ValueError(f'unknown VM fields {sorted(unknown)}')
        probe = objects.Vm(user_id=user_id, name='', vcpus=0, memory_mb=0,
                           disk_gb=0)
        for key, value in fields.items():
            setattr(probe, key, value)
        row = dict(zip(_VM_COLUMNS, _vm_to_row(probe), strict=True))
        assignments = ', '.join(f'{key} = ?' for key in fields)
        values = [row[key] for key in fields] + [time.time(), user_id]
        with self._transaction() as cur:
            # Column names come from _VM_COLUMNS (checked above), values
            # are bound parameters.
            cur.execute(f'UPDATE vms SET {assignments}, '  # noqa: S608
                        'updated_at = ? WHERE user_id = ?', values)

    def delete_vm(self, user_id: int) -> None:
        with self._transaction() as cur:
            cur.execute('DELETE FROM vms WHERE user_id = ?', (user_id,))


class _Transaction:
    """``with store._transaction() as cur``: BEGIN IMMEDIATE .. COMMIT."""

    def __init__(self, store: StateStore):
        self._store = store

    def __enter__(self) -> sqlite3.Cursor:
        self._store._lock.acquire()
        try:
            if self._store._conn is None:
                raise exception.StateError(path=self._store.path,
                                           reason='the store is closed')
            self._cur = self._store._conn.cursor()
            self._cur.execute('BEGIN IMMEDIATE')
        except BaseException:
            self._store._lock.release()
            raise
        return self._cur

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._cur.execute('COMMIT')
            else:
                self._cur.execute('ROLLBACK')
        finally:
            self._cur.close()
            self._store._lock.release()


def _vm_to_row(vm: objects.Vm) -> tuple:
    values = []
    for column in _VM_COLUMNS:
        value = getattr(vm, column)
        if column == 'pending_resize':
            value = json.dumps(value) if value is not None else None
        elif column == 'as_ready':
            value = int(bool(value))
        elif column in ('status', 'os_type'):
            value = int(value)
        values.append(value)
    return tuple(values)


def _row_to_vm(row: tuple) -> objects.Vm:
    data = dict(zip(_VM_COLUMNS, row, strict=True))
    data['as_ready'] = bool(data['as_ready'])
    if data['pending_resize'] is not None:
        data['pending_resize'] = json.loads(data['pending_resize'])
    return objects.Vm(**data)
