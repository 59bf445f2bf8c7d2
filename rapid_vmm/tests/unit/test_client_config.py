"""What rapid-vmm-client reads (rapid_vmm.cmd.client.load_config) and how
it bounds its work (bounded, check_broker)."""

import socket
import threading
import time

from oslo_config import cfg
import pytest

from rapid_vmm.cmd import client


def args(*argv):
    return client.build_parser().parse_args([*argv, 'status'])


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding='utf-8')
    return str(path)


AGENT_FILE = """[DEFAULT]
transport_url = rabbit://vmm:agent-secret@broker:5672/rapid
host = compute-7
vmm_topic = rapid_vmm_test
compute_driver = no-such-driver
report_interval = -5
[libvirt]
connection_uri = bogus:///
[nova]
password = nova-secret
[no_such_group]
x = y
[oslo_messaging_notifications]
driver = messagingv2
topics = notifications,rapid
[oslo_messaging_rabbit]
ssl = true
ssl_ca_file = /etc/rapid-vmm/ca.pem
"""


def test_agents_file_without_its_driver_options(tmp_path):
    path = write(tmp_path, 'rapid-vmm.conf', AGENT_FILE)
    conf = client.load_config(args('--config-file', path))
    assert conf.transport_url == \
        'rabbit://vmm:agent-secret@broker:5672/rapid'
    assert (conf.host, conf.vmm_topic) == ('compute-7', 'rapid_vmm_test')
    assert conf.client.timeout == 10.0
    assert conf.oslo_messaging_rabbit.ssl is True
    assert client.watch_topics(conf) == ['notifications', 'rapid']
    # Driver options (bad ones included) and their secrets are not even
    # registered: nothing reads them.
    for name in ('compute_driver', 'report_interval', 'data_path'):
        with pytest.raises(cfg.NoSuchOptError):
            getattr(conf, name)
    for group in ('libvirt', 'nova', 'no_such_group'):
        with pytest.raises(cfg.NoSuchOptError):
            getattr(conf, group)


def test_client_section_wins(tmp_path):
    path = write(tmp_path, 'client.conf', """[client]
transport_url = rabbit://ops:ops-secret@broker:5671/rapid
host = compute-9
vmm_topic = other_topic
notification_topics = rapid_notifications
timeout = 3.5
""")
    conf = client.load_config(args('--config-file', path))
    assert conf.transport_url == 'rabbit://ops:ops-secret@broker:5671/rapid'
    assert (conf.host, conf.vmm_topic) == ('compute-9', 'other_topic')
    assert conf.client.timeout == 3.5
    assert client.watch_topics(conf) == ['rapid_notifications']
    assert client.broker_hosts(conf) == [('broker', 5671)]
    conf = client.load_config(args('--config-file', path, '--host', 'h2',
                                   '--transport-url',
                                   'rabbit://a:b@one:1,c:d@two:2/'))
    assert conf.host == 'h2'
    assert client.broker_hosts(conf) == [('one', 1), ('two', 2)]


def test_default_files(tmp_path, monkeypatch):
    agent = write(tmp_path, 'rapid-vmm.conf', AGENT_FILE)
    own = str(tmp_path / 'client.conf')
    monkeypatch.setattr(client, 'AGENT_CONFIG', agent)
    monkeypatch.setattr(client, 'CLIENT_CONFIG', own)
    assert client.load_config(args()).host == 'compute-7'
    write(tmp_path, 'client.conf', '[client]\nhost = from-client\n')
    assert client.load_config(args()).host == 'from-client'


def test_unreadable_and_bad_files(tmp_path):
    with pytest.raises(client.Failure) as info:
        client.load_config(args('--config-file', str(tmp_path / 'none')))
    assert info.value.status == 2
    assert 'cannot read' in str(info.value)
    path = write(tmp_path, 'bad.conf', '[client]\ntimeout = soon\n')
    with pytest.raises(client.Failure) as info:
        client.load_config(args('--config-file', path))
    assert info.value.status == 2
    assert str(info.value).startswith('configuration error:')


def test_notifications_off(tmp_path):
    path = write(tmp_path, 'c.conf', '[DEFAULT]\nhost = h\n')
    conf = client.load_config(args('--config-file', path))
    with pytest.raises(client.Failure, match='notifications are off'):
        client.watch_topics(conf)
    path = write(tmp_path, 'd.conf', AGENT_FILE +
                 '[notifications]\nhost_reports = false\n')
    conf = client.load_config(args('--config-file', path))
    with pytest.raises(client.Failure, match='host_reports is false'):
        client.watch_topics(conf)


def test_bounded():
    deadline = time.monotonic() + 5
    assert client.bounded(lambda: 42, deadline) == 42
    with pytest.raises(ZeroDivisionError):
        client.bounded(lambda: 1 / 0, deadline)
    stuck = threading.Event()
    started = time.monotonic()
    with pytest.raises(client.Deadline):
        client.bounded(stuck.wait, time.monotonic() + 0.2)
    assert time.monotonic() - started < 2
    stuck.set()


def test_check_broker(tmp_path):
    with socket.socket() as listening:
        listening.bind(('127.0.0.1', 0))
        listening.listen(1)
        port = listening.getsockname()[1]
        path = write(tmp_path, 'c.conf', '[client]\ntransport_url = '
                     f'rabbit://g:g@127.0.0.1:{port}/\n')
        conf = client.load_config(args('--config-file', path))
        client.check_broker(conf, 1)
    with pytest.raises(client.Failure, match=f'127.0.0.1:{port}'):
        client.check_broker(conf, 1)
