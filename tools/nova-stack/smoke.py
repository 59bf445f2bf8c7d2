#!/usr/bin/env python3
"""Smoke test of the loopback Nova stack through openstacksdk.

Run with any Python that has openstacksdk, after `stack.sh start`::

    export OS_CLIENT_CONFIG_FILE=<stack dir>/clouds.yaml
    python tools/nova-stack/smoke.py [--cloud rapid-nova-test] [--no-api-down]

It drives the server lifecycle the rapid-vmm Nova driver needs (boot, fixed
IP from the ports, security group, suspend, resume, resize + confirm,
diagnostics, delete) and prints how long each step took.  Then it shows what
three failures look like: a flavor no host can take (NoValidHost), a flavor
id that does not exist, and nova-api being down (it stops nova-api with
`stack.sh service-stop nova-api` and starts it again afterwards).

Exit status 0 when every step behaved as expected.
"""

import argparse
import os
import subprocess
import sys
import time

import openstack
from openstack import exceptions as os_exc

HERE = os.path.dirname(os.path.abspath(__file__))
STACK_SH = os.path.join(HERE, 'stack.sh')

FLAVORS = {
    # name: (vcpus, ram MB, disk GB); names follow the rapid-vmm grid.
    'rapid-1-1024-20': (1, 1024, 20),
    'rapid-2-2048-20': (2, 2048, 20),
    # The fake hypervisor has 600000 GB of disk: no host can take this one.
    'rapid-impossible': (1, 512, 10000000),
}
IMAGE = 'rapid-linux'
NETWORK = 'rapid-net'
SECGROUP = 'rapid-smoke'
WAIT = 120
POLL = 0.2


class Step:
    """Context manager that times one step and prints it."""

    def __init__(self, name, expect_error=False):
        self.name = name
        self.expect_error = expect_error

    def __enter__(self):
        self.start = time.monotonic()
        return self

    def __exit__(self, exc_type, exc, tb):
        took = time.monotonic() - self.start
        if self.expect_error:
            note = '  (error, as expected)' if exc else '  NO ERROR?'
        else:
            note = '  FAILED' if exc else ''
        print(f'  {self.name:<42} {took:6.2f} s{note}', flush=True)
        return False


def say(text):
    print(f'      {text}', flush=True)


def stack_sh(*args):
    # Our own script, fixed arguments, no shell.
    subprocess.run([STACK_SH, *args], check=True)  # noqa: S603


def ensure_flavor(conn, name):
    flavor = conn.compute.find_flavor(name, ignore_missing=True)
    if flavor is None:
        vcpus, ram, disk = FLAVORS[name]
        flavor = conn.compute.create_flavor(name=name, vcpus=vcpus, ram=ram,
                                            disk=disk, is_public=True)
    return flavor


def ensure_secgroup(conn):
    group = conn.network.find_security_group(SECGROUP, ignore_missing=True)
    if group is None:
        group = conn.network.create_security_group(
            name=SECGROUP, description='rapid-vmm smoke test')
    return group


def wait_status(conn, server, status, failures=('ERROR',)):
    return conn.compute.wait_for_server(server, status=status,
                                        failures=list(failures),
                                        interval=POLL, wait=WAIT)


def fixed_ip(conn, server_id):
    for port in conn.network.ports(device_id=server_id):
        for fip in port.fixed_ips or []:
            return fip['ip_address'], port
    return None, None


def boot_args(conn, flavor_id, name):
    image = conn.image.find_image(IMAGE, ignore_missing=False)
    network = conn.network.find_network(NETWORK, ignore_missing=False)
    return {'name': name, 'flavor_id': flavor_id, 'image_id': image.id,
            'networks': [{'uuid': network.id}]}


