"""``rapid-vmm-demo``: the whole flow of one agent, on this machine.

It runs the real agent (``rapid-vmm``, a separate process) on libvirt's
test hypervisor (``test:///default``) and the local RabbitMQ, with its state
in a local folder, and plays the rest of a RAPID cloud around it with
simulated peers on real oslo.messaging RPC servers:

* a Directory Server that receives the registration and the periodic
  resource reports, and registers VMs and helper VMs;
* an SLA Manager that receives the registration and the start outcomes;
* an Acceleration Server that registers from inside the new VM.

Then it starts a VM for a user, shows its IP, usage and the host status,
suspends, resumes, resizes and removes it, and stops the agent.
"""

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

from oslo_service import backend

backend.init_backend(backend.BackendType.THREADING)

from oslo_config import cfg  # noqa: E402

from rapid_vmm import rpc  # noqa: E402
from rapid_vmm import rpcapi  # noqa: E402
from rapid_vmm import simulators  # noqa: E402
from rapid_vmm.cmd import client  # noqa: E402
from rapid_vmm.conf import CONF  # noqa: E402

DEMO_USER = 42


class Printer:
    """Timestamped, thread-safe output lines."""

    def __init__(self):
        self.t0 = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, who: str, text: str) -> None:
        with self._lock:
            stamp = time.monotonic() - self.t0
            for i, line in enumerate(text.splitlines() or ['']):
                prefix = f'[{stamp:6.2f}s] {who:<6} ' if i == 0 else ' ' * 16
                print(prefix + line, flush=True)

    def section(self, title: str) -> None:
        with self._lock:
            print(f'\n=== {title} ' + '=' * max(0, 66 - len(title)),
                  flush=True)


def _describe(peer: str, method: str, kw: dict) -> str:
    if method == 'notify_vmm':
        res = kw.get('resources') or {}
        return (f"report from VMM {kw['vmm_id']}: cpu {kw['cpu_load']} %, "
                f"free memory {kw['free_memory_mb']} MB, gpu load "
                f"{kw['gpu_load']}, VMs running {res.get('vms_running')}, "
                f"suspended {res.get('vms_suspended')}, "
                f"{len(res.get('available_types') or [])} types fit")
    if method == 'register_vmm' and peer == 'DS':
        return (f"register_vmm from {kw['host']} ({kw['ip_address']}): "
                f"{kw['cpu_count']} cores, {kw['free_memory_mb']} MB free")
    if method == 'register_vmm':
        return f"register_vmm from {kw['host']} (VMM id {kw['vmm_id']})"
    if method == 'register_vm':
        kind = 'helper' if kw['category'] == 1 else 'normal'
        return (f"register_vm: {kind} VM of user {kw['user_id']}, type "
                f"{kw['vm_type']}, status {kw['status']} -> vm id "
                f"{kw['vm_id']}")
    if method == 'notify_vm':
        status = client.STATUS_NAMES.get(kw['status'], kw['status'])
        return f"notify_vm: vm {kw['vm_id']} is {status}"
    if method == 'notify_helper':
        return f"notify_helper: vm {kw['vm_id']} at {kw['ip_address']}"
    if method == 'vm_started':
        vm = kw['vm']
        return (f"vm_started: user {vm['user_id']} at {vm['ip_address']} "
                f"(vm id {vm['vm_id']})")
    if method == 'vm_start_failed':
        return (f"vm_start_failed: user {kw['user_id']}: "
                f"{kw['error_class']}: {kw['error']}")
    return f'{method} {kw}'


def _write_config(workdir: str, topic_suffix: str, transport_url: str) -> str:
    template = os.path.join(workdir, 'template.qcow2')
    if not os.path.exists(template):
        subprocess.run(['qemu-img', 'create', '-q', '-f',  # noqa: S603,S607
                        'qcow2', template, '64M'], check=True)
    data = os.path.join(workdir, 'state')
    path = os.path.join(workdir, 'rapid-vmm.conf')
    with open(path, 'w', encoding='utf-8') as conf_file:
        conf_file.write(f"""[DEFAULT]
# Written by rapid-vmm-demo.
host = demo-host
transport_url = {transport_url}
vmm_topic = rapid_vmm_{topic_suffix}
ds_topic = rapid_ds_{topic_suffix}
slam_topic = rapid_slam_{topic_suffix}
data_path = {data}
report_interval = 2
helper_vm_count = 2
as_register_timeout = 30
# libvirt's test hypervisor says the host has 3 GiB: overcommit for the demo
ram_allocation_ratio = 16.0
log_file = {os.path.join(workdir, 'rapid-vmm.log')}

[libvirt]
connection_uri = test:///default
normal_image = {template}
""")
    return path


