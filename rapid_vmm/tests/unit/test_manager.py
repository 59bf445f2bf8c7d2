"""The VMM API through its RPC client, on the in-memory transport.

The real service runs in this process with the libvirt driver on
``test:///default`` and simulated DS and SLAM peers; each test gets its
own topics, host name and data path.
"""

import concurrent.futures
import os
import threading
import time

import libvirt
import testtools

from rapid_vmm import exception
from rapid_vmm.tests import fixtures as rfix

LINUX = 0


def start(api, user_id, vcpus=1, memory_mb=1024, **kwargs):
    return api.start_vm({}, user_id=user_id, os_type=LINUX, vcpus=vcpus,
                        memory_mb=memory_mb, **kwargs)


class ManagerTestCase(testtools.TestCase):

    overrides: dict = {}

    def setUp(self):
        super().setUp()
        # test:///default lives while a connection of this process is open:
        # this one keeps the domains across the agent's restarts.
        self._conn = libvirt.open('test:///default')
        self.addCleanup(self._conn.close)
        self.f = self.useFixture(rfix.ServiceFixture(**self.overrides))
        self.api = self.f.api

    def domain(self, name):
        """The domain ``name``, through the test's own connection."""
        return self._conn.lookupByName(name)

    def domain_names(self):
        return {i.name for i in self.f.manager.driver.list_instances()}


class TestStartVm(ManagerTestCase):

    def test_start_returns_record_registers_with_ds_and_tells_slam(self):
        vm = start(self.api, 7, vcpus=2, memory_mb=2048, disk_gb=20)
        self.assertEqual(7, vm['user_id'])
        self.assertEqual(1, vm['status'])
        self.assertEqual((2, 2048, 20),
                         (vm['vcpus'], vm['memory_mb'], vm['disk_gb']))
        self.assertTrue(vm['ip_address'].startswith('192.168.'))
        self.assertIn(vm['name'], self.domain_names())
        registered = self.f.ds.recorder.wait_for(
            'register_vm', lambda kw: kw['user_id'] == 7)[0]
        self.assertEqual(vm['vm_id'], registered['vm_id'])
        self.assertEqual((0, 8, 1), (registered['category'],
                                     registered['vm_type'],
                                     registered['status']))
        started = self.f.slam.recorder.wait_for('vm_started')[0]
        self.assertEqual(vm['ip_address'], started['vm']['ip_address'])
        self.assertEqual(self.f.conf.host, started['host'])

    def test_request_is_rounded_down_to_the_grid(self):
        vm = start(self.api, 8, vcpus=3, memory_mb=4000, disk_gb=39)
        self.assertEqual((2, 2048, 20),
                         (vm['vcpus'], vm['memory_mb'], vm['disk_gb']))
        tiny = start(self.api, 9, vcpus=1, memory_mb=1)
        self.assertEqual((1, 1024, 20),
                         (tiny['vcpus'], tiny['memory_mb'], tiny['disk_gb']))
        huge = start(self.api, 10, vcpus=1024, memory_mb=10**6,
                     disk_gb=1000)
        self.assertEqual((4, 4096, 40),
                         (huge['vcpus'], huge['memory_mb'], huge['disk_gb']))

    def test_start_is_idempotent_for_a_running_vm(self):
        first = start(self.api, 11)
        again = start(self.api, 11, vcpus=4, memory_mb=4096)
        self.assertEqual(first['name'], again['name'])
        self.assertEqual(first['vcpus'], again['vcpus'])
        self.assertEqual(1, len(self.f.ds.recorder.calls('register_vm')))
        self.f.slam.recorder.wait_for('vm_started', count=2)

    def test_start_resumes_a_suspended_vm(self):
        first = start(self.api, 12)
        self.api.suspend_vm({}, user_id=12)
        resumed = start(self.api, 12)
        self.assertEqual(first['name'], resumed['name'])
        self.assertEqual(3, resumed['status'])
        self.f.ds.recorder.wait_for('notify_vm', lambda kw: kw['status'] == 3)

    def test_concurrent_starts_for_one_user_make_one_vm(self):
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            results = list(pool.map(lambda _: start(self.api, 13), range(20)))
        self.assertEqual(1, len({vm['name'] for vm in results}))
        self.assertEqual(1, len([n for n in self.domain_names()
                                 if n.startswith('rapid-vm-13-')]))
        self.assertEqual(1, len(self.f.ds.recorder.calls('register_vm')))

    def test_concurrent_starts_for_many_users_lose_none(self):
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            results = list(pool.map(lambda u: start(self.api, u),
                                    range(100, 130)))
        self.assertEqual(set(range(100, 130)),
                         {vm['user_id'] for vm in results})
        self.assertEqual(30, len(self.api.get_vm_info({})))
        self.assertEqual(30, len(self.domain_names()))


