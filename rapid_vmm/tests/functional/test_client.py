"""rapid-vmm-client always answers within its --timeout: with the broker
unreachable, with a broker that accepts connections and never speaks, with
no agent. It runs as a process, as an operator runs it; the agent's case is
in test_agent.TestOperatorCli."""

import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import fixtures
import testtools

from rapid_vmm.tests import fixtures as rfix

TIMEOUT = 3
#: Interpreter start and imports on a loaded 2-core machine.
START_SLACK = 6


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


class SilentBroker:
    """A TCP server that accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while True:
            try:
                self.connections.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for conn in self.connections:
            conn.close()


class TestClientAlwaysAnswers(testtools.TestCase):

    def write_config(self, transport_url, **client):
        directory = self.useFixture(fixtures.TempDir()).path
        path = os.path.join(directory, 'client.conf')
        lines = ['[client]', f'transport_url = {transport_url}',
                 f'timeout = {TIMEOUT}']
        lines += [f'{key} = {value}' for key, value in client.items()]
        with open(path, 'w', encoding='utf-8') as conf:
            conf.write('\n'.join(lines) + '\n')
        return path

    def cli(self, config, *args):
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, '-m', 'rapid_vmm.cmd.client', '--config-file',
             config, *args], capture_output=True, text=True, timeout=120,
            check=False)
        return result, time.monotonic() - started

    def assertOneLineError(self, result, *words, stdout=''):
        self.assertEqual(1, result.returncode, result.stderr)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(1, len(lines), result.stderr)
        self.assertTrue(lines[0].startswith('error: '), lines[0])
        for word in words:
            self.assertIn(word, lines[0])
        if stdout is not None:
            self.assertEqual(stdout, result.stdout)

    def test_broker_unreachable(self):
        port = closed_port()
        config = self.write_config(f'rabbit://guest:guest@127.0.0.1:{port}/',
                                   notification_topics='test_closed')
        for command in (['status'], ['list', '--user', '-1'],
                        ['start', '7'], ['watch', '--count', '1']):
            result, elapsed = self.cli(config, *command)
            self.assertOneLineError(result, 'cannot reach the broker',
                                    f'127.0.0.1:{port}')
            self.assertLess(elapsed, TIMEOUT + START_SLACK, command)

    def test_broker_that_never_speaks(self):
        broker = SilentBroker()
        self.addCleanup(broker.close)
        config = self.write_config(
            f'rabbit://guest:guest@127.0.0.1:{broker.port}/',
            notification_topics='test_silent')
        for command in (['status'], ['remove', '7'],
                        ['watch', '--count', '1']):
            result, elapsed = self.cli(config, *command)
            self.assertEqual(1, result.returncode, result.stderr)
            self.assertEqual(1, len(result.stderr.strip().splitlines()),
                             result.stderr)
            self.assertLess(elapsed, TIMEOUT + START_SLACK, command)
            self.assertGreaterEqual(elapsed, TIMEOUT - 0.5, command)
            self.assertNotIn('notifications are off', result.stderr)
        self.assertTrue(broker.connections)

    def test_no_agent(self):
        host = f'nobody-{uuid.uuid4().hex[:8]}'
        config = self.write_config(rfix.RABBIT_TRANSPORT, host=host,
                                   vmm_topic=f'test_vmm_{host}')
        result, elapsed = self.cli(config, 'status')
        self.assertOneLineError(result, f"no answer from the agent '{host}'",
                                f'within {TIMEOUT} s')
        self.assertLess(elapsed, TIMEOUT + START_SLACK)
        result, elapsed = self.cli(config, '--timeout', '2', 'suspend', '3')
        self.assertOneLineError(result, 'within 2 s',
                                'may still complete on the agent')
        self.assertLess(elapsed, 2 + START_SLACK)

    def test_watch_without_an_agent(self):
        host = f'nobody-{uuid.uuid4().hex[:8]}'
        topic = f'test_watch_{host}'
        config = self.write_config(rfix.RABBIT_TRANSPORT, host=host,
                                   notification_topics=topic)
        result, elapsed = self.cli(config, 'watch', '--wait', '2')
        self.assertOneLineError(result, f"no report from the agent '{host}'",
                                'in 2 s', stdout=None)
        self.assertLess(elapsed, 2 + START_SLACK + 2)

    def test_unreadable_configuration(self):
        missing = os.path.join(self.useFixture(fixtures.TempDir()).path,
                               'rapid-vmm.conf')
        result, _ = self.cli(missing, 'status')
        self.assertEqual(2, result.returncode)
        self.assertEqual(1, len(result.stderr.strip().splitlines()),
                         result.stderr)
        self.assertIn(f'cannot read {missing}', result.stderr)

    def test_bad_timeout_and_url(self):
        config = self.write_config('nonsense://x')
        result, _ = self.cli(config, 'status')
        self.assertEqual(2, result.returncode, result.stderr)
        self.assertEqual(1, len(result.stderr.strip().splitlines()),
                         result.stderr)
        self.assertTrue(result.stderr.startswith(
            'rapid-vmm-client: configuration error:'), result.stderr)
        result, _ = self.cli(config, '--timeout', '0', 'status')
        self.assertEqual(2, result.returncode)
        self.assertIn('--timeout', result.stderr)