def lifecycle(conn):
    print('server lifecycle:')
    with Step('flavors (create if missing)'):
        small = ensure_flavor(conn, 'rapid-1-1024-20')
        medium = ensure_flavor(conn, 'rapid-2-2048-20')
    with Step('find image + network'):
        args = boot_args(conn, small.id, f'rapid-smoke-{os.getpid()}')

    with Step('create server (API call)'):
        server = conn.compute.create_server(**args)
    with Step('wait ACTIVE'):
        server = wait_status(conn, server, 'ACTIVE')
    with Step('fixed IP from ports'):
        ip, port = fixed_ip(conn, server.id)
        if not ip:
            raise RuntimeError('no fixed IP on the server ports')
    say(f'fixed IP {ip}; port {port.id} status {port.status}, '
        f'vif_type {port.binding_vif_type} on {port.binding_host_id}')

    with Step('add security group'):
        group = ensure_secgroup(conn)
        conn.compute.add_security_group_to_server(server, group)
    port = conn.network.get_port(port.id)
    say(f'port security groups now: {sorted(port.security_group_ids)}')

    with Step('suspend -> SUSPENDED'):
        conn.compute.suspend_server(server)
        wait_status(conn, server, 'SUSPENDED')
    with Step('resume -> ACTIVE'):
        conn.compute.resume_server(server)
        wait_status(conn, server, 'ACTIVE')
    with Step('resize -> VERIFY_RESIZE'):
        conn.compute.resize_server(server, medium.id)
        wait_status(conn, server, 'VERIFY_RESIZE')
    with Step('confirm resize -> ACTIVE'):
        conn.compute.confirm_server_resize(server)
        server = wait_status(conn, server, 'ACTIVE')
    say(f'flavor now: {server.flavor.original_name} '
        f'({server.flavor.vcpus} vCPU, {server.flavor.ram} MB)')

    for micro in ('2.48', '2.1'):
        with Step(f'diagnostics (microversion {micro})'):
            resp = conn.compute.get(f'/servers/{server.id}/diagnostics',
                                    microversion=micro)
            resp.raise_for_status()
        say(str(resp.json()))

    with Step('delete'):
        conn.compute.delete_server(server)
    with Step('wait until gone'):
        conn.compute.wait_for_delete(server, interval=POLL, wait=WAIT)
    left = list(conn.network.ports(device_id=server.id))
    say(f'ports left after delete: {len(left)}')
    if left:
        raise RuntimeError(f'ports left behind: {[p.id for p in left]}')


def no_valid_host(conn):
    print('error: a flavor that no host can take:')
    flavor = ensure_flavor(conn, 'rapid-impossible')
    args = boot_args(conn, flavor.id, 'rapid-smoke-novalidhost')
    with Step('create server (API call)'):
        server = conn.compute.create_server(**args)
    with Step('wait ERROR'):
        server = wait_status(conn, server, 'ERROR', failures=())
    fault = server.fault or {}
    details = (fault.get('details') or '').strip().splitlines()
    say(f'status={server.status} fault: code={fault.get("code")} '
        f'message={fault.get("message")!r}')
    if details:
        say(f'fault details (admins only): {len(details)} lines, '
            f'last: {details[-1]!r}')
    with Step('delete + wait gone'):
        conn.compute.delete_server(server)
        conn.compute.wait_for_delete(server, interval=POLL, wait=WAIT)
    if 'No valid host' not in str(fault.get('message')):
        raise RuntimeError('expected a NoValidHost fault')


def bad_flavor_id(conn):
    print('error: a flavor id that does not exist:')
    args = boot_args(conn, 'no-such-flavor', 'rapid-smoke-badflavor')
    try:
        with Step('create server -> HTTP 400', expect_error=True):
            conn.compute.create_server(**args)
    except os_exc.HttpException as exc:
        say(f'{type(exc).__name__}: status={exc.status_code} '
            f'details={exc.details!r}')
        return
    raise RuntimeError('expected an HTTP error for a missing flavor')


def api_down(conn):
    print('error: nova-api down (stack.sh service-stop nova-api):')
    stack_sh('service-stop', 'nova-api')
    try:
        try:
            with Step('list servers -> connection error',
                      expect_error=True):
                list(conn.compute.servers())
        except Exception as exc:  # noqa: BLE001 - showing what it is
            cls = type(exc)
            say(f'{cls.__module__}.{cls.__name__}: {exc}')
            say('is an openstack.exceptions.SDKException: '
                f'{isinstance(exc, os_exc.SDKException)}')
        else:
            raise RuntimeError('expected an error with nova-api down')
    finally:
        with Step('service-start nova-api (until it answers)'):
            stack_sh('service-start', 'nova-api')
    with Step('list servers again'):
        list(conn.compute.servers())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--cloud', default='rapid-nova-test')
    parser.add_argument('--no-api-down', action='store_true',
                        help='do not stop and restart nova-api')
    args = parser.parse_args()
    if not os.environ.get('OS_CLIENT_CONFIG_FILE'):
        sys.exit('set OS_CLIENT_CONFIG_FILE to the clouds.yaml that '
                 'stack.sh start wrote')

    total = time.monotonic()
    with Step('connect'):
        conn = openstack.connect(cloud=args.cloud)
    parts = [lifecycle, no_valid_host, bad_flavor_id]
    if not args.no_api_down:
        parts.append(api_down)
    failed = []
    for part in parts:
        try:
            part(conn)
        except Exception as exc:  # noqa: BLE001 - report and go on
            failed.append(part.__name__)
            print(f'  !! {part.__name__} failed: '
                  f'{type(exc).__name__}: {exc}')
    took = time.monotonic() - total
    print(f'total {took:.1f} s: ' +
          (f'FAILED ({", ".join(failed)})' if failed else 'OK'))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
