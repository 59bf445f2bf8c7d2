"""Never lose a VM, never lose a message (issue 8, SPEC 6 and 9).

The agent runs as a process on RabbitMQ against libvirtd's test driver
(``test+unix:///default``): every call is a real RPC and the domains
survive the agent, so a restart finds them again. Each test has its own
``host``, topics and data path, and removes its domains at the end.
"""

import concurrent.futures
import os
import subprocess
import sys
import time

import hypothesis
from hypothesis import strategies as st
import libvirt
import oslo_messaging as messaging
import testtools

from rapid_vmm import exception
from rapid_vmm import faults
from rapid_vmm.tests.functional import agent as agent_fixture
from rapid_vmm.virt.libvirt import config as vconfig

URI = 'test+unix:///default'


def libvirtd_serves() -> bool:
    try:
        libvirt.open(URI).close()
        return True
    except libvirt.libvirtError:
        return False


def start(api, user_id, **kwargs):
    kwargs.setdefault('vcpus', 1)
    kwargs.setdefault('memory_mb', 1024)
    return api.start_vm({}, user_id=user_id, os_type=0, **kwargs)


class ReliabilityTestCase(testtools.TestCase):

    overrides: dict = {}

    def setUp(self):
        super().setUp()
        if not libvirtd_serves():
            self.skipTest(f'libvirtd does not serve {URI} (run '
                          'tools/system/setup-host.sh)')
        overrides = {'libvirt.connection_uri': URI,
                     'reconcile_absent_seconds': 0}
        overrides.update(self.overrides)
        self.agent = self.useFixture(agent_fixture.AgentProcess(**overrides))
        self.agent.start()
        self.api = self.agent.api
        self.host = self.agent.values[('DEFAULT', 'host')]
        self.data_path = self.agent.values[('DEFAULT', 'data_path')]

    # -- helpers -----------------------------------------------------------

    def wait_until(self, predicate, timeout=30, what='condition'):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                self.fail(f'{what} not reached in {timeout} s\n'
                          f'{self.agent.log_tail()}')
            time.sleep(0.1)

    def domains(self):
        return agent_fixture.owned_domains(URI, self.host)

    def disks(self):
        images = os.path.join(self.data_path, 'instances')
        return {os.path.join(images, name) for name in os.listdir(images)
                if name.endswith('.qcow2')}

    def registered(self, user_id):
        """Wait until the DS knows the user's VM and its domain says so.

        The DS id reaches the domain's metadata by a worker of its own,
        after the record: a test that edits the metadata or the database
        must not race that write.
        """
        vm = self.wait_until(
            lambda: next((vm for vm in self.api.get_vm_info({})
                          if vm['user_id'] == user_id and vm['vm_id']),
                         None), what=f'DS id of user {user_id}')
        self.wait_until(lambda: self.metadata_vm_id(vm['name']) ==
                        vm['vm_id'], what=f'DS id in {vm["name"]} metadata')
        return vm

    @staticmethod
    def metadata_vm_id(name):
        conn = libvirt.open(URI)
        try:
            xml = conn.lookupByName(name).metadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT, vconfig.METADATA_NS)
        except libvirt.libvirtError:
            return None
        finally:
            conn.close()
        return (vconfig.parse_metadata(xml) or {}).get('vm_id')

    def assert_consistent(self):
        """Records, domains and disks agree; nothing is in flight."""
        records = {vm['name']: vm for vm in self.api.get_vm_info({})}
        self.assertEqual(set(records), set(self.domains()))
        self.assertEqual(
            [], [vm for vm in records.values() if vm['task_state']])
        status = self.api.get_host_status({})
        self.assertEqual(len(records), len(status['vms']))
        self.assertEqual(len(self.disks()), len(records), self.disks())

    def register_vm_calls(self):
        return self.agent.ds.recorder.calls('register_vm')


