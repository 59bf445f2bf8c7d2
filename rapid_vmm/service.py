"""The rapid-vmm oslo.service service: RPC server, timers, graceful stop.

Start-up follows SPEC section 1: restore state and reconcile with the
hypervisor (in :meth:`VmmManager.init_host`), then serve the VMM API while
a background thread registers with the DS and the SLAM (retrying as long as
they are absent), a timer reports host resources every
``report_interval`` seconds, and a loop reconciles every
``reconcile_interval`` seconds or when a hypervisor event asks for it.
"""

import threading
import time

from oslo_config import cfg
from oslo_log import log as logging
import oslo_messaging as messaging
from oslo_service import service

from rapid_vmm import diagnostics
from rapid_vmm import manager as vmm_manager
from rapid_vmm import metrics
from rapid_vmm import monitor
from rapid_vmm import notifications
from rapid_vmm import peers
from rapid_vmm import rpc
from rapid_vmm import state
from rapid_vmm.virt import driver as virt_driver

LOG = logging.getLogger(__name__)

#: Seconds between two passes retiring idle RPC worker threads.
POOL_MAINTENANCE_INTERVAL = 10


class VmmService(service.Service):
    """The VM Manager agent of one host."""

    def __init__(self, conf: cfg.ConfigOpts):
        super().__init__()
        self.conf = conf
        self.manager: vmm_manager.VmmManager | None = None
        self.rpc_server = None
        self.transport = None
        self.notifier = notifications.NULL
        self.metrics: metrics.MetricsServer | None = None
        self._stopped = threading.Event()

    def build_manager(self, transport) -> vmm_manager.VmmManager:
        """Assemble the manager from the configured parts."""
        conf = self.conf
        built: list[vmm_manager.VmmManager] = []
        ds_api, slam_api = peers.load(
            conf, transport, lambda: built[0].reporter.identity)
        manager = vmm_manager.VmmManager(
            conf,
            driver=virt_driver.load_driver(conf),
            store=state.StateStore(conf.data_path),
            monitor=monitor.ResourceMonitor(conf),
            ds_api=ds_api, slam_api=slam_api)
        built.append(manager)
        return manager

    def start(self) -> None:
        super().start()
        conf = self.conf
        self.transport = rpc.get_transport(conf)
        self.manager = self.build_manager(self.transport)
        # ops (issue 10.5): versioned notifications of VM state changes
        # and host reports; the lifecycle calls notifier.vm_changed().
        manager = self.manager
        self.notifier = notifications.VmNotifier(
            conf, vmm_id=lambda: manager.reporter.vmm_id)
        self.manager.notifier = self.notifier
        self.manager.init_host()
        target = messaging.Target(topic=conf.vmm_topic, server=conf.host)
        self.rpc_server = rpc.get_server(conf, self.transport, target,
                                         [self.manager],
                                         conf.max_concurrent_requests)
        self.rpc_server.start()
        # ops (issue 10.3): the agent's section of the Guru Meditation
        # report; the lead's manager.diagnostics() replaces the stand-in.
        diagnostics.set_source(
            getattr(manager, 'diagnostics', None) or
            (lambda: diagnostics.manager_diagnostics(manager)))
        # ops (issue 10.4): Prometheus metrics, off unless [metrics] enabled.
        self.metrics = metrics.start(
            conf, host_status=lambda: manager.get_host_status({}),
            vm_usage=lambda resource: manager.get_vm_usage(
                {}, resource=resource),
            grid=[vm_type.as_list() for vm_type in manager.grid.types])
        LOG.info('rapid-vmm serving topic %s as server %s with the %s '
                 'driver', conf.vmm_topic, conf.host,
                 self.manager.driver.name)
        self.tg.add_timer_args(conf.report_interval,
                               self.manager.periodic_report,
                               initial_delay=0, stop_on_exception=False)
        self.tg.add_timer_args(POOL_MAINTENANCE_INTERVAL, rpc.maintain_pools,
                               initial_delay=POOL_MAINTENANCE_INTERVAL,
                               stop_on_exception=False)
        self.tg.add_thread(self.manager.ensure_helpers)
        self.tg.add_thread(self.manager.run_registration)
        self.tg.add_thread(self.manager.run_reconcile_loop)

    def stop(self, graceful: bool = False) -> None:
        """Stop serving, let in-flight requests end, release everything."""
        if self._stopped.is_set():
            return
        LOG.info('rapid-vmm stopping')
        diagnostics.set_source(None)  # ops (issue 10.3)
        if self.metrics is not None:  # ops (issue 10.4)
            self.metrics.stop()
        if self.manager is not None:
            self.manager.stop()
        if self.rpc_server is not None:
            try:
                self.rpc_server.stop()
                self.rpc_server.wait()
            except Exception:
                LOG.exception('Stopping the RPC server failed')
        try:
            super().stop(graceful)
        except Exception:
            LOG.exception('Stopping the timers failed')
        self.notifier.stop()  # ops (issue 10.5)
        if self.manager is not None:
            self.manager.cleanup_host()
        if self.transport is not None:
            self.transport.cleanup()
        self._stopped.set()
        LOG.info('rapid-vmm stopped')

    def _stop_background(self, timeout: float) -> None:
        """Stop the timers and give the loops ``timeout`` s to notice."""
        try:
            self.tg.stop_timers(wait=False)
        except Exception:
            LOG.exception('Stopping the timers failed')
        deadline = time.monotonic() + timeout
        for thread in list(self.tg.threads):
            thread.join(max(deadline - time.monotonic(), 0))

    def wait(self) -> None:
        self._stopped.wait()
