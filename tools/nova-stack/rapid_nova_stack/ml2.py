"""An ML2 mechanism driver that binds every port, for a stack with no agents.

Neutron only binds a port when some mechanism driver accepts it; real drivers
ask their L2 agent first.  Here nothing carries packets (the compute driver is
nova's fake one), so the port is bound to the first segment offered, with a
generic VIF type, and marked ACTIVE at once.
"""

from neutron_lib import constants
from neutron_lib.api.definitions import portbindings
from neutron_lib.plugins.ml2 import api
from oslo_log import log as logging

LOG = logging.getLogger(__name__)


class BindEverythingDriver(api.MechanismDriver):
    """Binds any port on any host to the first segment offered."""

    def initialize(self):
        LOG.info('rapid_bind mechanism driver ready: every port is bound '
                 'without an agent (test stack only)')

    @property
    def connectivity(self):
        return portbindings.CONNECTIVITY_L2

    def bind_port(self, context):
        segments = context.segments_to_bind
        if not segments:
            LOG.warning('Port %s: no segment to bind', context.current['id'])
            return
        segment = segments[0]
        context.set_binding(segment[api.ID], portbindings.VIF_TYPE_OTHER,
                            {portbindings.CAP_PORT_FILTER: False},
                            status=constants.PORT_STATUS_ACTIVE)
        LOG.debug('Port %s bound on host %s to segment %s',
                  context.current['id'], context.host, segment[api.ID])