class TestRestartKeepsEverything(ReliabilityTestCase):

    def test_running_and_suspended_vms_survive_a_restart(self):
        running = self.registered(start(self.api, 1)['user_id'])
        suspended = self.registered(start(self.api, 2)['user_id'])
        self.api.suspend_vm({}, user_id=2)
        self.agent.terminate()
        self.agent.start()
        vms = {vm['user_id']: vm for vm in self.api.get_vm_info({})}
        self.assertEqual((running['name'], 1, running['vm_id']),
                         (vms[1]['name'], vms[1]['status'], vms[1]['vm_id']))
        self.assertEqual((suspended['name'], 2), (vms[2]['name'],
                                                  vms[2]['status']))
        self.assertEqual(1, len(self.agent.ds.recorder.calls(
            'register_vmm')))
        self.assertEqual(2, len(self.register_vm_calls()))
        self.assertEqual(3, self.api.resume_vm({}, user_id=2)['status'])
        self.assert_consistent()

    def test_a_host_change_refuses_to_start_and_destroys_nothing(self):
        vm = self.registered(start(self.api, 3)['user_id'])
        self.agent.terminate()
        self.agent.reconfigure(host=self.host + '.example.org')
        result = subprocess.run(
            [sys.executable, '-m', 'rapid_vmm.cmd.vmm', '--config-file',
             self.agent.config_file], capture_output=True, text=True,
            timeout=60, check=False)
        self.assertEqual(1, result.returncode, result.stderr)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(1, len(lines), result.stderr)
        self.assertIn('previous_host', lines[0])
        self.assertEqual(1, len(self.agent.log_lines('cannot start')))
        self.assertEqual({vm['name']: libvirt.VIR_DOMAIN_RUNNING},
                         self.domains())
        self.assertEqual(1, len(self.disks()))
        # Declared as a rename, it takes its state and domains over.
        self.agent.reconfigure(previous_host=self.host)
        self.host += '.example.org'
        self.api = self.agent.api = type(self.api)(
            self.agent.conf, self.agent.transport, host=self.host,
            timeout=60)
        self.agent.start()
        got = self.api.get_vm_info({}, user_id=3)[0]
        self.assertEqual((vm['name'], 1, vm['vm_id'], ''),
                         (got['name'], got['status'], got['vm_id'],
                          got['task_state']))
        self.wait_until(lambda: vm['name'] in self.domains(),
                        what='domain owner rewritten')

    def test_removed_metadata_marks_unknown_and_destroys_nothing(self):
        vm = self.registered(start(self.api, 4)['user_id'])
        conn = libvirt.open(URI)
        dom = conn.lookupByName(vm['name'])
        for flags in (libvirt.VIR_DOMAIN_AFFECT_LIVE,
                      libvirt.VIR_DOMAIN_AFFECT_CONFIG):
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None,
                            vconfig.METADATA_NS, flags)
        self.addCleanup(agent_fixture.destroy_owned_domains, URI, self.host,
                        [vm['name']])
        self.agent.terminate()
        self.agent.start()
        got = self.api.get_vm_info({}, user_id=4)[0]
        self.assertEqual(('unknown', 1), (got['task_state'], got['status']))
        self.assertTrue(dom.isActive())
        self.assertEqual(1, len(self.disks()))
        self.assertRaises(exception.VmStateConflict, self.api.remove_vm, {},
                          user_id=4)
        self.assertTrue(dom.isActive())
        self.assertEqual(1, len(self.disks()))
        conn.close()

    def test_hypervisor_unreachable_at_start_changes_nothing(self):
        vm = self.registered(start(self.api, 5)['user_id'])
        self.agent.terminate()
        missing = os.path.join(self.data_path, 'no-such-libvirtd.sock')
        self.agent.reconfigure(**{
            'libvirt.connection_uri': f'{URI}?socket={missing}'})
        self.agent.start()
        status = self.api.get_host_status({})
        self.assertFalse(status['driver_reachable'])
        got = self.api.get_vm_info({}, user_id=5)[0]
        self.assertEqual((vm['name'], 1, vm['vm_id']),
                         (got['name'], got['status'], got['vm_id']))
        self.assertRaises(exception.RapidVmmException, self.api.suspend_vm,
                          {}, user_id=5)
        self.agent.terminate()
        self.agent.reconfigure(**{'libvirt.connection_uri': URI})
        self.agent.start()
        self.assertEqual(1, self.api.get_vm_info({}, user_id=5)[0]['status'])
        self.assert_consistent()

    def _lose_the_database(self, how):
        vms = [self.registered(start(self.api, user)['user_id'])
               for user in (6, 7)]
        self.api.suspend_vm({}, user_id=7)
        vmm_id = self.api.get_host_status({})['vmm_id']
        self.agent.kill()
        path = os.path.join(self.data_path, 'state.sqlite')
        how(path)
        self.agent.start()
        got = {vm['user_id']: vm for vm in self.wait_until(
            lambda: len(self.api.get_vm_info({})) == 2 and
            self.api.get_vm_info({}), what='records rebuilt')}
        self.assertEqual({(vm['name'], vm['vm_id']) for vm in vms},
                         {(vm['name'], vm['vm_id']) for vm in got.values()})
        self.assertEqual(2, got[7]['status'])
        self.assertEqual(vmm_id, self.api.get_host_status({})['vmm_id'])
        time.sleep(1.5)
        self.assertEqual(1, len(self.agent.ds.recorder.calls(
            'register_vmm')))
        self.assertEqual(2, len(self.register_vm_calls()))
        self.assert_consistent()

    def test_missing_database_is_rebuilt_from_metadata(self):
        def remove(path):
            for suffix in ('', '-wal', '-shm'):
                if os.path.exists(path + suffix):
                    os.unlink(path + suffix)
        self._lose_the_database(remove)

    def test_corrupt_database_is_rebuilt_from_metadata(self):
        def corrupt(path):
            for suffix in ('-wal', '-shm'):
                if os.path.exists(path + suffix):
                    os.unlink(path + suffix)
            with open(path, 'r+b') as db:
                db.write(b'this is not a SQLite database' * 40)
        self._lose_the_database(corrupt)

    def test_truncated_database_is_rebuilt_from_metadata(self):
        def truncate(path):
            for suffix in ('-wal', '-shm'):
                if os.path.exists(path + suffix):
                    os.unlink(path + suffix)
            size = os.path.getsize(path)
            with open(path, 'r+b') as db:
                db.truncate(size // 3)
        self._lose_the_database(truncate)

    def test_newer_schema_stops_with_one_line(self):
        self.agent.terminate()
        import sqlite3
        conn = sqlite3.connect(os.path.join(self.data_path, 'state.sqlite'))
        conn.execute('PRAGMA user_version = 99')
        conn.commit()
        conn.close()
        result = subprocess.run(
            [sys.executable, '-m', 'rapid_vmm.cmd.vmm', '--config-file',
             self.agent.config_file], capture_output=True, text=True,
            timeout=60, check=False)
        self.assertEqual(1, result.returncode)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(1, len(lines), result.stderr)
        self.assertIn('schema version 99', lines[0])


class TestSigkillAtEachStep(ReliabilityTestCase):
    """SIGKILL at every fault point, then a restart: consistent records,
    no leaked domain or disk, no duplicate DS entry."""

    def _crash_at(self, point, operation):
        self.agent.terminate()
        self.agent.start(env={faults.ENV: point})
        try:
            operation()
        except (messaging.MessagingTimeout, exception.RapidVmmException):
            pass
        self.agent.process.wait(30)
        self.assertEqual(-9, self.agent.process.returncode, point)
        self.agent.start()
        # The first pass after the restart settles what was in flight.
        self.wait_until(lambda: not [vm for vm in self.api.get_vm_info({})
                                     if vm['task_state']],
                        what=f'in-flight work settled after {point}')
        self.assert_consistent()

    def _no_duplicate_ds_entries(self):
        time.sleep(1)
        registered = [c['vm_id'] for c in self.register_vm_calls()]
        for vm in self.api.get_vm_info({}):
            if vm['vm_id'] is not None:
                self.assertEqual(1, registered.count(vm['vm_id']))

    def test_start_vm(self):
        quick = dict(timeout=8)
        for user, point in enumerate(p for p in faults.POINTS
                                     if p.startswith('start.')):
            self._crash_at(point, lambda u=100 + user: self.api.client
                           .prepare(**quick).call(
                               {}, 'start_vm', user_id=u, os_type=0,
                               vcpus=1, memory_mb=1024))
            # The user can start again and gets one VM.
            vm = start(self.api, 100 + user)
            self.assertEqual(1, vm['status'])
        self._no_duplicate_ds_entries()
        self.assert_consistent()

    def test_change_flavor(self):
        start(self.api, 200)
        self.registered(200)
        for point in ('resize.recorded', 'resize.resized'):
            self._crash_at(point, lambda: self.api.client.prepare(
                timeout=8).call({}, 'change_flavor', user_id=200,
                                 vcpus=2))
            vm = self.api.get_vm_info({}, user_id=200)[0]
            self.assertIn(vm['vcpus'], (1, 2))
            self.assertEqual(1, vm['status'])
            if vm['vcpus'] == 2:
                self.api.confirm_flavor({}, user_id=200)
                self.api.change_flavor({}, user_id=200, vcpus=1)
                self.api.confirm_flavor({}, user_id=200)
        self.assertEqual(1, len([c for c in self.register_vm_calls()
                                 if c['user_id'] == 200]))

    def test_remove_vm(self):
        for user, point in enumerate(('remove.recorded',
                                      'remove.destroyed')):
            vm = self.registered(start(self.api, 300 + user)['user_id'])
            self._crash_at(point, lambda u=300 + user: self.api.client
                           .prepare(timeout=8).call({}, 'remove_vm',
                                                     user_id=u))
            self.assertEqual([], [v for v in self.api.get_vm_info({})
                                  if v['user_id'] == 300 + user])
            self.agent.ds.recorder.wait_for(
                'notify_vm', lambda kw, i=vm['vm_id']: kw == {
                    'vm_id': i, 'status': 4}, timeout=30)


class TestSlowDirectoryServer(ReliabilityTestCase):

    # Longer than the DS takes: a message is not sent twice.
    overrides = {'peer_reply_timeout': 30}

    def test_other_requests_are_served_while_the_ds_takes_20_s(self):
        self.agent.ds.recorder.wait_for('register_vmm', timeout=30)
        self.agent.ds.endpoint.delay = 20
        started = time.monotonic()
        vm = start(self.api, 10)  # its registration is queued, not awaited
        self.assertLess(time.monotonic() - started, 10)
        started = time.monotonic()
        start(self.api, 11)
        self.assertLess(time.monotonic() - started, 10)
        started = time.monotonic()
        self.api.get_host_status({})
        self.assertLess(time.monotonic() - started, 2)
        self.api.suspend_vm({}, user_id=10)
        # Every registration and status change arrives, once each.
        self.agent.ds.recorder.wait_for('register_vm', count=2, timeout=120)
        self.agent.ds.recorder.wait_for(
            'notify_vm', lambda kw: kw['status'] == 2, timeout=120)
        time.sleep(2)
        users = [c['user_id'] for c in self.register_vm_calls()]
        self.assertEqual(sorted(users), sorted(set(users)))
        self.assertIsNotNone(self.api.get_vm_info({}, user_id=10)[0]['vm_id'])
        self.assertEqual(vm['name'],
                         self.api.get_vm_info({}, user_id=10)[0]['name'])


VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2 ** 70,
                                          max_value=2 ** 70),
    st.floats(allow_nan=True), st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.sampled_from(['cpu', 'suspend', 'remove', '127.0.0.1', 'y' * 4000]))
