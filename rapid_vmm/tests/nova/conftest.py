"""A real Nova on loopback for the Nova driver's integration tests.

The session fixture runs ``tools/nova-stack/stack.sh install`` and
``start`` (fresh databases: placement, glance, neutron, nova-api,
-conductor, -scheduler and -compute with the fake virt driver), seeds what
the tests need (flavors, a security group), and stops the stack at the end.
With ``RAPID_VMM_NOVA_STACK_RUNNING=1`` an already started stack is used
and left running.
"""

import os
import subprocess

import openstack
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
STACK = os.path.join(REPO, 'tools', 'nova-stack', 'stack.sh')
STACK_DIR = os.environ.get('RAPID_NOVA_STACK_DIR',
                           os.path.join(REPO, '.nova-stack'))
CLOUD = 'rapid-nova-test'
SECURITY_GROUP = 'rapid-offloading'
HUGE_FLAVOR = 'rapid.test-huge'


def stack(*args: str, timeout: int = 900) -> None:
    result = subprocess.run(['bash', STACK, *args], capture_output=True,
                            text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f'stack.sh {" ".join(args)} failed:\n'
                           f'{result.stdout[-4000:]}\n{result.stderr[-4000:]}')


@pytest.fixture(scope='session')
def nova():
    """A connection to the test cloud; its clouds.yaml is exported."""
    reuse = os.environ.get('RAPID_VMM_NOVA_STACK_RUNNING') == '1'
    if not reuse:
        stack('install')
        stack('start')
    os.environ['OS_CLIENT_CONFIG_FILE'] = os.path.join(STACK_DIR,
                                                      'clouds.yaml')
    conn = openstack.connect(cloud=CLOUD)
    try:
        if conn.network.find_security_group(
                SECURITY_GROUP, ignore_missing=True) is None:
            conn.network.create_security_group(
                name=SECURITY_GROUP, description='RAPID offloading')
        if conn.compute.find_flavor(HUGE_FLAVOR,
                                    ignore_missing=True) is None:
            # More memory than the fake compute node has: NoValidHost.
            conn.compute.create_flavor(name=HUGE_FLAVOR, vcpus=1,
                                       ram=4 * 1024 * 1024, disk=1)
        yield conn
    finally:
        conn.close()
        if not reuse:
            stack('stop', timeout=120)
