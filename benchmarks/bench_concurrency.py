"""Benchmark: concurrent start_vm (SPEC 9, bench_concurrency).

The agent runs as a separate process on the local RabbitMQ and libvirt's
test hypervisor (``as_register_timeout`` 0, ``helper_vm_count`` 0,
``reconcile_interval`` 0: reconciliation runs at start and whenever a
libvirt event asks, which here is at every domain start); this process
plays the DS and the SLAM and sends:

1. ``--starts`` (default 200) ``start_vm`` calls at once, one per distinct
   user, each from its own thread through ``VmmAPI``;
2. then ``--one-user`` (default 50) ``start_vm`` calls at once for one
   more user.

and then checks, for every user, from four independent sources:

* the replies: one success per call, with the user's id;
* the agent's records (``get_vm_info``): one record per user, running,
  no task left (the reconciliation that the starts' libvirt events set
  off has run by then, and it marks a record whose domain is missing as
  stopped);
* the DS: exactly one ``register_vm`` per user, distinct VM ids, and the
  SLAM: one ``vm_started`` per call;
* the hypervisor, seen from outside the agent's process: its log lines
  ``Started domain``/``Removed domain`` per user (domains made minus
  removed), its disk files in ``images_path`` per user, and no
  ``Adopted`` or ``claims user`` line (an extra domain for a user would
  be reported so by the reconciliation).

Keys: ``starts`` (calls sent), ``ok`` (successful replies), ``lost``
(users without exactly one running VM by every source, or whose call
failed), ``duplicated`` (users with more than one domain, disk, DS
registration or record by any source), ``seconds`` (wall time of the
concurrent starts), ``one_user_vms`` (domains the one user ends up with),
plus the latency of the calls. Targets: 200 starts, 0 lost, 0 duplicated,
one_user_vms 1.

libvirt's test hypervisor says the host has 16 CPUs and 3 GiB: the agent
runs with ``ram_allocation_ratio`` and ``disk_allocation_ratio`` 1000 (as
the functional tests' agent does) so that capacity is not what is tested;
``cpu_allocation_ratio`` stays 16 (256 vCPUs for 201 one-vCPU VMs).

Run: ``python benchmarks/bench_concurrency.py [--starts 200]
[--one-user 50]``; ~15-30 s. Prints readable figures, then one JSON line.
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


def domains_per_user(agent) -> collections.Counter:
    """Domains made minus removed, per user, from the agent's log."""
    made = collections.Counter()
    for line in agent.log_lines('Started domain '):
        match = VM_NAME.search(line)
        if match:
            made[int(match.group(1))] += 1
    for line in agent.log_lines('Removed domain '):
        match = VM_NAME.search(line)
        if match:
            made[int(match.group(1))] -= 1
    return made


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
    deadline = time.monotonic() + limit
    last = -1
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        size = os.path.getsize(agent.log_file)
        if size != last:
            last, stable_since = size, time.monotonic()
        elif time.monotonic() - stable_since >= seconds:
            return
        time.sleep(0.2)


def main(argv) -> int:
    parser = _common.arg_parser(__doc__)
    parser.add_argument('--starts', type=int, default=200)
    parser.add_argument('--one-user', type=int, default=50)
    args = _common.parse_args(parser, argv)
    one_user = 100000

    with _common.Workspace('concurrency') as ws:
        agent = _common.AgentProcess(
            ws, 'concurrency', report_interval=10, reconcile_interval=0,
            helper_vm_count=0, as_register_timeout=0, api_timeout=180)
        agent.start()
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
        domains = domains_per_user(agent)
        disks = disks_per_user(agent)
        adopted = agent.log_lines('Adopted instance')
        claims = agent.log_lines(' claims user ')
        errors_logged = len(agent.log_lines(' ERROR '))

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
                   record['status'] in (1, 3) and not record['task_state']
                   and domains[user] == 1 and disks[user] == 1 and
                   registrations[user] == 1 and started_msgs[user] == 1)
        if not healthy:
            lost_users.add(user)
        if domains[user] > 1 or disks[user] > 1 or registrations[user] > 1:
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
            'disks': sum(disks[u] for u in users),
            'adopted_lines': len(adopted),
            'claims_lines': len(claims),
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
            'seconds': round(one_seconds, 2),
            'latency_ms': (_common.describe(one_latencies) if one_latencies
                           else None),
        },
        'agent': {'max_concurrent_requests': 100, 'as_register_timeout': 0,
                  'ram_allocation_ratio': 1000.0,
                  'disk_allocation_ratio': 1000.0,
                  'hypervisor': 'test:///default (16 CPUs, 3 GiB)'},
        'targets': {'starts': 200, 'lost': 0, 'duplicated': 0,
                    'one_user_vms': 1},
        **_common.machine(),
    }
    met = (result['starts'] >= 200 and result['lost'] == 0 and
           result['duplicated'] == 0 and one_user_vms == 1 and
           result['ok'] == result['starts'] and not one_errors)
    result['targets_met'] = met
    print('concurrency benchmark: agent process on RabbitMQ, test driver')
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
          f'{checks["slam_vm_started"]}, domains {checks["domains"]}, disks '
          f'{checks["disks"]}, adopted/claimed {checks["adopted_lines"]}/'
          f'{checks["claims_lines"]}')
    print(f'    lost {result["lost"]}, duplicated {result["duplicated"]}')
    print(f'  {len(one_outcomes)} concurrent start_vm, one user: '
          f'{one_user_vms} VM ({len(one_names)} distinct name(s) in '
          f'{len(one_outcomes) - len(one_errors)} replies, '
          f'{domains[one_user]} domain(s), {disks[one_user]} disk(s)) in '
          f'{one_seconds:.2f} s')
    print(f'  targets (200 starts, 0 lost, 0 duplicated, one_user_vms 1): '
          f'{_common.verdict(met)}')
    return _common.emit(result)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
