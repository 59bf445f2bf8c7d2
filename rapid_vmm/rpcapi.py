"""Client of the VMM API, for the SLAM, the DS, the AS, tools and tests.

Usage::

    api = rpcapi.VmmAPI(conf, transport, host='compute-1')
    vm = api.start_vm({}, user_id=7, os_type=0, vcpus=2, memory_mb=2048)

Lifecycle methods call by default and return the result; pass
``wait=False`` to cast instead (the outcome of a cast ``start_vm`` reaches
the SLAM through ``vm_started`` / ``vm_start_failed``).
"""

from typing import Any

from oslo_config import cfg
import oslo_messaging as messaging

from rapid_vmm import rpc


class VmmAPI:
    """Client of the VMM API (topic ``vmm_topic``, server = VMM host).

    API version history:

    * 1.0 - start_vm, resume_vm, suspend_vm, remove_vm, get_vm_info,
      get_vm_usage, change_flavor, confirm_flavor, as_register, as_confirm,
      as_notify, deregister_vm, get_host_status
    """

    VERSION = '1.0'

    def __init__(self, conf: cfg.ConfigOpts, transport: messaging.Transport,
                 host: str | None = None, timeout: float | None = None,
                 version_cap: str = VERSION, retry: int | None = None):
        self.host = host or conf.host
        #: Broker reconnections a cast or call may make (None: forever,
        #: oslo.messaging's default; a call's timeout does not bound them).
        self.retry = retry
        target = messaging.Target(topic=conf.vmm_topic, server=self.host,
                                  version=self.VERSION)
        #: Lifecycle calls wait for the IP and the AS: allow for both.
        self.lifecycle_timeout = timeout or (
            conf.as_register_timeout + conf.libvirt.ip_timeout + 60)
        self.query_timeout = timeout or 60
        self.client = rpc.get_client(transport, target, version_cap,
                                     timeout=self.query_timeout)

    def _lifecycle(self, ctxt: dict, method: str, wait: bool,
                   **kwargs: Any) -> Any:
        cctxt = self.client.prepare(timeout=self.lifecycle_timeout,
                                    retry=self.retry)
        if wait:
            return cctxt.call(ctxt, method, **kwargs)
        cctxt.cast(ctxt, method, **kwargs)
        return None

    def _query(self, ctxt: dict, method: str, **kwargs: Any) -> Any:
        return self.client.prepare(timeout=self.query_timeout,
                                   retry=self.retry).call(ctxt, method,
                                                          **kwargs)

    def start_vm(self, ctxt: dict, user_id: int, os_type: int, vcpus: int,
                 memory_mb: int, gpu_cores: int = 0, disk_gb: int = 0,
                 wait: bool = True) -> dict | None:
        return self._lifecycle(ctxt, 'start_vm', wait, user_id=user_id,
                               os_type=os_type, vcpus=vcpus,
                               memory_mb=memory_mb, gpu_cores=gpu_cores,
                               disk_gb=disk_gb)

    def resume_vm(self, ctxt: dict, user_id: int,
                  wait: bool = True) -> dict | None:
        return self._lifecycle(ctxt, 'resume_vm', wait, user_id=user_id)

    def suspend_vm(self, ctxt: dict, user_id: int,
                   wait: bool = True) -> dict | None:
        return self._lifecycle(ctxt, 'suspend_vm', wait, user_id=user_id)

    def remove_vm(self, ctxt: dict, user_id: int, wait: bool = True) -> None:
        return self._lifecycle(ctxt, 'remove_vm', wait, user_id=user_id)

    def get_vm_info(self, ctxt: dict, user_id: int | None = None) -> list:
        return self._query(ctxt, 'get_vm_info', user_id=user_id)

    def get_vm_usage(self, ctxt: dict, resource: str,
                     user_id: int | None = None) -> list:
        return self._query(ctxt, 'get_vm_usage', resource=resource,
                           user_id=user_id)

    def change_flavor(self, ctxt: dict, user_id: int, vcpus: int = 0,
                      memory_mb: int = 0, disk_gb: int = 0,
                      wait: bool = True) -> dict | None:
        return self._lifecycle(ctxt, 'change_flavor', wait, user_id=user_id,
                               vcpus=vcpus, memory_mb=memory_mb,
                               disk_gb=disk_gb)

    def confirm_flavor(self, ctxt: dict, user_id: int,
                       wait: bool = True) -> dict | None:
        return self._lifecycle(ctxt, 'confirm_flavor', wait, user_id=user_id)

    def as_register(self, ctxt: dict, ip_address: str) -> dict:
        return self._query(ctxt, 'as_register', ip_address=ip_address)

    def as_confirm(self, ctxt: dict, user_id: int, ready: bool = True,
                   wait: bool = True) -> None:
        return self._lifecycle(ctxt, 'as_confirm', wait, user_id=user_id,
                               ready=ready)

    def as_notify(self, ctxt: dict, user_id: int, action: str) -> None:
        self.client.prepare(retry=self.retry).cast(
            ctxt, 'as_notify', user_id=user_id, action=action)

    def deregister_vm(self, ctxt: dict, user_id: int) -> None:
        self.client.prepare(retry=self.retry).cast(
            ctxt, 'deregister_vm', user_id=user_id)

    def get_host_status(self, ctxt: dict) -> dict:
        return self._query(ctxt, 'get_host_status')
