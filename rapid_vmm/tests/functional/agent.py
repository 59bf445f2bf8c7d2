"""The agent as a separate process, for functional tests.

:class:`AgentProcess` writes a configuration file, runs ``rapid-vmm``
(``python -m rapid_vmm.cmd.vmm``) against the local RabbitMQ and libvirt's
test hypervisor, and can stop it with SIGTERM, kill it with SIGKILL and
start it again on the same state. The test plays the DS and the SLAM with
real oslo.messaging servers (:mod:`rapid_vmm.simulators`).

The process control itself is :class:`AgentControl`, a plain class that the
benchmarks (``benchmarks/_common.py``) use too.
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


class AgentControl:
    """Starts, waits for, stops and kills one ``rapid-vmm`` process (master
    and worker) and reads its log.

    A plain class: its user sets ``config_file`` (the agent's
    configuration), ``log_file`` (the ``log_file`` of that configuration)
    and ``api`` (a :class:`rpcapi.VmmAPI` on the agent's topic) before
    :meth:`start`. ``stderr_path``: a file the agent's stderr is appended
    to; None (default) keeps it in a pipe, read if the agent exits before
    serving. ``failure``: the exception raised when it does not serve.
    """

    config_file: str
    log_file: str
    api: rpcapi.VmmAPI
    stderr_path: str | None = None
    failure: type[Exception] = AssertionError
    process: subprocess.Popen | None = None

    def start(self, wait: bool = True, timeout: float = 60,
              env: dict | None = None) -> float:
        """Start the agent; with ``wait``, until it answers. Returns the
        seconds from launch to the first answer. ``env``: variables added
        to the agent's environment (e.g. a fault-injection point)."""
        started = time.monotonic()
        command = [sys.executable, '-m', 'rapid_vmm.cmd.vmm',
                   '--config-file', self.config_file]
        environ = dict(os.environ, **(env or {}))
        if self.stderr_path is None:
            self.process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                text=True, start_new_session=True, env=environ)
        else:
            with open(self.stderr_path, 'ab') as stderr:
                self.process = subprocess.Popen(
                    command, stdout=subprocess.DEVNULL, stderr=stderr,
                    start_new_session=True, env=environ)
        if wait:
            self.wait_until_serving(timeout)
        return time.monotonic() - started

    def wait_until_serving(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        quick = self.api.client.prepare(timeout=2)
        while True:
            if self.process.poll() is not None:
                raise self.failure(
                    f'agent exited with {self.process.returncode}: '
                    f'{self.stderr_tail()}\n{self.log_tail()}')
            try:
                return quick.call({}, 'get_host_status')
            except messaging.MessagingTimeout:
                if time.monotonic() > deadline:
                    raise self.failure('agent not serving:\n' +
                                       self.log_tail()) from None

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def processes(self) -> list[psutil.Process]:
        """The master and its children (the worker); [] once reaped."""
        try:
            return [psutil.Process(self.process.pid), *self.children()]
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

    def stop_quietly(self, timeout: float = 15) -> float | None:
        """:meth:`terminate` if the agent runs; its seconds, or None."""
        if self.process is not None and self.process.poll() is None:
            try:
                return self.terminate(timeout=timeout)
            except psutil.Error:
                pass
        return None

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_file, lines)

    def stderr_tail(self, chars: int = 2000) -> str:
        """The end of what the agent wrote on stderr (once it exited, when
        that is a pipe)."""
        if self.stderr_path is not None:
            return _tail(self.stderr_path, 40)[-chars:]
        if self.process is None or self.process.stderr is None:
            return ''
        return self.process.stderr.read()[-chars:]

    def log_lines(self, needle: str) -> list[str]:
        """The lines of the agent's log that contain ``needle``."""
        try:
            with open(self.log_file, encoding='utf-8',
                      errors='replace') as log:
                return [line for line in log if needle in line]
        except OSError:
            return []


