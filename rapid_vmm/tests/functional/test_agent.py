"""The agent as a process on RabbitMQ and libvirt's test hypervisor.

The test plays the DS and the SLAM with real oslo.messaging RPC servers
and drives the VMM with its client class, as the real peers would.
"""

import concurrent.futures
import os
import subprocess
import sys
import time
import uuid

import testtools

from rapid_vmm import exception
from rapid_vmm.tests.functional import agent as agent_fixture
from rapid_vmm.tests.functional import broker as broker_fixture
from rapid_vmm.tests.functional import test_reliability
from rapid_vmm.tests.unit import test_manager

LINUX = 0


def start(api, user_id, **kwargs):
    kwargs.setdefault('vcpus', 1)
    kwargs.setdefault('memory_mb', 1024)
    return api.start_vm({}, user_id=user_id, os_type=LINUX, **kwargs)


class AgentTestCase(testtools.TestCase):

    overrides: dict = {}

    def setUp(self):
        super().setUp()
        self.agent = self.useFixture(
            agent_fixture.AgentProcess(**self.overrides))
        self.startup_s = self.agent.start()
        self.api = self.agent.api

    def wait_until(self, predicate, timeout=20, what='condition'):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                self.fail(f'{what} not reached in {timeout} s\n'
                          f'{self.agent.log_tail()}')
            time.sleep(0.1)


class TestEveryMethod(AgentTestCase):

    overrides = {'helper_vm_count': 1}

    def test_full_flow(self):
        ds, slam = self.agent.ds.recorder, self.agent.slam.recorder
        ds.wait_for('register_vmm', timeout=30)
        slam.wait_for('register_vmm', timeout=30)
        ds.wait_for('notify_vmm', timeout=30)
        ds.wait_for('notify_helper', timeout=30)

        vm = start(self.api, 7, vcpus=2, memory_mb=2048)
        self.assertEqual((7, 1, 2, 2048), (vm['user_id'], vm['status'],
                                           vm['vcpus'], vm['memory_mb']))
        slam.wait_for('vm_started', lambda kw: kw['vm']['user_id'] == 7)
        self.assertEqual(vm['name'], start(self.api, 7)['name'])
        self.assertEqual({'user_id': 7}, self.api.as_register(
            {}, ip_address=vm['ip_address']))
        self.assertIsNone(self.api.as_confirm({}, user_id=7))
        info = self.api.get_vm_info({})
        self.assertEqual({-1, 7}, {v['user_id'] for v in info})
        for resource in ('cpu', 'memory', 'disk'):
            usage = self.api.get_vm_usage({}, resource=resource, user_id=7)
            self.assertEqual(7, usage[0]['user_id'])
        self.assertEqual(2, self.api.suspend_vm({}, user_id=7)['status'])
        self.assertEqual(3, self.api.resume_vm({}, user_id=7)['status'])
        resized = self.api.change_flavor({}, user_id=7, vcpus=4)
        self.assertEqual(4, resized['vcpus'])
        self.assertFalse(self.api.confirm_flavor({}, user_id=7)[
            'resize_pending'])
        self.api.as_notify({}, user_id=7, action='suspend')
        self.wait_until(lambda: self.api.get_vm_info({}, user_id=7)[0][
            'status'] == 2, what='AS-requested suspend')
        start(self.api, 8)
        self.api.deregister_vm({}, user_id=8)
        self.wait_until(lambda: 8 not in {v['user_id'] for v in
                                          self.api.get_vm_info({})},
                        what='DS deregistration')
        self.assertIsNone(self.api.remove_vm({}, user_id=7))
        status = self.api.get_host_status({})
        self.assertEqual(4242, status['vmm_id'])
        self.assertEqual([-1], [v['user_id'] for v in status['vms']])
        statuses = [kw['status'] for kw in ds.calls('notify_vm')]
        self.assertEqual([2, 3, 2, 4, 4], statuses)

    def test_cast_start_reports_to_the_slam(self):
        self.assertIsNone(self.api.start_vm({}, user_id=9, os_type=0,
                                            vcpus=1, memory_mb=1024,
                                            wait=False))
        started = self.agent.slam.recorder.wait_for(
            'vm_started', lambda kw: kw['vm']['user_id'] == 9, timeout=30)
        self.assertTrue(started[0]['vm']['ip_address'])
        # A cast that fails is reported to the SLAM too.
        self.api.start_vm({}, user_id=10, os_type=7, vcpus=1,
                          memory_mb=1024, wait=False)
        failed = self.agent.slam.recorder.wait_for('vm_start_failed',
                                                   timeout=30)
        self.assertEqual((10, 'InvalidRequest'),
                         (failed[0]['user_id'], failed[0]['error_class']))


