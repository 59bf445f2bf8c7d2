"""Helpers shared by the rapid-vmm benchmarks (not a benchmark itself).

* :class:`Workspace` - a temp directory plus cleanups run in reverse order
  (the benchmark prints its figures only after everything is cleaned up,
  so that its JSON line is really the last one);
* :func:`bench_values` / :func:`make_conf` - the options of a benchmark
  agent: :func:`rapid_vmm.tests.fixtures.agent_config` (the functional
  tests' agent) with a unique ``host`` and unique ``bench_*`` topics;
* :class:`AgentProcess` - ``rapid-vmm`` as a separate process (master +
  worker, oslo.service threading backend) on RabbitMQ and libvirt's test
  hypervisor, with INFO logging to a file (not DEBUG: DEBUG logging of
  oslo.messaging would weigh on what is measured); its process control is
  the functional tests' ``AgentControl``
  (``rapid_vmm/tests/functional/agent.py``);
* :class:`EchoProcess` - the baseline, a bare oslo.messaging server
  (``_echo_server.py``) in its own process;
* :class:`Peers` - simulated DS and SLAM (real oslo.messaging servers);
* :func:`delete_queues` - removes the RabbitMQ queues a run declared;
* options (:func:`arg_parser`, :func:`parse_args`: ``--verbose``),
  timing, statistics and output helpers (:func:`emit` prints the final
  JSON line).

Benchmarks are run as ``python benchmarks/<name>.py`` so this module is
imported as ``_common`` (``benchmarks/`` is ``sys.path[0]``).
"""

import argparse  # noqa: I001 - rapid_vmm first, below
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import rapid_vmm  # noqa: F401 - first: picks oslo.service's threading backend

from oslo_config import cfg
import oslo_messaging as messaging
from oslo_messaging import conffixture
import psutil

from rapid_vmm import conf as rapid_conf
from rapid_vmm import rpc
from rapid_vmm import rpcapi
from rapid_vmm import simulators
from rapid_vmm.tests import fixtures as rfix
from rapid_vmm.tests.functional import agent as agent_fixture

RABBIT_URL = os.environ.get('RAPID_VMM_BENCH_TRANSPORT_URL',
                            rfix.RABBIT_TRANSPORT)
LINUX = 0

LOG = logging.getLogger('benchmarks')


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's options: described by its docstring's first line,
    with ``--verbose``; read them with :func:`parse_args`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument('--verbose', action='store_true',
                        help='log DEBUG and oslo.messaging warnings too')
    return parser


def parse_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse ``argv`` and set up logging (``--verbose``)."""
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return args


def setup_logging(verbose: bool = False) -> None:
    """In-process rapid-vmm logs: warnings only, on stderr."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format='%(asctime)s %(levelname)s %(name)s: %(message)s',
        stream=sys.stderr)
    if not verbose:
        # A reply arriving after its caller gave up, a heartbeat hiccup on
        # a loaded 2-core machine: not what a benchmark reports.
        logging.getLogger('oslo_messaging').setLevel(logging.ERROR)
        logging.getLogger('amqp').setLevel(logging.ERROR)
        logging.getLogger('oslo.messaging').setLevel(logging.ERROR)


def suffix() -> str:
    return uuid.uuid4().hex[:10]


# ---------------------------------------------------------------------------
# workspace and cleanup
# ---------------------------------------------------------------------------

