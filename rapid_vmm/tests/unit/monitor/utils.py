"""Helpers of the monitor tests."""

import pathlib

import pytest

from rapid_vmm.monitor import gpu

DATA = pathlib.Path(__file__).parent / 'data'


def records(caplog, text, level=None):
    """Log records of rapid_vmm.monitor whose message contains text."""
    return [r for r in caplog.records
            if r.name.startswith('rapid_vmm.monitor') and
            text in r.getMessage() and
            (level is None or r.levelno == level)]


def skip_if_real_nvml_works() -> None:
    """Skip a test that needs a machine where NVML cannot start."""
    try:
        nvml = gpu.load_nvml()
    except ImportError:
        return
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return
    nvml.nvmlShutdown()
    pytest.skip('this machine has a working NVML')