class TestStartFailures(ManagerTestCase):

    overrides = {'libvirt.ip_command': 'true', 'libvirt.ip_timeout': 1}

    def test_no_ip_cleans_up_and_reports(self):
        error = self.assertRaises(exception.DriverError, start, self.api, 20)
        self.assertIn('no address', str(error))
        self.assertEqual([], self.api.get_vm_info({}))
        self.assertEqual(set(), self.domain_names())
        images = os.path.join(self.f.conf.data_path, 'instances')
        self.assertEqual([], [n for n in os.listdir(images)
                              if n.endswith('.qcow2')])
        failed = self.f.slam.recorder.wait_for('vm_start_failed')[0]
        self.assertEqual((20, 'DriverError'),
                         (failed['user_id'], failed['error_class']))


class TestCapacity(ManagerTestCase):

    overrides = {'ram_allocation_ratio': 1.0,
                 'reserved_host_memory_mb': 0,
                 'gpu.total_cores': 100}

    def test_no_capacity_is_typed_and_changes_nothing(self):
        # test:///default says the host has 3072 MB.
        start(self.api, 30, memory_mb=2048)
        self.assertRaises(exception.NoCapacity, start, self.api, 31,
                          memory_mb=2048)
        self.assertEqual([30], [vm['user_id']
                                for vm in self.api.get_vm_info({})])
        failed = self.f.slam.recorder.wait_for('vm_start_failed')[0]
        self.assertEqual('NoCapacity', failed['error_class'])
        start(self.api, 32, memory_mb=1024)

    def test_gpu_cores_are_accounted(self):
        start(self.api, 33, gpu_cores=60)
        self.assertRaises(exception.NoCapacity, start, self.api, 34,
                          gpu_cores=60)
        self.assertRaises(exception.InvalidRequest, start, self.api, 34,
                          gpu_cores=101)
        self.assertEqual(40, start(self.api, 34, gpu_cores=40)['gpu_cores'])

    def test_available_types_shrink_as_vms_start(self):
        before = self.f.manager.reporter.sample_resources()
        self.assertIn([1, 2048, 20], before['available_types'])
        start(self.api, 35, memory_mb=2048)
        after = self.f.manager.reporter.sample_resources()
        self.assertIn([1, 1024, 20], after['available_types'])
        self.assertNotIn([1, 2048, 20], after['available_types'])


class TestAsHandshake(ManagerTestCase):

    overrides = {'as_register_timeout': 10}

    def _start_async(self, user_id):
        pool = concurrent.futures.ThreadPoolExecutor(1)
        self.addCleanup(pool.shutdown)
        return pool.submit(start, self.api, user_id)

    def _wait_for_ip(self, user_id):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                vms = self.api.get_vm_info({}, user_id=user_id)
            except exception.VmNotFound:
                vms = []
            if vms and vms[0]['ip_address']:
                return vms[0]
            time.sleep(0.05)
        self.fail('no IP')

    def test_start_waits_for_the_acceleration_server(self):
        future = self._start_async(40)
        building = self._wait_for_ip(40)
        self.assertEqual('building', building['task_state'])
        self.assertFalse(future.done())
        reply = self.api.as_register({}, ip_address=building['ip_address'])
        self.assertEqual({'user_id': 40}, reply)
        self.api.as_confirm({}, user_id=40, ready=True)
        vm = future.result(timeout=10)
        self.assertEqual(building['ip_address'], vm['ip_address'])
        self.assertTrue(self.api.get_vm_info({}, user_id=40)[0]['as_ready'])

    def test_as_not_ready_fails_the_start_and_cleans_up(self):
        future = self._start_async(41)
        self._wait_for_ip(41)
        self.api.as_confirm({}, user_id=41, ready=False)
        self.assertRaises(exception.AsNotReady, future.result, 10)
        self.assertRaises(exception.VmNotFound, self.api.get_vm_info, {},
                          user_id=41)
        self.assertEqual(set(), self.domain_names())

    def test_as_register_unknown_or_bad_address(self):
        self.assertRaises(exception.VmNotFound, self.api.as_register, {},
                          ip_address='10.9.9.9')
        self.assertRaises(exception.InvalidRequest, self.api.as_register,
                          {}, ip_address='not-an-ip')


