"""Client classes of the APIs rapid-vmm calls: the DS and the SLAM.

Each follows Nova's ``rpcapi`` pattern: a target on the peer's topic, a
version cap, and one method per remote method with the same name and
arguments. Calls and casts retry a broken broker connection only
:data:`rapid_vmm.rpc.PEER_RETRY` times, so an absent broker or peer never
blocks the agent for long; callers handle the errors.
"""

from typing import Any

from oslo_config import cfg
import oslo_messaging as messaging

from rapid_vmm import rpc


class _PeerAPI:
    """A client of one peer's topic, with bounded retries and timeout."""

    VERSION = '1.0'

    def __init__(self, conf: cfg.ConfigOpts, transport: messaging.Transport,
                 topic: str):
        target = messaging.Target(topic=topic, version=self.VERSION)
        self.timeout = conf.peer_call_timeout
        self.client = rpc.get_client(transport, target, self.VERSION,
                                     timeout=self.timeout)

    def _prepare(self):
        return self.client.prepare(retry=rpc.PEER_RETRY,
                                   timeout=self.timeout)


class DirectoryServerAPI(_PeerAPI):
    """Client of the Directory Server API (topic ``ds_topic``).

    API version history:

    * 1.0 - register_vmm, notify_vmm, register_vm, notify_vm, notify_helper
    """

    def __init__(self, conf: cfg.ConfigOpts, transport: messaging.Transport):
        super().__init__(conf, transport, conf.ds_topic)

    def register_vmm(self, ctxt: dict, host: str, ip_address: str,
                     mac_type: int, cpu_load: float, cpu_count: int,
                     free_memory_mb: int, gpu_load: float | None,
                     gpu_cores: int, resources: dict) -> dict:
        return self._prepare().call(
            ctxt, 'register_vmm', host=host, ip_address=ip_address,
            mac_type=mac_type, cpu_load=cpu_load, cpu_count=cpu_count,
            free_memory_mb=free_memory_mb, gpu_load=gpu_load,
            gpu_cores=gpu_cores, resources=resources)

    def notify_vmm(self, ctxt: dict, vmm_id: int, cpu_load: float,
                   free_memory_mb: int, gpu_load: float | None,
                   resources: dict) -> None:
        self._prepare().cast(
            ctxt, 'notify_vmm', vmm_id=vmm_id, cpu_load=cpu_load,
            free_memory_mb=free_memory_mb, gpu_load=gpu_load,
            resources=resources)

    def register_vm(self, ctxt: dict, vmm_id: int, category: int,
                    vm_type: int, user_id: int, status: int) -> dict:
        return self._prepare().call(
            ctxt, 'register_vm', vmm_id=vmm_id, category=category,
            vm_type=vm_type, user_id=user_id, status=status)

    def notify_vm(self, ctxt: dict, vm_id: int, status: int) -> None:
        self._prepare().cast(ctxt, 'notify_vm', vm_id=vm_id, status=status)

    def notify_helper(self, ctxt: dict, vm_id: int, ip_address: str) -> None:
        self._prepare().cast(ctxt, 'notify_helper', vm_id=vm_id,
                             ip_address=ip_address)


class SlaManagerAPI(_PeerAPI):
    """Client of the SLA Manager API (topic ``slam_topic``).

    Messages go to the topic, not to one server: whichever SLAM listens on
    ``slam_topic`` receives them. The SLAM address the DS hands out is kept
    for the legacy protocol.

    API version history:

    * 1.0 - register_vmm, vm_started, vm_start_failed
    """

    def __init__(self, conf: cfg.ConfigOpts, transport: messaging.Transport):
        super().__init__(conf, transport, conf.slam_topic)

    def register_vmm(self, ctxt: dict, host: str, vmm_id: int,
                     ip_address: str) -> Any:
        return self._prepare().call(ctxt, 'register_vmm', host=host,
                                    vmm_id=vmm_id, ip_address=ip_address)

    def vm_started(self, ctxt: dict, host: str, vm: dict) -> None:
        self._prepare().cast(ctxt, 'vm_started', host=host, vm=vm)

    def vm_start_failed(self, ctxt: dict, host: str, user_id: int,
                        error: str, error_class: str) -> None:
        self._prepare().cast(ctxt, 'vm_start_failed', host=host,
                             user_id=user_id, error=error,
                             error_class=error_class)
