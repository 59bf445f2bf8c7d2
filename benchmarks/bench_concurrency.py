"""Benchmark: concurrent start_vm with the AS hand-shake (SPEC 9).

The agent runs as a separate process on the local RabbitMQ and libvirtd's
test driver (``test+unix:///default``: every call a real RPC, and the
domains visible from this process), with the Acceleration Server
hand-shake on (``as_register_timeout`` 30 s); ``helper_vm_count`` 0,
``reconcile_interval`` 0 (reconciliation runs at start and whenever a
libvirt event asks, here at every domain start). This process plays the
DS, the SLAM and a stand-in AS for every VM:

* the test driver gives every domain the same fake address, so
  ``[libvirt] ip_command`` is ``_ip_command.sh``: it derives a distinct
  address from the domain's name, prints it for the agent and tells the
  stand-in AS on a FIFO; the stand-in AS then calls ``as_register`` with
  that address (retried while the agent does not know it yet) and
  ``as_confirm`` for the user it was given, as a real AS does once its VM
  has booted. ``start_vm`` answers only once its AS confirmed.

It sends:

1. ``--starts`` (default 200) ``start_vm`` calls at once, one per distinct
   user, each from its own thread through ``VmmAPI``;
2. then ``--one-user`` (default 50) ``start_vm`` calls at once for one
   more user.

and then checks, for every user, from independent sources:

* the replies: one success per call, with the user's id;
* the agent's records (``get_vm_info``): one record per user, running,
  no task left;
* the DS: exactly one ``register_vm`` per user, distinct VM ids, and the
  SLAM: one ``vm_started`` per call;
* the stand-in AS: one confirmation per user (``as_confirmed``);
* the hypervisor, seen from this process: libvirtd's domains whose
  metadata names the agent's ``host``, per user, and the disk files in
  ``images_path`` per user.

Keys: ``starts`` (calls sent), ``ok`` (successful replies), ``lost``
(users without exactly one running VM by every source, or whose call
failed), ``duplicated`` (users with more than one domain, disk, DS
registration or record by any source), ``seconds`` (wall time of the
concurrent starts), ``one_user_vms`` (domains the one user ends up with),
``as_confirmed`` (distinct users whose AS confirmed), plus the latency of
the calls. Targets: 200 starts, 0 lost, 0 duplicated, one_user_vms 1,
as_confirmed 200.

libvirt's test hypervisor says the host has 16 CPUs and 3 GiB: the agent
runs with ``ram_allocation_ratio`` and ``disk_allocation_ratio`` 1000 so
that capacity is not what is tested; ``cpu_allocation_ratio`` stays 16
(256 vCPUs for 201 one-vCPU VMs). ``--pool-size`` sets the agent's
``max_concurrent_requests`` (default: its default, 100).

Run: ``python benchmarks/bench_concurrency.py [--starts 200]
[--one-user 50]``; ~20-40 s. Prints readable figures, then one JSON line.
"""

import collections
import concurrent.futures
import os
import re
import statistics
import sys
import threading
import time

import _common

VM_NAME = re.compile(r'rapid-vm-(\d+)-[0-9a-f]+')
AS_TIMEOUT = 30
"""The agent's as_register_timeout here: it bounds the run when starts
wait for AS hand-shakes that cannot be served."""


def concurrent_starts(api, users: list[int]) -> tuple[list, float]:
    """``start_vm`` for each of ``users`` at once; (outcomes, seconds).

    Each outcome is (user_id, reply or None, error or None, ms).
    """
    barrier = threading.Barrier(len(users))

    def one(user_id):
        barrier.wait()
        started = time.perf_counter()
        try:
            reply = _common.start_vm(api, user_id)
            error = None
        except Exception as exc:  # noqa: BLE001 - counted, not raised
            reply, error = None, f'{type(exc).__name__}: {exc}'
        return (user_id, reply, error,
                (time.perf_counter() - started) * 1000.0,
                time.perf_counter())

    with concurrent.futures.ThreadPoolExecutor(len(users)) as pool:
        outcomes = [f.result() for f in [pool.submit(one, u) for u in users]]
    first_sent = min(o[4] - o[3] / 1000.0 for o in outcomes)
    last_answered = max(o[4] for o in outcomes)
    return [o[:4] for o in outcomes], last_answered - first_sent


def domains_per_user(host: str) -> tuple[collections.Counter,
                                         collections.Counter, list]:
    """(domains, running domains) per user among libvirtd's domains of the
    agent ``host``, and their names."""
    made = collections.Counter()
    running = collections.Counter()
    domains = _common.domains_of(host)
    for name, active in domains.items():
        match = VM_NAME.fullmatch(name)
        if match:
            made[int(match.group(1))] += 1
            running[int(match.group(1))] += active
    return made, running, list(domains)