class TestAsTimeout(ManagerTestCase):

    overrides = {'as_register_timeout': 1}

    def test_timeout_cleans_up_and_tells_ds_and_slam(self):
        self.assertRaises(exception.AsRegistrationTimeout, start, self.api,
                          42)
        self.assertEqual(set(), self.domain_names())
        self.assertEqual([], self.api.get_vm_info({}))
        vm_id = self.f.ds.recorder.wait_for('register_vm')[0]['vm_id']
        self.f.ds.recorder.wait_for(
            'notify_vm', lambda kw: kw == {'vm_id': vm_id, 'status': 4})
        failed = self.f.slam.recorder.wait_for('vm_start_failed')[0]
        self.assertEqual('AsRegistrationTimeout', failed['error_class'])


class TestLifecycle(ManagerTestCase):

    def test_suspend_resume_are_idempotent_and_reported(self):
        vm = start(self.api, 50)
        self.assertEqual(2, self.api.suspend_vm({}, user_id=50)['status'])
        self.assertEqual(2, self.api.suspend_vm({}, user_id=50)['status'])
        self.assertEqual(3, self.domain(vm['name']).state()[0])  # paused
        self.assertEqual(3, self.api.resume_vm({}, user_id=50)['status'])
        self.assertEqual(3, self.api.resume_vm({}, user_id=50)['status'])
        self.assertEqual(1, self.domain(vm['name']).state()[0])  # running
        statuses = [kw['status'] for kw in
                    self.f.ds.recorder.wait_for('notify_vm', count=2)]
        self.assertEqual([2, 3], statuses)

    def test_remove_deletes_domain_disk_record(self):
        vm = start(self.api, 51)
        disk = self.f.manager.store.get_vm(51).disk_path
        self.assertTrue(os.path.exists(disk))
        self.assertIsNone(self.api.remove_vm({}, user_id=51))
        self.assertFalse(os.path.exists(disk))
        self.assertNotIn(vm['name'], self.domain_names())
        self.assertRaises(exception.VmNotFound, self.api.get_vm_info, {},
                          user_id=51)
        self.assertRaises(exception.VmNotFound, self.api.remove_vm, {},
                          user_id=51)
        self.f.ds.recorder.wait_for('notify_vm', lambda kw: kw['status'] == 4)

    def test_operations_on_unknown_user_are_typed(self):
        for call in (self.api.suspend_vm, self.api.resume_vm,
                     self.api.remove_vm, self.api.confirm_flavor,
                     self.api.change_flavor):
            self.assertRaises(exception.VmNotFound, call, {}, user_id=99)
        self.assertRaises(exception.VmNotFound, self.api.as_confirm, {},
                          user_id=99)

    def test_memory_growth_beyond_the_ceiling_is_refused(self):
        start(self.api, 54)
        error = self.assertRaises(exception.VmStateConflict,
                                  self.api.change_flavor, {}, user_id=54,
                                  memory_mb=2048)
        self.assertIn('max_memory_mb', str(error))
        vm = self.api.get_vm_info({}, user_id=54)[0]
        self.assertEqual((1024, ''), (vm['memory_mb'], vm['task_state']))

    def test_change_flavor_then_confirm(self):
        # Growth of memory is opt-in, and then accounted at the ceiling.
        self.f.conf.set_override('max_memory_mb', 4096, group='libvirt')
        vm = start(self.api, 52)
        self.assertEqual(4096, self.f.manager.store.get_vm(52).memory_max_mb)
        resized = self.api.change_flavor({}, user_id=52, vcpus=4,
                                         memory_mb=2048)
        self.assertEqual((4, 2048, 20), (resized['vcpus'],
                                         resized['memory_mb'],
                                         resized['disk_gb']))
        self.assertTrue(resized['resize_pending'])
        info = self.domain(vm['name']).info()
        self.assertEqual((2048 * 1024, 4), (info[2], info[3]))
        self.assertRaises(exception.VmStateConflict, self.api.change_flavor,
                          {}, user_id=52, vcpus=1)
        confirmed = self.api.confirm_flavor({}, user_id=52)
        self.assertFalse(confirmed['resize_pending'])
        self.assertEqual(confirmed, self.api.confirm_flavor({}, user_id=52))
        instance = next(i for i in self.f.manager.driver.list_instances()
                    if i.name == vm['name'])
        self.assertEqual((4, 2048), (instance.vcpus, instance.memory_mb))

    def test_change_flavor_to_same_type_is_a_no_op(self):
        start(self.api, 53, vcpus=2)
        same = self.api.change_flavor({}, user_id=53, vcpus=3)
        self.assertFalse(same['resize_pending'])

    def test_change_flavor_of_suspended_vm_conflicts(self):
        start(self.api, 54)
        self.api.suspend_vm({}, user_id=54)
        self.assertRaises(exception.VmStateConflict, self.api.change_flavor,
                          {}, user_id=54, vcpus=2)

    def test_as_notify_and_deregister(self):
        start(self.api, 55)
        start(self.api, 56)
        self.api.as_notify({}, user_id=55, action='suspend')
        self.api.deregister_vm({}, user_id=56)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            vms = {vm['user_id']: vm for vm in self.api.get_vm_info({})}
            if vms.get(55, {}).get('status') == 2 and 56 not in vms:
                break
            time.sleep(0.05)
        self.assertEqual(2, vms[55]['status'])
        self.assertNotIn(56, vms)
        self.api.as_notify({}, user_id=55, action='remove')
        deadline = time.monotonic() + 10
        while self.api.get_vm_info({}) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual([], self.api.get_vm_info({}))

    def test_usage_of_every_resource(self):
        start(self.api, 57)
        start(self.api, 58)
        cpu = self.api.get_vm_usage({}, resource='cpu')
        self.assertEqual([57, 58], sorted(u['user_id'] for u in cpu))
        self.assertTrue(all('cpu_util_percent' in u for u in cpu))
        memory = self.api.get_vm_usage({}, resource='memory', user_id=57)
        self.assertEqual(1024, memory[0]['memory_mb'])
        disk = self.api.get_vm_usage({}, resource='disk', user_id=58)
        self.assertEqual(20 * 1024 ** 3, disk[0]['capacity_bytes'])
        self.assertGreater(disk[0]['allocation_bytes'], 0)
        self.assertRaises(exception.VmNotFound, self.api.get_vm_usage, {},
                          resource='cpu', user_id=59)

    def test_host_status(self):
        start(self.api, 60)
        status = self.api.get_host_status({})
        self.assertEqual({'host', 'vmm_id', 'driver', 'version',
                          'resources', 'vms', 'driver_reachable',
                          'registered', 'outbox'}, set(status))
        self.assertEqual('libvirt', status['driver'])
        self.assertEqual([60], [vm['user_id'] for vm in status['vms']])
        for key in ('cpu_load_percent', 'cpu_count', 'memory_total_mb',
                    'memory_free_mb', 'disk_total_gb', 'disk_free_gb',
                    'gpu_load_percent', 'gpu_cores', 'gpus', 'vms_running',
                    'vms_suspended', 'available_types'):
            self.assertIn(key, status['resources'])


