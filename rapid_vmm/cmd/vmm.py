"""``rapid-vmm``: the VM Manager agent."""

import sys

from oslo_service import backend

backend.init_backend(backend.BackendType.THREADING)

from oslo_config import cfg  # noqa: E402 - after the backend is chosen
from oslo_log import log as logging  # noqa: E402
from oslo_service import opts as service_opts  # noqa: E402

from rapid_vmm import config_check  # noqa: E402
from rapid_vmm import diagnostics  # noqa: E402
from rapid_vmm import exception  # noqa: E402
from rapid_vmm import service as vmm_service  # noqa: E402
from rapid_vmm import version  # noqa: E402
from rapid_vmm.conf import CONF  # noqa: E402
from rapid_vmm.conf import opts as conf_opts  # noqa: E402

LOG = logging.getLogger(__name__)

#: Exit status of a configuration the agent cannot use.
EXIT_CONFIG = 2
#: Exit status of an agent that could not start (state, identity, driver).
EXIT_START = 1


def parse_config(argv: list[str], conf: cfg.ConfigOpts = CONF) -> None:
    """Parse the command line and config files into ``conf``."""
    logging.register_options(conf)
    diagnostics.register_opts(conf)
    conf_opts.set_lib_defaults()
    # The agent must stop within 10 s of SIGTERM (oslo.service says 60).
    service_opts.set_service_opts_defaults(conf,
                                           graceful_shutdown_timeout=10)
    conf(argv, project='rapid-vmm', prog='rapid-vmm',
         version=version.version_string())


def _logs_to_stderr(conf: cfg.ConfigOpts) -> bool:
    return not (conf.log_file or conf.use_syslog or conf.use_journal)


def main(argv: list[str] | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT.

    Exit status: 0 after a stop, 2 for a bad configuration, 1 when the
    agent cannot start (its state cannot be opened or belongs to another
    ``host``, the driver refuses) - with one line on stderr and in the log,
    never a silent respawn loop.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        parse_config(argv)
        config_check.validate(CONF)
        diagnostics.validate(CONF)
    except (cfg.Error, exception.ConfigError) as exc:
        print(f'rapid-vmm: configuration error: {exc}', file=sys.stderr)
        return EXIT_CONFIG
    logging.setup(CONF, 'rapid_vmm')
    # Guru Meditation report on SIGUSR2 (a handler of the main thread).
    diagnostics.setup(CONF)
    LOG.info('rapid-vmm %s starting (host %s, driver %s)',
             version.version_string(), CONF.host, CONF.compute_driver)
    launcher = vmm_service.Launcher(CONF, vmm_service.VmmService(CONF))
    try:
        return launcher.run()
    except exception.ConfigError as exc:
        _fatal(f'configuration error: {exc}')
        return EXIT_CONFIG
    except exception.RapidVmmException as exc:
        _fatal(f'cannot start: {exc}')
        return EXIT_START


def _fatal(line: str) -> None:
    LOG.critical('rapid-vmm %s', line)
    if not _logs_to_stderr(CONF):
        print(f'rapid-vmm: {line}', file=sys.stderr)


if __name__ == '__main__':
    sys.exit(main())
