"""libvirtd restarted under the agent: it reconnects and events still
arrive (SPEC 9, issue 8).

The agent runs as a process on RabbitMQ against a private libvirtd
(:mod:`rapid_vmm.tests.private_libvirtd`: its own config, socket and pid
file, run as ``nobody`` under another process name; never the system
daemon) through ``test+unix:///default?socket=...``. The periodic
reconcile is off in effect (``reconcile_interval`` = 3600 s), so a record
that changes did so because a libvirt lifecycle event asked for a pass.

What the restart does to libvirt's test driver: it keeps its domains in
the daemon's memory only (no state directory, nothing persistent), so the
domain of a VM started before the restart is gone afterwards. That VM must
become ``unknown`` and then stopped (4) once its absence is confirmed by
UUID, with its disk kept and nothing destroyed.
"""

import os
import time

import libvirt
import testtools

from rapid_vmm.tests import private_libvirtd
from rapid_vmm.tests.functional import agent as agent_fixture


class TestLibvirtdRestart(testtools.TestCase):

    def setUp(self):
        super().setUp()
        if private_libvirtd.libvirtd_binary() is None:
            self.skipTest('libvirtd is not installed '
                          '(tools/system/setup-host.sh)')
        self.daemon = self.useFixture(private_libvirtd.PrivateLibvirtd())
        self.agent = self.useFixture(agent_fixture.AgentProcess(**{
            'libvirt.connection_uri': self.daemon.uri,
            'libvirt.call_timeout': 5,
            'libvirt.reconnect_max_interval': 1,
            'reconcile_interval': 3600,
            'reconcile_absent_passes': 2,
            'reconcile_absent_seconds': 0}))
        self.agent.start()
        self.api = self.agent.api

    def wait_until(self, predicate, timeout=30, what='condition'):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                self.fail(f'{what} not reached in {timeout} s\n'
                          f'{self.agent.log_tail()}\n{self.daemon.tail()}')
            time.sleep(0.1)

    def record(self, user_id):
        return self.api.get_vm_info({}, user_id=user_id)[0]

    def registered(self, user_id):
        return self.wait_until(lambda: self.record(user_id)['vm_id'] and
                               self.record(user_id),
                               what=f'DS id of user {user_id}')

    def reachable(self):
        return self.api.get_host_status({})['driver_reachable']

    def test_events_arrive_after_a_restart_and_nothing_is_destroyed(self):
        agent_pid = self.agent.process.pid
        before = self.registered(self.api.start_vm(
            {}, user_id=1, os_type=0, vcpus=1, memory_mb=1024)['user_id'])
        disk = os.path.join(self.agent.values[('DEFAULT', 'data_path')],
                            'instances', before['name'] + '.qcow2')
        self.assertTrue(os.path.exists(disk))

        self.daemon.kill()
        self.wait_until(lambda: self.agent.log_lines(
            'Lost the libvirt connection'), what='the loss noticed')
        self.daemon.start()
        self.wait_until(lambda: self.agent.log_lines(
            f'Connected to libvirt at {self.daemon.uri}')[1:],
            what='a second connection')
        self.assertTrue(self.wait_until(self.reachable,
                                        what='driver_reachable'))
        # The reconnect asked for a pass: the domain is not found by UUID
        # (the test driver forgot it), so the record is unknown, not gone.
        lost = self.wait_until(
            lambda: self.record(1)['task_state'] == 'unknown' and
            self.record(1), what='VM of user 1 unknown')
        self.assertEqual((before['name'], before['vm_id'], 1),
                         (lost['name'], lost['vm_id'], lost['status']))
        self.assertIn('not found by UUID', lost['state_reason'])

        # A VM started on the new connection; its domain is then
        # suspended behind the agent's back, through another connection.
        after = self.registered(self.api.start_vm(
            {}, user_id=2, os_type=0, vcpus=1, memory_mb=1024)['user_id'])
        conn = libvirt.open(self.daemon.uri)
        self.addCleanup(conn.close)
        dom = conn.lookupByName(after['name'])
        dom.suspend()
        changed = self.wait_until(
            lambda: self.record(2)['status'] == 2 and self.record(2),
            timeout=15, what='the suspend seen through an event')
        self.assertEqual(after['name'], changed['name'])
        self.agent.ds.recorder.wait_for(
            'notify_vm', lambda kw: kw == {'vm_id': after['vm_id'],
                                           'status': 2})

        # The event passes also confirmed the first VM's absence: stopped,
        # the DS told, its disk kept.
        gone = self.wait_until(lambda: self.record(1)['status'] == 4 and
                               self.record(1), what='VM of user 1 stopped')
        self.assertEqual('', gone['task_state'])
        self.agent.ds.recorder.wait_for(
            'notify_vm', lambda kw: kw == {'vm_id': before['vm_id'],
                                           'status': 4})
        self.assertTrue(os.path.exists(disk))
        # Nothing destroyed: the suspended domain is still there, the agent
        # removed no domain and is the same process.
        self.assertEqual(libvirt.VIR_DOMAIN_PAUSED, dom.state()[0])
        self.assertEqual([], self.agent.log_lines('Removed domain'))
        self.assertEqual(agent_pid, self.agent.process.pid)
        self.assertIsNone(self.agent.process.poll())
        self.assertEqual(1, len(self.agent.ds.recorder.calls(
            'register_vmm')))