class TestBadInput(ManagerTestCase):
    """Every method refuses bad arguments with InvalidRequest."""

    CASES = [
        ('start_vm', dict(user_id='7', os_type=0, vcpus=1, memory_mb=1)),
        ('start_vm', dict(user_id=True, os_type=0, vcpus=1, memory_mb=1)),
        ('start_vm', dict(user_id=-1, os_type=0, vcpus=1, memory_mb=1)),
        ('start_vm', dict(user_id=1, os_type=2, vcpus=1, memory_mb=1)),
        ('start_vm', dict(user_id=1, os_type=0, vcpus=0, memory_mb=1)),
        ('start_vm', dict(user_id=1, os_type=0, vcpus=1025, memory_mb=1)),
        ('start_vm', dict(user_id=1, os_type=0, vcpus=1, memory_mb=0)),
        ('start_vm', dict(user_id=1, os_type=0, vcpus=1,
                          memory_mb=2 ** 40)),
        ('start_vm', dict(user_id=1, os_type=0, vcpus=1, memory_mb=1,
                          disk_gb=-1)),
        ('start_vm', dict(user_id=1, os_type=0, vcpus=1, memory_mb=1,
                          gpu_cores=-5)),
        ('start_vm', dict(user_id=1, os_type=0, vcpus=1.5, memory_mb=1)),
        ('start_vm', dict(user_id=1, os_type=0, vcpus=1)),
        ('start_vm', dict(user_id=1, os_type=0, vcpus=1, memory_mb=1,
                          colour='red')),
        ('resume_vm', dict(user_id=None)),
        ('suspend_vm', dict(user_id=[1])),
        ('remove_vm', dict(user_id=-3)),
        ('remove_vm', dict()),
        ('get_vm_info', dict(user_id='all')),
        ('get_vm_usage', dict(resource='gpu')),
        ('get_vm_usage', dict(resource=None)),
        ('get_vm_usage', dict(resource='cpu', user_id=-1)),
        ('change_flavor', dict(user_id=1, vcpus=-1)),
        ('change_flavor', dict(user_id=1, memory_mb='big')),
        ('confirm_flavor', dict(user_id=2 ** 64)),
        ('as_register', dict(ip_address='300.1.1.1')),
        ('as_register', dict(ip_address=12)),
        ('as_confirm', dict(user_id=1, ready='yes')),
        ('as_notify', dict(user_id=1, action='reboot')),
        ('deregister_vm', dict(user_id='x')),
        ('get_host_status', dict(verbose=True)),
    ]

    def test_every_method_refuses_bad_input(self):
        start(self.api, 1)
        before = self.api.get_vm_info({})
        client = self.api.client.prepare(timeout=10)
        for method, kwargs in self.CASES:
            try:
                client.call({}, method, **kwargs)
            except exception.InvalidRequest:
                continue
            except Exception as exc:
                self.fail(f'{method}({kwargs}) raised {exc!r}')
            self.fail(f'{method}({kwargs}) was accepted')
        self.assertEqual(before, self.api.get_vm_info({}))
        # The agent still serves.
        self.assertEqual(2, start(self.api, 2)['user_id'])


