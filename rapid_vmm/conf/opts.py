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


def set_lib_defaults() -> None:
    """Defaults of library options that suit rapid-vmm.

    The agent must stop within 10 s of SIGTERM, so the graceful shutdown
    bound of oslo.service is lowered from 60 s.
    """
    from oslo_service import _options as service_opts
    cfg.set_defaults(service_opts.service_opts, graceful_shutdown_timeout=10)
