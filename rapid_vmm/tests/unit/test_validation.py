"""Tests of rapid_vmm.validation: every refusal is InvalidRequest."""

import pytest

from rapid_vmm import exception
from rapid_vmm import validation

MAX_LONG = 2 ** 63 - 1

#: Values of the wrong type for every integer argument.
NOT_INTEGERS = [True, False, '1', '', 1.0, 1.5, None, [1], {'a': 1}, b'1']


def refused(func, *args, match=None):
    with pytest.raises(exception.InvalidRequest, match=match) as info:
        func(*args)
    assert str(info.value).startswith('Invalid request: ')
    return str(info.value)


# -- integer --------------------------------------------------------------


def test_integer_good_values():
    assert validation.integer('x', 0, 0, 10) == 0
    assert validation.integer('x', 10, 0, 10) == 10
    assert validation.integer('x', -5, -10, 10) == -5


@pytest.mark.parametrize('value', NOT_INTEGERS)
def test_integer_refuses_other_types(value):
    message = refused(validation.integer, 'thing', value, 0, 10)
    assert 'thing must be an integer' in message


@pytest.mark.parametrize('value', [-1, 11, 2 ** 70])
def test_integer_out_of_range(value):
    message = refused(validation.integer, 'thing', value, 0, 10)
    assert 'thing must be between 0 and 10' in message


def test_integer_long_value_is_cut_in_message():
    message = refused(validation.integer, 'x', 'y' * 500, 0, 1)
    assert len(message) < 200


# -- user_id --------------------------------------------------------------


@pytest.mark.parametrize('value', [0, 1, 7, MAX_LONG])
def test_user_id_good(value):
    assert validation.user_id(value) == value


@pytest.mark.parametrize('value', [-1, -2, -(2 ** 63)])
def test_user_id_negative_is_reserved_for_helpers(value):
    message = refused(validation.user_id, value)
    assert 'helper' in message
    assert 'user_id' in message


@pytest.mark.parametrize('value', [MAX_LONG + 1, 2 ** 64])
def test_user_id_above_java_long(value):
    message = refused(validation.user_id, value)
    assert 'between 0 and' in message


@pytest.mark.parametrize('value', NOT_INTEGERS)
def test_user_id_wrong_type(value):
    message = refused(validation.user_id, value)
    assert 'user_id must be an integer' in message


def test_optional_user_id():
    assert validation.optional_user_id(None) is None
    assert validation.optional_user_id(0) == 0
    assert validation.optional_user_id(42) == 42
    refused(validation.optional_user_id, -1, match='helper')
    refused(validation.optional_user_id, '1')
    refused(validation.optional_user_id, True)
    refused(validation.optional_user_id, MAX_LONG + 1)


# -- os_type, vcpus, memory_mb, disk_gb -----------------------------------


def test_os_type():
    assert validation.os_type(0) == 0
    assert validation.os_type(1) == 1
    for value in (-1, 2, 99):
        refused(validation.os_type, value, match='os_type')
    for value in NOT_INTEGERS:
        refused(validation.os_type, value, match='os_type')


def test_vcpus():
    assert validation.vcpus(1) == 1
    assert validation.vcpus(1024) == 1024
    assert validation.vcpus(0, allow_zero=True) == 0
    for value in (0, -1, 1025):
        refused(validation.vcpus, value, match='vcpus must be between 1')
    refused(validation.vcpus, -1, True, match='between 0 and 1024')
    refused(validation.vcpus, 1025, True, match='between 0 and 1024')
    for value in NOT_INTEGERS:
        refused(validation.vcpus, value, match='vcpus must be an integer')


def test_memory_mb():
    assert validation.memory_mb(1) == 1
    assert validation.memory_mb(16 * 1024 * 1024) == 16777216
    assert validation.memory_mb(0, allow_zero=True) == 0
    for value in (0, -1, 16777217):
        refused(validation.memory_mb, value, match='memory_mb')
    refused(validation.memory_mb, 16777217, True, match='memory_mb')
    for value in NOT_INTEGERS:
        refused(validation.memory_mb, value, match='memory_mb')


def test_disk_gb():
    assert validation.disk_gb(0) == 0
    assert validation.disk_gb(65536) == 65536
    for value in (-1, 65537):
        refused(validation.disk_gb, value, match='disk_gb')
    for value in NOT_INTEGERS:
        refused(validation.disk_gb, value, match='disk_gb')


# -- gpu_cores ------------------------------------------------------------


def test_gpu_cores_without_accounting_takes_any_count():
    assert validation.gpu_cores(0, 0) == 0
    assert validation.gpu_cores(5000, 0) == 5000
    assert validation.gpu_cores(2 ** 31 - 1, 0) == 2 ** 31 - 1
    refused(validation.gpu_cores, -1, 0, match='gpu_cores')
    refused(validation.gpu_cores, 2 ** 31, 0, match='gpu_cores')


def test_gpu_cores_with_total():
    assert validation.gpu_cores(0, 8) == 0
    assert validation.gpu_cores(8, 8) == 8
    refused(validation.gpu_cores, 9, 8, match='between 0 and 8')
    refused(validation.gpu_cores, -1, 8, match='gpu_cores')


@pytest.mark.parametrize('value', NOT_INTEGERS)
def test_gpu_cores_wrong_type(value):
    refused(validation.gpu_cores, value, 8, match='gpu_cores')
    refused(validation.gpu_cores, value, 0, match='gpu_cores')


# -- resource, as_action, boolean -----------------------------------------


@pytest.mark.parametrize('value', ['cpu', 'memory', 'disk'])
def test_resource_good(value):
    assert validation.resource(value) == value


@pytest.mark.parametrize('value', ['CPU', 'net', '', ' cpu', None, 1,
                                   ['cpu'], b'cpu'])
def test_resource_refused(value):
    message = refused(validation.resource, value)
    assert 'cpu, memory, disk' in message


@pytest.mark.parametrize('value', ['suspend', 'remove'])
def test_as_action_good(value):
    assert validation.as_action(value) == value


@pytest.mark.parametrize('value', ['Suspend', 'delete', '', 1, 2, None,
                                   ('suspend',)])
def test_as_action_refused(value):
    message = refused(validation.as_action, value)
    assert 'suspend, remove' in message


def test_boolean():
    assert validation.boolean('ready', True) is True
    assert validation.boolean('ready', False) is False
    for value in (0, 1, 'true', None, 'False'):
        refused(validation.boolean, 'ready', value, match='ready')


# -- ip_address -----------------------------------------------------------


@pytest.mark.parametrize('value, expected', [
    ('192.168.122.10', '192.168.122.10'),
    ('  10.0.0.1\n', '10.0.0.1'),
    ('::1', '::1'),
    ('2001:DB8:0:0:0:0:0:1', '2001:db8::1'),
    ('fe80:0000::0001', 'fe80::1'),
])
def test_ip_address_good_and_normalised(value, expected):
    assert validation.ip_address(value) == expected


@pytest.mark.parametrize('value', ['', 'localhost', '256.1.1.1', '1.2.3',
                                   '10.0.0.1/24', '::g', '1.2.3.4 5.6.7.8'])
def test_ip_address_garbage(value):
    message = refused(validation.ip_address, value)
    assert 'is not an IP address' in message


@pytest.mark.parametrize('value', [None, 3232235786, b'10.0.0.1',
                                   ['10.0.0.1'], True])
def test_ip_address_not_a_string(value):
    refused(validation.ip_address, value, match='ip_address')