class TestHelpers(ManagerTestCase):

    overrides = {'helper_vm_count': 2, 'reconcile_interval': 1,
                 'reconcile_absent_seconds': 0}

    def _helpers(self):
        return {vm['user_id']: vm for vm in self.api.get_vm_info({})
                if vm['helper']}

    def test_helpers_started_registered_and_replaced(self):
        notified = self.f.ds.recorder.wait_for('notify_helper', count=2,
                                               timeout=20)
        helpers = self._helpers()
        self.assertEqual({-1, -2}, set(helpers))
        self.assertEqual({h['ip_address'] for h in helpers.values()},
                         {n['ip_address'] for n in notified})
        categories = {kw['user_id']: kw['category'] for kw in
                      self.f.ds.recorder.calls('register_vm')}
        self.assertEqual({-1: 1, -2: 1}, categories)
        # Destroyed behind the agent's back: replaced by a new helper.
        old = helpers[-1]['name']
        dom = self.domain(old)
        dom.destroy()
        dom.undefine()
        # Gone for good once not found on reconcile_absent_passes passes.
        for _ in range(self.f.conf.reconcile_absent_passes):
            self.f.manager.reconcile_once()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            current = self._helpers().get(-1)
            if current and current['name'] != old and current['status'] == 1:
                break
            time.sleep(0.1)
        self.assertNotEqual(old, self._helpers()[-1]['name'])
        self.f.ds.recorder.wait_for('notify_helper', count=3, timeout=20)


class TestHelperBackOff(ManagerTestCase):

    overrides = {'helper_vm_count': 0, 'helper_retry_max_interval': 15}

    def test_a_failing_helper_is_retried_with_growing_delays(self):
        lifecycle = self.f.manager.lifecycle
        attempts = []

        def failing_create(*args, **kwargs):
            attempts.append(time.monotonic())
            raise exception.DriverError(reason='no template today')

        lifecycle.driver.create = failing_create
        self.f.conf.set_override('helper_vm_count', 1)
        lifecycle.ensure_helpers()
        self.assertEqual(1, len(attempts))
        failures, next_attempt = lifecycle._helper_backoff[1]
        self.assertEqual(1, failures)
        self.assertAlmostEqual(5, next_attempt - attempts[0], delta=1)
        # Asked again at once (as the periodic task does): no new attempt.
        for _ in range(5):
            lifecycle.ensure_helpers()
        self.assertEqual(1, len(attempts))
        # Each delay, once passed, doubles, up to the configured bound.
        delays = []
        for _ in range(3):
            lifecycle._helper_backoff[1] = (
                lifecycle._helper_backoff[1][0], 0)
            lifecycle.ensure_helpers()
            failures, next_attempt = lifecycle._helper_backoff[1]
            delays.append(round(next_attempt - attempts[-1]))
        self.assertEqual(4, len(attempts))
        self.assertEqual(([10, 15, 15], 4), (delays, failures))
        self.assertEqual([], [vm for vm in self.api.get_vm_info({})
                              if vm['helper']])


class TestResizeDoesNotBlockTheHost(ManagerTestCase):

    def test_a_start_proceeds_while_another_vm_resizes(self):
        start(self.api, 90)
        driver = self.f.manager.lifecycle.driver
        entered, release = threading.Event(), threading.Event()
        real_resize = driver.resize

        def slow_resize(*args, **kwargs):
            entered.set()
            release.wait(30)
            return real_resize(*args, **kwargs)

        driver.resize = slow_resize
        self.addCleanup(release.set)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            resizing = pool.submit(self.api.change_flavor, {}, user_id=90,
                                   vcpus=2)
            self.assertTrue(entered.wait(10))
            # The resize is in the driver: the host's capacity lock is
            # free, so another user's start completes meanwhile.
            other = start(self.api, 91)
            self.assertEqual(1, other['status'])
            self.assertFalse(resizing.done())
            self.assertEqual('resizing',
                             self.api.get_vm_info({}, user_id=90)[0][
                                 'task_state'])
            release.set()
            self.assertEqual(2, resizing.result(30)['vcpus'])


