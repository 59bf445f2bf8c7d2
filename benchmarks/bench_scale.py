"""Benchmark: the agent with 10, 100 and 1,000 VMs through libvirtd (SPEC 9).

The hypervisor is libvirtd's test driver, ``test+unix:///default``: every
libvirt call is a real RPC to libvirtd (started in the set-up when no
libvirtd runs, as ``tools/system/setup-host.sh`` does; a running one is
never restarted). The agent is the real service (``VmmService``: RPC
server on RabbitMQ, libvirt driver, SQLite state, resource monitor, DS and
SLAM clients, lifecycle events) in this process, with simulated DS and
SLAM; the VMs are made through its RPC API (``start_vm``) by a process of
their own (``_populate.py``, ``--concurrency`` calls at once), so that the
callers do not share the agent's GIL. Figures:

- ``report_0_ms``, ``report_10_ms``, ``report_100_ms``,
  ``report_1000_ms``: one periodic report
  (``service.manager.periodic_report()``: host sample, VM counts and
  available types, ``notify_vmm`` cast to the DS, the CPU sample of every
  VM) with 0, 10, 100 and 1,000 VMs, median of ``--reps``;
  ``report_exponent`` = log(report_1000 / report_10) / log(100): 1 is
  linear (target: at most linear, <= 1.1);
- ``usage_1000_ms``: ``get_vm_usage(resource='cpu')`` for all 1,000 VMs
  through the RPC API (also ``memory`` and ``disk``), median (target <
  100). Baselines, same run: the bare ``getAllDomainStats`` of the same
  stats groups over a connection of this process to libvirtd
  (``usage_raw_bulk_ms``, the floor of one bulk call) and the RPC round
  trip of ``get_vm_info`` for one user (``rpc_round_trip_ms``);
- ``reconcile_1000_s``: one reconciliation pass
  (``service.manager.reconciler.reconcile()``) over the 1,000 VMs, median
  (target < 2); its floor: listing the domains with the metadata and state
  of each over the bare connection (``reconcile_floor_s``). The run checks
  that no VM was stopped, adopted or lost;
- ``restart_1000_s``: the service stopped (domains stay in libvirtd), then
  ``rapid-vmm`` started as a process on the same state and hypervisor:
  seconds until it answers, with its start-up reconciliation;
  ``restart_0_s`` is the same for an agent with no VM (the interpreter and
  library start-up), measured first. After the restart every VM must still
  be running and recorded.

``test:///default``'s fixed host (16 CPUs, 3 GiB) is stretched with the
allocation ratios (1000) so that capacity is not what is measured. The
shared test driver also holds other users' domains: ``foreign_domains``
says how many the listing had to skip.

Run: ``python benchmarks/bench_scale.py [--vms 1000] [--reps 9]
[--concurrency 16]``; about 45-60 s on a 2-core machine (most of it making
the VMs). Prints readable figures, then one JSON line.
"""

import json
import math
import os
import statistics
import subprocess
import sys
import time

import _common

TARGETS = {'usage_1000_ms': '< 100', 'reconcile_1000_s': '< 2',
           'report': 'at most linear (report_exponent <= 1.1)'}


def repeat_ms(func, reps: int) -> list[float]:
    """Milliseconds of ``reps`` calls of ``func``, after one warm-up."""
    func()
    return [_common.timed_ms(func) for _ in range(reps)]


