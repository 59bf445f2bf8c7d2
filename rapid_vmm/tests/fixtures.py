"""Test fixtures shared by unit and functional tests.

* :class:`ConfFixture` - a private ``ConfigOpts`` with every rapid-vmm and
  oslo.messaging option, a temp ``data_path``, a real qcow2 template, unique
  RPC topics and a unique ``host`` (so tests sharing libvirt's in-process
  ``test:///default`` never see each other's domains).
* :class:`NotificationRecorder` - an endpoint of a notification listener.
* :class:`ServiceFixture` - the real :class:`rapid_vmm.service.VmmService`
  in this process, with simulated DS and SLAM on the same transport.
"""

import os
import subprocess
import threading
import time
import uuid

import fixtures
from oslo_config import cfg
import oslo_messaging as messaging
from oslo_messaging import conffixture

from rapid_vmm import conf as rapid_conf
from rapid_vmm import rpc
from rapid_vmm import rpcapi
from rapid_vmm import simulators

MEMORY_TRANSPORT = 'kombu+memory:////'
RABBIT_TRANSPORT = os.environ.get(
    'RAPID_VMM_TEST_TRANSPORT_URL', 'rabbit://guest:guest@127.0.0.1:5672/')

_TEMPLATE_CACHE = {}


def make_template(directory: str, size: str = '64M') -> str:
    """A small real qcow2 template disk in ``directory``."""
    path = os.path.join(directory, 'template.qcow2')
    if not os.path.exists(path):
        subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', path,
                        size], check=True)
    return path


def unique(prefix: str) -> str:
    return f'{prefix}_{uuid.uuid4().hex[:10]}'


def agent_config(data_path: str, template: str, transport_url: str,
                 **overrides) -> dict:
    """Option values of a test agent, as ``{(group, name): value}``."""
    suffix = uuid.uuid4().hex[:10]
    values = {
        ('DEFAULT', 'transport_url'): transport_url,
        ('DEFAULT', 'host'): f'test-host-{suffix}',
        ('DEFAULT', 'my_ip'): '127.0.0.1',
        ('DEFAULT', 'vmm_topic'): f'test_vmm_{suffix}',
        ('DEFAULT', 'ds_topic'): f'test_ds_{suffix}',
        ('DEFAULT', 'slam_topic'): f'test_slam_{suffix}',
        ('DEFAULT', 'data_path'): data_path,
        ('DEFAULT', 'report_interval'): 1,
        ('DEFAULT', 'reconcile_interval'): 0,
        ('DEFAULT', 'helper_vm_count'): 0,
        ('DEFAULT', 'as_register_timeout'): 0,
        ('DEFAULT', 'peer_call_timeout'): 5,
        ('DEFAULT', 'peer_reply_timeout'): 5,
        ('DEFAULT', 'registration_retry_max_interval'): 2,
        ('DEFAULT', 'ram_allocation_ratio'): 1000.0,
        ('DEFAULT', 'disk_allocation_ratio'): 1000.0,
        ('libvirt', 'connection_uri'): 'test:///default',
        ('libvirt', 'normal_image'): template,
        ('libvirt', 'ip_timeout'): 5,
        ('gpu', 'backend'): 'none',
    }
    for key, value in overrides.items():
        group, _, name = key.rpartition('.')
        values[(group or 'DEFAULT', name)] = value
    return values


def write_config_file(path: str, values: dict) -> str:
    """Write ``values`` as an oslo.config INI file."""
    groups: dict[str, list[str]] = {}
    for (group, name), value in values.items():
        if isinstance(value, (list, tuple)):
            value = ','.join(str(v) for v in value)
        groups.setdefault(group, []).append(f'{name} = {value}')
    with open(path, 'w', encoding='utf-8') as conf_file:
        for group in sorted(groups, key=lambda g: g != 'DEFAULT'):
            conf_file.write(f'[{group}]\n')
            conf_file.write('\n'.join(groups[group]) + '\n\n')
    return path


