"""Benchmark: start_vm of real guests against bare libvirt-python (SPEC 9).

Root only: real QEMU guests (TCG) under the host's libvirtd
(``qemu:///system``), the system tests' guest (``tools/system``: Debian's
kernel and a busybox initramfs, direct kernel boot, a qcow2 overlay of a
template, DHCP on the isolated network ``rapid-vmm-test``). The run holds
``/tmp/rapid-system.lock`` (as every use of the system tests' network
does), runs ``setup-host.sh``, ``build-guest.sh`` (cached) and
``network.sh up`` (and ``network.sh down`` at the end if it brought the
network up), and then alternates rounds of:

- ``start_vm_s``: the agent (``rapid-vmm`` as a process, libvirt driver on
  ``qemu:///system``, ``ip_sources = lease``) answering ``start_vm``: it
  makes the overlay, defines and starts the domain, waits for its DHCP
  lease, registers the VM with the (simulated) DS and waits for the AS;
  timed from the call to the reply, then ``remove_vm``;
- ``bare_s``: the floor, with libvirt-python alone: ``qemu-img create`` of
  the same overlay, ``defineXML`` + ``create`` of the same domain XML (the
  agent's own, read from its domain in an untimed first round; renamed,
  without UUID, MAC and rapid-vmm metadata, so that the agent leaves it
  alone), then polling the lease every 50 ms until it appears;

``start_vm_vs_bare`` = median start_vm_s / median bare_s (target <= 1.1:
the agent adds almost nothing to the physical limit of its job).

The AS hand-shake (``--as-mode``): ``host`` (default) plays the AS from
this process at the moment the lease appears (polled every 50 ms from the
network's DHCP leases): ``as_register(ip)``, retried while the agent does
not know the address yet, then ``as_confirm``; ``guest`` leaves it to the
guest's own ``/init``, which registers over the legacy TCP port (the
agent then serves ``[legacy]`` on the network's host address and the
guest's kernel command line gets ``rapid.as=legacy:HOST:PORT``, as in the
system tests); ``none`` sets ``as_register_timeout = 0``.

Run (root): ``python benchmarks/bench_boot.py [--rounds 3]
[--as-mode host|guest|none]``; about 1.5-3 minutes (each boot 6-11 s under
TCG). Prints readable figures, then one JSON line.
"""

import fcntl
import os
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET

import _common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM_TOOLS = os.path.join(REPO, 'tools', 'system')
GUEST_DIR = os.environ.get('RAPID_VMM_SYSTEM_GUEST_DIR',
                           '/var/tmp/rapid-vmm-system-guest')
LOCK = '/tmp/rapid-system.lock'
URI = 'qemu:///system'
TARGET = 1.1
BOOT_TIMEOUT = 150
POLL_S = 0.05


