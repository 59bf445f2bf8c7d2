"""Options of the [DEFAULT] group."""

import socket

from oslo_config import cfg
from oslo_utils import netutils

DEFAULT_VM_TYPES = '1,2,4 x 1024,2048,4096 x 20,40'

identity_opts = [
    cfg.StrOpt('host',
               default=socket.gethostname(),
               sample_default='<current_hostname>',
               help='Name of this VM Manager: the server name of its RPC '
                    'endpoint on ``vmm_topic`` and the name it gives the '
                    'Directory Server. Default: the host name.'),
    cfg.StrOpt('previous_host',
               help='Declares a rename of this host: the ``host`` this '
                    'agent had before. When the state in ``data_path`` was '
                    'written under that name, the agent takes over the '
                    'state and the instances owned by it (rewriting their '
                    'owner) instead of refusing to start. Unset: an agent '
                    'whose ``host`` differs from its state\'s refuses to '
                    'start. Harmless to leave set after the rename.'),
    cfg.StrOpt('my_ip',
               default=netutils.get_my_ipv4(),
               sample_default='<host_ipv4>',
               help='IP address reported to the Directory Server and the '
                    'SLA Manager. Default: the IPv4 address this host '
                    'sends from on its default route (not the first '
                    'interface: a bridge or docker0 is not the uplink); '
                    '127.0.0.1 on a host without a default route.'),
]

rpc_opts = [
    cfg.StrOpt('vmm_topic', default='rapid_vmm',
               help='RPC topic on which this VMM serves the VMM API '
                    '(server name: ``host``).'),
    cfg.StrOpt('ds_topic', default='rapid_ds',
               help='RPC topic of the Directory Server API.'),
    cfg.StrOpt('slam_topic', default='rapid_slam',
               help='RPC topic of the SLA Manager API.'),
    cfg.IntOpt('max_concurrent_requests', default=100, min=1, max=10000,
               help='Size of the worker pool that handles RPC requests '
                    '(and legacy connections). Requests beyond it wait.'),
    cfg.StrOpt('peer_protocol', default='rpc',
               choices=[('rpc', 'the DS and SLAM APIs over oslo.messaging'),
                        ('legacy', 'the original RAPID TCP protocol, to '
                                   'the original Java DS and SLAM '
                                   '([legacy] ds_host, ds_port)')],
               help='How this VMM talks to the Directory Server and the '
                    'SLA Manager.'),
    cfg.IntOpt('peer_call_timeout', default=10, min=1,
               help='Seconds to reach the Directory Server or the SLA '
                    'Manager: a TCP connection of the legacy protocol, the '
                    'wait for the DS id of a new VM before start_vm '
                    'answers (at most 2 s of it).'),
    cfg.IntOpt('peer_reply_timeout', default=60, min=1,
               help='Seconds a message to the DS or the SLAM waits for the '
                    'peer\'s answer (its acknowledgement) before it counts '
                    'as not delivered and is sent again. Longer than the '
                    'slowest peer, or a slow DS would get a message (and a '
                    'VM registration) twice.'),
    cfg.IntOpt('outbox_retry_max_interval', default=30, min=1,
               help='Upper bound, in seconds, of the exponential back-off '
                    'between two attempts to deliver a message of the '
                    'outbox (DS and SLAM messages) while the peer or the '
                    'broker is away.'),
    cfg.IntOpt('outbox_max_rejections', default=5, min=1,
               help='Times a peer may refuse (answer with an error) one '
                    'message of the outbox before it is given up and logged '
                    'at ERROR. Unanswered messages are retried without '
                    'limit.'),
    cfg.FloatOpt('outbox_idle_interval', default=5.0, min=0.1,
                 help='Seconds an idle outbox sender waits before it looks '
                      'for messages again (new messages wake it at once).'),
    cfg.IntOpt('registration_retry_max_interval', default=60, min=1,
               help='Upper bound, in seconds, of the exponential back-off '
                    'between attempts to register with the Directory Server '
                    'and the SLA Manager while they are absent.'),
]

driver_opts = [
    cfg.StrOpt('compute_driver', default='libvirt',
               choices=[('libvirt', 'drive a libvirt hypervisor directly '
                                    '(standalone hosts)'),
                        ('nova', 'drive OpenStack Nova through '
                                 'openstacksdk')],
               help='Which hypervisor driver runs the VMs.'),
    cfg.BoolOpt('openstack_support', default=None,
                deprecated_for_removal=True,
                deprecated_reason='Use compute_driver = nova.',
                help='Deprecated alias of the original openStackSupport '
                     'setting: true selects ``compute_driver = nova``, '
                     'false ``libvirt``. Unset: compute_driver decides.'),
]

