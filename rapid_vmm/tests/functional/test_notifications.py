"""Versioned notifications of the agent as a process, received by a
notification listener (its own pool) on the local RabbitMQ."""

import uuid

import oslo_messaging as messaging
import testtools

from rapid_vmm import notifications
from rapid_vmm.tests import fixtures as rfix
from rapid_vmm.tests.functional import agent as agent_fixture
from rapid_vmm.tests.functional import broker as broker_fixture

LINUX = 0


class TestNotifications(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.topic = f'test_notifications_{uuid.uuid4().hex[:10]}'
        self.pool = f'test-listener-{uuid.uuid4().hex[:10]}'
        self.agent = self.useFixture(agent_fixture.AgentProcess(**{
            'oslo_messaging_notifications.driver': 'messagingv2',
            'oslo_messaging_notifications.topics': self.topic}))
        self.addCleanup(
            broker_fixture.delete_queues, self.agent.transport_url,
            [self.pool] + [f'{self.topic}.{priority}' for priority in
                           ('info', 'error', 'warn', 'sample')])
        transport = messaging.get_notification_transport(self.agent.conf)
        self.addCleanup(transport.cleanup)
        self.recorder = rfix.NotificationRecorder()
        listener = messaging.get_notification_listener(
            transport, [messaging.Target(topic=self.topic)],
            [self.recorder], pool=self.pool)
        listener.start()
        self.addCleanup(listener.wait)
        self.addCleanup(listener.stop)

    def test_every_state_change_and_every_report_is_notified(self):
        agent = self.agent
        agent.start()
        api = agent.api
        vm = api.start_vm({}, user_id=11, os_type=LINUX, vcpus=1,
                          memory_mb=1024)
        api.suspend_vm({}, user_id=11)
        api.resume_vm({}, user_id=11)
        api.remove_vm({}, user_id=11)

        def of_user(item):
            return (item['event_type'].startswith('rapid_vmm.vm.') and
                    notifications.unwrap(item['payload'])[2].get(
                        'user_id') == 11)

        items = self.recorder.wait_for(4, timeout=30, match=of_user)
        self.assertEqual(['rapid_vmm.vm.started', 'rapid_vmm.vm.suspended',
                          'rapid_vmm.vm.resumed', 'rapid_vmm.vm.stopped'],
                         [item['event_type'] for item in items])
        self.assertEqual({f'rapid-vmm.{agent.conf.host}'},
                         {item['publisher_id'] for item in items})
        self.assertEqual({'info'}, {item['priority'] for item in items})
        payloads = [notifications.unwrap(item['payload']) for item in items]
        self.assertEqual({('VmStatusPayload', '1.0')},
                         {(name, version) for name, version, _ in payloads})
        self.assertEqual([1, 2, 3, 4],
                         [data['status'] for _, _, data in payloads])
        self.assertEqual({vm['name']},
                         {data['name'] for _, _, data in payloads})
        started = payloads[0][2]
        self.assertEqual((agent.conf.host, vm['ip_address'], 1, 1024),
                         (started['host'], started['ip_address'],
                          started['vcpus'], started['memory_mb']))
        # The DS registered the agent: its id is in the payloads.
        self.assertIsNotNone(payloads[-1][2]['vmm_id'])

        # And each report sent to the DS, as a sample.
        [report] = self.recorder.wait_for(
            1, timeout=30,
            match=lambda item: item['event_type'] == 'rapid_vmm.host.report')
        self.assertEqual('sample', report['priority'])
        name, version, data = notifications.unwrap(report['payload'])
        self.assertEqual(('HostReportPayload', '1.0'), (name, version))
        self.assertEqual(data['resources']['memory_free_mb'],
                         data['free_memory_mb'])
        self.assertIn('available_types', data['resources'])
