"""Peer mode: the DS and SLAM clients over the original protocol.

``peer_protocol = legacy`` (SPEC section 7): the agent talks to the
original Java Directory Server at ``[legacy] ds_host``:``ds_port`` and to
the original SLAM at the address the DS returned at registration. These
classes implement :class:`rapid_vmm.peers.DirectoryServer` and
:class:`rapid_vmm.peers.SlaManager`, the interface the RPC clients
implement too, so the reporter and the outbox do not know which protocol
runs.

One connection per message, as the originals do, every step bounded by
``peer_reply_timeout`` (connecting: ``peer_call_timeout``). What the
original DS does, and what it means here:

* ``VMM_REGISTER``: ERROR until a SLAM has registered with the DS, and to
  a second registration from an IP it knows -> ``PeerRejected`` (the
  caller retries with back-off; a VMM must keep its id);
* ``VM_REGISTER``: the reply is a bare long (no status byte);
* ``VMM_NOTIFY``, ``VM_NOTIFY``, ``HELPER_NOTIFY``: no reply; the DS closes
  the connection once it handled the message, and that close is the
  acknowledgement (no close in time -> ``PeerUnavailable``).

The SLAM has no message for the outcome of a start (it gets the reply on
its own ``SLAM_START_VM_VMM`` connection): ``vm_started`` and
``vm_start_failed`` do nothing.
"""

from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from rapid_vmm import capacity
from rapid_vmm import exception
from rapid_vmm import flavors
from rapid_vmm import peers
from rapid_vmm.legacy import client
from rapid_vmm.legacy import codec

LOG = logging.getLogger(__name__)


class _LegacyPeer:

    peer = 'peer'

    def __init__(self, conf: cfg.ConfigOpts):
        self.conf = conf
        self.limits = codec.Limits.from_conf(conf)

    def _exchange(self, method: str, address: tuple[str, int] | None,
                  frame: bytes, read_reply=None) -> Any:
        if address is None or not address[0]:
            raise exception.PeerUnavailable(
                peer=self.peer, method=method,
                reason='its address is not known yet')
        return client.exchange(self.peer, method, address, frame,
                               self.conf.peer_reply_timeout, read_reply,
                               self.limits,
                               connect_timeout=self.conf.peer_call_timeout)

    def _reject(self, method: str, reason: str) -> exception.PeerRejected:
        return exception.PeerRejected(peer=self.peer, method=method,
                                      reason=reason)

    def close(self) -> None:
        """Nothing to release: each message has its own connection."""


