"""The RPC endpoint of the VMM API: exactly the 13 methods of SPEC 4.

:class:`VmmEndpoint` is the only object handed to the RPC server (and to
the legacy TCP front end). It is served with oslo.messaging's
``ExplicitRPCAccessPolicy``: only the methods below, each marked by
:func:`rapid_vmm.rpc.remotable`, are reachable; the manager, its
configuration and its helpers are not. Each method validates its
arguments (:mod:`rapid_vmm.validation`) and hands on to the manager; bad
input is :class:`~rapid_vmm.exception.InvalidRequest`, logged once without
a traceback, and changes nothing.
"""

from oslo_log import log as logging
import oslo_messaging as messaging

from rapid_vmm import exception
from rapid_vmm import rpc
from rapid_vmm import validation

LOG = logging.getLogger(__name__)

#: The methods of the VMM API, version 1.0 (SPEC 4).
API_METHODS = ('start_vm', 'resume_vm', 'suspend_vm', 'remove_vm',
               'get_vm_info', 'get_vm_usage', 'change_flavor',
               'confirm_flavor', 'as_register', 'as_confirm', 'as_notify',
               'deregister_vm', 'get_host_status')


def _ctxt(context) -> dict:
    """The request context as a plain dict (its request id travels on)."""
    if hasattr(context, 'to_dict'):
        return context.to_dict()
    return dict(context) if isinstance(context, dict) else {}


class VmmEndpoint:
    """Serves the VMM API (topic ``vmm_topic``, server ``host``).

    API version history:

    * 1.0 - start_vm, resume_vm, suspend_vm, remove_vm, get_vm_info,
      get_vm_usage, change_flavor, confirm_flavor, as_register, as_confirm,
      as_notify, deregister_vm, get_host_status

    :param manager: the :class:`rapid_vmm.manager.VmmManager`.
    :param protocol: how callers reach this endpoint (``rpc`` or
        ``legacy``); recorded as the AS's protocol by ``as_register``, so
        the AS is told of a resize the way it registered.
    """

    target = messaging.Target(version=rpc.API_VERSION)

    def __init__(self, manager, protocol: str = 'rpc'):
        self.__manager = manager
        self.__protocol = protocol
        #: The legacy front end logs each refusal itself, with the peer's
        #: address: one line per refused request, not two.
        self.log_refusals = protocol == 'rpc'

    @rpc.remotable
    def start_vm(self, ctxt, *, user_id, os_type, vcpus, memory_mb,
                 gpu_cores=0, disk_gb=0) -> dict:
        """Give the user a running VM and return its record.

        Reuses the user's running VM, resumes a suspended one, or creates
        one of the grid type the request rounds down to; waits for its IP
        and (``as_register_timeout``) for its Acceleration Server. The
        outcome is also sent to the SLAM (``vm_started`` or
        ``vm_start_failed``).
        """
        manager = self.__manager
        user_id = validation.user_id(user_id)
        try:
            os_type = validation.os_type(os_type)
            vm_type = manager.grid.round_down(
                validation.vcpus(vcpus), validation.memory_mb(memory_mb),
                validation.disk_gb(disk_gb))
            gpu_cores = validation.gpu_cores(gpu_cores,
                                             manager.conf.gpu.total_cores)
            return manager.start_vm(_ctxt(ctxt), user_id, os_type, vm_type,
                                    gpu_cores)
        except exception.RapidVmmException as exc:
            if not getattr(exc, 'slam_told', False):
                manager.lifecycle.start_refused(_ctxt(ctxt), user_id, exc)
            raise

    @rpc.remotable
    def resume_vm(self, ctxt, *, user_id) -> dict:
        """Resume the user's suspended VM; a running one is returned."""
        return self.__manager.resume_vm(_ctxt(ctxt),
                                        validation.user_id(user_id))

    @rpc.remotable
    def suspend_vm(self, ctxt, *, user_id) -> dict:
        """Suspend the user's running VM; a suspended one is returned."""
        return self.__manager.suspend_vm(_ctxt(ctxt),
                                         validation.user_id(user_id))

    @rpc.remotable
    def remove_vm(self, ctxt, *, user_id) -> None:
        """Remove the user's VM and its disk; the DS is told (status 4)."""
        self.__manager.remove_vm(_ctxt(ctxt), validation.user_id(user_id))

    @rpc.remotable
    def get_vm_info(self, ctxt, *, user_id=None) -> list:
        """Records of every VM of this host, or of one user's VM."""
        return self.__manager.get_vm_info(
            _ctxt(ctxt), validation.optional_user_id(user_id))

    @rpc.remotable
    def get_vm_usage(self, ctxt, *, resource, user_id=None) -> list:
        """Usage of ``resource`` ('cpu', 'memory', 'disk') per VM."""
        return self.__manager.get_vm_usage(
            _ctxt(ctxt), validation.resource(resource),
            validation.optional_user_id(user_id))

    @rpc.remotable
    def change_flavor(self, ctxt, *, user_id, vcpus=0, memory_mb=0,
                      disk_gb=0) -> dict:
        """Resize the user's running VM to a grid type (0 = keep a size).

        Nova completes the resize with ``confirm_flavor``; libvirt applies
        it at once within the domain's maximums and ``confirm_flavor`` only
        closes it. The VM's AS is told first.
        """
        return self.__manager.change_flavor(
            _ctxt(ctxt), validation.user_id(user_id),
            validation.vcpus(vcpus, allow_zero=True),
            validation.memory_mb(memory_mb, allow_zero=True),
            validation.disk_gb(disk_gb))

    @rpc.remotable
    def confirm_flavor(self, ctxt, *, user_id) -> dict:
        """Confirm the user's last resize; idempotent."""
        return self.__manager.confirm_flavor(_ctxt(ctxt),
                                             validation.user_id(user_id))

    @rpc.remotable
    def as_register(self, ctxt, *, ip_address) -> dict:
        """Tell an Acceleration Server which user its VM (by IP) serves."""
        return self.__manager.as_register(
            _ctxt(ctxt), validation.ip_address(ip_address),
            protocol=self.__protocol)

    @rpc.remotable
    def as_confirm(self, ctxt, *, user_id, ready=True) -> None:
        """The Acceleration Server of the user's VM is ready (or not)."""
        self.__manager.as_confirm(_ctxt(ctxt), validation.user_id(user_id),
                                  validation.boolean('ready', ready))

    @rpc.remotable
    def as_notify(self, ctxt, *, user_id, action) -> None:
        """The Acceleration Server asks to suspend or remove its VM."""
        self.__manager.as_notify(_ctxt(ctxt), validation.user_id(user_id),
                                 validation.as_action(action))

    @rpc.remotable
    def deregister_vm(self, ctxt, *, user_id) -> None:
        """The DS deregistered the user: remove the user's VM."""
        self.__manager.deregister_vm(_ctxt(ctxt),
                                     validation.user_id(user_id))

    @rpc.remotable
    def get_host_status(self, ctxt) -> dict:
        """The latest host sample and every VM record; samples nothing."""
        return self.__manager.get_host_status(_ctxt(ctxt))