class TestConcurrency(AgentTestCase):

    def test_fifty_concurrent_starts_for_one_user_make_one_vm(self):
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            vms = list(pool.map(lambda _: start(self.api, 77), range(50)))
        self.assertEqual(1, len({vm['name'] for vm in vms}))
        self.assertEqual(1, len(self.api.get_vm_info({})))
        self.assertEqual(1, len(self.agent.ds.recorder.calls('register_vm')))

    def test_hundred_concurrent_starts_for_distinct_users(self):
        users = range(1000, 1100)
        with concurrent.futures.ThreadPoolExecutor(100) as pool:
            vms = list(pool.map(lambda u: start(self.api, u), users))
        self.assertEqual(set(users), {vm['user_id'] for vm in vms})
        self.assertEqual(100, len({vm['name'] for vm in vms}))
        self.assertEqual(100, len({vm['ip_address'] for vm in vms}))
        info = self.api.get_vm_info({})
        self.assertEqual(set(users), {vm['user_id'] for vm in info})
        registered = self.agent.ds.recorder.wait_for('register_vm',
                                                     count=100)
        self.assertEqual(set(users), {kw['user_id'] for kw in registered})


class TestBadInput(AgentTestCase):

    def test_every_method_refuses_bad_input_and_the_agent_serves(self):
        start(self.api, 1)
        before = self.api.get_vm_info({})
        client = self.api.client.prepare(timeout=20)
        for method, kwargs in test_manager.TestBadInput.CASES:
            if method in ('as_notify', 'deregister_vm'):
                client.cast({}, method, **kwargs)
                continue
            try:
                client.call({}, method, **kwargs)
            except exception.InvalidRequest:
                continue
            self.fail(f'{method}({kwargs}) was accepted')
        # A method that is not part of the API is a typed refusal too.
        self.assertRaises(exception.InvalidRequest, client.call, {},
                          'format_disk')
        self.assertEqual(before, self.api.get_vm_info({}))
        self.assertEqual(2, start(self.api, 2)['user_id'])
        self.assertIsNone(self.agent.process.poll())


class TestRestart(AgentTestCase):
    """The VMs and the identity survive a stop or a crash of the agent.

    libvirtd's test driver (``test+unix:///default``) keeps the domains
    across the agent's processes, as a real hypervisor does.
    """

    overrides = {'helper_vm_count': 1,
                 'libvirt.connection_uri': 'test+unix:///default'}

    def setUp(self):
        if not test_reliability.libvirtd_serves():
            self.skipTest('libvirtd does not serve test+unix:///default')
        super().setUp()

    def _populate(self):
        self.agent.ds.recorder.wait_for('register_vmm', timeout=30)
        self.agent.ds.recorder.wait_for('notify_helper', timeout=30)
        for user in (21, 22):
            start(self.api, user)
        self.api.suspend_vm({}, user_id=22)
        return {vm['user_id']: vm for vm in self.api.get_vm_info({})}

    def _check_after_restart(self, before):
        ds = self.agent.ds.recorder
        status = self.agent.wait_until_serving()
        self.assertEqual(4242, status['vmm_id'])
        self.agent.slam.recorder.wait_for('register_vmm', count=2,
                                          timeout=30)
        # No second registration of the VMM or of any VM.
        self.assertEqual(1, len(ds.calls('register_vmm')))
        self.assertEqual(3, len(ds.calls('register_vm')))
        after = {vm['user_id']: vm for vm in self.api.get_vm_info({})}
        for user_id, vm in before.items():
            self.assertEqual(
                (vm['name'], vm['status'], vm['vm_id']),
                (after[user_id]['name'], after[user_id]['status'],
                 after[user_id]['vm_id']))
        self.assertEqual(3, self.api.resume_vm({}, user_id=22)['status'])

    def test_sigterm_stops_within_ten_seconds_and_state_survives(self):
        before = self._populate()
        elapsed = self.agent.terminate()
        self.assertLess(elapsed, 10)
        self.assertEqual(0, self.agent.process.returncode)
        self.agent.start()
        self._check_after_restart(before)

    def test_sigkill_keeps_state_and_identity(self):
        before = self._populate()
        self.agent.kill()
        self.agent.start()
        self._check_after_restart(before)

    def test_the_agent_is_one_process(self):
        self.assertEqual([], self.agent.children())
        self.assertEqual(1, len(self.agent.processes()))


