"""Typed errors of rapid-vmm.

Every error raised to an RPC caller derives from :class:`RapidVmmException`.
Callers that list ``rapid_vmm.exception`` in their allowed remote exception
modules get the same class back through oslo.messaging; others get a
``RemoteError`` whose ``exc_type`` is the class name.

The constructor follows the oslo convention: ``Exc(**kwargs)`` formats
``msg_fmt`` with the keyword arguments, ``Exc(message)`` uses the message
as given. Both forms survive the round trip through oslo.messaging, which
rebuilds the exception from ``args`` and ``kwargs``.
"""

from oslo_log import log as logging

LOG = logging.getLogger(__name__)


class RapidVmmException(Exception):
    """Base class of every rapid-vmm error."""

    msg_fmt = 'An unknown error occurred.'

    def __init__(self, message: str | None = None, **kwargs):
        self.kwargs = kwargs
        if not message:
            try:
                message = self.msg_fmt % kwargs
            except (KeyError, TypeError, ValueError):
                LOG.error('Cannot format %s with %s',
                          type(self).__name__, sorted(kwargs))
                message = self.msg_fmt
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


class InvalidRequest(RapidVmmException):
    """An argument has the wrong type, is out of range or is unknown."""

    msg_fmt = 'Invalid request: %(reason)s'


class VmNotFound(RapidVmmException):
    """The user has no VM on this host."""

    msg_fmt = 'User %(user_id)s has no VM on this host.'


class VmStateConflict(RapidVmmException):
    """The operation is not valid in the VM's current state."""

    msg_fmt = ('Cannot %(action)s the VM of user %(user_id)s while it is '
               '%(state)s.')


class NoCapacity(RapidVmmException):
    """The host cannot hold the requested VM."""

    msg_fmt = 'No capacity for %(request)s: %(reason)s'


class DriverError(RapidVmmException):
    """The hypervisor or cloud failed to carry out an operation."""

    msg_fmt = 'Driver error during %(action)s: %(reason)s'


class InternalError(DriverError):
    """An unexpected failure inside the agent (a bug); it is logged."""

    msg_fmt = 'Internal error during %(action)s: %(reason)s'


class AsRegistrationTimeout(RapidVmmException):
    """The Acceleration Server of a VM did not register in time."""

    msg_fmt = ('The Acceleration Server of user %(user_id)s did not register '
               'within %(timeout)s s.')


class AsNotReady(AsRegistrationTimeout):
    """The Acceleration Server registered but reported it is not ready."""

    msg_fmt = 'The Acceleration Server of user %(user_id)s is not ready.'


class ConfigError(RapidVmmException):
    """The configuration cannot work; the agent refuses to start."""

    msg_fmt = 'Bad configuration: %(reason)s'


class StateError(RapidVmmException):
    """The state database is unreadable or of an unknown schema."""

    msg_fmt = 'State database %(path)s: %(reason)s'


class InstanceNotOurs(VmStateConflict):
    """The hypervisor's instance is not recognisably this agent's.

    Its owner is another ``host``, or its metadata is missing or
    unreadable: the agent refuses to destroy or change it.
    """

    msg_fmt = ('The instance %(name)s of user %(user_id)s is not '
               'recognisably this agent\'s (%(reason)s); it is left alone '
               'for the operator.')


class PeerError(RapidVmmException):
    """A message to the DS or the SLAM failed (never raised to callers)."""

    msg_fmt = '%(method)s to the %(peer)s failed: %(reason)s'


class PeerUnavailable(PeerError):
    """The message may not have arrived (no broker, no answer, refused
    connection): worth sending again."""


class PeerRejected(PeerError):
    """The peer answered with an error or an unusable reply."""


#: Errors a VMM API method may raise to its caller on purpose.
EXPECTED_ERRORS = (InvalidRequest, VmNotFound, VmStateConflict, NoCapacity,
                   DriverError, AsRegistrationTimeout)