class TestReconcile(ManagerTestCase):

    def _wait_for_statuses(self, expected, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            vms = {vm['user_id']: vm['status']
                   for vm in self.api.get_vm_info({})}
            if all(vms.get(u) == s for u, s in expected.items()):
                return
            if time.monotonic() > deadline:
                self.fail(f'statuses {vms} never became {expected}')
            time.sleep(0.05)

    def test_domain_changes_outside_the_agent_are_reflected(self):
        gone = start(self.api, 70)
        paused = start(self.api, 71)
        gone_disk = self.f.manager.store.get_vm(70).disk_path
        dom = self.domain(gone['name'])
        dom.destroy()
        dom.undefine()
        self.domain(paused['name']).suspend()
        # Lifecycle events trigger a reconciliation; so does this call.
        self.f.manager.reconciler.reconcile()
        self._wait_for_statuses({71: 2})
        # Not found once is not gone: unknown, reported, nothing touched.
        vm = self.api.get_vm_info({}, user_id=70)[0]
        self.assertEqual((1, 'unknown'), (vm['status'], vm['task_state']))
        self.f.conf.set_override('reconcile_absent_seconds', 0)
        passes = self.f.conf.reconcile_absent_passes
        for _ in range(passes):
            self.f.manager.reconciler.reconcile()
        self._wait_for_statuses({70: 4, 71: 2})
        self.assertEqual('', self.api.get_vm_info({}, user_id=70)[0][
            'task_state'])
        # Its disk is kept: only an explicit request deletes disks.
        self.assertTrue(os.path.exists(gone_disk))
        reported = [(kw['vm_id'], kw['status']) for kw in
                    self.f.ds.recorder.wait_for('notify_vm', count=2)]
        self.assertEqual({(gone['vm_id'], 4), (paused['vm_id'], 2)},
                         set(reported))
        # Each change is reported once, however many passes ran.
        self.f.manager.reconciler.reconcile()
        time.sleep(0.3)
        self.assertEqual(2, len(self.f.ds.recorder.calls('notify_vm')))
        # Resumed outside the agent: running again.
        self.domain(paused['name']).resume()
        self.f.manager.reconciler.reconcile()
        self._wait_for_statuses({71: 3})
        # A stopped VM is replaced by a new one on the next start, which
        # removes the old disk (an explicit request).
        again = start(self.api, 70)
        self.assertNotEqual(gone['name'], again['name'])
        self.assertEqual(1, again['status'])
        self.assertFalse(os.path.exists(gone_disk))

    def test_unknown_domain_of_ours_is_adopted(self):
        vm = start(self.api, 72)
        self.f.manager.store.delete_vm(72)
        # This pass or one that a libvirt event started adopts it.
        self.f.manager.reconciler.reconcile()
        adopted = self.api.get_vm_info({}, user_id=72)[0]
        self.assertEqual((vm['name'], 1, 1024),
                         (adopted['name'], adopted['status'],
                          adopted['memory_mb']))
        self.assertEqual(vm['ip_address'], adopted['ip_address'])

    def test_unreachable_hypervisor_changes_nothing(self):
        start(self.api, 73)
        driver = self.f.manager.driver

        def broken(*args, **kwargs):
            raise exception.DriverError(action='list domains',
                                        reason='connection lost')

        self.patch(driver, 'list_instances', broken)
        self.patch(driver, 'observe', broken)
        summary = self.f.manager.reconciler.reconcile()
        self.assertFalse(any(summary.values()))
        self.assertEqual(1, self.api.get_vm_info({}, user_id=73)[0]['status'])
        self.assertFalse(self.api.get_host_status({})['driver_reachable'])


class TestRestart(ManagerTestCase):

    def test_identity_kept_building_rolled_back_orphans_kept(self):
        self.f.ds.recorder.wait_for('register_vmm')
        kept = start(self.api, 80)
        store = self.f.manager.store
        # A start that died half way, and a disk nobody knows.
        half = store.get_vm(80).copy(user_id=81, name='rapid-vm-81-dead',
                                     task_state='building', vm_id=None,
                                     ip_address=None, disk_path=None)
        store.save_vm(half)
        images = os.path.join(self.f.conf.data_path, 'instances')
        orphan = os.path.join(images, 'rapid-vm-99-orphan.qcow2')
        with open(orphan, 'wb') as disk:
            disk.write(b'x')
        foreign = os.path.join(images, 'operator-notes.txt')
        with open(foreign, 'w') as notes:
            notes.write('keep me')
        self.f.restart()
        self.assertEqual([80], [vm['user_id'] for vm in
                                self.api.get_vm_info({})])
        self.assertEqual(kept['name'],
                         self.api.get_vm_info({}, user_id=80)[0]['name'])
        # Start-up never deletes a disk: the delayed orphan job decides.
        self.assertTrue(os.path.exists(orphan))
        self.assertTrue(os.path.exists(foreign))
        status = self.api.get_host_status({})
        self.assertEqual(4242, status['vmm_id'])
        time.sleep(0.5)
        self.assertEqual(1, len(self.f.ds.recorder.calls('register_vmm')))


class TestRegistrationRetry(testtools.TestCase):

    def test_agent_serves_while_ds_is_absent_and_registers_later(self):
        f = self.useFixture(rfix.ServiceFixture(peers=False))
        vm = start(f.api, 90)
        self.assertIsNone(vm['vm_id'])
        self.assertIsNone(f.api.get_host_status({})['vmm_id'])
        f.start_peers()
        f.ds.recorder.wait_for('register_vmm', timeout=15)
        registered = f.ds.recorder.wait_for('register_vm', timeout=15)[0]
        self.assertEqual(90, registered['user_id'])
        f.slam.recorder.wait_for('register_vmm', timeout=15)
        reports = f.ds.recorder.wait_for('notify_vmm', timeout=15)
        self.assertEqual(4242, reports[0]['vmm_id'])
        deadline = time.monotonic() + 5
        while f.api.get_vm_info({}, user_id=90)[0]['vm_id'] is None:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)


