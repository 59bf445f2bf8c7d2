"""Many ``start_vm`` calls from a process of their own (not a benchmark).

``python benchmarks/_populate.py --config-file F --first A --last B
[--concurrency N]`` reads the agent's configuration file, sends
``start_vm`` for users A..B through ``VmmAPI`` (the RPC API, N at once)
and prints one JSON line: ``ok``, ``errors`` (error class -> count, first
message of each), ``seconds``, ``names`` (user -> domain name) and the
latency figures. Used by bench_scale so that the callers do not share a
process (and its GIL) with the agent under test.
"""

import argparse  # noqa: I001 - rapid_vmm first, below
import concurrent.futures
import json
import statistics
import sys
import time

import rapid_vmm  # noqa: F401 - first: oslo.service's threading backend

from rapid_vmm import conf as rapid_conf
from rapid_vmm import rpc
from rapid_vmm import rpcapi


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config-file', required=True)
    parser.add_argument('--first', type=int, required=True)
    parser.add_argument('--last', type=int, required=True)
    parser.add_argument('--concurrency', type=int, default=16)
    parser.add_argument('--timeout', type=float, default=120)
    args = parser.parse_args(argv)
    conf = rapid_conf.CONF
    conf(['--config-file', args.config_file], project='rapid-vmm-bench',
         default_config_files=[], default_config_dirs=[])
    transport = rpc.get_transport(conf)
    api = rpcapi.VmmAPI(conf, transport, timeout=args.timeout)
    users = range(args.first, args.last + 1)

    def one(user_id):
        started = time.perf_counter()
        try:
            vm = api.start_vm({}, user_id=user_id, os_type=0, vcpus=1,
                              memory_mb=1024)
            return user_id, vm['name'], None, time.perf_counter() - started
        except Exception as exc:  # noqa: BLE001 - counted and reported
            return (user_id, None, f'{type(exc).__name__}: {exc}',
                    time.perf_counter() - started)

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        outcomes = list(pool.map(one, users))
    seconds = time.monotonic() - started
    transport.cleanup()
    errors: dict[str, list] = {}
    for _user, _name, error, _s in outcomes:
        if error:
            kind = error.split(':', 1)[0]
            errors.setdefault(kind, [0, error[:200]])[0] += 1
    latencies = [s * 1000 for _u, name, _e, s in outcomes if name]
    print(json.dumps({
        'ok': len(latencies),
        'errors': errors,
        'seconds': round(seconds, 3),
        'names': {user: name for user, name, _e, _s in outcomes if name},
        'latency_p50_ms': (round(statistics.median(latencies), 1)
                           if latencies else None),
        'latency_max_ms': round(max(latencies), 1) if latencies else None,
    }), flush=True)
    return 0 if not errors else 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
