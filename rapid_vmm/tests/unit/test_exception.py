"""Tests of rapid_vmm.exception and its round trip through oslo.messaging."""

import logging
import sys

import oslo_messaging
from oslo_messaging._drivers import common as driver_common
import pytest

from rapid_vmm import exception
from rapid_vmm import rpc

#: Keyword arguments that format each class's msg_fmt.
KWARGS = {
    exception.RapidVmmException: {},
    exception.InvalidRequest: {'reason': 'vcpus must be an integer'},
    exception.VmNotFound: {'user_id': 7},
    exception.VmStateConflict: {'action': 'resume', 'user_id': 7,
                                'state': 'stopped'},
    exception.NoCapacity: {'request': '[4, 4096, 40]',
                           'reason': 'vCPUs: 9 needed, 8 allowed'},
    exception.DriverError: {'action': 'create', 'reason': 'libvirt said no'},
    exception.InternalError: {'action': 'start_vm',
                              'reason': 'ValueError: boom'},
    exception.AsRegistrationTimeout: {'user_id': 7, 'timeout': 200},
    exception.AsNotReady: {'user_id': 7},
    exception.ConfigError: {'reason': 'unknown driver'},
    exception.StateError: {'path': '/x/state.sqlite', 'reason': 'corrupt'},
    exception.InstanceNotOurs: {'name': 'rapid-vm-7-x', 'user_id': 7,
                                'reason': 'owner is other-host'},
    exception.PeerError: {'method': 'notify_vm', 'peer': 'DS',
                          'reason': 'timeout'},
    exception.PeerUnavailable: {'method': 'notify_vm', 'peer': 'DS',
                                'reason': 'timeout'},
    exception.PeerRejected: {'method': 'register_vmm', 'peer': 'DS',
                             'reason': 'ERROR'},
}

EXPECTED_MESSAGES = {
    exception.RapidVmmException: 'An unknown error occurred.',
    exception.InvalidRequest: 'Invalid request: vcpus must be an integer',
    exception.VmNotFound: 'User 7 has no VM on this host.',
    exception.VmStateConflict:
        'Cannot resume the VM of user 7 while it is stopped.',
    exception.NoCapacity:
        'No capacity for [4, 4096, 40]: vCPUs: 9 needed, 8 allowed',
    exception.DriverError: 'Driver error during create: libvirt said no',
    exception.InternalError:
        'Internal error during start_vm: ValueError: boom',
    exception.AsRegistrationTimeout:
        'The Acceleration Server of user 7 did not register within 200 s.',
    exception.AsNotReady: 'The Acceleration Server of user 7 is not ready.',
    exception.ConfigError: 'Bad configuration: unknown driver',
    exception.StateError: 'State database /x/state.sqlite: corrupt',
    exception.InstanceNotOurs:
        "The instance rapid-vm-7-x of user 7 is not recognisably this "
        "agent's (owner is other-host); it is left alone for the operator.",
    exception.PeerError: 'notify_vm to the DS failed: timeout',
    exception.PeerUnavailable: 'notify_vm to the DS failed: timeout',
    exception.PeerRejected: 'register_vmm to the DS failed: ERROR',
}

ROUND_TRIP = sorted(set(exception.EXPECTED_ERRORS) |
                    {exception.InternalError, exception.AsNotReady},
                    key=lambda cls: cls.__name__)


def test_every_class_is_covered():
    classes = {obj for obj in vars(exception).values()
               if isinstance(obj, type) and
               issubclass(obj, exception.RapidVmmException)}
    assert classes == set(KWARGS) == set(EXPECTED_MESSAGES)


def test_expected_errors_contract():
    names = {cls.__name__ for cls in exception.EXPECTED_ERRORS}
    assert {'InvalidRequest', 'VmNotFound', 'VmStateConflict', 'NoCapacity',
            'DriverError', 'AsRegistrationTimeout'} <= names
    assert all(issubclass(cls, exception.RapidVmmException)
               for cls in exception.EXPECTED_ERRORS)
    assert issubclass(exception.InternalError, exception.DriverError)
    assert issubclass(exception.AsNotReady, exception.AsRegistrationTimeout)