def disks_per_user(agent) -> collections.Counter:
    disks = collections.Counter()
    try:
        names = os.listdir(agent.images_path)
    except FileNotFoundError:
        return disks
    for name in names:
        match = VM_NAME.fullmatch(name.rsplit('.', 1)[0])
        if match and not name.endswith('.console.log'):
            disks[int(match.group(1))] += 1
    return disks


def wait_quiet(agent, seconds: float = 1.5, limit: float = 30) -> None:
    """Wait until the agent's log has not grown for ``seconds``: the
    reconciliation set off by the starts' events has finished."""
    state = {'size': -1, 'since': time.monotonic()}

    def quiet():
        size = os.path.getsize(agent.log_file)
        if size != state['size']:
            state['size'], state['since'] = size, time.monotonic()
            return False
        return time.monotonic() - state['since'] >= seconds
    try:
        _common.wait_until(quiet, limit, 'agent log still growing',
                           interval=0.2)
    except RuntimeError:
        pass  # measured anyway: the checks below say what is wrong


def main(argv) -> int:
    parser = _common.arg_parser(__doc__)
    parser.add_argument('--starts', type=int, default=200)
    parser.add_argument('--one-user', type=int, default=50)
    parser.add_argument('--pool-size', type=int, default=None,
                        help="the agent's max_concurrent_requests (default:"
                             ' its default)')
    args = _common.parse_args(parser, argv)
    one_user = 100000
    libvirtd = _common.ensure_libvirtd()

    with _common.Workspace('concurrency') as ws:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              '_ip_command.sh')
        fifo = os.path.join(ws.path, 'ip-command.fifo')
        overrides = {}
        if args.pool_size:
            overrides['max_concurrent_requests'] = args.pool_size
        agent = _common.AgentProcess(
            ws, 'concurrency', report_interval=10, reconcile_interval=0,
            helper_vm_count=0, as_register_timeout=AS_TIMEOUT,
            api_timeout=AS_TIMEOUT + 15, **overrides,
            **{'libvirt.connection_uri': _common.LIBVIRTD_URI,
               'libvirt.ip_command': f'/bin/sh {script} {fifo}'})
        stand_in = _common.StandInAS(agent.api, register_timeout=AS_TIMEOUT,
                                     call_timeout=5)
        ws.add(stand_in.close)
        listener = _common.FifoListener(ws, stand_in.announce)
        assert listener.path == fifo
        agent.start()
        ws.add(_common.remove_domains_of, agent.host)
        agent.wait_registered()
        ds = agent.peers.ds_recorder
        slam = agent.peers.slam_recorder
        api = agent.api
        users = list(range(1, args.starts + 1))

        outcomes, seconds = concurrent_starts(api, users)
        wait_quiet(agent)
        one_outcomes, one_seconds = concurrent_starts(
            api, [one_user] * args.one_user)
        wait_quiet(agent)

        records = {vm['user_id']: vm for vm in api.get_vm_info({})}
        registrations = collections.Counter(
            kw['user_id'] for kw in ds.calls('register_vm'))
        ds_vm_ids = [kw['vm_id'] for kw in ds.calls('register_vm')]
        started_msgs = collections.Counter(
            kw['vm']['user_id'] for kw in slam.calls('vm_started'))
        failed_msgs = collections.Counter(
            kw['user_id'] for kw in slam.calls('vm_start_failed'))
        domains, running, _names = domains_per_user(agent.host)
        disks = disks_per_user(agent)
        confirmed = dict(stand_in.confirmed)
        as_failures = list(stand_in.failures)
        errors_logged = len(agent.log_lines(' ERROR '))
        announced = listener.lines

    # -- verdicts ------------------------------------------------------------
    errors = collections.Counter(
        error.split(':', 1)[0] for _u, _r, error, _ms in outcomes if error)
    ok_users = {u for u, reply, error, _ms in outcomes
                if error is None and reply and reply.get('user_id') == u}
    lost_users = set()
    dup_users = set()
    for user in users:
        record = records.get(user)
        healthy = (user in ok_users and record is not None and
                   record['status'] in (1, 3) and
                   not record.get('task_state') and domains[user] == 1 and
                   running[user] == 1 and disks[user] == 1 and
                   registrations[user] == 1 and started_msgs[user] == 1 and
                   confirmed.get(user) == 1)
        if not healthy:
            lost_users.add(user)
        if domains[user] > 1 or disks[user] > 1 or \
                registrations[user] > 1 or confirmed.get(user, 0) > 1:
            dup_users.add(user)
    lost_users -= dup_users
    one_names = {reply['name'] for _u, reply, error, _ms in one_outcomes
                 if reply}
    one_errors = [error for _u, _r, error, _ms in one_outcomes if error]
    one_user_vms = max(domains[one_user], disks[one_user], len(one_names))
    latencies = [ms for _u, reply, _e, ms in outcomes if reply]
    one_latencies = [ms for _u, reply, _e, ms in one_outcomes if reply]

    result = {
        'starts': len(outcomes),
        'ok': len(ok_users),
        'lost': len(lost_users),
        'duplicated': len(dup_users),
        'seconds': round(seconds, 2),
        'one_user_vms': one_user_vms,
        'as_confirmed': sum(1 for u in users if confirmed.get(u)),
        'as_failures': as_failures[:10],
        'ip_command_announcements': announced,
        'starts_per_s': round(len(ok_users) / seconds, 1),
        'start_latency_ms': (_common.describe(latencies) if latencies
                             else None),
        'errors': dict(errors),
        'lost_users': sorted(lost_users)[:20],
        'duplicated_users': sorted(dup_users)[:20],
        'checks': {
            'records': sum(1 for u in users if u in records),
            'records_running': sum(1 for u in users if u in records and
                                   records[u]['status'] in (1, 3)),
            'ds_register_vm': sum(registrations[u] for u in users),
            'ds_distinct_vm_ids': len(set(ds_vm_ids)),
            'slam_vm_started': sum(started_msgs[u] for u in users),
            'slam_vm_start_failed': sum(failed_msgs.values()),
            'domains': sum(domains[u] for u in users),
            'domains_running': sum(running[u] for u in users),
            'disks': sum(disks[u] for u in users),
            'error_lines_in_agent_log': errors_logged,
        },
        'one_user': {
            'calls': len(one_outcomes),
            'ok': len(one_outcomes) - len(one_errors),
            'errors': one_errors[:5],
            'distinct_names_in_replies': len(one_names),
            'domains': domains[one_user],
            'disks': disks[one_user],
            'records': int(one_user in records),
            'ds_register_vm': registrations[one_user],
            'as_confirmed': confirmed.get(one_user, 0),
            'seconds': round(one_seconds, 2),
            'latency_ms': (_common.describe(one_latencies) if one_latencies
                           else None),
        },
        'agent': {'max_concurrent_requests': args.pool_size or 100,
                  'as_register_timeout': AS_TIMEOUT,
                  'ram_allocation_ratio': 1000.0,
                  'disk_allocation_ratio': 1000.0,
                  'ip_command': '_ip_command.sh (distinct fake addresses)'},
        'uri': _common.LIBVIRTD_URI,
        'libvirtd': libvirtd,
        'targets': {'starts': 200, 'lost': 0, 'duplicated': 0,
                    'one_user_vms': 1, 'as_confirmed': 200},
        **_common.machine(),
    }
    met = (result['starts'] >= 200 and result['lost'] == 0 and
           result['duplicated'] == 0 and one_user_vms == 1 and
           result['ok'] == result['starts'] and not one_errors and
           result['as_confirmed'] == result['starts'])
    result['targets_met'] = met
    print('concurrency benchmark: agent process on RabbitMQ, libvirtd '
          f'({_common.LIBVIRTD_URI}), AS hand-shake by a stand-in AS')
    print(f'  {len(outcomes)} concurrent start_vm, distinct users: '
          f'{len(ok_users)} ok in {seconds:.2f} s '
          f'({result["starts_per_s"]} starts/s); errors {dict(errors) or 0}')
    if latencies:
        print(f'    latency p50 {statistics.median(latencies):.0f} ms, p90 '
              f'{_common.percentile(latencies, 90):.0f} ms, max '
              f'{max(latencies):.0f} ms')
    checks = result['checks']
    print(f'    records {checks["records"]} ({checks["records_running"]} '
          f'running), DS register_vm {checks["ds_register_vm"]} '
          f'({checks["ds_distinct_vm_ids"]} distinct ids), SLAM vm_started '
          f'{checks["slam_vm_started"]}, domains {checks["domains"]} '
          f'({checks["domains_running"]} running), disks {checks["disks"]},'
          f' AS confirmed {result["as_confirmed"]}')
    print(f'    lost {result["lost"]}, duplicated {result["duplicated"]}')
    print(f'  {len(one_outcomes)} concurrent start_vm, one user: '
          f'{one_user_vms} VM ({len(one_names)} distinct name(s) in '
          f'{len(one_outcomes) - len(one_errors)} replies, '
          f'{domains[one_user]} domain(s), {disks[one_user]} disk(s)) in '
          f'{one_seconds:.2f} s')
    print(f'  targets (200 starts, 0 lost, 0 duplicated, one_user_vms 1, '
          f'as_confirmed 200): '
          f'{_common.verdict(met)}')
    return _common.emit(result)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
