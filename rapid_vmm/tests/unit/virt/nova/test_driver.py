"""Nova driver pieces that need no cloud: config checks, error mapping.

The driver's behaviour against a real Nova is in rapid_vmm/tests/nova.
"""

import json
import time

from keystoneauth1 import exceptions as ks_exceptions
from keystoneauth1 import loading as ks_loading
from openstack import exceptions as sdk_exceptions
from openstack.compute.v2 import server as sdk_server
import pytest
import requests

from rapid_vmm import exception
from rapid_vmm import objects
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


def _http(status, message, url='http://nova.test/v2.1/servers'):
    """The exception openstacksdk raises for a Nova error response."""
    response = requests.Response()
    response.status_code = status
    response.headers['content-type'] = 'application/json'
    response._content = json.dumps(
        {'error': {'code': status, 'message': message}}).encode()
    response.request = requests.Request('POST', url).prepare()
    try:
        sdk_exceptions.raise_from_response(response)
    except sdk_exceptions.HttpException as exc:
        return exc
    raise AssertionError('no exception')


@pytest.mark.parametrize('error, expected', [
    (_http(403, 'Quota exceeded for cores: Requested 4, but already used '
                '20 of 20 cores'), exception.NoCapacity),
    (_http(413, 'Request Entity Too Large'), exception.NoCapacity),
    (_http(409, "Cannot 'suspend' instance while it is in task_state "
                'resize_migrating'), exception.VmStateConflict),
    (sdk_exceptions.ConflictException(message='Flavor exists'),
     exception.VmStateConflict),
    (_http(403, 'Policy does not allow os_compute_api:servers:create'),
     exception.DriverError),
    (_http(400, 'Flavor no-such-flavor could not be found.'),
     exception.DriverError),
    (_http(404, 'Instance x could not be found.'), exception.DriverError),
    (_http(500, 'Internal Server Error'), exception.DriverError),
    (sdk_exceptions.ResourceTimeout('Timeout waiting for the server'),
     exception.DriverError),
    (ks_exceptions.ConnectFailure('Unable to establish connection'),
     exception.DriverError),
    (ks_exceptions.ConnectTimeout('Timed out connecting'),
     exception.DriverError),
    # Words in a message decide nothing: classes and status codes do.
    (Exception('No valid host was found. There are not enough hosts.'),
     exception.DriverError),
    (_http(500, "Cannot 'suspend' instance: Conflict 409 quota exceeded"),
     exception.DriverError),
])
def test_cloud_errors_become_typed_errors(error, expected):
    typed = nova_driver.translate('start', error, user_id=7)
    assert type(typed) is expected
    assert str(typed).strip()


def test_typed_errors_pass_through():
    error = exception.InvalidRequest(reason='x')
    assert nova_driver.translate('start', error) is error


@pytest.mark.parametrize('fault, expected, words', [
    ({'code': 500, 'message': 'No valid host was found. There are not '
                              'enough hosts available.'},
     exception.NoCapacity, 'No valid host'),
    ({'code': 500, 'message': 'Build of instance x aborted: Failed to '
                              'allocate the network(s)'},
     exception.DriverError, 'Failed to allocate the network'),
    (None, exception.DriverError, 'no fault recorded'),
])
def test_server_faults_become_typed_errors(fault, expected, words):
    typed = nova_driver.translate_fault('boot the server', fault, 7)
    assert type(typed) is expected
    assert words in str(typed)


def test_an_unreachable_api_says_so():
    typed = nova_driver.translate(
        'create the server', ks_exceptions.ConnectFailure('refused'))
    assert 'unreachable' in str(typed)


def test_server_status_maps_to_power_states():
    assert nova_driver._POWER['ACTIVE'] is virt_driver.PowerState.RUNNING
    assert nova_driver._POWER['SUSPENDED'] is \
        virt_driver.PowerState.SUSPENDED
    assert nova_driver._POWER['SHUTOFF'] is virt_driver.PowerState.SHUTOFF
    assert nova_driver._POWER['ERROR'] is virt_driver.PowerState.ERROR


# -- metadata and observations, on openstacksdk's own Server objects ----------


def _server(conf, status='ACTIVE', metadata=None, **fields):
    meta = {'rapid_owner': conf.host, 'rapid_user_id': '7',
            'rapid_helper': '0', 'rapid_os_type': '0',
            'rapid_gpu_cores': '1', 'rapid_type': '2_2048_20',
            'rapid_vm_id': '31', 'rapid_vmm_id': '4242',
            'rapid_slam_host': 'slam', 'rapid_slam_port': '9002'}
    if metadata is not None:
        meta = metadata
    values = dict(id='0b3c8a5e-0000-4000-8000-000000000007',
                  name='rapid-vm-7-abc', status=status, metadata=meta,
                  flavor={'vcpus': 2, 'ram': 2048, 'disk': 20})
    values.update(fields)
    return sdk_server.Server(**values)


