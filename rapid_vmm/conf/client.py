"""Options of the [client] group (``rapid-vmm-client``).

The operator CLI reads only these, the topics and the broker options of
oslo.messaging: a file with a ``[client]`` section alone is enough, and the
agent's file works too (its other options, secrets included, are never
read).
"""

from oslo_config import cfg

from rapid_vmm.conf import groups

client_group = cfg.OptGroup(
    'client', title='Operator CLI',
    help='Settings of ``rapid-vmm-client``, e.g. in '
         '``/etc/rapid-vmm/client.conf``. Unset options fall back to the '
         'agent\'s: ``[DEFAULT] transport_url``, ``host``, ``vmm_topic`` and '
         '``[oslo_messaging_notifications] topics``.')

client_opts = [
    cfg.StrOpt('transport_url', secret=True,
               help='Broker of the CLI, e.g. '
                    '``rabbit://rapid-ops:PASSWORD@broker:5671/rapid``. '
                    'Default: ``[DEFAULT] transport_url``.'),
    cfg.StrOpt('host',
               help='The agent the CLI talks to (its ``host`` option). '
                    'Default: ``[DEFAULT] host``.'),
    cfg.StrOpt('vmm_topic',
               help='RPC topic of the agents. Default: ``[DEFAULT] '
                    'vmm_topic``.'),
    cfg.ListOpt('notification_topics',
                help='Notification topics ``watch`` listens on. Default: '
                     '``[oslo_messaging_notifications] topics``.'),
    cfg.FloatOpt('timeout', default=10.0, min=0.1,
                 help='Seconds a command may take, broker reconnections '
                      'included, before it gives up with exit status 1 '
                      '(``--timeout`` overrides it).'),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    groups.register_group(conf, client_group, client_opts)


def list_opts() -> dict:
    return {client_group: client_opts}
