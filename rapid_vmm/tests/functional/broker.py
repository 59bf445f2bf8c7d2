"""A private RabbitMQ node for functional tests that need a broker of their
own: to stop or restart it, to give it TLS, users and virtual hosts.

:class:`PrivateBroker` starts ``rabbitmq-server`` with its own node name,
AMQP, TLS and Erlang distribution ports, Erlang cookie (``HOME``), and
configuration, data and log directories, all under a temporary directory,
so nothing it does can reach the shared node on 127.0.0.1:5672 (another
node name, other ports, none of ``/etc/rabbitmq``). Stopping it is
``rabbitmqctl -n <its node> stop``; a restart keeps its data (users,
virtual hosts, durable queues)::

    broker = self.useFixture(PrivateBroker(tls=True, user='rapid',
                                           vhost='rapid'))
    broker.transport_url        # rabbit://rapid:<password>@127.0.0.1:<port>/rapid
    broker.tls_transport_url    # the same on the TLS port
    broker.tls_options()        # [oslo_messaging_rabbit] ssl options
    broker.restart()

TLS certificates (a CA and a server certificate for ``localhost`` and
127.0.0.1) are made at set-up with the ``cryptography`` package.
"""

import datetime
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import time
import uuid

import fixtures

RABBITMQ_BIN = '/usr/lib/rabbitmq/bin'
#: The shared node's AMQP port: never a port of a private node.
SHARED_PORT = 5672


class BrokerError(Exception):
    """The private node did not start or stop."""


def _free_port(low: int = 20000, high: int = 45000) -> int:
    """A TCP port free on 127.0.0.1 in [low, high).

    The upper bound leaves room for rabbitmqctl's own distribution ports
    (the node's distribution port + 10000 .. + 10010).
    """
    for _ in range(200):
        port = low + secrets.randbelow(high - low)
        if port == SHARED_PORT:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(('127.0.0.1', port))
            except OSError:
                continue
            return port
    raise BrokerError('no free port found')


