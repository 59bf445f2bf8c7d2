"""The default of ``[DEFAULT] my_ip``: the default route's address.

The check runs the option's module in a private network namespace
(``unshare -n``, root only) with a bridge named ``docker0``, whose name
sorts before the uplink's and which has an address of its own, and a veth
``eth0`` that carries the default route: the default must be eth0's
address, not the first interface's.
"""

import os
import shutil
import subprocess
import sys

import pytest

from rapid_vmm import netutils

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

SETUP = '''
set -e
ip link set lo up
ip link add docker0 type bridge
ip addr add 172.17.0.1/16 dev docker0
ip link set docker0 up
ip link add eth0 type veth peer name eth0-peer
ip addr add 198.51.100.7/24 dev eth0
ip link set eth0 up
ip link set eth0-peer up
ip route add default via 198.51.100.1 dev eth0
'''

PRINT_DEFAULT = (
    'from rapid_vmm.conf import default; '
    'print([o.default for o in default.identity_opts '
    'if o.name == "my_ip"][0])')


def _can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which('unshare') or \
            not shutil.which('ip'):
        return False
    probe = subprocess.run(['unshare', '-n', 'true'], capture_output=True,
                           check=False, timeout=30)
    return probe.returncode == 0


def my_ip_default_in_netns(setup: str) -> str:
    script = setup + f'\nexec "{sys.executable}" -c \'{PRINT_DEFAULT}\'\n'
    done = subprocess.run(['unshare', '-n', 'sh', '-c', script], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not _can_unshare(),
                    reason='needs root and unshare -n (network namespace)')
def test_default_is_the_default_routes_address_not_a_bridge():
    assert my_ip_default_in_netns(SETUP) == '198.51.100.7'


@pytest.mark.skipif(not _can_unshare(),
                    reason='needs root and unshare -n (network namespace)')
def test_default_without_a_default_route_is_loopback():
    isolated = 'set -e\nip link set lo up\n'
    assert my_ip_default_in_netns(isolated) == '127.0.0.1'


def test_parse_ip_normalises_and_refuses():
    assert netutils.parse_ip(' 10.0.0.1 ') == '10.0.0.1'
    assert netutils.parse_ip('2001:DB8::1') == '2001:db8::1'
    for bad in ('10.0.0', 'host', '', None, 10):
        with pytest.raises(ValueError):
            netutils.parse_ip(bad)
