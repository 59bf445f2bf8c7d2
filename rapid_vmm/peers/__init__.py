"""The agent's peers, the Directory Server and the SLA Manager.

One interface, two implementations chosen by ``peer_protocol``:

* ``rpc`` (:mod:`rapid_vmm.peers.rpc`): the DS and SLAM APIs of SPEC
  section 4 over oslo.messaging;
* ``legacy`` (:mod:`rapid_vmm.legacy.peers`): the original RAPID TCP
  protocol of SPEC section 7, for the original Java DS and SLAM.

Every method either returns (the peer has the message: a reply came back,
or for the original protocol the frame was written and the connection
closed cleanly) or raises one of two errors:

* :class:`rapid_vmm.exception.PeerUnavailable` - the message may not have
  arrived (no broker, no answer in time, connection refused); worth
  retrying as it is;
* :class:`rapid_vmm.exception.PeerRejected` - the peer answered with an
  error (a refusal, an unusable reply); retrying only helps once the peer
  changed its mind (the original DS refuses ``VMM_REGISTER`` until a SLAM
  registered with it).

Callers never see transport-specific exceptions. The outbox
(:mod:`rapid_vmm.outbox`) delivers the messages that must arrive; only the
periodic ``notify_vmm`` report is sent best effort.
"""

import abc
from collections.abc import Callable
from typing import Any

from oslo_config import cfg

#: ``mac_type`` the original VMM sends the DS for a Linux host.
MAC_TYPE_LINUX = 4

#: Returns the agent's persisted identity: ``vmm_id``, ``slam_host``,
#: ``slam_port`` (any may be None before registration).
IdentitySource = Callable[[], dict]


class DirectoryServer(abc.ABC):
    """What the agent sends the Directory Server (DS API of SPEC 4).

    API version history (of the RPC form):

    * 1.0 - register_vmm, notify_vmm, register_vm, notify_vm, notify_helper
    """

    @abc.abstractmethod
    def register_vmm(self, ctxt: dict, host: str, ip_address: str,
                     mac_type: int, cpu_load: float | None, cpu_count: int,
                     free_memory_mb: int, gpu_load: float | None,
                     gpu_cores: int, resources: dict) -> dict:
        """Register this VMM; returns ``{'vmm_id', 'slam_host',
        'slam_port'}`` (the SLAM's address may be None)."""

    @abc.abstractmethod
    def notify_vmm(self, ctxt: dict, vmm_id: int, cpu_load: float | None,
                   free_memory_mb: int, gpu_load: float | None,
                   resources: dict) -> None:
        """The periodic resource report (best effort: a lost one is
        superseded by the next)."""

    @abc.abstractmethod
    def register_vm(self, ctxt: dict, vmm_id: int, category: int,
                    vm_type: int, user_id: int, status: int) -> dict:
        """Register a VM; returns ``{'vm_id': int}``."""

    @abc.abstractmethod
    def notify_vm(self, ctxt: dict, vm_id: int, status: int) -> None:
        """A VM's status changed (1 started, 2 suspended, 3 resumed, 4
        stopped)."""

    @abc.abstractmethod
    def notify_helper(self, ctxt: dict, vm_id: int, ip_address: str) -> None:
        """The address of a helper VM."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; called once when the agent stops."""


class SlaManager(abc.ABC):
    """What the agent sends the SLA Manager (SLAM API of SPEC 4).

    API version history (of the RPC form):

    * 1.0 - register_vmm, vm_started, vm_start_failed
    """

    @abc.abstractmethod
    def register_vmm(self, ctxt: dict, host: str, vmm_id: int,
                     ip_address: str) -> Any:
        """Register this VMM with the SLAM."""

    @abc.abstractmethod
    def vm_started(self, ctxt: dict, host: str, vm: dict) -> None:
        """A VM record after a successful ``start_vm``."""

    @abc.abstractmethod
    def vm_start_failed(self, ctxt: dict, host: str, user_id: int,
                        error: str, error_class: str) -> None:
        """A ``start_vm`` failed with ``error`` (a typed error's class)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; called once when the agent stops."""


def load(conf: cfg.ConfigOpts, transport,
         identity: IdentitySource) -> tuple[DirectoryServer, SlaManager]:
    """The DS and SLAM clients of ``conf.peer_protocol``.

    :param transport: the agent's oslo.messaging transport (``rpc``).
    :param identity: returns the agent's identity; the legacy SLAM client
        reaches the SLAM at the address the DS gave at registration.
    """
    if conf.peer_protocol == 'legacy':
        from rapid_vmm.legacy import peers as legacy_peers
        return (legacy_peers.DirectoryServerClient(conf),
                legacy_peers.SlaManagerClient(conf, identity))
    from rapid_vmm.peers import rpc as rpc_peers
    return (rpc_peers.DirectoryServerAPI(conf, transport),
            rpc_peers.SlaManagerAPI(conf, transport))
