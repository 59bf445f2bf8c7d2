"""``rapid-vmm-client``: the operator CLI over the VMM API.

Examples::

    rapid-vmm-client status
    rapid-vmm-client list [--user 7 | --user -1]
    rapid-vmm-client start 7 --vcpus 2 --memory-mb 2048 --timeout 300
    rapid-vmm-client usage cpu
    rapid-vmm-client --json list
    rapid-vmm-client watch --count 3

It needs only the broker and the topics: it reads ``[client]`` (and
``[DEFAULT] transport_url``, ``host``, ``vmm_topic``, the
``[oslo_messaging_*]`` broker options) from ``/etc/rapid-vmm/client.conf``
or, when there is none, the agent's ``/etc/rapid-vmm/rapid-vmm.conf``;
nothing else of that file (driver options, secrets) is read.

Every command answers within ``--timeout`` seconds (default 10, or
``[client] timeout``), whatever the broker and the agent do: the RPC runs
in a worker thread that is abandoned at the deadline, calls retry a broken
broker connection a bounded number of times, and the broker's port is
probed first so that an unreachable broker is said at once. Errors are one
line on stderr and exit status 1 (2 for a bad command line or
configuration).

``watch`` prints what the Directory Server receives: the agent publishes
each ``notify_vmm`` report also as a ``rapid_vmm.host.report``
notification (priority ``sample``, ``[notifications] host_reports``), and
``watch`` listens in a pool of its own, so it never takes a message from
another consumer.
"""

import argparse
from collections.abc import Callable
import json
import logging as py_logging
import os
import queue
import re
import socket
import sys
import threading
import time
from typing import Any
import uuid

from oslo_service import backend

backend.init_backend(backend.BackendType.THREADING)

from oslo_config import cfg  # noqa: E402
import oslo_messaging as messaging  # noqa: E402
from oslo_messaging import conffixture  # noqa: E402
import prettytable  # noqa: E402

from rapid_vmm import exception  # noqa: E402
from rapid_vmm import notifications  # noqa: E402
from rapid_vmm import rpc  # noqa: E402
from rapid_vmm import rpcapi  # noqa: E402
from rapid_vmm.conf import client as client_conf  # noqa: E402
from rapid_vmm.conf import default as default_conf  # noqa: E402
from rapid_vmm.conf import notifications as notifications_conf  # noqa: E402

CLIENT_CONFIG = '/etc/rapid-vmm/client.conf'
AGENT_CONFIG = '/etc/rapid-vmm/rapid-vmm.conf'
STATUS_NAMES = notifications.STATUS_NAMES
OS_NAMES = {0: 'linux', 1: 'android'}
#: Broker reconnections one call may make before it fails (the deadline
#: bounds them anyway).
CALL_RETRY = 1
#: Seconds ``watch`` waits for a report before it gives up (default).
WATCH_WAIT = 30.0
#: Prefix of the queue of each ``watch`` (deploy.md's policy matches it).
WATCH_POOL = 'rapid-vmm-watch'


class Failure(Exception):
    """A command failed: the one line to print, and the exit status."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


class Deadline(Exception):
    """The command's time ran out."""


# -- rendering ----------------------------------------------------------


