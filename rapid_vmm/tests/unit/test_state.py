"""Tests of rapid_vmm.state: the durable SQLite store."""

import hashlib
import os
import random
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import fixtures
import pytest
import testtools

from rapid_vmm import exception
from rapid_vmm import objects
from rapid_vmm import state
from rapid_vmm.tests.unit import state_writer


@pytest.fixture
def store(tmp_path):
    store = state.StateStore(str(tmp_path / 'data'))
    store.open()
    yield store
    store.close()


def vm(user_id, **fields):
    values = dict(user_id=user_id, name=f'rapid-vm-{user_id}', vcpus=1,
                  memory_mb=1024, disk_gb=20)
    values.update(fields)
    return objects.Vm(**values)


def sha256(path):
    with open(path, 'rb') as stream:
        return hashlib.sha256(stream.read()).hexdigest()


def user_version(path):
    conn = sqlite3.connect(path)
    try:
        return conn.execute('PRAGMA user_version').fetchone()[0]
    finally:
        conn.close()


# -- creation, pragmas ------------------------------------------------------


def test_open_creates_directory_and_schema(tmp_path):
    data = tmp_path / 'a' / 'b'
    store = state.StateStore(str(data))
    store.open()
    try:
        assert store.path == str(data / state.DB_NAME)
        assert os.path.isfile(store.path)
        assert store.list_vms() == []
        assert store.get_meta() == {}
    finally:
        store.close()
    assert user_version(store.path) == state.SCHEMA_VERSION
    conn = sqlite3.connect(store.path)
    tables = {row[0] for row in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert {'meta', 'vms'} <= tables


def test_wal_and_synchronous_full(store):
    conn = store._conn
    assert conn.execute('PRAGMA journal_mode').fetchone()[0] == 'wal'
    # synchronous: 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA
    assert conn.execute('PRAGMA synchronous').fetchone()[0] == 2
    # WAL is persistent: another connection sees it too.
    other = sqlite3.connect(store.path)
    try:
        assert other.execute('PRAGMA journal_mode').fetchone()[0] == 'wal'
    finally:
        other.close()


def test_reopen_keeps_data_and_does_not_migrate_again(tmp_path):
    data = str(tmp_path / 'data')
    first = state.StateStore(data)
    first.open()
    first.save_vm(vm(1))
    first.set_meta(vmm_id=7)
    first.close()
    second = state.StateStore(data)
    second.open()
    try:
        assert [v.user_id for v in second.list_vms()] == [1]
        assert second.get_meta() == {'vmm_id': 7}
    finally:
        second.close()
    assert user_version(second.path) == state.SCHEMA_VERSION


def test_closed_store_refuses_writes(store):
    store.close()
    with pytest.raises(exception.StateError, match='closed'):
        store.save_vm(vm(1))
    store.close()  # twice is fine


# -- VM records -------------------------------------------------------------


def test_round_trip_of_every_field(store):
    original = objects.Vm(
        user_id=42, name='rapid-vm-42-abc', vcpus=4, memory_mb=4096,
        disk_gb=40, os_type=objects.OsType.ANDROID, gpu_cores=3, helper=0,
        vm_id=1234, status=objects.VmStatus.SUSPENDED,
        task_state=objects.TaskState.BUILDING.value,
        driver_id='0b7c-uuid', image='/images/template.qcow2',
        disk_path='/data/instances/rapid-vm-42-abc.qcow2',
        ip_address='192.168.122.42', as_ready=True,
        pending_resize={'vcpus': 2, 'memory_mb': 2048, 'disk_gb': 40,
                        'nested': {'list': [1, 'two', None]}},
        created_at=1000.5)
    saved = store.save_vm(original)
    assert saved is original
    assert saved.created_at == 1000.5
    assert saved.updated_at >= time.time() - 60
    loaded = store.get_vm(42)
    assert loaded == original
    assert loaded is not original
    assert loaded.as_ready is True
    assert loaded.pending_resize['nested'] == {'list': [1, 'two', None]}


def test_round_trip_of_none_values_and_defaults(store):
    original = vm(5)
    store.save_vm(original)
    loaded = store.get_vm(5)
    assert loaded == original
    assert loaded.vm_id is None
    assert loaded.ip_address is None
    assert loaded.pending_resize is None
    assert loaded.driver_id is None
    assert loaded.image is None
    assert loaded.disk_path is None
    assert loaded.as_ready is False
    assert loaded.status == objects.VmStatus.STARTED
    assert loaded.created_at > 0
    assert loaded.created_at == loaded.updated_at


def test_helper_negative_user_id(store):
    helper = vm(-1, helper=1, name='rapid-helper-1-x')
    store.save_vm(helper)
    assert store.get_vm(-1) == helper


def test_big_user_id(store):
    big = vm(2 ** 63 - 1)
    store.save_vm(big)
    assert store.get_vm(2 ** 63 - 1) == big


def test_get_unknown_vm_is_none(store):
    assert store.get_vm(99) is None


def test_save_replaces_and_keeps_created_at(store):
    first = store.save_vm(vm(1))
    created = first.created_at
    time.sleep(0.01)
    second = store.save_vm(first.copy(vcpus=2, ip_address='10.0.0.1'))
    assert second.created_at == created
    assert second.updated_at > created
    loaded = store.get_vm(1)
    assert loaded.vcpus == 2
    assert loaded.ip_address == '10.0.0.1'
    assert len(store.list_vms()) == 1


def test_list_vms_helpers_first_then_user_id(store):
    for user_id, helper in ((5, 0), (-2, 2), (3, 0), (-1, 1), (10, 0)):
        store.save_vm(vm(user_id, helper=helper))
    assert [v.user_id for v in store.list_vms()] == [-2, -1, 3, 5, 10]


def test_update_vm_changes_only_given_fields(store):
    store.save_vm(vm(1, vm_id=3, ip_address='10.0.0.1'))
    before = store.get_vm(1)
    time.sleep(0.01)
    store.update_vm(1, status=objects.VmStatus.SUSPENDED, as_ready=True,
                    pending_resize={'vcpus': 2})
    after = store.get_vm(1)
    assert after.status == objects.VmStatus.SUSPENDED
    assert after.as_ready is True
    assert after.pending_resize == {'vcpus': 2}
    assert after.updated_at > before.updated_at
    assert after.created_at == before.created_at
    assert after.copy(status=before.status, as_ready=before.as_ready,
                      pending_resize=None,
                      updated_at=before.updated_at) == before


def test_update_vm_to_none(store):
    store.save_vm(vm(1, vm_id=3, ip_address='10.0.0.1',
                     pending_resize={'a': 1}))
    store.update_vm(1, vm_id=None, ip_address=None, pending_resize=None)
    loaded = store.get_vm(1)
    assert (loaded.vm_id, loaded.ip_address, loaded.pending_resize) == (
        None, None, None)


def test_update_vm_unknown_field(store):
    store.save_vm(vm(1))
    with pytest.raises(ValueError, match='bogus'):
        store.update_vm(1, bogus=1)
    with pytest.raises(ValueError):
        store.update_vm(1, **{'vcpus = 9; --': 1})
    assert store.get_vm(1).vcpus == 1


def test_update_unknown_vm_creates_nothing(store):
    store.update_vm(77, status=objects.VmStatus.STOPPED)
    assert store.get_vm(77) is None


def test_delete_vm(store):
    store.save_vm(vm(1))
    store.save_vm(vm(2))
    store.delete_vm(1)
    assert store.get_vm(1) is None
    assert [v.user_id for v in store.list_vms()] == [2]
    store.delete_vm(1)  # missing: fine


def test_find_vm_by_ip(store):
    store.save_vm(vm(1, ip_address='10.0.0.1'))
    store.save_vm(vm(2, ip_address='10.0.0.2'))
    assert store.find_vm_by_ip('10.0.0.2').user_id == 2
    assert store.find_vm_by_ip('10.0.0.3') is None
    # Two records with one address (a stale one): the newest wins.
    time.sleep(0.01)
    store.save_vm(vm(3, ip_address='10.0.0.1'))
    assert store.find_vm_by_ip('10.0.0.1').user_id == 3
    time.sleep(0.01)
    store.update_vm(1, as_ready=True)
    assert store.find_vm_by_ip('10.0.0.1').user_id == 1


# -- meta ---------------------------------------------------------------


def test_meta_json_values(store):
    values = {'vmm_id': 12, 'slam_host': '10.1.1.1', 'slam_port': None,
              'registered': True, 'ratio': 1.5,
              'nested': {'list': [1, 2, {'a': 'b'}]}}
    store.set_meta(**values)
    assert store.get_meta() == values
    store.set_meta(vmm_id=13)
    assert store.get_meta() == dict(values, vmm_id=13)


def test_meta_survives_reopen(tmp_path):
    data = str(tmp_path / 'data')
    first = state.StateStore(data)
    first.open()
    first.set_meta(vmm_id=3, slam_host='h')
    first.close()
    second = state.StateStore(data)
    second.open()
    try:
        assert second.get_meta() == {'vmm_id': 3, 'slam_host': 'h'}
    finally:
        second.close()


# -- damaged or foreign files -------------------------------------------


def test_corrupt_file_is_moved_aside(tmp_path):
    data = tmp_path / 'data'
    data.mkdir()
    garbage = os.urandom(16384)
    (data / state.DB_NAME).write_bytes(garbage)
    store = state.StateStore(str(data))
    store.open()
    try:
        asides = [p.name for p in data.iterdir()
                  if p.name.startswith(state.DB_NAME + '.corrupt-')]
        assert len(asides) == 1
        assert asides[0][len(state.DB_NAME + '.corrupt-'):].isdigit()
        assert (data / asides[0]).read_bytes() == garbage
        # The fresh database works.
        store.save_vm(vm(1))
        store.set_meta(vmm_id=1)
        assert store.get_vm(1).user_id == 1
        assert store.get_meta() == {'vmm_id': 1}
    finally:
        store.close()
    assert user_version(str(data / state.DB_NAME)) == state.SCHEMA_VERSION


def test_corrupt_pages_are_moved_aside(tmp_path):
    data = tmp_path / 'data'
    store = state.StateStore(str(data))
    store.open()
    for user_id in range(300):
        store.save_vm(vm(user_id, pending_resize={'pad': 'x' * 200}))
    store.close()
    path = data / state.DB_NAME
    assert not (data / (state.DB_NAME + '-wal')).exists() or \
        (data / (state.DB_NAME + '-wal')).stat().st_size == 0
    content = bytearray(path.read_bytes())
    page_size = int.from_bytes(content[16:18], 'big')
    assert len(content) > 4 * page_size
    rng = random.Random(4)
    for offset in range(page_size, len(content)):
        content[offset] = rng.randrange(256)
    path.write_bytes(bytes(content))
    store = state.StateStore(str(data))
    store.open()
    try:
        assert store.list_vms() == []
        store.save_vm(vm(1))
        assert [v.user_id for v in store.list_vms()] == [1]
    finally:
        store.close()
    copies = [p for p in data.glob(state.DB_NAME + '.corrupt-*')
              if not p.name.endswith(('-wal', '-shm'))]
    assert len(copies) == 1


def test_newer_schema_is_refused(tmp_path):
    data = tmp_path / 'data'
    data.mkdir()
    path = str(data / state.DB_NAME)
    conn = sqlite3.connect(path)
    conn.execute('CREATE TABLE future (x TEXT)')
    conn.execute("INSERT INTO future VALUES ('kept')")
    conn.execute(f'PRAGMA user_version = {state.SCHEMA_VERSION + 1}')
    conn.commit()
    conn.close()
    store = state.StateStore(str(data))
    with pytest.raises(exception.StateError, match='newer') as info:
        store.open()
    store.close()
    assert path in str(info.value)
    assert user_version(path) == state.SCHEMA_VERSION + 1
    conn = sqlite3.connect(path)
    assert conn.execute('SELECT x FROM future').fetchall() == [('kept',)]
    conn.close()
    assert not list(data.glob('*.corrupt-*'))


def test_data_path_that_is_a_file(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    for data in (blocker, blocker / 'sub'):
        store = state.StateStore(str(data))
        with pytest.raises(exception.StateError):
            store.open()


class StateBugTest(testtools.TestCase):
    """Production bugs of StateStore.open, shown as expected failures."""

    def setUp(self):
        super().setUp()
        self.data = self.useFixture(fixtures.TempDir()).path
        self.path = os.path.join(self.data, state.DB_NAME)

    def _newer_db(self):
        conn = sqlite3.connect(self.path)
        conn.execute('CREATE TABLE meta (key TEXT PRIMARY KEY, '
                     'value TEXT NOT NULL)')
        conn.execute(f'PRAGMA user_version = {state.SCHEMA_VERSION + 1}')
        conn.commit()
        conn.close()

    # BUG: open() switches the file to WAL (PRAGMA journal_mode=WAL rewrites
    # the header and creates -wal/-shm) before it reads user_version, so a
    # newer release's database is modified although it is "refused".
    def test_newer_schema_file_is_byte_identical(self):
        self._newer_db()
        digest = sha256(self.path)
        store = state.StateStore(self.data)
        self.assertRaises(exception.StateError, store.open)
        store.close()
        self.assertEqual(digest, sha256(self.path))
        self.assertEqual([state.DB_NAME], sorted(os.listdir(self.data)))

    # BUG: when _migrate() raises StateError the connection stays open in
    # store._conn, so the refused store still reads and writes the newer
    # database (here set_meta writes into it).
    def test_refused_store_is_closed(self):
        self._newer_db()
        store = state.StateStore(self.data)
        self.assertRaises(exception.StateError, store.open)
        try:
            self.assertRaises(exception.StateError, store.set_meta, a=1)
        finally:
            store.close()
        conn = sqlite3.connect(self.path)
        self.assertEqual([], conn.execute('SELECT * FROM meta').fetchall())
        conn.close()

    # BUG: a data_path that exists but cannot be written makes
    # sqlite3.connect fail with OperationalError ("unable to open database
    # file"); open() takes it for corruption, logs a bogus "moved it to"
    # line and re-raises the raw sqlite3.OperationalError, not StateError.
    def test_unwritable_data_path_is_state_error(self):
        if not _make_unwritable(self.data, self.addCleanup):
            self.skipTest('cannot make a directory read-only here')
        store = state.StateStore(self.data)
        self.assertRaises(exception.StateError, store.open)

    # BUG: open() closes the failed connection before it moves the files
    # aside; closing the last connection makes SQLite delete the -wal file,
    # so the "for suffix in ('', '-wal', '-shm')" loop never finds it and
    # the WAL (possibly holding the latest commits) is lost, not kept.
    def test_corrupt_wal_is_moved_aside_too(self):
        with open(self.path, 'wb') as stream:
            stream.write(os.urandom(16384))
        with open(self.path + '-wal', 'wb') as stream:
            stream.write(b'wal content' * 100)
        store = state.StateStore(self.data)
        store.open()
        store.close()
        walls = [n for n in os.listdir(self.data)
                 if '.corrupt-' in n and n.endswith('-wal')]
        self.assertEqual(1, len(walls))

    # BUG: the aside name has a 1 s resolution (int(time.time())); a second
    # corruption within the same second overwrites the first saved copy.
    def test_two_corruptions_keep_two_copies(self):
        self.useFixture(fixtures.MockPatchObject(
            state.time, 'time', return_value=1700000000.25))
        for content in (b'first garbage' * 100, b'second garbage' * 100):
            with open(self.path, 'wb') as stream:
                stream.write(content)
            store = state.StateStore(self.data)
            store.open()
            store.close()
            os.unlink(self.path)
            for suffix in ('-wal', '-shm'):
                if os.path.exists(self.path + suffix):
                    os.unlink(self.path + suffix)
        asides = [n for n in os.listdir(self.data) if '.corrupt-' in n]
        self.assertEqual(2, len(asides))


def _make_unwritable(path, add_cleanup):
    """Make ``path`` unwritable, even for root (chattr +i); False if not."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        add_cleanup(os.chmod, path, 0o755)
        return True
    if shutil.which('chattr') is None:
        return False
    result = subprocess.run(['chattr', '+i', path], capture_output=True,
                            check=False)
    if result.returncode != 0:
        return False
    add_cleanup(subprocess.run, ['chattr', '-i', path], check=False)
    return True


def test_unwritable_helper_really_blocks_writes(tmp_path):
    """The helper used above really makes the directory unwritable."""
    data = tmp_path / 'ro'
    data.mkdir()
    cleanups = []
    if not _make_unwritable(str(data),
                            lambda f, *a, **k: cleanups.append((f, a, k))):
        pytest.skip('cannot make a directory read-only here')
    try:
        with pytest.raises(OSError):
            (data / 'x').write_text('x')
    finally:
        for func, args, kwargs in cleanups:
            func(*args, **kwargs)


# -- concurrency and durability -----------------------------------------


def test_concurrent_writers_lose_nothing(store):
    errors = []
    per_thread = 25

    def writer(n):
        try:
            for i in range(per_thread):
                user_id = n * 1000 + i
                store.save_vm(vm(user_id, ip_address=f'10.0.{n}.{i}'))
                store.update_vm(user_id, status=objects.VmStatus.SUSPENDED)
                store.set_meta(**{f'thread{n}': i})
                assert store.get_vm(user_id) is not None
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    vms = store.list_vms()
    assert len(vms) == 20 * per_thread
    assert {v.user_id for v in vms} == {n * 1000 + i for n in range(20)
                                        for i in range(per_thread)}
    assert all(v.status == objects.VmStatus.SUSPENDED for v in vms)
    assert store.get_meta() == {f'thread{n}': per_thread - 1
                                for n in range(20)}


def _run_writer_and_kill(data, first, delay, after_open=True):
    """Start the writer child and SIGKILL it ``delay`` s later.

    ``after_open`` counts the delay from the moment the store is open;
    otherwise from the start (so opening and migrating can be hit).
    Returns the user ids the child reported as committed.
    """
    proc = subprocess.Popen(
        [sys.executable, '-m', 'rapid_vmm.tests.unit.state_writer', data,
         str(first)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if after_open:
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, 'the writer did not open the store in 30 s'
            assert proc.stdout.readline() == b'open\n', proc.stderr.read()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, err
    return [int(line) for line in out.split() if line.isdigit()]


def test_durability_under_sigkill(tmp_path):
    data = str(tmp_path / 'data')
    rng = random.Random()
    seed = rng.randrange(2 ** 32)
    rng.seed(seed)
    committed = []
    for run in range(10):
        after_open = rng.random() >= 0.3
        reported = _run_writer_and_kill(
            data, run * 100000, rng.uniform(0.0, 0.3 if after_open else 0.4),
            after_open)
        committed.extend(reported)
        if not os.path.exists(os.path.join(data, state.DB_NAME)):
            # Killed before the store was created: nothing to check yet.
            assert not committed, f'seed {seed}'
            continue
        # The database opens cleanly after each kill.
        conn = sqlite3.connect(os.path.join(data, state.DB_NAME))
        try:
            assert conn.execute('PRAGMA quick_check').fetchone()[0] == 'ok'
        finally:
            conn.close()
        store = state.StateStore(data)
        store.open()
        try:
            assert not [n for n in os.listdir(data) if '.corrupt-' in n]
            stored = {v.user_id: v for v in store.list_vms()}
            missing = [u for u in committed if u not in stored]
            assert not missing, f'seed {seed}: lost {missing[:10]}'
            for user_id in reported:
                expected = state_writer.record(user_id)
                got = stored[user_id]
                assert got.status == objects.VmStatus.SUSPENDED
                assert got.as_ready is True
                assert got.copy(status=expected.status, as_ready=False,
                                created_at=0.0, updated_at=0.0) == expected
            if reported:
                assert store.get_meta()['last'] >= reported[-1]
        finally:
            store.close()
    # The child really wrote something in most runs.
    assert len(committed) >= 10, f'seed {seed}'


def test_writer_helper_record_is_deterministic():
    assert state_writer.record(300) == state_writer.record(300)
    assert state_writer.record(300).ip_address == '10.0.1.44'


def test_kill_is_real_sigkill_not_cleanup(tmp_path):
    """The child leaves a -wal file: it was killed, not closed."""
    data = str(tmp_path / 'data')
    reported = _run_writer_and_kill(data, 0, 0.2)
    assert reported
    assert os.path.exists(os.path.join(data, state.DB_NAME + '-wal'))


# -- schema 2: migration, transactions, outbox ----------------------------


def test_schema_1_is_migrated_with_its_records(tmp_path):
    data = tmp_path / 'data'
    data.mkdir()
    path = str(data / state.DB_NAME)
    conn = sqlite3.connect(path)
    conn.executescript(state._SCHEMA_V1)
    conn.execute(
        "INSERT INTO vms (user_id, vm_id, name, status, vcpus, memory_mb, "
        "disk_gb, created_at, updated_at) VALUES "
        "(7, 1001, 'rapid-vm-7-x', 3, 2, 2048, 20, 1.0, 2.0)")
    conn.execute("INSERT INTO meta VALUES ('vmm_id', '42')")
    conn.execute('PRAGMA user_version = 1')
    conn.commit()
    conn.close()
    store = state.StateStore(str(data))
    store.open()
    try:
        got = store.get_vm(7)
        assert (got.vm_id, got.status, got.vcpus) == (1001, 3, 2)
        assert (got.memory_max_mb, got.saved, got.state_reason,
                got.as_protocol, got.intent) == (0, False, '', None, None)
        assert store.get_meta() == {'vmm_id': 42}
        assert store.outbox_depth() == {}
    finally:
        store.close()
    assert user_version(path) == 2


def test_new_fields_round_trip(store):
    store.save_vm(vm(7, memory_max_mb=4096, saved=True,
                     state_reason='paused: I/O error', as_protocol='legacy',
                     intent={'op': 'resize', 'to': [2, 2048, 20]}))
    got = store.get_vm(7)
    assert got.memory_max_mb == 4096 and got.saved is True
    assert got.state_reason == 'paused: I/O error'
    assert got.as_protocol == 'legacy'
    assert got.intent == {'op': 'resize', 'to': [2, 2048, 20]}


def test_update_vm_says_whether_a_record_exists(store):
    assert store.update_vm(7, status=2) is False
    store.save_vm(vm(7))
    assert store.update_vm(7, status=2) is True


def test_transaction_is_all_or_nothing(store):
    store.save_vm(vm(7))

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with store.transaction() as txn:
            txn.update_vm(7, status=2)
            txn.enqueue('ds', 'notify_vm', {'vm_id': 1, 'status': 2},
                        vm_key='rapid-vm-7')
            txn.set_meta(vmm_id=9)
            raise Boom()
    assert store.get_vm(7).status == 1
    assert store.outbox_messages() == []
    assert store.get_meta() == {}
    with store.transaction() as txn:
        txn.update_vm(7, status=2)
        txn.enqueue('ds', 'notify_vm', {'vm_id': 1, 'status': 2},
                    vm_key='rapid-vm-7')
    assert store.get_vm(7).status == 2
    [message] = store.outbox_messages()
    assert (message.lane, message.method, message.args) == (
        'ds', 'notify_vm', {'vm_id': 1, 'status': 2})


def test_outbox_keeps_order_per_lane(store):
    with store.transaction() as txn:
        for i in range(5):
            txn.enqueue('ds' if i % 2 else 'slam', 'm', {'i': i},
                        vm_key=f'vm-{i % 2}')
    assert [m.args['i'] for m in store.outbox_messages('ds')] == [1, 3]
    assert store.outbox_head('slam').args == {'i': 0}
    assert store.outbox_depth() == {'ds': 2, 'slam': 3}
    head = store.outbox_head('ds')
    store.outbox_failed(head.seq, 'timeout')
    assert store.outbox_head('ds').attempts == 1
    assert store.outbox_head('ds').last_error == 'timeout'
    with store.transaction() as txn:
        assert [m.args['i'] for m in txn.queued('vm-1')] == [1, 3]
        txn.set_message_args(head.seq, {'i': 1, 'vm_id': 5})
        txn.dequeue(head.seq)
    assert store.outbox_head('ds').args == {'i': 3}


def test_outbox_survives_reopen(tmp_path):
    data = str(tmp_path / 'data')
    store = state.StateStore(data)
    store.open()
    with store.transaction() as txn:
        txn.enqueue('ds', 'notify_vm', {'vm_id': 3, 'status': 4})
    store.close()
    again = state.StateStore(data)
    again.open()
    try:
        assert again.outbox_head('ds').args == {'vm_id': 3, 'status': 4}
    finally:
        again.close()


def test_find_vm_by_ip_ignores_stale_addresses(store):
    store.save_vm(vm(7, ip_address='10.0.0.9', status=4))
    store.save_vm(vm(8, ip_address='10.0.0.9', task_state='deleting'))
    assert store.find_vm_by_ip('10.0.0.9') is None
    store.save_vm(vm(9, ip_address='10.0.0.9', status=2))
    assert store.find_vm_by_ip('10.0.0.9').user_id == 9


def test_get_vm_gives_a_new_object_and_sees_every_commit(store):
    store.save_vm(vm(5))
    first = store.get_vm(5)
    first.vcpus = 8  # the caller's copy only
    assert store.get_vm(5).vcpus == 1
    store.update_vm(5, vcpus=2)
    assert store.get_vm(5).vcpus == 2
    with store.transaction() as txn:
        txn.update_vm(5, vcpus=4)
    assert store.get_vm(5).vcpus == 4
    store.delete_vm(5)
    assert store.get_vm(5) is None
    store.save_vm(vm(5, vcpus=3))
    assert store.get_vm(5).vcpus == 3


def test_a_rolled_back_change_is_not_seen(store):
    store.save_vm(vm(6))
    assert store.get_vm(6).vcpus == 1
    with pytest.raises(RuntimeError), store.transaction() as txn:
        txn.update_vm(6, vcpus=4)
        raise RuntimeError('no')
    assert store.get_vm(6).vcpus == 1


def test_a_read_that_races_a_commit_is_not_kept(store, monkeypatch):
    store.save_vm(vm(7))
    real = state.Txn.get_vm_row
    raced = []

    def read_then_commit(self, user_id):
        row = real(self, user_id)  # the value before the commit below
        if not raced:
            raced.append(True)
            store.update_vm(7, vcpus=2)
        return row

    monkeypatch.setattr(state.Txn, 'get_vm_row', read_then_commit)
    assert store.get_vm(7).vcpus == 1  # what that read saw
    assert store.get_vm(7).vcpus == 2  # not kept: read again
