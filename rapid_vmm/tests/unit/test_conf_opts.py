"""Tests of rapid_vmm.conf.opts: the option listing and library defaults."""

import ast
import pathlib

from oslo_config import cfg
from oslo_service import service

from rapid_vmm.conf import opts


def test_graceful_shutdown_timeout_lowered_on_the_given_conf():
    conf = cfg.ConfigOpts()
    opts.set_lib_defaults(conf)
    conf([], project='rapid-vmm', default_config_files=[],
         default_config_dirs=[])

    assert conf.graceful_shutdown_timeout == 10


def test_oslo_service_registering_its_options_later_is_fine():
    # The launcher registers oslo.service's own options on the agent's
    # conf after set_lib_defaults: no DuplicateOptError, default kept.
    conf = cfg.ConfigOpts()
    opts.set_lib_defaults(conf)
    for group, options in service.list_opts():
        conf.register_opts(options, group=group)
    conf([], project='rapid-vmm', default_config_files=[],
         default_config_dirs=[])

    assert conf.graceful_shutdown_timeout == 10


def test_a_config_file_still_wins(tmp_path):
    conf = cfg.ConfigOpts()
    opts.set_lib_defaults(conf)
    path = tmp_path / 'rapid-vmm.conf'
    path.write_text('[DEFAULT]\ngraceful_shutdown_timeout = 3\n')
    conf(['--config-file', str(path)], project='rapid-vmm',
         default_config_files=[], default_config_dirs=[])

    assert conf.graceful_shutdown_timeout == 3


def _private_imports(path: pathlib.Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f'{node.module}.{alias.name}'
                                     for alias in node.names]
        else:
            continue
        found += [name for name in names
                  if any(part.startswith('_') and part != '__future__'
                         for part in name.split('.'))]
    return found


def test_no_private_imports_in_conf():
    for module in pathlib.Path(opts.__file__).parent.glob('*.py'):
        assert _private_imports(module) == [], module


def test_list_opts_covers_every_group():
    groups = {getattr(group, 'name', group) for group, _ in
              opts.list_opts()}
    assert {'DEFAULT', 'libvirt', 'nova', 'gpu'} <= groups
