"""Start-up checks of the configuration: one clear line per problem.

oslo.config checks a value from a file only when it is read, so every
rapid-vmm option is read here once; then the cross-option rules of SPEC
section 3 are applied (driver, grid, images, state directory).
"""

import os

from oslo_config import cfg

from rapid_vmm import exception
from rapid_vmm import flavors
from rapid_vmm.conf import opts as conf_opts
from rapid_vmm.legacy import server as legacy_server
from rapid_vmm.virt import driver as virt_driver


def _read_every_option(conf: cfg.ConfigOpts) -> None:
    for group, options in conf_opts.list_opts():
        group_name = group if isinstance(group, str) else group.name
        section = conf if group_name == 'DEFAULT' else conf[group_name]
        for opt in options:
            try:
                getattr(section, opt.dest)
            except (cfg.NoSuchOptError, AttributeError):
                continue  # a keystoneauth plugin option, loaded on demand
            except cfg.Error as exc:
                raise exception.ConfigError(reason=str(exc)) from None
            except ValueError as exc:
                raise exception.ConfigError(
                    reason=f'[{group_name}] {opt.dest}: {exc}') from None


def _check_data_path(path: str) -> None:
    try:
        os.makedirs(path, mode=0o711, exist_ok=True)
    except OSError as exc:
        raise exception.ConfigError(
            reason=f'data_path {path!r} cannot be created: {exc.strerror}'
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise exception.ConfigError(
            reason=f'data_path {path!r} is not writable')


def _check_gpu_devices(devices: list[str]) -> None:
    if devices == ['all']:
        return
    for item in devices:
        if not item.strip().isdigit():
            raise exception.ConfigError(
                reason=f'[gpu] devices: {item!r} is neither "all" nor a '
                       'GPU index')


def validate(conf: cfg.ConfigOpts) -> None:
    """Check the configuration; :raises ConfigError: on the first problem."""
    _read_every_option(conf)
    flavors.parse_grid(conf.vm_types)
    _check_gpu_devices(conf.gpu.devices)
    _check_data_path(conf.data_path)
    legacy_server.validate_config(conf)
    virt_driver.driver_class(conf).validate_config(conf)
