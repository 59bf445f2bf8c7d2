"""Tests of rapid_vmm.monitor.resources: units and the log-once helper."""

import logging

from rapid_vmm.monitor import resources
from rapid_vmm.tests.unit.monitor.utils import records

LOG = logging.getLogger('rapid_vmm.monitor.test')


def test_units():
    assert resources.to_mib(81559 * 1024 * 1024 + 1048575) == 81559
    assert resources.to_gib(250 * 1024 ** 3 + 1024 ** 3 // 3) == 250.33
    assert isinstance(resources.to_mib(10.0), int)


def test_failure_logged_once_per_reason(log):
    errors = resources.ErrorLog(LOG)

    assert errors.failed('k', 'timeout', 'broken: %s', 'timeout')
    assert not errors.failed('k', 'timeout', 'broken: %s', 'timeout')
    assert errors.failed('k', 'lost', 'broken: %s', 'lost')
    assert errors.failed('other', 'timeout', 'other broken')

    assert [r.getMessage() for r in records(log, 'broken')] == [
        'broken: timeout', 'broken: lost', 'other broken']
    assert all(r.levelno == logging.WARNING for r in log.records)


def test_recovery_logged_once_then_failure_logged_again(log):
    errors = resources.ErrorLog(LOG)
    errors.failed('k', 'x', 'failing')

    assert errors.recovered('k', 'works again %s', 'now')
    assert not errors.recovered('k', 'works again %s', 'now')
    assert errors.failed('k', 'x', 'failing')

    assert len(records(log, 'works again now', logging.INFO)) == 1
    assert len(records(log, 'failing')) == 2


def test_level_traceback_and_forget(log):
    errors = resources.ErrorLog(LOG)
    try:
        raise ZeroDivisionError('division by zero')
    except ZeroDivisionError:
        errors.failed(('gpu', 0), 'z', 'boom', level=logging.ERROR,
                      exc_info=True)
    errors.failed(('gpu', 1), 'z', 'boom 1')

    [record] = records(log, 'boom', logging.ERROR)
    assert record.exc_info[0] is ZeroDivisionError
    errors.forget(lambda key: key == ('gpu', 0))
    assert not errors.is_failing(('gpu', 0))
    assert errors.is_failing(('gpu', 1))
    errors.forget()
    assert not errors.is_failing(('gpu', 1))
