"""Benchmark: VMM API round trips on RabbitMQ (SPEC 9, bench_rpc).

The agent runs as a separate process (``python -m rapid_vmm.cmd.vmm``:
one process, oslo.service's threading backend) on the local RabbitMQ and
libvirt's test hypervisor; this process plays the DS and the SLAM
(simulated peers) and the caller. The baseline is a bare oslo.messaging
RPC server (``_echo_server.py``), also a separate process, reading the
agent's own configuration file: same broker, same transport settings,
same client transport here.

- ``start_vm_ms``: p50 of ``start_vm`` for ``--users`` distinct users
  (default 30), one after the other (``as_register_timeout`` 0: the AS
  hand-shake is not waited for; each start makes the qcow2 overlay,
  defines and starts the domain, reads its IP, registers the VM with the
  DS and tells the SLAM). Also ``start_vm_p90_ms`` and
  ``start_vm_running_ms`` (``start_vm`` of a user whose VM runs: the
  idempotent path);
- ``get_vm_info_ms``: ``get_vm_info(user_id)`` (one record, read from
  the state) through ``VmmAPI``; ``echo_ms``: the echo server answering
  with a reply of the same size (the record list); both median over
  ``--calls`` sequential calls (default 200) after 20 warm-up calls each,
  taken in alternating blocks of 20 so that load elsewhere on the
  machine weighs on both alike; ``get_vm_info_vs_echo`` = their ratio
  (target <= 1.5). Also p90s and ``get_vm_info_all_ms`` (every record).

The agent runs with the production ``report_interval`` (10 s) and
``reconcile_interval`` (60 s), ``helper_vm_count`` 0, INFO logging to a
file; the test hypervisor's 3 GiB host is stretched with
``ram/disk_allocation_ratio`` 1000.

Run: ``python benchmarks/bench_rpc.py [--calls 200] [--users 30]``;
~15-30 s. Prints readable figures, then one JSON line.
"""

import statistics
import sys

import _common

TARGET = 1.5
BLOCK = 20


def main(argv) -> int:
    parser = _common.arg_parser(__doc__)
    parser.add_argument('--calls', type=int, default=200)
    parser.add_argument('--users', type=int, default=30)
    args = _common.parse_args(parser, argv)

    with _common.Workspace('rpc') as ws:
        agent = _common.AgentProcess(
            ws, 'rpc', report_interval=10, reconcile_interval=60,
            helper_vm_count=0, as_register_timeout=0)
        startup_s = agent.start()
        agent.wait_registered()
        echo = _common.EchoProcess(ws, agent)
        ds = agent.peers.ds_recorder
        api = agent.api

        # -- start_vm for distinct users ----------------------------------
        start_ms = []
        for user_id in range(1, args.users + 1):
            start_ms.append(_common.timed_ms(_common.start_vm, api, user_id))
        running_ms = [_common.timed_ms(_common.start_vm, api, 1)
                      for _ in range(10)]
        registered = len({kw['user_id'] for kw in ds.calls('register_vm')})

        # -- get_vm_info vs echo ------------------------------------------
        user = max(1, args.users // 2)
        query = api.client.prepare(timeout=60)
        reply = api.get_vm_info({}, user_id=user)
        echo.client.prepare(timeout=60).call({}, 'set_reply', reply=reply)
        echo_call = echo.client.prepare(timeout=60)

        def info():
            query.call({}, 'get_vm_info', user_id=user)

        def bare():
            echo_call.call({}, 'echo', user_id=user)

        for _ in range(BLOCK):  # warm-up: connections, reply queue, caches
            info()
            bare()
        info_ms, echo_ms = [], []
        while len(info_ms) < args.calls:
            block = min(BLOCK, args.calls - len(info_ms))
            info_ms += [_common.timed_ms(info) for _ in range(block)]
            echo_ms += [_common.timed_ms(bare) for _ in range(block)]
        all_reply = api.get_vm_info({})
        echo_call.call({}, 'set_reply', reply=all_reply)
        info_all_ms, echo_all_ms = [], []
        for _ in range(max(args.calls // 4, 10)):
            info_all_ms.append(_common.timed_ms(query.call, {},
                                                'get_vm_info'))
            echo_all_ms.append(_common.timed_ms(echo_call.call, {}, 'echo'))
        records = len(all_reply)
        stop_s = agent.stop()

    info_med = statistics.median(info_ms)
    echo_med = statistics.median(echo_ms)
    ratio = info_med / echo_med
    result = {
        'get_vm_info_ms': round(info_med, 3),
        'echo_ms': round(echo_med, 3),
        'get_vm_info_vs_echo': round(ratio, 2),
        'get_vm_info_p90_ms': round(_common.percentile(info_ms, 90), 3),
        'echo_p90_ms': round(_common.percentile(echo_ms, 90), 3),
        'get_vm_info_vs_echo_p90': round(
            _common.percentile(info_ms, 90) / _common.percentile(echo_ms, 90),
            2),
        'get_vm_info_mean_ms': round(statistics.fmean(info_ms), 3),
        'echo_mean_ms': round(statistics.fmean(echo_ms), 3),
        'get_vm_info_all_ms': round(statistics.median(info_all_ms), 3),
        'echo_all_ms': round(statistics.median(echo_all_ms), 3),
        'get_vm_info_all_records': records,
        'start_vm_ms': round(statistics.median(start_ms), 1),
        'start_vm_p90_ms': round(_common.percentile(start_ms, 90), 1),
        'start_vm': _common.describe(start_ms),
        'start_vm_running_ms': round(statistics.median(running_ms), 2),
        'users': args.users,
        'ds_registered_vms': registered,
        'calls': len(info_ms),
        'agent_startup_s': round(startup_s, 2),
        'agent_stop_s': round(stop_s, 2) if stop_s is not None else None,
        'transport': 'rabbit (local RabbitMQ)',
        'statistic': 'median of sequential calls, alternating blocks of '
                     f'{BLOCK}',
        'target': {'get_vm_info_vs_echo': f'<= {TARGET:g}'},
        'target_met': ratio <= TARGET,
        **_common.machine(),
    }
    print('RPC benchmark: agent process on RabbitMQ, libvirt test driver')
    print(f'  get_vm_info(user)  p50 {info_med:7.3f} ms  p90 '
          f'{result["get_vm_info_p90_ms"]:7.3f} ms  (n={len(info_ms)})')
    print(f'  bare echo          p50 {echo_med:7.3f} ms  p90 '
          f'{result["echo_p90_ms"]:7.3f} ms  (same reply size)')
    print(f'  get_vm_info_vs_echo    {ratio:7.2f}     (target <= {TARGET:g}:'
          f' {_common.verdict(ratio <= TARGET)})')
    print(f'  get_vm_info(all {records})  p50 '
          f'{result["get_vm_info_all_ms"]:.3f} ms vs echo '
          f'{result["echo_all_ms"]:.3f} ms')
    print(f'  start_vm           p50 {result["start_vm_ms"]:7.1f} ms  p90 '
          f'{result["start_vm_p90_ms"]:7.1f} ms  ({args.users} users; '
          f'already running: {result["start_vm_running_ms"]:.2f} ms)')
    print(f'  agent start {startup_s:.2f} s, stop (SIGTERM) '
          f'{result["agent_stop_s"]} s')
    return _common.emit(result)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
