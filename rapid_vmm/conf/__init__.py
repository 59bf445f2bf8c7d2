"""Configuration of rapid-vmm: one module per option group.

``CONF`` is the global ``oslo_config.cfg.ConfigOpts`` of the agent. Modules
read ``CONF.group.option`` at call time, never at import time.
"""

from oslo_config import cfg

from rapid_vmm.conf import client
from rapid_vmm.conf import default
from rapid_vmm.conf import gpu
from rapid_vmm.conf import legacy
from rapid_vmm.conf import libvirt
from rapid_vmm.conf import metrics
from rapid_vmm.conf import notifications
from rapid_vmm.conf import nova

CONF = cfg.CONF


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register every rapid-vmm option group on ``conf``."""
    default.register_opts(conf)
    libvirt.register_opts(conf)
    nova.register_opts(conf)
    gpu.register_opts(conf)
    legacy.register_opts(conf)
    notifications.register_opts(conf)
    metrics.register_opts(conf)
    client.register_opts(conf)


register_opts(CONF)