NAMES = st.sampled_from(['user_id', 'os_type', 'vcpus', 'memory_mb',
                         'gpu_cores', 'disk_gb', 'resource', 'action',
                         'ip_address', 'ready', 'context', 'extra'])
METHODS = st.sampled_from([
    'start_vm', 'resume_vm', 'suspend_vm', 'remove_vm', 'get_vm_info',
    'get_vm_usage', 'change_flavor', 'confirm_flavor', 'as_register',
    'as_confirm', 'as_notify', 'deregister_vm', 'get_host_status', 'conf',
    'init_host', 'stop', 'cleanup_host', 'user_lock', 'delete_vm',
    'before_resize', '__init__', 'manager'])


class TestFuzzedRpc(ReliabilityTestCase):

    def test_fuzzed_calls_get_typed_errors_and_change_nothing(self):
        probe = self.registered(start(self.api, 50)['user_id'])
        client = self.api.client.prepare(timeout=20)

        @hypothesis.settings(max_examples=120, deadline=None,
                             suppress_health_check=list(
                                 hypothesis.HealthCheck))
        @hypothesis.given(method=METHODS,
                          kwargs=st.dictionaries(NAMES, VALUES, max_size=4))
        def fuzz(method, kwargs):
            if kwargs.get('user_id') == 50:
                kwargs['user_id'] = 51
            try:
                client.call({}, method, **kwargs)
            except exception.InternalError as exc:
                raise AssertionError(
                    f'{method}({kwargs!r:.100}): {exc}') from exc
            except exception.RapidVmmException:
                pass

        fuzz()
        got = self.api.get_vm_info({}, user_id=50)[0]
        self.assertEqual((probe['name'], probe['status'], probe['vcpus']),
                         (got['name'], got['status'], got['vcpus']))
        self.assertEqual(self.host, self.api.get_host_status({})['host'])
        with open(self.agent.log_file, encoding='utf-8') as log:
            text = log.read()
        self.assertNotIn('Traceback', text)
        self.assertIsNone(self.agent.process.poll())