def render_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``rows`` as a prettytable table with the ``columns`` (key, title);
    a table without rows says ``(none)`` under its header."""
    table = prettytable.PrettyTable([title for _, title in columns])
    table.align = 'l'
    for row in rows:
        table.add_row([_cell(row.get(key)) for key, _ in columns])
    text = table.get_string()
    if not rows:
        text += '\n(none)'
    return text


def _cell(value: Any) -> str:
    if value is None:
        return '-'
    if isinstance(value, float):
        return f'{value:.1f}'
    if isinstance(value, (list, tuple)):
        return ','.join(_cell(v) for v in value) or '-'
    return str(value)


def _vm_rows(vms: list[dict]) -> list[dict]:
    rows = []
    for vm in vms:
        row = dict(vm)
        row['status'] = STATUS_NAMES.get(vm.get('status'), vm.get('status'))
        if vm.get('task_state'):
            row['status'] = f"{row['status']} ({vm['task_state']})"
        row['os_type'] = OS_NAMES.get(vm.get('os_type'), vm.get('os_type'))
        row['helper'] = vm.get('helper') or '-'
        row['size'] = (f"{vm.get('vcpus')} vCPU / {vm.get('memory_mb')} MB / "
                       f"{vm.get('disk_gb')} GB")
        row['as_ready'] = 'yes' if vm.get('as_ready') else 'no'
        rows.append(row)
    return rows


VM_COLUMNS = [('user_id', 'USER'), ('vm_id', 'VM ID'), ('name', 'NAME'),
              ('status', 'STATUS'), ('size', 'SIZE'),
              ('gpu_cores', 'GPU CORES'), ('os_type', 'OS'),
              ('helper', 'HELPER'), ('ip_address', 'IP'),
              ('as_ready', 'AS READY')]

USAGE_COLUMNS = {
    'cpu': [('user_id', 'USER'), ('vm_id', 'VM ID'),
            ('cpu_util_percent', 'CPU %'), ('source', 'SOURCE')],
    'memory': [('user_id', 'USER'), ('vm_id', 'VM ID'),
               ('memory_mb', 'MEMORY MB'), ('memory_used_mb', 'USED MB'),
               ('source', 'SOURCE')],
    'disk': [('user_id', 'USER'), ('vm_id', 'VM ID'),
             ('capacity_bytes', 'CAPACITY B'),
             ('allocation_bytes', 'ALLOCATED B'), ('source', 'SOURCE')],
}

GPU_COLUMNS = [('index', 'IDX'), ('name', 'NAME'), ('uuid', 'UUID'),
               ('utilization_percent', 'UTIL %'), ('memory', 'MEMORY MB'),
               ('temperature_c', 'TEMP C'), ('power_w', 'POWER W'),
               ('mig', 'MIG')]


def _types(resources: dict) -> str:
    return _cell(['x'.join(map(str, t))
                  for t in resources.get('available_types') or []])


def render_host_status(status: dict) -> str:
    """Human-readable host status: identity, resources, GPUs, VMs."""
    res = status.get('resources') or {}
    registered = status.get('registered') or {}
    lines = [
        f"Host            {status.get('host')}  (VMM id "
        f"{_cell(status.get('vmm_id'))}, driver {status.get('driver')}, "
        f"version {status.get('version')})",
        f"Registered      DS: {_yes(registered.get('ds'))}   SLAM: "
        f"{_yes(registered.get('slam'))}   hypervisor reachable: "
        f"{_yes(status.get('driver_reachable', True))}",
        f"CPU             {_cell(res.get('cpu_load_percent'))} % of "
        f"{_cell(res.get('cpu_count'))} cores   load average "
        f"{_cell(res.get('load_average'))}",
        f"Memory          {_cell(res.get('memory_free_mb'))} MB available of "
        f"{_cell(res.get('memory_total_mb'))} MB",
        f"Disk            {_cell(res.get('disk_free_gb'))} GB free of "
        f"{_cell(res.get('disk_total_gb'))} GB",
        f"GPU             load {_cell(res.get('gpu_load_percent'))} %, "
        f"{_cell(res.get('gpu_cores'))} cores configured, backend "
        f"{_cell(res.get('gpu_backend'))}",
        f"VMs             {_cell(res.get('vms_running'))} running, "
        f"{_cell(res.get('vms_suspended'))} suspended",
        f'Types that fit  {_types(res)}',
    ]
    gpus = res.get('gpus') or []
    if gpus:
        lines += ['', 'GPUs', render_table([_gpu_row(g) for g in gpus],
                                           GPU_COLUMNS)]
    lines += ['', 'VMs', render_table(_vm_rows(status.get('vms') or []),
                                      VM_COLUMNS)]
    return '\n'.join(lines)


def render_report(report: dict, timestamp: str | None = None) -> str:
    """One line of ``watch``: a ``HostReportPayload``'s data, i.e. what the
    DS got in one ``notify_vmm``."""
    res = report.get('resources') or {}
    vmm_id = report.get('vmm_id')
    who = (f'VMM {vmm_id}' if vmm_id is not None
           else 'not registered with the DS yet')
    return (f"{timestamp or time.strftime('%H:%M:%S')}  "
            f"{report.get('host')} ({who})  "
            f"cpu {_cell(report.get('cpu_load'))} %  "
            f"free memory {_cell(report.get('free_memory_mb'))} MB  "
            f"gpu {_cell(report.get('gpu_load'))} %  "
            f"vms {_cell(res.get('vms_running'))} running / "
            f"{_cell(res.get('vms_suspended'))} suspended  "
            f'fit {_types(res)}')


def _gpu_row(gpu: dict) -> dict:
    row = dict(gpu)
    row['memory'] = (f"{_cell(gpu.get('memory_used_mb'))} / "
                     f"{_cell(gpu.get('memory_total_mb'))}")
    mig = gpu.get('mig') or []
    row['mig'] = f'{len(mig)} instances' if mig else '-'
    return row


def _yes(value: Any) -> str:
    return 'yes' if value else 'no'


# -- command line ---------------------------------------------------------


def _os_type(value: str) -> int:
    names = {'linux': 0, 'android': 1, '0': 0, '1': 1}
    if value.lower() not in names:
        raise argparse.ArgumentTypeError('OS type is linux or android')
    return names[value.lower()]


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{value!r} is not a number'
                                         ) from None
    if number <= 0:
        raise argparse.ArgumentTypeError('must be more than 0')
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='rapid-vmm-client',
        description='Operate a rapid-vmm agent over its RPC API.')
    parser.add_argument('--config-file', action='append',
                        help='configuration file(s) with the broker and '
                             f'topics (default {CLIENT_CONFIG}, else '
                             f'{AGENT_CONFIG}, when they exist)')
    parser.add_argument('--host', help='the agent to talk to (default: '
                                       '[client] host, else [DEFAULT] host)')
    parser.add_argument('--transport-url', help='override the broker URL')
    parser.add_argument('--timeout', type=_positive, default=None,
                        help='seconds a command may take, broker '
                             'reconnections included (default: [client] '
                             'timeout, 10)')
    parser.add_argument('--json', action='store_true',
                        help='print machine-readable JSON')
    parser.add_argument('--debug', action='store_true',
                        help='log what oslo.messaging does on stderr')
    sub = parser.add_subparsers(dest='command', required=True)
    sub.add_parser('status', help='host resources, GPUs and VMs')
    listing = sub.add_parser('list', help='VM records (helpers: --user -1)')
    listing.add_argument('--user', type=int)
    start = sub.add_parser('start', help="start (or resume) a user's VM; "
                                         'give --timeout enough for the AS')
    start.add_argument('user', type=int)
    start.add_argument('--os', type=_os_type, default=0, dest='os_type')
    start.add_argument('--vcpus', type=int, default=1)
    start.add_argument('--memory-mb', type=int, default=1024)
    start.add_argument('--disk-gb', type=int, default=0)
    start.add_argument('--gpu-cores', type=int, default=0)
    start.add_argument('--no-wait', action='store_true',
                       help='cast the request and return at once')
    for name, text in (('suspend', "suspend a user's VM"),
                       ('resume', "resume a user's VM"),
                       ('remove', "remove a user's VM and its disk"),
                       ('confirm-resize', "confirm a user's resize")):
        sub.add_parser(name, help=text).add_argument('user', type=int)
    resize = sub.add_parser('resize', help="change a user's VM type")
    resize.add_argument('user', type=int)
    resize.add_argument('--vcpus', type=int, default=0)
    resize.add_argument('--memory-mb', type=int, default=0)
    resize.add_argument('--disk-gb', type=int, default=0)
    usage = sub.add_parser('usage', help='per-VM CPU, memory or disk use')
    usage.add_argument('resource', choices=('cpu', 'memory', 'disk'))
    usage.add_argument('--user', type=int)
    watch = sub.add_parser(
        'watch', help='print the reports the DS receives, as they come '
                      '(needs the agent\'s notifications)')
    watch.add_argument('--count', type=int, default=0,
                       help='stop after this many reports (0 = never)')
    watch.add_argument('--wait', type=_positive, default=WATCH_WAIT,
                       help='give up when no report came for this many '
                            f'seconds (default {WATCH_WAIT:.0f})')
    return parser


# -- configuration ----------------------------------------------------------


def _readable_files(args: argparse.Namespace) -> list[str]:
    if args.config_file:
        files = args.config_file
    elif os.path.exists(CLIENT_CONFIG):
        files = [CLIENT_CONFIG]
    elif os.path.exists(AGENT_CONFIG):
        files = [AGENT_CONFIG]
    else:
        files = []
    for path in files:
        if not os.access(path, os.R_OK):
            raise Failure(f'configuration error: cannot read {path}; give '
                          f'the CLI a file of its own ({CLIENT_CONFIG}, '
                          '[client] transport_url = ...) or --config-file',
                          2)
    return files


def load_config(args: argparse.Namespace) -> cfg.ConfigOpts:
    """A private ConfigOpts with only what the CLI reads: ``[client]``,
    ``host``, ``vmm_topic``, ``[notifications] host_reports`` and
    oslo.messaging's own options. Every other option of the file (driver
    options, their secrets) is never registered, so never read; unknown
    groups are ignored."""
    conf = cfg.ConfigOpts()
    wanted = {'host', 'vmm_topic'}
    conf.register_opts([opt for opt in default_conf.ALL_OPTS
                        if opt.dest in wanted])
    client_conf.register_opts(conf)
    conf.register_opts([opt for opt in notifications_conf.notifications_opts
                        if opt.dest == 'host_reports'],
                       group='notifications')
    # Every option oslo.messaging reads (transport, rabbit, notifications,
    # tracing and metrics groups): its ConfFixture registers them on a
    # private ConfigOpts, with nothing else.
    conffixture.ConfFixture(conf)
    cli = []
    for path in _readable_files(args):
        cli += ['--config-file', path]
    try:
        conf(cli, project='rapid-vmm', prog='rapid-vmm-client',
             default_config_files=[], default_config_dirs=[])
        if conf.client.vmm_topic:
            conf.set_override('vmm_topic', conf.client.vmm_topic)
        host = args.host or conf.client.host
        if host:
            conf.set_override('host', host)
        url = args.transport_url or conf.client.transport_url
        if url:
            conf.set_override('transport_url', url)
        # Parse what the CLI uses now: a bad value is one clear line here.
        _parsed = (conf.transport_url, conf.vmm_topic, conf.host,
                   conf.client.timeout, conf.client.notification_topics)
    except cfg.Error as exc:
        raise Failure(f'configuration error: {exc}', 2) from None
    return conf


def broker_hosts(conf: cfg.ConfigOpts) -> list[tuple[str, int]]:
    """``(host, port)`` of each broker of the transport URL."""
    try:
        url = messaging.TransportURL.parse(conf, conf.transport_url)
    except messaging.InvalidTransportURL as exc:
        raise Failure(f'configuration error: {exc}', 2) from None
    if url.transport in ('kombu+memory', 'fake'):
        return []
    return [(host.hostname or 'localhost', host.port or 5672)
            for host in url.hosts] or [('localhost', 5672)]


def check_broker(conf: cfg.ConfigOpts, timeout: float) -> None:
    """Fail at once, with one clear line, when no broker of the transport
    URL accepts a TCP connection within ``timeout`` seconds."""
    hosts = broker_hosts(conf)
    errors = []
    for host, port in hosts:
        try:
            socket.create_connection((host, port), timeout).close()
            return
        except OSError as exc:
            errors.append(f'{host}:{port} '
                          f'({exc.strerror or type(exc).__name__})')
    if errors:
        raise Failure(f'error: cannot reach the broker: {", ".join(errors)}')


def make_transport(conf: cfg.ConfigOpts, command: str):
    """The RPC transport (a notification transport for ``watch``); it
    connects only when used, so a bad URL is a configuration error here."""
    try:
        if command == 'watch':
            return messaging.get_notification_transport(conf)
        return rpc.get_transport(conf)
    except (messaging.InvalidTransportURL, messaging.DriverLoadFailure,
            cfg.Error) as exc:
        raise Failure(f'configuration error: {exc}', 2) from None


# -- running under a deadline -----------------------------------------------


def bounded(func: Callable[[], Any], deadline: float) -> Any:
    """``func()`` in a worker thread; its result, or :class:`Deadline` at
    ``deadline`` (time.monotonic()) with the thread abandoned (oslo.messaging
    can retry a broken connection forever inside a call)."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome['result'] = func()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome['error'] = exc

    worker = threading.Thread(target=target, name='rapid-vmm-client',
                              daemon=True)
    worker.start()
    worker.join(max(deadline - time.monotonic(), 0))
    if worker.is_alive():
        raise Deadline()
    if 'error' in outcome:
        raise outcome['error']
    return outcome.get('result')


