"""The DS and SLAM clients over oslo.messaging (``peer_protocol = rpc``).

Each follows Nova's ``rpcapi`` pattern: a target on the peer's topic, a
version cap, and one method per remote method with the same name and
arguments. Every call retries a broken broker connection only
:data:`rapid_vmm.rpc.PEER_RETRY` times and waits at most
``peer_reply_timeout`` seconds, so an absent broker or peer never blocks the
agent for long.

The messages that must arrive (``notify_vm``, ``notify_helper``,
``vm_started``, ``vm_start_failed``) are sent as calls: the peer's endpoint
is the same as for a cast, and its reply is the acknowledgement the outbox
needs (a cast to a queue that does not exist yet, as after a broker
restart, is dropped without a word). The periodic ``notify_vmm`` report is
a cast: a lost one is superseded ``report_interval`` seconds later.
"""

from typing import Any

from oslo_config import cfg
import oslo_messaging as messaging

from rapid_vmm import exception
from rapid_vmm import peers
from rapid_vmm import rpc


class _PeerAPI:
    """A client of one peer's topic, with bounded retries and timeout."""

    VERSION = '1.0'
    peer = 'peer'

    def __init__(self, conf: cfg.ConfigOpts, transport: messaging.Transport,
                 topic: str):
        target = messaging.Target(topic=topic, version=self.VERSION)
        self.timeout = conf.peer_reply_timeout
        self.client = rpc.get_client(transport, target, self.VERSION,
                                     timeout=self.timeout)

    def _prepare(self):
        return self.client.prepare(retry=rpc.PEER_RETRY,
                                   timeout=self.timeout)

    def _call(self, ctxt: dict, method: str, **kwargs: Any) -> Any:
        try:
            return self._prepare().call(ctxt, method, **kwargs)
        except Exception as exc:
            raise _translate(self.peer, method, exc) from exc

    def _cast(self, ctxt: dict, method: str, **kwargs: Any) -> None:
        try:
            self._prepare().cast(ctxt, method, **kwargs)
        except Exception as exc:
            raise _translate(self.peer, method, exc) from exc

    def close(self) -> None:
        """Nothing to release: the transport belongs to the service."""


def _translate(peer: str, method: str,
               exc: Exception) -> exception.RapidVmmException:
    """The peer error of an oslo.messaging failure."""
    if isinstance(exc, messaging.RemoteError):
        return exception.PeerRejected(
            peer=peer, method=method,
            reason=f'{exc.exc_type}: {exc.value}'[:300])
    if isinstance(exc, (messaging.MessagingException, OSError)):
        return exception.PeerUnavailable(
            peer=peer, method=method,
            reason=f'{type(exc).__name__}: {exc}'[:300])
    # A peer's typed error rebuilt on our side (allowed_remote_exmods).
    return exception.PeerRejected(peer=peer, method=method,
                                  reason=f'{type(exc).__name__}: {exc}'[:300])


class DirectoryServerAPI(_PeerAPI, peers.DirectoryServer):
    """Client of the Directory Server API (topic ``ds_topic``).

    API version history:

    * 1.0 - register_vmm, notify_vmm, register_vm, notify_vm, notify_helper
    """

    peer = 'DS'

    def __init__(self, conf: cfg.ConfigOpts, transport: messaging.Transport):
        super().__init__(conf, transport, conf.ds_topic)

    def register_vmm(self, ctxt: dict, host: str, ip_address: str,
                     mac_type: int, cpu_load: float | None, cpu_count: int,
                     free_memory_mb: int, gpu_load: float | None,
                     gpu_cores: int, resources: dict) -> dict:
        return self._call(
            ctxt, 'register_vmm', host=host, ip_address=ip_address,
            mac_type=mac_type, cpu_load=cpu_load, cpu_count=cpu_count,
            free_memory_mb=free_memory_mb, gpu_load=gpu_load,
            gpu_cores=gpu_cores, resources=resources)

    def notify_vmm(self, ctxt: dict, vmm_id: int, cpu_load: float | None,
                   free_memory_mb: int, gpu_load: float | None,
                   resources: dict) -> None:
        self._cast(
            ctxt, 'notify_vmm', vmm_id=vmm_id, cpu_load=cpu_load,
            free_memory_mb=free_memory_mb, gpu_load=gpu_load,
            resources=resources)

    def register_vm(self, ctxt: dict, vmm_id: int, category: int,
                    vm_type: int, user_id: int, status: int) -> dict:
        return self._call(
            ctxt, 'register_vm', vmm_id=vmm_id, category=category,
            vm_type=vm_type, user_id=user_id, status=status)

    def notify_vm(self, ctxt: dict, vm_id: int, status: int) -> None:
        self._call(ctxt, 'notify_vm', vm_id=vm_id, status=status)

    def notify_helper(self, ctxt: dict, vm_id: int, ip_address: str) -> None:
        self._call(ctxt, 'notify_helper', vm_id=vm_id, ip_address=ip_address)


class SlaManagerAPI(_PeerAPI, peers.SlaManager):
    """Client of the SLA Manager API (topic ``slam_topic``).

    Messages go to the topic, not to one server: whichever SLAM listens on
    ``slam_topic`` receives them. The SLAM address the DS hands out is kept
    for the legacy protocol.

    API version history:

    * 1.0 - register_vmm, vm_started, vm_start_failed
    """

    peer = 'SLAM'

    def __init__(self, conf: cfg.ConfigOpts, transport: messaging.Transport):
        super().__init__(conf, transport, conf.slam_topic)

    def register_vmm(self, ctxt: dict, host: str, vmm_id: int,
                     ip_address: str) -> Any:
        return self._call(ctxt, 'register_vmm', host=host, vmm_id=vmm_id,
                          ip_address=ip_address)

    def vm_started(self, ctxt: dict, host: str, vm: dict) -> None:
        self._call(ctxt, 'vm_started', host=host, vm=vm)

    def vm_start_failed(self, ctxt: dict, host: str, user_id: int,
                        error: str, error_class: str) -> None:
        self._call(ctxt, 'vm_start_failed', host=host, user_id=user_id,
                   error=error, error_class=error_class)