class TestReports(ManagerTestCase):

    def test_periodic_report_carries_resources(self):
        self.f.ds.recorder.wait_for('register_vmm')
        start(self.api, 95)
        reports = self.f.ds.recorder.wait_for(
            'notify_vmm', lambda kw: kw['resources']['vms_running'] == 1,
            timeout=10)
        report = reports[0]
        self.assertEqual(4242, report['vmm_id'])
        resources = report['resources']
        self.assertEqual(report['cpu_load'], resources['cpu_load_percent'])
        self.assertEqual(report['free_memory_mb'],
                         resources['memory_free_mb'])
        self.assertEqual([], resources['gpus'])
        self.assertIsNone(resources['gpu_load_percent'])
        self.assertIn([4, 4096, 40], resources['available_types'])
        register = self.f.ds.recorder.calls('register_vmm')[0]
        self.assertEqual((4, self.f.conf.my_ip),
                         (register['mac_type'], register['ip_address']))


class TestStopDuringWait(ManagerTestCase):

    overrides = {'as_register_timeout': 60}

    def test_stop_wakes_a_start_waiting_for_its_as(self):
        results = {}

        def run():
            try:
                start(self.api, 96)
            except Exception as exc:
                results['error'] = exc

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 10
        while not self.f.manager.store.get_vm(96) or \
                not self.f.manager.store.get_vm(96).ip_address:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        started = time.monotonic()
        self.f.manager.stop()
        thread.join(15)
        self.assertLess(time.monotonic() - started, 10)
        self.assertIsInstance(results.get('error'), exception.DriverError)


