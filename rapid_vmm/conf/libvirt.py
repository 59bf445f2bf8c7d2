"""Options of the [libvirt] group (standalone hosts)."""

from oslo_config import cfg

from rapid_vmm.conf import groups

libvirt_group = cfg.OptGroup(
    'libvirt', title='libvirt driver',
    help='Options of the libvirt driver (``compute_driver = libvirt``).')

IP_SOURCES = ('lease', 'agent', 'arp')

libvirt_opts = [
    cfg.StrOpt('connection_uri', default='qemu:///system',
               help='libvirt connection URI, e.g. ``qemu:///system``; '
                    '``test:///default`` runs the demo on libvirt\'s test '
                    'hypervisor.'),
    cfg.StrOpt('virt_type', default='auto',
               choices=[('auto', 'kvm when /dev/kvm is usable, else qemu; '
                                 'test on the test hypervisor'),
                        ('kvm', 'hardware virtualisation'),
                        ('qemu', 'software emulation (TCG)')],
               help='Domain type of the VMs.'),
    cfg.StrOpt('normal_image',
               help='Template disk of normal VMs (qcow2 or raw). Required '
                    'with the libvirt driver.'),
    cfg.ListOpt('helper_images', default=[],
                help='Template disks of helper VMs, one per helper index '
                     '(the last one serves any further helper). Empty: '
                     'helpers use ``normal_image``.'),
    cfg.StrOpt('android_image',
               help='Template disk of normal Android VMs (``os_type`` 1). '
                    'Unset: a request for an Android VM is refused '
                    '(InvalidRequest); it never gets another OS\'s image.'),
    cfg.ListOpt('android_helper_images', default=[],
                help='Template disks of Android helper VMs, one per helper '
                     'index (the last one serves any further helper). '
                     'Empty: Android helpers use ``android_image``.'),
    cfg.StrOpt('images_path',
               sample_default='$data_path/instances',
               help='Directory of instance disks. Default: '
                    '``<data_path>/instances``.'),
    cfg.StrOpt('image_mode', default='overlay',
               choices=[('overlay', 'qcow2 overlay with the template as '
                                    'backing file: O(1) time and space'),
                        ('copy', 'full copy of the template')],
               help='How an instance disk is made from its template.'),
    cfg.IntOpt('image_pool_size', default=0, min=0, max=1000,
               help='Instance disks prepared ahead of requests; 0 prepares '
                    'them on demand.'),
    cfg.StrOpt('network', default='default',
               help='libvirt network that the VMs\' NIC is attached to.'),
    cfg.ListOpt('ip_sources', default=list(IP_SOURCES),
                item_type=cfg.types.String(choices=IP_SOURCES),
                help='Sources of a VM\'s address, tried in order: ``lease`` '
                     '(DHCP leases of a libvirt network), ``agent`` (QEMU '
                     'guest agent), ``arp`` (host ARP table).'),
    cfg.StrOpt('ip_command',
               help='Optional command that prints a VM\'s IP address: an '
                    'argument list (split like a shell would, but never run '
                    'by a shell) to which the domain name is appended. '
                    'When set, it is used instead of ``ip_sources``.'),
    cfg.IntOpt('ip_timeout', default=100, min=1,
               help='Seconds to wait for a new VM\'s IP address.'),
    cfg.IntOpt('ip_command_timeout', default=10, min=1,
               help='Seconds one run of ``ip_command`` may take.'),
    cfg.IntOpt('max_vcpus', default=0, min=0,
               help='Maximum vCPUs a domain is defined with, the ceiling of '
                    'live resize; 0 = the largest vCPU count of '
                    '``vm_types``.'),
    cfg.IntOpt('max_memory_mb', default=0, min=0,
               help='Maximum memory in MB a domain is defined with, the '
                    'ceiling of a live memory resize. 0 (default): a '
                    'domain\'s maximum is its own size, and growing its '
                    'memory with change_flavor is refused. A value > 0 '
                    'allows growth up to it: every VM is then defined with '
                    'that maximum and capacity accounts it at that size '
                    '(a guest without a balloon driver can use all of '
                    'it).'),
    cfg.StrOpt('kernel',
               help='Optional kernel for direct kernel boot of the VMs '
                    '(with ``initrd`` and ``kernel_cmdline``); unset boots '
                    'from the instance disk.'),
    cfg.StrOpt('initrd',
               help='Optional initramfs for direct kernel boot.'),
    cfg.StrOpt('kernel_cmdline', default='',
               help='Kernel command line for direct kernel boot.'),
    cfg.IntOpt('call_timeout', default=30, min=1,
               help='Seconds any libvirt call (and opening the connection) '
                    'may take before its caller gets an error; the call '
                    'itself is left to finish. Default 30.'),
    cfg.IntOpt('save_timeout', default=300, min=1,
               help='Seconds a managed save (``suspend_mode = save``) or '
                    'the restore of one may take; they write or read the '
                    'whole guest memory. Default 300.'),
    cfg.IntOpt('orphan_disk_grace_period', default=86400, min=0,
               help='Seconds an orphan disk (a file of ``images_path`` '
                    'named like an instance disk that no VM record and no '
                    'domain of any owner uses) stays moved aside in '
                    '``<images_path>/.orphans/`` before it is deleted. '
                    'Default 86400 (one day); 0 deletes it at the next '
                    'clean-up pass.'),
    cfg.IntOpt('reconnect_max_interval', default=30, min=1,
               help='Upper bound, in seconds, of the back-off between '
                    'attempts to reconnect to libvirt.'),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    groups.register_group(conf, libvirt_group, libvirt_opts)


def list_opts() -> dict:
    return {libvirt_group: libvirt_opts}