def run_tool(script: str, *args: str, timeout: int = 900) -> str:
    done = subprocess.run(['bash', os.path.join(SYSTEM_TOOLS, script),
                           *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f'{script} {" ".join(args)} failed: '
                           f'{done.stdout[-2000:]}{done.stderr[-2000:]}')
    return done.stdout


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as sock:
        sock.bind(('', 0))
        return sock.getsockname()[1]


def read_guest_env(path: str) -> dict:
    env = {}
    with open(path, encoding='utf-8') as env_file:
        for line in env_file:
            line = line.strip()
            if line and not line.startswith('#') and '=' in line:
                key, value = line.split('=', 1)
                env[key] = shlex.split(value)[0] if value else ''
    return env


def take_lock(timeout: float):
    """``/tmp/rapid-system.lock``, exclusively, waiting at most
    ``timeout`` seconds; the open file (closing it releases the lock)."""
    handle = open(LOCK, 'a')  # held for the whole run

    def locked():
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    _common.wait_until(locked, timeout, f'{LOCK} is held by another run',
                       interval=0.5)
    return handle


def lease_of(network, mac: str) -> str | None:
    """The IPv4 the network's DHCP server gave ``mac``, or None."""
    for lease in network.DHCPLeases(mac):
        if lease.get('ipaddr') and ':' not in lease['ipaddr']:
            return lease['ipaddr']
    return None


def bare_xml(agent_xml: str, name: str, disk: str, serial: str) -> str:
    """The agent's domain XML as a bare domain of its own."""
    root = ET.fromstring(agent_xml)
    root.find('name').text = name
    for tag in ('uuid', 'metadata'):
        for element in root.findall(tag):
            root.remove(element)
    for interface in root.iter('interface'):
        for mac in interface.findall('mac'):
            interface.remove(mac)  # libvirt picks a new one
    for disk_element in root.iter('disk'):
        source = disk_element.find('source')
        if source is not None and source.get('file'):
            source.set('file', disk)
    for serial_element in root.iter('serial'):
        for source in serial_element.findall('source'):
            if source.get('path'):
                source.set('path', serial)
        for log in serial_element.findall('log'):
            log.set('file', serial)
    return ET.tostring(root, encoding='unicode')


class HostAS:
    """The AS hand-shake from the host, the moment the VM's lease shows."""

    def __init__(self, api, network):
        self.api = api
        self.network = network
        self.seconds_after_lease: list[float] = []

    def play(self, result: dict, libvirt, conn, user_id: int) -> None:
        """In a thread: find the user's domain, wait for its lease, then
        register and confirm as its AS would."""
        from rapid_vmm import exception

        def mac():
            if 'done' in result:
                raise _common.WaitAborted('start_vm answered already')
            for dom in conn.listAllDomains(0):
                if dom.name().startswith(f'rapid-vm-{user_id}-'):
                    root = ET.fromstring(dom.XMLDesc(0))
                    found = root.find('./devices/interface/mac')
                    if found is not None:
                        return found.get('address')
            return None
        try:
            address = _common.wait_until(mac, BOOT_TIMEOUT, 'the domain',
                                         interval=POLL_S)
            ip = _common.wait_until(lambda: lease_of(self.network, address),
                                    BOOT_TIMEOUT, 'the lease',
                                    interval=POLL_S)
            leased = time.monotonic()
            query = self.api.client.prepare(timeout=10)

            def register():
                try:
                    return query.call({}, 'as_register', ip_address=ip)
                except exception.VmNotFound:
                    return None
            reply = _common.wait_until(register, BOOT_TIMEOUT,
                                       'as_register', interval=POLL_S)
            query.call({}, 'as_confirm', user_id=reply['user_id'])
            self.seconds_after_lease.append(time.monotonic() - leased)
        except Exception as exc:  # noqa: BLE001 - reported with the round
            result.setdefault('as_error', f'{type(exc).__name__}: {exc}')


def agent_round(agent, host_as, libvirt, conn, user_id: int,
                capture: bool = False) -> tuple[float, str | None, dict]:
    """start_vm of ``user_id`` until it answers; seconds, the domain's XML
    when ``capture``, the reply; then remove_vm."""
    result: dict = {}
    helper = None
    if host_as is not None:
        helper = threading.Thread(target=host_as.play,
                                  args=(result, libvirt, conn, user_id),
                                  daemon=True)
        helper.start()
    started = time.monotonic()
    try:
        reply = agent.api.start_vm({}, user_id=user_id, os_type=0, vcpus=1,
                                   memory_mb=128, disk_gb=1)
    finally:
        result['done'] = True
    seconds = time.monotonic() - started
    if helper is not None:
        helper.join(30)
    if 'as_error' in result:
        raise RuntimeError(f'AS hand-shake failed: {result["as_error"]}')
    xml = None
    if capture:
        xml = conn.lookupByName(reply['name']).XMLDesc(
            libvirt.VIR_DOMAIN_XML_INACTIVE)
    agent.api.remove_vm({}, user_id=user_id)
    return seconds, xml, reply


def bare_round(libvirt, conn, network, template: str, fmt: str, size: int,
               xml: str, workdir: str, index: int) -> float:
    """qemu-img create + defineXML + create until the lease; seconds."""
    name = f'rvmm-bare-{index}-{uuid.uuid4().hex[:6]}'
    disk = os.path.join(workdir, f'{name}.qcow2')
    serial = os.path.join(workdir, f'{name}.console.log')
    domain_xml = bare_xml(xml, name, disk, serial)
    started = time.monotonic()
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b',
                    template, '-F', fmt, disk, str(size)], check=True,
                   timeout=60)
    dom = conn.defineXML(domain_xml)
    try:
        dom.create()
        root = ET.fromstring(dom.XMLDesc(0))
        mac = root.find('./devices/interface/mac').get('address')
        _common.wait_until(lambda: lease_of(network, mac), BOOT_TIMEOUT,
                           f'the lease of {name}', interval=POLL_S)
        return time.monotonic() - started
    finally:
        try:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except libvirt.libvirtError:
            pass
        for path in (disk, serial):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def main(argv) -> int:
    parser = _common.arg_parser(__doc__)
    parser.add_argument('--rounds', type=int, default=3,
                        help='timed rounds of each (after one untimed '
                             'agent round)')
    parser.add_argument('--as-mode', choices=('host', 'guest', 'none'),
                        default='host')
    parser.add_argument('--lock-timeout', type=float, default=300)
    args = _common.parse_args(parser, argv)
    if os.geteuid() != 0:
        parser.error('bench_boot drives qemu:///system and needs root')
    lock = take_lock(args.lock_timeout)
    from rapid_vmm.virt.libvirt import host as vhost
    from rapid_vmm.virt.libvirt import imagebackend
    libvirt = vhost.libvirt
    run_started = time.monotonic()
    with _common.Workspace('boot') as ws:
        ws.add(lock.close)
        run_tool('setup-host.sh')
        run_tool('build-guest.sh', GUEST_DIR)
        net_name = run_tool('network.sh', 'name').strip()
        conn = libvirt.open(URI)
        ws.add(conn.close)
        was_up = False
        try:
            was_up = bool(conn.networkLookupByName(net_name).isActive())
        except libvirt.libvirtError:
            pass
        run_tool('network.sh', 'up')
        if not was_up:
            ws.add(run_tool, 'network.sh', 'down')
        network = conn.networkLookupByName(net_name)
        guest = read_guest_env(os.path.join(GUEST_DIR, 'guest.env'))
        template = guest['RAPID_GUEST_TEMPLATE']
        overrides = {
            'libvirt.connection_uri': URI,
            'libvirt.virt_type': guest.get('RAPID_GUEST_DOMAIN_TYPE',
                                           'qemu'),
            'libvirt.kernel': guest['RAPID_GUEST_KERNEL'],
            'libvirt.initrd': guest['RAPID_GUEST_INITRD'],
            'libvirt.kernel_cmdline': guest['RAPID_GUEST_CMDLINE'],
            'libvirt.network': net_name,
            'libvirt.ip_sources': 'lease',
            'libvirt.ip_timeout': BOOT_TIMEOUT,
            'vm_types': '1 x 128 x 1',
            'ram_allocation_ratio': 1.0,
            'disk_allocation_ratio': 1.0,
            'as_register_timeout': 0 if args.as_mode == 'none' else 120,
        }
        if args.as_mode == 'guest':
            # The guest's /init registers its AS at the address that
            # rapid.as= on its kernel command line names.
            host_ip = ET.fromstring(network.XMLDesc(0)).find('ip').get(
                'address')
            port = free_port()
            overrides.update({
                'libvirt.kernel_cmdline': (guest['RAPID_GUEST_CMDLINE'] +
                                           f' rapid.as=legacy:{host_ip}:'
                                           f'{port}'),
                'legacy.enabled': True, 'legacy.bind_host': host_ip,
                'legacy.port': port,
                'legacy.allowed_peers': [
                    host_ip.rsplit('.', 1)[0] + '.0/24', '127.0.0.0/8']})
        agent = _common.AgentProcess(ws, 'boot', template=template,
                                     api_timeout=BOOT_TIMEOUT + 150,
                                     **overrides)
        agent.start()
        agent.wait_registered()
        host_as = (HostAS(agent.api, network) if args.as_mode == 'host'
                   else None)
        info = imagebackend.qemu_img_info(template)
        fmt = info.get('format', 'qcow2')
        size = max(imagebackend.GiB, int(info.get('virtual-size', 0)))
        warm_s, xml, _reply = agent_round(agent, host_as, libvirt, conn, 1,
                                          capture=True)
        agent_s, bare_s = [], []
        for index in range(args.rounds):
            bare_s.append(bare_round(libvirt, conn, network, template, fmt,
                                     size, xml, ws.path, index))
            seconds, _xml, _reply = agent_round(agent, host_as, libvirt,
                                                conn, 2 + index)
            agent_s.append(seconds)
        as_lag = list(host_as.seconds_after_lease) if host_as else []
        agent.stop()
    total_s = time.monotonic() - run_started

    agent_med = statistics.median(agent_s)
    bare_med = statistics.median(bare_s)
    ratio = agent_med / bare_med
    result = {
        'start_vm_s': round(agent_med, 2),
        'bare_s': round(bare_med, 2),
        'start_vm_vs_bare': round(ratio, 3),
        'start_vm_rounds_s': [round(v, 2) for v in agent_s],
        'bare_rounds_s': [round(v, 2) for v in bare_s],
        'warm_up_start_vm_s': round(warm_s, 2),
        'as_mode': args.as_mode,
        'as_after_lease_s': [round(v, 3) for v in as_lag],
        'rounds': args.rounds,
        'uri': URI,
        'guest': {'kernel_release': guest.get('RAPID_GUEST_KERNEL_RELEASE'),
                  'domain_type': guest.get('RAPID_GUEST_DOMAIN_TYPE'),
                  'memory_mb': 128},
        'seconds': round(total_s, 1),
        'target': {'start_vm_vs_bare': f'<= {TARGET}'},
        'target_met': ratio <= TARGET,
        **_common.machine(),
    }
    print(f'boot benchmark: real guests '
          f'({guest.get("RAPID_GUEST_DOMAIN_TYPE")}, kernel '
          f'{guest.get("RAPID_GUEST_KERNEL_RELEASE")}) on {URI}, '
          f'{args.rounds} alternating rounds, AS hand-shake: {args.as_mode}')
    print(f'  agent start_vm   median {agent_med:6.2f} s  rounds '
          f'{result["start_vm_rounds_s"]} (warm-up {warm_s:.2f} s)')
    print(f'  bare libvirt     median {bare_med:6.2f} s  rounds '
          f'{result["bare_rounds_s"]}')
    print(f'  start_vm_vs_bare {ratio:6.3f}    (target <= {TARGET}: '
          f'{_common.verdict(ratio <= TARGET)})')
    if as_lag:
        print(f'  AS hand-shake done {statistics.median(as_lag):.2f} s after '
              f'the lease appeared (median)')
    return _common.emit(result)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
