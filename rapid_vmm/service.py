"""The rapid-vmm oslo.service service and the process that runs it.

Start-up follows SPEC section 1: open the state (checking that it is this
host's) and reconcile with the hypervisor (in :meth:`VmmManager.init_host`),
then serve the VMM API (:class:`rapid_vmm.endpoint.VmmEndpoint`, nothing
else) while a background thread registers with the DS and the SLAM
(retrying as long as they are absent), a timer reports host resources every
``report_interval`` seconds, the outbox delivers messages to the peers, and
a loop reconciles every ``reconcile_interval`` seconds or when a hypervisor
event asks for it.

:class:`Launcher` runs the service in this one process (a host agent has
one worker; no master process to respawn it): SIGTERM and SIGINT stop it
within ``graceful_shutdown_timeout``, SIGHUP re-reads the mutable options
(log levels), and a start-up failure (state that cannot be opened, a
``host`` that is not the state's, a configuration the driver refuses) ends
the process with a non-zero exit instead of a respawn loop.
"""

import os
import signal
import threading
import time

from oslo_config import cfg
from oslo_log import log as logging
import oslo_messaging as messaging
from oslo_service import service
from oslo_service import systemd

from rapid_vmm import diagnostics
from rapid_vmm import endpoint as vmm_endpoint
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
        self.endpoint: vmm_endpoint.VmmEndpoint | None = None
        self.rpc_server = None
        self.transport = None
        self.legacy_server = None
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
            ds_api=ds_api, slam_api=slam_api, transport=transport)
        built.append(manager)
        return manager

    def start(self) -> None:
        """Start serving; raises when the agent cannot start at all."""
        super().start()
        conf = self.conf
        self.transport = rpc.get_transport(conf)
        self.manager = self.build_manager(self.transport)
        # Versioned notifications of VM state changes and host reports.
        manager = self.manager
        self.notifier = notifications.VmNotifier(
            conf, vmm_id=lambda: manager.reporter.vmm_id)
        self.manager.notifier = self.notifier
        self.manager.init_host()
        self.endpoint = vmm_endpoint.VmmEndpoint(self.manager)
        target = messaging.Target(topic=conf.vmm_topic, server=conf.host)
        self.rpc_server = rpc.get_server(conf, self.transport, target,
                                         [self.endpoint],
                                         conf.max_concurrent_requests,
                                         explicit=True)
        self.rpc_server.start()
        if conf.legacy.enabled:
            # The original RAPID TCP protocol, over the same API (its own
            # endpoint: an AS that registers there is told over it).
            from rapid_vmm.legacy import server as legacy_server
            self.legacy_server = legacy_server.LegacyServer(
                conf, vmm_endpoint.VmmEndpoint(self.manager,
                                               protocol='legacy'))
            self.legacy_server.start()
        # The agent's section of the Guru Meditation report (SIGUSR2).
        diagnostics.set_source(manager.diagnostics)
        # Prometheus metrics, off unless [metrics] enabled.
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
        diagnostics.set_source(None)
        if self.metrics is not None:
            self.metrics.stop()
        if self.manager is not None:
            self.manager.stop()
        if self.legacy_server is not None:
            self.legacy_server.stop()
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
        self.notifier.stop()
        if self.manager is not None:
            try:
                self.manager.cleanup_host()
            except Exception:
                LOG.exception('Releasing the driver and the state failed')
        if self.transport is not None:
            self.transport.cleanup()
        self._stopped.set()
        LOG.info('rapid-vmm stopped')

    def wait(self) -> None:
        self._stopped.wait()


class Launcher:
    """Runs one service in this process until SIGTERM or SIGINT.

    :param conf: the parsed configuration (``graceful_shutdown_timeout``
        bounds the stop; SIGHUP calls ``conf.mutate_config_files()``).
    """

    def __init__(self, conf: cfg.ConfigOpts, agent: service.ServiceBase):
        self.conf = conf
        self.agent = agent
        self._stop_requested = threading.Event()
        self._reload_requested = threading.Event()

    def _on_stop_signal(self, signum, frame) -> None:
        self._stop_requested.set()

    def _on_reload_signal(self, signum, frame) -> None:
        self._reload_requested.set()

    def request_stop(self) -> None:
        self._stop_requested.set()

    def run(self) -> int:
        """Start the service, serve until asked to stop; returns 0.

        Exceptions of the service's ``start()`` propagate (the caller
        reports them and exits non-zero), after what was started has been
        stopped.
        """
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_stop_signal)
            signal.signal(signal.SIGINT, self._on_stop_signal)
            signal.signal(signal.SIGHUP, self._on_reload_signal)
        try:
            self.agent.start()
        except BaseException:
            self._stop_bounded()
            raise
        systemd.notify_once()
        while not self._stop_requested.wait(1):
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                LOG.info('SIGHUP: reloading the mutable options')
                try:
                    self.conf.mutate_config_files()
                except Exception:
                    LOG.exception('Reloading the configuration failed')
        LOG.info('Stop requested')
        self._stop_bounded()
        return 0

    def _stop_bounded(self) -> None:
        timeout = self.conf.graceful_shutdown_timeout or 0
        started = time.monotonic()
        if timeout:
            watchdog = threading.Timer(timeout, self._exit_now, args=(
                timeout,))
            watchdog.daemon = True
            watchdog.start()
        try:
            self.agent.stop()
        finally:
            if timeout:
                watchdog.cancel()
        LOG.debug('Stopped in %.1f s', time.monotonic() - started)

    @staticmethod
    def _exit_now(timeout: float) -> None:
        LOG.error('Graceful stop took longer than %s s '
                  '(graceful_shutdown_timeout); exiting now', timeout)
        os._exit(1)