class TestIdentity(ManagerTestCase):
    """SPEC 6: identity survives; a host change never destroys."""

    def _registered_vm(self, user_id):
        self.f.ds.recorder.wait_for('register_vmm')
        vm = start(self.api, user_id)
        deadline = time.monotonic() + 10
        while self.f.manager.store.get_vm(user_id).vm_id is None:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        # The DS id reaches the instance's metadata too.
        while self.f.manager.driver.observe(
                [self.f.manager.store.get_vm(user_id)])[
                    vm['name']].instance.vm_id is None:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        return self.f.manager.store.get_vm(user_id)

    def test_another_host_refuses_to_start_and_touches_nothing(self):
        vm = self._registered_vm(110)
        self.f.service.stop()
        self.f.conf.set_override('host', self.f.conf.host + '-renamed')
        from rapid_vmm import service as vmm_service
        service = vmm_service.VmmService(self.f.conf)
        error = self.assertRaises(exception.StateError, service.start)
        self.assertIn('previous_host', str(error))
        service.stop()
        dom = self.domain(vm.name)
        self.assertTrue(dom.isActive())
        self.assertTrue(os.path.exists(vm.disk_path))

    def test_declared_rename_takes_over_state_and_instances(self):
        vm = self._registered_vm(111)
        old = self.f.conf.host
        self.f.service.stop()
        self.f.conf.set_override('host', old + '-renamed')
        self.f.conf.set_override('previous_host', old)
        from rapid_vmm import service as vmm_service
        self.f.service = vmm_service.VmmService(self.f.conf)
        self.f.service.start()
        from rapid_vmm import rpcapi
        api = rpcapi.VmmAPI(self.f.conf, self.f.transport, timeout=10)
        got = api.get_vm_info({}, user_id=111)
        self.assertEqual((vm.name, 1, vm.vm_id, ''),
                         (got[0]['name'], got[0]['status'], got[0]['vm_id'],
                          got[0]['task_state']))
        observed = self.f.manager.driver.observe([vm])[vm.name]
        self.assertEqual('ours', observed.presence.value)

    def test_lost_database_is_rebuilt_without_registering_again(self):
        vm = self._registered_vm(112)
        vmm_id = self.f.manager.reporter.vmm_id
        self.f.service.stop()
        path = os.path.join(self.f.conf.data_path, 'state.sqlite')
        for suffix in ('', '-wal', '-shm'):
            if os.path.exists(path + suffix):
                os.unlink(path + suffix)
        from rapid_vmm import service as vmm_service
        self.f.service = vmm_service.VmmService(self.f.conf)
        self.f.service.start()
        got = self.api.get_vm_info({}, user_id=112)[0]
        self.assertEqual((vm.name, vm.vm_id), (got['name'], got['vm_id']))
        self.assertEqual(vmm_id, self.api.get_host_status({})['vmm_id'])
        time.sleep(1)
        self.assertEqual(1, len(self.f.ds.recorder.calls('register_vmm')))
        self.assertEqual(1, len(self.f.ds.recorder.calls('register_vm')))

    def test_metadata_removed_marks_unknown_and_destroys_nothing(self):
        vm = self._registered_vm(113)
        dom = self.domain(vm.name)
        import libvirt

        from rapid_vmm.virt.libvirt import config as vconfig
        for flags in (libvirt.VIR_DOMAIN_AFFECT_LIVE,
                      libvirt.VIR_DOMAIN_AFFECT_CONFIG):
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None,
                            None, vconfig.METADATA_NS, flags)
        for _ in range(4):
            self.f.manager.reconcile_once()
        got = self.api.get_vm_info({}, user_id=113)[0]
        self.assertEqual(('unknown', 1), (got['task_state'], got['status']))
        self.assertTrue(self.domain(vm.name).isActive())
        self.assertTrue(os.path.exists(vm.disk_path))
        # An explicit removal is refused too: not recognisably ours.
        self.assertRaises(exception.VmStateConflict, self.api.remove_vm, {},
                          user_id=113)
        self.assertTrue(self.domain(vm.name).isActive())


class TestInterruptedOperations(ManagerTestCase):
    """A restart finishes or rolls back what a dead agent left in flight."""

    def _restart(self):
        self.f.restart()
        return self.f.manager.store

    def test_interrupted_removal_is_finished(self):
        start(self.api, 120)
        store = self.f.manager.store
        store.update_vm(120, task_state='deleting',
                        intent={'op': 'delete', 'reason': 'test',
                                'notify': True})
        store = self._restart()
        self.assertIsNone(store.get_vm(120))
        self.assertNotIn(120, [i.user_id for i in
                               self.f.manager.driver.list_instances()])

    def test_interrupted_resize_is_settled_from_the_hypervisor(self):
        start(self.api, 121)
        store = self.f.manager.store
        store.update_vm(121, task_state='resizing',
                        intent={'op': 'resize', 'from': [1, 1024, 20],
                                'to': [2, 2048, 20]})
        store = self._restart()
        vm = store.get_vm(121)
        self.assertEqual(('', None, 1), (vm.task_state, vm.intent, vm.vcpus))

    def test_interrupted_suspend_takes_the_power_state(self):
        vm = start(self.api, 122)
        self.domain(vm['name']).suspend()
        self.f.manager.store.update_vm(122, task_state='suspending',
                                       intent={'op': 'suspend'})
        store = self._restart()
        got = store.get_vm(122)
        self.assertEqual(('', 2), (got.task_state, got.status))

    def test_start_of_a_user_with_a_leftover_build_replaces_it(self):
        vm = start(self.api, 123)
        self.f.manager.store.update_vm(123, task_state='building')
        again = start(self.api, 123)
        self.assertNotEqual(vm['name'], again['name'])
        self.assertNotIn(vm['name'], self.domain_names())
