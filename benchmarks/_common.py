"""Helpers shared by the rapid-vmm benchmarks (not a benchmark itself).

Needs only what ``pip install .`` of rapid-vmm installs (its runtime
requirements), plus the machine's ``qemu-img``, RabbitMQ and, for the
benchmarks through libvirtd, ``libvirtd``: nothing of the test
requirements (no ``fixtures``, no ``rapid_vmm.tests``).

* :class:`Workspace` - a temp directory plus cleanups run in reverse order
  (the benchmark prints its figures only after everything is cleaned up,
  so that its JSON line is really the last one);
* :func:`agent_values` / :func:`write_config_file` / :func:`load_conf` -
  the options of a benchmark agent (a unique ``host`` and unique
  ``bench_*`` topics), written as a configuration file and read back into
  the global ``CONF`` (one agent configuration per benchmark process, as
  in the agent itself);
* :class:`AgentProcess` - ``rapid-vmm`` as a separate process (one
  process, oslo.service's threading backend) on RabbitMQ and a libvirt test
  hypervisor, with INFO logging to a file (DEBUG logging of oslo.messaging
  would weigh on what is measured);
* :class:`EchoProcess` - the baseline, a bare oslo.messaging server
  (``_echo_server.py``) in its own process;
* :class:`Peers` - simulated DS and SLAM (real oslo.messaging servers,
  :mod:`rapid_vmm.simulators`);
* :func:`ensure_libvirtd` - libvirtd's test driver (``test+unix:///default``,
  every call a real RPC): starts virtlogd and libvirtd when they are not
  running (as ``tools/system/setup-host.sh`` does; a running libvirtd is
  never restarted);
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

import rapid_vmm  # first: picks oslo.service's threading backend

from oslo_config import cfg
import oslo_messaging as messaging
import psutil
import tenacity

from rapid_vmm import conf as rapid_conf
from rapid_vmm import rpc
from rapid_vmm import rpcapi
from rapid_vmm import simulators

RABBIT_URL = os.environ.get('RAPID_VMM_BENCH_TRANSPORT_URL',
                            'rabbit://guest:guest@127.0.0.1:5672/')
LIBVIRTD_URI = 'test+unix:///default'
"""libvirtd's test driver: every call is a real RPC to libvirtd, and its
domains outlive the client process (SPEC 10)."""
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
        for name in ('oslo_messaging', 'oslo.messaging', 'amqp'):
            logging.getLogger(name).setLevel(logging.ERROR)


def suffix() -> str:
    return uuid.uuid4().hex[:10]


class WaitAborted(RuntimeError):
    """Raised by the predicate of :func:`wait_until` to stop waiting."""


def wait_until(predicate, timeout: float, what: str,
               interval: float = 0.1):
    """Poll ``predicate()`` with tenacity until it returns a true value,
    which is returned; an exception it raises counts as "not yet", except
    :class:`WaitAborted`, which ends the wait at once.

    :raises RuntimeError: after ``timeout`` seconds, naming ``what``.
    """
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout),
        wait=tenacity.wait_fixed(interval),
        retry=(tenacity.retry_if_result(lambda value: not value) |
               tenacity.retry_if_exception(
                   lambda exc: not isinstance(exc, WaitAborted))))
    try:
        return retrying(predicate)
    except tenacity.RetryError as exc:
        raise RuntimeError(f'{what}: not within {timeout} s') from exc


# ---------------------------------------------------------------------------
# workspace and cleanup
# ---------------------------------------------------------------------------

class Workspace:
    """A temp directory and cleanups, run last-in first-out on exit."""

    def __init__(self, name: str, keep: bool = False):
        self.name = name
        self.run_id = suffix()
        self.path = tempfile.mkdtemp(prefix=f'rapid-bench-{name}-')
        # QEMU and libvirtd may run as another user and must reach disks.
        os.chmod(self.path, 0o755)
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
    if url.startswith('rabbit:'):
        url = 'amqp:' + url[len('rabbit:'):]
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

def make_template(directory: str, size: str = '64M') -> str:
    """A small real qcow2 template disk in ``directory``."""
    path = os.path.join(directory, 'template.qcow2')
    if not os.path.exists(path):
        subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', path,
                        size], check=True, timeout=60)
    return path


def agent_values(bench: str, data_path: str, template: str,
                 transport_url: str = RABBIT_URL, **overrides) -> dict:
    """Options of a benchmark agent as ``{(group, name): value}``.

    A unique ``host`` and unique ``bench_*`` topics; ``overrides`` win
    (``name=value`` for ``[DEFAULT]``, ``**{'group.name': value}``
    otherwise).
    """
    tag = f'{bench}-{suffix()}'
    values = {
        ('DEFAULT', 'transport_url'): transport_url,
        ('DEFAULT', 'host'): f'bench-{tag}',
        ('DEFAULT', 'my_ip'): '127.0.0.1',
        ('DEFAULT', 'vmm_topic'): f'bench_vmm_{tag}',
        ('DEFAULT', 'ds_topic'): f'bench_ds_{tag}',
        ('DEFAULT', 'slam_topic'): f'bench_slam_{tag}',
        ('DEFAULT', 'data_path'): data_path,
        ('DEFAULT', 'report_interval'): 10,
        ('DEFAULT', 'reconcile_interval'): 60,
        ('DEFAULT', 'helper_vm_count'): 0,
        ('DEFAULT', 'as_register_timeout'): 0,
        ('DEFAULT', 'peer_call_timeout'): 5,
        ('DEFAULT', 'registration_retry_max_interval'): 2,
        # The test hypervisor's host has 16 CPUs and 3 GiB: capacity is
        # not what is measured.
        ('DEFAULT', 'ram_allocation_ratio'): 1000.0,
        ('DEFAULT', 'disk_allocation_ratio'): 1000.0,
        ('libvirt', 'connection_uri'): 'test:///default',
        ('libvirt', 'normal_image'): template,
        ('libvirt', 'ip_timeout'): 5,
        ('gpu', 'backend'): 'none',
    }
    for key, value in overrides.items():
        group, _, name = key.rpartition('.')
        values[(group or 'DEFAULT', name)] = value
    return values


def write_config_file(path: str, values: dict) -> str:
    """Write ``values`` as an oslo.config INI file."""
    groups: dict[str, list[str]] = {}
    for (group, name), value in values.items():
        if isinstance(value, (list, tuple)):
            value = ','.join(str(v) for v in value)
        groups.setdefault(group, []).append(f'{name} = {value}')
    with open(path, 'w', encoding='utf-8') as conf_file:
        for group in sorted(groups, key=lambda g: g != 'DEFAULT'):
            conf_file.write(f'[{group}]\n')
            conf_file.write('\n'.join(groups[group]) + '\n\n')
    return path


def load_conf(config_file: str) -> cfg.ConfigOpts:
    """The global ``CONF`` (every rapid-vmm option registered), read from
    ``config_file``; oslo.messaging registers its own options on it when
    the transport is made, as in the agent. One configuration per
    benchmark process: a second call replaces the first."""
    conf = rapid_conf.CONF
    conf.reset()
    conf(['--config-file', config_file], project='rapid-vmm-bench',
         default_config_files=[], default_config_dirs=[])
    return conf


# ---------------------------------------------------------------------------
# libvirtd
# ---------------------------------------------------------------------------

def _libvirtd_answers(uri: str) -> bool:
    from rapid_vmm.virt.libvirt import host as vhost
    try:
        conn = vhost.libvirt.open(uri)
    except vhost.libvirt.libvirtError:
        return False
    conn.close()
    return True


def ensure_libvirtd(uri: str = LIBVIRTD_URI, timeout: float = 90) -> str:
    """Make sure libvirtd answers on ``uri``; returns what was done.

    When it does not and no libvirtd runs, starts ``virtlogd -d`` and
    ``libvirtd -d`` (root only), as ``tools/system/setup-host.sh`` does,
    and waits (bounded) for it. A running libvirtd is never restarted.

    :raises RuntimeError: when libvirtd cannot be reached or started.
    """
    if _libvirtd_answers(uri):
        return 'libvirtd already running'
    running = {p.info['name'] for p in psutil.process_iter(['name'])}
    if 'libvirtd' in running:
        raise RuntimeError(f'libvirtd runs but does not answer on {uri}')
    if os.geteuid() != 0 or not shutil.which('libvirtd'):
        raise RuntimeError(
            f'libvirtd does not answer on {uri}: start it (as root: '
            'tools/system/setup-host.sh)')
    os.makedirs('/var/log/libvirt', exist_ok=True)
    if 'virtlogd' not in running:
        subprocess.run(['virtlogd', '-d'], check=True, timeout=30)
    env = dict(os.environ,
               LIBVIRT_LOG_OUTPUTS='3:file:/var/log/libvirt/libvirtd.log')
    subprocess.run(['libvirtd', '-d'], check=True, timeout=30, env=env)
    wait_until(lambda: _libvirtd_answers(uri), timeout,
               f'libvirtd started but does not answer on {uri}',
               interval=0.5)
    return 'libvirtd started by the benchmark'


METADATA_NS = 'http://rapid-vmm.org/xmlns/instance/1.0'
"""Namespace of rapid-vmm's domain metadata (which names the owner)."""


