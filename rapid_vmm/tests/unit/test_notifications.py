"""Tests of rapid_vmm.notifications: a real Notifier and notification
listener on oslo.messaging's in-memory kombu transport."""

import socket
import time
import uuid

from oslo_context import context as oslo_context
import oslo_messaging as messaging
import pytest

from rapid_vmm import notifications
from rapid_vmm.tests import fixtures as rfix


@pytest.fixture
def conf_fixture():
    fixture = rfix.ConfFixture()
    fixture.setUp()
    conf = fixture.conf
    topic = f'test_notifications_{uuid.uuid4().hex[:10]}'
    conf.set_override('driver', ['messagingv2'],
                      group='oslo_messaging_notifications')
    conf.set_override('topics', [topic], group='oslo_messaging_notifications')
    fixture.topic = topic
    yield fixture
    fixture.cleanUp()


@pytest.fixture
def listened(conf_fixture):
    """(conf, recorder, transport) with a listener on the topic."""
    conf = conf_fixture.conf
    transport = messaging.get_notification_transport(conf)
    recorder = rfix.NotificationRecorder()
    listener = messaging.get_notification_listener(
        transport, [messaging.Target(topic=conf_fixture.topic)], [recorder],
        pool='test')
    listener.start()
    yield conf, recorder, transport
    listener.stop()
    listener.wait()
    transport.cleanup()


def record(**changes):
    vm = {'user_id': 7, 'vm_id': 70, 'name': 'rapid-vm-7-abc', 'status': 1,
          'vcpus': 2, 'memory_mb': 2048, 'disk_gb': 20, 'gpu_cores': 0,
          'os_type': 0, 'helper': 0, 'ip_address': '10.0.0.7',
          'task_state': '', 'as_ready': True, 'resize_pending': False}
    vm.update(changes)
    return vm


def test_vm_changes_are_published_in_order_with_versioned_payloads(listened):
    conf, recorder, transport = listened
    notifier = notifications.VmNotifier(conf, transport, vmm_id=lambda: 5)
    assert notifier.enabled
    ctxt = oslo_context.RequestContext(request_id='req-1234')
    events = ['started', 'suspended', 'resumed', 'resized',
              'resize_confirmed', 'stopped']
    for status, event in zip([1, 2, 3, 3, 3, 4], events, strict=True):
        notifier.vm_changed(ctxt, event, record(status=status),
                            previous=[1, 1024, 20])
    items = recorder.wait_for(len(events))
    notifier.stop()
    assert [i['event_type'] for i in items] == [
        f'rapid_vmm.vm.{event}' for event in events]
    assert {i['priority'] for i in items} == {'info'}
    assert {i['publisher_id'] for i in items} == {f'rapid-vmm.{conf.host}'}
    assert items[0]['ctxt']['request_id'] == 'req-1234'
    name, version, data = notifications.unwrap(items[1]['payload'])
    assert (name, version) == ('VmStatusPayload', '1.0')
    assert items[1]['payload']['rapid_vmm_object.namespace'] == 'rapid_vmm'
    expected = {field: record()[field] for field in notifications.VM_FIELDS}
    expected.update(status=2, status_name='suspended', host=conf.host,
                    vmm_id=5, event='suspended', previous=[1, 1024, 20])
    assert data == expected
    # Only the fields of the payload version, nothing else of the record.
    assert 'as_ready' not in data


def test_start_failed_is_an_error_with_the_reason(listened):
    conf, recorder, transport = listened
    notifier = notifications.VmNotifier(conf, transport)
    notifier.vm_changed({}, 'start_failed', record(vm_id=None),
                        error='No capacity', error_class='NoCapacity',
                        unexpected='dropped')
    [item] = recorder.wait_for(1)
    notifier.stop()
    assert item['priority'] == 'error'
    _, _, data = notifications.unwrap(item['payload'])
    assert (data['error'], data['error_class']) == ('No capacity',
                                                    'NoCapacity')
    assert data['vmm_id'] is None
    assert 'unexpected' not in data


def test_host_report_is_a_sample_with_the_ds_arguments(listened):
    conf, recorder, transport = listened
    notifier = notifications.VmNotifier(conf, transport, vmm_id=lambda: 9)
    resources = {'cpu_load_percent': 12.5, 'memory_free_mb': 2048,
                 'gpu_load_percent': None, 'vms_running': 1}
    notifier.host_report({}, resources)
    [item] = recorder.wait_for(1)
    assert item['priority'] == 'sample'
    assert item['event_type'] == 'rapid_vmm.host.report'
    name, version, data = notifications.unwrap(item['payload'])
    assert (name, version) == ('HostReportPayload', '1.0')
    assert data == {'host': conf.host, 'vmm_id': 9, 'cpu_load': 12.5,
                    'free_memory_mb': 2048, 'gpu_load': None,
                    'resources': resources}
    conf.set_override('host_reports', False, group='notifications')
    notifier.host_report({}, resources)
    notifier.vm_changed({}, 'stopped', record(status=4))
    items = recorder.wait_for(2)
    notifier.stop()
    assert [i['event_type'] for i in items] == ['rapid_vmm.host.report',
                                                'rapid_vmm.vm.stopped']


def test_off_without_a_driver(conf_fixture):
    conf = conf_fixture.conf
    conf.set_override('driver', [], group='oslo_messaging_notifications')
    notifier = notifications.VmNotifier(conf)
    assert not notifier.enabled
    notifier.vm_changed({}, 'started', record())
    notifier.host_report({}, {})
    assert notifier._thread is None
    notifier.stop()


def test_bad_input_never_raises(listened, caplog):
    conf, recorder, transport = listened
    notifier = notifications.VmNotifier(conf, transport)
    notifier.vm_changed({}, 'exploded', record())
    notifier.vm_changed({}, 'started', None)
    notifier.host_report({}, None)
    notifier.vm_changed(object(), 'started', record())
    [item] = recorder.wait_for(1)
    notifier.stop()
    assert item['ctxt']['request_id'].startswith('req-')
    assert 'exploded' in caplog.text


def test_unreachable_broker_never_blocks_the_caller(conf_fixture):
    conf = conf_fixture.conf
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    # Nothing listens on ``port``: every connection attempt is refused.
    conf.set_override('transport_url',
                      f'rabbit://guest:guest@127.0.0.1:{port}/',
                      group='oslo_messaging_notifications')
    conf.set_override('send_retry', 0, group='notifications')
    conf.set_override('queue_size', 3, group='notifications')
    notifier = notifications.VmNotifier(conf)
    started = time.monotonic()
    for _ in range(10):
        notifier.vm_changed({}, 'started', record())
    assert time.monotonic() - started < 1.0
    assert notifier.dropped >= 6
    notifier.stop(timeout=5)
    assert notifier.dropped <= 10
