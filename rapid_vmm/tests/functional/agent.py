"""The agent as a separate process, for functional tests.

:class:`AgentProcess` writes a configuration file, runs ``rapid-vmm``
(``python -m rapid_vmm.cmd.vmm``) against the local RabbitMQ and libvirt's
test hypervisor, and can stop it with SIGTERM, kill it with SIGKILL and
start it again on the same state. The test plays the DS and the SLAM with
real oslo.messaging servers (:mod:`rapid_vmm.simulators`).
"""

import os
import signal
import subprocess
import sys
import time

import fixtures
from oslo_config import cfg
import oslo_messaging as messaging
from oslo_messaging import conffixture
import psutil

from rapid_vmm import conf as rapid_conf
from rapid_vmm import rpc
from rapid_vmm import rpcapi
from rapid_vmm import simulators
from rapid_vmm.tests import fixtures as rfix


class AgentProcess(fixtures.Fixture):
    """One agent process plus simulated peers on RabbitMQ.

    Attributes: ``conf`` (the test side's ConfigOpts, same topics),
    ``api``, ``ds``, ``slam``, ``config_file``, ``log_file``, ``process``.
    """

    def __init__(self, peers: bool = True, **overrides):
        super().__init__()
        self.with_peers = peers
        self.overrides = overrides
        self.process: subprocess.Popen | None = None

    def _setUp(self):
        self.tempdir = self.useFixture(fixtures.TempDir()).path
        # QEMU runs as another user (libvirt-qemu) and must reach the disks.
        os.chmod(self.tempdir, 0o755)
        template = rfix.make_template(self.tempdir)
        self.values = rfix.agent_config(
            os.path.join(self.tempdir, 'data'), template,
            rfix.RABBIT_TRANSPORT, **self.overrides)
        self.log_file = os.path.join(self.tempdir, 'agent.log')
        self.values[('DEFAULT', 'log_file')] = self.log_file
        self.values[('DEFAULT', 'debug')] = True
        self.config_file = rfix.write_config_file(
            os.path.join(self.tempdir, 'rapid-vmm.conf'), self.values)
        self.conf = cfg.ConfigOpts()
        rapid_conf.register_opts(self.conf)
        self.useFixture(conffixture.ConfFixture(self.conf))
        self.conf(['--config-file', self.config_file],
                  project='rapid-vmm-test', default_config_files=[],
                  default_config_dirs=[])
        self.conf.set_override('transport_url', rfix.RABBIT_TRANSPORT)
        self.transport = rpc.get_transport(self.conf)
        self.addCleanup(self.transport.cleanup)
        self.api = rpcapi.VmmAPI(self.conf, self.transport, timeout=60)
        self.ds = self.slam = None
        if self.with_peers:
            self.start_peers()
        self.addCleanup(self.stop_quietly)

    def start_peers(self) -> None:
        self.ds = simulators.directory_server(self.conf,
                                              self.transport).start()
        self.addCleanup(self.ds.stop)
        self.slam = simulators.sla_manager(self.conf, self.transport).start()
        self.addCleanup(self.slam.stop)

    # -- process control ----------------------------------------------------

    def start(self, wait: bool = True) -> float:
        """Start the agent; with ``wait``, until it answers. Returns the
        seconds from launch to the first answer."""
        started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, '-m', 'rapid_vmm.cmd.vmm', '--config-file',
             self.config_file],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        if wait:
            self.wait_until_serving()
        return time.monotonic() - started

    def wait_until_serving(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        quick = self.api.client.prepare(timeout=2)
        while True:
            if self.process.poll() is not None:
                raise AssertionError(
                    f'agent exited with {self.process.returncode}: '
                    f'{self.process.stderr.read()[-2000:]}\n'
                    f'{self.log_tail()}')
            try:
                return quick.call({}, 'get_host_status')
            except messaging.MessagingTimeout:
                if time.monotonic() > deadline:
                    raise AssertionError('agent not serving:\n' +
                                         self.log_tail()) from None

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def terminate(self, timeout: float = 30) -> float:
        """SIGTERM the agent (its master process); seconds until it is gone
        with every child."""
        procs = [psutil.Process(self.process.pid), *self.children()]
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        _gone, alive = psutil.wait_procs(procs, timeout=timeout)
        elapsed = time.monotonic() - started
        for proc in alive:
            proc.kill()
        self.process.wait(5)
        return elapsed

    def kill(self) -> None:
        """SIGKILL the agent: master and worker, as a crash would."""
        procs = [psutil.Process(self.process.pid), *self.children()]
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        self.process.wait(5)

    def stop_quietly(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.terminate(timeout=15)
            except psutil.Error:
                pass

    def log_tail(self, lines: int = 60) -> str:
        try:
            with open(self.log_file, encoding='utf-8',
                      errors='replace') as log:
                return ''.join(log.readlines()[-lines:])
        except OSError:
            return '(no log)'