class DirectoryServerClient(_LegacyPeer, peers.DirectoryServer):
    """The original Java DS (``[legacy] ds_host``, ``ds_port``)."""

    peer = 'DS'

    def __init__(self, conf: cfg.ConfigOpts):
        super().__init__(conf)
        self.grid = flavors.parse_grid(conf.vm_types)

    @property
    def address(self) -> tuple[str, int] | None:
        host = self.conf.legacy.ds_host
        return (host, self.conf.legacy.ds_port) if host else None

    def register_vmm(self, ctxt: dict, host: str, ip_address: str,
                     mac_type: int, cpu_load: float | None, cpu_count: int,
                     free_memory_mb: int, gpu_load: float | None,
                     gpu_cores: int, resources: dict) -> dict:
        available = capacity.legacy_available_types(
            self.grid, (resources or {}).get('available_types') or [])
        frame = codec.encode_request(
            codec.VMM_REGISTER_DS, ip_address=ip_address or '',
            mac_type=client.java_int(mac_type),
            cpu_load=client.java_int(cpu_load),
            cpu_count=client.java_int(cpu_count),
            free_memory_mb=client.java_long(free_memory_mb),
            gpu_load=client.java_int(gpu_load),
            gpu_cores=client.java_int(gpu_cores),
            available_types=available)

        def reply(reader: codec.Reader) -> dict:
            status = reader.read_byte()
            if status != codec.OK:
                raise self._reject(
                    'register_vmm',
                    'the DS answered ERROR (it does until a SLAM has '
                    'registered with it, and to a second registration '
                    f'from {ip_address})' if status == codec.ERROR else
                    f'the DS answered status {status}')
            vmm_id = reader.read_long()
            slam_host = reader.read_utf()
            slam_port = reader.read_int()
            if vmm_id <= 0:
                raise self._reject('register_vmm', f'VMM id {vmm_id}')
            return {'vmm_id': vmm_id, 'slam_host': slam_host or None,
                    'slam_port': slam_port if 0 < slam_port < 65536
                    else None}

        return self._exchange('register_vmm', self.address, frame, reply)

    def notify_vmm(self, ctxt: dict, vmm_id: int, cpu_load: float | None,
                   free_memory_mb: int, gpu_load: float | None,
                   resources: dict) -> None:
        frame = codec.encode_request(
            codec.VMM_NOTIFY_DS, vmm_id=client.java_long(vmm_id),
            cpu_load=client.java_int(cpu_load),
            free_memory_mb=client.java_long(free_memory_mb),
            gpu_load=client.java_int(gpu_load))
        self._exchange('notify_vmm', self.address, frame)

    def register_vm(self, ctxt: dict, vmm_id: int, category: int,
                    vm_type: int, user_id: int, status: int) -> dict:
        frame = codec.encode_request(
            codec.VM_REGISTER_DS, vmm_id=client.java_long(vmm_id),
            category=client.java_int(category),
            vm_type=client.java_int(vm_type),
            user_id=client.java_long(user_id),
            status=client.java_int(status))

        def reply(reader: codec.Reader) -> dict:
            vm_id = reader.read_long()
            if vm_id <= 0:
                raise self._reject('register_vm', f'VM id {vm_id}')
            return {'vm_id': vm_id}

        return self._exchange('register_vm', self.address, frame, reply)

    def notify_vm(self, ctxt: dict, vm_id: int, status: int) -> None:
        frame = codec.encode_request(
            codec.VM_NOTIFY_DS, vm_id=client.java_long(vm_id),
            status=client.java_int(status))
        self._exchange('notify_vm', self.address, frame)

    def notify_helper(self, ctxt: dict, vm_id: int, ip_address: str) -> None:
        frame = codec.encode_request(
            codec.HELPER_NOTIFY_DS, vm_id=client.java_long(vm_id),
            ip_address=ip_address or '')
        self._exchange('notify_helper', self.address, frame)


class SlaManagerClient(_LegacyPeer, peers.SlaManager):
    """The original SLAM, at the address the DS gave at registration.

    :param identity: returns the agent's identity (``slam_host``,
        ``slam_port``), read at each call.
    """

    peer = 'SLAM'

    def __init__(self, conf: cfg.ConfigOpts, identity: peers.IdentitySource):
        super().__init__(conf)
        self._identity = identity

    @property
    def address(self) -> tuple[str, int] | None:
        identity = self._identity() or {}
        host, port = identity.get('slam_host'), identity.get('slam_port')
        return (host, port) if host and port else None

    def register_vmm(self, ctxt: dict, host: str, vmm_id: int,
                     ip_address: str) -> bool:
        frame = codec.encode_request(
            codec.VMM_REGISTER_SLAM, ip_address=ip_address or '',
            port=self.conf.legacy.port)

        def reply(reader: codec.Reader) -> bool:
            status = reader.read_byte()
            if status != codec.OK:
                raise self._reject('register_vmm',
                                   f'the SLAM answered status {status}')
            return True

        return self._exchange('register_vmm', self.address, frame, reply)

    def vm_started(self, ctxt: dict, host: str, vm: dict) -> None:
        """No original message: the SLAM has the reply to its START_VM."""

    def vm_start_failed(self, ctxt: dict, host: str, user_id: int,
                        error: str, error_class: str) -> None:
        """No original message: the SLAM has the ERROR of its START_VM."""