# -- commands ---------------------------------------------------------------


def _list(api: rpcapi.VmmAPI, ctxt: dict, user: int | None) -> list:
    if user is not None and user < 0:
        # Helpers: the API refuses negative user ids from callers, so the
        # CLI asks for every record and keeps the helper's.
        return [vm for vm in api.get_vm_info(ctxt)
                if vm.get('user_id') == user]
    return api.get_vm_info(ctxt, user_id=user)


def _usage(api: rpcapi.VmmAPI, ctxt: dict, resource: str,
           user: int | None) -> list:
    if user is not None and user < 0:
        return [row for row in api.get_vm_usage(ctxt, resource=resource)
                if row.get('user_id') == user]
    return api.get_vm_usage(ctxt, resource=resource, user_id=user)


def run(args: argparse.Namespace, api: rpcapi.VmmAPI) -> tuple[Any, str]:
    """Run one command; return (result, its readable rendering)."""
    ctxt: dict = {}
    command = args.command
    if command == 'status':
        result = api.get_host_status(ctxt)
        return result, render_host_status(result)
    if command == 'list':
        result = _list(api, ctxt, args.user)
        return result, render_table(_vm_rows(result), VM_COLUMNS)
    if command == 'usage':
        result = _usage(api, ctxt, args.resource, args.user)
        return result, render_table(result, USAGE_COLUMNS[args.resource])
    if command == 'start':
        result = api.start_vm(ctxt, user_id=args.user, os_type=args.os_type,
                              vcpus=args.vcpus, memory_mb=args.memory_mb,
                              gpu_cores=args.gpu_cores, disk_gb=args.disk_gb,
                              wait=not args.no_wait)
        if result is None:
            return None, f'Start of the VM of user {args.user} requested.'
        return result, render_table(_vm_rows([result]), VM_COLUMNS)
    if command in ('suspend', 'resume', 'confirm-resize'):
        method = {'suspend': api.suspend_vm, 'resume': api.resume_vm,
                  'confirm-resize': api.confirm_flavor}[command]
        result = method(ctxt, user_id=args.user)
        return result, render_table(_vm_rows([result]), VM_COLUMNS)
    if command == 'resize':
        result = api.change_flavor(ctxt, user_id=args.user, vcpus=args.vcpus,
                                   memory_mb=args.memory_mb,
                                   disk_gb=args.disk_gb)
        return result, render_table(_vm_rows([result]), VM_COLUMNS)
    if command == 'remove':
        api.remove_vm(ctxt, user_id=args.user)
        return None, f'Removed the VM of user {args.user}.'
    raise ValueError(command)