def domains_of(host: str, uri: str = LIBVIRTD_URI) -> dict[str, bool]:
    """``{name: running}`` of libvirtd's domains whose rapid-vmm metadata
    names the agent ``host``. A connection of its own each time: libvirtd's
    keepalive drops an idle client that runs no event loop."""
    from rapid_vmm.virt.libvirt import host as vhost
    libvirt = vhost.libvirt
    found = {}
    conn = libvirt.open(uri)
    try:
        for dom in conn.listAllDomains(0):
            try:
                xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                   METADATA_NS)
                if f'>{host}<' in xml or f'"{host}"' in xml:
                    found[dom.name()] = bool(dom.isActive())
            except libvirt.libvirtError:
                continue  # not rapid-vmm's, or gone meanwhile
    finally:
        conn.close()
    return found


def remove_domains(names, uri: str = LIBVIRTD_URI) -> int:
    """Destroy and undefine the domains ``names`` (this run's own)."""
    from rapid_vmm.virt.libvirt import host as vhost
    libvirt = vhost.libvirt
    removed = 0
    conn = libvirt.open(uri)
    try:
        for name in names:
            try:
                dom = conn.lookupByName(name)
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
                removed += 1
            except libvirt.libvirtError:
                continue
    finally:
        conn.close()
    return removed