def owned_domains(uri: str, owner: str) -> dict[str, object]:
    """The domains of ``uri`` whose rapid metadata names ``owner``."""
    import libvirt

    from rapid_vmm.virt.libvirt import config as vconfig
    conn = libvirt.open(uri)
    try:
        found = {}
        for dom in conn.listAllDomains(0):
            try:
                xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                   vconfig.METADATA_NS)
            except libvirt.libvirtError:
                continue
            values = vconfig.parse_metadata(xml) or {}
            if values.get('owner') == owner:
                found[dom.name()] = dom.state()[0]
        return found
    finally:
        conn.close()


def destroy_owned_domains(uri: str, owner, names=()) -> None:
    """Remove the domains a test made in a shared libvirtd: those owned
    by ``owner`` (a name or a callable giving it) and those in ``names``."""
    import libvirt
    owner = owner() if callable(owner) else owner
    try:
        doomed = set(owned_domains(uri, owner)) | set(names)
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return
    try:
        for name in doomed:
            try:
                dom = conn.lookupByName(name)
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(
                    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
            except libvirt.libvirtError:
                continue
    finally:
        conn.close()


def _tail(path: str, lines: int) -> str:
    try:
        with open(path, encoding='utf-8', errors='replace') as log:
            return ''.join(log.readlines()[-lines:])
    except OSError:
        return '(no log)'


class AgentProcess(AgentControl, fixtures.Fixture):
    """One agent process plus simulated peers on RabbitMQ.

    Attributes: ``conf`` (the test side's ConfigOpts, same topics),
    ``api``, ``ds``, ``slam``, ``config_file``, ``log_file``, ``process``.
    Process control: :class:`AgentControl`.
    """

    def __init__(self, peers: bool = True, transport_url: str | None = None,
                 **overrides):
        super().__init__()
        self.with_peers = peers
        #: The broker of the agent and of the test side (a private node's
        #: URL, say); default: the shared RabbitMQ.
        self.transport_url = transport_url or rfix.RABBIT_TRANSPORT
        self.overrides = overrides
        self.process = None

    def _setUp(self):
        self.tempdir = self.useFixture(fixtures.TempDir()).path
        # QEMU runs as another user (libvirt-qemu) and must reach the disks.
        os.chmod(self.tempdir, 0o755)
        template = rfix.make_template(self.tempdir)
        self.values = rfix.agent_config(
            os.path.join(self.tempdir, 'data'), template,
            self.transport_url, **self.overrides)
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
        self.conf.set_override('transport_url', self.transport_url)
        self.transport = rpc.get_transport(self.conf)
        self.addCleanup(self.transport.cleanup)
        self.api = rpcapi.VmmAPI(self.conf, self.transport, timeout=60)
        self.ds = self.slam = None
        if self.with_peers:
            self.start_peers()
        self.addCleanup(self.stop_quietly)
        uri = self.values.get(('libvirt', 'connection_uri'), '')
        if uri.startswith('test+unix'):
            # libvirtd's test driver keeps its domains only while some
            # client is connected: this connection keeps them across the
            # agent's restarts, as a real hypervisor would.
            import libvirt
            keeper = libvirt.open(uri)
            self.addCleanup(keeper.close)
            # libvirtd keeps the domains after the test: remove ours.
            self.addCleanup(destroy_owned_domains, uri,
                            lambda: self.values[('DEFAULT', 'host')])

    def reconfigure(self, **overrides) -> None:
        """Rewrite the agent's configuration file (for its next start)."""
        for key, value in overrides.items():
            group, _, name = key.rpartition('.')
            self.values[(group or 'DEFAULT', name)] = value
        rfix.write_config_file(self.config_file, self.values)

    def start_peers(self) -> None:
        self.ds = simulators.directory_server(self.conf,
                                              self.transport).start()
        self.addCleanup(self.ds.stop)
        self.slam = simulators.sla_manager(self.conf, self.transport).start()
        self.addCleanup(self.slam.stop)