class ConfFixture(fixtures.Fixture):
    """A private, parsed ConfigOpts for one test.

    Keyword arguments override options: ``report_interval=5`` or
    ``**{'libvirt.ip_timeout': 1}``.
    """

    def __init__(self, transport_url: str = MEMORY_TRANSPORT, **overrides):
        super().__init__()
        self.transport_url = transport_url
        self.overrides = overrides

    def _setUp(self):
        self.tempdir = self.useFixture(fixtures.TempDir()).path
        self.template = make_template(self.tempdir)
        self.conf = cfg.ConfigOpts()
        rapid_conf.register_opts(self.conf)
        self.useFixture(conffixture.ConfFixture(self.conf))
        # The in-memory kombu transport has no heartbeats: do not ask.
        self.conf.set_override('heartbeat_timeout_threshold', 0,
                               group='oslo_messaging_rabbit')
        self.conf([], project='rapid-vmm-test', default_config_files=[],
                  default_config_dirs=[])
        self.values = agent_config(os.path.join(self.tempdir, 'data'),
                                   self.template, self.transport_url,
                                   **self.overrides)
        for (group, name), value in self.values.items():
            self.conf.set_override(
                name, value, group=None if group == 'DEFAULT' else group)
        self.addCleanup(self.conf.reset)


class ServiceFixture(fixtures.Fixture):
    """The agent's service in this process with simulated DS and SLAM.

    Attributes: ``conf``, ``service``, ``manager``, ``api`` (a
    :class:`VmmAPI` client), ``ds`` and ``slam`` (simulated peers, started
    unless ``peers=False``), ``transport``.
    """

    def __init__(self, conf_fixture: ConfFixture | None = None,
                 peers: bool = True, start: bool = True, **overrides):
        super().__init__()
        self.conf_fixture = conf_fixture or ConfFixture(**overrides)
        self.with_peers = peers
        self.autostart = start

    def _setUp(self):
        from rapid_vmm import service as vmm_service
        self.useFixture(self.conf_fixture)
        self.conf = self.conf_fixture.conf
        self.transport = rpc.get_transport(self.conf)
        self.addCleanup(self.transport.cleanup)
        self.ds = self.slam = None
        self.api = rpcapi.VmmAPI(self.conf, self.transport, timeout=30)
        self.service = vmm_service.VmmService(self.conf)
        self.addCleanup(self._stop_all)
        if self.with_peers:
            self.start_peers()
        if self.autostart:
            self.start()

    def start_peers(self) -> None:
        self.ds = simulators.directory_server(self.conf,
                                              self.transport).start()
        self.slam = simulators.sla_manager(self.conf, self.transport).start()

    def _stop_all(self) -> None:
        """Stop the agent and the peers in parallel (each takes ~1 s)."""
        stoppers = [self._stop_service]
        stoppers += [peer.stop for peer in (self.ds, self.slam) if peer]
        threads = [threading.Thread(target=stop) for stop in stoppers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)

    def start(self) -> None:
        self.service.start()

    @property
    def manager(self):
        return self.service.manager

    def _stop_service(self) -> None:
        manager = self.service.manager
        if manager is not None:
            _destroy_all(manager)
        self.service.stop()

    def restart(self) -> None:
        """Stop the service (domains stay) and start a new one."""
        from rapid_vmm import service as vmm_service
        self.service.stop()
        self.service = vmm_service.VmmService(self.conf)
        self.service.start()


def _destroy_all(manager) -> None:
    """Remove every domain a test made (test:///default outlives tests)."""
    try:
        for instance in manager.driver.list_instances():
            vm = manager.store.get_vm(instance.user_id)
            if vm is None or vm.name != instance.name:
                from rapid_vmm import objects
                vm = objects.Vm(user_id=instance.user_id, name=instance.name,
                                vcpus=1, memory_mb=1, disk_gb=0,
                                disk_path=instance.disk_path)
            manager.driver.destroy(vm)
    except Exception:
        pass


class NotificationRecorder:
    """A notification endpoint that keeps what it gets (every priority
    the agent uses), for a ``get_notification_listener``."""

    def __init__(self):
        self.items = []
        self.changed = threading.Condition()

    def _keep(self, priority, ctxt, publisher_id, event_type, payload,
              metadata):
        with self.changed:
            self.items.append({'priority': priority, 'ctxt': ctxt,
                               'publisher_id': publisher_id,
                               'event_type': event_type, 'payload': payload})
            self.changed.notify_all()
        return messaging.NotificationResult.HANDLED

    def info(self, *args):
        return self._keep('info', *args)

    def error(self, *args):
        return self._keep('error', *args)

    def warn(self, *args):
        return self._keep('warn', *args)

    def sample(self, *args):
        return self._keep('sample', *args)

    def wait_for(self, count, timeout=10, match=None):
        """The first ``count`` notifications ``match`` accepts (all by
        default), once they came."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(self.select(match)) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f'{len(self.select(match))} of {count} '
                        f'notifications: {self.items}')
                self.changed.wait(left)
        return self.select(match)[:count]

    def select(self, match=None):
        return [item for item in self.items if match is None or match(item)]