class ReportEndpoint:
    """Notification endpoint of ``watch``: keeps the host reports."""

    def __init__(self):
        self.reports: queue.Queue = queue.Queue()

    def sample(self, ctxt, publisher_id, event_type, payload, metadata):
        name, _version, data = notifications.unwrap(payload)
        if name == notifications.HOST_PAYLOAD:
            self.reports.put((metadata.get('timestamp'), data))
        return messaging.NotificationResult.HANDLED


def watch_topics(conf: cfg.ConfigOpts) -> list[str]:
    """The topics the agent publishes its reports on; a :class:`Failure`
    when the configuration says it does not publish them."""
    if conf.client.notification_topics:
        return conf.client.notification_topics
    drivers = [d for d in conf.oslo_messaging_notifications.driver
               if d != 'noop']
    if not drivers:
        raise Failure('error: notifications are off in this configuration, '
                      'so the agent publishes no report: set '
                      '[oslo_messaging_notifications] driver = messagingv2 '
                      "in the agent's file (and [client] "
                      'notification_topics in a client-only file)')
    if not conf.notifications.host_reports:
        raise Failure('error: [notifications] host_reports is false: the '
                      'agent does not publish its reports')
    return conf.oslo_messaging_notifications.topics


def _delete_pool_queue(listener, pool: str) -> None:
    """Best effort: remove ``watch``'s own queue (oslo.messaging never
    deletes a pool's queue, and it would keep collecting reports). There is
    no public API for it; without it the broker policy of deploy.md expires
    the queue."""
    try:
        adapter = listener.listener
        connection = adapter._poll_style_listener.conn
        connection.channel.queue_delete(queue=pool)
    except Exception as exc:  # noqa: BLE001 - best effort, logged
        py_logging.getLogger(__name__).debug(
            'Queue %s not deleted: %r', pool, exc)


