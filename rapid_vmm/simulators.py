"""Simulated RAPID peers: a Directory Server, an SLA Manager and an AS.

They speak the DS and SLAM APIs of SPEC section 4 over real oslo.messaging
RPC servers, record every message they receive, and let a caller wait for
one. The demo (``rapid-vmm-demo``) and the functional tests use them to
play the rest of a RAPID cloud around one agent.
"""

from collections.abc import Callable
import itertools
import threading
import time
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging
import oslo_messaging as messaging

from rapid_vmm import rpc

LOG = logging.getLogger(__name__)


class Recorder:
    """Thread-safe log of received messages with blocking waits."""

    def __init__(self, on_message: Callable[[str, dict], None] | None = None):
        self.messages: list[tuple[float, str, dict]] = []
        self._cond = threading.Condition()
        self._on_message = on_message

    def record(self, method: str, kwargs: dict) -> None:
        with self._cond:
            self.messages.append((time.time(), method, kwargs))
            self._cond.notify_all()
        if self._on_message is not None:
            self._on_message(method, kwargs)

    def calls(self, method: str) -> list[dict]:
        with self._cond:
            return [kw for _, name, kw in self.messages if name == method]

    def wait_for(self, method: str,
                 predicate: Callable[[dict], bool] = lambda kw: True,
                 timeout: float = 30, count: int = 1) -> list[dict]:
        """Wait until ``count`` messages ``method`` match ``predicate``.

        :raises TimeoutError: naming what was received instead.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                matches = [kw for _, name, kw in self.messages
                           if name == method and predicate(kw)]
                if len(matches) >= count:
                    return matches
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = sorted({name for _, name, _ in self.messages})
                    raise TimeoutError(
                        f'{count} x {method} not received in {timeout} s '
                        f'(got {len(matches)}; seen: {seen})')
                self._cond.wait(remaining)


class _Endpoint:
    target = messaging.Target(version='1.0')

    def __init__(self, recorder: Recorder):
        self.recorder = recorder


class DirectoryServerEndpoint(_Endpoint):
    """The DS API: hands out VMM and VM ids, records notifications."""

    def __init__(self, recorder: Recorder, slam_host: str | None,
                 slam_port: int | None, first_vmm_id: int = 4242,
                 first_vm_id: int = 1000):
        super().__init__(recorder)
        self._vmm_ids = itertools.count(first_vmm_id)
        self._vm_ids = itertools.count(first_vm_id)
        self._lock = threading.Lock()
        self.slam_host = slam_host
        self.slam_port = slam_port
        #: Set to make register_vmm fail, like the original DS without SLAM.
        self.refuse_registration = False
        #: Seconds every call takes (a slow DS).
        self.delay = 0.0

    def _slow(self) -> None:
        if self.delay:
            time.sleep(self.delay)

    def register_vmm(self, ctxt, host, ip_address, mac_type, cpu_load,
                     cpu_count, free_memory_mb, gpu_load, gpu_cores,
                     resources):
        self._slow()
        self.recorder.record('register_vmm', dict(
            host=host, ip_address=ip_address, mac_type=mac_type,
            cpu_load=cpu_load, cpu_count=cpu_count,
            free_memory_mb=free_memory_mb, gpu_load=gpu_load,
            gpu_cores=gpu_cores, resources=resources))
        if self.refuse_registration:
            raise ValueError('registration refused')
        with self._lock:
            vmm_id = next(self._vmm_ids)
        return {'vmm_id': vmm_id, 'slam_host': self.slam_host,
                'slam_port': self.slam_port}

    def notify_vmm(self, ctxt, vmm_id, cpu_load, free_memory_mb, gpu_load,
                   resources):
        self._slow()
        self.recorder.record('notify_vmm', dict(
            vmm_id=vmm_id, cpu_load=cpu_load, free_memory_mb=free_memory_mb,
            gpu_load=gpu_load, resources=resources))

    def register_vm(self, ctxt, vmm_id, category, vm_type, user_id, status):
        self._slow()
        with self._lock:
            vm_id = next(self._vm_ids)
        self.recorder.record('register_vm', dict(
            vmm_id=vmm_id, category=category, vm_type=vm_type,
            user_id=user_id, status=status, vm_id=vm_id))
        return {'vm_id': vm_id}

    def notify_vm(self, ctxt, vm_id, status):
        self._slow()
        self.recorder.record('notify_vm', dict(vm_id=vm_id, status=status))

    def notify_helper(self, ctxt, vm_id, ip_address):
        self._slow()
        self.recorder.record('notify_helper',
                             dict(vm_id=vm_id, ip_address=ip_address))


class SlaManagerEndpoint(_Endpoint):
    """The SLAM API: accepts registrations, records VM outcomes."""

    def register_vmm(self, ctxt, host, vmm_id, ip_address):
        self.recorder.record('register_vmm', dict(
            host=host, vmm_id=vmm_id, ip_address=ip_address))
        return True

    def vm_started(self, ctxt, host, vm):
        self.recorder.record('vm_started', dict(host=host, vm=vm))

    def vm_start_failed(self, ctxt, host, user_id, error, error_class):
        self.recorder.record('vm_start_failed', dict(
            host=host, user_id=user_id, error=error,
            error_class=error_class))


class SimulatedPeer:
    """One simulated peer: an RPC server on ``topic`` with one endpoint."""

    def __init__(self, transport: messaging.Transport, topic: str,
                 server: str, endpoint: _Endpoint, conf: cfg.ConfigOpts):
        self.endpoint = endpoint
        self.recorder = endpoint.recorder
        target = messaging.Target(topic=topic, server=server)
        self._server = rpc.get_server(conf, transport, target, [endpoint],
                                      pool_size=16)

    def start(self) -> 'SimulatedPeer':
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()
        self._server.wait()


def directory_server(conf: cfg.ConfigOpts, transport: messaging.Transport,
                     on_message=None, slam_host: str | None = 'slam',
                     slam_port: int | None = 9002) -> SimulatedPeer:
    endpoint = DirectoryServerEndpoint(Recorder(on_message), slam_host,
                                       slam_port)
    return SimulatedPeer(transport, conf.ds_topic, 'ds', endpoint, conf)


def sla_manager(conf: cfg.ConfigOpts, transport: messaging.Transport,
                on_message=None) -> SimulatedPeer:
    endpoint = SlaManagerEndpoint(Recorder(on_message))
    return SimulatedPeer(transport, conf.slam_topic, 'slam', endpoint, conf)


def acceleration_server_handshake(vmm_api, ip_address: str,
                                  ready: bool = True) -> int:
    """Play an AS booting in the VM at ``ip_address``: register, confirm.

    Returns the user id the VMM assigned.
    """
    reply: Any = vmm_api.as_register({}, ip_address=ip_address)
    user_id = reply['user_id']
    vmm_api.as_confirm({}, user_id=user_id, ready=ready)
    return user_id