def remove_domains_of(host: str, uri: str = LIBVIRTD_URI) -> int:
    """Remove from libvirtd every domain of this run's agent ``host``."""
    return remove_domains(domains_of(host, uri), uri)


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


class AgentProcess:
    """``rapid-vmm`` run as a process on RabbitMQ.

    Writes the benchmark's configuration (INFO logging, unique host and
    topics) and reads it into this process's ``conf``; makes the
    transport, the VMM client (``api``) and optionally the simulated peers;
    keeps the agent's stderr in a file, and registers every cleanup
    (process, queues) in ``ws``. :meth:`start` runs the agent, waiting
    until it answers; :meth:`stop` sends SIGTERM.
    """

    def __init__(self, ws: Workspace, bench: str, peers: bool = True,
                 template: str | None = None, api_timeout: float = 120,
                 **overrides):
        self.ws = ws
        self.dir = os.path.join(ws.path, 'agent')
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(self.dir, 0o755)
        template = template or make_template(self.dir)
        self.values = agent_values(bench, os.path.join(self.dir, 'data'),
                                   template, **overrides)
        self.log_file = os.path.join(self.dir, 'agent.log')
        self.values[('DEFAULT', 'log_file')] = self.log_file
        self.values[('DEFAULT', 'debug')] = False
        self.config_file = write_config_file(
            os.path.join(self.dir, 'rapid-vmm.conf'), self.values)
        self.conf = load_conf(self.config_file)
        self.transport = rpc.get_transport(self.conf)
        ws.add(self._cleanup_transport)
        self.api = rpcapi.VmmAPI(self.conf, self.transport,
                                 timeout=api_timeout)
        self.peers = Peers(ws, self.conf, self.transport) if peers else None
        self.stderr_path = os.path.join(self.dir, 'agent.stderr')
        self.process: subprocess.Popen | None = None
        ws.add_stopper(self.stop)

    @property
    def host(self) -> str:
        return self.conf.host

    @property
    def images_path(self) -> str:
        return (self.conf.libvirt.images_path or
                os.path.join(self.conf.data_path, 'instances'))

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

    # -- process control -----------------------------------------------------

    def start(self, wait: bool = True, timeout: float = 60) -> float:
        """Start the agent; with ``wait``, until it answers. Returns the
        seconds from launch to the first answer."""
        started = time.monotonic()
        with open(self.stderr_path, 'ab') as stderr:
            self.process = subprocess.Popen(
                [sys.executable, '-m', 'rapid_vmm.cmd.vmm',
                 '--config-file', self.config_file],
                stdout=subprocess.DEVNULL, stderr=stderr,
                start_new_session=True)
        if wait:
            self.wait_until_serving(timeout)
        return time.monotonic() - started

    def wait_until_serving(self, timeout: float = 60) -> dict:
        """Wait until the agent answers ``get_host_status``; its reply."""
        quick = self.api.client.prepare(timeout=2)

        def answer():
            if self.process.poll() is not None:
                raise WaitAborted(
                    f'agent exited with {self.process.returncode}: '
                    f'{_tail(self.stderr_path, 20)}\n{self.log_tail()}')
            return quick.call({}, 'get_host_status')
        try:
            return wait_until(answer, timeout,
                              'agent not serving', interval=0.05)
        except RuntimeError as exc:
            raise RuntimeError(f'{exc}:\n{self.log_tail()}') from None

    def wait_registered(self, timeout: float = 30) -> None:
        """Wait until the agent registered with the simulated DS and got
        its VMM id (it arrives with the reply: give it a moment)."""
        self.peers.ds_recorder.wait_for('register_vmm', timeout=timeout)
        wait_until(lambda: self.api.get_host_status({})['vmm_id'] is not None,
                   10, 'no VMM id after the DS registration', interval=0.05)

    def processes(self) -> list[psutil.Process]:
        """The agent's process and any children; [] once reaped."""
        try:
            master = psutil.Process(self.process.pid)
            return [master, *master.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 30) -> float | None:
        """SIGTERM the agent; seconds until every process is gone (None
        if it was not running)."""
        if self.process is None or self.process.poll() is not None:
            return None
        procs = self.processes()
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        _gone, alive = psutil.wait_procs(procs, timeout=timeout)
        elapsed = time.monotonic() - started
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        self.process.wait(10)
        return elapsed

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_file, lines)

    def log_lines(self, needle: str) -> list[str]:
        """The lines of the agent's log that contain ``needle``."""
        try:
            with open(self.log_file, encoding='utf-8',
                      errors='replace') as log:
                return [line for line in log if needle in line]
        except OSError:
            return []


