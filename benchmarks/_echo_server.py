"""A bare oslo.messaging RPC server: the benchmarks' baseline process.

Run by bench_rpc and bench_idle as a separate process, like the agent:
``python benchmarks/_echo_server.py --config-file <the agent's file>
--topic T --server S``. It reads the same configuration file as the agent
(so the same ``transport_url`` and ``[oslo_messaging_rabbit]`` settings),
serves one endpoint on ``T``/``S`` and writes ``ready`` on stdout once
serving; SIGTERM or SIGINT stops it.

Endpoint (version 1.0):

* ``set_reply(reply)`` keeps ``reply`` (so that ``echo`` can answer with
  a reply of the same size as the call it is compared with);
* ``echo(**kwargs)`` returns the kept reply (or ``kwargs`` if none);
* ``ping()`` returns True.
"""

import argparse  # noqa: I001 - rapid_vmm first, below
import signal
import sys
import threading

import rapid_vmm  # noqa: F401 - threading backend first

import oslo_messaging as messaging

from rapid_vmm import conf as rapid_conf


class EchoEndpoint:
    target = messaging.Target(version='1.0')

    def __init__(self):
        self.reply = None

    def set_reply(self, ctxt, reply):
        self.reply = reply

    def echo(self, ctxt, **kwargs):
        return kwargs if self.reply is None else self.reply

    def ping(self, ctxt):
        return True


def main(argv) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--config-file', required=True)
    parser.add_argument('--topic', required=True)
    parser.add_argument('--server', required=True)
    parser.add_argument('--pool-size', type=int, default=None,
                        help='executor_thread_pool_size (default: '
                             "oslo.messaging's, 64)")
    args = parser.parse_args(argv)
    # The global CONF, as the agent: oslo.messaging registers its options
    # (tracing and metrics included) there.
    conf = rapid_conf.CONF
    conf(['--config-file', args.config_file], project='rapid-vmm-echo',
         default_config_files=[], default_config_dirs=[])
    transport = messaging.get_rpc_transport(conf)
    target = messaging.Target(topic=args.topic, server=args.server)
    server = messaging.get_rpc_server(
        transport, target, [EchoEndpoint()],
        access_policy=messaging.DefaultRPCAccessPolicy)
    if args.pool_size:  # registered by get_rpc_server, read by start()
        conf.set_override('executor_thread_pool_size', args.pool_size)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    print('ready', flush=True)
    while not stop.wait(1.0):
        pass
    server.stop()
    server.wait()
    transport.cleanup()
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