class TestPeersAbsent(testtools.TestCase):

    def test_agent_serves_without_peers_and_registers_when_they_come(self):
        agent = self.useFixture(agent_fixture.AgentProcess(peers=False))
        agent.start()
        vm = start(agent.api, 5)
        self.assertIsNone(vm['vm_id'])
        status = agent.api.get_host_status({})
        self.assertEqual({'ds': False, 'slam': False}, status['registered'])
        agent.start_peers()
        agent.ds.recorder.wait_for('register_vmm', timeout=30)
        agent.ds.recorder.wait_for('register_vm', timeout=30)
        agent.slam.recorder.wait_for('register_vmm', timeout=30)
        deadline = time.monotonic() + 10
        while agent.api.get_vm_info({}, user_id=5)[0]['vm_id'] is None:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.1)


class TestBadConfiguration(testtools.TestCase):

    def _run(self, *lines):
        path = self.useFixture(agent_fixture.fixtures.TempDir()).path
        conf = os.path.join(path, 'bad.conf')
        with open(conf, 'w') as conf_file:
            conf_file.write('\n'.join(lines) + '\n')
        result = subprocess.run(
            [sys.executable, '-m', 'rapid_vmm.cmd.vmm', '--config-file',
             conf], capture_output=True, text=True, timeout=60, check=False)
        return result

    def test_bad_configurations_stop_with_one_line(self):
        for lines in (
                ['[DEFAULT]', 'compute_driver = xen'],
                ['[DEFAULT]', 'vm_types = 1,2 x 1024'],
                ['[DEFAULT]', 'data_path = /proc/rapid-vmm'],
                ['[DEFAULT]', 'data_path = /tmp/rapid-vmm-bad',
                 '[libvirt]', 'normal_image = /nonexistent.qcow2'],
                ['[DEFAULT]', 'report_interval = -1']):
            result = self._run(*lines)
            self.assertEqual(2, result.returncode, result.stderr)
            stderr = result.stderr.strip().splitlines()
            self.assertEqual(1, len(stderr), result.stderr)
            self.assertTrue(stderr[0].startswith(
                'rapid-vmm: configuration error:'), stderr[0])