def _play_acceleration_server(api, out: Printer, stop: threading.Event
                              ) -> None:
    """The AS inside the user's VM: registers as soon as the VM has an IP."""
    while not stop.is_set():
        try:
            vms = api.get_vm_info({}, user_id=DEMO_USER)
        except Exception:  # noqa: BLE001 - the VM is not recorded yet
            vms = []
        if vms and vms[0].get('ip_address'):
            ip = vms[0]['ip_address']
            out('AS', f'booted in the VM at {ip}; as_register({ip})')
            user = api.as_register({}, ip_address=ip)['user_id']
            out('AS', f'the VMM says I serve user {user}; as_confirm(ready)')
            api.as_confirm({}, user_id=user, ready=True)
            return
        stop.wait(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='rapid-vmm-demo',
                                     description=__doc__.split('\n')[0])
    parser.add_argument('--workdir', default='demo-data',
                        help='folder for the config, state and log '
                             '(default ./demo-data)')
    parser.add_argument('--transport-url',
                        default='rabbit://guest:guest@127.0.0.1:5672/',
                        help='RabbitMQ to use')
    parser.add_argument('--keep', action='store_true',
                        help='keep the previous state in --workdir')
    args = parser.parse_args(argv)
    # Library chatter (amqp closing channels, reconnects) is not the story.
    logging.basicConfig(level=logging.ERROR)
    out = Printer()
    workdir = os.path.abspath(args.workdir)
    if not args.keep and os.path.isdir(os.path.join(workdir, 'state')):
        shutil.rmtree(os.path.join(workdir, 'state'))
    os.makedirs(workdir, exist_ok=True)
    conf_path = _write_config(workdir, uuid.uuid4().hex[:8],
                              args.transport_url)
    CONF(['--config-file', conf_path], project='rapid-vmm',
         default_config_files=[], default_config_dirs=[])
    transport = rpc.get_transport(CONF)

    out.section('RAPID peers (simulated) and the rapid-vmm agent')
    ds = simulators.directory_server(
        CONF, transport, on_message=lambda m, kw: out('DS', _describe(
            'DS', m, kw))).start()
    slam = simulators.sla_manager(
        CONF, transport, on_message=lambda m, kw: out('SLAM', _describe(
            'SLAM', m, kw))).start()
    out('demo', f'config {conf_path}\nlog    {workdir}/rapid-vmm.log')
    agent = subprocess.Popen(  # noqa: S603 - fixed argument list
        [sys.executable, '-m', 'rapid_vmm.cmd.vmm', '--config-file',
         conf_path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    started = time.monotonic()
    api = rpcapi.VmmAPI(CONF, transport, timeout=60)
    try:
        ds.recorder.wait_for('register_vmm', timeout=60)
        out('demo', f'agent registered {time.monotonic() - started:.2f} s '
                    'after launch')
        slam.recorder.wait_for('register_vmm', timeout=60)
        ds.recorder.wait_for('notify_helper', timeout=60, count=2)
        ds.recorder.wait_for('notify_vmm', timeout=30)

        out.section(f'start_vm for user {DEMO_USER}')
        stop_as = threading.Event()
        as_thread = threading.Thread(target=_play_acceleration_server,
                                     args=(api, out, stop_as), daemon=True)
        as_thread.start()
        t0 = time.monotonic()
        vm = api.start_vm({}, user_id=DEMO_USER, os_type=0, vcpus=2,
                          memory_mb=2048, disk_gb=20)
        stop_as.set()
        out('SLAM', f"start_vm returned after {time.monotonic() - t0:.2f} s:"
                    f" IP {vm['ip_address']}, vm id {vm['vm_id']}")
        print(client.render_table(client._vm_rows([vm]), client.VM_COLUMNS))

        out.section('per-VM usage')
        for resource in ('cpu', 'memory', 'disk'):
            rows = api.get_vm_usage({}, resource=resource)
            print(client.render_table(rows, client.USAGE_COLUMNS[resource]))
            print()

        out.section('host status (rapid-vmm-client status)')
        ds.recorder.wait_for('notify_vmm', count=2, timeout=30)
        print(client.render_host_status(api.get_host_status({})))

        out.section('suspend, resume, resize, remove')
        for label, call in (
                ('suspend_vm', lambda: api.suspend_vm({}, user_id=DEMO_USER)),
                ('resume_vm', lambda: api.resume_vm({}, user_id=DEMO_USER)),
                ('change_flavor(vcpus=4)', lambda: api.change_flavor(
                    {}, user_id=DEMO_USER, vcpus=4)),
                ('confirm_flavor', lambda: api.confirm_flavor(
                    {}, user_id=DEMO_USER))):
            record = call()
            status = client.STATUS_NAMES[record['status']]
            out('demo', f'{label}: status {status}, {record["vcpus"]} vCPU, '
                        f'{record["memory_mb"]} MB')
            time.sleep(0.2)
        api.remove_vm({}, user_id=DEMO_USER)
        out('demo', 'remove_vm: done')
        ds.recorder.wait_for('notify_vm', lambda kw: kw['status'] == 4,
                             timeout=10)
        print(client.render_table(client._vm_rows(api.get_vm_info({})),
                                  client.VM_COLUMNS))
    except Exception as exc:  # noqa: BLE001 - report and show the log
        out('demo', f'FAILED: {type(exc).__name__}: {exc}')
        _stop_agent(agent, out)
        print(f'See {workdir}/rapid-vmm.log', file=sys.stderr)
        return 1
    finally:
        ds.stop()
        slam.stop()
    out.section('stopping the agent (SIGTERM)')
    _stop_agent(agent, out)
    transport.cleanup()
    out('demo', 'done')
    return 0


def _stop_agent(agent: subprocess.Popen, out: Printer) -> None:
    if agent.poll() is not None:
        out('demo', f'agent had exited with {agent.returncode}: '
                    f'{agent.stderr.read().strip()[-500:]}')
        return
    t0 = time.monotonic()
    agent.send_signal(signal.SIGTERM)
    try:
        agent.wait(timeout=15)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()
    out('demo', f'agent stopped in {time.monotonic() - t0:.2f} s '
                f'(exit {agent.returncode})')


if __name__ == '__main__':
    cfg.CONF.reset()
    sys.exit(main())