def populate(config_file: str, first: int, last: int,
             concurrency: int) -> dict:
    """``start_vm`` for users first..last from a process of their own."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          '_populate.py')
    done = subprocess.run(
        [sys.executable, script, '--config-file', config_file,
         '--first', str(first), '--last', str(last),
         '--concurrency', str(concurrency)],
        capture_output=True, text=True, timeout=600, check=False)
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f'populate failed: {done.stderr[-2000:]}')
    result = json.loads(lines[-1])
    if result['errors']:
        raise RuntimeError(f'start_vm failed: {result["errors"]}')
    return result


def main(argv) -> int:
    parser = _common.arg_parser(__doc__)
    parser.add_argument('--vms', type=int, default=1000)
    parser.add_argument('--reps', type=int, default=9,
                        help='timed repetitions of each measurement')
    parser.add_argument('--concurrency', type=int, default=16,
                        help='start_vm calls at once while making the VMs')
    args = _common.parse_args(parser, argv)
    libvirtd = _common.ensure_libvirtd()
    from rapid_vmm import service as vmm_service
    from rapid_vmm.virt.libvirt import host as vhost
    libvirt = vhost.libvirt

    big = args.vms
    sizes = [n for n in (10, 100, 1000) if n < big] + [big]
    run_started = time.monotonic()
    names: dict[str, str] = {}
    with _common.Workspace('scale') as ws:
        agent = _common.AgentProcess(
            ws, 'scale', report_interval=3600, reconcile_interval=0,
            cpu_allocation_ratio=1000.0, api_timeout=120,
            **{'libvirt.connection_uri': _common.LIBVIRTD_URI})
        conf = agent.conf
        ws.add(lambda: _common.remove_domains(names.values()))

        # -- the start-up of an agent with no VM, as a process ------------
        restart_0 = agent.start()
        agent.wait_registered()
        agent.stop()

        # -- the service in this process ----------------------------------
        service = vmm_service.VmmService(conf)
        service.start()
        ws.add_stopper(lambda: service.stop())
        manager = service.manager
        _common.wait_until(
            lambda: agent.api.get_host_status({})['vmm_id'] is not None, 30,
            'the in-process agent has no VMM id')

        # -- reports at 0, 10, 100, 1000 VMs --------------------------------
        reports = {}
        made = 0
        populate_s = 0.0
        for count in [0, *sizes]:
            if count > made:
                got = populate(agent.config_file, made + 1, count,
                               args.concurrency)
                names.update(got['names'])
                populate_s += got['seconds']
                made = count
                manager.reconciler.reconcile()  # let the events' pass end
            reports[count] = repeat_ms(manager.periodic_report,
                                       args.reps if count < big else
                                       max(3, args.reps // 2))
        report_med = {n: statistics.median(v) for n, v in reports.items()}

        # -- usage of every VM, through the RPC API -------------------------
        # Measured in the steady state: once the DS and SLAM messages of
        # the new VMs are delivered and their DS ids are written into the
        # domains' metadata (1,000 of each, in the background, which
        # would otherwise share this process's CPU with the calls).
        _common.wait_until(lambda: not any(
            manager.store.outbox_depth().values()), 300,
            'the outbox never emptied')
        manager._metadata_writer.submit(lambda: None).result(300)
        # The bare connection of the baselines, opened now: libvirtd's
        # keepalive drops an idle client that runs no event loop.
        raw = libvirt.open(_common.LIBVIRTD_URI)
        ws.add(raw.close)
        query = agent.api.client.prepare(timeout=60)
        usage = {resource: repeat_ms(
            lambda r=resource: query.call({}, 'get_vm_usage', resource=r),
            args.reps) for resource in ('cpu', 'memory', 'disk')}
        usage_rows = len(query.call({}, 'get_vm_usage', resource='disk'))
        groups = (libvirt.VIR_DOMAIN_STATS_STATE |
                  libvirt.VIR_DOMAIN_STATS_CPU_TOTAL |
                  libvirt.VIR_DOMAIN_STATS_BALLOON |
                  libvirt.VIR_DOMAIN_STATS_BLOCK)
        raw_bulk = repeat_ms(lambda: raw.getAllDomainStats(groups, 0),
                             args.reps)
        round_trip = repeat_ms(
            lambda: query.call({}, 'get_vm_info', user_id=1), args.reps)

        # -- reconciliation -------------------------------------------------
        summaries = []

        def reconcile():
            summaries.append(manager.reconciler.reconcile())
        reconcile_ms = repeat_ms(reconcile, max(3, args.reps // 2))
        changes = {}
        for summary in summaries:
            for key, items in (summary or {}).items():
                if items:
                    changes[key] = changes.get(key, 0) + len(items)

        def floor():
            for dom in raw.listAllDomains(0):
                try:
                    dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                 _common.METADATA_NS)
                except libvirt.libvirtError:
                    continue
                dom.state()
        floor_ms = repeat_ms(floor, 3)
        listed = raw.listAllDomains(0)
        ours = set(names.values())
        foreign = sum(1 for dom in listed if dom.name() not in ours)

        # -- restart as a process -------------------------------------------
        service.stop()
        restart_1000 = agent.start(timeout=120)
        records = agent.api.get_vm_info({})
        running = sum(1 for vm in records if vm['status'] in (1, 3))
        domains_after = len(set(_common.domains_of(conf.host)) & ours)
        agent.stop()
        load_end = os.getloadavg()[0]
    total_s = time.monotonic() - run_started

    usage_ms = statistics.median(usage['cpu'])
    reconcile_s = statistics.median(reconcile_ms) / 1e3
    exponent = (math.log(report_med[sizes[-1]] / report_med[sizes[0]]) /
                math.log(sizes[-1] / sizes[0])) if len(sizes) > 1 else None
    result = {f'report_{n}_ms': round(report_med[n], 2) for n in [0, *sizes]}
    result.update({
        'usage_1000_ms': round(usage_ms, 2),
        'reconcile_1000_s': round(reconcile_s, 3),
        'uri': _common.LIBVIRTD_URI,
        'vms': big,
        'report_exponent': round(exponent, 2) if exponent else None,
        'report_per_vm_us': round(
            (report_med[big] - report_med[0]) / big * 1e3, 2),
        'usage_memory_1000_ms': round(statistics.median(usage['memory']), 2),
        'usage_disk_1000_ms': round(statistics.median(usage['disk']), 2),
        'usage_rows': usage_rows,
        'usage_raw_bulk_ms': round(statistics.median(raw_bulk), 2),
        'rpc_round_trip_ms': round(statistics.median(round_trip), 2),
        'usage_vs_floor': round(usage_ms / (statistics.median(raw_bulk) +
                                            statistics.median(round_trip)),
                                2),
        'reconcile_floor_s': round(statistics.median(floor_ms) / 1e3, 3),
        'reconcile_changes': changes,
        'restart_0_s': round(restart_0, 2),
        'restart_1000_s': round(restart_1000, 2),
        'records_after_restart': len(records),
        'running_after_restart': running,
        'domains_after_restart': domains_after,
        'foreign_domains': foreign,
        'populate_s': round(populate_s, 1),
        'populate_concurrency': args.concurrency,
        'starts_per_s': round(big / populate_s, 1) if populate_s else None,
        'seconds': round(total_s, 1),
        'libvirtd': libvirtd,
        'targets': TARGETS,
        **_common.machine(),
        'load_avg_1m_end': round(load_end, 2),
    })
    met = {
        'usage_1000_ms': usage_ms < 100,
        'reconcile_1000_s': reconcile_s < 2,
        'report_linear': exponent is not None and exponent <= 1.1,
        'nothing_lost': (usage_rows == big and not changes and
                         running == big and domains_after == big),
    }
    result['targets_met'] = met
    result['all_targets_met'] = all(met.values())

    print(f'scale benchmark: {big} VMs through libvirtd '
          f'({_common.LIBVIRTD_URI}; {libvirtd}), made by start_vm over '
          f'RPC in {populate_s:.1f} s ({result["starts_per_s"]}/s at '
          f'{args.concurrency} at once)')
    print('  periodic report, median ms:')
    for n in [0, *sizes]:
        print(f'    {n:5d} VMs  {report_med[n]:8.2f} ms')
    print(f'    exponent {result["report_exponent"]} (1 = linear; target '
          f'<= 1.1: {_common.verdict(met["report_linear"])})')
    print(f'  get_vm_usage over RPC, {big} VMs: cpu {usage_ms:.2f} ms, '
          f'memory {result["usage_memory_1000_ms"]:.2f} ms, disk '
          f'{result["usage_disk_1000_ms"]:.2f} ms (target < 100: '
          f'{_common.verdict(met["usage_1000_ms"])}); floor: bare '
          f'getAllDomainStats {result["usage_raw_bulk_ms"]:.2f} ms + RPC '
          f'round trip {result["rpc_round_trip_ms"]:.2f} ms')
    print(f'  reconcile pass: {reconcile_s:.3f} s (target < 2: '
          f'{_common.verdict(met["reconcile_1000_s"])}); floor (list + '
          f'metadata + state of every domain) '
          f'{result["reconcile_floor_s"]:.3f} s; {foreign} foreign '
          f'domain(s) listed; changes {changes or "none"}')
    print(f'  restart as a process: {restart_1000:.2f} s with {big} VMs, '
          f'{restart_0:.2f} s with none; after it {running}/{big} running, '
          f'{domains_after} domains')
    return _common.emit(result)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