def watch(args: argparse.Namespace, conf: cfg.ConfigOpts, transport,
          deadline: float) -> int:
    """Print each report the agent ``conf.host`` sends to the DS."""
    topics = watch_topics(conf)
    endpoint = ReportEndpoint()
    pool = f'{WATCH_POOL}.{conf.host}.{uuid.uuid4().hex[:12]}'
    listener = messaging.get_notification_listener(
        transport, [messaging.Target(topic=topic) for topic in topics],
        [_Filtered(endpoint, conf.host)], pool=pool)
    bounded(listener.start, deadline)
    try:
        if not args.json:
            print(f'Reports of {conf.host} to the DS, as they come '
                  f'(topics {",".join(topics)}); Ctrl-C stops.', flush=True)
        shown = 0
        while not args.count or shown < args.count:
            try:
                timestamp, report = endpoint.reports.get(timeout=args.wait)
            except queue.Empty:
                raise Failure(f'error: no report from the agent '
                              f'{conf.host!r} in {args.wait:.0f} s (is it '
                              'running, with notifications on?)') from None
            if args.json:
                print(json.dumps(report, sort_keys=True), flush=True)
            else:
                print(render_report(report, _clock(timestamp)), flush=True)
            shown += 1
    finally:
        stop_by = time.monotonic() + 5
        try:
            bounded(listener.stop, stop_by)
            bounded(lambda: _delete_pool_queue(listener, pool), stop_by)
            bounded(listener.wait, stop_by)
            bounded(transport.cleanup, stop_by)
        except Deadline:
            pass
    return 0