state_opts = [
    cfg.StrOpt('data_path', default='/var/lib/rapid-vmm',
               help='Directory of the durable state (SQLite database with '
                    'the VMM identity and VM records) and, by default, of '
                    'instance disks.'),
]

lifecycle_opts = [
    cfg.IntOpt('report_interval', default=10, min=1,
               help='Seconds between two resource reports '
                    '(``notify_vmm``) to the Directory Server.'),
    cfg.IntOpt('reconcile_interval', default=60, min=0,
               help='Seconds between two reconciliations of the state with '
                    'the hypervisor; 0 reconciles at start only.'),
    cfg.IntOpt('reconcile_absent_passes', default=3, min=1,
               help='Reconciliation passes in a row on which the hypervisor '
                    'must answer "no such instance" to a lookup by UUID '
                    'before a VM counts as gone (marked stopped). Until '
                    'then it is reported as unknown.'),
    cfg.IntOpt('reconcile_absent_seconds', default=30, min=0,
               help='Seconds that must pass, as well, between the first '
                    'pass that did not find a VM\'s instance and the pass '
                    'that counts it as gone (hypervisor events can start '
                    'several passes in a second).'),
    cfg.IntOpt('orphan_scan_interval', default=600, min=0,
               help='Seconds between two runs of the delayed orphan-disk '
                    'job (disks that no record and no instance uses are '
                    'moved aside, then deleted after a grace period); 0 '
                    'disables it.'),
    cfg.IntOpt('lock_wait_timeout', default=0, min=0,
               help='Seconds a request waits for another operation on the '
                    'same user\'s VM before it gets VmStateConflict '
                    '(busy). 0: the longest an operation can take '
                    '(IP or boot wait + as_register_timeout + 60 s).'),
    cfg.IntOpt('helper_retry_max_interval', default=300, min=1,
               help='Upper bound, in seconds, of the exponential back-off '
                    'between attempts to start a helper VM that failed.'),
    cfg.IntOpt('helper_vm_count', default=2, min=0, max=100,
               help='Helper VMs (users -1, -2, ...) kept running and '
                    'registered with the Directory Server; 0 disables.'),
    cfg.IntOpt('as_register_timeout', default=200, min=0,
               help='Seconds start_vm waits for the Acceleration Server of '
                    'a new or resumed VM to register; 0 = do not wait.'),
    cfg.StrOpt('suspend_mode', default='pause',
               choices=[('pause', 'the guest is paused and keeps its RAM '
                                  'on the host; resume is instant'),
                        ('save', 'libvirt managed save: the guest\'s memory '
                                 'is written to disk and its RAM freed; '
                                 'resume restores it (about a second for a '
                                 'small guest). The Nova driver\'s suspend '
                                 'always saves.')],
               help='How a suspended VM is kept (libvirt driver).'),
    cfg.StrOpt('vm_types', default=DEFAULT_VM_TYPES,
               help='Grid of VM types: vCPU counts, memory sizes in MB and '
                    'disk sizes in GB, each a comma-separated ascending '
                    'list, the three lists separated by "x". Every '
                    'combination is a type; a request is rounded down to '
                    'the grid (values under the smallest are raised to it).'),
]

capacity_opts = [
    cfg.FloatOpt('cpu_allocation_ratio', default=16.0, min=0.0,
                 help='Virtual CPUs per physical CPU that VMs may be given.'),
    cfg.FloatOpt('ram_allocation_ratio', default=1.5, min=0.0,
                 help='Ratio of VM memory to host memory (after '
                      '``reserved_host_memory_mb``) that may be given.'),
    cfg.FloatOpt('disk_allocation_ratio', default=1.0, min=0.0,
                 help='Ratio of VM disk to the size of the filesystem of '
                      'the instance disks that may be given.'),
    cfg.IntOpt('reserved_host_memory_mb', default=512, min=0,
               help='Memory in MB kept for the host, outside VM capacity.'),
]

ALL_OPTS = (identity_opts + rpc_opts + driver_opts + state_opts +
            lifecycle_opts + capacity_opts)


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_opts(ALL_OPTS)


def list_opts() -> dict:
    return {'DEFAULT': ALL_OPTS}