class TestConcurrentLoad(ReliabilityTestCase):

    def test_parallel_lifecycles_keep_records_and_messages(self):
        users = range(400, 430)
        with concurrent.futures.ThreadPoolExecutor(15) as pool:
            list(pool.map(lambda u: start(self.api, u), users))
            list(pool.map(lambda u: self.api.suspend_vm({}, user_id=u),
                          users))
            list(pool.map(lambda u: self.api.resume_vm({}, user_id=u),
                          users))
        ds = self.agent.ds.recorder
        ds.wait_for('register_vm', count=len(users), timeout=60)
        ds.wait_for('notify_vm', lambda kw: kw['status'] == 3,
                    count=len(users), timeout=60)
        self.assert_consistent()


class TestBrokerRestartUnderLoad(testtools.TestCase):
    """RabbitMQ restarted under load, on a private node of the test's own
    (never the shared one): every caller answered or given a typed error
    within its bound, no record lost, every status change and the reports
    reach the DS afterwards."""

    CALL_BOUND = 60

    def setUp(self):
        super().setUp()
        if not libvirtd_serves():
            self.skipTest(f'libvirtd does not serve {URI}')
        from rapid_vmm.tests.functional import broker as broker_fixture
        self.broker = self.useFixture(broker_fixture.PrivateBroker())
        self.agent = self.useFixture(agent_fixture.AgentProcess(
            transport_url=self.broker.transport_url, **{
                'libvirt.connection_uri': URI,
                'reconcile_absent_seconds': 0}))
        self.agent.start()
        self.api = type(self.agent.api)(
            self.agent.conf, self.agent.transport, timeout=self.CALL_BOUND)

    def _cycle(self, user_id, stop):
        """Start, then suspend/resume in a loop; every outcome recorded."""
        outcomes = []
        started = time.monotonic()
        try:
            start(self.api, user_id)
            outcomes.append(('start', 'ok', time.monotonic() - started))
        except (exception.RapidVmmException,
                messaging.MessagingException) as exc:
            outcomes.append(('start', type(exc).__name__,
                             time.monotonic() - started))
        while not stop.is_set():
            for method in ('suspend_vm', 'resume_vm'):
                began = time.monotonic()
                try:
                    getattr(self.api, method)({}, user_id=user_id)
                    outcomes.append((method, 'ok', time.monotonic() - began))
                except (exception.RapidVmmException,
                        messaging.MessagingException) as exc:
                    outcomes.append((method, type(exc).__name__,
                                     time.monotonic() - began))
        return outcomes

    def test_broker_restart_loses_no_record_and_no_message(self):
        import threading
        self.agent.ds.recorder.wait_for('register_vmm', timeout=30)
        users = list(range(600, 610))
        stop = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(len(users)) as pool:
            futures = [pool.submit(self._cycle, u, stop) for u in users]
            time.sleep(4)
            self.broker.restart()
            time.sleep(6)
            stop.set()
            results = [f.result(timeout=4 * self.CALL_BOUND)
                       for f in futures]
        outcomes = [o for r in results for o in r]
        # Every caller was answered, within its bound (plus reconnects).
        self.assertTrue(outcomes)
        slowest = max(seconds for _, _, seconds in outcomes)
        self.assertLess(slowest, 2 * self.CALL_BOUND + 30, outcomes)
        self.assertTrue(any(result == 'ok' for _, result, _ in outcomes))
        # No record lost: every user that started has its VM, settled.
        deadline = time.monotonic() + 60
        while True:
            try:
                vms = {vm['user_id']: vm for vm in
                       self.api.get_vm_info({})}
                break
            except messaging.MessagingException:
                self.assertLess(time.monotonic(), deadline)
                time.sleep(1)
        started = {u for u, r in zip(users, results, strict=True)
                   if r and r[0][1] == 'ok'}
        self.assertLessEqual(started, set(vms))
        self.assertEqual([], [vm for vm in vms.values()
                              if vm['task_state']])
        # Every VM's final status reaches the DS (the outbox replays what
        # the restart interrupted), and the reports resume.
        ds = self.agent.ds.recorder
        for vm in vms.values():
            self.wait_status(ds, vm)
        count = len(ds.calls('notify_vmm'))
        ds.wait_for('notify_vmm', count=count + 2, timeout=30)
        depth = self.api.get_host_status({})['outbox']
        self.assertEqual({'ds': 0, 'slam': 0}, depth)

    def wait_status(self, ds, vm):
        deadline = time.monotonic() + 90
        while True:
            reported = [kw['status'] for kw in ds.calls('notify_vm')
                        if kw['vm_id'] == vm['vm_id']]
            registered = [kw for kw in ds.calls('register_vm')
                          if kw['vm_id'] == vm['vm_id']]
            last = reported[-1] if reported else (
                registered[0]['status'] if registered else None)
            if vm['vm_id'] is not None and last == vm['status']:
                return
            if time.monotonic() > deadline:
                self.fail(f'the DS did not get status {vm["status"]} of '
                          f'{vm["name"]} (vm_id {vm["vm_id"]}): {reported}')
            time.sleep(0.5)
            vm = self.api.get_vm_info({}, user_id=vm['user_id'])[0]
