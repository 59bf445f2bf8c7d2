"""``rapid-vmm``: the VM Manager agent."""

import sys

from oslo_service import backend

backend.init_backend(backend.BackendType.THREADING)

from oslo_config import cfg  # noqa: E402 - after the backend is chosen
from oslo_log import log as logging  # noqa: E402
from oslo_service import service  # noqa: E402

from rapid_vmm import config_check  # noqa: E402
from rapid_vmm import diagnostics  # noqa: E402
from rapid_vmm import exception  # noqa: E402
from rapid_vmm import service as vmm_service  # noqa: E402
from rapid_vmm import version  # noqa: E402
from rapid_vmm.conf import CONF  # noqa: E402
from rapid_vmm.conf import opts as conf_opts  # noqa: E402

LOG = logging.getLogger(__name__)


def parse_config(argv: list[str], conf: cfg.ConfigOpts = CONF) -> None:
    """Parse the command line and config files into ``conf``."""
    logging.register_options(conf)
    diagnostics.register_opts(conf)  # ops: [oslo_reports]
    conf_opts.set_lib_defaults()
    conf(argv, project='rapid-vmm', prog='rapid-vmm',
         version=version.version_string())


def main(argv: list[str] | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT; 2 on a bad configuration."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        parse_config(argv)
        config_check.validate(CONF)
        diagnostics.validate(CONF)  # ops: [oslo_reports]
    except (cfg.Error, exception.ConfigError) as exc:
        print(f'rapid-vmm: configuration error: {exc}', file=sys.stderr)
        return 2
    logging.setup(CONF, 'rapid_vmm')
    # ops (issue 10.3): Guru Meditation report on SIGUSR2; installed here,
    # in the main thread, before any worker process is forked.
    diagnostics.setup(CONF)
    LOG.info('rapid-vmm %s starting (host %s, driver %s)',
             version.version_string(), CONF.host, CONF.compute_driver)
    launcher = service.launch(CONF, vmm_service.VmmService(CONF),
                              workers=1, restart_method='mutate')
    result = launcher.wait()
    return result or 0


if __name__ == '__main__':
    sys.exit(main())
