"""Options of the [nova] group (``compute_driver = nova``)."""

from keystoneauth1 import loading as ks_loading
from oslo_config import cfg

from rapid_vmm.conf import groups

nova_group = cfg.OptGroup(
    'nova', title='Nova driver',
    help='Options of the Nova driver. Authentication comes from a '
         'clouds.yaml cloud (``cloud``) or from the keystoneauth options '
         'of this group (``auth_type``, ``auth_url``, ...).')

nova_opts = [
    cfg.StrOpt('cloud',
               help='Name of a cloud in clouds.yaml. Unset: the keystoneauth '
                    'options of this group are used.'),
    cfg.StrOpt('region_name',
               help='Region of the compute, image and network services.'),
    cfg.DictOpt('flavors', default={},
                help='Nova flavor (name or id) of each VM type, as '
                     '``vcpus_memoryMB_diskGB:flavor`` pairs, e.g. '
                     '``1_1024_20:m1.small``. A type without an entry uses '
                     'the flavor named '
                     '``rapid.<vcpus>_<memoryMB>_<diskGB>``.'),
    cfg.BoolOpt('create_flavors', default=False,
                help='Create a missing flavor of a VM type on demand '
                     '(needs the admin role).'),
    cfg.StrOpt('linux_image', help='Glance image of normal Linux VMs.'),
    cfg.StrOpt('linux_helper_image',
               help='Glance image of Linux helper VMs.'),
    cfg.StrOpt('android_image', help='Glance image of normal Android VMs.'),
    cfg.StrOpt('android_helper_image',
               help='Glance image of Android helper VMs.'),
    cfg.StrOpt('network', help='Network (name or id) of new servers.'),
    cfg.StrOpt('key_name', help='Keypair injected into new servers.'),
    cfg.StrOpt('security_group',
               help='Security group added to new servers.'),
    cfg.IntOpt('boot_timeout', default=300, min=1,
               help='Seconds to wait for a new server to become ACTIVE and '
                    'get an IP address, and for any other state change '
                    '(suspend, resume, resize, delete).'),
    cfg.IntOpt('api_timeout', default=60, min=1,
               help='Seconds one HTTP request to the cloud (Nova, Glance, '
                    'Neutron, Keystone, placement) may take; set on the '
                    'openstacksdk connection and its keystoneauth session '
                    '(the keystoneauth ``timeout`` option of this group, '
                    'when set, wins for the session). Default 60.'),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    group = groups.register_group(conf, nova_group, nova_opts)
    ks_loading.register_session_conf_options(conf, group.name)
    ks_loading.register_auth_conf_options(conf, group.name)


def list_opts() -> dict:
    auth_opts = ks_loading.get_auth_common_conf_options()
    auth_opts += ks_loading.get_auth_plugin_conf_options('password')
    seen = set()
    unique = []
    for opt in auth_opts:
        if opt.dest not in seen:
            seen.add(opt.dest)
            unique.append(opt)
    return {nova_group: (nova_opts +
                         ks_loading.get_session_conf_options() +
                         unique)}
