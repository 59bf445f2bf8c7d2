"""Nova driver pieces that need no cloud: config checks, error mapping.

The driver's behaviour against a real Nova is in rapid_vmm/tests/nova.
"""

from keystoneauth1 import exceptions as ks_exceptions
from openstack import exceptions as sdk_exceptions
import pytest

from rapid_vmm import exception
from rapid_vmm.tests import fixtures as rfix
from rapid_vmm.virt import driver as virt_driver
from rapid_vmm.virt.nova import driver as nova_driver


@pytest.fixture
def conf():
    fixture = rfix.ConfFixture(compute_driver='nova',
                               **{'nova.cloud': 'somewhere',
                                  'nova.linux_image': 'linux',
                                  'nova.network': 'net'})
    fixture.setUp()
    yield fixture.conf
    fixture.cleanUp()


def test_the_loader_finds_the_nova_driver(conf):
    assert virt_driver.driver_class(conf) is nova_driver.NovaDriver
    conf.set_override('compute_driver', 'libvirt')
    conf.set_override('openstack_support', True)
    assert virt_driver.driver_class(conf) is nova_driver.NovaDriver


def test_a_good_configuration_passes(conf):
    nova_driver.NovaDriver.validate_config(conf)


@pytest.mark.parametrize('group_option, value, words', [
    ('nova.cloud', None, 'clouds.yaml'),
    ('nova.linux_image', None, 'linux_image'),
    ('nova.network', None, 'network'),
    ('nova.flavors', {'3_1000_20': 'm1.small'}, "'3_1000_20'"),
])
def test_bad_configurations_are_refused(conf, group_option, value, words):
    group, option = group_option.split('.')
    conf.set_override(option, value, group=group)
    with pytest.raises(exception.ConfigError) as error:
        nova_driver.NovaDriver.validate_config(conf)
    assert words in str(error.value)


def test_keystoneauth_options_replace_a_cloud(conf):
    conf.set_override('cloud', None, group='nova')
    conf.set_override('auth_type', 'password', group='nova')
    nova_driver.NovaDriver.validate_config(conf)


def _http(status, message):
    return sdk_exceptions.HttpException(message=message,
                                        http_status=status)


@pytest.mark.parametrize('error, expected', [
    (Exception('No valid host was found. There are not enough hosts.'),
     exception.NoCapacity),
    (_http(403, 'Quota exceeded for cores: Requested 4, but already used '
                '20 of 20 cores'), exception.NoCapacity),
    (_http(413, 'Request Entity Too Large'), exception.NoCapacity),
    (_http(409, "Cannot 'suspend' instance while it is in task_state "
                'resize_migrating'), exception.VmStateConflict),
    (_http(400, 'Flavor no-such-flavor could not be found.'),
     exception.DriverError),
    (_http(500, 'Internal Server Error'), exception.DriverError),
    (ks_exceptions.ConnectFailure('Unable to establish connection'),
     exception.DriverError),
])
def test_cloud_errors_become_typed_errors(error, expected):
    typed = nova_driver.translate('start', error, user_id=7)
    assert type(typed) is expected
    assert str(typed).strip()


def test_an_unreachable_api_says_so():
    typed = nova_driver.translate(
        'create the server', ks_exceptions.ConnectFailure('refused'))
    assert 'unreachable' in str(typed)


def test_server_status_maps_to_power_states():
    assert nova_driver._POWER['ACTIVE'] is virt_driver.PowerState.RUNNING
    assert nova_driver._POWER['SUSPENDED'] is \
        virt_driver.PowerState.SUSPENDED
    assert nova_driver._POWER['SHUTOFF'] is virt_driver.PowerState.SHUTOFF
    assert nova_driver._POWER['ERROR'] is virt_driver.PowerState.CRASHED