@pytest.mark.parametrize('cls', sorted(KWARGS, key=lambda c: c.__name__))
def test_message_from_kwargs(cls):
    error = cls(**KWARGS[cls])
    assert str(error) == EXPECTED_MESSAGES[cls]
    assert error.message == EXPECTED_MESSAGES[cls]
    assert error.args == (EXPECTED_MESSAGES[cls],)
    assert error.kwargs == KWARGS[cls]


@pytest.mark.parametrize('cls', sorted(KWARGS, key=lambda c: c.__name__))
def test_explicit_message(cls):
    error = cls('exactly this', **KWARGS[cls])
    assert str(error) == 'exactly this'
    assert error.args == ('exactly this',)
    assert error.kwargs == KWARGS[cls]


def test_empty_message_formats_kwargs():
    error = exception.VmNotFound('', user_id=3)
    assert str(error) == 'User 3 has no VM on this host.'


def test_missing_kwargs_fall_back_to_msg_fmt(caplog):
    caplog.set_level(logging.ERROR, logger='rapid_vmm.exception')
    error = exception.VmStateConflict(action='resume')
    assert str(error) == exception.VmStateConflict.msg_fmt
    assert error.kwargs == {'action': 'resume'}
    assert 'Cannot format VmStateConflict' in caplog.text


def test_bad_kwarg_type_falls_back_to_msg_fmt(caplog):
    class Numbered(exception.RapidVmmException):
        msg_fmt = 'count %(count)d'

    caplog.set_level(logging.ERROR, logger='rapid_vmm.exception')
    assert str(Numbered(count=3)) == 'count 3'
    assert str(Numbered(count='three')) == 'count %(count)d'
    assert 'Cannot format Numbered' in caplog.text


def test_extra_kwargs_are_kept_and_ignored_in_message():
    error = exception.VmNotFound(user_id=1, extra='x')
    assert str(error) == 'User 1 has no VM on this host.'
    assert error.kwargs == {'user_id': 1, 'extra': 'x'}


def _serialised(error):
    try:
        raise error
    except exception.RapidVmmException:
        return driver_common.serialize_remote_exception(sys.exc_info())


@pytest.mark.parametrize('cls', ROUND_TRIP, ids=lambda c: c.__name__)
@pytest.mark.parametrize('explicit', [False, True], ids=['kwargs', 'message'])
def test_round_trip_through_oslo_messaging(cls, explicit):
    if explicit:
        original = cls('a message of my own', **KWARGS[cls])
    else:
        original = cls(**KWARGS[cls])
    data = _serialised(original)
    rebuilt = driver_common.deserialize_remote_exception(
        data, rpc.ALLOWED_EXMODS)
    assert rpc.ALLOWED_EXMODS == ['rapid_vmm.exception']
    assert isinstance(rebuilt, cls)
    assert isinstance(rebuilt, exception.RapidVmmException)
    assert not isinstance(rebuilt, oslo_messaging.RemoteError)
    # Same class name once oslo.messaging's "_Remote" suffix is removed.
    assert type(rebuilt).__name__ == cls.__name__ + '_Remote'
    assert str(rebuilt).splitlines()[0] == str(original)
    assert rebuilt.message == original.message
    assert rebuilt.kwargs == original.kwargs


@pytest.mark.parametrize('cls', ROUND_TRIP, ids=lambda c: c.__name__)
def test_round_trip_without_allowed_module_is_remote_error(cls):
    original = cls(**KWARGS[cls])
    rebuilt = driver_common.deserialize_remote_exception(
        _serialised(original), [])
    assert isinstance(rebuilt, oslo_messaging.RemoteError)
    assert not isinstance(rebuilt, exception.RapidVmmException)
    assert rebuilt.exc_type == cls.__name__
    assert rebuilt.value == str(original)


def test_remote_error_re_serialised_keeps_class():
    """A rebuilt error raised again (a relay) keeps its original class."""
    first = driver_common.deserialize_remote_exception(
        _serialised(exception.VmNotFound(user_id=4)), rpc.ALLOWED_EXMODS)
    again = driver_common.deserialize_remote_exception(
        _serialised(first), rpc.ALLOWED_EXMODS)
    assert isinstance(again, exception.VmNotFound)
    assert str(again).splitlines()[0].startswith(
        'User 4 has no VM on this host.')
