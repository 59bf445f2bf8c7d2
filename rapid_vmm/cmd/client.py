"""``rapid-vmm-client``: the operator CLI over the VMM API.

Examples::

    rapid-vmm-client --config-file /etc/rapid-vmm/rapid-vmm.conf status
    rapid-vmm-client list
    rapid-vmm-client start 7 --vcpus 2 --memory-mb 2048
    rapid-vmm-client usage cpu
    rapid-vmm-client --json list

It reads the broker and topics from the agent's configuration file and
talks to the agent named by ``--host`` (default: the ``host`` option).
"""

import argparse
import json
import os
import sys
import time
from typing import Any

from oslo_service import backend

backend.init_backend(backend.BackendType.THREADING)

from oslo_config import cfg  # noqa: E402
import oslo_messaging as messaging  # noqa: E402

from rapid_vmm import exception  # noqa: E402
from rapid_vmm import rpc  # noqa: E402
from rapid_vmm import rpcapi  # noqa: E402
from rapid_vmm.conf import CONF  # noqa: E402

DEFAULT_CONFIG = '/etc/rapid-vmm/rapid-vmm.conf'
STATUS_NAMES = {1: 'started', 2: 'suspended', 3: 'resumed', 4: 'stopped'}
OS_NAMES = {0: 'linux', 1: 'android'}


# -- rendering ----------------------------------------------------------


def render_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Render ``rows`` as an aligned text table with a header line."""
    header = [title for _, title in columns]
    body = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(header)]
    lines = ['  '.join(h.ljust(w) for h, w in zip(header, widths,
                                                  strict=True)).rstrip(),
             '  '.join('-' * w for w in widths)]
    for row in body:
        lines.append('  '.join(c.ljust(w) for c, w in zip(row, widths,
                                                          strict=True))
                     .rstrip())
    if not body:
        lines.append('(none)')
    return '\n'.join(lines)


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
        f"Types that fit  {_cell(['x'.join(map(str, t)) for t in res.get('available_types') or []])}",  # noqa: E501
    ]
    gpus = res.get('gpus') or []
    if gpus:
        lines += ['', 'GPUs', render_table(
            [_gpu_row(g) for g in gpus],
            [('index', 'IDX'), ('name', 'NAME'), ('uuid', 'UUID'),
             ('utilization_percent', 'UTIL %'), ('memory', 'MEMORY MB'),
             ('temperature_c', 'TEMP C'), ('power_w', 'POWER W'),
             ('mig', 'MIG')])]
    lines += ['', 'VMs', render_table(_vm_rows(status.get('vms') or []),
                                      VM_COLUMNS)]
    return '\n'.join(lines)


def _gpu_row(gpu: dict) -> dict:
    row = dict(gpu)
    row['memory'] = (f"{_cell(gpu.get('memory_used_mb'))} / "
                     f"{_cell(gpu.get('memory_total_mb'))}")
    mig = gpu.get('mig') or []
    row['mig'] = f'{len(mig)} instances' if mig else '-'
    return row


def _yes(value: Any) -> str:
    return 'yes' if value else 'no'


# -- commands -------------------------------------------------------------


def _os_type(value: str) -> int:
    names = {'linux': 0, 'android': 1, '0': 0, '1': 1}
    if value.lower() not in names:
        raise argparse.ArgumentTypeError('OS type is linux or android')
    return names[value.lower()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='rapid-vmm-client',
        description='Operate a rapid-vmm agent over its RPC API.')
    parser.add_argument('--config-file', action='append',
                        help='agent configuration file(s) with '
                             'transport_url and topics (default '
                             f'{DEFAULT_CONFIG} when it exists)')
    parser.add_argument('--host', help='the agent to talk to (default: the '
                                       'host option of the configuration)')
    parser.add_argument('--transport-url', help='override transport_url')
    parser.add_argument('--timeout', type=float, default=None,
                        help='seconds to wait for an answer')
    parser.add_argument('--json', action='store_true',
                        help='print machine-readable JSON')
    sub = parser.add_subparsers(dest='command', required=True)
    sub.add_parser('status', help='host resources, GPUs and VMs')
    listing = sub.add_parser('list', help='VM records')
    listing.add_argument('--user', type=int)
    start = sub.add_parser('start', help="start (or resume) a user's VM")
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
    watch = sub.add_parser('watch', help='print the host status every '
                                         'few seconds')
    watch.add_argument('--interval', type=float, default=5.0)
    watch.add_argument('--count', type=int, default=0,
                       help='stop after this many reports (0 = never)')
    return parser


def _load_config(args: argparse.Namespace) -> None:
    files = args.config_file or ([DEFAULT_CONFIG]
                                 if os.path.exists(DEFAULT_CONFIG) else [])
    cli = []
    for path in files:
        cli += ['--config-file', path]
    CONF(cli, project='rapid-vmm', prog='rapid-vmm-client',
         default_config_files=[], default_config_dirs=[])
    if args.transport_url:
        CONF.set_override('transport_url', args.transport_url)


def run(args: argparse.Namespace, api: rpcapi.VmmAPI) -> tuple[Any, str]:
    """Run one command; return (result, its readable rendering)."""
    ctxt: dict = {}
    command = args.command
    if command == 'status':
        result = api.get_host_status(ctxt)
        return result, render_host_status(result)
    if command == 'list':
        result = api.get_vm_info(ctxt, user_id=args.user)
        return result, render_table(_vm_rows(result), VM_COLUMNS)
    if command == 'usage':
        result = api.get_vm_usage(ctxt, resource=args.resource,
                                  user_id=args.user)
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


def _watch(args: argparse.Namespace, api: rpcapi.VmmAPI) -> None:
    shown = 0
    while True:
        status = api.get_host_status({})
        if args.json:
            print(json.dumps(status), flush=True)
        else:
            print(time.strftime('== %Y-%m-%d %H:%M:%S =='))
            print(render_host_status(status), flush=True)
        shown += 1
        if args.count and shown >= args.count:
            return
        time.sleep(args.interval)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _load_config(args)
    except cfg.Error as exc:
        print(f'rapid-vmm-client: configuration error: {exc}',
              file=sys.stderr)
        return 2
    transport = rpc.get_transport(CONF)
    api = rpcapi.VmmAPI(CONF, transport, host=args.host,
                        timeout=args.timeout)
    try:
        if args.command == 'watch':
            _watch(args, api)
            return 0
        result, text = run(args, api)
    except exception.RapidVmmException as exc:
        print(f'error: {type(exc).__name__.removesuffix("_Remote")}: '
              f'{str(exc).splitlines()[0]}', file=sys.stderr)
        return 1
    except messaging.MessagingTimeout:
        print(f'error: no answer from the agent {api.host!r} on topic '
              f'{CONF.vmm_topic!r} (is it running?)', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        transport.cleanup()
    print(json.dumps(result, indent=2, sort_keys=True) if args.json
          else text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