def test_metadata_written_at_create_carries_the_identity(conf):
    vm = objects.Vm(user_id=7, name='rapid-vm-7-abc', vcpus=2,
                    memory_mb=2048, disk_gb=20, gpu_cores=1, vm_id=31)
    meta = nova_driver.NovaDriver(conf)._metadata(
        vm, {'vmm_id': 4242, 'slam_host': 'slam', 'slam_port': 9002})
    assert meta == {'rapid_owner': conf.host, 'rapid_user_id': '7',
                    'rapid_helper': '0', 'rapid_os_type': '0',
                    'rapid_gpu_cores': '1', 'rapid_type': '2_2048_20',
                    'rapid_memory_max_mb': '2048', 'rapid_vm_id': '31',
                    'rapid_vmm_id': '4242', 'rapid_slam_host': 'slam',
                    'rapid_slam_port': '9002'}
    assert all(isinstance(v, str) for v in meta.values())


def test_observation_of_servers(conf):
    nova = nova_driver.NovaDriver(conf)
    ours = nova._observation(_server(conf))
    assert ours.presence is virt_driver.Presence.OURS
    instance = ours.instance
    assert (instance.user_id, instance.vm_id, instance.owner,
            instance.identity, instance.memory_max_mb) == (
        7, 31, conf.host,
        {'vmm_id': 4242, 'slam_host': 'slam', 'slam_port': 9002}, 2048)
    assert (instance.vcpus, instance.memory_mb, instance.gpu_cores) == (
        2, 2048, 1)
    foreign = nova._observation(_server(conf, metadata={
        'rapid_owner': 'other-host', 'rapid_user_id': '7'}))
    assert foreign.presence is virt_driver.Presence.FOREIGN
    assert foreign.instance.owner == 'other-host'
    stripped = nova._observation(_server(conf, metadata={}))
    assert stripped.presence is virt_driver.Presence.UNREADABLE
    assert 'no rapid-vmm metadata' in stripped.reason
    malformed = nova._observation(_server(conf, metadata={
        'rapid_owner': conf.host, 'rapid_user_id': 'seven'}))
    assert malformed.presence is virt_driver.Presence.UNREADABLE
    ownerless = nova._observation(_server(conf, metadata={
        'rapid_user_id': '7'}))
    assert ownerless.presence is virt_driver.Presence.UNREADABLE


def test_error_and_suspended_servers(conf):
    nova = nova_driver.NovaDriver(conf)
    failed = nova._observation(_server(
        conf, status='ERROR', fault={'code': 500, 'message':
                                     'Disk I/O error\ntraceback...'}))
    assert failed.instance.power_state is virt_driver.PowerState.ERROR
    assert failed.instance.state_reason == 'Disk I/O error'
    suspended = nova._observation(_server(conf, status='SUSPENDED')).instance
    assert (suspended.power_state, suspended.saved) == (
        virt_driver.PowerState.SUSPENDED, True)
    paused = nova._observation(_server(conf, status='PAUSED')).instance
    assert (paused.power_state, paused.saved) == (
        virt_driver.PowerState.SUSPENDED, False)
    assert nova.memory_ceiling_mb(2048) == 2048


def _clouds_yaml(tmp_path, monkeypatch):
    path = tmp_path / 'clouds.yaml'
    path.write_text(
        'clouds:\n  somewhere:\n    auth_type: password\n    auth:\n'
        '      auth_url: http://127.0.0.1:1/identity\n'
        '      username: u\n      password: p\n      project_name: p\n'
        '      user_domain_id: default\n'
        '      project_domain_id: default\n')
    monkeypatch.setenv('OS_CLIENT_CONFIG_FILE', str(path))


def test_every_request_is_bounded_on_the_clouds_yaml_path(
        conf, tmp_path, monkeypatch):
    _clouds_yaml(tmp_path, monkeypatch)
    conf.set_override('api_timeout', 17, group='nova')
    nova = nova_driver.NovaDriver(conf)
    nova.init_host()
    try:
        assert nova._conn.session.timeout == 17
    finally:
        nova.cleanup_host()


def test_every_request_is_bounded_on_the_keystoneauth_path(conf):
    conf.set_override('cloud', None, group='nova')
    # What a config file would give: the password plugin's options.
    conf.register_opts(ks_loading.get_auth_plugin_conf_options('password'),
                       group='nova')
    for name, value in (('auth_type', 'password'),
                        ('auth_url', 'http://127.0.0.1:1/identity'),
                        ('username', 'u'), ('password', 'p'),
                        ('project_name', 'p')):
        conf.set_override(name, value, group='nova')
    conf.set_override('api_timeout', 23, group='nova')
    nova = nova_driver.NovaDriver(conf)
    nova.init_host()
    try:
        assert nova._conn.session.timeout == 23
        started = time.monotonic()
        with pytest.raises(exception.DriverError, match='unreachable'):
            nova.observe([objects.Vm(user_id=1, name='x', vcpus=1,
                                     memory_mb=1, disk_gb=0)])
        assert time.monotonic() - started < 23
        assert 'failing since' in nova.connection_state()
    finally:
        nova.cleanup_host()
    # keystoneauth's own [nova] timeout wins for the session when set.
    conf.set_override('timeout', 5, group='nova')
    nova = nova_driver.NovaDriver(conf)
    nova.init_host()
    try:
        assert nova._conn.session.timeout == 5
    finally:
        nova.cleanup_host()
