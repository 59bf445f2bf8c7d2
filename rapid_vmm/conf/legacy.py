"""Options of the [legacy] group: the original RAPID TCP protocol.

rapid-vmm can serve the original protocol (SPEC section 7) beside its RPC
API, so that the unmodified Java SLAM, AS and DS keep working, and can talk
it to the original DS and SLAM (``[DEFAULT] peer_protocol = legacy``).
"""

from oslo_config import cfg

from rapid_vmm.conf import groups

legacy_group = cfg.OptGroup(
    'legacy', title='Original RAPID TCP protocol',
    help='The original RAPID protocol (Java object streams over TCP): the '
         'front end that the original SLAM, AS and DS call, the client of '
         'the original DS and SLAM (``peer_protocol = legacy``) and the '
         'notice sent to an AS before its VM is resized. The protocol has '
         'no authentication: bind it to the management network and list '
         'the peers in ``allowed_peers``.')

server_opts = [
    cfg.BoolOpt('enabled', default=False,
                help='Serve the original RAPID TCP protocol (SPEC section 7) '
                     'on ``bind_host``:``port`` beside the RPC API. '
                     'Default: false.'),
    cfg.HostAddressOpt('bind_host', default='0.0.0.0',  # noqa: S104 - SPEC 3
                       help='Address the legacy front end listens on (the '
                            'original\'s vmmIpAddress). Default: 0.0.0.0, '
                            'every interface: prefer the management '
                            'network\'s address.'),
    cfg.PortOpt('port', default=9000,
                help='TCP port of the legacy front end (the original\'s '
                     'vmmPort). The original DS reaches a VMM at its '
                     'registered IP and the DS\'s own configured VMM port, '
                     'so this must be that port. Default: 9000.'),
    cfg.ListOpt('allowed_peers', default=[],
                help='Networks (CIDRs, e.g. ``10.0.0.0/24,192.168.122.0/24``, '
                     'or single addresses) allowed to connect to the legacy '
                     'port; a connection from any other address is closed '
                     'before a byte is read. Empty (default): any address, '
                     'with a warning at start (the protocol has no '
                     'authentication).'),
    cfg.IntOpt('max_connections', default=1024, min=1, max=65536,
               help='Most connections open at once on the legacy port '
                    '(waiting for their request, queued or being served); '
                    'one more is closed at once with a warning. '
                    'Default: 1024.'),
    cfg.FloatOpt('read_timeout', default=10.0, min=0.1,
                 help='Seconds a peer has, from connecting, to send one '
                      'whole request; a connection that is idle or slow is '
                      'then closed without holding up the others. Also the '
                      'bound of each reply write. Default: 10.'),
    cfg.IntOpt('max_frame_bytes', default=65536, min=64, max=16777216,
               help='Largest request, in bytes, accepted on the legacy port '
                    '(and largest reply read from a peer). Default: 65536.'),
    cfg.IntOpt('max_string_bytes', default=8192, min=16, max=1048576,
               help='Longest string (modified UTF-8 bytes) accepted in a '
                    'frame. Default: 8192.'),
    cfg.IntOpt('max_list_items', default=65536, min=1, max=16777216,
               help='Most items of a list (``ArrayList<String>``) accepted '
                    'in a frame. Default: 65536.'),
    cfg.FloatOpt('as_register_wait', default=30.0, min=0.0,
                 help='Seconds an AS_RM_REGISTER waits for a VM with the '
                      'AS\'s address to appear (the original waits 3 x 10 '
                      's) and, with ``peer_protocol = legacy``, for that VM '
                      'to be registered with the DS (the AS registers with '
                      'the DS next). 0 answers at once. Default: 30.'),
    cfg.FloatOpt('as_status_timeout', default=60.0, min=1.0,
                 help='Seconds an AS has, after AS_RM_REGISTER was '
                      'answered, to send its status byte (it registers with '
                      'the DS in between). Default: 60.'),
]

peer_opts = [
    cfg.HostAddressOpt('ds_host',
                       help='Address of the original Directory Server, for '
                            '``peer_protocol = legacy``. The SLAM\'s address '
                            'comes from the DS\'s reply to VMM_REGISTER. '
                            'No default: required in that mode.'),
    cfg.PortOpt('ds_port', default=9001,
                help='TCP port of the original Directory Server. '
                     'Default: 9001.'),
]

as_notice_opts = [
    cfg.PortOpt('as_port', default=4322,
                help='TCP port of the Acceleration Server inside a VM, to '
                     'which DS_MIGRATION_VM_AS is sent before the VM is '
                     'resized (an AS that registered over the legacy '
                     'protocol). Default: 4322.'),
    cfg.FloatOpt('as_notice_timeout', default=10.0, min=0.1,
                 help='Seconds the notice before a resize may take, on '
                      'either protocol: connecting, sending and waiting for '
                      'the AS\'s answer (the original waits 10 s). An AS '
                      'that does not answer in time "did not answer". '
                      'Default: 10.'),
    cfg.StrOpt('as_rpc_topic', default='rapid_as',
               help='RPC topic of the optional AS-side API of an AS that '
                    'registered over RPC: the notice before a resize is a '
                    'call of ``prepare_migration(user_id)`` to the server '
                    'named ``<user_id>`` on this topic (see '
                    'doc/source/legacy.md). Default: rapid_as.'),
]

ALL_OPTS = server_opts + peer_opts + as_notice_opts


def register_opts(conf: cfg.ConfigOpts) -> None:
    groups.register_group(conf, legacy_group, ALL_OPTS)


def list_opts() -> dict:
    return {legacy_group: ALL_OPTS}
