"""Options of the [notifications] group (versioned notifications).

Whether notifications are sent at all, and where, is oslo.messaging's
``[oslo_messaging_notifications]`` group (``driver``, ``topics``,
``transport_url``, ``retry``); these options say what rapid-vmm sends.
"""

from oslo_config import cfg

from rapid_vmm.conf import groups

notifications_group = cfg.OptGroup(
    'notifications', title='Versioned notifications',
    help='What the agent publishes as oslo.messaging notifications when '
         '``[oslo_messaging_notifications] driver`` is set (e.g. '
         '``messagingv2``): every VM state change '
         '(``rapid_vmm.vm.<event>``, priority info, or error for '
         '``start_failed``) and, optionally, every host report.')

notifications_opts = [
    cfg.BoolOpt('host_reports', default=True,
                help='Also publish every resource report sent to the '
                     'Directory Server (``notify_vmm``) as a '
                     '``rapid_vmm.host.report`` notification of priority '
                     '``sample`` on the notification topics (queue '
                     '``<topic>.sample``); ``rapid-vmm-client watch`` shows '
                     'them. One every ``report_interval`` seconds.'),
    cfg.IntOpt('send_retry', default=2, min=0, max=100,
               help='How many times one notification is retried while the '
                    'broker connection fails before it is dropped (logged). '
                    'Bounded on purpose: the agent uses this instead of '
                    '``[oslo_messaging_notifications] retry``, whose '
                    'default retries forever.'),
    cfg.IntOpt('queue_size', default=1000, min=1,
               help='Notifications waiting to be sent, at most. They are '
                    'sent by one background thread, so a VM operation never '
                    'waits for the broker; beyond this many (the broker '
                    'unreachable for long) new ones are dropped and '
                    'counted in the log.'),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    groups.register_group(conf, notifications_group, notifications_opts)


def list_opts() -> dict:
    return {notifications_group: notifications_opts}
