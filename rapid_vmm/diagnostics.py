"""Guru Meditation report (oslo.reports) of the agent, on SIGUSR2.

``kill -USR2 <pid>`` (``systemctl kill -s USR2 rapid-vmm``) makes the agent
write a report: the package, every thread with its stack, the processes, the
configuration with secrets masked (oslo.reports prints ``***`` for every
``secret=True`` option: ``transport_url``, passwords) and the agent's own
section, ``rapid-vmm agent``: the VM records with their task states, the
identity and registration, the driver's connection state and the outbox
depth, from the callable the service gives :func:`set_source`.

Where it goes is oslo.reports' ``[oslo_reports]`` group: ``log_dir`` (a file
``rapid-vmm_gurumeditation_<UTC time>`` per report; unset: stderr, i.e. the
journal), or ``file_event_handler`` (a file whose modification triggers a
report, instead of the signal).

Usage::

    diagnostics.setup(CONF)          # main(), in the main thread
    diagnostics.set_source(manager.diagnostics)   # once serving
"""

from collections.abc import Callable
import os
import threading
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging
from oslo_reports import guru_meditation_report as gmr
from oslo_reports import opts as gmr_opts
from oslo_reports.models import with_default_views as mwdv
from oslo_reports.views.text import generic as text_views

from rapid_vmm import exception
from rapid_vmm import version

LOG = logging.getLogger(__name__)

SECTION = 'rapid-vmm agent'
SERVICE_NAME = 'rapid-vmm'
#: Seconds the agent's section may take (it reads the state store).
SOURCE_TIMEOUT = 5.0

_source: Callable[[], dict] | None = None
_source_lock = threading.Lock()


class VersionInfo:
    """What oslo.reports' package section asks for."""

    @staticmethod
    def vendor_string() -> str:
        return 'rapid-vmm developers'

    @staticmethod
    def product_string() -> str:
        return 'rapid-vmm'

    @staticmethod
    def version_string_with_package() -> str:
        return version.version_string()


def set_source(source: Callable[[], dict] | None) -> None:
    """The callable giving the agent's section (a dict); None: none."""
    global _source
    with _source_lock:
        _source = source


def collect(timeout: float = SOURCE_TIMEOUT) -> dict:
    """The agent's section, read in a worker thread for at most
    ``timeout`` s: the report runs in a signal handler, in the main thread,
    and must never wait on a lock or a hypervisor."""
    with _source_lock:
        source = _source
    if source is None:
        return {'serving': False,
                'note': f'process {os.getpid()} does not serve the VMM API '
                        '(send SIGUSR2 to the process that does)'}
    outcome: dict = {}

    def run() -> None:
        try:
            outcome['data'] = source()
        except Exception as exc:  # noqa: BLE001 - reported in the section
            outcome['error'] = f'{type(exc).__name__}: {exc}'

    worker = threading.Thread(target=run, name='rapid-vmm-diagnostics',
                              daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return {'serving': True,
                'error': f'the agent section did not answer in {timeout} s'}
    if 'error' in outcome:
        return {'serving': True, 'error': outcome['error']}
    data = outcome.get('data')
    return dict(data, serving=True) if isinstance(data, dict) else {
        'serving': True, 'data': data}


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists and None as ``-``: what the text view
    prints well."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if value is None:
        return '-'
    return value


class AgentSection:
    """oslo.reports section generator of the agent's own state."""

    def __init__(self, timeout: float = SOURCE_TIMEOUT):
        self.timeout = timeout

    def __call__(self) -> mwdv.ModelWithDefaultViews:
        data = _plain(collect(self.timeout))
        vms = data.pop('vms', None)
        if isinstance(vms, list):
            # One entry per VM, named after it, so the text view keeps them
            # apart (it sorts list items and merges dicts otherwise).
            data['vms'] = {f"user {vm.get('user_id')}": vm for vm in vms
                           if isinstance(vm, dict)} or '(none)'
        return mwdv.ModelWithDefaultViews(
            data, text_view=text_views.KeyValueView(dict_sep=': ',
                                                    before_dict=''))


def register_opts(conf: cfg.ConfigOpts) -> None:
    """``[oslo_reports]`` (``log_dir``, ``file_event_handler``, ...)."""
    gmr_opts.set_defaults(conf)


def validate(conf: cfg.ConfigOpts) -> None:
    """Refuse a ``file_event_handler`` that cannot be watched (oslo.reports
    would raise at start, then in its watcher thread)."""
    register_opts(conf)
    path = conf.oslo_reports.file_event_handler
    if path and not os.access(path, os.R_OK):
        raise exception.ConfigError(
            reason=f'[oslo_reports] file_event_handler {path!r} is not a '
                   'readable file')


def setup(conf: cfg.ConfigOpts) -> None:
    """Arm the report: SIGUSR2 (or ``[oslo_reports] file_event_handler``).

    Must run in the main thread (signal handlers are installed there); the
    handler is inherited by worker processes forked afterwards.
    """
    register_opts(conf)
    if not _registered(gmr.TextGuruMeditation):
        gmr.TextGuruMeditation.register_section(SECTION, AgentSection())
    log_dir = conf.oslo_reports.log_dir
    if log_dir:
        try:
            os.makedirs(log_dir, mode=0o750, exist_ok=True)
        except OSError as exc:
            LOG.warning('Guru Meditation reports cannot go to %s (%s); they '
                        'go to stderr', log_dir, exc)
            log_dir = None
    gmr.TextGuruMeditation.setup_autorun(
        VersionInfo(), service_name=SERVICE_NAME, log_dir=log_dir or '',
        conf=conf)
    LOG.info('Guru Meditation report on %s, written to %s',
             'changes of ' + conf.oslo_reports.file_event_handler
             if conf.oslo_reports.file_event_handler else 'SIGUSR2',
             log_dir or 'stderr')


def _registered(report_class) -> bool:
    return any(title == SECTION for title, _ in
               getattr(report_class, 'persistent_sections', []))


def manager_diagnostics(manager) -> dict:
    """The agent's section from today's manager (until it offers
    ``diagnostics()``): identity and registration, driver state, VM
    records with their task states."""
    reporter = manager.reporter
    vms = []
    for vm in manager.store.list_vms():
        record = vm.to_record()
        record.update(task_state=vm.task_state or '(none)',
                      as_ready=vm.as_ready,
                      resize_pending=bool(vm.pending_resize),
                      driver_id=vm.driver_id)
        vms.append(record)
    return {
        'host': manager.conf.host,
        'identity': dict(reporter.identity),
        'registered': {'ds': reporter.vmm_id is not None,
                       'slam': reporter.slam_registered},
        'driver': {'name': manager.driver.name,
                   'reachable': manager.reconciler.driver_reachable},
        'outbox': {'depth': getattr(manager, 'outbox_depth', None)},
        'vms': vms,
    }
