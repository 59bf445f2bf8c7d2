"""Fixtures of the monitor tests."""

import logging

from oslo_config import cfg
import pytest

from rapid_vmm import conf as rapid_conf


class PrivateOpts(cfg.ConfigOpts):
    """A ConfigOpts whose option groups are its own.

    oslo.config's register_group keeps a shallow copy of the OptGroup, so
    the options of a named group (``[gpu]``, ``[libvirt]``) and their
    overrides are shared by every ConfigOpts the group object is
    registered on, the global CONF included: an override set here would
    leak into other tests. A fresh OptGroup per ConfigOpts avoids that.
    """

    def register_group(self, group):
        super().register_group(cfg.OptGroup(
            group.name, title=group.title, help=group.help))


@pytest.fixture
def conf(tmp_path):
    """A private ConfigOpts with every rapid-vmm option, data in tmp_path."""
    opts = PrivateOpts()
    rapid_conf.register_opts(opts)
    opts([], project='rapid-vmm', default_config_files=[],
         default_config_dirs=[])
    opts.set_override('data_path', str(tmp_path / 'data'))
    # Never find a real nvidia-smi by accident.
    opts.set_override('nvidia_smi_path', str(tmp_path / 'no-nvidia-smi'),
                      group='gpu')
    return opts


@pytest.fixture
def fake_tool(tmp_path):
    """Make an executable shell script standing in for nvidia-smi.

    ``fake_tool(body)`` writes ``#!/bin/sh`` + body and returns its path;
    the script also records its arguments, one a line, in ``<path>.args``.
    """
    def make(body, name='nvidia-smi'):
        path = tmp_path / name
        path.write_text('#!/bin/sh\n'
                        f'printf "%s\\n" "$@" > "{path}.args"\n' + body)
        path.chmod(0o755)
        return str(path)
    return make


@pytest.fixture
def log(caplog):
    """caplog at DEBUG for rapid_vmm.monitor, with a matcher."""
    caplog.set_level(logging.DEBUG, logger='rapid_vmm.monitor')
    return caplog