class Workspace:
    """A temp directory and cleanups, run last-in first-out on exit."""

    def __init__(self, name: str, keep: bool = False):
        self.name = name
        self.run_id = suffix()
        self.path = tempfile.mkdtemp(prefix=f'rapid-bench-{name}-')
        self.keep = keep
        self._cleanups: list = []
        self._stoppers: list = []
        if not keep:
            self.add(shutil.rmtree, self.path, True)

    def add(self, func, *args, **kwargs) -> None:
        self._cleanups.append((func, args, kwargs))

    def add_stopper(self, func) -> None:
        """``func()`` stops a process or server: stoppers run first, all
        at once (each takes seconds), then the other cleanups."""
        self._stoppers.append(func)

    def _run_stoppers(self) -> None:
        stoppers, self._stoppers = self._stoppers, []
        errors = []

        def run(func):
            try:
                func()
            except Exception as exc:  # noqa: BLE001 - keep stopping
                errors.append(f'{getattr(func, "__qualname__", func)}: '
                              f'{exc}')
        threads = [threading.Thread(target=run, args=(func,), daemon=True)
                   for func in stoppers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for error in errors:
            print(f'stopping {error}', file=sys.stderr)

    def close(self) -> None:
        self._run_stoppers()
        while self._cleanups:
            func, args, kwargs = self._cleanups.pop()
            try:
                func(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - keep cleaning
                print(f'cleanup {getattr(func, "__name__", func)} failed: '
                      f'{exc}', file=sys.stderr)

    def __enter__(self) -> 'Workspace':
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def delete_queues(url: str, names) -> None:
    """Delete RabbitMQ queues by name; a missing queue is fine."""
    import kombu
    names = [n for n in names if n]
    if not names:
        return
    if url.startswith("rabbit:"):
        url = "amqp:" + url[len("rabbit:"):]
    with kombu.Connection(url, connect_timeout=5) as connection:
        channel = connection.channel()
        for name in names:
            try:
                channel.queue_delete(name)
            except Exception:  # noqa: BLE001 - the channel is closed on error
                channel = connection.channel()


def delete_queues_like(url: str, prefixes) -> int:
    """Delete every queue whose name starts with one of ``prefixes``.

    Lists queues with ``rabbitmqctl`` when this machine has it (best
    effort: otherwise the fanout queues, which carry ``x-expires``, are
    left to expire). Only for prefixes unique to this run.
    """
    prefixes = tuple(p for p in prefixes if p)
    tool = shutil.which('rabbitmqctl')
    if not prefixes or tool is None:
        return 0
    try:
        listing = subprocess.run([tool, 'list_queues', '-q', 'name'],
                                 capture_output=True, text=True,
                                 timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    names = [line.strip() for line in listing.splitlines()
             if line.strip().startswith(prefixes)]
    delete_queues(url, names)
    return len(names)


def topic_queues(conf: cfg.ConfigOpts, servers: dict) -> list[str]:
    """The durable queues of ``{topic: server}`` (oslo.messaging naming).

    Fanout and reply queues carry ``x-expires``
    (``rabbit_transient_queues_ttl``) and vanish on their own.
    """
    names = []
    for topic, server in servers.items():
        names.append(topic)
        if server:
            names.append(f'{topic}.{server}')
    return names


def reply_queue(transport) -> str | None:
    """The reply queue this process's transport declared, if any."""
    driver = getattr(transport, '_driver', None)
    return getattr(driver, '_reply_q', None)


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------

def bench_values(bench: str, data_path: str, template: str,
                 transport_url: str = RABBIT_URL, **overrides) -> dict:
    """Options of a benchmark agent: the functional tests' agent with a
    unique ``host`` and unique ``bench_*`` topics (``overrides`` win)."""
    tag = f'{bench}-{suffix()}'
    names = {'host': f'bench-{tag}',
             'vmm_topic': f'bench_vmm_{tag}',
             'ds_topic': f'bench_ds_{tag}',
             'slam_topic': f'bench_slam_{tag}'}
    names.update(overrides)
    return rfix.agent_config(data_path, template, transport_url, **names)


def make_conf(values: dict) -> cfg.ConfigOpts:
    """A private, parsed ConfigOpts with every rapid-vmm and oslo.messaging
    option, set to ``values``."""
    conf = cfg.ConfigOpts()
    rapid_conf.register_opts(conf)
    conffixture.ConfFixture(conf)  # registers oslo.messaging's options
    conf([], project='rapid-vmm-bench', default_config_files=[],
         default_config_dirs=[])
    for (group, name), value in values.items():
        if group == 'DEFAULT' and name in ('log_file', 'debug'):
            continue  # oslo.log options: the agent process's own
        conf.set_override(name, value,
                          group=None if group == 'DEFAULT' else group)
    return conf


# ---------------------------------------------------------------------------
# peers and the agent process
# ---------------------------------------------------------------------------

class Peers:
    """Simulated DS and SLAM on ``conf``'s topics (real RPC servers)."""

    def __init__(self, ws: Workspace, conf: cfg.ConfigOpts, transport):
        self.ds = simulators.directory_server(conf, transport).start()
        ws.add_stopper(self.ds.stop)
        self.slam = simulators.sla_manager(conf, transport).start()
        ws.add_stopper(self.slam.stop)

    @property
    def ds_recorder(self):
        return self.ds.recorder

    @property
    def slam_recorder(self):
        return self.slam.recorder


class AgentProcess(agent_fixture.AgentControl):
    """``rapid-vmm`` run as a process (master + worker) on RabbitMQ.

    The process control (start, wait until serving, SIGTERM, log) is the
    functional tests' :class:`~rapid_vmm.tests.functional.agent.AgentControl`;
    this adds the benchmark's configuration (INFO logging, unique host and
    topics), the bench side's ConfigOpts (``conf``), transport and VMM
    client (``api``), optionally the simulated peers, the agent's stderr in
    a file, and registers every cleanup (process, queues) in ``ws``.
    """

    failure = RuntimeError

    def __init__(self, ws: Workspace, bench: str, peers: bool = True,
                 template: str | None = None, api_timeout: float = 120,
                 **overrides):
        self.ws = ws
        self.dir = os.path.join(ws.path, 'agent')
        os.makedirs(self.dir, exist_ok=True)
        template = template or rfix.make_template(self.dir)
        self.values = bench_values(bench, os.path.join(self.dir, 'data'),
                                   template, **overrides)
        self.log_file = os.path.join(self.dir, 'agent.log')
        self.values[('DEFAULT', 'log_file')] = self.log_file
        self.values[('DEFAULT', 'debug')] = False
        self.config_file = rfix.write_config_file(
            os.path.join(self.dir, 'rapid-vmm.conf'), self.values)
        self.conf = make_conf(self.values)
        self.transport = rpc.get_transport(self.conf)
        ws.add(self._cleanup_transport)
        self.api = rpcapi.VmmAPI(self.conf, self.transport,
                                 timeout=api_timeout)
        self.peers = Peers(ws, self.conf, self.transport) if peers else None
        self.stderr_path = os.path.join(self.dir, 'agent.stderr')
        ws.add_stopper(self.stop)

    @property
    def host(self) -> str:
        return self.conf.host

    @property
    def images_path(self) -> str:
        return os.path.join(self.conf.data_path, 'instances')

    def _cleanup_transport(self) -> None:
        queues = topic_queues(self.conf, {
            self.conf.vmm_topic: self.conf.host,
            self.conf.ds_topic: 'ds', self.conf.slam_topic: 'slam'})
        queues.append(reply_queue(self.transport))
        self.transport.cleanup()
        delete_queues(RABBIT_URL, queues)
        # The fanout queues (and the echo server's) start with the run's
        # unique topics.
        delete_queues_like(RABBIT_URL, [self.conf.vmm_topic,
                                        self.conf.ds_topic,
                                        self.conf.slam_topic])

    def wait_registered(self, timeout: float = 30) -> None:
        """Wait until the agent registered with the simulated DS and got
        its VMM id (it arrives with the reply: give it a moment)."""
        self.peers.ds_recorder.wait_for('register_vmm', timeout=timeout)
        deadline = time.monotonic() + 10
        while self.api.get_host_status({})['vmm_id'] is None and \
                time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self, timeout: float = 30) -> float | None:
        """SIGTERM the master; seconds until every process is gone (None
        if it was not running)."""
        return self.stop_quietly(timeout)


class EchoProcess:
    """The baseline: a bare oslo.messaging server in its own process
    (``_echo_server.py``), with the agent's configuration file."""

    def __init__(self, ws: Workspace, agent: AgentProcess,
                 pool_size: int | None = None):
        self.topic = f'{agent.conf.vmm_topic}_echo'
        self.server = 'echo'
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              '_echo_server.py')
        extra = ['--pool-size', str(pool_size)] if pool_size else []
        self.process = subprocess.Popen(
            [sys.executable, script, '--config-file', agent.config_file,
             '--topic', self.topic, '--server', self.server, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True)
        # Stoppers run before cleanups: the server stops, then its queues
        # go (a queue deleted under a live consumer would be redeclared).
        ws.add(delete_queues, RABBIT_URL,
               topic_queues(agent.conf, {self.topic: self.server}))
        ws.add_stopper(self.stop)
        line = self.process.stdout.readline()
        if line.strip() != 'ready':
            raise RuntimeError(f'echo server did not start: {line!r}')
        target = messaging.Target(topic=self.topic, server=self.server,
                                  version='1.0')
        self.client = messaging.get_rpc_client(agent.transport, target,
                                               timeout=60)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def processes(self) -> list[psutil.Process]:
        try:
            return [psutil.Process(self.process.pid)]
        except psutil.NoSuchProcess:
            return []


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of ``procs`` (gone ones count 0)."""
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def rss_mb(procs: list[psutil.Process]) -> float:
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2 ** 20


def start_vm(api, user_id: int, **kwargs) -> dict:
    kwargs.setdefault('vcpus', 1)
    kwargs.setdefault('memory_mb', 1024)
    return api.start_vm({}, user_id=user_id, os_type=LINUX, **kwargs)


# ---------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------

def timed_ms(func, *args) -> float:
    """Milliseconds ``func(*args)`` takes."""
    started = time.perf_counter()
    func(*args)
    return (time.perf_counter() - started) * 1000.0


def percentile(values, q: float) -> float:
    """``q``-th percentile (0-100), linear interpolation."""
    data = sorted(values)
    if not data:
        return float('nan')
    if len(data) == 1:
        return data[0]
    position = (len(data) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (position - low)


def describe(values_ms) -> dict:
    return {'p50': round(statistics.median(values_ms), 3),
            'p90': round(percentile(values_ms, 90), 3),
            'mean': round(statistics.fmean(values_ms), 3),
            'min': round(min(values_ms), 3),
            'max': round(max(values_ms), 3),
            'n': len(values_ms)}


def machine() -> dict:
    return {'cpu_count': os.cpu_count(),
            'python': sys.version.split()[0],
            'load_avg_1m': round(os.getloadavg()[0], 2)}


def verdict(met: bool) -> str:
    """How the readable figures say whether a target is met."""
    return 'met' if met else 'NOT met'


def emit(result: dict) -> int:
    """Print ``result`` as the last line (one JSON object); returns 0, the
    benchmark's exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0
