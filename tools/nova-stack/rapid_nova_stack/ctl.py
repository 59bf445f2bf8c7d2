"""Helper commands for stack.sh, run with the stack venv's Python.

    python -m rapid_nova_stack.ctl COMMAND ...

    db-reset NAME...         drop and create databases
    db-drop NAME...          drop databases
    db-ping                  is MariaDB reachable?
    wait [--only SVC...]     wait until services answer (and compute is up)
    wait-registered BINARY   wait until a nova service wrote its DB row
    seed ...                 images, network, clouds.yaml
    status                   one line per service

Settings come from the environment that stack.sh exports (RNS_*); this module
has no defaults of its own so that stack.sh stays the one place for them.
Only the standard library and PyMySQL are used, so it starts fast.
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

# Not secrets: the test stack's auth filter trusts the token text.
ADMIN_TOKEN = 'admin:admin'  # noqa: S105
DEMO_TOKEN = 'demo:demo'  # noqa: S105
SERVICES = ('placement', 'glance', 'neutron', 'nova-api',
            'nova-conductor', 'nova-scheduler', 'nova-compute')
NOVA_BINARIES = ('nova-conductor', 'nova-scheduler', 'nova-compute')


class StackError(Exception):
    pass


def env(name):
    try:
        return os.environ[name]
    except KeyError:
        raise StackError(
            f'{name} is not set (run this through stack.sh)') from None


def url(service):
    port = env(f'RNS_{service.upper()}_PORT')
    return f'http://127.0.0.1:{port}'


# --------------------------------------------------------------------- HTTP

def http(method, address, token=ADMIN_TOKEN, body=None, headers=None,
         timeout=10.0):
    """Return (status, parsed JSON or raw bytes); never raises on 4xx/5xx."""
    hdrs = {'Accept': 'application/json'}
    if token:
        hdrs['X-Auth-Token'] = token
    data = None
    if isinstance(body, (dict, list)):
        data = json.dumps(body).encode()
        hdrs['Content-Type'] = 'application/json'
    elif body is not None:
        data = body
    hdrs.update(headers or {})
    if not address.startswith('http://127.0.0.1:'):
        raise StackError(f'refusing to call {address}: loopback only')
    req = urllib.request.Request(  # noqa: S310 (checked just above)
        address, data=data, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw


def expect(status_body, ok, what):
    status, body = status_body
    if status not in ok:
        raise StackError(f'{what}: HTTP {status} {str(body)[:300]}')
    return body


# ----------------------------------------------------------------- database

def _db_connect():
    import pymysql
    return pymysql.connect(host=env('RNS_DB_HOST'),
                           port=int(env('RNS_DB_PORT')),
                           user=env('RNS_DB_USER'),
                           password=os.environ.get('RNS_DB_PASSWORD', ''),
                           connect_timeout=5, read_timeout=60,
                           write_timeout=60, autocommit=True)


def _check_db_name(name):
    if not name.replace('_', '').isalnum():
        raise StackError(f'refusing odd database name {name!r}')
    return name


def cmd_db_ping(_args):
    import pymysql
    try:
        _db_connect().close()
    except (pymysql.err.Error, OSError) as exc:
        raise StackError(
            f"MariaDB at {env('RNS_DB_HOST')}:{env('RNS_DB_PORT')} is not "
            f"reachable as {env('RNS_DB_USER')}: {exc}") from None


def cmd_db_reset(args):
    conn = _db_connect()
    with conn.cursor() as cur:
        for name in map(_check_db_name, args.names):
            cur.execute(f'DROP DATABASE IF EXISTS `{name}`')
            cur.execute(f'CREATE DATABASE `{name}` CHARACTER SET utf8mb4 '
                        'COLLATE utf8mb4_general_ci')
    conn.close()


def cmd_db_drop(args):
    conn = _db_connect()
    with conn.cursor() as cur:
        for name in map(_check_db_name, args.names):
            cur.execute(f'DROP DATABASE IF EXISTS `{name}`')
    conn.close()


def _count(query, db_env, params):
    """Run a COUNT(*) query in database $db_env (a checked name)."""
    conn = _db_connect()
    try:
        with conn.cursor() as cur:
            conn.select_db(_check_db_name(env(db_env)))
            cur.execute(query, params)
            return cur.fetchone()[0]
    finally:
        conn.close()


def _host_mapped():
    return _count('SELECT COUNT(*) FROM host_mappings WHERE host=%s',
                  'RNS_DB_NOVA_API', (env('RNS_COMPUTE_HOST'),)) > 0


# ---------------------------------------------------------------- processes

def _pid(service):
    path = os.path.join(env('RNS_RUN_DIR'), service + '.pid')
    try:
        with open(path) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def _alive(pid):
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) is not alive for our purpose.
    try:
        with open(f'/proc/{pid}/stat') as fh:
            return fh.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


def group_rss_kib():
    """Map process group id -> (resident KiB, process count), from /proc."""
    page_kib = os.sysconf('SC_PAGE_SIZE') // 1024
    groups = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as fh:
                fields = fh.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state, [2] the process group, [21] the RSS pages
        pgrp, rss = int(fields[2]), int(fields[21]) * page_kib
        total, count = groups.get(pgrp, (0, 0))
        groups[pgrp] = (total + rss, count + 1)
    return groups


def log_tail(service, lines=25):
    path = os.path.join(env('RNS_LOG_DIR'), service + '.log')
    try:
        with open(path, errors='replace') as fh:
            tail = fh.readlines()[-lines:]
    except OSError as exc:
        return f'(no log: {exc})'
    return ''.join('    | ' + line for line in tail)


# -------------------------------------------------------------- readiness

def _check_placement():
    expect(http('GET', url('placement') + '/resource_providers'), (200,),
           'placement resource_providers')


def _check_glance():
    expect(http('GET', url('glance') + '/v2/images'), (200,), 'glance images')


def _check_neutron():
    expect(http('GET', url('neutron') + '/v2.0/networks'), (200,),
           'neutron networks')


def _check_nova_api():
    expect(http('GET', url('nova') + '/v2.1/os-services'), (200,),
           'nova os-services')


def _nova_service_up(binary):
    body = expect(http('GET', url('nova') + '/v2.1/os-services?binary=' +
                       binary), (200,), 'nova os-services')
    for svc in body.get('services', []):
        if svc['binary'] == binary and svc['state'] == 'up':
            return
    raise StackError(f'{binary} is not reported up yet')


def _check_compute_ready():
    """Host up in nova, mapped to the cell, inventory in placement."""
    _nova_service_up('nova-compute')
    host = env('RNS_COMPUTE_HOST')
    body = expect(http('GET', url('nova') + '/v2.1/os-hypervisors/detail'),
                  (200,), 'nova os-hypervisors')
    hyps = [h for h in body.get('hypervisors', [])
            if h.get('hypervisor_hostname') == host]
    if not hyps or hyps[0]['state'] != 'up' or hyps[0]['status'] != 'enabled':
        raise StackError(f'hypervisor {host} not up yet')
    if not _host_mapped():
        raise StackError(f'host {host} not discovered into cell1 yet')
    body = expect(http('GET', url('placement') + '/resource_providers?name=' +
                       host), (200,), 'placement resource_providers')
    rps = body.get('resource_providers', [])
    if not rps:
        raise StackError(f'no resource provider for {host} yet')
    rp_url = f"{url('placement')}/resource_providers/{rps[0]['uuid']}"
    inv = expect(http('GET', rp_url + '/inventories'), (200,),
                 'placement inventories')
    if 'VCPU' not in inv.get('inventories', {}):
        raise StackError(f'no VCPU inventory for {host} yet')


CHECKS = (
    ('placement', 'placement', _check_placement),
    ('glance', 'glance', _check_glance),
    ('neutron', 'neutron', _check_neutron),
    ('nova-api', 'nova-api', _check_nova_api),
    ('nova-conductor', 'nova-conductor',
     lambda: _nova_service_up('nova-conductor')),
    ('nova-scheduler', 'nova-scheduler',
     lambda: _nova_service_up('nova-scheduler')),
    ('compute host', 'nova-compute', _check_compute_ready),
)


def cmd_wait(args):
    start = time.monotonic()
    deadline = start + args.timeout
    pending = [c for c in CHECKS if not args.only or c[1] in args.only]
    last_error = {}
    while pending:
        for check in list(pending):
            name, service, func = check
            if not _alive(_pid(service)):
                raise StackError(
                    f"{service} exited during start; last log lines "
                    f"({env('RNS_LOG_DIR')}/{service}.log):\n"
                    f"{log_tail(service)}")
            try:
                func()
            except (StackError, OSError, ValueError, KeyError) as exc:
                last_error[name] = str(exc)
                continue
            pending.remove(check)
            took = time.monotonic() - start
            print(f'  {name:<15} ready after {took:5.1f} s', flush=True)
        if not pending:
            break
        if time.monotonic() > deadline:
            lines = []
            for name, service, _func in pending:
                lines.append(
                    f"{name}: {last_error.get(name, 'no answer')} (last log "
                    f"lines, {env('RNS_LOG_DIR')}/{service}.log):\n"
                    f"{log_tail(service)}")
            raise StackError(f'not ready after {args.timeout} s:\n' +
                             '\n'.join(lines))
        time.sleep(0.5)


def _service_registered(binary):
    return _count('SELECT COUNT(*) FROM services WHERE `binary`=%s '
                  'AND host=%s AND deleted=0', 'RNS_DB_NOVA_CELL1',
                  (binary, env('RNS_COMPUTE_HOST'))) > 0


def cmd_wait_registered(args):
    """Wait until a nova service has written its row in the cell database.

    nova-conductor writes it just before it starts consuming RPC, so
    starting nova-compute after that spares nova-compute a 10 s timeout on
    its first conductor ping.
    """
    deadline = time.monotonic() + args.timeout
    while not _service_registered(args.binary):
        if not _alive(_pid(args.binary)):
            raise StackError(f'{args.binary} exited during start; last log '
                             f'lines:\n{log_tail(args.binary)}')
        if time.monotonic() > deadline:
            raise StackError(f'{args.binary} did not register within '
                             f'{args.timeout} s:\n{log_tail(args.binary)}')
        time.sleep(0.2)


def cmd_status(_args):
    checks = {service: func for _name, service, func in CHECKS}
    rss = group_rss_kib()
    down = 0
    total_kib = 0
    for service in SERVICES:
        pid = _pid(service)
        if not _alive(pid):
            print(f'{service:<15} stopped')
            down += 1
            continue
        try:
            checks[service]()
            state = 'ready'
        except (StackError, OSError, ValueError, KeyError) as exc:
            state = f'running, not ready ({exc})'
        kib, procs = rss.get(pid, (0, 0))
        total_kib += kib
        print(f'{service:<15} pid {pid:<8} {procs} proc {kib / 1024:6.0f} MiB'
              f'  {state}')
    if down < len(SERVICES):
        print(f'{"total RSS":<15} {total_kib / 1024:.0f} MiB')
    return 3 if down == len(SERVICES) else (1 if down else 0)


# --------------------------------------------------------------------- seed

def _find_image(name):
    body = expect(http('GET', url('glance') + '/v2/images?name=' + name),
                  (200,), 'glance list images')
    return body['images'][0] if body['images'] else None


def seed_image(name, size):
    image = _find_image(name)
    if image is None:
        image = expect(http('POST', url('glance') + '/v2/images', body={
            'name': name, 'disk_format': 'raw', 'container_format': 'bare',
            'visibility': 'public', 'min_disk': 0, 'min_ram': 0,
        }), (201,), f'create image {name}')
    if image['status'] != 'active':
        expect(http('PUT', f"{url('glance')}/v2/images/{image['id']}/file",
                    body=bytes(size),
                    headers={'Content-Type': 'application/octet-stream'},
                    timeout=60), (204,), f'upload image {name}')
    return image['id']


def seed_network(name, physnet, cidr):
    base = url('neutron') + '/v2.0'
    body = expect(http('GET', base + '/networks?name=' + name), (200,),
                  'list networks')
    if body['networks']:
        net = body['networks'][0]
    else:
        net = expect(http('POST', base + '/networks', body={'network': {
            'name': name, 'shared': True, 'admin_state_up': True,
            'provider:network_type': 'flat',
            'provider:physical_network': physnet,
        }}), (201,), f'create network {name}')['network']
    body = expect(http('GET', base + '/subnets?network_id=' + net['id']),
                  (200,), 'list subnets')
    if not body['subnets']:
        expect(http('POST', base + '/subnets', body={'subnet': {
            'name': name + '-subnet', 'network_id': net['id'],
            'ip_version': 4, 'cidr': cidr, 'enable_dhcp': False,
        }}), (201,), f'create subnet on {name}')
    return net['id']


def write_clouds_yaml(path, cloud):
    nova = url('nova') + '/v2.1'
    common = (
        f'    compute_endpoint_override: {nova}\n'
        f"    image_endpoint_override: {url('glance')}\n"
        f"    network_endpoint_override: {url('neutron')}\n"
        f"    placement_endpoint_override: {url('placement')}\n"
        '    region_name: RegionOne\n')
    text = '# Written by tools/nova-stack/stack.sh start; test stack only.\n'
    text += 'clouds:\n'
    for name, token in ((cloud, ADMIN_TOKEN), (cloud + '-demo', DEMO_TOKEN)):
        text += (f'  {name}:\n'
                 '    auth_type: admin_token\n'
                 '    auth:\n'
                 f'      endpoint: {nova}\n'
                 f'      token: "{token}"\n') + common
    tmp = path + '.tmp'
    with open(tmp, 'w') as fh:
        fh.write(text)
    os.replace(tmp, path)


def cmd_seed(args):
    for name in args.images:
        image_id = seed_image(name, args.image_size)
        print(f'  image   {name:<20} {image_id}')
    net_id = seed_network(args.network, args.physnet, args.cidr)
    print(f'  network {args.network:<20} {net_id} ({args.cidr}, DHCP off)')
    write_clouds_yaml(args.clouds_yaml, args.cloud)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='rapid_nova_stack.ctl')
    sub = parser.add_subparsers(dest='cmd', required=True)
    sub.add_parser('db-ping').set_defaults(func=cmd_db_ping)
    p = sub.add_parser('db-reset')
    p.add_argument('names', nargs='+')
    p.set_defaults(func=cmd_db_reset)
    p = sub.add_parser('db-drop')
    p.add_argument('names', nargs='+')
    p.set_defaults(func=cmd_db_drop)
    p = sub.add_parser('wait')
    p.add_argument('--timeout', type=int, default=180)
    p.add_argument('--only', nargs='+', choices=SERVICES,
                   help='wait for these services only')
    p.set_defaults(func=cmd_wait)
    p = sub.add_parser('wait-registered')
    p.add_argument('binary', choices=NOVA_BINARIES)
    p.add_argument('--timeout', type=int, default=180)
    p.set_defaults(func=cmd_wait_registered)
    sub.add_parser('status').set_defaults(func=cmd_status)
    p = sub.add_parser('seed')
    p.add_argument('--images', nargs='+', required=True)
    p.add_argument('--image-size', type=int, default=1024 * 1024)
    p.add_argument('--network', required=True)
    p.add_argument('--physnet', required=True)
    p.add_argument('--cidr', required=True)
    p.add_argument('--cloud', required=True)
    p.add_argument('--clouds-yaml', required=True)
    p.set_defaults(func=cmd_seed)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except StackError as exc:
        print(f'ERROR: {exc}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
