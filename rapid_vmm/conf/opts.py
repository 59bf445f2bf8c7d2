"""Entry points for oslo-config-generator and library defaults."""

from oslo_config import cfg

from rapid_vmm.conf import client
from rapid_vmm.conf import default
from rapid_vmm.conf import gpu
from rapid_vmm.conf import legacy
from rapid_vmm.conf import libvirt
from rapid_vmm.conf import metrics
from rapid_vmm.conf import notifications
from rapid_vmm.conf import nova

_MODULES = (default, libvirt, nova, gpu, legacy, notifications, metrics,
            client)


def list_opts() -> list:
    """Return ``[(group, [opts])]`` of every rapid-vmm option."""
    result = []
    for module in _MODULES:
        for group, opts in module.list_opts().items():
            result.append((group, opts))
    return result


GRACEFUL_SHUTDOWN_TIMEOUT = 10
"""Seconds oslo.service gives the agent to stop (its own default: 60)."""


def set_lib_defaults(conf: cfg.ConfigOpts | None = None) -> None:
    """Defaults of library options that suit rapid-vmm, on ``conf``.

    The agent must stop within 10 s of SIGTERM, so oslo.service's
    ``graceful_shutdown_timeout`` is lowered from 60 s. Only public calls:
    oslo.service's options are registered from its ``list_opts()`` (equal
    to its own, so its later registration is a no-op) and the default set
    with ``ConfigOpts.set_default``. ``conf``: the global ``CONF`` when
    None (as when oslo-config-generator calls this hook; the sample then
    shows oslo.service's own default).
    """
    from oslo_service import service

    conf = cfg.CONF if conf is None else conf
    for group, opts in service.list_opts():
        conf.register_opts(opts, group=group)
    conf.set_default('graceful_shutdown_timeout', GRACEFUL_SHUTDOWN_TIMEOUT)
