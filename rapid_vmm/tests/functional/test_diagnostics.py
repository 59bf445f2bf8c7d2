"""Guru Meditation report of the agent as a process, on SIGUSR2."""

import os
import signal
import time

import fixtures
import testtools

from rapid_vmm.tests.functional import agent as agent_fixture

LINUX = 0
SECRET = 'rabbit://ops:TopSecret-8f3a@broker.example.org:5671/rapid'


class TestGuruMeditation(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.reports = self.useFixture(fixtures.TempDir()).path
        self.agent = self.useFixture(agent_fixture.AgentProcess(**{
            'oslo_reports.log_dir': self.reports,
            # A secret the agent holds but never uses: it must be masked.
            'client.transport_url': SECRET}))
        self.agent.start()

    def serving_process(self):
        """The process that serves: the worker child of the oslo.service
        launcher if there is one, else the agent's only process."""
        children = self.agent.children()
        return children[0].pid if children else self.agent.process.pid

    def wait_for_report(self, timeout=20):
        """The text of the first report, once its file stopped growing."""
        deadline = time.monotonic() + timeout
        size = -1
        while time.monotonic() < deadline:
            names = [n for n in os.listdir(self.reports)
                     if n.startswith('rapid-vmm_gurumeditation_')]
            if names:
                path = os.path.join(self.reports, names[0])
                now = os.path.getsize(path)
                if now and now == size:
                    with open(path, encoding='utf-8') as report:
                        return report.read()
                size = now
            time.sleep(0.3)
        self.fail('no Guru Meditation report in '
                  f'{self.reports}:\n{self.agent.log_tail()}')

    def test_sigusr2_writes_a_report_and_the_agent_serves_on(self):
        api = self.agent.api
        vm = api.start_vm({}, user_id=21, os_type=LINUX, vcpus=1,
                          memory_mb=1024)
        os.kill(self.serving_process(), signal.SIGUSR2)
        text = self.wait_for_report()
        # Threads and their stacks.
        self.assertIn('Threads', text)
        self.assertIn('Thread #', text)
        self.assertIn('rapid_vmm/', text)
        # The configuration, secrets masked.
        self.assertIn('Configuration', text)
        self.assertIn(f'host = {self.agent.conf.host}', text)
        self.assertNotIn('TopSecret-8f3a', text)
        self.assertNotIn('guest:guest@', text)
        self.assertIn('transport_url = ***', text)
        # The agent's own section: VM records, task states, driver state.
        self.assertIn('rapid-vmm agent', text)
        self.assertIn('serving = True', text)
        self.assertIn(vm['name'], text)
        self.assertIn('user 21:', text)
        self.assertIn('task_state = (none)', text)
        self.assertIn('reachable = True', text)
        # And the agent serves on.
        self.assertIsNone(self.agent.process.poll())
        self.assertEqual(21, api.get_vm_info({}, user_id=21)[0]['user_id'])
        api.suspend_vm({}, user_id=21)
        self.assertEqual(2, api.get_vm_info({}, user_id=21)[0]['status'])
