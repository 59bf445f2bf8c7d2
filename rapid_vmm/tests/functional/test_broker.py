"""The broker as a trust boundary: the agent on a private RabbitMQ node over
TLS only, with a user and a virtual host of its own (doc/source/deploy.md,
"The broker")."""

import ssl

import amqp
import testtools

from rapid_vmm.tests.functional import agent as agent_fixture
from rapid_vmm.tests.functional import broker as broker_fixture

LINUX = 0


class TestAgentOverTls(testtools.TestCase):
    """One TLS-only node for the class's tests (it takes ~10 s to start)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.broker = broker_fixture.PrivateBroker(
            tls=True, plain=False, user='rapid', vhost='rapid')
        cls.broker.setUp()

    @classmethod
    def tearDownClass(cls):
        cls.broker.cleanUp()
        super().tearDownClass()

    def amqp_connection(self, **kwargs) -> amqp.Connection:
        broker = self.broker
        return amqp.Connection(
            host=f'127.0.0.1:{broker.tls_port}', userid=broker.user,
            password=broker.password, virtual_host=broker.vhost,
            connect_timeout=5, **kwargs)

    def verifying(self, ca: str) -> dict:
        """py-amqp TLS options that check the node's certificate against
        the test's CA ``ca`` (``'ca'`` or ``'other_ca'``)."""
        return {'context': {'cafile': self.broker.certificates[ca]},
                'server_hostname': '127.0.0.1'}

    def test_start_vm_round_trip_over_tls(self):
        broker = self.broker
        agent = self.useFixture(agent_fixture.AgentProcess(
            transport_url=broker.tls_transport_url,
            **{f'{group}.{name}': value for (group, name), value
               in broker.tls_options().items()}))
        agent.start()
        vm = agent.api.start_vm({}, user_id=5, os_type=LINUX, vcpus=1,
                                memory_mb=1024)
        self.assertEqual((5, 1), (vm['user_id'], vm['status']))
        agent.slam.recorder.wait_for(
            'vm_started', lambda kw: kw['vm']['user_id'] == 5, timeout=30)
        agent.ds.recorder.wait_for('register_vmm', timeout=30)
        self.assertEqual([vm['name']], [v['name'] for v in
                                        agent.api.get_vm_info({})])
        # Every connection of the agent and of the test side is TLS, as
        # the dedicated user, on the dedicated virtual host.
        rows = [line.split('\t') for line in broker.ctl(
            'list_connections', 'user', 'vhost', 'ssl', '--quiet',
            '--no-table-headers').splitlines() if line.strip()]
        self.assertTrue(rows)
        self.assertEqual({('rapid', 'rapid', 'true')},
                         {tuple(row) for row in rows})

    def test_tls_with_the_ca_connects(self):
        connection = self.amqp_connection(ssl=self.verifying('ca'))
        connection.connect()
        self.assertTrue(connection.connected)
        connection.close()

    def test_plain_amqp_to_the_tls_port_fails(self):
        # The node resets a connection that does not start with a TLS
        # handshake: the AMQP header never reaches it as such.
        connection = self.amqp_connection()
        self.assertRaises(OSError, connection.connect)
        self.assertFalse(connection.connected)

    def test_tls_with_another_ca_fails(self):
        connection = self.amqp_connection(ssl=self.verifying('other_ca'))
        self.assertRaises(ssl.SSLCertVerificationError, connection.connect)

    def test_no_plain_listener(self):
        self.assertIsNone(self.broker.port)
        listeners = self.broker.ctl('eval',
                                    'rabbit_networking:active_listeners().')
        self.assertIn("'amqp/ssl'", listeners)
        self.assertNotIn(',amqp,', listeners)


class TestPrivateBroker(testtools.TestCase):
    """The fixture itself: its own node, a restart that keeps its data."""

    def test_restart_keeps_users_and_serves_again(self):
        broker = self.useFixture(broker_fixture.PrivateBroker(
            user='rapid', vhost='rapid'))
        self.assertNotEqual(broker_fixture.SHARED_PORT, broker.port)
        self.assertNotEqual('rabbit@localhost', broker.node)

        def connect():
            connection = amqp.Connection(
                host=f'127.0.0.1:{broker.port}', userid='rapid',
                password=broker.password, virtual_host='rapid',
                connect_timeout=5)
            connection.connect()
            connection.close()

        connect()
        broker.stop()
        self.assertFalse(broker.running)
        self.assertRaises(OSError, connect)
        broker.start()
        connect()
        broker.restart()
        connect()
        self.assertIn('rapid', broker.ctl('list_users', '--quiet'))
