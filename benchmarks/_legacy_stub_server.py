"""The legacy front end over a stub VMM API: bench_legacy's diagnostic.

``python benchmarks/_legacy_stub_server.py --records JSON`` runs
:class:`rapid_vmm.legacy.server.LegacyServer` on a free local port in its
own process, in front of an API object whose ``get_vm_info`` returns the
given records at once (no state store, no agent around it), and writes
``ready <port>`` on stdout. The difference between it and the agent is
what the VMM API call costs inside the agent; between it and the bare echo
what the front end itself costs. SIGTERM or SIGINT stops it.
"""

import argparse  # noqa: I001 - rapid_vmm first, below
import json
import signal
import sys
import threading

import rapid_vmm  # noqa: F401 - threading backend first

from oslo_config import cfg

from rapid_vmm import conf as rapid_conf
from rapid_vmm.legacy import server


class StubApi:
    def __init__(self, records):
        self.records = records

    def get_vm_info(self, ctxt, user_id=None):
        return [r for r in self.records
                if user_id is None or r['user_id'] == user_id]


def main(argv) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--records', required=True)
    args = parser.parse_args(argv)
    conf = cfg.ConfigOpts()
    rapid_conf.register_opts(conf)
    conf([], project='rapid-vmm-bench', default_config_files=[],
         default_config_dirs=[])
    conf.set_override('bind_host', '127.0.0.1', group='legacy')
    conf.set_override('port', 0, group='legacy')
    conf.set_override('allowed_peers', ['127.0.0.0/8'], group='legacy')
    legacy = server.LegacyServer(conf, StubApi(json.loads(args.records)))
    legacy.start()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f'ready {legacy.port}', flush=True)
    while not stop.wait(1.0):
        pass
    legacy.stop()
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
