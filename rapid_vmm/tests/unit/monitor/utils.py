"""Helpers of the monitor tests."""

import pathlib

DATA = pathlib.Path(__file__).parent / 'data'


def records(caplog, text, level=None):
    """Log records of rapid_vmm.monitor whose message contains text."""
    return [r for r in caplog.records
            if r.name.startswith('rapid_vmm.monitor') and
            text in r.getMessage() and
            (level is None or r.levelno == level)]