def _tail(path: str, lines: int) -> str:
    try:
        with open(path, encoding='utf-8', errors='replace') as log:
            return ''.join(log.readlines()[-lines:])
    except OSError:
        return '(no log)'


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


class StandInAS:
    """Stand-in Acceleration Servers: the hand-shake of SPEC 4, from here.

    For a VM whose address is known (:meth:`announce`, from any thread),
    one of ``workers`` threads does what a real AS does once its VM has
    booted: ``as_register(ip_address)`` (retried while the agent answers
    ``VmNotFound``: it may not have stored the address yet) for its user,
    then ``as_confirm(user_id)``. ``confirmed`` counts the confirmations
    per user, ``failures`` lists what went wrong.
    """

    def __init__(self, api, workers: int = 16, register_timeout: float = 60,
                 call_timeout: float = 10):
        import concurrent.futures
        self.api = api
        self.register_timeout = register_timeout
        self.call_timeout = call_timeout
        self._stop = threading.Event()
        self.confirmed: dict[int, int] = {}
        self.registered_at: dict[int, float] = {}
        self.failures: list[str] = []
        self.ips: dict[str, str] = {}
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix='stand-in-as')

    def announce(self, name: str, ip_address: str) -> None:
        """The VM ``name`` has ``ip_address``: run its AS hand-shake."""
        with self._lock:
            if self.ips.get(name) == ip_address:
                return  # asked again (the agent polled the address twice)
            self.ips[name] = ip_address
        self._pool.submit(self._handshake, name, ip_address)

    def _handshake(self, name: str, ip_address: str) -> None:
        from rapid_vmm import exception
        query = self.api.client.prepare(timeout=self.call_timeout)

        def register():
            if self._stop.is_set():
                raise WaitAborted('the stand-in AS was closed')
            return _registered(query, ip_address, exception)
        try:
            reply = wait_until(register, self.register_timeout,
                               f'as_register({ip_address})', interval=0.05)
            user_id = reply['user_id']
            with self._lock:
                self.registered_at[user_id] = time.monotonic()
            query.call({}, 'as_confirm', user_id=user_id, ready=True)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            with self._lock:
                self.failures.append(f'{name} {ip_address}: '
                                     f'{type(exc).__name__}: {exc}')
            return
        with self._lock:
            self.confirmed[user_id] = self.confirmed.get(user_id, 0) + 1

    def close(self) -> None:
        """Stop: hand-shakes not begun are dropped, running ones end."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _registered(query, ip_address: str, exception) -> dict | None:
    try:
        return query.call({}, 'as_register', ip_address=ip_address)
    except exception.VmNotFound:
        return None


class FifoListener:
    """Reads "NAME IP" lines that ``_ip_command.sh`` writes on a FIFO and
    hands them to ``callback(name, ip)``, on a thread of its own."""

    def __init__(self, ws: Workspace, callback):
        self.path = os.path.join(ws.path, 'ip-command.fifo')
        os.mkfifo(self.path, 0o600)
        # Read and write: opening never blocks, and the FIFO never sees
        # end-of-file between two writers.
        self._fd = os.open(self.path, os.O_RDWR)
        self._callback = callback
        self.lines = 0
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name='ip-command-fifo')
        self._thread.start()
        ws.add(self.close)

    def _run(self) -> None:
        with os.fdopen(self._fd, 'r', encoding='ascii',
                       closefd=False) as stream:
            for line in stream:
                fields = line.split()
                if fields == ['STOP']:
                    return
                if len(fields) == 2:
                    self.lines += 1
                    self._callback(*fields)

    def close(self) -> None:
        if self._thread.is_alive():
            os.write(self._fd, b'STOP\n')
            self._thread.join(10)
        os.close(self._fd)


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
    """The machine, its load, and which rapid-vmm was measured (a script
    run as ``python benchmarks/x.py`` imports the *installed* rapid-vmm,
    not the checkout it sits in, unless PYTHONPATH says otherwise)."""
    return {'cpu_count': os.cpu_count(),
            'python': sys.version.split()[0],
            'load_avg_1m': round(os.getloadavg()[0], 2),
            'rapid_vmm_path': os.path.dirname(rapid_vmm.__file__)}


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