def make_certificates(directory: str, hostname: str = 'localhost',
                      ip: str = '127.0.0.1') -> dict:
    """A CA and a server certificate signed by it, as PEM files in
    ``directory``; returns their paths (``ca``, ``cert``, ``key``) and
    another CA (``other_ca``) that signed nothing."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write(filename: str, data: bytes) -> str:
        path = os.path.join(directory, filename)
        with open(path, 'wb') as out:
            out.write(data)
        os.chmod(path, 0o644)
        return path

    def ca(common: str):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(name(common)).issuer_name(name(common))
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0),
                               critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True,
                    crl_sign=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False,
                    decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    ca_key, ca_cert = ca('rapid-vmm test CA')
    _other_key, other_cert = ca('rapid-vmm unrelated CA')
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(name(hostname)).issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(hostname),
                x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage(
                [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return {
        'ca': write('ca.pem', ca_cert.public_bytes(pem)),
        'other_ca': write('other-ca.pem', other_cert.public_bytes(pem)),
        'cert': write('server.pem', cert.public_bytes(pem)),
        'key': write('server-key.pem', key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())),
    }


class PrivateBroker(fixtures.Fixture):
    """One RabbitMQ node of the test's own (see the module docstring).

    :param tls: also listen with TLS (``tls_port``).
    :param plain: listen without TLS (``port``); with ``tls`` and not
        ``plain`` the node speaks TLS only.
    :param user, password, vhost: a user with every permission on
        ``vhost``, made after the first start (None: ``guest`` on ``/``).
    :param start_timeout: seconds to wait for the node to serve.
    """

    def __init__(self, tls: bool = False, plain: bool = True,
                 user: str | None = None, password: str | None = None,
                 vhost: str | None = None, start_timeout: float = 90):
        super().__init__()
        if not (tls or plain):
            raise ValueError('a broker needs a listener')
        self.tls = tls
        self.plain = plain
        self.user = user or 'guest'
        self.password = password or (secrets.token_hex(12) if user
                                     else 'guest')
        self.vhost = vhost or '/'
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None

    # -- set-up -------------------------------------------------------------

    def _setUp(self):
        for program in ('rabbitmq-server', 'rabbitmqctl'):
            if not os.access(os.path.join(RABBITMQ_BIN, program), os.X_OK):
                raise BrokerError(f'{RABBITMQ_BIN}/{program} is missing: '
                                  'tools/setup-env.sh installs '
                                  'rabbitmq-server')
        self.base = self.useFixture(fixtures.TempDir()).path
        self.node = f'rapid-test-{uuid.uuid4().hex[:10]}@localhost'
        self.port = _free_port() if self.plain else None
        self.tls_port = _free_port() if self.tls else None
        self.dist_port = _free_port()
        self.certificates = (make_certificates(self.base) if self.tls
                             else {})
        self._write_files()
        self.env = self._environment()
        self.addCleanup(self._cleanup)
        self.start()
        if self.user != 'guest' or self.vhost != '/':
            self._make_user()

    def _write_files(self) -> None:
        lines = ['loopback_users = none',
                 'log.file.level = info',
                 'log.console = false']
        if self.plain:
            lines.append(f'listeners.tcp.1 = 127.0.0.1:{self.port}')
        else:
            lines.append('listeners.tcp = none')
        if self.tls:
            lines += [f'listeners.ssl.1 = 127.0.0.1:{self.tls_port}',
                      f"ssl_options.cacertfile = {self.certificates['ca']}",
                      f"ssl_options.certfile = {self.certificates['cert']}",
                      f"ssl_options.keyfile = {self.certificates['key']}",
                      'ssl_options.versions.1 = tlsv1.3',
                      'ssl_options.versions.2 = tlsv1.2',
                      'ssl_options.verify = verify_none',
                      'ssl_options.fail_if_no_peer_cert = false']
        self.config_file = os.path.join(self.base, 'rabbitmq.conf')
        with open(self.config_file, 'w', encoding='utf-8') as conf:
            conf.write('\n'.join(lines) + '\n')
        with open(os.path.join(self.base, 'enabled_plugins'), 'w',
                  encoding='utf-8') as plugins:
            plugins.write('[].\n')
        open(os.path.join(self.base, 'rabbitmq-env.conf'), 'w').close()
        cookie = os.path.join(self.base, '.erlang.cookie')
        with open(cookie, 'w', encoding='ascii') as out:
            out.write(secrets.token_hex(20).upper())
        os.chmod(cookie, 0o400)

    def _environment(self) -> dict:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(('RABBITMQ_', 'ERL_'))}
        base = self.base
        env.update({
            'HOME': base,  # the Erlang cookie of this node and its CLI
            'RABBITMQ_NODENAME': self.node,
            'RABBITMQ_DIST_PORT': str(self.dist_port),
            'RABBITMQ_CONFIG_FILE': self.config_file,
            'RABBITMQ_CONF_ENV_FILE': os.path.join(base, 'rabbitmq-env.conf'),
            'RABBITMQ_ADVANCED_CONFIG_FILE': os.path.join(
                base, 'advanced.config'),
            'RABBITMQ_ENABLED_PLUGINS_FILE': os.path.join(
                base, 'enabled_plugins'),
            'RABBITMQ_MNESIA_BASE': os.path.join(base, 'mnesia'),
            'RABBITMQ_LOG_BASE': os.path.join(base, 'log'),
            'RABBITMQ_PID_FILE': os.path.join(base, 'rabbitmq.pid'),
            'RABBITMQ_PLUGINS_EXPAND_DIR': os.path.join(base, 'plugins'),
            'RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS':
                '-kernel inet_dist_use_interface {127,0,0,1}',
            'ERL_EPMD_ADDRESS': '127.0.0.1',
        })
        if self.port is not None:
            env['RABBITMQ_NODE_PORT'] = str(self.port)
        return env

    def _make_user(self) -> None:
        if self.vhost != '/':
            self.ctl('add_vhost', self.vhost)
        if self.user != 'guest':
            self.ctl('add_user', self.user, self.password)
        self.ctl('set_permissions', '-p', self.vhost, self.user,
                 '.*', '.*', '.*')

    # -- control ------------------------------------------------------------

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl -n <this node> ARGS``; its output."""
        result = subprocess.run(
            [os.path.join(RABBITMQ_BIN, 'rabbitmqctl'), '-n', self.node,
             *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, check=False)
        if result.returncode != 0:
            raise BrokerError(f'rabbitmqctl {args[0]} failed: '
                              f'{result.stderr.strip() or result.stdout}')
        return result.stdout

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> float:
        """Start the node and wait until it serves; seconds it took."""
        if self.running:
            return 0.0
        started = time.monotonic()
        with open(os.path.join(self.base, 'server.out'), 'ab') as out:
            self.process = subprocess.Popen(
                [os.path.join(RABBITMQ_BIN, 'rabbitmq-server')],
                env=self.env, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.base, start_new_session=True)
        deadline = started + self.start_timeout
        while True:
            if self.process.poll() is not None:
                raise BrokerError(f'rabbitmq-server exited with '
                                  f'{self.process.returncode}:\n'
                                  f'{self.log_tail()}')
            try:
                self.ctl('await_startup', '--timeout', '5', timeout=30)
                break
            except (BrokerError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    self.kill()
                    raise BrokerError('rabbitmq-server did not start:\n' +
                                      self.log_tail()) from None
                time.sleep(0.5)
        for port in (self.port, self.tls_port):
            if port is not None:
                self._wait_for_port(port, deadline)
        return time.monotonic() - started

    def _wait_for_port(self, port: int, deadline: float) -> None:
        while True:
            try:
                socket.create_connection(('127.0.0.1', port), 1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise BrokerError(f'port {port} not open') from None
                time.sleep(0.2)

    def stop(self, timeout: float = 60) -> None:
        """``rabbitmqctl -n <node> stop``: a clean stop; data kept."""
        if not self.running:
            return
        try:
            self.ctl('stop', self.env['RABBITMQ_PID_FILE'], timeout=timeout)
        except (BrokerError, subprocess.TimeoutExpired):
            self.kill()
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self) -> float:
        """Stop and start again; seconds the start took."""
        self.stop()
        return self.start()

    def kill(self) -> None:
        """SIGKILL the node's process group (its Erlang VM and helpers)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def _cleanup(self) -> None:
        self.stop(timeout=30)
        # Leave no epmd registration or helper behind.
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -- what clients need --------------------------------------------------

    def _url(self, port: int | None) -> str:
        if port is None:
            raise BrokerError('that listener is not enabled')
        vhost = '' if self.vhost == '/' else self.vhost
        return (f'rabbit://{self.user}:{self.password}@127.0.0.1:{port}/'
                f'{vhost}')

    @property
    def transport_url(self) -> str:
        return self._url(self.port)

    @property
    def tls_transport_url(self) -> str:
        return self._url(self.tls_port)

    def tls_options(self) -> dict:
        """``{(group, option): value}`` that make oslo.messaging use TLS
        and check the node's certificate against the test CA."""
        return {('oslo_messaging_rabbit', 'ssl'): True,
                ('oslo_messaging_rabbit', 'ssl_ca_file'):
                    self.certificates['ca']}

    def log_tail(self, lines: int = 40) -> str:
        text = []
        for directory in (self.base, os.path.join(self.base, 'log')):
            if not os.path.isdir(directory):
                continue
            for name in sorted(os.listdir(directory)):
                if name.endswith(('.log', '.out')):
                    with open(os.path.join(directory, name),
                              encoding='utf-8', errors='replace') as log:
                        text += log.readlines()[-lines:]
        return ''.join(text[-lines:])


def delete_queues(transport_url: str, names: list[str]) -> None:
    """Delete the queues ``names`` (a test's own, named after its unique
    topics) on the broker of ``transport_url``; absent ones are skipped.

    Notification queues are not auto-deleted: a test that publishes or
    listens to notifications removes its queues so they do not pile up on
    the shared node.
    """
    from urllib import parse

    import amqp

    url = parse.urlsplit(transport_url)
    connection = amqp.Connection(
        host=f'{url.hostname}:{url.port or 5672}',
        userid=parse.unquote(url.username or 'guest'),
        password=parse.unquote(url.password or 'guest'),
        virtual_host=parse.unquote(url.path.lstrip('/')) or '/',
        connect_timeout=5)
    try:
        connection.connect()
        for name in names:
            channel = connection.channel()
            try:
                channel.queue_delete(name)
            except amqp.exceptions.NotFound:
                pass
            finally:
                if channel.is_open:
                    channel.close()
    finally:
        connection.collect()
