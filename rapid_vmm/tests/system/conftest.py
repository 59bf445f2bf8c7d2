"""Fixtures of the system tests: a real libvirtd with QEMU and a real guest.

The session fixture runs ``tools/system/setup-host.sh`` (packages,
virtlogd, libvirtd), ``build-guest.sh`` (Debian kernel + busybox initramfs
+ template disk, cached) and ``network.sh up`` (an isolated network with
DHCP), and ``teardown.sh`` at the end. They need root, as libvirtd does.
"""

import os
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
SYSTEM_TOOLS = os.path.join(REPO, 'tools', 'system')
GUEST_DIR = os.environ.get('RAPID_VMM_SYSTEM_GUEST_DIR',
                           '/var/tmp/rapid-vmm-system-guest')


def _run(script: str, *args: str, timeout: int = 900) -> str:
    result = subprocess.run(['bash', os.path.join(SYSTEM_TOOLS, script),
                             *args], capture_output=True, text=True,
                            timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f'{script} {" ".join(args)} failed '
                           f'({result.returncode}):\n{result.stdout[-3000:]}'
                           f'\n{result.stderr[-3000:]}')
    return result.stdout


def read_guest_env(path: str) -> dict:
    env = {}
    with open(path, encoding='utf-8') as env_file:
        for line in env_file:
            line = line.strip()
            if not line or line.startswith('#') or '=' not in line:
                continue
            key, value = line.split('=', 1)
            env[key] = shlex.split(value)[0] if value else ''
    return env


@pytest.fixture(scope='session')
def guest():
    """The host set up for real guests; yields the guest.env values."""
    if os.geteuid() != 0:
        pytest.skip('system tests drive qemu:///system and need root')
    _run('setup-host.sh')
    _run('build-guest.sh', GUEST_DIR)
    _run('network.sh', 'up')
    network = _run('network.sh', 'name').strip()
    env = read_guest_env(os.path.join(GUEST_DIR, 'guest.env'))
    env['NETWORK'] = network
    yield env
    _run('teardown.sh')