class _Filtered:
    """The report endpoint, for one agent's reports only (oslo.messaging's
    ``filter_rule``)."""

    def __init__(self, endpoint: ReportEndpoint, host: str):
        self.filter_rule = messaging.NotificationFilter(
            publisher_id=f'^{_regex(notifications.PUBLISHER)}\\.'
                         f'{_regex(host)}$',
            event_type=f'^{_regex(notifications.HOST_REPORT)}$')
        self.sample = endpoint.sample


def _regex(text: str) -> str:
    return re.escape(text)


def _clock(timestamp: str | None) -> str:
    """``HH:MM:SS`` of a notification's timestamp (UTC), or now."""
    if timestamp and len(timestamp) >= 19:
        return timestamp[11:19]
    return time.strftime('%H:%M:%S')


def _error_line(exc: Exception, conf: cfg.ConfigOpts, timeout: float,
                command: str) -> str:
    if isinstance(exc, exception.RapidVmmException):
        name = type(exc).__name__.removesuffix('_Remote')
        return f'error: {name}: {str(exc).splitlines()[0]}'
    if isinstance(exc, messaging.MessagingTimeout):
        return _no_answer(conf, timeout, command)
    if isinstance(exc, messaging.MessageDeliveryFailure):
        return f'error: the broker did not take the request: {exc}'
    if isinstance(exc, messaging.RemoteError):
        return f'error: {exc.exc_type}: {str(exc.value).splitlines()[0]}'
    return f'error: {type(exc).__name__}: {str(exc).splitlines()[0]}'


def _no_answer(conf: cfg.ConfigOpts, timeout: float, command: str) -> str:
    line = (f'error: no answer from the agent {conf.host!r} on topic '
            f'{conf.vmm_topic!r} within {timeout:g} s (is it running? is '
            'the broker answering?)')
    if command in ('start', 'resume', 'suspend', 'remove', 'resize',
                   'confirm-resize'):
        line += '; the request may still complete on the agent'
    return line


def _exit(status: int) -> None:
    """Leave now: a thread abandoned at the deadline may hold the
    interpreter (oslo.messaging reconnecting) and must not delay the
    answer."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = build_parser().parse_args(argv)
    py_logging.basicConfig(
        level=py_logging.DEBUG if args.debug else py_logging.CRITICAL,
        format='%(asctime)s %(levelname)s %(name)s %(message)s')
    try:
        conf = load_config(args)
        timeout = args.timeout or conf.client.timeout
        deadline = started + timeout
        transport = make_transport(conf, args.command)
        check_broker(conf, min(timeout, 5.0))
        if args.command == 'watch':
            return watch(args, conf, transport, deadline)
        api = rpcapi.VmmAPI(conf, transport, host=conf.host,
                            timeout=max(deadline - time.monotonic(), 0.1),
                            retry=CALL_RETRY)
        result, text = bounded(lambda: run(args, api), deadline)
        try:
            bounded(transport.cleanup, time.monotonic() + 2)
        except Deadline:
            pass
    except Failure as failure:
        print(f'rapid-vmm-client: {failure}' if failure.status == 2
              else str(failure), file=sys.stderr)
        return failure.status
    except Deadline:
        print(_no_answer(conf, timeout, args.command)
              if args.command != 'watch' else
              f'error: the broker did not answer within {timeout:g} s',
              file=sys.stderr)
        _exit(1)
    except KeyboardInterrupt:
        _exit(130)
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        print(_error_line(exc, conf, timeout, args.command),
              file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True) if args.json
          else text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