class TestOperatorCli(AgentTestCase):
    """rapid-vmm-client against the agent, as an operator runs it."""

    def setUp(self):
        # Notifications on (``watch`` shows the reports), on topics of this
        # test alone; their queues are removed afterwards.
        self.topic = f'test_cli_{uuid.uuid4().hex[:10]}'
        self.overrides = {
            'helper_vm_count': 1,
            'oslo_messaging_notifications.driver': 'messagingv2',
            'oslo_messaging_notifications.topics': self.topic}
        super().setUp()
        self.addCleanup(broker_fixture.delete_queues,
                        self.agent.transport_url,
                        [f'{self.topic}.{priority}' for priority in
                         ('info', 'error', 'warn', 'sample')])

    def cli(self, *args, check=True, config=None):
        result = subprocess.run(
            [sys.executable, '-m', 'rapid_vmm.cmd.client', '--config-file',
             config or self.agent.config_file, *args],
            capture_output=True, text=True, timeout=120, check=False)
        if check:
            self.assertEqual(0, result.returncode, result.stderr)
        return result

    def test_every_command(self):
        import json
        started = json.loads(self.cli('--json', 'start', '31', '--vcpus',
                                      '2', '--memory-mb', '2048').stdout)
        self.assertEqual((31, 2), (started['user_id'], started['vcpus']))
        table = self.cli('list').stdout
        self.assertIn('| rapid-vm-31-', table)
        self.assertIn('| 2 vCPU / 2048 MB / 20 GB |', table)
        status = self.cli('status').stdout
        self.assertIn(f'Host            {self.agent.conf.host}', status)
        self.assertIn('VMs             ', status)
        usage = json.loads(self.cli('--json', 'usage', 'disk').stdout)
        self.assertEqual(20 * 1024 ** 3, next(
            row for row in usage if row['user_id'] == 31)[
                'capacity_bytes'])
        self.assertIn('suspended', self.cli('suspend', '31').stdout)
        self.assertIn('resumed', self.cli('resume', '31').stdout)
        self.assertIn('4 vCPU', self.cli('resize', '31', '--vcpus',
                                         '4').stdout)
        self.cli('confirm-resize', '31')
        self.assertIn('Removed', self.cli('remove', '31').stdout)
        missing = self.cli('remove', '31', check=False)
        self.assertEqual(1, missing.returncode)
        self.assertEqual('error: VmNotFound: User 31 has no VM on this host.',
                         missing.stderr.strip())
        refused = self.cli('start', '32', '--vcpus', '0', check=False)
        self.assertEqual(1, refused.returncode)
        self.assertIn('InvalidRequest', refused.stderr)
        absent = self.cli('--host', 'nobody-here', '--timeout', '3',
                          'list', check=False)
        self.assertEqual(1, absent.returncode)
        self.assertIn("no answer from the agent 'nobody-here'",
                      absent.stderr)
        self.assertEqual(1, len(absent.stderr.splitlines()), absent.stderr)

    def test_watch_shows_the_reports_the_ds_gets(self):
        import json
        ds = self.agent.ds.recorder
        ds.wait_for('register_vmm', timeout=30)
        lines = self.cli('watch', '--count', '2').stdout.splitlines()
        self.assertIn(f'Reports of {self.agent.conf.host} to the DS',
                      lines[0])
        reports = lines[1:]
        self.assertEqual(2, len(reports), lines)
        for line in reports:
            self.assertIn(f'{self.agent.conf.host} (VMM ', line)
            self.assertIn('free memory ', line)
        [report] = [json.loads(line) for line in self.cli(
            '--json', 'watch', '--count', '1').stdout.splitlines()]
        # The very report the DS got, figure for figure.
        [sent] = ds.wait_for('notify_vmm', lambda kw: kw['resources'] ==
                             report['resources'], timeout=5)
        for key in ('vmm_id', 'cpu_load', 'free_memory_mb', 'gpu_load'):
            self.assertEqual(sent[key], report[key], key)
        self.assertEqual(self.agent.conf.host, report['host'])
        # Its own queue is gone once it exited.
        queues = subprocess.run(
            ['rabbitmqctl', 'list_queues', 'name', '--quiet',
             '--no-table-headers'], capture_output=True, text=True,
            timeout=60, check=True).stdout
        self.assertNotIn(f'rapid-vmm-watch.{self.agent.conf.host}.', queues)

    def test_helpers_and_configuration_files(self):
        import json
        # Helpers are listed with --user -1.
        self.wait_until(lambda: any(
            vm['user_id'] == -1 and not vm['task_state']
            for vm in self.api.get_vm_info({})), what='helper VM 1')
        helpers = json.loads(self.cli('--json', 'list', '--user',
                                      '-1').stdout)
        self.assertEqual([-1], [vm['user_id'] for vm in helpers])
        self.assertIn('rapid-helper-1-', self.cli('list', '--user',
                                                  '-1').stdout)
        usage = json.loads(self.cli('--json', 'usage', 'disk', '--user',
                                    '-1').stdout)
        self.assertEqual([-1], [row['user_id'] for row in usage])

        # A file with the [client] section alone.
        path = os.path.join(self.agent.tempdir, 'client.conf')
        with open(path, 'w', encoding='utf-8') as conf:
            conf.write(f"""[client]
transport_url = {self.agent.transport_url}
host = {self.agent.conf.host}
vmm_topic = {self.agent.conf.vmm_topic}
timeout = 20
""")
        self.assertIn('| USER ', self.cli('list', config=path).stdout)
        self.assertIn(f'Host            {self.agent.conf.host}',
                      self.cli('status', config=path).stdout)

        # Options the agent would refuse, and a secret: the CLI reads none.
        path = os.path.join(self.agent.tempdir, 'broken.conf')
        with open(self.agent.config_file, encoding='utf-8') as agent_file:
            text = agent_file.read()
        with open(path, 'w', encoding='utf-8') as conf:
            conf.write(text.replace('[DEFAULT]\n', '[DEFAULT]\n'
                                    'compute_driver = no-such-driver\n'
                                    'report_interval = -5\n', 1))
            conf.write('\n[nova]\npassword = s3cret\n'
                       '[no_such_group]\nfoo = bar\n')
        self.assertIn('Host ', self.cli('status', config=path).stdout)

        # watch says when the agent's file turns notifications off.
        path = os.path.join(self.agent.tempdir, 'no-notifications.conf')
        with open(self.agent.config_file, encoding='utf-8') as agent_file:
            text = agent_file.read()
        with open(path, 'w', encoding='utf-8') as conf:
            conf.write(text.replace('driver = messagingv2', 'driver = noop'))
        result = self.cli('watch', '--count', '1', config=path, check=False)
        self.assertEqual(1, result.returncode)
        self.assertEqual(1, len(result.stderr.splitlines()), result.stderr)
        self.assertIn('notifications are off', result.stderr)
